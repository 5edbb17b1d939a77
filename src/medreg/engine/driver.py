"""The registration driver: stages × pyramid levels × optimiser steps.

Convention:
    The result maps fixed-space points to moving space: ``T = L ∘ D₁ ∘ … ∘ Dₖ`` where ``L`` is
    the linear part (initialisation and linear stages) and ``Dᵢ`` are the deformable stages'
    transforms on the fixed image's grid (the last applied first). Linear stages refine ``L``
    as ``L ← L ∘ S`` with ``S`` near identity about the fixed image's centre; deformable stages
    come after all linear stages. A greedy stage absorbs the deformable stages before it: its
    field starts as their total displacement and replaces them (``T = L ∘ (id + u)``), so its
    volume step regularises the whole deformation.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from medreg.core.errors import InputError
from medreg.core.functional import smooth_voxels
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.engine.adam import Adam
from medreg.engine.config import RegistrationConfig, StageConfig, build_regularisers, build_similarity
from medreg.engine.initialise import initial_transform
from medreg.engine.progress import Progress
from medreg.engine.pyramid import MIN_LEVEL_VOXELS, level_factors, pyramid_level, resample_field
from medreg.losses.functional import window_kernels
from medreg.transforms import (AffineTransform, BSplineTransform, Compose, DisplacementField,
                               LinearTransform, RigidTransform, SimilarityTransform,
                               SpatialTransform, StationaryVelocityField, TranslationTransform,
                               collapse_linear, warp_image)
from medreg.transforms.functional import scaling_and_squaring


@dataclass
class RegistrationResult:
    """What a registration produced.

    Attributes:
        transform: fixed → moving map (world mm); ``warped(x) = moving(transform(x))``.
        warped: the moving image resampled on the fixed grid (linear, float32).
        fixed, moving: the inputs.
        config: the configuration that ran.
        history: one record per stage level (stage, type, factor, iterations, loss first/last,
            seconds).
        runtime_s: wall time of the optimisation.
        inverse: moving → fixed map when the last stage is a symmetric svf stage (exact SVF
            inverse) or discrete with inverse consistency; None otherwise (greedy included).
        metrics: filled by callers (similarity before/after, Jacobian statistics, Dice, ...).
        fixed_labels, moving_labels: label maps given for evaluation (not used to optimise).
        warped_labels: ``moving_labels`` resampled on the fixed grid (nearest neighbour).
    """

    transform: SpatialTransform
    warped: Image
    fixed: Image
    moving: Image
    config: RegistrationConfig
    history: list[dict] = field(default_factory=list)
    runtime_s: float = 0.0
    inverse: SpatialTransform | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    warped_labels: Image | None = None
    _displacement: Tensor | None = field(default=None, repr=False, compare=False)

    def displacement(self) -> Tensor:
        """``transform(x) − x`` on the fixed grid, ``(1, D, *shape)`` world mm on the CPU (computed
        once, shared by the metrics, the displacement file and the QC figure)."""
        if self._displacement is None:
            with torch.no_grad():
                self._displacement = self.transform.displacement(self.fixed.grid).detach().cpu()
        return self._displacement


# ------------------------------------------------------------------ linear stages
class _LinearModel(nn.Module):
    """Normalised parameters of a linear stage ``S`` (near identity about ``center``).

    Rotations, scales and matrix entries are divided by ``radius`` (mm) so that one unit of
    every parameter moves image points by about 1 mm: translations and rotations move at
    comparable rates under one learning rate.
    """

    def __init__(self, kind: str, ndim: int, center: Tensor, radius: float) -> None:
        super().__init__()
        self.kind, self.ndim, self.radius = kind, ndim, radius
        self.register_buffer("center", center)
        self.t = nn.Parameter(torch.zeros(ndim, dtype=torch.float64))
        nrot = 1 if ndim == 2 else 3
        if kind in ("rigid", "similarity"):
            self.r = nn.Parameter(torch.zeros(nrot, dtype=torch.float64))
        if kind == "similarity":
            self.s = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        if kind == "affine":
            self.a = nn.Parameter(torch.zeros(ndim, ndim, dtype=torch.float64))

    def transform(self) -> LinearTransform:
        d, c, r = self.ndim, self.center, self.radius
        if self.kind == "translation":
            return TranslationTransform(d, self.t, c, trainable=False, dtype=torch.float64)
        if self.kind == "rigid":
            return RigidTransform(d, self.r / r, self.t, c, "rotvec", trainable=False, dtype=torch.float64)
        if self.kind == "similarity":
            return SimilarityTransform(d, torch.exp(self.s / r), self.r / r, self.t, c, "rotvec",
                                       trainable=False, dtype=torch.float64)
        eye = torch.eye(d, dtype=torch.float64)
        return AffineTransform(d, eye + self.a / r, self.t, c, trainable=False, dtype=torch.float64)


def _radius(grid: Grid) -> float:
    ext = [(n - 1) * s for n, s in zip(grid.size, grid.spacing)]
    return max(1.0, 0.5 * math.sqrt(sum(e * e for e in ext)) / math.sqrt(grid.ndim))


# ------------------------------------------------------------------ helpers
@dataclass
class _Level:
    fixed: Image
    moving: Image
    fixed_mask: Tensor | None
    moving_mask: Tensor | None


def _prepare_level(fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None,
                   factor: int, sigma: float | None, cache: dict | None = None) -> _Level:
    """The pyramid level of both images (and masks); ``cache`` (one dict per registration run)
    keeps levels that later stages ask for again with the same factor and smoothing."""
    key = (factor, None if sigma is None else tuple(sigma) if isinstance(sigma, list) else sigma)
    if cache is not None and key in cache:
        return cache[key]
    level = _build_level(fixed, moving, fixed_mask, moving_mask, factor, sigma)
    if cache is not None:
        cache[key] = level
    return level


def _build_level(fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None,
                 factor: int, sigma: float | None) -> _Level:
    f = pyramid_level(fixed, factor, sigma)
    m = pyramid_level(moving, factor, sigma)
    fm = pyramid_level(fixed_mask.to(torch.float32), factor, 0.0).data[None] if fixed_mask is not None else None
    mm = pyramid_level(moving_mask.to(torch.float32), factor, 0.0).data[None] if moving_mask is not None else None
    return _Level(f, m, fm, mm)


class _Converged:
    def __init__(self, tolerance: float, patience: int) -> None:
        self.tol, self.patience, self.values = tolerance, patience, []

    def __call__(self, value: float) -> bool:
        self.values.append(value)
        if self.tol <= 0 or len(self.values) <= self.patience:
            return False
        old = self.values[-1 - self.patience]
        return (old - value) < self.tol * max(abs(old), 1e-12)


def _similarity(sim: nn.Module, level: _Level, warped: Tensor, transform: SpatialTransform,
                fixed_data: Tensor | None = None,
                fixed_transform: SpatialTransform | None = None) -> Tensor:
    """``sim`` of the level's fixed image (or ``fixed_data``) and ``warped`` with the masks: the
    moving mask through ``transform``, the fixed mask through ``fixed_transform`` when the fixed
    image was warped too (symmetric greedy)."""
    mmask = None
    if level.moving_mask is not None:
        mmask = warp_image(level.moving_mask, transform, level.fixed.grid, level.moving.grid,
                           padding="zeros", precise=False)
    fmask = level.fixed_mask
    if fmask is not None and fixed_transform is not None:
        fmask = warp_image(fmask, fixed_transform, level.fixed.grid, level.fixed.grid,
                           padding="zeros", precise=False)
    fixed = level.fixed.batch() if fixed_data is None else fixed_data
    return sim(fixed, warped, fixed_mask=fmask, moving_mask=mmask)


def _optimise(params: list[nn.Parameter], closure: Callable[[], Tensor], stage: StageConfig,
              iterations: int, lr: float, progress: Progress,
              after_step: Callable[[], None] | None = None,
              grad_hook: Callable[[], None] | None = None,
              keep_best: bool = False) -> tuple[int, float, float]:
    """Run ``iterations`` optimiser steps; returns (steps done, first loss, last loss).

    ``keep_best``: end on the parameters with the lowest loss seen (the final ones included),
    not on the last step's: Adam at a constant step keeps moving about the optimum by about
    ``lr``, so without it a rigid registration of an image to itself ended 0.5 mm off identity.
    For stages with few parameters (a copy per step)."""
    converged = _Converged(stage.tolerance, stage.patience)
    first = last = float("nan")
    lbfgs = stage.optimizer == "lbfgs"
    best_value, best_params = math.inf, None

    def make() -> Any:
        if lbfgs:
            return torch.optim.LBFGS(params, lr=lr, max_iter=1, history_size=20,
                                     line_search_fn="strong_wolfe")
        return Adam(params, lr=lr)  # torch.optim.Adam's update without its ~1 s first import

    opt = make()
    steps, stalled = 0, 0
    for it in range(iterations):
        def step_closure() -> Tensor:
            opt.zero_grad(set_to_none=True)
            loss = closure()
            if not torch.isfinite(loss):
                raise InputError("the loss became NaN/inf: check the images (NaNs, constant "
                                 "regions) or lower the learning rate")
            loss.backward()
            if grad_hook is not None:
                grad_hook()
            return loss

        before = [p.detach().clone() for p in params] if keep_best else None
        loss = opt.step(step_closure)
        if after_step is not None:
            with torch.no_grad():
                after_step()
        value = float(loss.detach())
        if keep_best and value < best_value:  # the loss of the parameters before this step
            best_value, best_params = value, before
        if lbfgs:
            # L-BFGS reports the loss before its step: an unchanged value means the line search
            # made no progress (float32 losses are noisy at that scale) and the same curvature
            # memory would stall every later step; restart from steepest descent, and stop
            # when a fresh start makes no progress either
            stalled = stalled + 1 if it > 0 and value >= last else 0
            if stalled >= 2:
                break
            if stalled:
                opt = make()
        first = value if it == 0 else first
        last = value
        steps = it + 1
        progress.update(it + 1, value)
        if converged(value):
            break
    if keep_best and best_params is not None:
        with torch.no_grad():
            final = float(closure().detach())  # the last step's parameters, not yet evaluated
            if best_value < final:
                for p, b in zip(params, best_params):
                    p.copy_(b)
            last = min(best_value, final)
    return steps, first, last


# ------------------------------------------------------------------ the driver
def _warn_tiny_levels(stages: list[StageConfig], fixed: Image) -> None:
    """One warning when a pyramid level's shrink is capped along an axis (see
    :func:`~medreg.engine.pyramid.level_factors`): e.g. ``levels: [64]`` on a 40-voxel crop, or
    the few slices of a thick-slice volume, which keep :data:`MIN_LEVEL_VOXELS` voxels."""
    capped: dict[int, int] = {}  # axis -> the largest level factor capped there
    for stage in stages:
        if stage.type == "discrete":
            continue  # its own feature grid (discrete.feature_factor)
        for f in stage.levels:
            for ax, fa in enumerate(level_factors(fixed.grid, f)):
                if fa < f:
                    capped[ax] = max(capped.get(ax, 0), int(f))
    if capped:
        axes = ", ".join(f"{'xyz'[ax]} ({fixed.grid.size[ax]} voxels; level 1/{f})"
                         for ax, f in sorted(capped.items()))
        warnings.warn(f"{fixed.name} is too small along {axes} for the pyramid's shrink: those "
                      f"levels keep {MIN_LEVEL_VOXELS} voxels (or all there are) along that axis",
                      stacklevel=3)


def run_registration(fixed: Image, moving: Image, config: RegistrationConfig, *,
                     fixed_mask: Image | None = None, moving_mask: Image | None = None,
                     progress: Progress | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with ``config``; see the module docstring."""
    progress = progress or Progress(quiet=True)
    if fixed.ndim != moving.ndim:
        raise InputError(f"{fixed.name} is {fixed.ndim}D but {moving.name} is {moving.ndim}D")
    # a small fixed image runs the stages' small_image settings (e.g. a finer pyramid)
    stages = config.stages_for(fixed.grid.shape)
    seen_deformable = False
    for s in stages:
        if s.is_linear and seen_deformable:
            raise InputError("linear stages must come before deformable stages")
        seen_deformable |= not s.is_linear
    _warn_tiny_levels(stages, fixed)
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    linear: LinearTransform = initial_transform(fixed, moving, config.initialisation)
    deformations: list[SpatialTransform] = []
    history: list[dict] = []
    inverse: SpatialTransform | None = None
    nstages = len(stages)
    levels: dict = {}  # pyramid levels shared by the stages of this run
    for si, stage in enumerate(stages):
        if stage.type == "discrete":
            # a greedy stage next absorbs the field on its own levels: keep it on its grid
            absorbed = si + 1 < nstages and stages[si + 1].type == "greedy"
            res = _run_discrete(si, nstages, stage, fixed, moving, fixed_mask, moving_mask, linear,
                                deformations, progress, history, full_grid=not absorbed)
            deformations.append(res.forward)
            inverse = res.backward
            continue
        if stage.type == "greedy":  # absorbs the earlier deformations (see _run_greedy)
            deformations = [_run_greedy(si, nstages, stage, fixed, moving, fixed_mask,
                                        moving_mask, linear, deformations, progress, history,
                                        levels, crop=config.crop_to_foreground)]
            inverse = None
            continue
        sim = build_similarity(stage.similarity)
        regs = build_regularisers(stage.regularisation)
        if stage.is_linear:
            linear = _run_linear(si, nstages, stage, fixed, moving, fixed_mask, moving_mask, linear,
                                 sim, regs, progress, history, levels)
        else:
            deform, inv = _run_deformable(si, nstages, stage, fixed, moving, fixed_mask, moving_mask,
                                          linear, deformations, sim, regs, progress, history, levels)
            deformations.append(deform)
            inverse = inv
    for h in history:  # which levels ran a stage's small_image settings (a stage of its own)
        if stages[h["stage"] - 1] is not config.stages[h["stage"] - 1]:
            h["small_image"] = True
    total: SpatialTransform = linear if not deformations else Compose(linear, *deformations)
    if inverse is not None:  # the last stage is symmetric / inverse-consistent
        rest = [d.inverse() for d in reversed(deformations[:-1])]
        inverse = Compose(inverse, *rest, linear.inverse())
    runtime = time.perf_counter() - t0
    total, inverse = _frozen(total), _frozen(inverse)
    with torch.no_grad():
        warped = warp_image(moving.to(torch.float32), total, fixed.grid, interpolation="linear")
    return RegistrationResult(total, warped, fixed, moving, config, history, runtime, inverse)


def _frozen(t: SpatialTransform | None) -> SpatialTransform | None:
    """The result as a fixed transform: applying it builds no autograd graph (a user who wants
    to optimise it further sets ``requires_grad_(True)`` on its parameters)."""
    if t is not None:
        t.requires_grad_(False)
    return t


def _run_discrete(si: int, nstages: int, stage: StageConfig, fixed: Image, moving: Image,
                  fixed_mask: Image | None, moving_mask: Image | None, linear: LinearTransform,
                  earlier: list[SpatialTransform], progress: Progress, history: list,
                  full_grid: bool = True):
    from medreg.engine.discrete import DiscreteParams, run_discrete

    params = DiscreteParams.from_dict(stage.discrete, f"stage {si + 1}: discrete")
    prefix = linear if not earlier else Compose(linear, *earlier)
    progress.start(si, nstages, "discrete", 0, 1, params.feature_factor, params.io_iterations)
    res = run_discrete(fixed, moving, prefix, params, fixed_mask=fixed_mask, moving_mask=moving_mask,
                       full_grid=full_grid)
    progress.update(params.io_iterations, float("nan"))
    progress.end(float("nan"))
    history.append({"stage": si + 1, "type": "discrete", "factor": params.feature_factor,
                    "iterations": params.io_iterations, "loss_first": None, "loss_last": None,
                    "seconds": res.stats.get("total_s"), "discrete": res.stats})
    return res


#: A greedy level is cropped to the fixed image's foreground only when the box keeps at most this
#: share of the level's voxels (otherwise it runs on the whole grid, exactly as uncropped).
CROP_MAX_FRACTION = 0.8

#: Voxels added to the crop margin beyond the similarity window and the smoothing radii: room for
#: the volume step and the compositions to spread the field a little past the forces.
CROP_EXTRA_VOXELS = 2


def _crop_margin(stage: StageConfig, grid: Grid) -> int:
    """Voxels of ``grid`` (a level) around the foreground in which a greedy stage's forces can be
    non-zero: the LNCC window's reach plus the Gaussian radii (3σ) of the update and field
    smoothing. The force at ``x`` comes from the windows centred within a kernel radius of ``x``,
    and each sees the fixed image another radius away: the reach is twice the kernel's radius
    (8 voxels for a 9-voxel box)."""
    spec = stage.similarity
    kernels = window_kernels(spec.get("window", 9), grid.ndim, kernel=spec.get("kernel", "box"),
                             spacing=grid.spacing, window_unit=spec.get("window_unit", "voxel"))
    reach = max(2 * (k.numel() // 2) for k in kernels)
    radius = sum(math.ceil(3 * s) for s in (stage.gradient_sigma, stage.field_smoothing))
    return reach + radius + CROP_EXTRA_VOXELS


def _foreground_box(level: _Level, similarity: str, margin: int) -> tuple[list[int], list[int]] | None:
    """``(start, stop)`` index box ``(x, y, z)`` of the level's fixed foreground grown by ``margin``
    voxels, or None when the stage's forces need not vanish outside it or the box would keep
    more than :data:`CROP_MAX_FRACTION` of the grid.

    The foreground is the fixed mask when there is one (the similarity ignores everything else),
    else, for LNCC only, the voxels above the image's minimum (by 1e-3 of its range): where the
    fixed image is constant over a whole window, LNCC's covariance and so its force are exactly
    zero. Global similarities (SSD, NCC, MI, ...) pull everywhere and are never cropped.
    """
    if level.fixed_mask is not None:
        fg = level.fixed_mask[0, 0] > 0
    elif similarity == "lncc" and level.moving_mask is None:  # (a moving mask alone: its
        # warped copy decides which voxels LNCC standardises over, which a crop would change)
        data = level.fixed.data
        lo, hi = float(data.amin()), float(data.amax())
        fg = ((data - lo).abs() > 1e-3 * (hi - lo)).any(0)
    else:
        return None
    if not bool(fg.any()):
        return None
    size = level.fixed.grid.size  # (x, y, z); fg is indexed (z, y, x)
    start, stop = [], []
    for axis in range(len(size)):
        dim = fg.dim() - 1 - axis
        hit = fg.movedim(dim, 0).flatten(1).any(1)
        idx = torch.nonzero(hit).flatten()
        start.append(max(0, int(idx[0]) - margin))
        stop.append(min(size[axis], int(idx[-1]) + 1 + margin))
    if math.prod(b - a for a, b in zip(start, stop)) > CROP_MAX_FRACTION * math.prod(size):
        return None
    return start, stop


def _crop_similarity(sim: nn.Module, spec: dict, whole: _Level, box: tuple[list[int], list[int]],
                     warped: Tensor) -> nn.Module:
    """The similarity for a level cropped to ``box``, acting as on the whole level.

    LNCC standardises each image over its voxels, so its ``eps`` is relative to the images'
    variances: over a crop with less background they are larger, the standardised local
    variances smaller, and the same ``eps`` weighs more; that changes how much the flat windows
    count in the (longest-vector-normalised) steps (SDlogJ 0.116 → 0.122 on a FreeSurfer pair).
    Scaling ``eps`` by the ratio of the variance products (fixed and warped moving, whole level
    over crop) keeps the crop's forces those of the whole level. With a fixed mask the
    statistics are the mask's, the same on both, and ``sim`` is returned as is.
    """
    if spec["name"] != "lncc" or whole.fixed_mask is not None:
        return sim
    cut = _box_slices(box)
    fixed = whole.fixed.batch()
    inside = float(fixed[cut].var()) * float(warped[cut].var())
    if not inside > 0:  # the warped moving image is constant over the crop: no force anywhere
        return sim
    ratio = float(fixed.var()) * float(warped.var()) / inside
    return build_similarity({**spec, "eps": float(sim.eps) * ratio}).to(fixed.device)


def _box_slices(box: tuple[list[int], list[int]]) -> tuple[slice, ...]:
    """Tensor slices ``(:, :, z, y, x)`` of an index box ``(start, stop)`` in ``(x, y, z)``."""
    start, stop = box
    return (slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(start[::-1], stop[::-1]))


def _crop_level(level: _Level, box: tuple[list[int], list[int]]) -> _Level:
    """The level with its fixed image and mask cut to ``box`` (the moving side is unchanged)."""
    cut = _box_slices(box)
    fixed = Image(level.fixed.data[cut[1:]].contiguous(), level.fixed.grid.crop(*box),
                  level.fixed.name)
    mask = None if level.fixed_mask is None else level.fixed_mask[cut].contiguous()
    return _Level(fixed, level.moving, mask, level.moving_mask)


def _run_greedy(si: int, nstages: int, stage: StageConfig, fixed: Image, moving: Image,
                fixed_mask: Image | None, moving_mask: Image | None, linear: LinearTransform,
                earlier: list[SpatialTransform], progress: Progress, history: list,
                cache: dict | None = None, crop: bool = False) -> DisplacementField:
    from medreg.engine.greedy import (DEFAULT_LR, GreedyStep, greedy_level, greedy_level_symmetric,
                                      symmetric_displacement)

    sim = build_similarity(stage.similarity)
    # earlier deformable stages are absorbed: the field starts as their total displacement, so
    # the stage's field is the whole deformation after ``linear`` and its volume step regularises
    # all of it (a discrete stage's folds included), not only the greedy part
    absorbed = None if not earlier else (earlier[0] if len(earlier) == 1 else Compose(*earlier))
    u: Tensor | None = None
    a: Tensor | None = None  # symmetric: midpoint → fixed (u is then midpoint → moving)
    u_grid: Grid | None = None
    sampled: Tensor | None = None  # the absorbed field on the last level's grid
    for li, factor in enumerate(stage.levels):
        sigma = None if stage.smoothing is None else stage.smoothing[li]
        whole = _prepare_level(fixed, moving, fixed_mask, moving_mask, factor, sigma, cache)
        grid = whole.fixed.grid
        dev = whole.fixed.data.device
        if absorbed is not None:
            with torch.no_grad():
                here = absorbed.displacement(grid).to(device=dev, dtype=torch.float32)
        if u is None:
            u = torch.zeros(1, grid.ndim, *grid.shape, device=dev) if absorbed is None else here.clone()
        else:
            u = resample_field(u, u_grid, grid)
            if absorbed is not None:  # the absorbed field's detail finer than the last level's
                u = u + here - resample_field(sampled, u_grid, grid)
        if absorbed is not None:
            sampled = here
        if stage.symmetric:
            a = torch.zeros_like(u) if a is None else resample_field(a, u_grid, grid)
        u_grid = grid
        # the forces vanish outside the foreground's box (see _foreground_box): the level runs
        # on that box and the field outside it stays as the earlier levels left it
        box = (_foreground_box(whole, stage.similarity["name"], _crop_margin(stage, grid))
               if crop and not stage.symmetric else None)
        level, u_run, level_sim = whole, u, sim
        if box is not None:
            cut = _box_slices(box)
            level, u_run = _crop_level(whole, box), u[cut].contiguous()
            with torch.no_grad():
                t = Compose(linear, DisplacementField(u, grid, check_finite=False))
                warped = warp_image(whole.moving.batch(), t, grid, whole.moving.grid,
                                    padding="border", precise=False)
            level_sim = _crop_similarity(sim, stage.similarity, whole, box, warped)
        grid = level.fixed.grid
        step = GreedyStep(grid, stage.lr if stage.lr is not None else DEFAULT_LR, stage.gradient_sigma,
                          stage.field_smoothing, device=dev, log_jacobian=stage.log_jacobian[li])
        progress.start(si, nstages, stage.type, li, len(stage.levels), factor, stage.iterations[li])
        t_level = time.perf_counter()
        converged = _Converged(stage.tolerance, stage.patience)

        def report(it: int, value: float) -> bool:
            progress.update(it, value)
            return converged(value)

        def loss_fn(fdata: Tensor, warped: Tensor, t: SpatialTransform, level: _Level = level,
                    sim: nn.Module = level_sim) -> Tensor:
            return _similarity(sim, level, warped, t, fixed_data=fdata)

        def sym_loss(wf: Tensor, wm: Tensor, tf: SpatialTransform, tm: SpatialTransform,
                     level: _Level = level) -> Tensor:
            return _similarity(sim, level, wm, tm, fixed_data=wf, fixed_transform=tf)

        if stage.symmetric:
            a, u, steps, first, last = greedy_level_symmetric(
                a, u, step, linear, level.fixed.batch(), level.moving.batch(), level.moving.grid,
                sym_loss, stage.iterations[li], report)
        else:
            u_run, steps, first, last = greedy_level(u_run, step, linear, level.fixed.batch(),
                                                     level.moving.batch(), level.moving.grid, loss_fn,
                                                     stage.iterations[li], report)
            if box is None:
                u = u_run
            else:
                u = u.clone()
                u[cut] = u_run
        progress.end(last)
        history.append({"stage": si + 1, "type": stage.type, "factor": factor, "iterations": steps,
                        "loss_first": first, "loss_last": last,
                        "seconds": round(time.perf_counter() - t_level, 3)})
        if box is not None:
            history[-1]["cropped_to"] = list(grid.shape)
    with torch.no_grad():
        if stage.symmetric:
            u = symmetric_displacement(a, u, u_grid)
        return DisplacementField(resample_field(u, u_grid, fixed.grid), fixed.grid)


def _run_linear(si: int, nstages: int, stage: StageConfig, fixed: Image, moving: Image,
                fixed_mask: Image | None, moving_mask: Image | None, linear: LinearTransform,
                sim: nn.Module, regs: list, progress: Progress, history: list,
                cache: dict | None = None) -> LinearTransform:
    center = linear.center.detach().double() if linear.center.abs().sum() > 0 else \
        torch.tensor(fixed.grid.center(), dtype=torch.float64)
    model = _LinearModel(stage.type, fixed.ndim, center, _radius(fixed.grid))
    lr = stage.lr if stage.lr is not None else (1.0 if stage.optimizer == "lbfgs" else 0.5)
    prev = linear
    for li, factor in enumerate(stage.levels):
        sigma = None if stage.smoothing is None else stage.smoothing[li]
        level = _prepare_level(fixed, moving, fixed_mask, moving_mask, factor, sigma, cache)
        mdata = level.moving.batch()
        progress.start(si, nstages, stage.type, li, len(stage.levels), factor, stage.iterations[li])
        t_level = time.perf_counter()

        def closure() -> Tensor:
            t = Compose(prev, model.transform())
            warped = warp_image(mdata, t, level.fixed.grid, level.moving.grid, padding="border",
                                precise=False)
            return _similarity(sim, level, warped, t)

        steps, first, last = _optimise(list(model.parameters()), closure, stage,
                                       stage.iterations[li], lr, progress, keep_best=True)
        progress.end(last)
        history.append({"stage": si + 1, "type": stage.type, "factor": factor, "iterations": steps,
                        "loss_first": first, "loss_last": last,
                        "seconds": round(time.perf_counter() - t_level, 3)})
    with torch.no_grad():
        return collapse_linear([prev, model.transform()])


def _run_deformable(si: int, nstages: int, stage: StageConfig, fixed: Image, moving: Image,
                    fixed_mask: Image | None, moving_mask: Image | None, linear: LinearTransform,
                    earlier: list[SpatialTransform], sim: nn.Module, regs: list,
                    progress: Progress, history: list,
                    cache: dict | None = None) -> tuple[SpatialTransform, SpatialTransform | None]:
    if stage.symmetric and stage.type != "svf":
        raise InputError(f"stage {si + 1}: symmetric mode needs an svf or greedy stage")
    lr = stage.lr if stage.lr is not None else 0.5
    param: nn.Parameter | None = None
    param_grid: Grid | None = None
    bspline = BSplineTransform.from_grid(fixed.grid, stage.control_spacing, trainable=True) \
        if stage.type == "bspline" else None
    fixed_prefix = [linear, *earlier]
    for li, factor in enumerate(stage.levels):
        sigma = None if stage.smoothing is None else stage.smoothing[li]
        level = _prepare_level(fixed, moving, fixed_mask, moving_mask, factor, sigma, cache)
        grid = level.fixed.grid
        mdata = level.moving.batch()
        if bspline is not None:
            param = bspline.coefficients
        elif param is None:
            param = nn.Parameter(torch.zeros(1, grid.ndim, *grid.shape, device=level.fixed.data.device))
        else:
            param = nn.Parameter(resample_field(param.detach(), param_grid, grid))
        param_grid = grid
        progress.start(si, nstages, stage.type, li, len(stage.levels), factor, stage.iterations[li])
        t_level = time.perf_counter()
        prefix = fixed_prefix[0] if len(fixed_prefix) == 1 else Compose(*fixed_prefix)

        def dense(p: Tensor, g: Grid = grid) -> Tensor:
            if stage.type == "svf":
                return scaling_and_squaring(p, g, stage.steps)
            if stage.type == "bspline":
                return bspline.displacement(g)
            return p

        def closure() -> Tensor:
            if stage.symmetric:
                half_fwd = scaling_and_squaring(param / 2, grid, stage.steps)
                half_bwd = scaling_and_squaring(-param / 2, grid, stage.steps)
                tm = Compose(prefix, DisplacementField(half_fwd, grid, check_finite=False))
                tf = DisplacementField(half_bwd, grid, check_finite=False)
                wm = warp_image(mdata, tm, grid, level.moving.grid, padding="border", precise=False)
                wf = warp_image(level.fixed.batch(), tf, grid, grid, padding="border", precise=False)
                loss = _similarity(sim, level, wm, tm, fixed_data=wf)
            else:
                u = dense(param)
                t = Compose(prefix, DisplacementField(u, grid, check_finite=False))
                warped = warp_image(mdata, t, grid, level.moving.grid, padding="border", precise=False)
                loss = _similarity(sim, level, warped, t)
            reg_input = param if stage.type in ("svf", "displacement") else dense(param)
            for w, reg, _ in regs:
                loss = loss + w * reg(reg_input, grid)
            return loss

        def grad_hook() -> None:
            if stage.gradient_sigma > 0 and param.grad is not None and stage.type != "bspline":
                param.grad = smooth_voxels(param.grad, stage.gradient_sigma)

        def after_step() -> None:
            if stage.field_smoothing > 0 and stage.type != "bspline":
                param.copy_(smooth_voxels(param, stage.field_smoothing))

        steps, first, last = _optimise([param], closure, stage, stage.iterations[li], lr, progress,
                                       after_step, grad_hook)
        progress.end(last)
        history.append({"stage": si + 1, "type": stage.type, "factor": factor, "iterations": steps,
                        "loss_first": first, "loss_last": last,
                        "seconds": round(time.perf_counter() - t_level, 3)})
    # the stage's transform on the full-resolution fixed grid
    with torch.no_grad():
        if stage.type == "bspline":
            return BSplineTransform(bspline.control, bspline.coefficients.detach(), trainable=False), None
        full = fixed.grid
        p = resample_field(param.detach(), param_grid, full)
        if stage.type == "svf":
            # integrate once: every later use (warps, metrics, export) reads the dense field
            svf = StationaryVelocityField(p, full, stage.steps)
            inv = svf.inverse().as_displacement() if stage.symmetric else None
            return svf.as_displacement(), inv
        return DisplacementField(p, full), None
