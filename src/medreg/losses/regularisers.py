r"""Regularisers as ``nn.Module``\ s: thin wrappers that store options.

Every regulariser module is called the same way::

    reg = Bending()
    value = reg(displacement, grid_or_spacing)

``displacement`` is a ``(N, D, *spatial)`` field in world mm (components ``x, y, z``), or any
transform object with a ``displacement(grid)`` method returning one (then ``grid_or_spacing``
must be a :class:`~medreg.core.Grid`). ``grid_or_spacing`` is the Grid the field is sampled on
or its spacing ``(x, y, z)`` in mm (None: 1 mm). Values are means over voxels of energy
densities in mm units (see :mod:`medreg.losses.functional`), so a weight means the same at
every resolution.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from torch import Tensor, nn

from medreg.core.errors import InputError
from medreg.core.grid import Grid
from medreg.losses import functional as L

GridLike = Grid | Sequence[float] | float | None

__all__ = ["Bending", "Diffusion", "Elastic", "JacobianPenalty", "Regulariser",
           "TotalVariation", "resolve_displacement"]


def resolve_displacement(field: Any, grid_or_spacing: GridLike) -> Tensor:
    """A displacement tensor from a tensor or a transform with ``displacement(grid)``.

    Args:
        field: ``(N, D, *spatial)`` world-mm tensor, or an object with a ``displacement(grid)``
            method (e.g. a :class:`medreg.transforms.SpatialTransform`).
        grid_or_spacing: a Grid (required for a transform) or a spacing.

    Raises:
        InputError: for a transform without a Grid, or an unsupported object.
    """
    if isinstance(field, Tensor):
        return field
    method = getattr(field, "displacement", None)
    if callable(method):
        if not isinstance(grid_or_spacing, Grid):
            raise InputError(f"evaluating the regulariser of a {type(field).__name__} needs the "
                             "Grid to sample its displacement on, not a spacing")
        return method(grid_or_spacing)
    raise InputError(f"expected a displacement tensor or a transform with displacement(grid), "
                     f"got {type(field).__name__}")


class Regulariser(nn.Module):
    """Base class: ``forward(displacement_or_transform, grid_or_spacing=None)``.

    Args:
        reduction: ``"mean"`` (scalar), ``"sum"`` or ``"none"`` (``(N,)`` per sample).
    """

    kind: ClassVar[str] = "regulariser"

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = L.check_choice(reduction, "reduction", L.REDUCTIONS)

    def forward(self, displacement: Any, grid_or_spacing: GridLike = None) -> Tensor:
        """Energy of a displacement field or of a transform sampled on a grid.

        Args:
            displacement: ``(N, D, *spatial)`` world-mm tensor or a transform.
            grid_or_spacing: the Grid, or the spacing ``(x, y, z)`` in mm (None: 1 mm).

        Returns:
            Scalar (or ``(N,)`` with ``reduction="none"``), ``≥ 0``.
        """
        disp = resolve_displacement(displacement, grid_or_spacing)
        return self.compute(disp, grid_or_spacing)

    def compute(self, disp: Tensor, grid_or_spacing: GridLike) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class Diffusion(Regulariser):
    """Diffusion energy ``mean |∇u|²_F`` (:func:`~medreg.losses.functional.diffusion`)."""

    def compute(self, disp, grid_or_spacing):
        return L.diffusion(disp, grid_or_spacing, reduction=self.reduction)


class Bending(Regulariser):
    """Bending energy ``mean Σ |∂²u|²`` in mm⁻² (:func:`~medreg.losses.functional.bending`)."""

    def compute(self, disp, grid_or_spacing):
        return L.bending(disp, grid_or_spacing, reduction=self.reduction)


class Elastic(Regulariser):
    """Linear elastic energy (:func:`~medreg.losses.functional.elastic`).

    Args:
        mu: shear modulus (Lamé μ), ≥ 0.
        lam: Lamé λ, ≥ 0.
        reduction: see :class:`Regulariser`.
    """

    def __init__(self, mu: float = 1.0, lam: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.mu = L._check_positive(mu, "mu", allow_zero=True)
        self.lam = L._check_positive(lam, "lam", allow_zero=True)

    def compute(self, disp, grid_or_spacing):
        return L.elastic(disp, grid_or_spacing, mu=self.mu, lam=self.lam,
                         reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"mu={self.mu:g}, lam={self.lam:g}, " + super().extra_repr()


class TotalVariation(Regulariser):
    """Total variation of the displacement (:func:`~medreg.losses.functional.total_variation`).

    Args:
        mode: ``"isotropic"`` or ``"l1"``.
        eps: smoothing of the isotropic norm.
        reduction: see :class:`Regulariser`.
    """

    def __init__(self, mode: str = "isotropic", eps: float = 1e-3, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.mode = L.check_choice(mode, "TV mode", L.TV_MODES)
        self.eps = L._check_positive(eps, "eps", allow_zero=True)

    def compute(self, disp, grid_or_spacing):
        return L.total_variation(disp, grid_or_spacing, mode=self.mode, eps=self.eps,
                                 reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, " + super().extra_repr()


class JacobianPenalty(Regulariser):
    """Penalty on ``det J`` (:func:`~medreg.losses.functional.jacobian_penalty`).

    Args:
        mode: ``"hinge"`` (``max(0, threshold − det J)²``, against folding) or ``"log2"``
            (``(log det J)²``, volume preservation).
        threshold: the hinge's volume ratio.
        eps: floor of ``det J`` in ``"log2"``.
        reduction: see :class:`Regulariser`.
    """

    def __init__(self, mode: str = "hinge", threshold: float = 0.1, eps: float = 1e-6,
                 reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.mode = L.check_choice(mode, "Jacobian penalty mode", L.JACOBIAN_MODES)
        try:
            self.threshold = float(threshold)
        except (TypeError, ValueError):
            raise InputError(f"threshold must be a number, got {threshold!r}") from None
        self.eps = L._check_positive(eps, "eps")

    def compute(self, disp, grid_or_spacing):
        return L.jacobian_penalty(disp, grid_or_spacing, mode=self.mode,
                                  threshold=self.threshold, eps=self.eps,
                                  reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, threshold={self.threshold:g}, " + super().extra_repr()
