"""Gaussian image pyramids in physical units."""

from __future__ import annotations

import torch

from medreg.core.functional import gaussian_smooth
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.transforms import Identity, warp_image
from medreg.transforms import functional as TF


def default_sigma_mm(grid: Grid, factor: int) -> list[float]:
    """Anti-aliasing σ (mm) for shrinking by ``factor``: half the new voxel size per axis."""
    return [0.5 * factor * s if factor > 1 else 0.0 for s in grid.spacing]


def pyramid_level(image: Image, factor: int, sigma_mm: float | list[float] | None = None) -> Image:
    """Smooth ``image`` with a Gaussian of ``sigma_mm`` (default :func:`default_sigma_mm`) and
    resample it on ``grid.downsample(factor)`` (same physical box). Float32 output."""
    grid = image.grid
    sig = default_sigma_mm(grid, factor) if sigma_mm is None else sigma_mm
    data = image.batch(torch.float32)
    if any(s > 0 for s in ([sig] if isinstance(sig, (int, float)) else sig)):
        data = gaussian_smooth(data, sig, grid.spacing)
    if factor == 1:
        return Image(data[0], grid, image.name)
    coarse = grid.downsample(factor)
    out = warp_image(data, Identity(grid.ndim), coarse, grid, padding="border", precise=False)
    return Image(out[0], coarse, image.name)


def resample_field(field: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """Linearly resample a vector field ``(N, D, *source.shape)`` onto ``target`` (border
    extension); vector values (world mm) are unchanged."""
    if source == target:
        return field
    pts = target.points(dtype=field.dtype, device=field.device).unsqueeze(0)
    return TF.sample(field, source.transform_points(pts, "world", "norm"), "linear", "border")
