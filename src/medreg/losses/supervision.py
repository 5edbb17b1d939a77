r"""Supervision losses as ``nn.Module``\ s: labels (weak), landmarks and ground-truth fields.

* :class:`Dice`: ``loss(fixed_labels, warped_labels, mask=None)`` on one-hot maps
  ``(N, L, *spatial)`` (see :func:`~medreg.losses.functional.one_hot`); the moving one-hot
  map is warped with linear interpolation so that the loss is differentiable.
* :class:`TRE`: ``loss(points, target_points, mask=None)``, ``(..., P, D)`` world mm.
* :class:`EPE`: ``loss(displacement, target_displacement, mask=None, grid=None)``,
  ``(N, D, *spatial)`` world mm (``displacement`` may be a transform if ``grid`` is a Grid).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from torch import Tensor, nn

from medreg.core.grid import Grid
from medreg.losses import functional as L
from medreg.losses.regularisers import resolve_displacement

__all__ = ["Dice", "EPE", "TRE"]


class Dice(nn.Module):
    """Soft multi-label Dice loss ``1 − mean Dice`` (:func:`~medreg.losses.functional.soft_dice`).

    Args:
        labels: channel indices to score (default all; e.g. ``range(1, L)`` without background).
        eps: smoothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    kind: ClassVar[str] = "labels"

    def __init__(self, labels: Sequence[int] | None = None, eps: float = 1e-6,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.labels = None if labels is None else [int(i) for i in labels]
        self.eps = L._check_positive(eps, "eps", allow_zero=True)
        self.reduction = L.check_choice(reduction, "reduction", L.REDUCTIONS)

    def forward(self, fixed_labels: Tensor, warped_labels: Tensor,
                mask: Tensor | None = None) -> Tensor:
        """``(N, L, *spatial)`` one-hot fixed and warped moving labels → loss in ``[0, 1]``."""
        return L.soft_dice(fixed_labels, warped_labels, self.labels, mask, eps=self.eps,
                           reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"labels={self.labels}, reduction={self.reduction!r}"


class TRE(nn.Module):
    """Mean landmark distance in mm (:func:`~medreg.losses.functional.tre`).

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-point distances).
    """

    kind: ClassVar[str] = "points"

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = L.check_choice(reduction, "reduction", L.REDUCTIONS)

    def forward(self, points: Tensor, target_points: Tensor, mask: Tensor | None = None) -> Tensor:
        """``(..., P, D)`` mapped points and their targets (world mm) → distance in mm."""
        return L.tre(points, target_points, mask, reduction=self.reduction)


class EPE(nn.Module):
    """End-point error against a ground-truth displacement (:func:`~medreg.losses.functional.epe`).

    Args:
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    """

    kind: ClassVar[str] = "displacement"

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = L.check_choice(reduction, "reduction", L.REDUCTIONS)

    def forward(self, displacement: Any, target_displacement: Tensor, mask: Tensor | None = None,
                grid: Grid | None = None) -> Tensor:
        """Mean ``|u − u_gt|`` in mm; ``displacement`` may be a transform when ``grid`` is given."""
        disp = resolve_displacement(displacement, grid)
        return L.epe(disp, target_displacement, mask, reduction=self.reduction)
