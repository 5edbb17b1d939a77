"""Dense and B-spline non-linear transforms.

Convention:
    Fields are ``(N, D, *grid.shape)`` tensors of world (LPS mm) vectors, components ``x, y, z``,
    on the :class:`~medreg.core.grid.Grid` they carry. ``T(x) = x + u(x)`` maps fixed → moving.
    Between voxels a field is interpolated linearly (as ITK's ``DisplacementFieldTransform``);
    beyond the grid it is extended with its border value.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from medreg.core.errors import GeometryError, InputError
from medreg.core.grid import Grid
from medreg.transforms import functional as TF
from medreg.transforms.base import SpatialTransform


def _check_field(field: Tensor, grid: Grid, what: str, finite: bool = True) -> Tensor:
    field = torch.as_tensor(field)
    if field.dim() == grid.ndim + 1:
        field = field.unsqueeze(0)
    if field.dim() != grid.ndim + 2 or field.shape[1] != grid.ndim or tuple(field.shape[2:]) != grid.shape:
        raise GeometryError(
            f"{what} must have shape (N, {grid.ndim}, {', '.join(map(str, grid.shape))}) to match "
            f"its grid, got {tuple(field.shape)}"
        )
    if not field.is_floating_point():
        field = field.float()
    if finite and not torch.isfinite(field.detach()).all():
        raise InputError(f"{what} contains NaN or infinite values")
    return field


def displace_points(field: Tensor, grid: Grid, points: Tensor) -> Tensor:
    """``x + u(x)`` for points ``(..., D)`` (or ``(N, ..., D)`` matching a batched field).

    ``field`` is ``(N, D, *grid.shape)`` world mm; points are world mm. With ``N > 1`` the
    points' leading axis must be the batch.
    """
    batched = points.dim() >= 2 and points.shape[0] == field.shape[0]
    p = points if batched else points.unsqueeze(0)
    if p.shape[0] != field.shape[0] and field.shape[0] != 1:
        raise GeometryError("points batch does not match the displacement field's batch")
    norm = grid.transform_points(p.to(field.dtype), "world", "norm")
    flat = norm.reshape(norm.shape[0], -1, grid.ndim)
    u = TF._field_sample(field, flat).reshape(*norm.shape).to(points.dtype)
    out = p + u
    return out if batched else out.squeeze(0)


class DisplacementField(SpatialTransform):
    """``T(x) = x + u(x)`` with ``u`` sampled on ``grid`` (world mm).

    Args:
        field: ``(N, D, *grid.shape)`` (or without ``N``) world-mm displacement.
        grid: where the field is sampled (typically the fixed image's grid).
        trainable: register the field as a parameter with gradients.
        check_finite: reject NaN/inf values (a full pass; inner loops that built the field
            themselves may skip it).
    """

    def __init__(self, field: Tensor, grid: Grid, trainable: bool = False, check_finite: bool = True) -> None:
        super().__init__(grid.ndim)
        self.grid = grid
        self._set_tensor("field", _check_field(field, grid, "displacement field", check_finite), trainable)
        #: max residual (mm) of the fixed-point inversion that produced this field, if any
        self.inverse_residual: float | None = None

    @classmethod
    def zeros(cls, grid: Grid, trainable: bool = True, dtype: torch.dtype = torch.float32,
              device=None) -> "DisplacementField":
        return cls(torch.zeros((1, grid.ndim, *grid.shape), dtype=dtype, device=device), grid,
                   trainable)

    def forward(self, points: Tensor) -> Tensor:
        self.check_points(points)
        return displace_points(self.field, self.grid, points)

    def displacement(self, grid: Grid) -> Tensor:
        self.check_grid(grid)
        if grid == self.grid:
            return self.field
        return super().displacement(grid)

    def mapped_points(self, grid: Grid, dtype: torch.dtype | None = None) -> Tensor:
        self.check_grid(grid)
        dtype = dtype or self.field.dtype
        pts = grid.points(dtype=dtype, device=self.field.device)
        if grid != self.grid:  # sample the field at the other grid's voxel centres
            out = self.forward(pts)
            return out if out.dim() == grid.ndim + 2 else out.unsqueeze(0)
        return pts + self.field.movedim(1, -1).to(dtype)

    def source_norm_points(self, target: Grid, source: Grid, dtype: torch.dtype | None = None) -> Tensor:
        if target != self.grid:
            return super().source_norm_points(target, source, dtype)
        dtype = dtype or self.field.dtype
        dev = self.field.device
        m = target.matrix("index", "norm", source, dtype=dtype, device=dev)
        lin = source.matrix("world", "norm", dtype=dtype, device=dev)[: self.ndim, : self.ndim]
        return TF.affine_field_points(m, lin, self.field.to(dtype), target.shape)

    def inverse(self, iterations: int = 50, tolerance: float = 1e-4) -> "DisplacementField":
        """Fixed-point inverse on the same grid; its residual (mm) is in ``inverse_residual``."""
        v, residual = TF.invert_displacement(self.field.detach(), self.grid, iterations, tolerance)
        inv = DisplacementField(v, self.grid)
        inv.inverse_residual = residual
        return inv


class StationaryVelocityField(SpatialTransform):
    """Diffeomorphic ``T = exp(v)`` for a stationary velocity ``v`` (scaling and squaring).

    Args:
        velocity: ``(N, D, *grid.shape)`` world mm.
        grid: where ``v`` (and the integrated displacement) is sampled.
        steps: number of squarings (``2**steps`` Euler steps); 7 by default.
    """

    def __init__(self, velocity: Tensor, grid: Grid, steps: int = 7, trainable: bool = False) -> None:
        super().__init__(grid.ndim)
        if int(steps) < 0:
            raise InputError(f"scaling-and-squaring steps must be >= 0, got {steps}")
        self.grid = grid
        self.steps = int(steps)
        self._set_tensor("velocity", _check_field(velocity, grid, "velocity field"), trainable)

    @classmethod
    def zeros(cls, grid: Grid, steps: int = 7, trainable: bool = True,
              dtype: torch.dtype = torch.float32, device=None) -> "StationaryVelocityField":
        return cls(torch.zeros((1, grid.ndim, *grid.shape), dtype=dtype, device=device), grid,
                   steps, trainable)

    def field(self) -> Tensor:
        """The integrated displacement on the velocity's own grid."""
        return TF.scaling_and_squaring(self.velocity, self.grid, self.steps)

    def as_displacement(self) -> DisplacementField:
        """The integrated map as a :class:`DisplacementField` (detached)."""
        return DisplacementField(self.field().detach(), self.grid)

    def forward(self, points: Tensor) -> Tensor:
        self.check_points(points)
        return displace_points(self.field(), self.grid, points)

    def displacement(self, grid: Grid) -> Tensor:
        self.check_grid(grid)
        if grid == self.grid:
            return self.field()
        return super().displacement(grid)

    def inverse(self) -> "StationaryVelocityField":
        """Exact inverse ``exp(−v)``."""
        return StationaryVelocityField(-self.velocity.detach(), self.grid, self.steps)


class BSplineTransform(SpatialTransform):
    """Cubic B-spline free-form deformation: ``u(x) = Σ_k c_k β³(i(x) − k)``.

    ``i(x)`` is the continuous index of ``x`` on the control-point grid ``control`` and ``c_k``
    are world-mm displacement coefficients — the parameterisation of ITK's ``BSplineTransform``
    (fixed parameters = the control grid's size, origin, spacing, direction). Like ITK, the
    displacement is zero outside the region where all 4ᴰ supporting control points exist.

    Args:
        control: control-point grid.
        coefficients: ``(1, D, *control.shape)``; default zeros.
    """

    def __init__(self, control: Grid, coefficients: Tensor | None = None, trainable: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(control.ndim)
        if any(n < 4 for n in control.size):
            raise GeometryError(f"a cubic B-spline needs at least 4 control points per axis, got {control.size}")
        self.control = control
        if coefficients is None:
            coefficients = torch.zeros((1, control.ndim, *control.shape), dtype=dtype)
        self._set_tensor("coefficients", _check_field(coefficients, control, "B-spline coefficients"),
                         trainable)

    @classmethod
    def from_grid(cls, grid: Grid, control_spacing: float | Sequence[float], **kwargs) -> "BSplineTransform":
        """Control grid over ``grid``'s voxel centres with the given spacing in mm.

        The mesh covers the image (centred on it) with one extra control point beyond each end,
        so every voxel is in the valid region.
        """
        cs = [float(control_spacing)] * grid.ndim if isinstance(control_spacing, (int, float)) \
            else [float(c) for c in control_spacing]
        if len(cs) != grid.ndim or any(c <= 0 for c in cs):
            raise InputError(f"control spacing must be {grid.ndim} positive values in mm, got {control_spacing}")
        mesh = [max(1, math.ceil((n - 1) * sp / c - 1e-6)) for n, sp, c in zip(grid.size, grid.spacing, cs)]
        size = [m + 3 for m in mesh]
        import numpy as np

        centre = np.asarray(grid.center())
        half = np.asarray([(s - 1) * c / 2.0 for s, c in zip(size, cs)])
        origin = centre - grid.direction @ half
        return cls(Grid(size, cs, origin.tolist(), grid.direction), **kwargs)

    def _displacement_at(self, points: Tensor) -> Tensor:
        shape = points.shape[:-1]
        idx = self.control.transform_points(points.to(self.coefficients.dtype), "world", "index")
        flat = idx.reshape(1, -1, self.ndim)
        u = TF.bspline_sample(self.coefficients, flat)  # (1, D, P)
        size = torch.tensor(self.control.size, dtype=idx.dtype, device=idx.device)
        valid = ((flat >= 1) & (flat <= size - 2)).all(dim=-1)  # (1, P)
        u = (u * valid.unsqueeze(1)).movedim(1, -1)
        return u.reshape(*shape, self.ndim)

    def forward(self, points: Tensor) -> Tensor:
        self.check_points(points)
        return points + self._displacement_at(points).to(points.dtype)

    def displacement(self, grid: Grid) -> Tensor:
        self.check_grid(grid)
        pts = grid.points(dtype=self.coefficients.dtype, device=self.coefficients.device)
        return self._displacement_at(pts).movedim(-1, 0).unsqueeze(0)
