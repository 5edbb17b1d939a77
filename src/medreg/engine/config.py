"""Registration configuration: typed dataclasses read from YAML presets or ``--config`` files.

A config is a mapping with global keys and a list of ``stages``, each optimised over its own
image pyramid, e.g.::

    initialisation: moments        # none | geometry | com | moments
    stages:
      - type: affine               # translation | rigid | similarity | affine | bspline | displacement | svf | greedy | discrete
        levels: [4, 2]             # pyramid shrink factors, coarse to fine
        iterations: [100, 50]
        similarity: {name: ncc}
      - type: svf
        levels: [4, 2]
        iterations: [80, 40]
        lr: 0.5
        similarity: {name: lncc, window: 5}
        regularisation: {diffusion: 1.0}

Unknown keys are errors (with the valid keys listed), so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence


from medreg.core.errors import InputError

if TYPE_CHECKING:
    from torch import nn

STAGE_TYPES = ("translation", "rigid", "similarity", "affine", "bspline", "displacement", "svf",
               "greedy", "discrete")
LINEAR_TYPES = ("translation", "rigid", "similarity", "affine")
INITIALISATIONS = ("none", "geometry", "com", "moments")
OPTIMIZERS = ("adam", "lbfgs")


#: per-level stage settings that may be given as one value for all levels
_REPEATABLE = ("iterations", "log_jacobian")


def _plain(value: Any) -> Any:
    """A numpy scalar or a 0-d tensor as the Python number it holds (else ``value``)."""
    if (hasattr(value, "item") and getattr(value, "ndim", None) == 0) or type(value).__module__ == "numpy":
        try:
            return value.item()
        except (AttributeError, ValueError):
            return value
    return value


def _is_number(value: Any, whole: bool = False) -> bool:
    """A finite real number (not a bool, not a string; numpy scalars and 0-d tensors pass
    through :func:`_plain` first); ``whole``: with no fractional part."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        if not math.isfinite(value):
            return False
        return not whole or float(value).is_integer()
    except OverflowError:  # an integer beyond float range
        return False


def _checked_number(value: Any, name: str, where: str, *, minimum: float = 0.0, above: bool = False,
                    whole: bool = False) -> float | int:
    """``value`` as a plain ``int`` (``whole``) or ``float``; an ``InputError`` unless it is a
    number ``>= minimum`` (``> minimum`` with ``above``)."""
    value = _plain(value)
    ok = _is_number(value, whole) and (value > minimum if above else value >= minimum)
    if not ok:
        kind = "a whole number" if whole else "a number"
        raise InputError(f"{where}: {name} must be {kind} {'>' if above else '>='} {minimum:g}, "
                         f"got {value!r}")
    return int(value) if whole else float(value)


def _checked_bool(value: Any, name: str, where: str) -> bool:
    value = _plain(value)
    if not isinstance(value, bool):  # YAML's "no"/"false" in quotes is a (truthy) string
        raise InputError(f"{where}: {name} must be true or false (unquoted), got {value!r}")
    return value


def _per_level(value, stage: "StageConfig", name: str, what: str, whole: bool = False) -> list[float]:
    """``value`` as one non-negative number per level of ``stage`` (a single number is repeated)."""
    items = value if isinstance(value, (list, tuple)) else [value] * len(stage.levels)
    items = [_plain(v) for v in items]
    if (len(items) != len(stage.levels) or any(not _is_number(v, whole) or v < 0 for v in items)):
        raise InputError(f"stage {stage.type}: {name} must be {what} or one per level "
                         f"({len(stage.levels)} levels), got {value}")
    return [float(v) for v in items]


def build_similarity(spec: dict) -> "nn.Module":
    """The similarity module of a stage's ``similarity`` mapping (``{name: ..., **params}``)."""
    from medreg.losses import create

    params = {k: v for k, v in spec.items() if k != "name"}
    return create(spec["name"], **params)


def build_regularisers(spec: dict) -> list[tuple[float, "nn.Module", str]]:
    """``(weight, module, name)`` of each non-zero term of a stage's ``regularisation`` mapping."""
    from medreg.losses import create

    terms = []
    for name, value in spec.items():
        if isinstance(value, dict):
            params = dict(value)
            weight = float(params.pop("weight", 1.0))
        else:
            params, weight = {}, float(value)
        if weight != 0:
            terms.append((weight, create(name, **params), name))
    return terms


@dataclass
class StageConfig:
    """One transform stage.

    Attributes:
        type: transform model (see ``STAGE_TYPES``).
        levels: pyramid shrink factors, coarse to fine (1 = full resolution).
        iterations: optimiser steps per level (one value for all levels, or one per level).
        optimizer: ``adam`` or ``lbfgs``.
        lr: learning rate. Linear stages: mm of translation per step (rotations and matrix
            entries are scaled by the image radius so they move comparably). Deformable stages:
            mm of displacement/velocity (B-spline: of coefficients) per step. Greedy: the
            longest update vector per step, in voxels of the level.
        similarity: ``{name: ..., **params}`` for :func:`medreg.losses.create`.
        regularisation: ``{name: weight}`` or ``{name: {weight: w, **params}}``.
        smoothing: Gaussian σ in mm of the image pyramid per level (default ``0.5·factor·spacing``).
        control_spacing: B-spline control-point spacing in mm.
        steps: scaling-and-squaring steps (SVF).
        symmetric: SVF and greedy: warp both images to the midpoint (SVF: inverse-consistent;
            greedy: as ANTs' SyN, each image's field carries half of the deformation).
        gradient_sigma: Gaussian σ (voxels of the level) applied to the gradient of dense fields
            before each step (a "fluid-like" smoothing hook; 0 disables). Greedy: of the force.
        field_smoothing: Gaussian σ (voxels) applied to dense fields after each step
            ("diffusion-like" smoothing, 0 disables).
        log_jacobian: greedy only: step size (units of the level's squared voxel spacing) of a
            descent step on ``½ Σ (log det J)²`` of the total field after each update, one value
            or one per level; 0 disables. A volume-change regulariser (see
            :mod:`medreg.engine.greedy`); a step moves no point more than ``lr`` voxels.
        tolerance: stop a level when the loss improved by less than this (relative) over
            ``patience`` steps.
        patience: steps over which convergence is checked.
        discrete: ``type: discrete`` only: the fields of
            :class:`medreg.engine.discrete.DiscreteParams` (search radius and step in mm,
            feature resolution, coupling weights, instance-optimisation steps, ...); ``levels``,
            ``iterations``, ``similarity`` and ``lr`` do not apply to this stage.
        small_image: settings of this stage that replace its own when the fixed image is small
            (see :attr:`RegistrationConfig.small_image_size`), e.g. a pyramid one octave finer:
            a 40-voxel crop has nothing left to register at 1/4 resolution (10 voxels, about one
            LNCC window). Any stage key but ``type`` and ``small_image``; a ``discrete`` mapping
            here changes the stage's discrete settings key by key.
    """

    type: str
    levels: list[int] = field(default_factory=lambda: [4, 2])
    iterations: list[int] | int = 100
    optimizer: str = "adam"
    lr: float | None = None
    similarity: dict = field(default_factory=lambda: {"name": "ncc"})
    regularisation: dict = field(default_factory=dict)
    smoothing: list[float] | None = None
    control_spacing: float = 10.0
    steps: int = 7
    symmetric: bool = False
    gradient_sigma: float = 0.0
    field_smoothing: float = 0.0
    log_jacobian: list[float] | float = 0.0
    tolerance: float = 1e-5
    patience: int = 20
    discrete: dict = field(default_factory=dict)
    small_image: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in STAGE_TYPES:
            raise InputError(f"unknown stage type {self.type!r}; choose one of: {', '.join(STAGE_TYPES)}")
        if self.optimizer not in OPTIMIZERS:
            raise InputError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        self._check_types()
        levels = [_plain(f) for f in (self.levels if isinstance(self.levels, (list, tuple)) else [self.levels])]
        if not levels or any(not _is_number(f, whole=True) or f < 1 for f in levels):
            raise InputError(f"stage {self.type}: levels must be whole shrink factors >= 1, got {self.levels}")
        self.levels = [int(f) for f in levels]
        self.iterations = [int(i) for i in _per_level(self.iterations, self, "iterations",
                                                      "one whole count >= 0", whole=True)]
        self.log_jacobian = lj = _per_level(self.log_jacobian, self, "log_jacobian", "one step size >= 0")
        if self.type != "greedy" and any(lj):
            raise InputError(f"stage {self.type}: log_jacobian applies to greedy stages; use "
                             f"regularisation: {{jacobian: {{mode: log2, weight: ...}}}} instead")
        if self.smoothing is not None:
            if not isinstance(self.smoothing, list):
                raise InputError(f"stage {self.type}: smoothing needs one σ (mm) per level, got {self.smoothing}")
            self.smoothing = _per_level(self.smoothing, self, "smoothing", "one σ (mm) >= 0")
        if not isinstance(self.similarity, Mapping) or "name" not in self.similarity:
            raise InputError(f"stage {self.type}: similarity must be a mapping with a 'name'")
        if self.type in LINEAR_TYPES and self.symmetric:
            raise InputError(f"stage {self.type}: symmetric mode is for svf and greedy stages")
        if self.type == "discrete":
            from medreg.engine.discrete import DiscreteParams

            if self.symmetric:
                raise InputError("stage discrete: use discrete.inverse_consistent, not symmetric")
            DiscreteParams.from_dict(self.discrete, "stage discrete: discrete")
        elif self.discrete:
            raise InputError(f"stage {self.type}: 'discrete' settings apply to type: discrete only")
        if self.type == "greedy":
            if self.regularisation:
                raise InputError("stage greedy: regularises by smoothing only; set gradient_sigma "
                                 "(update) and field_smoothing (total field) instead of regularisation")
            if self.optimizer != "adam":
                raise InputError("stage greedy: takes normalised gradient steps; remove 'optimizer'")
        self._check_losses()
        if self.small_image:  # validated now: a bad key must not wait for the first small image
            self.for_small_image()

    def _check_types(self) -> None:
        """Every number a number in range and every switch a bool (a wrong sign or a quoted value
        would otherwise run, e.g. ``lr: -1`` climbs the loss and ``symmetric: "no"`` is true)."""
        where = f"stage {self.type}"
        if self.lr is not None:
            self.lr = _checked_number(self.lr, "lr", where, above=True)
        self.control_spacing = _checked_number(self.control_spacing, "control_spacing (mm)", where, above=True)
        self.steps = _checked_number(self.steps, "steps", where, whole=True)
        self.gradient_sigma = _checked_number(self.gradient_sigma, "gradient_sigma (voxels)", where)
        self.field_smoothing = _checked_number(self.field_smoothing, "field_smoothing (voxels)", where)
        self.tolerance = _checked_number(self.tolerance, "tolerance", where)
        self.patience = _checked_number(self.patience, "patience", where, minimum=1, whole=True)
        self.symmetric = _checked_bool(self.symmetric, "symmetric", where)
        if not isinstance(self.regularisation, Mapping):
            raise InputError(f"{where}: regularisation must be a mapping {{name: weight}}")
        for name, value in self.regularisation.items():
            weight = value.get("weight", 1.0) if isinstance(value, Mapping) else value
            _checked_number(weight, f"regularisation {name} weight", where)

    def _check_losses(self) -> None:
        where = f"stage {self.type}"
        try:  # unknown losses and their parameters are found now, not after the images load
            build_similarity(self.similarity)
            build_regularisers(self.regularisation)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: a similarity or regularisation parameter has the wrong "
                             f"type ({exc})") from None

    def for_small_image(self) -> "StageConfig":
        """This stage with its :attr:`small_image` settings applied (itself when there are none)."""
        if not self.small_image:
            return self
        where = f"stage {self.type}: small_image"
        if not isinstance(self.small_image, Mapping):
            raise InputError(f"{where}: expected a mapping of stage settings")
        bad = sorted(set(self.small_image) & {"type", "small_image"})
        if bad:
            raise InputError(f"{where}: cannot change {', '.join(bad)}")
        data = self.to_dict()  # one value per setting stays one value when only the levels change
        changes = dict(self.small_image)
        if isinstance(changes.get("discrete"), Mapping):  # key by key: the search settings are many
            changes["discrete"] = {**self.discrete, **changes["discrete"]}
        try:
            return _strict(StageConfig, {**data, **changes, "small_image": {}}, where)
        except InputError as e:
            msg = str(e).replace(f"{where} ({self.type}): ", f"{where}: ", 1)
            raise InputError(msg if msg.startswith(where) else f"{where}: {msg}") from None

    def to_dict(self) -> dict:
        """Plain types in the preset format. A per-level setting with one value on every level
        (``iterations``, ``log_jacobian``) is written as that value, so that the mapping still
        loads after its ``levels`` are edited (``medreg presets NAME``, ``stage1_levels=...``)."""
        data = dataclasses.asdict(self)
        for key in _REPEATABLE:
            if len(set(data[key])) == 1:
                data[key] = data[key][0]
        return data

    @property
    def is_linear(self) -> bool:
        return self.type in LINEAR_TYPES


@dataclass
class RegistrationConfig:
    """A whole registration: initialisation and stages.

    Attributes:
        stages: run in order; each starts from the result of the previous ones.
        initialisation: ``none``, ``geometry`` (image centres), ``com`` (centres of mass) or
            ``moments`` (centres of mass and principal axes).
        seed: random seed (runs are bit-identical on CPU for a given seed and thread count).
        small_image_size: a fixed image whose size, as the geometric mean of its voxel counts
            along the axes, is below this runs every stage with its ``small_image`` settings
            (0: never). The default 64 makes the hippocampus crops of Learn2Reg (~40 voxels)
            small and a 2 mm brain (~100) not.
        crop_to_foreground: greedy levels run on the box around the fixed image's foreground
            (its fixed mask, or with LNCC its voxels above the background) grown by a margin
            that covers the similarity window and the smoothing, when that box holds at most
            :data:`medreg.engine.driver.CROP_MAX_FRACTION` of the level; outside it the field
            stays as the coarser levels left it (the forces are zero there). Saves most of the
            time on images with wide empty borders (FreeSurfer's conformed 256³ volumes); False:
            never crop.
        description: free text shown by ``medreg presets``.
    """

    stages: list[StageConfig]
    initialisation: str = "com"
    seed: int = 0
    small_image_size: float = 64.0
    crop_to_foreground: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        if self.initialisation not in INITIALISATIONS:
            raise InputError(f"unknown initialisation {self.initialisation!r}; choose one of: "
                             f"{', '.join(INITIALISATIONS)}")
        if not self.stages:
            raise InputError("a registration config needs at least one stage")
        self.small_image_size = _checked_number(self.small_image_size, "small_image_size (voxels)", "config")
        self.seed = _checked_number(self.seed, "seed", "config", minimum=-(2 ** 63), whole=True)
        if self.seed >= 2 ** 64:  # torch.manual_seed's range
            raise InputError(f"config: seed must be below 2**64, got {self.seed}")
        self.crop_to_foreground = _checked_bool(self.crop_to_foreground, "crop_to_foreground", "config")

    def is_small(self, size: Sequence[int]) -> bool:
        """Whether an image of ``size`` voxels per axis runs the ``small_image`` settings."""
        return math.prod(size) < self.small_image_size ** len(size)

    def stages_for(self, size: Sequence[int]) -> list[StageConfig]:
        """The stages to run on a fixed image of ``size`` voxels per axis."""
        if not self.is_small(size):
            return list(self.stages)
        return [s.for_small_image() for s in self.stages]

    def to_dict(self) -> dict:
        """Plain types in the preset format (each stage as :meth:`StageConfig.to_dict`)."""
        data = dataclasses.asdict(self)
        data["stages"] = [s.to_dict() for s in self.stages]
        return data


def _strict(cls, data: Mapping[str, Any], where: str):
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    if cls is StageConfig and "type" not in data:
        raise InputError(f"{where}: a stage needs a type ({', '.join(STAGE_TYPES)})")
    try:
        return cls(**data)
    except InputError as exc:  # say which file and stage: "FILE: stage 2 (greedy): lr must be ..."
        msg = str(exc)
        kind = data.get("type")
        own = f"stage {kind}: "
        if msg.startswith(where):
            raise
        if cls is StageConfig and isinstance(kind, str) and msg.startswith(own):
            raise InputError(f"{where} ({kind}): {msg[len(own):]}") from None
        raise InputError(f"{where}: {msg}") from None
    except (TypeError, ValueError) as exc:  # a value of a type no check above foresaw
        raise InputError(f"{where}: a value has the wrong type ({exc})") from None


def config_from_dict(data: Mapping[str, Any], where: str = "config") -> RegistrationConfig:
    """Build a :class:`RegistrationConfig` from a plain mapping (strict about keys)."""
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a mapping at the top level")
    data = dict(data)
    stages = data.pop("stages", None)
    if not isinstance(stages, list):
        raise InputError(f"{where}: 'stages' must be a list of stage mappings")
    built = [_strict(StageConfig, s, f"{where}: stage {i + 1}") for i, s in enumerate(stages)]
    return _strict(RegistrationConfig, {**data, "stages": built}, where)


def load_config(path: str | Path) -> RegistrationConfig:
    """Read a YAML config file (same format as the presets)."""
    from medreg.io.paths import read_yaml

    return config_from_dict(read_yaml(path), str(path))


#: Stage settings given per pyramid level (a list of one value per level).
_PER_LEVEL = ("levels", "iterations", "log_jacobian", "smoothing")


def _follow_in_small_image(stage: dict, key: str, value: Any, name: str) -> None:
    """An override of a stage setting that the stage's ``small_image`` also sets applies to small
    images too (else it would be silently replaced there). A per-level list for another number
    of levels than the small-image pyramid's cannot: that one keeps its setting, with a warning."""
    small = stage.get("small_image")
    if not isinstance(small, Mapping) or key not in small:
        return
    levels = small.get("levels", stage.get("levels"))
    count = len(levels) if isinstance(levels, (list, tuple)) else 1
    if key in _PER_LEVEL and isinstance(value, (list, tuple)) and len(value) != count:
        warnings.warn(f"{name}: images under small_image_size keep the stage's small_image {key} "
                      f"{small[key]!r} ({count} levels); set the stage's small_image to change "
                      "it there", stacklevel=3)
        return
    stage["small_image"] = {**small, key: value}


def merge_overrides(cfg: RegistrationConfig, **overrides: Any) -> RegistrationConfig:
    """Copy of ``cfg`` with global keys replaced, or stage keys as ``stage<i>_<key>`` /
    ``<key>`` applied to every stage that has it (e.g. ``iterations=10``). A stage key that the
    stage's ``small_image`` settings also set is changed there too (:func:`_follow_in_small_image`)."""
    data = cfg.to_dict()
    stage_keys = {f.name for f in dataclasses.fields(StageConfig)}
    for key, value in overrides.items():
        if key in data and key != "stages":
            data[key] = value
        elif key == "stages":
            data["stages"] = value
        elif key.startswith("stage") and "_" in key and key[5:key.index("_")].isdigit():
            i = int(key[5:key.index("_")]) - 1
            sub = key[key.index("_") + 1:]
            if not 0 <= i < len(data["stages"]) or sub not in stage_keys:
                raise InputError(f"override {key!r}: no stage {i + 1} or key {sub!r}")
            data["stages"][i][sub] = value
            _follow_in_small_image(data["stages"][i], sub, value, key)
        elif key in stage_keys:
            for s in data["stages"]:
                s[key] = value
                _follow_in_small_image(s, key, value, key)
        else:
            raise InputError(f"unknown override {key!r}; valid: {', '.join(sorted(set(data) | stage_keys))}")
    try:
        return config_from_dict(data, "overrides")
    except InputError as exc:
        if "one per level" in str(exc) and any(k.endswith("levels") for k in overrides):
            raise InputError(f"{exc}; a levels override keeps the stage's other per-level "
                             "settings: give the one named (e.g. stage<i>_iterations=[...]) with "
                             "one value per level too") from None
        raise
