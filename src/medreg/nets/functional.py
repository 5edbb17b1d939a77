"""Voxel-unit field operations for networks and training (pure tensor functions).

All fields are ``(N, D, *spatial)`` displacements in voxel units with components ``x, y, z``
(last array axis first), fixed → moving: ``warped(p) = moving(p + u(p))``. Sampling uses
``grid_sample`` with ``align_corners=True`` (voxel centres at -1 … 1), so index ``i`` of an axis
of size ``n`` is ``2 i / (n - 1) - 1``. These are the fast, differentiable paths used inside
networks and losses; geometry-exact resampling between different grids is ``medreg.transforms``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_MODES = {"linear": "bilinear", "bilinear": "bilinear", "nearest": "nearest", "bicubic": "bicubic"}


def identity_grid(shape: Sequence[int], *, device=None, dtype=torch.float32) -> Tensor:
    """``(1, D, *shape)`` voxel index coordinates, components ``x, y, z``."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")  # array order z, y, x
    return torch.stack(mesh[::-1], dim=0).unsqueeze(0)


def _norm_scale(shape: Sequence[int], ref: Tensor) -> Tensor:
    """Per-component factor ``2 / (n - 1)`` for components ``x, y, z`` (1 for singleton axes)."""
    sizes = torch.tensor([max(n - 1, 1) for n in shape[::-1]], device=ref.device, dtype=ref.dtype)
    return 2.0 / sizes


def voxel_to_norm(points: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel index coordinates ``(..., D)`` (``x, y, z``) → grid_sample's ``align_corners=True`` units."""
    return points * _norm_scale(shape, points) - 1.0


def sample_grid(displacement: Tensor) -> Tensor:
    """The ``grid_sample`` grid ``(N, *spatial, D)`` for ``p + u(p)``."""
    shape = displacement.shape[2:]
    d = len(shape)
    pts = identity_grid(shape, device=displacement.device, dtype=displacement.dtype) + displacement
    pts = pts.permute(0, *range(2, d + 2), 1)
    return voxel_to_norm(pts, shape)


def warp_voxel(image: Tensor, displacement: Tensor, mode: str = "linear",
               padding: str = "border") -> Tensor:
    """``moving(p + u(p))`` for ``image (N, C, *spatial)`` and ``u (N, D, *spatial)`` (same
    spatial shape). ``mode``: ``linear`` | ``nearest`` | ``bicubic`` (2D only); ``padding``:
    ``border`` | ``zeros`` | ``reflection``. Differentiable w.r.t. both inputs (except nearest)."""
    if image.shape[2:] != displacement.shape[2:]:
        raise ValueError(f"warp_voxel: image {tuple(image.shape[2:])} and field "
                         f"{tuple(displacement.shape[2:])} differ in size")
    if displacement.shape[1] != image.dim() - 2:
        raise ValueError(f"warp_voxel: a {image.dim() - 2}D image needs a field with "
                         f"{image.dim() - 2} components, got {displacement.shape[1]}")
    grid = sample_grid(displacement.to(image.dtype))
    if grid.shape[0] != image.shape[0]:
        grid = grid.expand(image.shape[0], *grid.shape[1:])
    return F.grid_sample(image, grid, mode=_MODES[mode], padding_mode=padding, align_corners=True)


def compose_voxel(outer: Tensor, inner: Tensor) -> Tensor:
    """Displacement of the map ``p ↦ T_inner(T_outer(p))``: ``w(p) = outer(p) + inner(p + outer(p))``.
    Warping by ``w`` equals warping the moving image by ``inner`` and that result by ``outer``."""
    return outer + warp_voxel(inner, outer, padding="border")


def integrate_velocity(velocity: Tensor, steps: int = 7) -> Tensor:
    """Scaling and squaring in voxel units: ``exp(v)`` as a displacement (``2**steps`` steps)."""
    disp = velocity / (2.0 ** steps)
    for _ in range(int(steps)):
        disp = disp + warp_voxel(disp, disp, padding="border")
    return disp


def resize_field(displacement: Tensor, shape: Sequence[int]) -> Tensor:
    """Resample a voxel-unit field to ``shape`` (linear, corners aligned) and rescale its
    components so they stay in voxel units of the new grid."""
    shape = tuple(int(s) for s in shape)
    old = displacement.shape[2:]
    if tuple(old) == shape:
        return displacement
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    out = F.interpolate(displacement, size=shape, mode=mode, align_corners=True)
    factors = [(n_new - 1) / max(n_old - 1, 1) for n_new, n_old in zip(shape[::-1], old[::-1])]
    scale = torch.tensor(factors, device=out.device, dtype=out.dtype).view(1, -1, *([1] * len(shape)))
    return out * scale


def affine_to_displacement(affine: Tensor, shape: Sequence[int]) -> Tensor:
    """Displacement ``A p - p`` of an ``(N, D, D + 1)`` voxel-index affine on a grid of ``shape``."""
    d = len(shape)
    grid = identity_grid(shape, device=affine.device, dtype=affine.dtype).flatten(2)  # (1, D, P)
    mapped = affine[:, :, :d] @ grid + affine[:, :, d:]
    return (mapped - grid).view(affine.shape[0], d, *shape)


def pad_to_multiple(x: Tensor, multiple: int, mode: str = "constant") -> tuple[Tensor, list[int]]:
    """Pad the spatial axes at their far end to a multiple of ``multiple``; returns the padded
    tensor and the original spatial shape (for :func:`crop_to`)."""
    shape = list(x.shape[2:])
    pads: list[int] = []
    for n in reversed(shape):
        pads += [0, (-n) % multiple]
    if any(pads):
        x = F.pad(x, pads, mode=mode)
    return x, shape


def crop_to(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Undo :func:`pad_to_multiple`."""
    return x[(slice(None), slice(None)) + tuple(slice(0, n) for n in shape)]
