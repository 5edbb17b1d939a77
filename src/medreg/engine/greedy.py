"""Greedy compositional registration of a dense displacement (as ANTs' SyN update or Greedy).

Convention:
    The field ``u`` is ``(1, D, *grid.shape)`` world mm on the level's fixed grid and the stage's
    transform is ``T(x) = x + u(x)`` after the earlier stages' ``prefix`` (fixed → moving).

Each step:
    1. warp the moving image through ``prefix ∘ (id + u)`` (no autograd through the sampler);
    2. ``g = ∂loss/∂warped`` by autograd through the similarity only;
    3. force ``f = −g ∇warped`` (world mm, the steepest descent for a right-composed update
       ``x ↦ x + v(x)``), smoothed with a Gaussian of ``gradient_sigma`` voxels ("fluid");
    4. ``v`` is ``f`` scaled so that its longest vector is ``lr`` voxels of the level;
    5. ``u ← v + u ∘ (id + v)`` (one resample of the field), then ``u`` is smoothed with a Gaussian
       of ``field_smoothing`` voxels ("diffusion");
    6. optionally (``log_jacobian`` > 0) one gradient step on ``½ Σ (log det J)²`` of the total
       field, of size ``log_jacobian · h²`` (``h`` the level's smallest spacing): a volume-change
       regulariser. Smoothing lowers every frequency of the field alike; this step targets local
       volume change, which is what SD of log det J measures, and costs the labels less Dice.

Symmetric mode (:func:`greedy_level_symmetric`, as ANTs' SyN): both images are warped to a midpoint
on the fixed grid, the fixed through ``id + a`` and the moving through ``prefix ∘ (id + b)``; each
field takes the update above from its own image's force, and the stage's transform is
``(id + b) ∘ (id + a)⁻¹``. Any common deformation of both halves leaves that unchanged and drifts
where the images are flat, so after each step both halves are right-composed with the same
``id − (a + b)/2`` (``a = −b``, the midpoint, to first order; ``B ∘ A⁻¹`` unchanged). Each half
carries about half of the deformation, so for the same smoothing the composed field is smoother;
a step costs about twice as much.

Per step this costs one image warp, the similarity forward and backward, one field resample and
two separable smoothings — no backward pass through scaling and squaring or the sampler, which is
what makes an autograd SVF step several times slower on CPU. Small smoothed updates keep the
Jacobian positive in practice; the result is reported with folding statistics like any field.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.functional import (axis_steps, cofactor_small, jacobian_matrix, matmul_small,
                                    matvec_field, smooth_voxels, spatial_gradient_adjoint)
from medreg.core.grid import Grid
from medreg.transforms import Compose, DisplacementField, SpatialTransform, warp_image
from medreg.transforms import functional as TF


LossFn = Callable[[Tensor, Tensor, SpatialTransform], Tensor]

#: longest update per step (voxels of the level) when a greedy stage gives no ``lr``.
DEFAULT_LR = 0.25

#: ``δ`` below which the volume step's ``½ (log det J)²`` continues linearly. Measured on vxm with
#: the same settings: δ 0.3 gave 0.727 / SDlogJ 0.213, δ 0.1 0.725 / 0.210, no pull below 1e-3
#: (and an unbounded one just above it) 0.725 / 0.210 (benchmarks/RESULTS.md).
VOLUME_FLOOR = 0.3

#: Bytes of the 9-component Jacobian of one slab of the volume step (see
#: :meth:`GreedyStep._volume_gradient`); slabs are at least 8 rows.
VOLUME_SLAB_BYTES = 16 * 2 ** 20


def index_gradient(image: Tensor) -> Tensor:
    """Central-difference gradients ``(N, C, D, *shape)`` of ``(N, C, *shape)`` along the index
    axes, components ``x, y, z`` (one-sided at the border)."""
    d = image.dim() - 2
    parts = torch.gradient(image, dim=tuple(range(2, d + 2)))
    return torch.stack(parts[::-1], dim=2)


class GreedyStep:
    """One greedy update on a fixed level grid (see the module docstring).

    Args:
        grid: the level's fixed grid (the field lives on it).
        lr: longest update vector per step, in voxels of ``grid``.
        gradient_sigma: Gaussian σ (voxels) of the force ("fluid" smoothing).
        field_smoothing: Gaussian σ (voxels) of the total field after each step ("diffusion").
        log_jacobian: step size (in units of the squared voxel spacing) of the descent step on
            ``½ Σ (log det J)²`` after each update; 0 disables. A step moves no point more than
            ``lr`` voxels (see :meth:`volume_step`).
    """

    def __init__(self, grid: Grid, lr: float, gradient_sigma: float, field_smoothing: float,
                 dtype: torch.dtype = torch.float32, device: torch.device | None = None,
                 log_jacobian: float = 0.0) -> None:
        self.grid, self.lr = grid, float(lr)
        self.fluid, self.diffusion = float(gradient_sigma), float(field_smoothing)
        self.log_jacobian = float(log_jacobian)
        d = grid.ndim
        w_from_i = grid.matrix("index", "world", dtype=torch.float64)[:d, :d]
        # ∇_world f = (∂world/∂index)^-T ∇_index f
        self.grad_to_world = torch.linalg.inv(w_from_i).T.to(dtype=dtype, device=device)
        self.index_from_world = torch.linalg.inv(w_from_i).to(dtype=dtype, device=device)
        self.norm_from_world = grid.matrix("world", "norm", dtype=dtype, device=device)[:d, :d]
        self.ident_norm = grid.points("norm", dtype=dtype, device=device).unsqueeze(0)
        self.axis_steps = axis_steps(self.index_from_world)  # None on an oblique grid
        self.aligned = self.axis_steps is not None  # then all three frame changes are diagonal

    def force(self, warped: Tensor, dloss: Tensor) -> Tensor:
        """``−∂loss/∂warped · ∇warped`` in world mm per unit, smoothed: ``(N, D, *shape)``."""
        tracked = torch.is_grad_enabled() and (warped.requires_grad or dloss.requires_grad)
        if warped.shape[1] == 1 and dloss.shape[1] == 1 and not tracked:
            # one channel: each component written once, no stacked copies; the same values as
            # the general line below (−(a·b) = (−a)·b), up to the sign of zeros
            d = warped.dim() - 2
            parts = torch.gradient(warped[:, 0], dim=tuple(range(1, d + 1)))
            neg = dloss[:, 0].neg()
            per_index = torch.empty((warped.shape[0], d) + tuple(warped.shape[2:]),
                                    dtype=warped.dtype, device=warped.device)
            for comp, part in enumerate(parts[::-1]):  # components x, y, z
                torch.mul(neg, part, out=per_index[:, comp])
        else:
            per_index = -(dloss.unsqueeze(2) * index_gradient(warped)).sum(1)  # over channels
        return smooth_voxels(matvec_field(self.grad_to_world, per_index, self.aligned), self.fluid)

    def longest(self, field: Tensor) -> float:
        """Length of the longest vector of a world-mm ``field``, in voxels of the level."""
        vox = matvec_field(self.index_from_world, field, self.aligned)
        return float(vox.square().sum(1).amax().sqrt())

    def scale(self, force: Tensor) -> Tensor:
        """``force`` scaled so that its longest vector is ``lr`` voxels (zero stays zero)."""
        longest = self.longest(force)
        return force * (self.lr / longest) if longest > 0 else force

    def compose(self, u: Tensor, v: Tensor) -> Tensor:
        """Displacement of ``(id + u) ∘ (id + v)``, smoothed by ``field_smoothing``, then
        :meth:`volume_step` (in symmetric mode each half-field gets its own)."""
        q = self.ident_norm + matvec_field(self.norm_from_world, v, self.aligned).movedim(1, -1)
        out = v + TF._field_sample(u, q).movedim(-1, 1)
        return self.volume_step(smooth_voxels(out, self.diffusion))

    def volume_step(self, u: Tensor) -> Tensor:
        """``u − log_jacobian · h² · ∇_u ½ Σ (log det J)²`` (``u`` unchanged when disabled).

        Below ``det J`` = :data:`VOLUME_FLOOR` the penalty continues along its tangent (a C¹
        extension), so compressed and folded voxels get the bounded pull ``log(δ)/δ · cof J``.
        The step is scaled down, as a whole, so that no point moves more than ``lr`` voxels (the
        greedy update's own longest step): an uncapped explicit step can feed on itself and blow up
        (seen on 10³-voxel hippocampus levels).
        """
        if self.log_jacobian <= 0:
            return u
        grad = self._volume_gradient(u)
        step = (self.log_jacobian * min(self.grid.spacing) ** 2) * grad
        longest = self.longest(step)
        if longest > self.lr:  # explicit steps on log det can feed back and blow up on small grids
            step = step * (self.lr / longest)
        return u - step

    def _volume_gradient(self, u: Tensor) -> Tensor:
        """``∇_u ½ Σ (log det J)²`` (with the floor), slab by slab on a large 3D field: each slab
        of rows along the slowest axis is computed from the field with a 3-row halo (central
        differences, then their adjoint), so its ~30 passes over 9-component tensors stay in
        the cache; the same arithmetic per voxel as one pass over the whole field."""
        rows = u.shape[2]
        per_row = u[:, :1, :1].numel() * 9 * u.element_size()
        slab = max(8, VOLUME_SLAB_BYTES // max(1, per_row))
        whole = rows * per_row <= 4 * VOLUME_SLAB_BYTES  # (fits the cache well enough: one pass)
        if u.dim() != 5 or whole or slab >= rows or torch.is_grad_enabled() and u.requires_grad:
            return self._volume_gradient_whole(u)
        grad = torch.empty_like(u)
        for z0 in range(0, rows, slab):
            z1 = min(rows, z0 + slab)
            lo, hi = max(0, z0 - 3), min(rows, z1 + 3)
            part = self._volume_gradient_whole(u[:, :, lo:hi])
            grad[:, :, z0:z1] = part[:, :, z0 - lo:z1 - lo]
        return grad

    def _volume_gradient_whole(self, u: Tensor) -> Tensor:
        # ∂/∂u ½Σ(log det J)²: per voxel ∂/∂J = (log det / det) · cofactor(J), taken back through
        # J = I + ∂u/∂index · ∂index/∂world and the central differences by their adjoints
        jac = jacobian_matrix(u, self.grid)
        cof = cofactor_small(jac)
        det = (jac[:, 0] * cof[:, 0]).sum(1)
        # below det = VOLUME_FLOOR the penalty goes on along its tangent: compressed and folded
        # voxels keep a bounded pull towards det 1 instead of an unbounded (or no) one
        floored = det.clamp_min(VOLUME_FLOOR)
        weight = torch.log(floored) / floored
        tracked = torch.is_grad_enabled() and u.requires_grad
        w = weight.unsqueeze(1).unsqueeze(1)
        d_jac = cof * w if tracked else cof.mul_(w)  # (in place: cof is not needed after this)
        if self.axis_steps is not None:  # axis-aligned: the world-from-index factor is a per-axis step
            return spatial_gradient_adjoint(d_jac, self.axis_steps)
        return spatial_gradient_adjoint(matmul_small(d_jac, self.index_from_world.T))


def greedy_level(u: Tensor, step: GreedyStep, prefix: SpatialTransform, fixed: Tensor, moving: Tensor,
                 moving_grid: Grid, loss_fn: LossFn, iterations: int,
                 report: Callable[[int, float], bool]) -> tuple[Tensor, int, float, float]:
    """Run up to ``iterations`` greedy steps on ``u`` (world mm on ``step.grid``).

    Args:
        u: the moving image is sampled through ``prefix ∘ (id + u)``.
        fixed, moving: ``(1, C, *shape)`` level images (fixed on ``step.grid``).
        loss_fn: ``loss_fn(fixed, warped, t)`` gives the similarity with masks.
        report: ``report(it, loss)`` after each step; returns True to stop (convergence).

    Returns:
        ``(u, steps done, first loss, last loss)``.
    """
    first = last = float("nan")
    steps = 0
    for it in range(iterations):
        t = Compose(prefix, DisplacementField(u, step.grid, check_finite=False))
        with torch.no_grad():
            warped = warp_image(moving, t, step.grid, moving_grid, padding="border", precise=False)
        warped.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(fixed, warped, t)
            (dloss,) = torch.autograd.grad(loss, warped)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise InputError("the loss became NaN/inf: check the images (NaNs, constant regions)")
        with torch.no_grad():
            u = step.compose(u, step.scale(step.force(warped.detach(), dloss)))
        first = value if it == 0 else first
        last, steps = value, it + 1
        if report(it + 1, value):
            break
    return u, steps, first, last


SymLossFn = Callable[[Tensor, Tensor, SpatialTransform, SpatialTransform], Tensor]


def greedy_level_symmetric(a: Tensor, b: Tensor, step: GreedyStep, prefix: SpatialTransform,
                           fixed: Tensor, moving: Tensor, moving_grid: Grid, loss_fn: SymLossFn,
                           iterations: int, report: Callable[[int, float], bool],
                           ) -> tuple[Tensor, Tensor, int, float, float]:
    """Run up to ``iterations`` symmetric greedy steps (see the module docstring).

    Args:
        a: midpoint → fixed displacement (world mm on ``step.grid``, the fixed level grid).
        b: midpoint → moving displacement, before ``prefix``.
        loss_fn: ``loss_fn(warped_fixed, warped_moving, t_fixed, t_moving)``, the similarity
            at the midpoint (``t_*`` map midpoint points into each image, e.g. to warp masks).

    Returns:
        ``(a, b, steps done, first loss, last loss)``; :func:`symmetric_displacement` turns
        ``a, b`` into the stage's displacement.
    """
    first = last = float("nan")
    steps = 0
    for it in range(iterations):
        tf = DisplacementField(a, step.grid, check_finite=False)
        tm = Compose(prefix, DisplacementField(b, step.grid, check_finite=False))
        with torch.no_grad():
            wf = warp_image(fixed, tf, step.grid, step.grid, padding="border", precise=False)
            wm = warp_image(moving, tm, step.grid, moving_grid, padding="border", precise=False)
        wf.requires_grad_(True)
        wm.requires_grad_(True)
        with torch.enable_grad():
            loss = loss_fn(wf, wm, tf, tm)
            dfix, dmov = torch.autograd.grad(loss, (wf, wm))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise InputError("the loss became NaN/inf: check the images (NaNs, constant regions)")
        with torch.no_grad():
            a = step.compose(a, step.scale(step.force(wf.detach(), dfix)))
            b = step.compose(b, step.scale(step.force(wm.detach(), dmov)))
            # (A ∘ C, B ∘ C) gives the same B ∘ A⁻¹ for any C: that common mode has no restoring
            # force and drifts where the images are flat. Right-composing both halves with
            # C = id − (a + b)/2 removes it (a = −b to first order) and leaves B ∘ A⁻¹ as it was
            # up to interpolation.
            back = -0.5 * (a + b)
            a = TF.compose_displacements(a, back, step.grid)
            b = TF.compose_displacements(b, back, step.grid)
        first = value if it == 0 else first
        last, steps = value, it + 1
        if report(it + 1, value):
            break
    return a, b, steps, first, last


def symmetric_displacement(a: Tensor, b: Tensor, grid: Grid) -> Tensor:
    """Displacement (world mm on ``grid``) of ``(id + b) ∘ (id + a)⁻¹``: fixed → moving through
    the midpoint, with ``(id + a)⁻¹`` by fixed-point inversion."""
    w, residual = TF.invert_displacement(a, grid, iterations=50, tolerance=1e-3)
    if residual > 0.1 * min(grid.spacing):
        warnings.warn(f"symmetric greedy stage: the fixed half-field inverted with a residual of "
                      f"{residual:.2f} mm (> 0.1 voxel); the result may be inaccurate: use more "
                      f"smoothing (gradient_sigma, field_smoothing) or a smaller lr", stacklevel=2)
    return TF.compose_displacements(b, w, grid)


__all__ = ["DEFAULT_LR", "GreedyStep", "greedy_level", "greedy_level_symmetric", "index_gradient",
           "symmetric_displacement"]
