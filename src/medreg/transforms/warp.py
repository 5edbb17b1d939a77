"""Applying transforms to data: images, label maps and points.

Convention:
    ``warped(x) = moving(T(x))`` for ``x`` on the target (fixed) grid: ``T`` maps fixed-space
    points to moving space. Hence **fixed** landmarks are carried into moving space with ``T``
    (:func:`warp_points`), and moving landmarks into fixed space with ``T⁻¹``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from medreg.core.enums import Interpolation, Padding
from medreg.core.errors import GeometryError, InputError
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.transforms import functional as TF
from medreg.transforms.base import Identity, SpatialTransform


def _needs_grad(image: Tensor, transform: SpatialTransform) -> bool:
    return torch.is_grad_enabled() and (image.requires_grad or transform.requires_grad())


def _precise(transform: SpatialTransform) -> SpatialTransform:
    """A float64 copy of ``transform`` for output warps that need no gradient.

    Coordinates and interpolation in float64 make an identity or integer-voxel shift reproduce
    the input exactly after casting back to float32 (float32 ``grid_sample`` is off by ~1e-6).
    Each floating tensor is converted once, straight into the copy (no float32 copy first).
    """
    dtype, _ = transform._ref()
    if dtype == torch.float64:
        return transform
    memo: dict[int, object] = {}
    for p in transform.parameters():
        if p.is_floating_point():
            memo[id(p)] = torch.nn.Parameter(p.detach().to(torch.float64),
                                             requires_grad=p.requires_grad)
    for b in transform.buffers():
        if b.is_floating_point():
            memo[id(b)] = b.to(torch.float64)
    return copy.deepcopy(transform, memo).to(torch.float64)


_LATTICE_INTERP = (Interpolation.LINEAR, Interpolation.NEAREST)
_LATTICE_PAD = (Padding.ZEROS, Padding.BORDER)
#: transforms with at most this many parameter/buffer elements (linear maps, coarse control
#: grids) build their sampling coordinates in float64: exact for integer shifts at the price
#: of the coordinate array only; dense fields use their own dtype (their coordinates are
#: built from float64 grid matrices, rounded once)
_SMALL_TRANSFORM = 1 << 16


def _lattice_coords_dtype(transform: SpatialTransform) -> torch.dtype:
    dtype, _ = transform._ref()
    size = sum(t.numel() for t in list(transform.parameters()) + list(transform.buffers()))
    return torch.float64 if size <= _SMALL_TRANSFORM else dtype


def _source_points(transform: SpatialTransform, target: Grid, source: Grid,
                   dtype: torch.dtype | None = None) -> Tensor:
    if transform.ndim != target.ndim or source.ndim != target.ndim:
        raise GeometryError(
            f"dimension mismatch: {transform.ndim}D transform, {target.ndim}D target grid, "
            f"{source.ndim}D image"
        )
    return transform.source_norm_points(target, source, dtype)


def _checked_inputs(data: object, transform: object, target: object, source: Grid | None,
                    what: str) -> tuple[Grid | None, Image | None]:
    """Clear errors for what the warps cannot take; ``(target grid, target image or None)``."""
    if not isinstance(transform, SpatialTransform):
        raise InputError(f"{what}: the transform must be a medreg transform (e.g. "
                         "AffineTransform.from_matrix(matrix) for a 4×4 matrix, read_transform(path) "
                         f"for a file), got {type(transform).__name__}")
    if not isinstance(data, (Image, Tensor)):
        raise InputError(f"{what}: takes an Image or a (N, C, *shape) tensor, got "
                         f"{type(data).__name__}; a numpy array has no geometry: wrap it as "
                         "medreg.core.Image(torch.from_numpy(array), grid)")
    if isinstance(data, Tensor) and source is not None:
        expect = (source.ndim + 2, tuple(source.shape))
        if data.dim() != expect[0] or tuple(data.shape[2:]) != expect[1]:
            raise GeometryError(f"{what}: a tensor on the source grid must be (N, C, "
                                f"{', '.join(map(str, source.shape))}) (array order of grid size "
                                f"{source.size}), got {tuple(data.shape)}")
    if isinstance(target, Image):  # its grid, and its header for the output
        return target.grid, target
    if target is not None and not isinstance(target, Grid):
        raise InputError(f"{what}: target must be a Grid or an Image, got {type(target).__name__}")
    return target, None


def _with_header(out: Image, target_image: Image | None, values: Image | None) -> Image:
    """``out`` carrying the target image's space (NIfTI codes, slice position) as a writer keeps it."""
    if target_image is not None:
        from medreg.io.images import output_meta

        out.meta.update(output_meta(target_image, values))
    return out


def warp_image(image: Image | Tensor, transform: SpatialTransform, target: Grid | Image | None = None,
               source: Grid | None = None, interpolation: Interpolation | str = "linear",
               padding: Padding | str = "zeros", fill: float = 0.0,
               precise: bool | None = None) -> Image | Tensor:
    """Resample a moving image onto the target grid through ``transform``.

    Args:
        image: an :class:`Image` (its grid is the source) or a ``(N, C, *source.shape)`` tensor.
        transform: fixed → moving map (world mm).
        target: output grid (the fixed image's), or the fixed image itself (the output then
            carries its header: NIfTI space codes, a 2D slice's position); default the source grid.
        source: the moving image's grid (required for tensors).
        interpolation: ``linear``, ``nearest`` or ``bspline`` (cubic B-spline, ITK's).
        padding: ``zeros`` (``fill`` outside), ``border`` or ``reflection``.
        precise: ``True``: coordinates and interpolation in float64 (bit-equal to ITK's
            resampler). ``False``: the input's float dtype (~1e-6 relative error).
            Default (None): without gradients, a float32 image with linear/nearest
            interpolation and zeros/border padding is sampled on its dyadic lattice
            (:func:`~medreg.transforms.functional.sample_lattice`): an identity, a zero field
            or an integer shift reproduces the input bit for bit, other points carry float32
            error (~1e-7 of the value range); other inputs without gradients use float64; with
            gradients, the input's dtype.

    Integer images keep their dtype: values are rounded to the nearest integer and clamped to
    the type's range (ITK's resampler truncates towards zero instead).
    For label maps use ``nearest`` or :func:`warp_labels` (linear mixes label values).

    Returns:
        An :class:`Image` on ``target`` (for an Image input) or a ``(N, C, *target.shape)``
        tensor; differentiable with respect to the transform and (except ``bspline``) the image.
    """
    interpolation = Interpolation.from_arg(interpolation)
    as_image = isinstance(image, Image)
    target, target_image = _checked_inputs(image, transform, target, None if as_image else source,
                                           "warp_image")
    if as_image:
        source = image.grid
        data = image.batch()
    else:
        data = image
        if source is None:
            raise InputError("warp_image needs the source grid for a tensor image")
    target = source if target is None else target
    if (type(transform) is Identity and transform.ndim == target.ndim and target == source
            and tuple(data.shape[2:]) == tuple(target.shape)):
        # every output point is an input node, where each interpolation gives the node's value
        out = data.clone()
        return _with_header(Image(out[0], target, image.name), target_image, image) if as_image else out
    is_int = not (data.is_floating_point() or data.is_complex())
    padding = Padding.from_arg(padding)
    lattice = (precise is None and data.dtype in (torch.float32, torch.float16, torch.bfloat16)
               and interpolation in _LATTICE_INTERP and padding in _LATTICE_PAD
               and not _needs_grad(data, transform))
    if precise is None:
        precise = not _needs_grad(data, transform)
    if lattice:  # exact at integer indices in the image's own float dtype
        work = data.to(torch.float32) if data.dtype != torch.float32 else data
        norm = _source_points(transform, target, TF.dyadic_grid(source),
                              _lattice_coords_dtype(transform))
        out = TF.sample_lattice(work, norm.to(work.dtype), interpolation, padding, fill)
    else:
        if not precise:
            work = data.to(torch.float32 if is_int else data.dtype)
        else:
            work = data.to(torch.float64)
            transform = _precise(transform)
        norm = _source_points(transform, target, source, work.dtype)
        out = TF.sample(work, norm.to(work.dtype), interpolation, padding, fill)
    if is_int:  # as ITK's resampler: round and clamp to the input's pixel type
        info = torch.iinfo(data.dtype) if data.dtype != torch.bool else None
        out = out.round()
        if info is not None:
            out = out.clamp(info.min, info.max)
    out = out.to(data.dtype)
    if as_image:
        return _with_header(Image(out[0], target, image.name), target_image, image)
    return out


def warp_labels(labels: Image | Tensor, transform: SpatialTransform, target: Grid | Image | None = None,
                source: Grid | None = None, mode: str = "nearest") -> Image | Tensor:
    """Resample a label map (integer) through ``transform``.

    Args:
        mode: ``nearest`` (nearest neighbour) or ``soft`` (each label's indicator interpolated
            linearly, then the arg-max per voxel — smoother boundaries, labels never mixed).

    Returns:
        Integer labels on ``target`` (same dtype as the input); voxels outside the moving image
        are 0.
    """
    as_image = isinstance(labels, Image)
    target, target_image = _checked_inputs(labels, transform, target, None if as_image else source,
                                           "warp_labels")
    data = labels.batch() if as_image else labels
    src = labels.grid if as_image else source
    if src is None:
        raise InputError("warp_labels needs the source grid for a tensor label map")
    if data.is_floating_point():
        if not torch.equal(data, data.round()):
            raise InputError("label map has non-integer values; is it an intensity image?")
        data = data.long()
    tgt = src if target is None else target
    if mode == "nearest":
        out = warp_image(data, transform, tgt, src, interpolation="nearest")
    elif mode == "soft":
        norm = _source_points(_precise(transform), tgt, src, torch.float64)
        values = torch.unique(data)
        best = None
        out = None
        for v in values.tolist():  # one label at a time bounds memory
            prob = TF.sample((data == v).to(norm.dtype), norm, "linear", "zeros", 0.0)
            if best is None:
                best, out = prob, torch.full_like(prob, v, dtype=data.dtype)
            else:
                better = prob > best
                best = torch.where(better, prob, best)
                out = torch.where(better, torch.full_like(out, v), out)
        # outside the moving image (no label reaches there): background, as nearest gives
        out = torch.where(best > 0, out, torch.zeros_like(out))
    else:
        raise InputError(f"unknown label warping mode {mode!r}; choose nearest or soft")
    if as_image:
        return _with_header(Image(out[0], tgt, labels.name), target_image, labels)
    return out


def warp_points(points: Tensor, transform: SpatialTransform) -> Tensor:
    """Map fixed-space points ``(K, D)`` (world mm) into moving space: ``T(points)``.

    To bring moving-space points into fixed space use ``transform.inverse()``. Integer
    coordinates (and lists or numpy arrays) are taken as float64 mm.
    """
    if not isinstance(transform, SpatialTransform):
        raise InputError(f"warp_points: the transform must be a medreg transform, got {type(transform).__name__}")
    if not isinstance(points, Tensor) or not points.is_floating_point():
        # (a linear transform casts its matrix to the points' dtype: integer points truncated it)
        points = torch.as_tensor(points).to(torch.float64)
    if points.dim() != 2 or points.shape[-1] != transform.ndim:
        raise GeometryError(f"points must be (K, {transform.ndim}), got {tuple(points.shape)}")
    return transform(points)
