"""Gaussian image pyramids in physical units."""

from __future__ import annotations

import torch

from medreg.core.functional import gaussian_smooth
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.transforms import Identity, warp_image
from medreg.transforms import functional as TF


#: a pyramid level keeps at least this many voxels along every axis (or all the axis has)
MIN_LEVEL_VOXELS = 4


def level_factors(grid: Grid, factor: float) -> tuple[float, ...]:
    """Per-axis shrink factors ``(x, y, z)`` of the pyramid level 1/``factor`` of ``grid``:
    ``factor``, capped along an axis it would leave under :data:`MIN_LEVEL_VOXELS` voxels (a
    thick-slice volume of 5 slices keeps 4 of them at 1/4; ANTs caps its shrink factors too)."""
    return tuple(float(factor) if n / factor >= MIN_LEVEL_VOXELS
                 else max(1.0, n / MIN_LEVEL_VOXELS) for n in grid.size)


def default_sigma_mm(grid: Grid, factor: float) -> list[float]:
    """Anti-aliasing σ (mm) for shrinking by ``factor``: half the new voxel size per axis
    (per-axis factors of :func:`level_factors`)."""
    return [0.5 * f * s if f > 1 else 0.0 for f, s in zip(level_factors(grid, factor), grid.spacing)]


def pyramid_level(image: Image, factor: int, sigma_mm: float | list[float] | None = None) -> Image:
    """Smooth ``image`` with a Gaussian of ``sigma_mm`` (default :func:`default_sigma_mm`) and
    resample it on ``grid.downsample(level_factors(grid, factor))`` (same physical box).
    Float32 output."""
    grid = image.grid
    sig = default_sigma_mm(grid, factor) if sigma_mm is None else sigma_mm
    data = image.batch(torch.float32)
    if any(s > 0 for s in ([sig] if isinstance(sig, (int, float)) else sig)):
        data = gaussian_smooth(data, sig, grid.spacing)
    factors = level_factors(grid, factor)
    if all(f == 1 for f in factors):
        return Image(data[0], grid, image.name)
    coarse = grid.downsample(factors)
    out = warp_image(data, Identity(grid.ndim), coarse, grid, padding="border", precise=False)
    return Image(out[0], coarse, image.name)


def resample_field(field: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """Linearly resample a vector field ``(N, D, *source.shape)`` onto ``target`` (border
    extension); vector values (world mm) are unchanged."""
    if source == target:
        return field
    pts = target.points(dtype=field.dtype, device=field.device).unsqueeze(0)
    return TF.sample(field, source.transform_points(pts, "world", "norm"), "linear", "border")
