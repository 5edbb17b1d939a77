r"""Deformable registration by discrete displacement search, convex smoothing and instance
optimisation (the "search first, then refine" scheme of deeds, PDD-Net and ConvexAdam).

Pipeline (:func:`run_discrete`), for ``T = prefix ∘ (id + u)`` with ``u`` a world-mm displacement
in fixed space:

1. **Features** (:func:`feature_maps`). Both images are smoothed, resampled *in fixed space* on
   a padded copy of the coarse fixed grid (the moving one through ``prefix``), and described
   there (MIND-SSC by default; raw intensities, or any callable, e.g. a network). Describing the
   moving image after resampling, rather than resampling its descriptors, keeps the features of
   both images in the same frame even when their orientations differ or the prefix rotates.
2. **Cost volume** (:func:`cost_volume`). For every voxel ``x`` of the coarse grid
   (``fixed.grid.downsample(feature_factor)``) and every candidate ``u_l`` of a box of
   displacements (``radius_mm``, quantised in ``step_mm``), the mean squared feature difference
   ``C_l(x) = |F(x) − M(x + u_l)|²``. The candidates are world vectors along the fixed grid's
   axes: the moving features live on a grid whose spacing divides the step, so every candidate
   is an *exact integer shift* of that grid — no interpolation, and chunks of candidates are
   computed with elementwise-identical arithmetic (chunked = unchunked, bit for bit). The chunk
   size follows a memory budget (``memory_mb``) that covers the volume and its temporaries;
   the peak is reported (:class:`CostVolume`).
3. **Regularised discrete optimum** (:func:`convex_optimise`). Optionally ``mean_field``
   iterations of mean-field smoothing of the label probabilities; then a softargmin of the cost
   (sub-step initialisation), followed by coupled convex optimisation: alternately smooth the
   field spatially (``ū = G_σ * u``) and solve, voxel by voxel, ``min_l C_l + λ |u_l − ū|²``
   with ``λ`` increasing along ``coupling``. Each solve is a softargmin restricted to the
   candidates next to the arg-min (``softmin_radius``): sub-step precision without the pull of a
   global expectation towards the centre of the search box. With
   ``inverse_consistent`` the moving→fixed problem is solved too (same features, roles
   swapped) and both fields are symmetrised (:func:`symmetrise`).
4. **Instance optimisation** (:func:`instance_optimise`). A dense field on
   ``fixed.grid.downsample(io_factor)`` initialised from the discrete result, refined with Adam
   on feature SSD + ``io_diffusion`` × diffusion energy, then linearly upsampled to
   ``fixed.grid``.

Units: candidate offsets are integers on the search grid (``(x, y, z)`` order) and world mm
vectors; fields are ``(N, D, *shape)`` world mm, components ``x, y, z``; smoothing widths
(``smooth_sigma``, ``cost_radius``, ``io_smooth``) are in voxels of the grid they act on.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.functional import gaussian_smooth, smooth_voxels
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.engine.adam import Adam
from medreg.transforms import DisplacementField, Identity, SpatialTransform, warp_image
from medreg.transforms import functional as TF

__all__ = [
    "CostVolume", "DiscreteParams", "DiscreteResult", "SearchPlan", "convex_optimise",
    "cost_volume", "discrete_registration", "feature_maps", "instance_optimise", "run_discrete",
    "search_plan", "symmetrise", "FEATURES",
]

log = logging.getLogger("medreg.engine.discrete")

FeatureFn = Callable[[Tensor, Grid], Tensor]


def _mind(image: Tensor, grid: Grid, params: "DiscreteParams") -> Tensor:
    from medreg.losses.functional import mind_ssc

    return mind_ssc(image, params.mind_radius, params.mind_dilation)


def _intensity(image: Tensor, grid: Grid, params: "DiscreteParams") -> Tensor:
    return image  # already standardised by feature_maps


#: Built-in feature extractors: ``name -> fn(image (N, 1, *shape) on grid, grid, params)``.
FEATURES: dict[str, Callable[[Tensor, Grid, "DiscreteParams"], Tensor]] = {
    "mind": _mind,
    "intensity": _intensity,
}


# =========================================================================== parameters
def _number(value: Any, name: str, *, low: float | None = None, strict: bool = False,
            integer: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"discrete: {name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise InputError(f"discrete: {name} must be finite, got {value!r}")
    if integer and v != int(v):
        raise InputError(f"discrete: {name} must be a whole number, got {value!r}")
    if low is not None and (v <= low if strict else v < low):
        raise InputError(f"discrete: {name} must be {'>' if strict else '>='} {low:g}, got {value!r}")
    return int(v) if integer else v


@dataclass
class DiscreteParams:
    """Settings of the discrete deformable stage (the ``discrete:`` mapping of a stage).

    Attributes:
        features: ``"mind"`` (MIND-SSC, default), ``"intensity"`` (standardised intensities) or
            a callable ``fn(image, grid) -> (N, C, *grid.shape)`` given each image resampled
            on a grid in fixed space, ``(N, 1, *grid.shape)`` (e.g. a network's features).
        mind_radius: MIND patch half-width, voxels of the feature grid.
        mind_dilation: MIND neighbour distance, voxels of the feature grid (>= 1).
        feature_factor: shrink factor of the coarse grid of the cost volume relative to the
            fixed grid (``fixed.grid.downsample(feature_factor)``): 4 for ~1 mm images, 2 for
            ~2 mm ones.
        feature_pool: compute the features on a grid ``feature_pool`` times finer than the one
            they are needed on and average them over blocks (1: compute them there).
        radius_mm: search radius in mm: candidates ``|u_a| <= radius_mm`` along each axis of
            the fixed grid (a box; a whole number of steps, see :func:`search_plan`).
        step_mm: candidate spacing in mm; default (None) the coarse grid's spacing. It is
            rounded per axis to the coarse spacing divided or multiplied by a whole number.
        cost_radius: half-width (coarse voxels) of a box filter smoothing each candidate's cost
            spatially before the optimisation (0: none): patch-based, more robust costs.
        mean_field: iterations of mean-field smoothing of the candidate probabilities before the
            convex optimisation (0: none); its pairwise weight is ``mean_field_weight`` and its
            neighbourhood a box of half-width ``mean_field_radius`` (coarse voxels).
        mean_field_weight: exponent of the neighbours' message in the mean-field update.
        mean_field_radius: half-width (coarse voxels) of the mean-field neighbourhood.
        coupling: increasing coupling weights ``λ`` of the convex optimisation (in units of the
            mean cost per squared step); empty: the softargmin only (not smoothed).
        smooth_sigma: Gaussian σ (coarse voxels) of the spatial smoothing between couplings.
        temperature: softmin temperature (in units of the mean cost): smaller is closer to a
            hard arg-min; the expectation gives sub-step displacements.
        softmin_radius: the softmin expectation is taken over the candidates within this many
            steps (per axis) of each voxel's arg-min: sub-step precision without the pull of a
            global expectation towards the centre of the search box; -1: all candidates.
        inverse_consistent: also solve moving → fixed and symmetrise both fields (at the
            discrete and instance-optimisation levels); about twice the time.
        symmetrise_iterations: fixed-point iterations of :func:`symmetrise`.
        io_iterations: Adam steps of the instance optimisation (0 skips it).
        io_lr: Adam learning rate, mm of displacement per step.
        io_factor: shrink factor of the instance-optimisation grid relative to the fixed grid.
        io_diffusion: weight of the diffusion energy (mean ``|∇u|²``) against the feature SSD.
        io_smooth: Gaussian σ (voxels of the io grid) applied to the optimised field before each
            evaluation (a smooth parameterisation; 0: none).
        memory_mb: budget (MiB) for the cost volume and its temporaries (also bounds the voxel
            chunks of the convex optimisation; mean-field smoothing needs two more volumes);
            an error says how to fit when the volume alone exceeds it.
    """

    features: str | FeatureFn = "mind"
    mind_radius: float = 1.0
    mind_dilation: float = 2.0
    feature_factor: float = 4
    feature_pool: int = 2
    radius_mm: float = 16.0
    step_mm: float | None = None
    cost_radius: int = 2
    mean_field: int = 0
    mean_field_weight: float = 1.0
    mean_field_radius: int = 1
    coupling: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3])
    smooth_sigma: float = 1.0
    temperature: float = 0.1
    softmin_radius: int = 1
    inverse_consistent: bool = False
    symmetrise_iterations: int = 10
    io_iterations: int = 50
    io_lr: float = 0.5
    io_factor: float = 2
    io_diffusion: float = 0.05
    io_smooth: float = 1.0
    memory_mb: float = 1024.0

    def __post_init__(self) -> None:
        if isinstance(self.features, str):
            key = self.features.strip().lower()
            if key not in FEATURES:
                raise InputError(f"discrete: unknown features {self.features!r}; choose one of: "
                                 f"{', '.join(FEATURES)} (or pass a callable)")
            self.features = key
        elif not callable(self.features):
            raise InputError(f"discrete: features must be a name or a callable, got "
                             f"{type(self.features).__name__}")
        self.mind_radius = _number(self.mind_radius, "mind_radius", low=0)
        self.mind_dilation = _number(self.mind_dilation, "mind_dilation", low=1)
        self.feature_factor = _number(self.feature_factor, "feature_factor", low=1)
        self.feature_pool = _number(self.feature_pool, "feature_pool", low=1, integer=True)
        self.radius_mm = _number(self.radius_mm, "radius_mm", low=0, strict=True)
        if self.step_mm is not None:
            self.step_mm = _number(self.step_mm, "step_mm", low=0, strict=True)
            if self.step_mm > self.radius_mm:
                raise InputError(f"discrete: step_mm ({self.step_mm:g}) is larger than radius_mm "
                                 f"({self.radius_mm:g}): the zero shift would be the only candidate")
        self.cost_radius = _number(self.cost_radius, "cost_radius", low=0, integer=True)
        self.mean_field = _number(self.mean_field, "mean_field", low=0, integer=True)
        self.mean_field_weight = _number(self.mean_field_weight, "mean_field_weight", low=0)
        self.mean_field_radius = _number(self.mean_field_radius, "mean_field_radius", low=1,
                                         integer=True)
        cp = self.coupling
        if isinstance(cp, (int, float)):
            cp = [cp]
        if not isinstance(cp, (list, tuple)):
            raise InputError(f"discrete: coupling must be a list of weights, got {cp!r}")
        cp = [_number(c, "coupling weight", low=0) for c in cp]
        if any(b < a for a, b in zip(cp, cp[1:])):
            raise InputError(f"discrete: coupling weights must not decrease, got {cp}")
        self.coupling = cp
        self.smooth_sigma = _number(self.smooth_sigma, "smooth_sigma", low=0)
        self.temperature = _number(self.temperature, "temperature", low=0, strict=True)
        self.softmin_radius = _number(self.softmin_radius, "softmin_radius", low=-1, integer=True)
        if not isinstance(self.inverse_consistent, bool):
            raise InputError(f"discrete: inverse_consistent must be true or false, got "
                             f"{self.inverse_consistent!r}")
        self.symmetrise_iterations = _number(self.symmetrise_iterations, "symmetrise_iterations",
                                             low=1, integer=True)
        self.io_iterations = _number(self.io_iterations, "io_iterations", low=0, integer=True)
        self.io_lr = _number(self.io_lr, "io_lr", low=0, strict=True)
        self.io_factor = _number(self.io_factor, "io_factor", low=1)
        self.io_diffusion = _number(self.io_diffusion, "io_diffusion", low=0)
        self.io_smooth = _number(self.io_smooth, "io_smooth", low=0)
        self.memory_mb = _number(self.memory_mb, "memory_mb", low=0, strict=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "discrete") -> "DiscreteParams":
        """Build from a mapping (a config's ``discrete:`` entry), strict about unknown keys."""
        if data is None:
            return cls()
        if isinstance(data, DiscreteParams):
            return data
        if not isinstance(data, Mapping):
            raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: "
                             f"{', '.join(sorted(names))}")
        return cls(**dict(data))

    def to_dict(self) -> dict:
        """Plain values (a callable ``features`` is given by its name)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["coupling"] = list(self.coupling)
        if callable(d["features"]):
            d["features"] = getattr(self.features, "__name__", type(self.features).__name__)
        return d


# =========================================================================== search space
@dataclass(frozen=True)
class SearchPlan:
    """Where the cost volume lives and which candidates it holds.

    Attributes:
        coarse: the grid of the cost volume and of the discrete field.
        search: grid of the features: the coarse grid's spacing divided by ``stride``, padded by
            the largest candidate on each side (same direction); coarse voxel ``i`` is search
            voxel ``pad + stride · i``.
        stride: search voxels between coarse voxels, ``(x, y, z)``.
        multiple: search voxels per candidate step, ``(x, y, z)``.
        radius: candidate steps on each side, ``(x, y, z)``.
        offsets: ``(L, D)`` int64 candidate offsets in search voxels, ``(x, y, z)``.
        offsets_mm: ``(L, D)`` float64 candidates as world vectors (mm).
    """

    coarse: Grid
    search: Grid
    stride: tuple[int, ...]
    multiple: tuple[int, ...]
    radius: tuple[int, ...]
    offsets: Tensor
    offsets_mm: Tensor

    @property
    def num_labels(self) -> int:
        return int(self.offsets.shape[0])

    @property
    def pad(self) -> tuple[int, ...]:
        return tuple(r * m for r, m in zip(self.radius, self.multiple))

    @property
    def step_mm(self) -> tuple[float, ...]:
        """The quantised candidate step per axis (mm)."""
        return tuple(s * m for s, m in zip(self.search.spacing, self.multiple))

    def centre(self, x: Tensor) -> Tensor:
        """The coarse-grid samples ``(N, C, *coarse.shape)`` of a search-grid tensor."""
        return _shifted(x, (0,) * self.coarse.ndim, self.pad, self.stride, self.coarse.shape)


#: a candidate step may be this much longer than ``radius_mm`` / k and still give k steps
RADIUS_SLACK = 0.1


def search_plan(coarse: Grid, radius_mm: float, step_mm: float | None = None) -> SearchPlan:
    """Candidates within ``radius_mm`` (per axis) quantised in ``step_mm`` on ``coarse``.

    Per axis, the step is the coarse spacing divided (``stride``) or multiplied (``multiple``)
    by the nearest whole number, so every candidate is a whole shift on the search grid. The
    radius is a whole number of those steps, allowing a step up to :data:`RADIUS_SLACK` longer
    than ``radius_mm`` divides into (a downsampled grid's spacing is rarely its nominal one:
    Colin27's 109 voxels at 2 mm shrunk 4× give 8.07 mm, and ±16 mm still means ±2 steps). An
    axis whose one step is longer than that is not searched (a warning says so); an error when
    no axis is left.
    """
    stride, multiple, radius, skipped = [], [], [], []
    for ax, sp in enumerate(coarse.spacing):
        step = sp if step_mm is None else float(step_mm)
        if step <= sp:
            r, m = max(1, int(round(sp / step))), 1
        else:
            r, m = 1, max(1, int(round(step / sp)))
        stride.append(r)
        multiple.append(m)
        radius.append(int(math.floor(radius_mm / (sp / r * m) * (1 + RADIUS_SLACK))))
        if radius[-1] == 0:
            skipped.append(f"{'xyz'[ax]} ({sp / r * m:.3g} mm)")
    if len(skipped) == len(radius):
        raise InputError(f"discrete: one candidate step ({', '.join(skipped)}) is longer than the "
                         f"search radius ({radius_mm:g} mm): raise radius_mm, or lower step_mm or "
                         f"feature_factor")
    if skipped:
        warnings.warn(f"discrete: no search along {', '.join(skipped)}: one candidate step there is "
                      f"longer than the search radius ({radius_mm:g} mm); set step_mm to at most "
                      f"{radius_mm:g} to search it (the stages after it still refine that axis)",
                      stacklevel=2)
    fine = [sp / r for sp, r in zip(coarse.spacing, stride)]
    pad = [k * m for k, m in zip(radius, multiple)]
    size = [(n - 1) * r + 1 + 2 * p for n, r, p in zip(coarse.size, stride, pad)]
    origin = np.asarray(coarse.origin) - coarse.direction @ (np.asarray(pad) * np.asarray(fine))
    search = Grid(size, fine, origin.tolist(), coarse.direction)
    axes = [torch.arange(-k, k + 1, dtype=torch.int64) * m for k, m in zip(radius, multiple)]
    mesh = torch.meshgrid(*reversed(axes), indexing="ij")  # z slowest, x fastest
    offsets = torch.stack([m.reshape(-1) for m in reversed(mesh)], dim=1)  # (L, D) x, y, z
    ds = torch.as_tensor(coarse.direction * np.asarray(fine)[None, :], dtype=torch.float64)
    offsets_mm = offsets.double() @ ds.T
    return SearchPlan(coarse, search, tuple(stride), tuple(multiple), tuple(radius), offsets,
                      offsets_mm)


def _shifted(x: Tensor, offset: Sequence[int], pad: Sequence[int], stride: Sequence[int],
             shape: Sequence[int]) -> Tensor:
    """View of search-grid ``x`` at coarse voxels shifted by ``offset`` search voxels (x, y, z)."""
    d = len(shape)
    idx: list[slice] = [slice(None), slice(None)]
    for ax in range(d):  # tensor axis ax (z, y, x) <-> component d-1-ax
        comp = d - 1 - ax
        start = pad[comp] + int(offset[comp])
        idx.append(slice(start, start + (shape[ax] - 1) * stride[comp] + 1, stride[comp]))
    return x[tuple(idx)]


# =========================================================================== features
def _standardise(x: Tensor) -> Tensor:
    flat = x.reshape(x.shape[0], -1)
    mu = flat.mean(1).view(-1, *([1] * (x.dim() - 1)))
    sd = flat.std(1).clamp_min(1e-8).view(-1, *([1] * (x.dim() - 1)))
    return (x - mu) / sd


def feature_maps(image: Tensor, grid: Grid, params: DiscreteParams, target: Grid | None = None,
                 transform: SpatialTransform | None = None, pool: int | None = None) -> Tensor:
    """Features of ``image`` resampled on ``target`` (default: ``grid``) through ``transform``.

    The image is smoothed against aliasing (Gaussian σ = half the target's mean spacing, where
    that is coarser than the image), resampled linearly through ``transform`` (target points →
    image points; default identity) with border extension, then described
    (``params.features``). With ``pool > 1`` (default ``params.feature_pool``) the features are
    computed on a ``pool`` times finer grid over the same box and averaged over ``pool``-wide
    blocks: finer structures contribute to the descriptors (even above the image's own
    resolution, where the supersampled descriptors are smoother and more accurate to match).

    Args:
        image: ``(N, 1, *grid.shape)`` (or more channels for a callable).
        grid: the image's grid.
        target: where the features are wanted (a grid in fixed space).
        transform: target (fixed) → image world map, e.g. the affine prefix for the moving image.
        pool: block size of the feature averaging (see above).

    Returns:
        ``(N, C, *target.shape)`` float32 features.
    """
    target = grid if target is None else target
    out_grid = target
    pool = int(params.feature_pool if pool is None else pool)
    if pool > 1:
        target = target.resize([n * pool for n in target.size])
    transform = Identity(grid.ndim) if transform is None else transform
    x = image.to(torch.float32)
    if params.features == "intensity":
        x = _standardise(x)
    ts = float(np.mean(target.spacing))
    sigma = [0.5 * ts if ts > 1.01 * s else 0.0 for s in grid.spacing]
    with torch.no_grad():
        if any(s > 0 for s in sigma):
            x = gaussian_smooth(x, sigma, grid.spacing)
        if not (target == grid and isinstance(transform, Identity)):
            x = warp_image(x, transform, target, grid, padding="border", precise=False)
        if callable(params.features):
            out = params.features(x, target)
        else:
            out = FEATURES[params.features](x, target, params)
    if not isinstance(out, Tensor) or out.dim() != x.dim() or tuple(out.shape[2:]) != target.shape:
        raise InputError(f"discrete: the feature extractor returned shape "
                         f"{tuple(getattr(out, 'shape', ()))}; expected (N, C, "
                         f"{', '.join(map(str, target.shape))})")
    out = out.to(torch.float32).detach()
    if pool > 1:
        avg = F.avg_pool3d if out.dim() == 5 else F.avg_pool2d
        out = avg(out, pool, stride=pool)
    assert tuple(out.shape[2:]) == out_grid.shape
    return out


#: Bytes of a working chunk of candidates (cost volume, its box filter) or of ``candidates ×
#: voxels`` (the per-voxel softmin): small enough for the last-level cache, large enough to
#: amortise the per-operation overhead.
CACHE_BYTES = 4 * 2 ** 20


# =========================================================================== cost volume
@dataclass
class CostVolume:
    """A cost volume and what it took.

    Attributes:
        cost: ``(N, L, *shape)`` mean squared feature differences (lower is better).
        offsets: ``(L, D)`` candidates in search voxels, ``(x, y, z)``.
        chunk: candidates computed together.
        peak_bytes: bytes of the volume plus the largest temporary (the accounted peak).
        volume_bytes: bytes of the volume alone.
        seconds: wall time.
    """

    cost: Tensor
    offsets: Tensor
    chunk: int
    peak_bytes: int
    volume_bytes: int
    seconds: float


def cost_chunk(num_labels: int, voxels: int, batch: int = 1, *, memory_mb: float,
               element_size: int = 4, weighted: bool = False) -> tuple[int, int]:
    """Largest candidate chunk for :func:`cost_volume` under ``memory_mb``.

    The accounted memory is the volume ``N·L·V`` plus, per candidate of a chunk, one ``N·V``
    buffer (two with a moving mask). Returns ``(chunk, peak_bytes)``.

    Raises:
        InputError: when the volume and a one-candidate chunk do not fit.
    """
    volume = batch * num_labels * voxels * element_size
    per = batch * voxels * element_size * (2 if weighted else 1)
    budget = int(memory_mb * 2 ** 20)
    chunk = min(num_labels, (budget - volume) // per) if budget > volume else 0
    if chunk < 1:
        raise InputError(
            f"discrete: the cost volume ({num_labels} candidates × {voxels} voxels) needs "
            f"{(volume + per) / 2 ** 20:.1f} MB but memory_mb is {memory_mb:g}; raise memory_mb, "
            "feature_factor or step_mm, or lower radius_mm")
    return int(chunk), int(volume + chunk * per)


def cost_volume(feat_fixed: Tensor, feat_moving: Tensor, offsets: Tensor,
                stride: Sequence[int] | int = 1, *, chunk: int | None = None,
                memory_mb: float | None = None, fixed_weight: Tensor | None = None,
                moving_weight: Tensor | None = None) -> CostVolume:
    """Feature SSD for every coarse voxel and candidate shift.

    ``cost[n, l, x] = mean_c (feat_fixed[n, c, x] − feat_moving[n, c, pad + stride·x + o_l])²``
    with ``pad`` the (symmetric) margin of ``feat_moving`` around the coarse voxels. Candidates
    are exact integer shifts of the search grid: no interpolation, and the arithmetic of each
    entry does not depend on the chunking.

    Args:
        feat_fixed: ``(N, C, *shape)`` on the coarse grid.
        feat_moving: ``(N, C, *search)`` with ``search = (shape − 1)·stride + 1 + 2·pad``.
        offsets: ``(L, D)`` integer shifts in search voxels, ``(x, y, z)``; ``|o| <= pad``.
        stride: search voxels between coarse voxels (per axis ``x, y, z`` or one value).
        chunk: candidates computed together (default: as many as fit :data:`CACHE_BYTES`,
            fewer if ``memory_mb`` demands).
        memory_mb: budget for the volume plus temporaries (see :func:`cost_chunk`).
        fixed_weight: ``(N or 1, 1, *shape)`` in [0, 1]; where 0 the cost is ``neutral``.
        moving_weight: ``(N or 1, 1, *search)`` in [0, 1], shifted with the features.
            The neutral cost is the mean cost of the zero shift (over the fixed weight).

    Returns:
        :class:`CostVolume`; its ``peak_bytes`` is also logged.
    """
    t0 = time.perf_counter()
    if feat_fixed.dim() not in (4, 5) or feat_moving.dim() != feat_fixed.dim():
        raise InputError("discrete: features must be (N, C, *spatial) tensors of equal rank")
    n, c = feat_fixed.shape[:2]
    shape = tuple(feat_fixed.shape[2:])
    d = len(shape)
    if feat_moving.shape[:2] != feat_fixed.shape[:2]:
        raise InputError(f"discrete: fixed and moving features differ in batch/channels: "
                         f"{tuple(feat_fixed.shape[:2])} vs {tuple(feat_moving.shape[:2])}")
    st = (int(stride),) * d if isinstance(stride, int) else tuple(int(s) for s in stride)
    offsets = torch.as_tensor(offsets, dtype=torch.int64).reshape(-1, d)
    pad = []
    for comp in range(d):
        ax = d - 1 - comp
        extra = feat_moving.shape[2 + ax] - ((shape[ax] - 1) * st[comp] + 1)
        if extra < 0 or extra % 2:
            raise InputError(f"discrete: moving features of shape {tuple(feat_moving.shape[2:])} "
                             f"do not pad the coarse shape {shape} symmetrically (stride {st})")
        pad.append(extra // 2)
    if offsets.numel() and (offsets.abs() > torch.tensor(pad)).any():
        raise InputError(f"discrete: candidate shifts exceed the moving features' margin {pad}")
    nl = int(offsets.shape[0])
    vox = int(np.prod(shape))
    esize = feat_fixed.element_size()
    weighted = moving_weight is not None
    if chunk is None:
        # a chunk's buffers stay in the cache while the channels accumulate (2× faster on vxm's
        # 729 × 107 k volume than one chunk of all candidates), within the memory budget
        chunk = max(1, CACHE_BYTES // (n * vox * esize * (2 if weighted else 1)))
        if memory_mb is not None:
            chunk = min(chunk, cost_chunk(nl, vox, n, memory_mb=memory_mb, element_size=esize,
                                          weighted=weighted)[0])
    chunk = max(1, min(int(chunk), nl))
    volume_bytes = n * nl * vox * esize
    peak = volume_bytes + chunk * n * vox * esize * (2 if weighted else 1)
    ff = feat_fixed.detach().contiguous()  # (a strided view makes each chunk's subtraction slow)
    fm = feat_moving.detach().to(ff.dtype).contiguous()
    neutral = 0.0
    if weighted or fixed_weight is not None:  # (before the volume is allocated)
        z = (ff - _shifted(fm, (0,) * d, pad, st, shape)).square().mean(1, keepdim=True)
        neutral = float((z * fixed_weight).sum() / fixed_weight.sum().clamp_min(1e-12)) \
            if fixed_weight is not None else float(z.mean())
        del z
    out = torch.empty((n, nl, *shape), dtype=ff.dtype, device=ff.device)
    buf = torch.empty((chunk, n, *shape), dtype=ff.dtype, device=ff.device)
    wbuf = torch.empty_like(buf) if weighted else None
    offs = offsets.tolist()
    inv_c = 1.0 / c
    for l0 in range(0, nl, chunk):
        l1 = min(nl, l0 + chunk)
        o = out[:, l0:l1].transpose(0, 1)  # (l, N, *shape) view
        b = buf[: l1 - l0]
        for ch in range(c):
            torch.stack([_shifted(fm[:, ch:ch + 1], k, pad, st, shape)[:, 0] for k in offs[l0:l1]],
                        dim=0, out=b)
            b.sub_(ff[:, ch])
            if ch == 0:
                torch.mul(b, b, out=o)
            else:
                o.addcmul_(b, b)
        o.mul_(inv_c)
        if weighted:
            w = wbuf[: l1 - l0]
            torch.stack([_shifted(moving_weight, k, pad, st, shape)[:, 0].expand(n, *shape)
                         for k in offs[l0:l1]], dim=0, out=w)
            o.sub_(neutral).mul_(w).add_(neutral)
    if fixed_weight is not None:
        out.sub_(neutral).mul_(fixed_weight.to(out.dtype)).add_(neutral)
    secs = time.perf_counter() - t0
    log.info("cost volume: %d candidates × %s voxels in chunks of %d, peak %.1f MB, %.2f s",
             nl, shape, chunk, peak / 2 ** 20, secs)
    return CostVolume(out, offsets, chunk, int(peak), int(volume_bytes), secs)


# =========================================================================== regularised optimum
def box_filter(x: Tensor, radius: int) -> Tensor:
    """Mean of every channel of ``(N, K, *shape)`` over a ``(2r+1)``-wide box, truncated at
    the border (each mean over the voxels that exist)."""
    r = int(radius)
    if r <= 0:
        return x
    d = x.dim() - 2
    for ax in range(2, 2 + d):  # separable: one axis at a time, sums of shifted slices
        n = x.shape[ax]
        rr = min(r, n - 1)
        if rr == 0:
            continue
        y = x.clone()
        for j in range(1, rr + 1):
            y.narrow(ax, j, n - j).add_(x.narrow(ax, 0, n - j))
            y.narrow(ax, 0, n - j).add_(x.narrow(ax, j, n - j))
        i = torch.arange(n, device=x.device)
        count = (i.clamp(max=rr) + (n - 1 - i).clamp(max=rr) + 1).to(x.dtype)
        shape = [1] * x.dim()
        shape[ax] = n
        x = y.div_(count.view(shape))
    return x


def _voxel_chunk(nl: int, n: int, vox: int, memory_mb: float, cost_bytes: int, esize: int,
                 temporaries: int = 2) -> int:
    """Voxels per chunk for the per-voxel steps (``temporaries`` ``(N, L, chunk)`` buffers;
    at least 64 voxels)."""
    free = int(memory_mb * 2 ** 20) - cost_bytes
    return int(max(64, min(vox, free // max(1, temporaries * nl * n * esize))))


def _box_neighbours(lattice: Tensor, window: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """For candidates forming a full box lattice in ``(z, y, x)``-major order (as
    :func:`search_plan` makes them): the label-index offsets of the ``(2w+1)^D`` neighbours of a
    label, their lattice offsets, and the lattice's lower corner and extent. None otherwise."""
    nl, d = lattice.shape
    lo = lattice.min(0).values
    ext = lattice.max(0).values - lo + 1
    if int(ext.prod()) != nl:
        return None
    strides = torch.ones(d, dtype=torch.int64, device=lattice.device)
    for c in range(1, d):  # x fastest
        strides[c] = strides[c - 1] * ext[c - 1]
    if not torch.equal(((lattice - lo).long() * strides).sum(1),
                       torch.arange(nl, device=lattice.device)):
        return None
    rng = torch.arange(-window, window + 1, device=lattice.device)
    delta = torch.stack(torch.meshgrid(*([rng] * d), indexing="ij"), -1).reshape(-1, d)
    return (delta * strides).sum(1), delta.to(lattice.dtype), torch.stack([lo, ext])


def _max_first(e: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``e.max(1, keepdim=True)`` with the maximal index of lowest ``labels`` value, for
    ``(N, L, V)`` (``labels``: a rank per index as int32 ``(1, L, 1)``, ``arange(L)`` when not
    given; the rank is returned, not the index).

    On CPU ``max``/``argmax`` with indices over a non-innermost dimension run about 20× slower
    than ``amax`` (a per-voxel scalar loop instead of a vectorised sweep); an ``amax``, a compare
    and an ``amin`` of the matching label indices give the same result. Indices are clamped so
    that a NaN column (no match) still yields a valid label.
    """
    nl = e.shape[1]
    top = e.amax(1, keepdim=True)
    if labels is None:
        labels = torch.arange(nl, dtype=torch.int32, device=e.device).view(1, nl, 1)
    arg = torch.where(e == top, labels, nl).amin(1, keepdim=True).clamp_(max=nl - 1)
    return top, arg.long()


def _softmin_expectation(cost: Tensor, a: float, q: Tensor, ubar: Tensor | None, lam_t: float,
                         chunk: int, extra: Tensor | None = None, lattice: Tensor | None = None,
                         window: int = -1) -> Tensor:
    """``Σ_l softmax_l(−a·C_l − (λ/T)|q_l − ū|²) q_l`` per voxel.

    ``cost`` ``(N, L, V)``; ``q`` ``(L, D)``; ``ubar`` ``(N, D, V)`` or None; ``extra`` an
    optional ``(N, L, V)`` term added to ``−a·C``. With ``window >= 0`` only the candidates
    within ``window`` lattice steps (``lattice``: ``(L, D)`` integer coordinates) of each
    voxel's arg-min enter the softmax (gathered directly for a box lattice, masked otherwise).
    Runs over voxel chunks of ``chunk``, at most :data:`CACHE_BYTES` of candidates each (the
    half-dozen passes over a chunk then stay in the CPU cache: 2.2× faster than one chunk of all
    voxels on the vxm cost volume).
    """
    n, nl, vox = cost.shape
    chunk = max(64, min(int(chunk), CACHE_BYTES // max(1, n * nl * cost.element_size())))
    d = q.shape[1]
    # −a·C − (λ/T)|q − ū|² = −a·C + (2λ/T)(q·ū − |q|²/2) − (λ/T)|ū|² (the last term cancels in
    # the softmax): one batched multiply-add, [q, −|q|²/2] @ [ū; 1], on top of −a·C
    if ubar is not None:
        qb = torch.cat([q, -0.5 * q.square().sum(1, keepdim=True)], 1).unsqueeze(0).expand(n, nl, d + 1)
        ub1 = torch.cat([ubar, torch.ones_like(ubar[:, :1])], 1)
    qt1 = torch.cat([q.T, torch.ones(1, nl, dtype=q.dtype, device=q.device)], 0)
    qt1 = qt1.unsqueeze(0).expand(n, d + 1, nl)
    # exact ties (flat background, masked-out voxels, a one-slice axis) go to the shortest
    # candidate: ranks by |q|, so the arg-min is the zero shift there, not the search box's corner
    order = torch.sort(q.square().sum(1), stable=True).indices
    labels = torch.empty(nl, dtype=torch.int32, device=cost.device)
    labels[order] = torch.arange(nl, dtype=torch.int32, device=cost.device)
    labels = labels.view(1, nl, 1)
    local = window >= 0 and lattice is not None
    box = _box_neighbours(lattice, window) if local else None
    u = torch.empty((n, d, vox), dtype=cost.dtype, device=cost.device)
    buf = torch.empty((n, nl, min(chunk, vox)), dtype=cost.dtype, device=cost.device)
    for v0 in range(0, vox, chunk):
        v1 = min(vox, v0 + chunk)
        e = buf if v1 - v0 == buf.shape[2] else torch.empty((n, nl, v1 - v0), dtype=cost.dtype,
                                                               device=cost.device)
        if ubar is not None:
            e.copy_(cost[:, :, v0:v1]).baddbmm_(qb, ub1[:, :, v0:v1], beta=-a, alpha=2.0 * lam_t)
        else:
            torch.mul(cost[:, :, v0:v1], -a, out=e)
        if extra is not None:
            e.add_(extra[:, :, v0:v1])
        top, arg = _max_first(e, labels)
        arg = order[arg]
        if box is not None:
            # only the (2w+1)^D neighbours of the arg-min: gather them, no pass over all labels
            dl, dlat, (lo, ext) = box
            best = arg[:, 0]  # (N, chunk)
            coord = lattice[best] - lo  # (N, chunk, D)
            pos = coord.unsqueeze(1) + dlat.view(1, -1, 1, d)  # (N, M, chunk, D)
            valid = ((pos >= 0) & (pos < ext)).all(-1)  # (N, M, chunk)
            idx = (best.unsqueeze(1) + dl.view(1, -1, 1)).clamp_(0, nl - 1)
            # (exp of values below −80 would be denormal — very slow — and are negligible)
            w = torch.gather(e, 1, idx).sub_(top).clamp_(min=-80.0).exp_().mul_(valid)
            qs = q[idx]  # (N, M, chunk, D)
            u[:, :, v0:v1] = ((w.unsqueeze(-1) * qs).sum(1) / w.sum(1).unsqueeze(-1)).movedim(-1, 1)
            continue
        e.sub_(top).clamp_(min=-80.0).exp_()
        if local:
            best = lattice[arg[:, 0]]  # (N, chunk, D)
            keep = None
            for c in range(d):
                near = (lattice[:, c].view(1, nl, 1) - best[:, :, c].unsqueeze(1)).abs_() <= window
                keep = near if keep is None else keep.logical_and_(near)
            e.mul_(keep)
        r = torch.bmm(qt1, e)  # numerators (D) and the normaliser
        u[:, :, v0:v1] = r[:, :d] / r[:, d:]
    return u


def convex_optimise(cost: Tensor, offsets_mm: Tensor, grid: Grid, params: DiscreteParams,
                    step_mm: float | Sequence[float] | None = None) -> Tensor:
    """Regularised displacement from a cost volume: softargmin, then coupled convex steps.

    With ``C`` the cost divided by its mean and ``T`` the temperature:

    * optional mean-field smoothing (``params.mean_field`` iterations): the label
      probabilities ``q ∝ exp(−C/T)·m^w`` are recomputed with ``m`` the box-filtered (radius
      ``mean_field_radius``) probabilities of the previous iteration and ``w`` the
      ``mean_field_weight`` (a Potts-like mean-field message: neighbours that agree on a
      candidate make it likelier). Needs two more volumes of memory.
    * ``u₀ = Σ_l q_l u_l`` with ``q = softmax(−C/T)`` (softargmin: sub-step initialisation);
    * for each ``λ`` of ``params.coupling``: ``ū = G_σ * u`` (σ = ``smooth_sigma`` voxels)
      and ``u = Σ_l softmax_l(−(C_l + λ|u_l − ū|²/h²)/T) u_l`` with ``h`` the step, so ``λ`` is
      per squared step; finally ``u ← G_σ * u``.

    Each softargmin runs over the candidates within ``params.softmin_radius`` steps (per axis)
    of the voxel's arg-min: a global expectation would be pulled towards the centre of the
    search box wherever the cost is flat or has several minima.

    Per-voxel work runs in chunks bounded by ``params.memory_mb``.

    Args:
        cost: ``(N, L, *grid.shape)``.
        offsets_mm: ``(L, D)`` candidates as world vectors (mm, x, y, z).
        grid: the coarse grid (for the field's shape; smoothing is in its voxels).
        step_mm: candidate step (mm) normalising ``λ``; default: the smallest nonzero
            candidate length.

    Returns:
        ``(N, D, *grid.shape)`` world mm displacement.
    """
    n, nl = cost.shape[:2]
    shape = tuple(cost.shape[2:])
    d = len(shape)
    if tuple(shape) != grid.shape or tuple(offsets_mm.shape) != (nl, d):
        raise InputError(f"discrete: cost {tuple(cost.shape)} and offsets {tuple(offsets_mm.shape)} "
                         f"do not match the grid {grid.shape}")
    dtype, dev = cost.dtype, cost.device
    off = offsets_mm.to(dtype=torch.float64, device=dev)
    if step_mm is None:
        lens = off.norm(dim=1)
        h = float(lens[lens > 0].min()) if bool((lens > 0).any()) else 1.0
    else:
        h = float(np.mean(np.atleast_1d(step_mm)))
    q = (off / h).to(dtype)  # (L, D) in steps
    vox = int(np.prod(shape))
    esize = cost.element_size()
    cost_bytes = cost.numel() * esize
    vchunk = _voxel_chunk(nl, n, vox, params.memory_mb, cost_bytes, esize)
    scale = float(cost.mean())
    scale = scale if scale > 0 else 1.0
    t = params.temperature
    a = 1.0 / (scale * t)
    flat = cost.reshape(n, nl, vox)

    extra = None
    if params.mean_field > 0:
        for _ in range(params.mean_field):
            # probabilities with the current message, then the next message from them
            prob = torch.empty_like(flat)
            for v0 in range(0, vox, vchunk):
                v1 = min(vox, v0 + vchunk)
                e = flat[:, :, v0:v1] * -a
                if extra is not None:
                    e.add_(extra[:, :, v0:v1])
                e.sub_(e.amax(1, keepdim=True)).clamp_(min=-80.0).exp_()
                prob[:, :, v0:v1] = e.div_(e.sum(1, keepdim=True))
            del e
            extra = None  # spent: freed before the filter, so two volumes at most are alive
            # the next message: the probabilities box-filtered in place, a few labels at a time
            grid_view = prob.view(n, nl, *shape)
            lchunk = max(1, nl * vchunk // vox)
            for l0 in range(0, nl, lchunk):
                part = grid_view[:, l0:l0 + lchunk]
                part.copy_(box_filter(part, params.mean_field_radius))
            extra = prob.clamp_min_(1e-6).log_().mul_(params.mean_field_weight)
            del prob, grid_view, part

    # integer lattice coordinates of the candidates (steps along the grid's axes)
    along = off @ grid.matrix("world", "index", dtype=torch.float64, device=dev)[:d, :d].T
    steps = torch.stack([col[col.abs() > 1e-6].abs().min() if bool((col.abs() > 1e-6).any())
                         else torch.ones((), dtype=col.dtype, device=dev) for col in along.T])
    lattice = torch.round(along / steps).to(torch.int32)
    win = params.softmin_radius
    u = _softmin_expectation(flat, a, q, None, 0.0, vchunk, extra, lattice, win)
    for lam in params.coupling:
        ubar = smooth_voxels(u.reshape(n, d, *shape), params.smooth_sigma).reshape(n, d, vox)
        u = _softmin_expectation(flat, a, q, ubar, lam / t, vchunk, extra, lattice, win)
    if params.coupling:
        u = smooth_voxels(u.reshape(n, d, *shape), params.smooth_sigma).reshape(n, d, vox)
    return (u * h).reshape(n, d, *shape)


def _compose(outer: Tensor, inner: Tensor, grid: Grid) -> Tensor:
    """``u_B(x) + u_A(x + u_B(x))`` (border extension)."""
    return TF.compose_displacements(outer, inner, grid)


def symmetrise(forward: Tensor, backward: Tensor, grid: Grid, iterations: int = 10
               ) -> tuple[Tensor, Tensor]:
    """Make two displacement fields inverse of each other by averaging (both on ``grid``).

    Iterates ``u ← ½(u − v∘(id + u))`` and ``v ← ½(v − u∘(id + v))`` (simultaneously), whose
    fixed points satisfy ``(id + u)∘(id + v) = id`` approximately; an inverse-consistent pair is
    left unchanged and errors of either direction are shared.

    Returns:
        ``(forward, backward)`` world mm on ``grid``.
    """
    u, v = forward, backward
    for _ in range(int(iterations)):
        # v∘(id+u) as a displacement: v(x + u(x))
        vu = _compose(v, u, grid) - u
        uv = _compose(u, v, grid) - v
        u, v = 0.5 * (u - vu), 0.5 * (v - uv)
    return u, v


# =========================================================================== instance optimisation
def instance_optimise(fixed_feat: Tensor, moving_feat: Tensor, init_disp: Tensor, grid: Grid,
                      moving_grid: Grid, params: DiscreteParams, weight: Tensor | None = None,
                      moving_weight: Tensor | None = None) -> Tensor:
    """Refine a dense displacement by Adam on feature SSD + diffusion regularisation.

    Minimises ``mean_w |F(x) − M(x + u(x))|² + io_diffusion · mean |∇u|²`` over ``u`` on
    ``grid`` for ``params.io_iterations`` steps (``io_lr`` mm per step), with ``u`` smoothed by
    ``io_smooth`` (voxels) before each evaluation.

    Args:
        fixed_feat: ``(N, C, *grid.shape)`` fixed features.
        moving_feat: ``(N, C, *moving_grid.shape)`` moving features *in fixed space* (resampled
            through the prefix transform), on a grid that should cover ``x + u`` (border
            extension beyond it).
        init_disp: ``(N, D, *grid.shape)`` world mm.
        weight: ``(N or 1, 1, *grid.shape)`` fixed-side weights (mask), or None.
        moving_weight: ``(N or 1, 1, *moving_grid.shape)`` moving-side weights, warped along.

    Returns:
        ``(N, D, *grid.shape)`` world mm (detached; smoothed as evaluated).
    """
    from medreg.losses.functional import diffusion

    u = torch.nn.Parameter(init_disp.detach().clone().to(torch.float32))
    if params.io_iterations == 0:
        return u.detach()
    opt = Adam([u], lr=params.io_lr)
    ff = fixed_feat.detach()
    src = moving_feat.detach().to(ff.dtype)
    nc = src.shape[1]
    if moving_weight is not None:  # warped along with the features, as one more channel
        src = torch.cat([src, moving_weight.detach().to(ff.dtype).expand(src.shape[0], 1, *src.shape[2:])], 1)
    # channels-last: grid_sample gathers all channels of a corner at once (much faster on CPU)
    src = src.contiguous(memory_format=torch.channels_last_3d if src.dim() == 5 else torch.channels_last)
    w = None if weight is None else weight.detach().to(ff.dtype)

    # sampling positions in moving_grid's norm frame: ident + (norm_from_world) u
    d = grid.ndim
    ident = grid.points("world", dtype=ff.dtype, device=ff.device)
    ident = moving_grid.transform_points(ident, "world", "norm").unsqueeze(0)
    lin_t = moving_grid.matrix("world", "norm", dtype=ff.dtype, device=ff.device)[:d, :d].T

    def evaluate() -> tuple[Tensor, Tensor]:
        us = smooth_voxels(u, params.io_smooth)
        norm = ident + us.movedim(1, -1) @ lin_t
        warped = F.grid_sample(src, norm, mode="bilinear", padding_mode="border",
                               align_corners=True)
        if moving_weight is not None:
            warped, wm = warped[:, :nc], warped[:, nc:]
            ww = wm if w is None else w * wm
        else:
            ww = w
        err = (warped - ff).square().mean(1, keepdim=True)
        sim = err.mean() if ww is None else (err * ww).sum() / ww.sum().clamp_min(1e-12)
        loss = sim
        if params.io_diffusion > 0:
            loss = loss + params.io_diffusion * diffusion(us, grid)
        return loss, us

    with torch.enable_grad():
        for _ in range(params.io_iterations):
            opt.zero_grad(set_to_none=True)
            loss, _ = evaluate()
            if not torch.isfinite(loss):
                raise InputError("discrete: the instance optimisation diverged (NaN/inf loss); "
                                 "lower io_lr")
            loss.backward()
            opt.step()
    with torch.no_grad():
        return smooth_voxels(u, params.io_smooth).detach()


# =========================================================================== driver
@dataclass
class DiscreteResult:
    """What :func:`run_discrete` produced.

    Attributes:
        forward: ``u`` on ``fixed.grid`` (or the stage's own grid, ``full_grid=False``) with
            ``T = prefix ∘ (id + u)`` (world mm).
        backward: with ``inverse_consistent``, ``v`` on the same grid with ``(id + v)`` the
            inverse of ``(id + u)`` (so ``T⁻¹ = (id + v) ∘ prefix⁻¹``); else None.
        coarse: the discrete (convex) field on ``plan.coarse`` (after symmetrisation).
        plan: the search space.
        stats: timings (s), labels, chunk and peak bytes of the cost volume(s).
    """

    forward: DisplacementField
    backward: DisplacementField | None
    coarse: Tensor
    plan: SearchPlan
    stats: dict = field(default_factory=dict)


def _resample(field_: Tensor, source: Grid, target: Grid) -> Tensor:
    from medreg.engine.pyramid import resample_field

    return resample_field(field_, source, target)


def _mask_on(mask: Image | None, transform: SpatialTransform, target: Grid,
             device: torch.device) -> Tensor | None:
    """A mask's 0/1 weights resampled on ``target`` through ``transform``, on ``device``."""
    if mask is None:
        return None
    data = (mask.batch() != 0).to(device=device, dtype=torch.float32)
    with torch.no_grad():
        return warp_image(data, transform, target, mask.grid, padding="zeros", precise=False)


def _refine(fdata: Tensor, fgrid: Grid, mdata: Tensor, mgrid: Grid, prefix: SpatialTransform,
            u: Tensor, v: Tensor | None, src: Grid, p: DiscreteParams,
            fixed_mask: Image | None, moving_mask: Image | None, stats: dict[str, Any]
            ) -> tuple[Tensor, Tensor | None, Grid]:
    """Instance optimisation of ``u`` (and the backward ``v``), world mm on ``src``, on MIND
    features at ``fgrid.downsample(p.io_factor)``; returns the refined fields and their grid."""
    t0 = time.perf_counter()
    ident = Identity(fgrid.ndim)
    io = fgrid.downsample(p.io_factor)
    margin = [int(math.ceil(p.radius_mm / s)) + 2 for s in io.spacing]
    io_pad = io.pad(margin)  # the moving side: where x + u may land
    crop_t = tuple([slice(None), slice(None)] + [slice(mg, mg + n) for mg, n in
                                                 zip(reversed(margin), io.shape)])
    # the fixed side is needed on the padded grid only to be the target of the backward
    f_io = feature_maps(fdata, fgrid, p, io_pad if v is not None else io, ident)
    f_io_c = f_io[crop_t] if v is not None else f_io
    m_io = feature_maps(mdata, mgrid, p, io_pad, prefix)
    fw_io = _mask_on(fixed_mask, ident, io_pad, fdata.device)
    mw_io = _mask_on(moving_mask, prefix, io_pad, fdata.device)
    stats["io_features_s"] = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    u = instance_optimise(f_io_c, m_io, _resample(u, src, io), io, io_pad, p,
                          None if fw_io is None else fw_io[crop_t], mw_io)
    if v is not None:
        v = instance_optimise(m_io[crop_t], f_io, _resample(v, src, io), io, io_pad, p,
                              None if mw_io is None else mw_io[crop_t], fw_io)
        u, v = symmetrise(u, v, io, p.symmetrise_iterations)
    stats["io_s"] = round(time.perf_counter() - t0, 3)
    return u, v, io


def run_discrete(fixed: Image, moving: Image, prefix: SpatialTransform | None = None,
                 params: DiscreteParams | Mapping | None = None, *,
                 fixed_mask: Image | None = None, moving_mask: Image | None = None,
                 full_grid: bool = True) -> DiscreteResult:
    """Discrete search + convex smoothing + instance optimisation; see the module docstring.

    Args:
        fixed, moving: single-channel images (any grids, same dimension).
        prefix: fixed → moving map applied after the deformation (the affine stage), default
            identity: the result is ``T = prefix ∘ (id + u)``.
        params: :class:`DiscreteParams` (or a mapping of its fields).
        fixed_mask, moving_mask: restrict the data term to non-zero voxels (on their images'
            grids); elsewhere the field follows the regularisation.
        full_grid: resample the fields onto ``fixed.grid`` (default); False keeps them on the
            grid they were computed on (same box, coarser; the transform is the same, sampled
            linearly with border extension), for a next stage that resamples them anyway (a
            greedy stage absorbing them on its own levels): saves the full-resolution field.

    Returns:
        :class:`DiscreteResult` (``forward`` is the stage's transform, on ``fixed.grid`` with
        ``full_grid``).
    """
    p = DiscreteParams.from_dict(params) if not isinstance(params, DiscreteParams) else params
    if fixed.ndim != moving.ndim:
        raise InputError(f"{moving.name} is {moving.ndim}D but {fixed.name} is {fixed.ndim}D")
    d = fixed.ndim
    prefix = Identity(d) if prefix is None else prefix
    if prefix.ndim != d:
        raise InputError(f"discrete: the prefix transform is {prefix.ndim}D, the images {d}D")
    dev = fixed.data.device
    t_start = time.perf_counter()
    stats: dict[str, Any] = {}
    ident = Identity(d)
    fdata = fixed.batch(torch.float32)
    mdata = moving.batch(torch.float32).to(dev)

    # ---- features on the padded search grid, both in fixed space
    coarse = fixed.grid.downsample(p.feature_factor)
    plan = search_plan(coarse, p.radius_mm, p.step_mm)
    t0 = time.perf_counter()
    f_search = feature_maps(fdata, fixed.grid, p, plan.search, ident)
    m_search = feature_maps(mdata, moving.grid, p, plan.search, prefix)
    stats["features_s"] = round(time.perf_counter() - t0, 3)
    fw_search = _mask_on(fixed_mask, ident, plan.search, dev)
    mw_search = _mask_on(moving_mask, prefix, plan.search, dev)

    # ---- cost volume(s) and regularised optimum
    def solve(a_search: Tensor, b_search: Tensor, aw: Tensor | None, bw: Tensor | None,
              tag: str) -> Tensor:
        cv = cost_volume(plan.centre(a_search), b_search, plan.offsets, plan.stride,
                         memory_mb=p.memory_mb,
                         fixed_weight=None if aw is None else plan.centre(aw), moving_weight=bw)
        stats[f"cost_{tag}_s"] = round(cv.seconds, 3)
        stats["cost_peak_mb"] = round(cv.peak_bytes / 2 ** 20, 2)
        stats["cost_chunk"] = cv.chunk
        cost = cv.cost
        if p.cost_radius > 0:
            # in place, a few candidates at a time: at most half a chunk (two buffers) and
            # CACHE_BYTES, so the filter's passes stay in the cache (3× faster on vxm)
            per_label = cost[:, :1].numel() * cost.element_size()
            step = max(1, min(cv.chunk // 2, CACHE_BYTES // per_label))
            t1 = time.perf_counter()
            for l0 in range(0, cost.shape[1], step):
                sl = cost[:, l0:l0 + step]
                sl.copy_(box_filter(sl, p.cost_radius))
            stats[f"cost_filter_{tag}_s"] = round(time.perf_counter() - t1, 3)
        t1 = time.perf_counter()
        u = convex_optimise(cost, plan.offsets_mm.to(dev), coarse, p, plan.step_mm)
        stats[f"convex_{tag}_s"] = round(time.perf_counter() - t1, 3)
        return u

    stats["labels"] = plan.num_labels
    stats["coarse_shape"] = list(coarse.shape)
    u = solve(f_search, m_search, fw_search, mw_search, "forward")
    v = None
    if p.inverse_consistent:
        v = solve(m_search, f_search, mw_search, fw_search, "backward")
        u, v = symmetrise(u, v, coarse, p.symmetrise_iterations)
    coarse_u = u
    del f_search, m_search

    # ---- instance optimisation at a finer resolution
    if p.io_iterations > 0:
        u, v, src = _refine(fdata, fixed.grid, mdata, moving.grid, prefix, u, v, coarse, p,
                            fixed_mask, moving_mask, stats)
    else:
        src = coarse
    out_grid = fixed.grid if full_grid else src
    with torch.no_grad():
        full_u = _resample(u, src, out_grid)
        full_v = None if v is None else _resample(v, src, out_grid)
    stats["total_s"] = round(time.perf_counter() - t_start, 3)
    log.info("discrete registration: %s", stats)
    fwd = DisplacementField(full_u.detach(), out_grid)
    bwd = None if full_v is None else DisplacementField(full_v.detach(), out_grid)
    return DiscreteResult(fwd, bwd, coarse_u.detach(), plan, stats)


def discrete_registration(fixed: Image, moving: Image, prefix: SpatialTransform | None = None,
                          params: DiscreteParams | Mapping | None = None, *,
                          fixed_mask: Image | None = None, moving_mask: Image | None = None
                          ) -> DisplacementField:
    """The deformable part ``u`` of ``T = prefix ∘ (id + u)`` on ``fixed.grid`` (world mm).

    See :func:`run_discrete` (which also returns the backward field and statistics).
    """
    return run_discrete(fixed, moving, prefix, params, fixed_mask=fixed_mask,
                        moving_mask=moving_mask).forward
