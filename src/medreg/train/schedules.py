"""Learning-rate schedules: a factor of the base learning rate per optimiser step.

``lr(step) = lr · warmup(step) · schedule.factor(step)``, with a linear warm-up over the first
``warmup`` steps. A schedule is named in the config as a string (``cosine``) or a mapping
(``{name: step, step_size: 1000, gamma: 0.5}``):

* ``none``: constant.
* ``cosine``: half a cosine from 1 to ``min_factor`` over the run (after the warm-up).
* ``step``: multiply by ``gamma`` every ``step_size`` steps.
* ``plateau``: multiply by ``factor`` when the monitored validation metric has not improved for
  ``patience`` validations (as ``torch.optim.lr_scheduler.ReduceLROnPlateau``; the metric and
  its direction are ``train.early_stopping.metric``/``mode``), never below ``min_factor``.

Every schedule keeps its state in plain numbers (``state_dict``) so checkpoints stay loadable
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Mapping

from medreg.core.errors import InputError


class Schedule:
    """Base: constant factor 1."""

    def __init__(self, total_steps: int, warmup: int = 0) -> None:
        self.total_steps = int(total_steps)
        self.warmup = int(warmup)

    def factor(self, step: int) -> float:
        """Multiplier of the base learning rate for optimiser step ``step`` (0-based)."""
        return 1.0

    def observe(self, value: float, improved: bool) -> None:
        """Called after each validation with the monitored value (plateau only uses it)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class Cosine(Schedule):
    def __init__(self, total_steps: int, warmup: int = 0, min_factor: float = 0.0) -> None:
        super().__init__(total_steps, warmup)
        if not 0 <= float(min_factor) <= 1:
            raise InputError(f"schedule cosine: min_factor must be in [0, 1], got {min_factor!r}")
        self.min_factor = float(min_factor)

    def factor(self, step: int) -> float:
        span = max(self.total_steps - self.warmup, 1)
        t = min(max(step - self.warmup, 0) / span, 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))


class StepDecay(Schedule):
    def __init__(self, total_steps: int, warmup: int = 0, step_size: int = 1000,
                 gamma: float = 0.5) -> None:
        super().__init__(total_steps, warmup)
        if int(step_size) < 1 or not 0 < float(gamma) <= 1:
            raise InputError(f"schedule step: step_size must be >= 1 and gamma in (0, 1], got "
                             f"{step_size!r}, {gamma!r}")
        self.step_size = int(step_size)
        self.gamma = float(gamma)

    def factor(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


class Plateau(Schedule):
    def __init__(self, total_steps: int, warmup: int = 0, factor: float = 0.5,
                 patience: int = 3, min_factor: float = 1e-3) -> None:
        super().__init__(total_steps, warmup)
        if not 0 < float(factor) < 1 or int(patience) < 0 or not 0 <= float(min_factor) <= 1:
            raise InputError("schedule plateau: factor must be in (0, 1), patience >= 0 and "
                             "min_factor in [0, 1]")
        self.reduce = float(factor)
        self.patience = int(patience)
        self.min_factor = float(min_factor)
        self.current = 1.0
        self.bad = 0

    def factor(self, step: int) -> float:
        return self.current

    def observe(self, value: float, improved: bool) -> None:
        self.bad = 0 if improved else self.bad + 1
        if self.bad > self.patience:
            self.current = max(self.current * self.reduce, self.min_factor)
            self.bad = 0

    def state_dict(self) -> dict[str, Any]:
        return {"current": float(self.current), "bad": int(self.bad)}


#: Registry: config name → schedule class.
SCHEDULES: dict[str, type[Schedule]] = {"none": Schedule, "cosine": Cosine, "step": StepDecay,
                                        "plateau": Plateau}


def schedule_from_config(spec: Any, total_steps: int, warmup: int = 0) -> Schedule:
    """A schedule from ``"name"`` or ``{name, **params}`` (unknown names/keys: ``InputError``)."""
    if spec is None:
        spec = "none"
    params: dict[str, Any] = {}
    if isinstance(spec, Mapping):
        params = {str(k): v for k, v in spec.items() if k != "name"}
        spec = spec.get("name", "none")
    name = str(spec).strip().lower()
    if name not in SCHEDULES:
        raise InputError(f"train: unknown schedule {spec!r}; choose one of: {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    valid = [p for p in inspect.signature(cls.__init__).parameters
             if p not in ("self", "total_steps", "warmup")]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise InputError(f"train: schedule {name} has no option(s) {', '.join(unknown)}; "
                         f"valid: {', '.join(valid) or '(none)'}")
    return cls(total_steps, warmup, **params)


def warmup_factor(step: int, warmup: int) -> float:
    """Linear warm-up: ``(step + 1) / warmup`` for the first ``warmup`` steps, then 1."""
    return 1.0 if warmup <= 0 or step >= warmup else (step + 1) / warmup
