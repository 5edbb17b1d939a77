r"""Functional core of the losses: similarity metrics, regularisers and supervision losses.

Every function here is stateless, dimension-generic (2D and 3D share one code path) and follows
the device and dtype of its inputs. The :mod:`nn.Module <medreg.losses.similarity>` wrappers
only store options and call these.

Convention:
    * **Images** are ``(N, C, *spatial)`` with ``spatial`` in tensor order ``(z, y, x)``;
      ``fixed`` and ``warped`` (the moving image resampled on the fixed grid) have the same
      shape. Multi-channel images are compared channel by channel and the channel values
      averaged.
    * **Vector fields** (displacements) are ``(N, D, *spatial)`` with components in
      ``(x, y, z)`` order, in **world millimetres**.
    * **Spacing** tuples are in ``(x, y, z)`` order (ITK), in mm; ``None`` means 1 mm.
    * **Masks** are ``(N or 1, 1 or C, *spatial)`` weights in ``[0, 1]`` (bool or float; soft
      masks are allowed and are not differentiated). A fixed and a moving mask are combined by
      their product (:func:`combine_masks`). A statistic is computed *over the masked voxels*
      (a weighted mean), never masked first and then averaged over all voxels. Metrics whose
      value at a voxel depends on a neighbourhood (LNCC's window, MIND's patches, NGF's
      gradients) use unmasked neighbours for their local features, except LNCC, whose local
      statistics are mask-weighted too. A sample whose mask is empty contributes 0.
    * **Sign**: every function returns a loss, *lower is better*; its range is documented.
    * **Reduction**: ``"mean"`` (default) averages the per-sample values over the batch,
      ``"sum"`` sums them, ``"none"`` returns the ``(N,)`` per-sample values.
    * **Regularisers** are means over voxels of an energy density in mm units (derivatives of
      mm displacements with respect to mm positions), so the same weight means the same at
      every resolution and for anisotropic voxels. Derivatives are taken along the grid's index
      axes and scaled by the spacing. For a grid with a rotated direction matrix this is exact
      for the energies that are invariant under rotations of the derivative frame (diffusion,
      bending, isotropic TV: Frobenius norms of derivatives), so spacing alone suffices for
      them. The elastic energy and the Jacobian determinant mix components and derivative
      directions: give them a :class:`~medreg.core.Grid` to honour its direction.
      Stencils: diffusion and TV use forward differences, bending the compact 3-point second
      and 2×2 mixed differences (none of them is blind to a checkerboard); elastic and the
      Jacobian use the central differences of :func:`medreg.core.functional.spatial_gradient`.

Performance:
    LNCC, MI, MIND and the diffusion and bending energies run through hand-written backward
    passes (:mod:`medreg.losses._kernels`) that keep memory at a few image-sized tensors; they
    give exact first derivatives (checked with ``gradcheck``) but no double backward.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.functional import gaussian_kernel1d, jacobian_det, spatial_gradient
from medreg.core.grid import Grid
from medreg.losses import _kernels as K

__all__ = [
    "bending", "check_choice", "combine_masks", "diffusion", "elastic", "epe", "jacobian_penalty",
    "joint_histogram", "lncc", "masked_mean", "mind_loss", "mind_ssc", "mutual_information",
    "ncc", "ngf", "normalised_mutual_information", "one_hot", "reduce_batch", "soft_dice", "ssd",
    "total_variation", "tre", "window_kernels",
]

REDUCTIONS = ("mean", "sum", "none")
LNCC_KERNELS = ("box", "gaussian")
WINDOW_UNITS = ("voxel", "mm")
PARZEN_WINDOWS = ("bspline", "gaussian")
JACOBIAN_MODES = ("hinge", "log2")
TV_MODES = ("isotropic", "l1")


# =========================================================================== shared helpers
def check_choice(value: str, name: str, choices: Sequence[str]) -> str:
    """Validate a string option (case-insensitive) and return it lower-cased.

    Raises:
        InputError: (a ``ValueError``) naming the valid choices.
    """
    key = str(value).strip().lower()
    if key not in choices:
        raise InputError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return key


def _check_positive(value: float, name: str, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise InputError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def _spacing(spacing: Sequence[float] | float | Grid | None, d: int) -> tuple[float, ...]:
    """Spacing ``(x, y, z)`` in mm from a sequence, a scalar, a Grid or None (1 mm)."""
    if spacing is None:
        return (1.0,) * d
    if isinstance(spacing, Grid):
        spacing = spacing.spacing
    if isinstance(spacing, (int, float)):
        out = (float(spacing),) * d
    else:
        out = tuple(float(s) for s in spacing)
    if len(out) != d:
        raise InputError(f"spacing has {len(out)} values but the data has {d} spatial dimensions "
                         "(give it in (x, y, z) order)")
    if any(not (s > 0 and math.isfinite(s)) for s in out):
        raise InputError(f"spacing must be positive and finite, got {out}")
    return out


def _check_image(x: Tensor, name: str) -> int:
    if not isinstance(x, Tensor):
        raise InputError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() not in (4, 5):
        raise InputError(f"{name} must be (N, C, *spatial) with 2 or 3 spatial dimensions, got "
                         f"shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x.dim() - 2


def _check_pair(fixed: Tensor, warped: Tensor) -> int:
    d = _check_image(fixed, "fixed")
    _check_image(warped, "warped")
    if fixed.shape != warped.shape:
        raise InputError(f"fixed and warped images differ in shape: {tuple(fixed.shape)} vs "
                         f"{tuple(warped.shape)} (resample the moving image on the fixed grid)")
    return d


def _check_mask(mask: Tensor | None, ref: Tensor, name: str = "mask") -> Tensor | None:
    """Validate a mask against ``ref`` ``(N, C, *spatial)`` and cast it to ``ref``'s dtype."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise InputError(f"{name} must be a tensor or None, got {type(mask).__name__}")
    if mask.dim() == ref.dim() - 1:  # (N, *spatial): add the channel axis
        mask = mask.unsqueeze(1)
    ok = (mask.dim() == ref.dim() and mask.shape[2:] == ref.shape[2:]
          and mask.shape[0] in (1, ref.shape[0]) and mask.shape[1] in (1, ref.shape[1]))
    if not ok:
        raise InputError(f"{name} of shape {tuple(mask.shape)} does not fit data of shape "
                         f"{tuple(ref.shape)}: expected (N or 1, 1 or C, "
                         f"{', '.join(map(str, ref.shape[2:]))})")
    return mask.detach().to(dtype=ref.dtype, device=ref.device)


def combine_masks(fixed_mask: Tensor | None, moving_mask: Tensor | None) -> Tensor | None:
    """Product of the fixed and the (warped) moving mask; None where both are None.

    Args:
        fixed_mask: ``(N or 1, 1 or C, *spatial)`` weights on the fixed grid, or None.
        moving_mask: the moving image's mask resampled on the fixed grid, same shape rules.

    Returns:
        Their (broadcast) product as a floating tensor, or whichever is given.
    """
    if fixed_mask is None:
        return moving_mask
    if moving_mask is None:
        return fixed_mask
    a = fixed_mask if fixed_mask.is_floating_point() else fixed_mask.float()
    b = moving_mask if moving_mask.is_floating_point() else moving_mask.float()
    return a * b


def reduce_batch(per_sample: Tensor, reduction: str = "mean") -> Tensor:
    """Reduce ``(N,)`` per-sample losses: ``"mean"``, ``"sum"`` or ``"none"`` (unchanged)."""
    reduction = check_choice(reduction, "reduction", REDUCTIONS)
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def masked_mean(values: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """The one reduction of the package: per-sample weighted mean, then a batch reduction.

    Args:
        values: ``(N, ...)`` per-element loss densities (for images ``(N, C, *spatial)``).
        mask: weights broadcastable to ``values`` (``(N or 1, ...)``), or None for a plain mean.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (see :func:`reduce_batch`).

    Returns:
        Scalar, or ``(N,)`` with ``reduction="none"``. A sample with an empty mask gives 0.
    """
    dims = tuple(range(1, values.dim()))
    if mask is None:
        per = values.mean(dims) if dims else values
    else:
        m = torch.broadcast_to(mask.to(values.dtype), values.shape)
        per = (values * m).sum(dims) / m.sum(dims).clamp_min(K.TINY)
    return reduce_batch(per, reduction)


def _fold(x: Tensor) -> Tensor:
    """``(N, C, *spatial)`` → ``(N·C, 1, *spatial)``."""
    return x.reshape(x.shape[0] * x.shape[1], 1, *x.shape[2:])


def _fold_mask(mask: Tensor | None, ref: Tensor) -> Tensor | None:
    if mask is None:
        return None
    return _fold(torch.broadcast_to(mask, ref.shape).contiguous())


def _standardise(x: Tensor, mask: Tensor | None) -> Tensor:
    """Per-row ``(x − mean) / std`` over (masked) voxels of ``(B, 1, *spatial)``, differentiable."""
    dims = tuple(range(1, x.dim()))
    if mask is None:
        mu = x.mean(dims, keepdim=True)
        var = (x - mu).square().mean(dims, keepdim=True)
    else:
        wsum = mask.sum(dims, keepdim=True).clamp_min(K.TINY)
        mu = (x * mask).sum(dims, keepdim=True) / wsum
        var = ((x - mu).square() * mask).sum(dims, keepdim=True) / wsum
    return (x - mu) * torch.rsqrt(var + 1e-12)


# =========================================================================== similarity
def ssd(fixed: Tensor, warped: Tensor, mask: Tensor | None = None, *,
        reduction: str = "mean") -> Tensor:
    """Sum of squared differences as a mean (MSE) over the masked voxels.

    Args:
        fixed: ``(N, C, *spatial)`` fixed image.
        warped: ``(N, C, *spatial)`` moving image resampled on the fixed grid.
        mask: ``(N or 1, 1 or C, *spatial)`` weights, or None.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``mean((fixed − warped)²)`` in squared intensity units; range ``[0, ∞)``, 0 is perfect.
    """
    _check_pair(fixed, warped)
    mask = _check_mask(mask, fixed)
    return masked_mean((fixed - warped).square(), mask, reduction)


def ncc(fixed: Tensor, warped: Tensor, mask: Tensor | None = None, *, squared: bool = False,
        eps: float = 1e-12, reduction: str = "mean") -> Tensor:
    """Global normalised cross-correlation, negated.

    ``ncc = cov(f, w) / sqrt(max(var(f)·var(w), eps))`` over the masked voxels of each sample
    and channel (weighted moments, computed from centred data).

    Args:
        fixed: ``(N, C, *spatial)`` fixed image.
        warped: ``(N, C, *spatial)`` warped moving image.
        mask: ``(N or 1, 1 or C, *spatial)`` weights, or None.
        squared: use ``ncc²`` (invariant to the sign of the contrast).
        eps: floor of ``var(f)·var(w)`` (intensity⁴) so that a constant image gives 0, not 0/0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``−ncc`` in ``[−1, 1]`` (−1: ``warped = a·fixed + b`` with ``a > 0``), or ``−ncc²`` in
        ``[−1, 0]`` when ``squared``.
    """
    _check_pair(fixed, warped)
    mask = _check_mask(mask, fixed)
    eps = _check_positive(eps, "eps", allow_zero=True)
    dims = tuple(range(2, fixed.dim()))
    if mask is None:
        fc = fixed - fixed.mean(dims, keepdim=True)
        wc = warped - warped.mean(dims, keepdim=True)
        cov, vf, vw = (fc * wc).mean(dims), fc.square().mean(dims), wc.square().mean(dims)
    else:
        m = torch.broadcast_to(mask, fixed.shape)
        wsum = m.sum(dims, keepdim=True).clamp_min(K.TINY)
        fc = fixed - (fixed * m).sum(dims, keepdim=True) / wsum
        wc = warped - (warped * m).sum(dims, keepdim=True) / wsum
        wsum = wsum.reshape(wsum.shape[:2])
        cov = (fc * wc * m).sum(dims) / wsum
        vf = (fc.square() * m).sum(dims) / wsum
        vw = (wc.square() * m).sum(dims) / wsum
    r = cov * torch.rsqrt((vf * vw).clamp_min(max(eps, 1e-300)))
    value = -(r * r if squared else r)  # (N, C)
    return reduce_batch(value.mean(1), reduction)


def check_window_type(window: object) -> None:
    """An ``InputError`` unless ``window`` is a number or a sequence of numbers (a string is a
    sequence too: ``"9"`` would be one width)."""
    if isinstance(window, (str, bytes)) or (not isinstance(window, numbers.Real) and not (
            isinstance(window, Sequence) and all(isinstance(w, numbers.Real) for w in window))):
        raise InputError(f"window must be a number or one number per axis, got {window!r}")


def window_kernels(window: float | Sequence[float], d: int, *, kernel: str = "box",
                   spacing: Sequence[float] | float | Grid | None = None,
                   window_unit: str = "voxel", dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> list[Tensor]:
    """Normalised 1D window kernels of a local similarity, one per axis in ``(x, y, z)`` order.

    Args:
        window: window width per axis (scalar or ``(x, y, z)``), in voxels or mm.
        d: number of spatial dimensions.
        kernel: ``"box"``: a box of ``window`` voxels (odd; in mm it is rounded to the nearest
            odd number of voxels per axis); ``"gaussian"``: a Gaussian whose standard deviation
            equals that of the box of the same width, ``σ = window / √12``, truncated at 3σ.
        spacing: voxel size ``(x, y, z)`` in mm; needed when ``window_unit="mm"``.
        window_unit: ``"voxel"`` or ``"mm"``.
        dtype: kernel dtype.
        device: kernel device.

    Returns:
        ``d`` odd-length symmetric kernels summing to 1.

    Raises:
        InputError: on a bad kernel or unit, a non-positive window, an even box window in
            voxels, or mm without spacing.
    """
    kernel = check_choice(kernel, "window kernel", LNCC_KERNELS)
    window_unit = check_choice(window_unit, "window unit", WINDOW_UNITS)
    check_window_type(window)
    widths = [float(window)] * d if isinstance(window, numbers.Real) else [float(w) for w in window]
    if len(widths) != d:
        raise InputError(f"window has {len(widths)} values for {d} spatial dimensions")
    for w in widths:
        _check_positive(w, "window")
    if window_unit == "mm":
        if spacing is None:
            raise InputError("window_unit='mm' needs the voxel spacing (spacing=...)")
        sp = _spacing(spacing, d)
        widths = [w / s for w, s in zip(widths, sp)]
    out = []
    for w in widths:
        if kernel == "box":
            if window_unit == "voxel" and (w != int(w) or int(w) % 2 == 0):
                raise InputError(f"a box window in voxels must be an odd integer, got {w:g}")
            n = max(1, 2 * int(math.floor((w - 1) / 2 + 0.5)) + 1)
            out.append(torch.full((n,), 1.0 / n, dtype=dtype, device=device))
        else:
            sigma = w / math.sqrt(12.0)
            out.append(gaussian_kernel1d(sigma, 3.0, dtype=dtype, device=device))
    return out


def lncc(fixed: Tensor, warped: Tensor, mask: Tensor | None = None, *,
         window: float | Sequence[float] = 9, kernel: str = "box",
         spacing: Sequence[float] | float | Grid | None = None, window_unit: str = "voxel",
         squared: bool = True, eps: float = 1e-8, reduction: str = "mean") -> Tensor:
    """Local normalised cross-correlation (LNCC), negated and averaged over the masked voxels.

    At each voxel ``x`` the correlation of ``fixed`` and ``warped`` over a window centred at
    ``x`` is ``cc = cov / sqrt(var_f·var_w + eps)`` with mask-weighted local moments; windows
    are truncated at the image border (only voxels inside the image count). The work is a
    fixed number of separable filter passes (5 or 6 fields forward, 3 per input that needs a
    gradient backward), each linear in the window's width along its axis (not cubic), on
    channels-last tensors; memory stays at about a dozen image-sized tensors.

    Each image is first standardised (zero mean, unit variance over the masked voxels), which
    leaves ``cc`` unchanged but makes ``eps`` relative and avoids float32 cancellation.

    Args:
        fixed: ``(N, C, *spatial)`` fixed image.
        warped: ``(N, C, *spatial)`` warped moving image.
        mask: ``(N or 1, 1 or C, *spatial)`` weights, or None. With a mask the local moments
            are weighted by it too, so masked-out voxels have no influence at all.
        window: window width (scalar or per axis ``(x, y, z)``), see :func:`window_kernels`.
        kernel: ``"box"`` or ``"gaussian"``.
        spacing: voxel size ``(x, y, z)`` in mm (needed for ``window_unit="mm"``).
        window_unit: ``"voxel"`` or ``"mm"``.
        squared: average ``cc²`` (default, as VoxelMorph, MONAI and ANTs' CC; invariant to the
            sign of the contrast) or the signed ``cc``.
        eps: added to ``var_f·var_w`` in standardised units (voxels whose windows are flat in
            either image contribute ≈ 0); must be > 0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``−mean(cc²)`` in ``[−1, 0]`` (or ``−mean(cc)`` in ``[−1, 1]``); −1 is perfect.
    """
    d = _check_pair(fixed, warped)
    mask = _check_mask(mask, fixed)
    eps = _check_positive(eps, "lncc eps (a window flat in both images would give 0/0)")
    kernels = window_kernels(window, d, kernel=kernel, spacing=spacing, window_unit=window_unit,
                             dtype=fixed.dtype, device=fixed.device)
    f, w = _fold(fixed), _fold(warped)
    m = _fold_mask(mask, fixed)
    f, w = _standardise(f, m), _standardise(w, m)
    cc = K.LocalCorrelation.apply(f, w, m, kernels, eps, bool(squared))
    return masked_mean(-cc.reshape(fixed.shape), mask, reduction)


def _bin_coordinates(x: Tensor, mask: Tensor | None, bins: int, parzen: str,
                     value_range: tuple[float, float] | None) -> Tensor:
    """Continuous bin coordinates of ``(B, V)`` intensities (differentiable, range included).

    B-spline: ``bins`` includes 2 padding bins at each end (as ITK's Mattes MI), intensities
    ``[lo, hi]`` map to ``[2, bins − 3]``. Gaussian: bin centres ``0..bins−1`` span ``[lo, hi]``.
    """
    if value_range is None:
        if mask is None:
            lo = x.amin(1, keepdim=True)
            hi = x.amax(1, keepdim=True)
        else:
            inside = mask > 0
            lo = torch.where(inside, x, torch.full_like(x, math.inf)).amin(1, keepdim=True)
            hi = torch.where(inside, x, torch.full_like(x, -math.inf)).amax(1, keepdim=True)
            empty = ~inside.any(1, keepdim=True)
            lo = torch.where(empty, torch.zeros_like(lo), lo)
            hi = torch.where(empty, torch.ones_like(hi), hi)
    else:
        lo = torch.as_tensor(value_range[0], dtype=x.dtype, device=x.device)
        hi = torch.as_tensor(value_range[1], dtype=x.dtype, device=x.device)
    scale = (hi - lo).clamp_min(1e-12)
    if parzen == "bspline":
        return (2.0 + (x - lo) / scale * (bins - 5)).clamp(2.0, bins - 3.0)
    return ((x - lo) / scale * (bins - 1)).clamp(0.0, bins - 1.0)


def _value_range(value_range, name: str) -> tuple[float, float] | None:
    if value_range is None:
        return None
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be None or (low, high), got {value_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise InputError(f"{name} must be finite with high > low, got {value_range!r}")
    return lo, hi


def _check_bins(bins: int, parzen: str) -> int:
    least = 6 if parzen == "bspline" else 2
    if int(bins) != bins or bins < least:
        raise InputError(f"bins must be an integer >= {least} for the {parzen} Parzen window, "
                         f"got {bins!r}")
    return int(bins)


def joint_histogram(fixed: Tensor, warped: Tensor, mask: Tensor | None = None, *, bins: int = 32,
                    parzen: str = "bspline", sigma: float = 0.5,
                    value_range: tuple[float, float] | None = None,
                    fixed_range: tuple[float, float] | None = None) -> Tensor:
    """Normalised Parzen-window joint histogram, ``(N·C, bins, bins)`` (rows: fixed bins).

    Args:
        fixed: ``(N, C, *spatial)``.
        warped: ``(N, C, *spatial)``.
        mask: ``(N or 1, 1 or C, *spatial)`` weights, or None.
        bins: number of bins per image. For ``"bspline"`` it includes 2 padding bins at each
            end (ITK's Mattes layout: the intensity range covers ``bins − 5`` bin widths).
        parzen: ``"bspline"`` (cubic B-spline on both images, 4 bins per sample) or
            ``"gaussian"`` (bin centres spread evenly over the range; rows normalised).
        sigma: Gaussian standard deviation in bins (ignored for ``"bspline"``).
        value_range: intensity range ``(low, high)`` of ``warped`` (and of ``fixed`` unless
            ``fixed_range`` is given); None uses each sample's masked min and max.
            Intensities outside are clamped.
        fixed_range: intensity range of ``fixed`` when it differs from ``value_range``.

    Returns:
        ``(N·C, bins, bins)`` probabilities summing to 1 (differentiable w.r.t. both images),
        in the images' dtype (accumulated in float64).
    """
    return _joint_histogram(fixed, warped, mask, bins=bins, parzen=parzen, sigma=sigma,
                            value_range=value_range, fixed_range=fixed_range).to(fixed.dtype)


def _joint_histogram(fixed: Tensor, warped: Tensor, mask: Tensor | None, *, bins: int,
                     parzen: str, sigma: float, value_range, fixed_range) -> Tensor:
    """:func:`joint_histogram` in float64 (for float32 inputs)."""
    parzen = check_choice(parzen, "Parzen window", PARZEN_WINDOWS)
    bins = _check_bins(bins, parzen)
    sigma = _check_positive(sigma, "sigma")
    vr = _value_range(value_range, "value_range")
    fr = _value_range(fixed_range, "fixed_range") if fixed_range is not None else vr
    _check_pair(fixed, warped)
    mask = _check_mask(mask, fixed)
    f = fixed.reshape(fixed.shape[0] * fixed.shape[1], -1)
    w = warped.reshape(f.shape)
    m = None if mask is None else torch.broadcast_to(mask, fixed.shape).reshape(f.shape)
    tf = _bin_coordinates(f, m, bins, parzen, fr)
    tw = _bin_coordinates(w, m, bins, parzen, vr)
    hist = K.JointHistogram.apply(tf, tw, m, bins, parzen, sigma)
    return hist / hist.sum((1, 2), keepdim=True).clamp_min(K.TINY)


def mutual_information(fixed: Tensor, warped: Tensor, mask: Tensor | None = None, *,
                       bins: int = 32, parzen: str = "bspline", sigma: float = 0.5,
                       value_range: tuple[float, float] | None = None,
                       fixed_range: tuple[float, float] | None = None, normalised: bool = False,
                       reduction: str = "mean") -> Tensor:
    """Mutual information from a Parzen-window joint histogram (Mattes-style), negated.

    ``MI = H(F) + H(W) − H(F, W)`` (nats) from :func:`joint_histogram`; ``NMI = (H(F) + H(W)) /
    H(F, W)`` (Studholme) with ``normalised=True``. Differentiable w.r.t. both images,
    including through the data-derived intensity range. The joint histogram is accumulated in
    chunks of voxels (memory ``O(chunk × bins)``) with a hand-written backward pass.

    Args:
        fixed: ``(N, C, *spatial)`` fixed image.
        warped: ``(N, C, *spatial)`` warped moving image.
        mask: ``(N or 1, 1 or C, *spatial)`` weights, or None.
        bins: bins per image (see :func:`joint_histogram`).
        parzen: ``"bspline"`` (default) or ``"gaussian"``.
        sigma: Gaussian Parzen width in bins (``"gaussian"`` only).
        value_range: intensity range (see :func:`joint_histogram`); None: masked min/max.
        fixed_range: intensity range of ``fixed`` if different.
        normalised: return NMI instead of MI.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``−MI`` in ``[−log(bins), 0]`` (``−H`` for an image against itself when its levels are
        ≥ 4 bins apart), or ``−NMI`` in ``[−2, −1]`` (−2 for identical images under hard
        binning, e.g. a narrow Gaussian window).
    """
    hist = _joint_histogram(fixed, warped, mask, bins=bins, parzen=parzen, sigma=sigma,
                            value_range=value_range, fixed_range=fixed_range)
    hf, hw, hfw = K.entropy_terms(hist)  # in float64 for float32 images
    if normalised:
        value = (hf + hw) / hfw.clamp_min(1e-12)
    else:
        value = hf + hw - hfw
    per = -value.reshape(fixed.shape[0], fixed.shape[1]).mean(1).to(fixed.dtype)
    return reduce_batch(per, reduction)


def normalised_mutual_information(fixed: Tensor, warped: Tensor, mask: Tensor | None = None,
                                  **kwargs) -> Tensor:
    """:func:`mutual_information` with ``normalised=True``: ``−NMI`` in ``[−2, −1]``."""
    return mutual_information(fixed, warped, mask, normalised=True, **kwargs)


def _mind_offsets(d: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """The self-similarity-context pairs: neighbours ``(axis, sign)`` at squared distance 2.

    3D: the 12 edges between the 6 face neighbours; 2D: the 4 between the 4 edge neighbours.
    """
    pairs = []
    for i in range(d):
        for j in range(i + 1, d):
            for si in (1, -1):
                for sj in (1, -1):
                    pairs.append(((i, si), (j, sj)))
    return pairs


def _voxels(value: float, sp: Sequence[float] | None, d: int, least: int) -> list[int]:
    """Per tensor axis voxel counts from a voxel (``sp`` None) or mm value."""
    if sp is None:
        return [max(least, int(round(value)))] * d
    return [max(least, int(round(value / s))) for s in reversed(sp)]


def mind_ssc(image: Tensor, radius: float = 2, dilation: float = 2,
             spacing: Sequence[float] | float | Grid | None = None) -> Tensor:
    """MIND-SSC descriptors (modality independent neighbourhood descriptor, self-similarity
    context; Heinrich et al., MICCAI 2013).

    For every pair ``(p, q)`` of face neighbours at distance ``√2`` (12 in 3D, 4 in 2D), scaled
    by ``dilation``, the patch distance ``D_pq(x)`` is the box-filtered (half-width
    ``radius``) squared difference ``(I(x + p) − I(x + q))²``. Then ``D − min_pq D`` is divided
    by its mean over the pairs ``V(x)`` (clamped to ``[10⁻³, 10³]`` × its image mean) and
    ``exp(−·)`` taken. The image is extended by replicating its border and the box windows are
    truncated one dilation beyond it. The descriptor at ``x`` depends on the image within
    ``radius + 2·dilation`` voxels of ``x`` (and on the image-wide mean of ``V`` only through
    the clamp). The squared differences come in pairs that are shifted copies of each other,
    so only half of them (6 in 3D) are computed and filtered.

    Args:
        image: ``(N, C, *spatial)``; channels are described separately.
        radius: patch half-width (voxels, or mm when ``spacing`` is given; rounded per axis).
        dilation: neighbour distance (voxels, or mm when ``spacing`` is given; ≥ 1 voxel).
        spacing: voxel size ``(x, y, z)`` in mm; when given, ``radius`` and ``dilation`` are mm.

    Returns:
        ``(N, C·P, *spatial)`` descriptors in ``(0, 1]`` (``P`` = 12 in 3D, 4 in 2D; the
        channel's ``P`` entries are consecutive), invariant to affine intensity changes
        ``a·I + b`` (``a ≠ 0``).
    """
    d = _check_image(image, "image")
    _check_positive(radius, "radius", allow_zero=True)
    _check_positive(dilation, "dilation")
    sp = None if spacing is None else _spacing(spacing, d)
    dil = _voxels(dilation, sp, d, 1)  # tensor order
    rad = _voxels(radius, sp, d, 0)
    x = _fold(image)
    shape = x.shape[2:]
    # the image replicate-padded by twice the dilation; "ext" is the domain grown by one dilation
    pads: list[int] = []
    for axis in reversed(range(d)):
        pads += [2 * dil[axis], 2 * dil[axis]]
    xp = F.pad(x, pads, mode="replicate")

    def window(src: Tensor, offset: Sequence[int], size: Sequence[int]) -> Tensor:
        out = src
        for a in range(d):
            out = out.narrow(2 + a, dil[a] + offset[a], size[a])
        return out

    ext = [n + 2 * g for n, g in zip(shape, dil)]
    # (I(x+p) − I(x+q))² = E_u(x + a) with E_u(y) = (I(y) − I(y+u))², u = ±(q − p): only
    # 2 distinct u per axis pair, so half as many squared differences are filtered
    unique: dict[tuple[int, ...], int] = {}
    taps: list[tuple[int, tuple[int, ...]]] = []
    for (i, si), (j, sj) in _mind_offsets(d):
        p = [0] * d
        q = [0] * d
        p[i], q[j] = si * dil[i], sj * dil[j]
        v = tuple(b - a for a, b in zip(p, q))
        u, at = (v, p) if sj > 0 else (tuple(-c for c in v), q)
        taps.append((unique.setdefault(u, len(unique)), tuple(at)))
    zero = [0] * d
    sq = torch.cat([(window(xp, zero, ext) - window(xp, u, ext)).square() for u in unique], 1)
    box = [torch.full((2 * r + 1,), 1.0 / (2 * r + 1), dtype=x.dtype, device=x.device)
           for r in reversed(rad)]  # (x, y, z) order
    patch = K.LocalMean.apply(sq, box)
    del sq
    taps_abs = tuple((k, tuple(g + a for g, a in zip(dil, at))) for k, at in taps)
    dist = K.GatherWindows.apply(patch, taps_abs, tuple(shape))
    del patch
    desc = K.MindDescriptor.apply(dist, 1e-3, 1e3)
    n, c = image.shape[:2]
    return desc.reshape(n, c * desc.shape[1], *image.shape[2:])


def mind_loss(fixed: Tensor, warped: Tensor, mask: Tensor | None = None, *, radius: float = 2,
              dilation: float = 2, spacing: Sequence[float] | float | Grid | None = None,
              reduction: str = "mean") -> Tensor:
    """MIND-SSD: mean squared difference of the MIND-SSC descriptors of both images.

    Args:
        fixed: ``(N, C, *spatial)`` fixed image.
        warped: ``(N, C, *spatial)`` warped moving image.
        mask: ``(N or 1, 1 or C, *spatial)`` weights (on the reduction), or None.
        radius: see :func:`mind_ssc`.
        dilation: see :func:`mind_ssc`.
        spacing: see :func:`mind_ssc`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Mean over voxels and descriptor entries of ``(MIND_f − MIND_w)²``; range ``[0, 1]``,
        0 is perfect (e.g. ``warped = a·fixed + b``).
    """
    _check_pair(fixed, warped)
    mask = _check_mask(mask, fixed)
    df = mind_ssc(fixed, radius, dilation, spacing)
    dw = mind_ssc(warped, radius, dilation, spacing)
    if mask is not None and mask.shape[1] > 1:  # per-channel mask → per-descriptor entry
        mask = mask.repeat_interleave(df.shape[1] // fixed.shape[1], dim=1)
    return masked_mean((df - dw).square(), mask, reduction)


def ngf(fixed: Tensor, warped: Tensor, mask: Tensor | None = None, *, eps: float = 1e-2,
        spacing: Sequence[float] | float | Grid | None = None,
        reduction: str = "mean") -> Tensor:
    """Normalised gradient fields (Haber and Modersitzki, 2006).

    ``n = ∇I / sqrt(|∇I|² + eps²)`` for each image (central differences in mm), and the loss
    density is ``1 − (n_f · n_w)²``.

    Args:
        fixed: ``(N, C, *spatial)`` fixed image.
        warped: ``(N, C, *spatial)`` warped moving image.
        mask: ``(N or 1, 1 or C, *spatial)`` weights (on the reduction), or None.
        eps: the edge parameter, in intensity per mm: gradients much weaker than ``eps`` count
            as noise. Must be > 0.
        spacing: voxel size ``(x, y, z)`` in mm (None: 1).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Range ``[0, 1]``, lower is better. For identical images it is
        ``mean(1 − (|∇I|² / (|∇I|² + eps²))²)``, the least value any image with the same
        gradient magnitudes can reach, and it tends to 0 as ``eps → 0`` where ``∇I ≠ 0``
        (with ``eps > 0`` a sharper ``warped`` scores slightly lower still).
    """
    d = _check_pair(fixed, warped)
    mask = _check_mask(mask, fixed)
    eps = _check_positive(eps, "eps")
    sp = _spacing(spacing, d)
    gf = spatial_gradient(fixed, sp)
    gw = spatial_gradient(warped, sp)
    dot = (gf * gw).sum(2)
    e2 = eps * eps
    nf = gf.square().sum(2) + e2
    nw = gw.square().sum(2) + e2
    return masked_mean(1.0 - dot.square() / (nf * nw), mask, reduction)


# =========================================================================== regularisers
def _check_field(disp: Tensor, name: str = "displacement") -> int:
    if not isinstance(disp, Tensor):
        raise InputError(f"{name} must be a tensor, got {type(disp).__name__}")
    d = disp.dim() - 2
    if d not in (2, 3) or disp.shape[1] != d:
        raise InputError(f"{name} must be (N, D, *spatial) with D = 2 or 3 components, got "
                         f"shape {tuple(disp.shape)}")
    if not disp.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {disp.dtype}")
    return d


def _geometry(disp: Tensor, grid_or_spacing) -> tuple[tuple[float, ...], Grid | None]:
    """Spacing ``(x, y, z)`` and the Grid (if one was given) of a displacement field."""
    d = _check_field(disp)
    if isinstance(grid_or_spacing, Grid):
        if tuple(grid_or_spacing.shape) != tuple(disp.shape[2:]):
            raise InputError(f"displacement of spatial shape {tuple(disp.shape[2:])} is not "
                             f"sampled on the grid of shape {grid_or_spacing.shape}")
        return grid_or_spacing.spacing, grid_or_spacing
    return _spacing(grid_or_spacing, d), None


def _diff(u: Tensor, axis: int, h: float) -> Tensor:
    """Forward difference along tensor ``axis`` (a spatial axis index), divided by ``h``."""
    n = u.shape[axis]
    return (u.narrow(axis, 1, n - 1) - u.narrow(axis, 0, n - 1)) / h


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(1)


def diffusion(disp: Tensor, grid_or_spacing: Grid | Sequence[float] | float | None = None, *,
              reduction: str = "mean") -> Tensor:
    """Diffusion (membrane) energy: mean over voxels of ``|∇u|²_F = Σ_ij (∂u_i/∂x_j)²``.

    Forward differences, each derivative averaged over the voxels where it is defined.

    Args:
        disp: ``(N, D, *spatial)`` displacement in world mm, components ``(x, y, z)``.
        grid_or_spacing: a :class:`~medreg.core.Grid` or the spacing ``(x, y, z)`` in mm
            (None: 1 mm).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Dimensionless (mm/mm)², ``≥ 0``; 0 for any translation.
    """
    sp, _ = _geometry(disp, grid_or_spacing)
    d = disp.dim() - 2
    stencils, weights = [], []
    for comp in range(d):
        axis = d - 1 - comp  # spatial axis in tensor order
        stencils.append(_forward_stencil(d, axis, 1.0 / sp[comp]))
        weights.append(1.0)
    return reduce_batch(K.StencilEnergy.apply(disp, tuple(stencils), tuple(weights)), reduction)


def _unit(d: int, axis: int, k: int = 1) -> tuple[int, ...]:
    return tuple(k if a == axis else 0 for a in range(d))


def _forward_stencil(d: int, axis: int, scale: float) -> K.Stencil:
    """``(u[i+1] − u[i]) · scale`` along tensor spatial ``axis``."""
    return ((_unit(d, axis), scale), (_unit(d, axis, 0), -scale))


def bending(disp: Tensor, grid_or_spacing: Grid | Sequence[float] | float | None = None, *,
            reduction: str = "mean") -> Tensor:
    """Bending energy: mean over voxels of ``Σ_k Σ_ij (∂²u_k/∂x_i∂x_j)²`` (mixed terms twice).

    Compact stencils (``u[i+1] − 2u[i] + u[i−1]`` and the 2×2 mixed forward difference), each
    averaged over the voxels where it is defined. They are exact for quadratic fields, so an
    affine field gives 0 and ``u_k = ½ xᵀ H_k x`` gives ``Σ_k |H_k|²_F``.

    Args:
        disp: ``(N, D, *spatial)`` displacement in world mm, components ``(x, y, z)``.
        grid_or_spacing: a :class:`~medreg.core.Grid` or the spacing ``(x, y, z)`` in mm.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        In mm⁻², ``≥ 0``.
    """
    sp, _ = _geometry(disp, grid_or_spacing)
    d = disp.dim() - 2
    zero = _unit(d, 0, 0)
    stencils, weights = [], []
    for ci in range(d):
        ai = d - 1 - ci
        s2 = 1.0 / sp[ci] ** 2
        stencils.append(((_unit(d, ai, 2), s2), (_unit(d, ai, 1), -2.0 * s2), (zero, s2)))
        weights.append(1.0)
        for cj in range(ci + 1, d):
            aj = d - 1 - cj
            s11 = 1.0 / (sp[ci] * sp[cj])
            both = tuple(a + b for a, b in zip(_unit(d, ai), _unit(d, aj)))
            stencils.append(((both, s11), (_unit(d, ai), -s11), (_unit(d, aj), -s11),
                             (zero, s11)))
            weights.append(2.0)
    return reduce_batch(K.StencilEnergy.apply(disp, tuple(stencils), tuple(weights)), reduction)


def _grid_frame(disp: Tensor, grid: Grid | None) -> Tensor:
    """Components of ``disp`` in the grid's axis frame (``Dᵀ u``); unchanged for no/identity dir."""
    if grid is None or np.abs(grid.direction - np.eye(grid.ndim)).max() < 1e-12:
        return disp
    rot = torch.as_tensor(grid.direction.copy(), dtype=disp.dtype, device=disp.device)
    return torch.einsum("ji,nj...->ni...", rot, disp)


def elastic(disp: Tensor, grid_or_spacing: Grid | Sequence[float] | float | None = None, *,
            mu: float = 1.0, lam: float = 1.0, reduction: str = "mean") -> Tensor:
    """Linear elastic energy: mean over voxels of ``μ tr(ε²) + λ/2 tr(ε)²``.

    ``ε = ½(∇u + ∇uᵀ)`` is the infinitesimal strain (central differences, one-sided at the
    border, :func:`medreg.core.functional.spatial_gradient`). With a Grid, the components are
    first expressed in the grid's axis frame so that its direction matrix is honoured; with a
    spacing the grid is assumed axis-aligned.

    Args:
        disp: ``(N, D, *spatial)`` displacement in world mm, components ``(x, y, z)``.
        grid_or_spacing: a :class:`~medreg.core.Grid` or the spacing ``(x, y, z)`` in mm.
        mu: shear modulus (Lamé μ), ≥ 0.
        lam: Lamé λ, ≥ 0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``≥ 0``; 0 for translations and infinitesimal rotations (``u = W x``, ``W`` skew).
    """
    mu = _check_positive(mu, "mu", allow_zero=True)
    lam = _check_positive(lam, "lam", allow_zero=True)
    sp, grid = _geometry(disp, grid_or_spacing)
    u = _grid_frame(disp, grid)
    jac = spatial_gradient(u, sp)  # (N, D comp, D deriv, *spatial)
    strain = 0.5 * (jac + jac.transpose(1, 2))
    trace = torch.diagonal(strain, dim1=1, dim2=2).sum(-1)
    density = mu * strain.square().sum((1, 2)) + 0.5 * lam * trace.square()
    return reduce_batch(_per_sample_mean(density), reduction)


def total_variation(disp: Tensor, grid_or_spacing: Grid | Sequence[float] | float | None = None,
                    *, mode: str = "isotropic", eps: float = 1e-3,
                    reduction: str = "mean") -> Tensor:
    """Total variation (L1 norm of the gradient) of each displacement component.

    Forward differences on the voxels where all of them are defined.

    Args:
        disp: ``(N, D, *spatial)`` displacement in world mm, components ``(x, y, z)``.
        grid_or_spacing: a :class:`~medreg.core.Grid` or the spacing ``(x, y, z)`` in mm.
        mode: ``"isotropic"``: ``Σ_i (sqrt(|∇u_i|² + eps²) − eps)`` (rotation invariant,
            smoothed at 0 so that a zero field has a finite gradient); ``"l1"``:
            ``Σ_ij |∂u_i/∂x_j|`` along the grid axes.
        eps: smoothing of the isotropic norm (dimensionless), ≥ 0.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Dimensionless, ``≥ 0``; 0 for any translation.
    """
    mode = check_choice(mode, "TV mode", TV_MODES)
    eps = _check_positive(eps, "eps", allow_zero=True)
    sp, _ = _geometry(disp, grid_or_spacing)
    d = disp.dim() - 2
    grads = []
    for comp in range(d):
        axis = 2 + d - 1 - comp
        g = _diff(disp, axis, sp[comp])
        for other in range(2, 2 + d):  # crop to the common region
            if other != axis:
                g = g.narrow(other, 0, disp.shape[other] - 1)
        grads.append(g)
    if mode == "l1":
        density = sum(g.abs().sum(1) for g in grads)
    else:
        sq = sum(g.square() for g in grads)  # (N, D, *): |∇u_i|² per component
        density = (torch.sqrt(sq + eps * eps) - eps).sum(1)
    return reduce_batch(_per_sample_mean(density), reduction)


def jacobian_penalty(disp: Tensor, grid_or_spacing: Grid | Sequence[float] | float | None = None,
                     *, mode: str = "hinge", threshold: float = 0.1, eps: float = 1e-6,
                     reduction: str = "mean") -> Tensor:
    """Penalty on the Jacobian determinant of ``x ↦ x + u(x)``.

    ``det J`` comes from :func:`medreg.core.functional.jacobian_det` (central differences, the
    grid's direction honoured; a spacing means an axis-aligned grid).

    Args:
        disp: ``(N, D, *spatial)`` displacement in world mm, components ``(x, y, z)``.
        grid_or_spacing: a :class:`~medreg.core.Grid` or the spacing ``(x, y, z)`` in mm.
        mode: ``"hinge"``: squared hinge ``max(0, threshold − det J)²`` (0 where the map keeps
            a local volume ratio above ``threshold``; stops folding); ``"log2"``:
            ``(log det J)²`` (volume preservation; ``det J`` is clamped to ``eps`` first, so
            folded voxels get no gradient from it; combine with ``"hinge"``).
        threshold: the hinge's volume ratio (``"hinge"`` only).
        eps: floor of ``det J`` in ``"log2"``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Mean over voxels, ``≥ 0``; 0 for the identity.
    """
    mode = check_choice(mode, "Jacobian penalty mode", JACOBIAN_MODES)
    eps = _check_positive(eps, "eps")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise InputError(f"threshold must be a number, got {threshold!r}") from None
    sp, grid = _geometry(disp, grid_or_spacing)
    if grid is None:
        grid = Grid.from_shape(disp.shape[2:], spacing=sp)
    det = jacobian_det(disp, grid)
    if mode == "hinge":
        density = torch.relu(threshold - det).square()
    else:
        density = torch.log(det.clamp_min(eps)).square()
    return reduce_batch(_per_sample_mean(density), reduction)


# =========================================================================== supervision
def one_hot(labels: Tensor, num_classes: int | None = None, *,
            dtype: torch.dtype = torch.float32) -> Tensor:
    """Integer label map ``(N, 1, *spatial)`` (or ``(N, *spatial)``) → ``(N, L, *spatial)``.

    Args:
        labels: integer labels ``0..L−1``.
        num_classes: ``L``; default ``labels.max() + 1``.
        dtype: output dtype.
    """
    if labels.is_floating_point():
        raise InputError("one_hot needs an integer label map; warp one-hot channels, not labels")
    if labels.dim() >= 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    n = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
        raise InputError(f"labels must be in 0..{n - 1}")
    return F.one_hot(labels.long(), n).movedim(-1, 1).to(dtype)


def soft_dice(onehot_fixed: Tensor, onehot_warped: Tensor, labels: Sequence[int] | None = None,
              mask: Tensor | None = None, *, eps: float = 1e-6,
              reduction: str = "mean") -> Tensor:
    """Soft Dice loss between one-hot (or probabilistic) label maps (weak supervision).

    ``Dice_l = (2 Σ f_l w_l + eps) / (Σ f_l + Σ w_l + eps)`` over the masked voxels.

    Args:
        onehot_fixed: ``(N, L, *spatial)`` fixed labels, one channel per label, in ``[0, 1]``.
        onehot_warped: ``(N, L, *spatial)`` moving one-hot labels warped (linearly) onto the
            fixed grid.
        labels: channel indices to score (e.g. ``range(1, L)`` to leave out the background);
            default all.
        mask: ``(N or 1, 1, *spatial)`` weights, or None.
        eps: smoothing; a label absent from both maps scores Dice 1.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        ``1 − mean_l Dice_l`` in ``[0, 1]``, 0 is perfect.
    """
    if onehot_fixed.shape != onehot_warped.shape:
        raise InputError(f"label maps differ in shape: {tuple(onehot_fixed.shape)} vs "
                         f"{tuple(onehot_warped.shape)}")
    _check_image(onehot_fixed, "onehot_fixed")
    _check_image(onehot_warped, "onehot_warped")
    eps = _check_positive(eps, "eps", allow_zero=True)
    if labels is not None:
        idx = [int(i) for i in labels]
        if not idx or min(idx) < 0 or max(idx) >= onehot_fixed.shape[1]:
            raise InputError(f"labels {idx} are not channel indices of a "
                             f"{onehot_fixed.shape[1]}-channel map")
        onehot_fixed = onehot_fixed[:, idx]
        onehot_warped = onehot_warped[:, idx]
    mask = _check_mask(mask, onehot_fixed)
    dims = tuple(range(2, onehot_fixed.dim()))
    a, b = onehot_fixed, onehot_warped
    if mask is not None:
        a, b = a * mask, b * mask
    inter = (a * onehot_warped).sum(dims)
    dice = (2 * inter + eps) / (a.sum(dims) + b.sum(dims) + eps)
    return reduce_batch(1.0 - dice.mean(1), reduction)


def tre(points_a: Tensor, points_b: Tensor, mask: Tensor | None = None, *,
        reduction: str = "mean") -> Tensor:
    """Target registration error: mean Euclidean distance between corresponding points.

    Args:
        points_a: ``(..., P, D)`` world points in mm (e.g. fixed landmarks mapped by ``T``).
        points_b: ``(..., P, D)`` their targets (e.g. the moving landmarks).
        mask: ``(..., P)`` weights of the pairs (0 drops a missing landmark), or None.
        reduction: ``"mean"`` (over all pairs), ``"sum"`` or ``"none"`` (``(..., P)``
            distances).

    Returns:
        Distance in mm, ``≥ 0``.
    """
    if points_a.shape != points_b.shape or points_a.dim() < 2:
        raise InputError(f"point sets must both be (..., P, D) with equal shapes, got "
                         f"{tuple(points_a.shape)} and {tuple(points_b.shape)}")
    dist = torch.linalg.vector_norm(points_a - points_b, dim=-1)
    reduction = check_choice(reduction, "reduction", REDUCTIONS)
    if reduction == "none":
        return dist
    if mask is None:
        return dist.mean() if reduction == "mean" else dist.sum()
    m = torch.broadcast_to(mask.detach().to(dist.dtype), dist.shape)
    total = (dist * m).sum()
    return total / m.sum().clamp_min(K.TINY) if reduction == "mean" else total


def epe(disp: Tensor, disp_gt: Tensor, mask: Tensor | None = None, *,
        reduction: str = "mean") -> Tensor:
    """End-point error: mean Euclidean norm of ``disp − disp_gt`` over the masked voxels.

    Args:
        disp: ``(N, D, *spatial)`` predicted displacement in world mm.
        disp_gt: ``(N, D, *spatial)`` ground truth on the same grid, world mm.
        mask: ``(N or 1, 1, *spatial)`` weights, or None.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        In mm, ``≥ 0``.
    """
    _check_field(disp)
    if disp.shape != disp_gt.shape:
        raise InputError(f"displacements differ in shape: {tuple(disp.shape)} vs "
                         f"{tuple(disp_gt.shape)}")
    err = torch.linalg.vector_norm(disp - disp_gt, dim=1, keepdim=True)
    mask = _check_mask(mask, err)
    return masked_mean(err, mask, reduction)
