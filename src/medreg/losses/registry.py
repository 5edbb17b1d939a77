r"""Loss registry and weighted sums of loss terms built from a config.

``create(name, **params)`` returns a loss module by name. A weighted sum of terms comes from a
mapping of *term labels* to their settings (the format of a YAML ``losses:`` block)::

    losses = from_config({
        "lncc": {"weight": 1.0, "window": 9},
        "diffusion": {"weight": 0.1},
        "fine": {"name": "lncc", "weight": 0.5, "window": 5},   # a second LNCC term
    })
    out = losses(fixed=f, warped=w, displacement=u, grid=grid)
    out.total.backward()       # out.terms["lncc"], out.terms["diffusion"], ... (unweighted)

Each entry's ``name`` (a registry name) defaults to its label; ``weight`` defaults to 1; the
other keys are the module's parameters.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import Tensor, nn

from medreg.core.errors import InputError
from medreg.core.grid import Grid
from medreg.losses.regularisers import (Bending, Diffusion, Elastic, JacobianPenalty,
                                        TotalVariation, resolve_displacement)
from medreg.losses.similarity import LNCC, MI, MIND, NCC, NGF, NMI, SSD
from medreg.losses.supervision import EPE, TRE, Dice

__all__ = ["LOSSES", "LossValue", "WeightedSum", "available", "create", "from_config"]

#: Registry: name → loss module class.
LOSSES: dict[str, type[nn.Module]] = {
    "ssd": SSD,
    "mse": SSD,
    "ncc": NCC,
    "lncc": LNCC,
    "mi": MI,
    "nmi": NMI,
    "mind": MIND,
    "ngf": NGF,
    "diffusion": Diffusion,
    "bending": Bending,
    "elastic": Elastic,
    "tv": TotalVariation,
    "jacobian": JacobianPenalty,
    "dice": Dice,
    "tre": TRE,
    "epe": EPE,
}


def available() -> list[str]:
    """Sorted registry names."""
    return sorted(LOSSES)


def _parameters(cls: type) -> list[str]:
    sig = inspect.signature(cls.__init__)
    return [p for p in sig.parameters if p != "self"]


def create(name: str, **params: Any) -> nn.Module:
    """Create a loss module by registry name.

    Args:
        name: one of :func:`available` (case-insensitive).
        **params: constructor parameters of that module.

    Returns:
        The module.

    Raises:
        InputError: (a ``ValueError``) for an unknown name (listing the valid ones), an
            unknown parameter (listing the module's parameters) or a bad value.
    """
    key = str(name).strip().lower()
    if key not in LOSSES:
        raise InputError(f"unknown loss {name!r}; choose one of: {', '.join(available())}")
    cls = LOSSES[key]
    valid = _parameters(cls)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise InputError(f"loss {key!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
                         f"valid parameters: {', '.join(valid) or '(none)'}")
    return cls(**params)


@dataclass
class LossValue:
    """Result of a :class:`WeightedSum`.

    Attributes:
        total: ``Σ weight · term`` (scalar, differentiable).
        terms: each term's unweighted value, by label.
        weights: each term's weight, by label.
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


# inputs each kind of term is fed, by WeightedSum.forward keyword
_NEEDS = {
    "similarity": ("fixed", "warped"),
    "regulariser": ("displacement",),
    "labels": ("fixed_labels", "warped_labels"),
    "points": ("points", "target_points"),
    "displacement": ("displacement", "target_displacement"),
}


class WeightedSum(nn.Module):
    """A weighted sum of loss terms, fed by keyword.

    Args:
        terms: label → ``(weight, module)``; modules from :func:`create` or any module with a
            ``kind`` attribute of ``"similarity"``, ``"regulariser"``, ``"labels"``,
            ``"points"`` or ``"displacement"``.

    Call it with the inputs the terms need (all keyword, all optional)::

        fixed, warped, fixed_mask, moving_mask     similarity terms
        displacement (tensor or transform), grid   regularisers (grid: Grid or spacing;
                                                   also gives similarity terms their spacing)
        fixed_labels, warped_labels, label_mask    dice
        points, target_points, point_mask          tre
        target_displacement                        epe (with displacement)

    A transform given as ``displacement`` is sampled once on ``grid`` and shared.
    """

    def __init__(self, terms: Mapping[str, tuple[float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise InputError("a weighted sum needs at least one loss term")
        self.weights: dict[str, float] = {}
        self.terms = nn.ModuleDict()
        for label, (weight, module) in terms.items():
            kind = getattr(module, "kind", None)
            if kind not in _NEEDS:
                raise InputError(f"loss term {label!r} ({type(module).__name__}) has no known "
                                 f"kind; expected one of: {', '.join(_NEEDS)}")
            try:
                w = float(weight)
            except (TypeError, ValueError):
                raise InputError(f"weight of loss term {label!r} must be a number, "
                                 f"got {weight!r}") from None
            if not math.isfinite(w):
                raise InputError(f"weight of loss term {label!r} must be finite, got {weight!r}")
            self.weights[str(label)] = w
            self.terms[str(label)] = module

    @classmethod
    def from_config(cls, config: Mapping[str, Mapping[str, Any]]) -> "WeightedSum":
        """Build from ``{label: {"name": registry name (default: label), "weight": w, **kw}}``."""
        if not isinstance(config, Mapping) or not config:
            raise InputError("a loss config must be a non-empty mapping of term label to "
                             "settings, e.g. {'lncc': {'weight': 1, 'window': 9}}")
        terms: dict[str, tuple[float, nn.Module]] = {}
        for label, settings in config.items():
            if settings is None:
                settings = {}
            if not isinstance(settings, Mapping):
                raise InputError(f"settings of loss term {label!r} must be a mapping, "
                                 f"got {settings!r}")
            settings = dict(settings)
            name = settings.pop("name", label)
            weight = settings.pop("weight", 1.0)
            try:
                module = create(name, **settings)
            except InputError as err:
                raise InputError(f"loss term {label!r}: {err}") from None
            terms[str(label)] = (weight, module)
        return cls(terms)

    def forward(self, *, fixed: Tensor | None = None, warped: Tensor | None = None,
                fixed_mask: Tensor | None = None, moving_mask: Tensor | None = None,
                displacement: Any = None, grid: Grid | Any = None,
                fixed_labels: Tensor | None = None, warped_labels: Tensor | None = None,
                label_mask: Tensor | None = None, points: Tensor | None = None,
                target_points: Tensor | None = None, point_mask: Tensor | None = None,
                target_displacement: Tensor | None = None) -> LossValue:
        """Evaluate every term and their weighted sum (see the class docstring)."""
        given = {"fixed": fixed, "warped": warped, "displacement": displacement,
                 "fixed_labels": fixed_labels, "warped_labels": warped_labels,
                 "points": points, "target_points": target_points,
                 "target_displacement": target_displacement}
        if displacement is not None and not isinstance(displacement, Tensor):
            displacement = resolve_displacement(displacement, grid)
        values: dict[str, Tensor] = {}
        total: Tensor | None = None
        for label, module in self.terms.items():
            kind = module.kind
            missing = [k for k in _NEEDS[kind] if given[k] is None]
            if missing:
                raise InputError(f"loss term {label!r} ({type(module).__name__}) needs "
                                 f"{', '.join(missing)}")
            if kind == "similarity":
                v = module(fixed, warped, fixed_mask, moving_mask, spacing=grid)
            elif kind == "regulariser":
                v = module(displacement, grid)
            elif kind == "labels":
                v = module(fixed_labels, warped_labels, label_mask)
            elif kind == "points":
                v = module(points, target_points, point_mask)
            else:
                v = module(displacement, target_displacement,
                           grid=grid if isinstance(grid, Grid) else None)
            values[label] = v
            term = self.weights[label] * v
            total = term if total is None else total + term
        assert total is not None
        return LossValue(total, values, dict(self.weights))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {w:g}" for k, w in self.weights.items())


def from_config(config: Mapping[str, Mapping[str, Any]]) -> WeightedSum:
    """:meth:`WeightedSum.from_config`: ``{label: {"name"?, "weight"?, **params}}``."""
    return WeightedSum.from_config(config)
