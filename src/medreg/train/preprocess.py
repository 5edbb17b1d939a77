r"""Preprocessing for learning: put any image on the **network grid** and undo it exactly.

A network sees fixed and moving images on one regular grid (the *network grid*) that keeps the
fixed image's world geometry: the same direction cosines and centre, covering the fixed image's
field of view (voxel edges) at the requested size and/or spacing. Both images are resampled onto
it through the identity in **world space** (LPS mm) with :func:`medreg.transforms.warp_image`,
so a moving image of any size, spacing or orientation lands where it is in the world.

The network predicts a displacement ``u`` in voxel units of that grid (components ``x, y, z``,
fixed → moving: ``moving(p + u(p)) ≈ fixed(p)``). :func:`field_to_world` turns it into world-mm
vectors and :func:`prediction_transform` into a :class:`~medreg.transforms.DisplacementField`
that maps world points of the **original** fixed image to the moving image, so
``warp_image(moving, T, fixed.grid)`` is the prediction in the fixed image's own geometry
(the field is sampled on the fixed image's own grid by default, so writers get its header).

Intensity normalisation is a registry (:data:`NORMALISERS`): ``none``, ``minmax``, ``zscore``
and ``percentile`` (1–99 % → 0–1, clipped). Statistics come from the image's own voxels (per
channel), before resampling; voxels outside the image get ``pad_value`` (normalised units).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.transforms import (DisplacementField, Identity, SpatialTransform, warp_image,
                               warp_labels)

__all__ = [
    "NORMALISERS", "PrepInfo", "PreprocessConfig", "field_to_world", "network_grid",
    "normalise_image", "prediction_transform", "prepare_image", "resample_prepared",
]


@dataclass
class PreprocessConfig:
    """How images are put on the network grid.

    Attributes:
        size: network grid size in ``x, y, z`` order (e.g. ``(64, 64)`` or ``(96, 112, 96)``);
            ``None``: the fixed image's own size rounded up to ``multiple_of`` (with ``spacing``
            ``None`` as well, the fixed grid itself, padded symmetrically by whole voxels).
        spacing: network voxel spacing in mm (``x, y, z``, or one value for all axes); ``None``:
            with ``size`` given, the spacing that makes ``size`` voxels cover the fixed field of
            view; otherwise the fixed image's spacing.
        multiple_of: sizes are rounded up to a multiple of it when ``size`` is ``None``.
        normalise: intensity normalisation, a key of :data:`NORMALISERS`.
        percentiles: the lower/upper percentiles of ``percentile`` normalisation.
        pad_value: intensity (after normalisation) of network voxels outside the image.
        orientation: ``None``: the network grid has the fixed image's direction cosines;
            axis codes such as ``"RAS"``/``"LPS"`` (2D: ``"RA"``…, nibabel's convention, see
            :meth:`Grid.orientation`): an axis-aligned grid with that orientation, so a network
            sees every image the same way up whatever its header's direction.
        initialisation: how the moving image is aligned to the fixed one before it goes on the
            network grid (the ``T₀`` of :mod:`medreg.train.predict`): ``none`` (world
            identity), ``geometry`` (image centres), ``com`` (centres of mass) or ``moments``.
    """

    size: tuple[int, ...] | None = None
    spacing: tuple[float, ...] | None = None
    multiple_of: int = 16
    normalise: str = "percentile"
    percentiles: tuple[float, float] = (1.0, 99.0)
    pad_value: float = 0.0
    orientation: str | None = None
    initialisation: str = "none"

    def __post_init__(self) -> None:
        if self.orientation is not None:
            self.orientation = str(self.orientation).upper()
            direction_from_codes(self.orientation)  # validates
        if self.initialisation not in ("none", "geometry", "com", "moments"):
            raise InputError(f"unknown initialisation {self.initialisation!r}; choose none, "
                             "geometry, com or moments")
        if self.size is not None:
            self.size = tuple(int(s) for s in self.size)
            if any(s < 1 for s in self.size):
                raise InputError(f"preprocess size must be positive, got {self.size}")
        if self.spacing is not None:
            sp = (self.spacing,) if isinstance(self.spacing, (int, float)) else self.spacing
            self.spacing = tuple(float(s) for s in sp)
            if any(not (s > 0 and math.isfinite(s)) for s in self.spacing):
                raise InputError(f"preprocess spacing must be positive mm, got {self.spacing}")
        if int(self.multiple_of) < 1:
            raise InputError(f"multiple_of must be >= 1, got {self.multiple_of}")
        if self.normalise not in NORMALISERS:
            raise InputError(f"unknown normalisation {self.normalise!r}; choose one of "
                             f"{', '.join(sorted(NORMALISERS))}")
        lo, hi = (float(p) for p in self.percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        self.percentiles = (lo, hi)


@dataclass
class PrepInfo:
    """What preprocessing did to one image (enough to undo it).

    Attributes:
        original: the image's own grid.
        network: the network grid it was resampled onto.
        normalise: the normalisation's name.
        shift, scale: per channel, ``normalised = (value - shift) / scale`` (then ``clip``).
        clip: the range normalised values were clipped to, or ``None``.
        name: the image's name (path) for messages.
        labels: True for a label map (no normalisation, nearest neighbour).
    """

    original: Grid
    network: Grid
    normalise: str = "none"
    shift: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    clip: tuple[float, float] | None = None
    name: str = ""
    labels: bool = False

    def denormalise(self, data: Tensor) -> Tensor:
        """Back to the original intensity units, ``(C, *shape)`` (clipped values stay clipped)."""
        if self.labels or not self.shift:
            return data
        view = (-1,) + (1,) * (data.dim() - 1)
        shift = torch.tensor(self.shift, dtype=data.dtype, device=data.device).view(view)
        scale = torch.tensor(self.scale, dtype=data.dtype, device=data.device).view(view)
        return data * scale + shift


# ------------------------------------------------------------------------------ grids
#: axis code → (world LPS axis, sign): L = +x, P = +y, S = +z.
_CODES = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def direction_from_codes(codes: str) -> np.ndarray:
    """Direction cosines (columns) of an axis-aligned grid whose index axes ``x, y, z`` increase
    towards the anatomical directions ``codes`` (e.g. ``"RAS"``: x → right, y → anterior)."""
    d = len(codes)
    if d not in (2, 3) or any(c not in _CODES for c in codes):
        raise InputError(f"orientation {codes!r} is not a 2- or 3-letter code of L/R, P/A, S/I")
    axes = [_CODES[c][0] for c in codes]
    if len(set(axes)) != d or max(axes) >= d:
        raise InputError(f"orientation {codes!r} must name each of the {d} world axes once"
                         + (" (2D: L/R and P/A)" if d == 2 else ""))
    out = np.zeros((d, d))
    for j, c in enumerate(codes):
        k, sign = _CODES[c]
        out[k, j] = sign
    return out


def _reoriented(fixed: Grid, codes: str) -> Grid:
    """An axis-aligned grid with orientation ``codes`` covering ``fixed``'s field of view (the
    world bounding box of its voxel-edge corners), at ``fixed``'s finest spacing."""
    if len(codes) != fixed.ndim:
        raise InputError(f"orientation {codes!r} is for {len(codes)}D images, the image is {fixed.ndim}D")
    direction = direction_from_codes(codes)
    half = np.asarray(fixed.size, dtype=float) / 2.0
    corners = np.array(list(np.ndindex(*([2] * fixed.ndim))), dtype=float) * 2 - 1  # ±1
    offsets = (corners * half * np.asarray(fixed.spacing)) @ fixed.direction.T  # world, from centre
    extent = np.abs(offsets @ direction).max(0) * 2.0  # along the new axes
    spacing = float(min(fixed.spacing))
    size = [max(1, int(math.ceil(e / spacing - 1e-6))) for e in extent]
    probe = Grid(tuple(size), (spacing,) * fixed.ndim, [0.0] * fixed.ndim, direction)
    return _centred_grid(probe, size, probe.spacing, centre=fixed.center())


def _centred_grid(fixed: Grid, size: Sequence[int], spacing: Sequence[float],
                  centre: Sequence[float] | None = None) -> Grid:
    """Grid of ``size``/``spacing`` with ``fixed``'s direction and centre (or ``centre``)."""
    centre = np.asarray(fixed.center() if centre is None else centre)
    half = np.asarray([(n - 1) * s / 2.0 for n, s in zip(size, spacing)])
    origin = centre - fixed.direction @ half
    return Grid(tuple(int(n) for n in size), tuple(spacing), origin.tolist(), fixed.direction)


def _round_up(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)


def network_grid(fixed_grid: Grid, cfg: PreprocessConfig) -> Grid:
    """The network grid for a fixed image on ``fixed_grid``.

    Same direction and centre as ``fixed_grid``; it covers the fixed field of view (voxel
    edges ``size * spacing``). With ``size`` and ``spacing`` both given the grid is exactly
    that (cropping or padding the field of view around its centre).
    """
    d = fixed_grid.ndim
    if cfg.spacing is not None and len(cfg.spacing) == 1 and d > 1:  # one value: isotropic
        cfg = dataclasses.replace(cfg, spacing=cfg.spacing * d)
    for name, value in (("size", cfg.size), ("spacing", cfg.spacing)):
        if value is not None and len(value) != d:
            raise InputError(f"preprocess {name} {tuple(value)} has {len(value)} values but the "
                             f"image is {d}D; give {d} values (x, y, z order)")
    if cfg.orientation is not None:
        fixed_grid = _reoriented(fixed_grid, cfg.orientation)
    extent = [n * s for n, s in zip(fixed_grid.size, fixed_grid.spacing)]
    if cfg.size is not None:
        spacing = cfg.spacing or tuple(e / n for e, n in zip(extent, cfg.size))
        return _centred_grid(fixed_grid, cfg.size, spacing)
    m = int(cfg.multiple_of)
    if cfg.spacing is None:  # keep the fixed voxels: pad by whole voxels on both sides
        target = [_round_up(n, m) for n in fixed_grid.size]
        before = [(t - n) // 2 for t, n in zip(target, fixed_grid.size)]
        after = [t - n - b for t, n, b in zip(target, fixed_grid.size, before)]
        return fixed_grid.pad(before, after)
    size = [_round_up(max(1, int(math.ceil(e / s - 1e-6))), m) for e, s in zip(extent, cfg.spacing)]
    return _centred_grid(fixed_grid, size, cfg.spacing)


# ------------------------------------------------------------------------------ intensities
#: ``(shift, scale, clip)`` of one channel: ``normalised = clip((value - shift) / scale)``.
_Stats = tuple[float, float, tuple[float, float] | None]


def _quantiles(x: Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolated quantiles (``qs`` in 0…1) of a 1D tensor of any length."""
    v = x.sort().values
    n = v.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        w = pos - lo
        out.append(float(v[lo]) * (1 - w) + float(v[hi]) * w)
    return out


def _norm_none(x: Tensor, cfg: PreprocessConfig) -> _Stats:
    return 0.0, 1.0, None


def _norm_minmax(x: Tensor, cfg: PreprocessConfig) -> _Stats:
    lo, hi = float(x.min()), float(x.max())
    return lo, hi - lo, None


def _norm_zscore(x: Tensor, cfg: PreprocessConfig) -> _Stats:
    xd = x.double()
    return float(xd.mean()), float(xd.std(unbiased=False)), None


def _norm_percentile(x: Tensor, cfg: PreprocessConfig) -> _Stats:
    lo, hi = _quantiles(x, [p / 100.0 for p in cfg.percentiles])
    return lo, hi - lo, (0.0, 1.0)


#: name → function ``(channel voxels (flat), cfg) -> (shift, scale, clip)``.
NORMALISERS: dict[str, Callable[[Tensor, PreprocessConfig], _Stats]] = {
    "none": _norm_none,
    "minmax": _norm_minmax,
    "zscore": _norm_zscore,
    "percentile": _norm_percentile,
}


def normalise_image(image: Image, cfg: PreprocessConfig) -> tuple[Image, tuple, tuple, tuple | None]:
    """Normalise each channel of ``image`` on its own grid (float32).

    Returns:
        ``(image, shift, scale, clip)`` with ``normalised = clip((value - shift) / scale)``; a
        constant channel gets ``scale = 1``.
    """
    fn = NORMALISERS.get(cfg.normalise)
    if fn is None:
        raise InputError(f"unknown normalisation {cfg.normalise!r}; choose one of "
                         f"{', '.join(sorted(NORMALISERS))}")
    data = image.data.float()
    shifts, scales, clip = [], [], None
    out = torch.empty_like(data)
    for c in range(data.shape[0]):
        shift, scale, clip = fn(data[c].flatten(), cfg)
        if not scale > 1e-12:
            scale = 1.0
        shifts.append(shift)
        scales.append(scale)
        ch = (data[c] - shift) / scale
        out[c] = ch if clip is None else ch.clamp(*clip)
    return Image(out, image.grid, image.name), tuple(shifts), tuple(scales), clip


def resample_prepared(image: Image, grid: Grid, cfg: PreprocessConfig, labels: bool = False,
                      transform: SpatialTransform | None = None) -> Tensor:
    """Resample an already normalised image (or a label map) onto ``grid`` through
    ``transform`` (network-grid world points → image world points; default the identity):
    linear with ``pad_value`` outside (images), nearest with 0 outside (labels, ``int64``).
    Returns ``(C, *grid.shape)``."""
    t = Identity(grid.ndim) if transform is None else transform
    if labels:
        return warp_labels(image, t, grid).data.long()
    return warp_image(image, t, grid, fill=float(cfg.pad_value)).data


def prepare_image(image: Image, grid: Grid, cfg: PreprocessConfig, labels: bool = False, *,
                  transform: SpatialTransform | None = None) -> tuple[Tensor, PrepInfo]:
    """Resample ``image`` (any size, spacing, orientation) onto the network ``grid``.

    Images are normalised (:data:`NORMALISERS`, statistics of the image's own voxels) and
    resampled linearly (float32); label maps (``labels=True``) by nearest neighbour, ``int64``,
    label ids unchanged. The map is the identity in world space (LPS mm), or ``transform``
    (fixed → this image's world points, e.g. an initial alignment of a moving image).

    Returns:
        ``(data (C, *grid.shape), PrepInfo)``.
    """
    if image.ndim != grid.ndim:
        raise InputError(f"{image.name}: a {image.ndim}D image cannot go on a {grid.ndim}D "
                         "network grid")
    if labels:
        if image.data.is_floating_point() and not torch.equal(image.data, image.data.round()):
            raise InputError(f"{image.name}: label map has non-integer values; is it an "
                             "intensity image?")
        lab = Image(image.data.long(), image.grid, image.name)
        return (resample_prepared(lab, grid, cfg, labels=True, transform=transform),
                PrepInfo(image.grid, grid, "none", name=image.name, labels=True))
    norm, shift, scale, clip = normalise_image(image, cfg)
    data = resample_prepared(norm, grid, cfg, transform=transform)
    return data, PrepInfo(image.grid, grid, cfg.normalise, shift, scale, clip, image.name)


# ------------------------------------------------------------------------------ undo
def field_to_world(displacement_vox: Tensor, grid: Grid) -> Tensor:
    """Voxel-unit displacement on ``grid`` → world-mm (LPS) vectors.

    ``displacement_vox`` is ``(D, *grid.shape)`` or ``(N, D, *grid.shape)``, components
    ``x, y, z`` along index axes; the result has the same layout with world components
    ``x, y, z`` (``u_world = direction @ diag(spacing) @ u_vox``).
    """
    d = grid.ndim
    shape = tuple(displacement_vox.shape)
    if len(shape) not in (d + 1, d + 2) or shape[-d:] != grid.shape or shape[-d - 1] != d:
        raise InputError(f"displacement of shape {tuple(displacement_vox.shape)} does not match the "
                         f"grid: expected ([N,] {d}, {', '.join(map(str, grid.shape))})")
    return grid.transform_vectors(displacement_vox, "index", "world", channel_dim=-d - 1)


def prediction_transform(displacement_vox: Tensor, info: PrepInfo, *,
                         grid: Grid | None = None) -> DisplacementField:
    """The fixed → moving world transform of a network prediction.

    Args:
        displacement_vox: ``(D, *shape)`` or ``(1, D, *shape)`` voxel units of ``info.network``.
        info: the fixed image's :class:`PrepInfo`.
        grid: where the returned field is sampled; default ``info.original``, the fixed image's
            own grid (pass ``info.network`` to keep the network's samples).

    Returns:
        A :class:`~medreg.transforms.DisplacementField` (world mm). Its value at each point of
        ``grid`` is the network field at that world point (linear interpolation on the network
        grid, border extension beyond it), so ``warp_image(moving, T, info.original)`` is the
        prediction in the fixed image's own geometry, and writers (``displacement.nii.gz``,
        ``transform.h5``) get a field on the fixed header.
    """
    field_mm = field_to_world(displacement_vox.detach(), info.network)
    if field_mm.dim() == info.network.ndim + 1:
        field_mm = field_mm.unsqueeze(0)
    if field_mm.shape[0] != 1:
        raise InputError(f"prediction_transform takes one field, got a batch of {field_mm.shape[0]}")
    on_network = DisplacementField(field_mm, info.network)
    target = info.original if grid is None else grid
    if target == info.network:
        return on_network
    pts = target.points(dtype=field_mm.dtype, device=field_mm.device).unsqueeze(0)
    moved = on_network(pts)  # (1, *target.shape, D) world mm
    return DisplacementField((moved - pts).movedim(-1, 1), target)
