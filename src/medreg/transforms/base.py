"""Base class and composition of spatial transforms.

Convention:
    A transform maps world points (LPS mm) of the **fixed** image's space to the **moving**
    image's space (pull back): ``warped(x) = moving(T(x))``. Points are ``(..., D)`` tensors with
    components in ``(x, y, z)`` order; displacements are ``(N, D, *grid.shape)`` in world mm.
    :class:`Compose` follows ITK's composite order: ``Compose(A, B)(x) = A(B(x))`` — the last
    listed transform is applied first, as ``antsApplyTransforms -t A -t B``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from medreg.core.errors import GeometryError
from medreg.core.functional import jacobian_det as _jacobian_det_field
from medreg.core.grid import Grid


class SpatialTransform(nn.Module):
    """A differentiable map of world points, fixed → moving.

    Subclasses implement :meth:`forward`; those with a dense representation override
    :meth:`displacement` for speed. Device and dtype follow the parameters and buffers.
    """

    def __init__(self, ndim: int) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise GeometryError(f"transforms are 2D or 3D, got ndim={ndim}")
        self.ndim = ndim

    def _set_tensor(self, name: str, value: Tensor, trainable: bool) -> None:
        """Register ``value`` as a parameter (``trainable``: a fresh leaf with gradients) or
        as a buffer kept as given — so a tensor computed by a network keeps its graph."""
        if trainable:
            self.register_parameter(name, nn.Parameter(value.detach().clone()))
        else:
            self.register_buffer(name, value)

    def requires_grad(self) -> bool:
        """True if any of the transform's tensors carries gradients (a parameter or a graph)."""
        return any(t.requires_grad for t in list(self.parameters()) + list(self.buffers()))

    # -- device/dtype of the transform's own tensors
    def _ref(self) -> tuple[torch.dtype, torch.device]:
        for t in list(self.parameters()) + list(self.buffers()):
            if t.is_floating_point():
                return t.dtype, t.device
        return torch.float32, torch.device("cpu")

    def forward(self, points: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Map points ``(..., D)`` in world mm (fixed space) to moving space."""
        raise NotImplementedError

    def check_points(self, points: Tensor) -> None:
        if points.shape[-1] != self.ndim:
            raise GeometryError(
                f"a {self.ndim}D transform cannot map {points.shape[-1]}D points"
            )

    def check_grid(self, grid: Grid) -> None:
        if grid.ndim != self.ndim:
            raise GeometryError(f"a {self.ndim}D transform cannot be applied on a {grid.ndim}D grid")

    def mapped_points(self, grid: Grid, dtype: torch.dtype | None = None) -> Tensor:
        """``T(x)`` for every voxel centre ``x`` of ``grid``: ``(N, *grid.shape, D)`` world mm.

        ``dtype`` sets the precision of the coordinates (default: the transform's).
        """
        self.check_grid(grid)
        ref_dtype, device = self._ref()
        pts = grid.points(dtype=dtype or ref_dtype, device=device)
        out = self.forward(pts)
        return out if out.dim() == grid.ndim + 2 else out.unsqueeze(0)

    def source_norm_points(self, target: Grid, source: Grid, dtype: torch.dtype | None = None) -> Tensor:
        """``T(x)`` for the voxels ``x`` of ``target``, in ``source``'s ``norm`` frame.

        ``(N, *target.shape, D)``: what ``grid_sample`` needs to pull a source (moving) image
        back onto ``target``. Subclasses with a cheaper route (linear maps, fields on
        ``target``) override it.
        """
        return source.transform_points(self.mapped_points(target, dtype), "world", "norm")

    def displacement(self, grid: Grid) -> Tensor:
        """``T(x) − x`` on ``grid``: ``(N, D, *grid.shape)`` in world mm, components x, y, z."""
        self.check_grid(grid)
        dtype, device = self._ref()
        pts = grid.points(dtype=dtype, device=device)
        return (self.mapped_points(grid) - pts).movedim(-1, 1)

    def inverse(self) -> "SpatialTransform":
        """The inverse transform (exact for linear and SVF; see subclasses)."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse")

    def jacobian_det(self, grid: Grid) -> Tensor:
        """det of the Jacobian of ``T`` on ``grid`` (world mm), ``(N, *grid.shape)``."""
        return _jacobian_det_field(self.displacement(grid), grid)

    def __matmul__(self, other: "SpatialTransform") -> "Compose":
        """``A @ B`` is ``Compose(A, B)``: apply ``B`` first."""
        return Compose(self, other)


class Identity(SpatialTransform):
    """``T(x) = x``."""

    def forward(self, points: Tensor) -> Tensor:
        self.check_points(points)
        return points

    def displacement(self, grid: Grid) -> Tensor:
        self.check_grid(grid)
        dtype, device = self._ref()
        return torch.zeros((1, grid.ndim, *grid.shape), dtype=dtype, device=device)

    def inverse(self) -> "Identity":
        return Identity(self.ndim)


class Compose(SpatialTransform):
    """``Compose(T1, …, Tn)(x) = T1(…Tn(x))``: the last listed is applied first (ITK order)."""

    def __init__(self, *transforms: SpatialTransform | Iterable[SpatialTransform]) -> None:
        flat: list[SpatialTransform] = []
        for t in transforms:
            if isinstance(t, Compose):
                flat.extend(t.transforms)
            elif isinstance(t, SpatialTransform):
                flat.append(t)
            else:
                flat.extend(Compose(*t).transforms)
        if not flat:
            raise GeometryError("Compose needs at least one transform")
        ndims = {t.ndim for t in flat}
        if len(ndims) != 1:
            raise GeometryError(f"cannot compose transforms of different dimensions {sorted(ndims)}")
        super().__init__(flat[0].ndim)
        self.transforms = nn.ModuleList(flat)

    def forward(self, points: Tensor) -> Tensor:
        for t in reversed(self.transforms):
            points = t(points)
        return points

    def mapped_points(self, grid: Grid, dtype: torch.dtype | None = None) -> Tensor:
        # the innermost transform may have a fast dense path on this grid
        pts = self.transforms[-1].mapped_points(grid, dtype)
        for t in reversed(self.transforms[:-1]):
            pts = t(pts)
        return pts

    def source_norm_points(self, target: Grid, source: Grid, dtype: torch.dtype | None = None) -> Tensor:
        # fast paths for the registration hot spots, through one matrix and no point list:
        # linear maps after one field on ``target`` (deformable stages), or linear maps only
        # (a linear stage's closure)
        *outer, inner = self.transforms
        from medreg.transforms.dense import DisplacementField
        from medreg.transforms.functional import affine_field_points
        from medreg.transforms.linear import LinearTransform

        field_inner = bool(outer) and isinstance(inner, DisplacementField) and inner.grid == target
        if not (all(isinstance(t, LinearTransform) for t in outer)
                and (field_inner or isinstance(inner, LinearTransform))):
            return super().source_norm_points(target, source, dtype)
        if field_inner:
            chain, ref = outer, inner.field
            dtype = dtype or ref.dtype
        else:
            chain, ref = self.transforms, self.transforms[0].translation
            # as the general path: the parameters' precision wins (float64 parameters give
            # float64 coordinates, which a line search such as L-BFGS's needs)
            dtype = ref.dtype if dtype is None else torch.promote_types(dtype, ref.dtype)
        # the matrix product in float64 (rounded once to ``dtype``), so that grids and
        # transforms that cancel (an integer shift) stay exact in float32 coordinates
        wide = torch.promote_types(dtype, torch.float64)
        m = source.matrix("world", "norm", dtype=wide, device=ref.device)
        for t in chain:
            m = m @ t.matrix().to(wide)
        d = self.ndim
        full = m @ target.matrix("index", "world", dtype=wide, device=ref.device)
        field = inner.field.to(dtype) if field_inner else None
        return affine_field_points(full.to(dtype), m[:d, :d].to(dtype), field, target.shape)

    def inverse(self) -> "Compose":
        return Compose(*[t.inverse() for t in reversed(self.transforms)])

    @property
    def inverse_residual(self) -> float | None:
        """The largest fixed-point residual (mm) of the parts that are numerical inverses
        (:meth:`DisplacementField.inverse`), ``None`` when no part is one. Near the image border,
        where the inverse needs points outside the field's grid, it can be several mm while the
        interior is accurate to a fraction of a voxel."""
        values = [v for t in self.transforms if (v := getattr(t, "inverse_residual", None)) is not None]
        return max(values) if values else None


def jacobian_det(transform: SpatialTransform, grid: Grid) -> Tensor:
    """Jacobian determinant of any transform on ``grid`` (central differences, world mm)."""
    return transform.jacobian_det(grid)
