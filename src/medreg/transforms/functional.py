"""Pure tensor functions behind the transform modules: sampling, dense-field algebra.

Convention:
    Sampling positions are given in the source grid's ``norm`` frame (``grid_sample`` with
    ``align_corners=True``), components ``(x, y, z)``. Outside handling follows ITK's
    ``ResampleImageFilter``: a point is inside when its continuous index lies in
    ``[-0.5, size - 0.5]`` on every axis; inside, values near the edge come from the edge voxels
    (no blending with the fill value); outside, the ``fill`` value (``Padding.ZEROS``) or the
    border/mirrored value (``BORDER``/``REFLECTION``).
    Dense fields here are ``(N, D, *shape)`` displacements in world mm on a :class:`Grid`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medreg.core.enums import Interpolation, Padding
from medreg.core.grid import Grid


def inside_mask(norm_points: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Boolean ``(N, *out)``: points within half a voxel of the grid (ITK's inside test)."""
    size_xyz = tuple(reversed(shape))
    inside = None
    for ax, n in enumerate(size_xyz):
        lim = (1.0 + 1.0 / (n - 1) if n > 1 else 0.5) + 1e-6
        ok = norm_points[..., ax].abs() <= lim
        inside = ok if inside is None else inside.logical_and_(ok)
    return inside


def affine_field_points(norm_from_index: Tensor, field_to_norm: Tensor, field: Tensor | None,
                        shape: tuple[int, ...]) -> Tensor:
    """``M · index + L · u(index)`` for every voxel of a grid of ``shape``: ``(N, *shape, D)``.

    Builds sampling coordinates without materialising an identity grid: the affine part is a
    sum of broadcast 1D ramps, and each output component costs one pass over ``field``.
    Differentiable with respect to ``norm_from_index``, ``field_to_norm`` and ``field``.

    Args:
        norm_from_index: ``(D+1, D+1)`` homogeneous matrix from target index (x, y, z) to the
            source's norm frame.
        field_to_norm: ``(D, D)`` linear map of the field's world vectors to source norm units.
        field: ``(N, D, *shape)`` world displacement on the target grid, or None.
        shape: target tensor shape ``(z, y, x)``.
    """
    d = len(shape)
    n = 1 if field is None else field.shape[0]
    dtype = norm_from_index.dtype if field is None else field.dtype
    device = norm_from_index.device
    out = torch.empty(n, *shape, d, dtype=dtype, device=device)
    m = norm_from_index.to(dtype)
    lin = field_to_norm.to(dtype)
    for i in range(d):
        acc = m[i, d].reshape([1] * (d + 1))
        for j in range(d):  # index axis j (x = last tensor axis)
            if bool(m[i, j] != 0):
                ramp = torch.arange(shape[d - 1 - j], dtype=dtype, device=device) * m[i, j]
                view = [1] * (d + 1)
                view[d - j] = -1
                acc = acc + ramp.reshape(view)
        val = None
        if field is not None:
            for j in range(d):
                if bool(lin[i, j] != 0):
                    term = field[:, j] * lin[i, j]
                    val = term if val is None else val + term
        out[..., i] = acc.expand(n, *shape) if val is None else val + acc
    return out


def _mirror(i: Tensor, n: int) -> Tensor:
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i.abs(), period)
    return torch.where(i >= n, period - i, i)


def bspline_coefficients(image: Tensor) -> Tensor:
    """Cubic B-spline interpolation coefficients of ``(N, C, *shape)`` (mirror boundary).

    Uses :func:`scipy.ndimage.spline_filter` (the same prefilter and boundary as ITK's
    ``BSplineInterpolateImageFunction``). Not differentiable with respect to the image.
    """
    from scipy.ndimage import spline_filter

    arr = image.detach().cpu().double().numpy()
    out = np.empty_like(arr)
    for n in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            out[n, c] = spline_filter(arr[n, c], order=3, mode="mirror")
    return torch.from_numpy(out).to(device=image.device, dtype=image.dtype if
                                    image.is_floating_point() else torch.float32)


def _bspline_weights(t: Tensor) -> list[Tensor]:
    t2, t3 = t * t, t * t * t
    return [(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6]


def bspline_sample(coeff: Tensor, index_points: Tensor) -> Tensor:
    """Evaluate a cubic B-spline with coefficients ``(N, C, *shape)`` at continuous indices.

    Args:
        coeff: coefficients from :func:`bspline_coefficients`.
        index_points: ``(N, *out, D)`` continuous voxel indices, ``(x, y, z)``.

    Returns:
        ``(N, C, *out)``; differentiable with respect to ``index_points``.
    """
    n, c = coeff.shape[:2]
    shape = coeff.shape[2:]
    d = len(shape)
    out_shape = index_points.shape[1:-1]
    pts = index_points.reshape(index_points.shape[0], -1, d)
    if pts.shape[0] != n:
        pts = pts.expand(n, -1, -1)
    flat = coeff.reshape(n, c, -1)
    strides = [int(np.prod(shape[len(shape) - k:])) for k in range(d)]  # x stride 1, y nx, ...
    per_axis = []
    for ax in range(d):  # ax 0 = x
        p = pts[..., ax]
        f = torch.floor(p)
        w = _bspline_weights(p - f)
        base = f.long() - 1
        size = shape[d - 1 - ax]
        idx = [_mirror(base + k, size) * strides[ax] for k in range(4)]
        per_axis.append((w, idx))
    result = torch.zeros(n, c, pts.shape[1], dtype=coeff.dtype, device=coeff.device)
    for combo in np.ndindex(*([4] * d)):
        w = None
        lin = None
        for ax, k in enumerate(combo):
            wk, ik = per_axis[ax][0][k], per_axis[ax][1][k]
            w = wk if w is None else w * wk
            lin = ik if lin is None else lin + ik
        vals = torch.gather(flat, 2, lin.unsqueeze(1).expand(n, c, -1))
        result = result + vals * w.unsqueeze(1).to(coeff.dtype)
    return result.reshape(n, c, *out_shape)


def sample(image: Tensor, norm_points: Tensor, interpolation: Interpolation | str = "linear",
           padding: Padding | str = "zeros", fill: float = 0.0, *,
           bspline_coeff: Tensor | None = None) -> Tensor:
    """Sample ``image`` at ``norm_points`` of its own grid.

    Args:
        image: ``(N, C, *shape)`` floating point.
        norm_points: ``(N, *out, D)`` in the image grid's ``norm`` frame (x, y, z).
        interpolation: ``nearest``, ``linear`` or ``bspline`` (cubic B-spline).
        padding: ``zeros`` (constant ``fill``), ``border`` or ``reflection`` outside the image.
        fill: value outside the image for ``padding="zeros"``.
        bspline_coeff: precomputed :func:`bspline_coefficients` (reused across calls).

    Returns:
        ``(N, C, *out)``.
    """
    interpolation = Interpolation.from_arg(interpolation)
    padding = Padding.from_arg(padding)
    n = max(image.shape[0], norm_points.shape[0])
    if image.shape[0] != n:
        image = image.expand(n, *image.shape[1:])
    if norm_points.shape[0] != n:
        norm_points = norm_points.expand(n, *norm_points.shape[1:])
    norm_points = norm_points.to(image.dtype)
    shape = tuple(image.shape[2:])
    if interpolation is Interpolation.BSPLINE:
        coeff = bspline_coefficients(image) if bspline_coeff is None else bspline_coeff
        size_xyz = torch.tensor(list(reversed(shape)), dtype=image.dtype, device=image.device)
        idx = (norm_points + 1) * (size_xyz - 1).clamp(min=1) / 2
        idx = torch.where(size_xyz > 1, idx, norm_points)
        if padding is Padding.BORDER:
            idx = torch.minimum(idx.clamp(min=0), size_xyz - 1)
        out = bspline_sample(coeff, idx)
    else:
        mode = "nearest" if interpolation is Interpolation.NEAREST else "bilinear"
        torch_pad = "reflection" if padding is Padding.REFLECTION else "border"
        grid = norm_points
        if grid.dim() - 2 != len(shape):  # points not laid out as a grid: make them one
            grid = grid.reshape(n, -1, *([1] * (len(shape) - 1)), grid.shape[-1])
        out = F.grid_sample(image, grid, mode=mode, padding_mode=torch_pad, align_corners=True)
        out = out.reshape(n, image.shape[1], *norm_points.shape[1:-1])
    if padding is Padding.ZEROS:
        outside = inside_mask(norm_points, shape).logical_not_().unsqueeze(1)
        out = out.masked_fill(outside, fill)
    return out


def _field_sample(field: Tensor, norm_points: Tensor) -> Tensor:
    """Linear sample of a vector field with border extension; returns ``(N, *out, D)``."""
    out = sample(field, norm_points, "linear", "border")
    return out.movedim(1, -1)


def compose_displacements(outer: Tensor, inner: Tensor, grid: Grid) -> Tensor:
    """Displacement of ``A ∘ B`` from those of ``A`` (``outer``) and ``B`` (``inner``).

    ``u(x) = u_B(x) + u_A(x + u_B(x))``; both ``(N, D, *grid.shape)`` world mm on ``grid``.
    """
    pts = grid.points(dtype=inner.dtype, device=inner.device)
    moved = pts + inner.movedim(1, -1)
    return inner + _field_sample(outer, grid.transform_points(moved, "world", "norm")).movedim(-1, 1)


def scaling_and_squaring(velocity: Tensor, grid: Grid, steps: int = 7) -> Tensor:
    """Displacement of ``exp(v)`` for a stationary velocity ``(N, D, *shape)`` (world mm).

    ``u₀ = v / 2^steps``, then ``steps`` times ``u ← u + u ∘ (id + u)``. Computed in ``norm``
    units (a fixed linear map of world vectors on this grid), converted back at the end.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    norm_from_world = grid.matrix("world", "norm", dtype=velocity.dtype,
                                  device=velocity.device)[: grid.ndim, : grid.ndim]
    w = torch.einsum("ij,nj...->ni...", norm_from_world, velocity) / (2 ** steps)
    ident = grid.points("norm", dtype=velocity.dtype, device=velocity.device)
    for _ in range(steps):
        w = w + _field_sample(w, ident + w.movedim(1, -1)).movedim(-1, 1)
    world_from_norm = torch.linalg.inv(norm_from_world)
    return torch.einsum("ij,nj...->ni...", world_from_norm, w)


def invert_displacement(displacement: Tensor, grid: Grid, iterations: int = 50,
                        tolerance: float = 1e-4) -> tuple[Tensor, float]:
    """Inverse of ``x ↦ x + u(x)`` on ``grid`` by fixed-point iteration ``v ← −u(x + v)``.

    Args:
        displacement: ``(N, D, *shape)`` world mm.
        iterations: maximum number of iterations.
        tolerance: stop when the max residual ``|v(x) + u(x + v(x))|`` (mm) falls below it.

    Returns:
        ``(inverse displacement, residual)`` where ``residual`` is the final max residual in mm
        over points whose image stays inside the grid.
    """
    pts = grid.points(dtype=displacement.dtype, device=displacement.device)
    v = -displacement.detach().clone()
    residual = float("inf")
    for _ in range(max(1, iterations)):
        q = grid.transform_points(pts + v.movedim(1, -1), "world", "norm")
        u_at = _field_sample(displacement, q).movedim(-1, 1)
        r = v + u_at
        inside = inside_mask(q, grid.shape).unsqueeze(1)
        residual = float((r.abs() * inside).amax()) if inside.any() else 0.0
        if residual < tolerance:
            break
        v = -u_at
    return v, residual
