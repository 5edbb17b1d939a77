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

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medreg.core.enums import Interpolation, Padding
from medreg.core.functional import matvec_field
from medreg.core.grid import Grid


def _inside_limits(shape: tuple[int, ...]) -> list[float]:
    """Per axis ``(x, y, z)``: the largest ``|norm|`` that ITK still counts as inside."""
    return [(1.0 + 1.0 / (n - 1) if n > 1 else 0.5) + 1e-6 for n in reversed(shape)]


def inside_mask(norm_points: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Boolean ``(N, *out)``: points within half a voxel of the grid (ITK's inside test)."""
    inside = None
    for ax, lim in enumerate(_inside_limits(shape)):
        ok = norm_points[..., ax].abs() <= lim
        inside = ok if inside is None else inside.logical_and_(ok)
    return inside


def _runs(flags: list[bool]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of True in ``flags``."""
    runs, start = [], None
    for k, f in enumerate(flags + [False]):
        if f and start is None:
            start = k
        elif not f and start is not None:
            runs.append((start, k))
            start = None
    return runs


def _profile(comp: Tensor, axis: int) -> tuple[list[float], list[float]]:
    """Min and max of ``comp`` over every axis but ``axis`` (two read-only reductions)."""
    others = tuple(k for k in range(comp.dim()) if k != axis)
    return comp.amin(dim=others).tolist(), comp.amax(dim=others).tolist()


def _profiles(norm_points: Tensor) -> list[tuple[int, list[float], list[float]]]:
    """Per coordinate component of ``(N, *o, D)`` points: ``(axis, lo, hi)``, its min and max
    on every hyperplane across the tensor axis of ``(N, *o)`` along which it varies most."""
    d = norm_points.dim() - 2
    out = []
    for ax in range(norm_points.shape[-1]):
        comp = norm_points[..., ax]
        corner = comp[(0,) * (d + 1)]  # one corner per axis tells the main direction
        ends = [comp[(0,) + tuple(-1 if k == j else 0 for k in range(d))] for j in range(d)]
        j = int(torch.stack(ends).sub_(corner).abs_().argmax()) + 1
        out.append((j, *_profile(comp, j)))
    return out


def _outside_parts(norm_points: Tensor, limits: list[tuple[float, float]],
                   profiles: list[tuple[int, list[float], list[float]]] | None = None
                   ) -> list[tuple[int, int, int, Tensor]]:
    """Where ``norm_points`` ``(N, *o, D)`` lie outside ``[lo, hi]`` (per component x, y, z).

    ITK's outside test without a full pass per axis (no gradient): per coordinate component,
    read-only min/max passes (:func:`_profiles`) give its range on every hyperplane across one
    output axis; only the hyperplanes that reach beyond a limit are tested point by point.
    Returns ``(axis, start, stop, bad)``: ``bad`` marks the outside points of
    ``narrow(axis, start, stop - start)`` of an ``(N, *o)`` tensor. A warp that stays inside
    costs the min/max passes only; one that leaves the grid near its faces tests a few slices.
    NaN points are outside.
    """
    parts: list[tuple[int, int, int, Tensor]] = []
    if norm_points.numel() == 0:
        return parts
    if profiles is None:
        profiles = _profiles(norm_points)
    for ax, ((lo_lim, hi_lim), (j, lo, hi)) in enumerate(zip(limits, profiles)):
        comp = norm_points[..., ax]
        # NaN fails every comparison: a NaN range marks its slice
        need = [not (a >= lo_lim and b <= hi_lim) for a, b in zip(lo, hi)]
        for r0, r1 in _runs(need):
            sub = comp.narrow(j, r0, r1 - r0)
            low = not min(lo[r0:r1]) >= lo_lim
            high = not max(hi[r0:r1]) <= hi_lim
            if any(b != b for b in hi[r0:r1]):  # NaN in the slice: a NaN-aware test
                bad = (sub >= lo_lim).logical_and_(sub <= hi_lim).logical_not_()
            elif low and high:
                bad = (sub < lo_lim).logical_or_(sub > hi_lim)
            else:  # one side only: one comparison
                bad = sub > hi_lim if high else sub < lo_lim
            parts.append((j, r0, r1, bad))
    return parts


def _fill_parts_(out: Tensor, parts: list[tuple[int, int, int, Tensor]], fill: float) -> None:
    """Apply :func:`_outside_parts` to ``out`` ``(N, C, *o)`` in place."""
    for j, r0, r1, bad in parts:
        out.narrow(j + 1, r0, r1 - r0).masked_fill_(bad.unsqueeze(1), fill)


def _fill_outside_(out: Tensor, norm_points: Tensor, shape: tuple[int, ...], fill: float) -> None:
    """Set ``out`` ``(N, C, *o)`` to ``fill`` where ``norm_points`` are outside (ITK's test)."""
    _fill_parts_(out, _outside_parts(norm_points, [(-lim, lim) for lim in _inside_limits(shape)]),
                 fill)


def dyadic_grid(grid: Grid) -> Grid:
    """``grid`` extended at its far end so that every axis has 1, 2 or ``2**k + 1`` voxels.

    The same index → world map for the voxels they share; the extended grid's ``norm`` frame is
    ``index * 2**(1 - k) - 1``, a power-of-two scale, so ``norm`` ↔ index conversions are exact
    in floating point: :func:`sample_lattice` uses it to sample exactly at integer indices.
    """
    after = [(1 << max(0, (n - 2).bit_length())) + 1 - n if n > 2 else 0 for n in grid.size]
    return grid.pad([0] * grid.ndim, after) if any(after) else grid


def sample_lattice(image: Tensor, lattice_points: Tensor,
                   interpolation: Interpolation | str = "linear",
                   padding: Padding | str = "zeros", fill: float = 0.0) -> Tensor:
    """Sample ``image`` at points given in the ``norm`` frame of its :func:`dyadic_grid`.

    No gradient. The index of a point is then recovered exactly inside ``grid_sample``, so an
    integer index returns the voxel value bit for bit even in float32 (an identity or an
    integer shift is exact) while non-integer points cost float32 arithmetic only.
    ``lattice_points`` is consumed: clamped in place to the image (the border behaviour), after
    the outside test.

    Args:
        image: ``(N, C, *shape)`` floating point; ``shape`` is the image's own (not extended).
        lattice_points: ``(N, *out, D)`` in the dyadic grid's ``norm`` frame, ``image.dtype``.
        interpolation: ``linear`` or ``nearest``.
        padding: ``zeros`` (``fill`` outside, ITK's test) or ``border``.

    Returns:
        ``(N, C, *out)``.
    """
    interpolation = Interpolation.from_arg(interpolation)
    padding = Padding.from_arg(padding)
    if interpolation is Interpolation.BSPLINE or padding is Padding.REFLECTION:
        raise ValueError("sample_lattice supports linear/nearest with zeros/border padding")
    shape = tuple(image.shape[2:])
    d = len(shape)
    n = max(image.shape[0], lattice_points.shape[0])
    if lattice_points.shape[0] != n:
        lattice_points = lattice_points.expand(n, *lattice_points.shape[1:]).clone()
    size_xyz = list(reversed(shape))
    full_xyz = [(1 << max(0, (k - 2).bit_length())) + 1 if k > 2 else k for k in size_xyz]
    limits, top = [], []
    for k, f in zip(size_xyz, full_xyz):
        if f == 1:  # a single voxel: grid_sample reads it for any coordinate
            limits.append((-0.5 - 1e-6, 0.5 + 1e-6))
            top.append(None)
        else:
            step = 2.0 / (f - 1)  # a power of two
            tol = 1e-6 * (k - 1) / 2 * step  # as _inside_limits: 1e-6 in the image's norm units
            limits.append((-1.0 - 0.5 * step - tol, -1.0 + (k - 0.5) * step + tol))
            top.append(-1.0 + (k - 1) * step)
    profiles = _profiles(lattice_points) if lattice_points.numel() else []
    parts = (_outside_parts(lattice_points, limits, profiles) if padding is Padding.ZEROS
             else [])
    for ax, (t, (j, _, hi)) in enumerate(zip(top, profiles)):
        if t is None:
            continue
        # index in [0, size - 1], as border padding: grid_sample clamps below 0 itself, and
        # only the slices that reach beyond the last voxel need clamping above
        for r0, r1 in _runs([not b <= t for b in hi]):
            sub = lattice_points[..., ax].narrow(j, r0, r1 - r0)
            if any(b != b for b in hi[r0:r1]):  # NaN: read voxel 0 (outside: filled)
                sub.nan_to_num_(nan=-1.0)
            sub.clamp_(max=t)
    # a view of the image with the dyadic sizes: grid_sample reads only indices <= size (the
    # clamped index and its right neighbour, weight 0), so the storage needs one slack row,
    # plane... past the image, zeroed; the rest of the view is never touched
    img = image.contiguous()
    strides = img.stride()
    sizes = list(img.shape[:2]) + list(reversed(full_xyz))
    extent = 1 + sum((s - 1) * st for s, st in zip(sizes, strides))
    slack = 1 + sum(strides[2:])
    buf = torch.empty(max(extent, img.numel() + slack), dtype=img.dtype, device=img.device)
    buf[: img.numel()].copy_(img.reshape(-1))
    buf[img.numel(): img.numel() + slack].zero_()
    view = buf.as_strided(sizes, strides)
    mode = "nearest" if interpolation is Interpolation.NEAREST else "bilinear"
    grid = lattice_points
    if grid.dim() - 2 != d:  # points not laid out as a grid: make them one
        grid = grid.reshape(n, -1, *([1] * (d - 1)), grid.shape[-1])
    if view.shape[0] != n:
        view = view.expand(n, *view.shape[1:])
    out = _grid_sample_threads(view, grid, mode, "border")
    out = out.reshape(n, image.shape[1], *lattice_points.shape[1:-1])
    _fill_parts_(out, parts, fill)
    return out


def _ramp_sum(row: list[float], shape: tuple[int, ...], axes: range, dtype: torch.dtype,
              device: torch.device) -> Tensor | None:
    """``sum_j row[j] * index_j`` over index axes ``axes`` (x = 0), broadcastable to
    ``(N, *shape)``; None when every coefficient is 0."""
    d = len(shape)
    acc = None
    for j in axes:
        if row[j] != 0:
            view = [1] * (d + 1)  # leading batch axis
            view[d - j] = shape[d - 1 - j]
            ramp = (torch.arange(shape[d - 1 - j], dtype=dtype, device=device) * row[j]).reshape(view)
            acc = ramp if acc is None else acc + ramp
    return acc


def affine_field_points(norm_from_index: Tensor, field_to_norm: Tensor, field: Tensor | None,
                        shape: tuple[int, ...]) -> Tensor:
    """``M · index + L · u(index)`` for every voxel of a grid of ``shape``: ``(N, *shape, D)``.

    Builds sampling coordinates without materialising an identity grid: the affine part is a
    sum of broadcast 1D ramps. Without gradients each component is written once into its own
    contiguous plane (the result is a ``movedim`` view of ``(N, D, *shape)`` storage, which
    ``grid_sample`` and the inside test read without strides) and then costs one extra pass per
    further field term. Differentiable with respect to ``norm_from_index``, ``field_to_norm``
    and ``field`` (:class:`_AffineFieldPoints`: the same forward pass, a reduced backward pass).

    Args:
        norm_from_index: ``(D+1, D+1)`` homogeneous matrix from target index (x, y, z) to the
            source's norm frame.
        field_to_norm: ``(D, D)`` linear map of the field's world vectors to source norm units.
        field: ``(N, D, *shape)`` world displacement on the target grid, or None.
        shape: target tensor shape ``(z, y, x)``.
    """
    dtype = norm_from_index.dtype if field is None else field.dtype
    m = norm_from_index.to(dtype)
    lin = field_to_norm.to(dtype)
    tracked = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (m, lin, field))
    if tracked:
        return _AffineFieldPoints.apply(m, lin, field, tuple(shape))
    return _affine_field_points_values(m, lin, field, tuple(shape))


def _affine_field_points_values(m: Tensor, lin: Tensor, field: Tensor | None,
                                shape: tuple[int, ...]) -> Tensor:
    """The values of :func:`affine_field_points` (``m`` and ``lin`` already in the output dtype)."""
    d = len(shape)
    n = 1 if field is None else field.shape[0]
    dtype, device = m.dtype, m.device
    rows, lrows = m.tolist(), lin.tolist()
    out = torch.empty(n, d, *shape, dtype=dtype, device=device)
    for i in range(d):
        oi = out[:, i]
        # the affine part in at most two small broadcast pieces: slow axes, then x
        slow = _ramp_sum(rows[i], shape, range(1, d), dtype, device)
        fast = _ramp_sum(rows[i], shape, range(0, 1), dtype, device)
        terms = [] if field is None else [(j, lrows[i][j]) for j in range(d) if lrows[i][j] != 0]
        if slow is None or fast is None:  # one piece: fold the offset into it (a small tensor)
            piece = slow if fast is None else fast
            piece = (torch.full([1] * (d + 1), rows[i][d], dtype=dtype, device=device) if piece is None
                     else piece + rows[i][d])
            rest = None
        else:
            piece, rest = slow + rows[i][d], fast
        if terms:
            j0, l0 = terms.pop(0)
            torch.add(piece, field[:, j0], alpha=l0, out=oi)
        else:  # broadcast pieces (their sum may still miss axes with zero ramps): expand into place
            oi.copy_((piece if rest is None else piece + rest).expand(n, *shape))
            rest = None
        for j, lj in terms:
            oi.add_(field[:, j], alpha=lj)
        if rest is not None:
            oi.add_(rest)
    return out.movedim(1, -1)


class _AffineFieldPoints(torch.autograd.Function):
    """:func:`affine_field_points` with gradients: the forward pass is the untracked one (a few
    whole-grid passes); the backward pass reduces the incoming gradient to per-axis profiles, so
    a linear stage's step costs a few dozen operations whatever the grid, and every matrix entry
    gets its gradient (also those that are exactly 0, e.g. the off-diagonal entries of an
    identity start on an axis-aligned grid, where skipping zero terms would freeze them)."""

    @staticmethod
    def forward(ctx, m: Tensor, lin: Tensor, field: Tensor | None, shape: tuple[int, ...]) -> Tensor:
        ctx.shape = shape
        ctx.save_for_backward(lin, field)
        return _affine_field_points_values(m, lin, field, shape)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        lin, field = ctx.saved_tensors
        shape = ctx.shape
        d = len(shape)
        g_m = g_lin = g_field = None
        if ctx.needs_input_grad[0]:
            # d/dm[i, j] = Σ_voxels grad_i · index_j, j = D: Σ grad_i (index x is the last axis)
            cols = []
            for j in range(d):
                axis = d - j  # tensor axis of index j in (N, *shape, D)
                profile = grad.sum(dim=[k for k in range(d + 1) if k != axis])  # (n_j, D)
                ramp = torch.arange(shape[d - 1 - j], dtype=grad.dtype, device=grad.device)
                cols.append(ramp @ profile)
            cols.append(grad.sum(dim=list(range(d + 1))))
            g_m = torch.nn.functional.pad(torch.stack(cols, dim=1), (0, 0, 0, 1))
        if field is not None and ctx.needs_input_grad[1]:
            g_lin = torch.einsum("n...i,nj...->ij", grad, field)
        if field is not None and ctx.needs_input_grad[2]:
            g_field = torch.einsum("n...i,ij->nj...", grad, lin)
        return g_m, g_lin, g_field, None


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
    tracked = torch.is_grad_enabled() and (image.requires_grad or norm_points.requires_grad)
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
        if tracked:
            out = F.grid_sample(image, grid, mode=mode, padding_mode=torch_pad, align_corners=True)
        else:
            out = _grid_sample_threads(image, grid, mode, torch_pad)
        out = out.reshape(n, image.shape[1], *norm_points.shape[1:-1])
    if padding is Padding.ZEROS:
        if tracked:
            outside = inside_mask(norm_points, shape).logical_not_().unsqueeze(1)
            out = out.masked_fill(outside, fill)
        else:
            _fill_outside_(out, norm_points, shape, fill)
    return out


def _grid_sample_threads(image: Tensor, grid: Tensor, mode: str, padding_mode: str) -> Tensor:
    """``grid_sample`` (``align_corners=True``, no gradient) using all intra-op threads.

    PyTorch's CPU ``grid_sample`` parallelises over the batch only, so a single image would be
    sampled by one thread. Here the output is cut along its first axis into as many parts as
    threads and sampled as a batch of the same image (expanded, not copied); the parts are
    views of one output, so this is the same computation, bit for bit.
    """
    n = image.shape[0]
    depth = grid.shape[1]
    parts = min(torch.get_num_threads(), depth) if image.device.type == "cpu" and n == 1 else 1
    if parts <= 1:
        return F.grid_sample(image, grid, mode=mode, padding_mode=padding_mode, align_corners=True)
    k = depth // parts
    main = k * parts
    batch = image.expand(parts, *image.shape[1:])
    out = F.grid_sample(batch, grid[:, :main].squeeze(0).unflatten(0, (parts, k)), mode=mode,
                        padding_mode=padding_mode, align_corners=True)
    out = out.transpose(0, 1).reshape(1, image.shape[1], main, *grid.shape[2:-1])
    if main == depth:
        return out
    rest = F.grid_sample(image, grid[:, main:], mode=mode, padding_mode=padding_mode,
                         align_corners=True)
    return torch.cat([out, rest], dim=2)


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
    w = matvec_field(norm_from_world, velocity) / (2 ** steps)
    ident = grid.points("norm", dtype=velocity.dtype, device=velocity.device)
    for _ in range(steps):
        w = w + _field_sample(w, ident + w.movedim(1, -1)).movedim(-1, 1)
    world_from_norm = torch.linalg.inv(norm_from_world)
    return matvec_field(world_from_norm, w)


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
