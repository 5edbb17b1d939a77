r"""Similarity metrics as ``nn.Module``\ s: thin wrappers that store options.

Every similarity module is called the same way::

    loss = LNCC(window=9)
    value = loss(fixed, warped, fixed_mask=None, moving_mask=None, spacing=None)

``fixed`` and ``warped`` are ``(N, C, *spatial)``; the masks are ``(N or 1, 1 or C, *spatial)``
weights on the fixed grid (the moving mask warped like the moving image) and are multiplied.
``spacing`` (``(x, y, z)`` mm, or a :class:`~medreg.core.Grid`) overrides the one given at
construction; it matters for windows in mm, MIND in mm and NGF. Lower is better; the value
ranges are those of :mod:`medreg.losses.functional`.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

from torch import Tensor, nn

from medreg.core.errors import InputError
from medreg.core.grid import Grid
from medreg.losses import functional as L

SpacingLike = Sequence[float] | float | Grid | None

__all__ = ["LNCC", "MI", "MIND", "NCC", "NGF", "NMI", "SSD", "SimilarityLoss"]


class SimilarityLoss(nn.Module):
    """Base class: ``forward(fixed, warped, fixed_mask=None, moving_mask=None, *, spacing)``.

    Args:
        reduction: ``"mean"`` (scalar), ``"sum"`` or ``"none"`` (``(N,)`` per sample).
        spacing: default voxel size ``(x, y, z)`` in mm (or a Grid) for metrics that use it.
    """

    #: what :class:`~medreg.losses.registry.WeightedSum` feeds this term
    kind: ClassVar[str] = "similarity"

    def __init__(self, reduction: str = "mean", spacing: SpacingLike = None) -> None:
        super().__init__()
        self.reduction = L.check_choice(reduction, "reduction", L.REDUCTIONS)
        self.spacing = spacing

    def forward(self, fixed: Tensor, warped: Tensor, fixed_mask: Tensor | None = None,
                moving_mask: Tensor | None = None, *, spacing: SpacingLike = None) -> Tensor:
        """Loss of ``warped`` against ``fixed`` over the voxels of both masks.

        Args:
            fixed: ``(N, C, *spatial)`` fixed image.
            warped: ``(N, C, *spatial)`` moving image resampled on the fixed grid.
            fixed_mask: ``(N or 1, 1 or C, *spatial)`` weights on the fixed grid, or None.
            moving_mask: the moving mask resampled on the fixed grid, or None.
            spacing: voxel size ``(x, y, z)`` in mm or a Grid (overrides the default).

        Returns:
            Scalar (or ``(N,)`` with ``reduction="none"``), lower is better.
        """
        mask = L.combine_masks(fixed_mask, moving_mask)
        return self.compute(fixed, warped, mask, self.spacing if spacing is None else spacing)

    def compute(self, fixed: Tensor, warped: Tensor, mask: Tensor | None,
                spacing: SpacingLike) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class SSD(SimilarityLoss):
    """Mean squared difference (:func:`~medreg.losses.functional.ssd`); range ``[0, ∞)``."""

    def compute(self, fixed, warped, mask, spacing):
        return L.ssd(fixed, warped, mask, reduction=self.reduction)


class NCC(SimilarityLoss):
    """Global normalised cross-correlation (:func:`~medreg.losses.functional.ncc`).

    Args:
        squared: use ``ncc²`` (range ``[−1, 0]``) instead of ``ncc`` (range ``[−1, 1]``).
        eps: floor of ``var(f)·var(w)``.
        reduction: see :class:`SimilarityLoss`.
    """

    def __init__(self, squared: bool = False, eps: float = 1e-12, reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.squared = bool(squared)
        self.eps = L._check_positive(eps, "eps", allow_zero=True)

    def compute(self, fixed, warped, mask, spacing):
        return L.ncc(fixed, warped, mask, squared=self.squared, eps=self.eps,
                     reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"squared={self.squared}, " + super().extra_repr()


class LNCC(SimilarityLoss):
    """Local normalised cross-correlation (:func:`~medreg.losses.functional.lncc`).

    Args:
        window: width (scalar or ``(x, y, z)``) in ``window_unit``.
        kernel: ``"box"`` or ``"gaussian"`` (``σ = window / √12``).
        window_unit: ``"voxel"`` or ``"mm"`` (needs ``spacing`` here or at call time).
        squared: average ``cc²`` (default, range ``[−1, 0]``) or ``cc`` (``[−1, 1]``).
        eps: variance-product guard in standardised units.
        spacing: default voxel size for mm windows.
        reduction: see :class:`SimilarityLoss`.
    """

    def __init__(self, window: float | Sequence[float] = 9, kernel: str = "box",
                 window_unit: str = "voxel", squared: bool = True, eps: float = 1e-8,
                 spacing: SpacingLike = None, reduction: str = "mean") -> None:
        super().__init__(reduction, spacing)
        self.kernel = L.check_choice(kernel, "window kernel", L.LNCC_KERNELS)
        self.window_unit = L.check_choice(window_unit, "window unit", L.WINDOW_UNITS)
        self.window = window
        self.squared = bool(squared)
        self.eps = L._check_positive(eps, "eps", allow_zero=True)
        if self.window_unit == "voxel":  # validate early (mm windows need the spacing)
            L.window_kernels(window, 3 if not isinstance(window, Sequence) else len(window),
                             kernel=self.kernel)
        else:
            L.check_window_type(window)
            for w in ([window] if not isinstance(window, Sequence) else window):
                L._check_positive(w, "window")

    def compute(self, fixed, warped, mask, spacing):
        return L.lncc(fixed, warped, mask, window=self.window, kernel=self.kernel,
                      spacing=spacing, window_unit=self.window_unit, squared=self.squared,
                      eps=self.eps, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"window={self.window}, kernel={self.kernel!r}, "
                f"window_unit={self.window_unit!r}, squared={self.squared}, "
                + super().extra_repr())


class MI(SimilarityLoss):
    """Parzen-window mutual information (:func:`~medreg.losses.functional.mutual_information`).

    Args:
        bins: bins per image (B-spline: including 2 padding bins at each end).
        parzen: ``"bspline"`` (cubic) or ``"gaussian"``.
        sigma: Gaussian width in bins.
        value_range: fixed intensity range ``(low, high)``; None: each sample's min/max.
        fixed_range: the fixed image's range if it differs.
        reduction: see :class:`SimilarityLoss`.

    Returns ``−MI`` (nats) in ``[−log(bins), 0]``.
    """

    normalised: ClassVar[bool] = False

    def __init__(self, bins: int = 32, parzen: str = "bspline", sigma: float = 0.5,
                 value_range: tuple[float, float] | None = None,
                 fixed_range: tuple[float, float] | None = None,
                 reduction: str = "mean") -> None:
        super().__init__(reduction)
        self.parzen = L.check_choice(parzen, "Parzen window", L.PARZEN_WINDOWS)
        self.bins = L._check_bins(bins, self.parzen)
        self.sigma = L._check_positive(sigma, "sigma")
        self.value_range = L._value_range(value_range, "value_range")
        self.fixed_range = L._value_range(fixed_range, "fixed_range")

    def compute(self, fixed, warped, mask, spacing):
        return L.mutual_information(fixed, warped, mask, bins=self.bins, parzen=self.parzen,
                                    sigma=self.sigma, value_range=self.value_range,
                                    fixed_range=self.fixed_range, normalised=self.normalised,
                                    reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, parzen={self.parzen!r}, " + super().extra_repr()


class NMI(MI):
    """Normalised mutual information ``(H(F) + H(W)) / H(F, W)``, negated: ``[−2, −1]``."""

    normalised: ClassVar[bool] = True


class MIND(SimilarityLoss):
    """MIND-SSD: squared difference of MIND-SSC descriptors.

    See :func:`~medreg.losses.functional.mind_loss` and :func:`~medreg.losses.functional.mind_ssc`.

    Args:
        radius: patch half-width.
        dilation: neighbour distance.
        unit: ``"voxel"`` or ``"mm"`` (for ``radius`` and ``dilation``; mm needs a spacing).
        spacing: default voxel size for ``unit="mm"``.
        reduction: see :class:`SimilarityLoss`.

    Range ``[0, 1]``.
    """

    def __init__(self, radius: float = 2, dilation: float = 2, unit: str = "voxel",
                 spacing: SpacingLike = None, reduction: str = "mean") -> None:
        super().__init__(reduction, spacing)
        self.radius = L._check_positive(radius, "radius", allow_zero=True)
        self.dilation = L._check_positive(dilation, "dilation")
        self.unit = L.check_choice(unit, "unit", L.WINDOW_UNITS)

    def compute(self, fixed, warped, mask, spacing):
        if self.unit == "mm" and spacing is None:
            raise InputError("MIND with unit='mm' needs the voxel spacing")
        return L.mind_loss(fixed, warped, mask, radius=self.radius, dilation=self.dilation,
                           spacing=spacing if self.unit == "mm" else None,
                           reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"radius={self.radius:g}, dilation={self.dilation:g}, unit={self.unit!r}, "
                + super().extra_repr())


class NGF(SimilarityLoss):
    """Normalised gradient fields (:func:`~medreg.losses.functional.ngf`), range ``[0, 1]``.

    Args:
        eps: edge parameter in intensity per mm (> 0).
        spacing: default voxel size (derivatives in mm; None: 1 mm).
        reduction: see :class:`SimilarityLoss`.
    """

    def __init__(self, eps: float = 1e-2, spacing: SpacingLike = None,
                 reduction: str = "mean") -> None:
        super().__init__(reduction, spacing)
        self.eps = L._check_positive(eps, "eps")

    def compute(self, fixed, warped, mask, spacing):
        return L.ngf(fixed, warped, mask, eps=self.eps, spacing=spacing,
                     reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}, " + super().extra_repr()
