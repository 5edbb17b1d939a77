r"""Regularity of a displacement field: SD log-Jacobian, folding and non-diffeomorphic volume.

Input: a displacement ``u`` as ``(1, D, *grid.shape)`` (or ``(D, *grid.shape)``) world (LPS mm)
vectors with components ``x, y, z`` on ``grid``; the transform is ``T(x) = x + u(x)`` (fixed →
moving). The Jacobian determinant ``det J = det(I + ∂u/∂x)`` comes from
:func:`medreg.core.functional.jacobian_det` (central differences inside, one-sided at the
border, spacing and direction honoured). ``det J`` does not depend on the frame: it is the same
in voxel units as in mm, because the index and world Jacobians are similar matrices.

Definitions (the dict keys of :func:`displacement_metrics`):

``sdlogj``
    Textbook standard deviation of ``log det J`` over the voxels (of the mask) where
    ``det J > 0``; the logarithm is undefined where the map folds, so those voxels are left out
    and counted in ``sdlogj_excluded_voxels`` (and in ``folding_*``). Population std (``ddof=0``).

``sdlogj_l2r``
    The number Learn2Reg's official evaluation reports as ``LogJacDetStd``
    (github.com/MDL-UzL/L2R, ``evaluation/evaluation.py`` with ``jacobian_determinant`` in
    ``evaluation/utils.py``): ``det J`` of the voxel-unit field by central differences (kernel
    ``[-0.5, 0, 0.5]``), the two outermost voxels of every face dropped (``[2:-2]`` on each
    axis), then ``std(log(clip(det J + 3, 1e-9, 1e9)))`` (numpy ``std``, ``ddof=0``; with a
    mask, over the mask's voxels in that interior). Note the ``+ 3`` inside the logarithm,
    which this script adds before clipping: ``sdlogj_l2r`` is therefore much smaller than
    ``sdlogj`` and is only comparable with Learn2Reg leaderboards. The script's
    ``num_foldings`` counts ``det J + 3`` clipped to ``≥ 1e-9`` being ``≤ 0``, which is always
    0; use ``folding_count`` instead.

``folding_count``, ``folding_percent``
    Voxels (of the mask) with ``det J ≤ 0``, and their percentage.

``ndv_percent``, ``ndv_mm3``
    Non-diffeomorphic volume as LUMIR (Learn2Reg 2024) reports it
    (github.com/JHU-MedImage-Reg/LUMIR_L2R ``L2R_LUMIR_Eval``: ``digital_diffeomorphism.py``
    ``calc_measurements``, after Liu et al., "On finite difference Jacobian computation in
    deformable image registration", IJCV 2024). In 3D every voxel's neighbourhood is cut into
    tetrahedra in the two ways a cube splits into five: the eight corner tetrahedra of the
    one-sided difference stencils (``±x ±y ±z``) and the two central ones (vertex offsets
    ``(-1,-1,0), (-1,0,-1), (0,-1,-1)`` and ``(1,1,0), (0,1,1), (1,0,1)``). Each tetrahedron's
    signed volume after deformation is ``det / 6`` (voxel units, orientation of the identity
    positive); the voxel's NDV is half the sum of the negative volumes
    (``Σ max(-det, 0) / 12``). In 2D the four one-sided triangles give the non-diffeomorphic
    area (``Σ max(-det, 0) / 4``), as in Liu et al.'s ``digital_diffeomorphism`` package. It
    is computed on the voxels one step from the border inwards (``[1:-1]``, as LUMIR), and
    ``ndv_percent = 100 · Σ NDV / number of those voxels (of the mask)``. ``ndv_mm3`` is
    ``Σ NDV`` times the voxel volume.

Large fields are processed in slabs (with a one-voxel halo), so memory stays bounded.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.functional import jacobian_det
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.metrics._common import to_jsonable

__all__ = [
    "DISPLACEMENT_DEFINITIONS", "displacement_metrics", "jacobian_determinant",
    "sdlogj", "sdlogj_l2r", "folding", "non_diffeomorphic_volume",
]

#: Short definitions written next to the numbers (JSON, reports).
DISPLACEMENT_DEFINITIONS: dict[str, str] = {
    "sdlogj": "std(log det J) over voxels with det J > 0 (central differences, mm); ddof=0",
    "sdlogj_l2r": "Learn2Reg evaluation.py LogJacDetStd: std(log(clip(det J + 3, 1e-9, 1e9))) "
                  "on the [2:-2] interior",
    "folding_percent": "100 * #(det J <= 0) / #voxels (central differences)",
    "ndv_percent": "LUMIR non-diffeomorphic volume: tetrahedra (2 five-tetrahedra splits) "
                   "negative volume, 100 * sum / #voxels of the [1:-1] interior",
}

#: Voxels per slab when the determinant or the NDV is computed piecewise.
CHUNK_VOXELS = 1 << 21


# ----------------------------------------------------------------------------- input checks
def _field(disp: Tensor | np.ndarray, grid: Grid, name: str) -> Tensor:
    u = torch.as_tensor(disp)
    d = grid.ndim
    if u.dim() == d + 1:
        u = u.unsqueeze(0)
    if u.dim() != d + 2 or u.shape[1] != d or tuple(u.shape[2:]) != grid.shape:
        raise InputError(
            f"{name}: displacement must have shape (1, {d}, {', '.join(map(str, grid.shape))}) "
            f"to match its grid, got {tuple(u.shape)}")
    if u.shape[0] != 1:
        raise InputError(f"{name}: give one displacement field at a time (batch of {u.shape[0]})")
    if not u.is_floating_point():
        u = u.to(torch.float64)
    if not bool(torch.isfinite(u).all()):
        bad = int((~torch.isfinite(u)).sum())
        raise InputError(f"{name}: displacement contains {bad} NaN or infinite values")
    return u.detach()


def _mask(mask: Tensor | np.ndarray | Image | None, grid: Grid, name: str = "mask"
          ) -> np.ndarray | None:
    if mask is None:
        return None
    if isinstance(mask, Image):
        name = mask.name
        if not mask.grid.allclose(grid, atol=1e-3):
            raise InputError(f"{name}: the mask's grid {mask.grid!r} differs from the "
                             f"displacement's {grid!r}")
        mask = mask.data
    m = torch.as_tensor(mask).detach().cpu()
    if m.dim() == grid.ndim + 1 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != grid.shape:
        raise InputError(f"{name}: mask shape {tuple(m.shape)} differs from the displacement "
                         f"grid shape {grid.shape}")
    if m.is_floating_point() and not bool(torch.isfinite(m).all()):
        raise InputError(f"{name}: mask contains NaN or infinite values")
    return (m != 0).numpy()


def _slabs(n: int, per_row: int) -> Iterator[tuple[int, int]]:
    rows = max(1, CHUNK_VOXELS // max(per_row, 1))
    for s in range(0, n, rows):
        yield s, min(s + rows, n)


# ----------------------------------------------------------------------------- determinant
def jacobian_determinant(disp: Tensor | np.ndarray, grid: Grid, *,
                         name: str = "displacement") -> Tensor:
    """``det(I + ∂u/∂x)`` on every voxel, float64, shape ``grid.shape`` (on the CPU).

    Same values as :func:`medreg.core.functional.jacobian_det` (which does the work), computed
    slab by slab with a one-voxel halo to bound memory.
    """
    u = _field(disp, grid, name)
    n0 = grid.shape[0]
    per_row = int(np.prod(grid.shape[1:]))
    out = torch.empty(grid.shape, dtype=torch.float64)
    for s, e in _slabs(n0, per_row):
        lo, hi = max(s - 1, 0), min(e + 1, n0)
        slab = u[:, :, lo:hi].to(torch.float64)
        det = jacobian_det(slab, grid)[0]
        out[s:e] = det[s - lo: s - lo + (e - s)].cpu()
    return out


def _sdlogj(det: np.ndarray, mask: np.ndarray | None) -> tuple[float, int]:
    vals = det if mask is None else det[mask]
    pos = vals[vals > 0]
    excluded = int(vals.size - pos.size)
    if pos.size == 0:
        return float("nan"), excluded
    return float(np.log(pos).std()), excluded


def _sdlogj_l2r(det: np.ndarray, mask: np.ndarray | None) -> float:
    if any(n <= 4 for n in det.shape):
        return float("nan")
    inner = tuple(slice(2, -2) for _ in det.shape)
    vals = np.log(np.clip(det[inner] + 3.0, 1e-9, 1e9))
    if mask is not None:
        vals = vals[mask[inner]]
    return float(vals.std()) if vals.size else float("nan")


def sdlogj(disp: Tensor | np.ndarray, grid: Grid, mask: Tensor | np.ndarray | Image | None = None
           ) -> float:
    """Textbook SD of ``log det J`` (voxels with ``det J > 0``; see the module docstring)."""
    det = jacobian_determinant(disp, grid).numpy()
    return _sdlogj(det, _mask(mask, grid))[0]


def sdlogj_l2r(disp: Tensor | np.ndarray, grid: Grid,
               mask: Tensor | np.ndarray | Image | None = None) -> float:
    """Learn2Reg's ``LogJacDetStd`` (``std(log(clip(det J + 3)))`` on ``[2:-2]``; see above)."""
    det = jacobian_determinant(disp, grid).numpy()
    return _sdlogj_l2r(det, _mask(mask, grid))


def folding(disp: Tensor | np.ndarray, grid: Grid,
            mask: Tensor | np.ndarray | Image | None = None) -> dict[str, float]:
    """``{"folding_count", "folding_percent"}``: voxels (of the mask) with ``det J ≤ 0``."""
    det = jacobian_determinant(disp, grid).numpy()
    m = _mask(mask, grid)
    vals = det if m is None else det[m]
    count = int((vals <= 0).sum())
    return {"folding_count": count,
            "folding_percent": 100.0 * count / vals.size if vals.size else float("nan")}


# ----------------------------------------------------------------------------- NDV (LUMIR)
def _det3(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """Determinant of the matrix with columns a, b, c (each ``(3, ...)``)."""
    return (a[0] * (b[1] * c[2] - b[2] * c[1])
            - a[1] * (b[0] * c[2] - b[2] * c[0])
            + a[2] * (b[0] * c[1] - b[1] * c[0]))


def _det2(a: Tensor, b: Tensor) -> Tensor:
    return a[0] * b[1] - a[1] * b[0]


_ONE_SIDED_3D = [(sx, sy, sz) for sx in (1, -1) for sy in (1, -1) for sz in (1, -1)]
_STARS_3D = [((-1, -1, 0), (-1, 0, -1), (0, -1, -1)), ((1, 1, 0), (0, 1, 1), (1, 0, 1))]
_ONE_SIDED_2D = [(sx, sy) for sx in (1, -1) for sy in (1, -1)]


def _ndv_slab(u: Tensor) -> Tensor:
    """NDV per voxel of the interior of ``u`` (index-unit displacement ``(D, *shape)``).

    ``u`` components are in ``(x, y, z)`` index order, axes in tensor order; the result covers
    ``u.shape[1:]`` minus one voxel on every side.
    """
    d = u.shape[0]
    shape = u.shape[1:]
    centre = tuple(slice(1, n - 1) for n in shape)
    uc = u[(slice(None),) + centre]

    cache: dict[tuple[int, ...], Tensor] = {}

    def diff(off: tuple[int, ...]) -> Tensor:
        """φ(p + off) − φ(p) with ``off`` in (x, y, z) voxel steps."""
        if off not in cache:
            tsl = tuple(slice(1 + o, n - 1 + o) for o, n in zip(reversed(off), shape))
            v = u[(slice(None),) + tsl] - uc
            shift = torch.tensor(off, dtype=u.dtype).view(d, *([1] * d))
            cache[off] = v + shift
        return cache[off]

    def unit(axis: int, sign: int) -> Tensor:
        e = [0] * d
        e[axis] = sign
        v = diff(tuple(e))
        return v if sign > 0 else -v  # backward difference φ(p) − φ(p − e)

    total = torch.zeros(uc.shape[1:], dtype=u.dtype)
    if d == 3:
        for signs in _ONE_SIDED_3D:
            det = _det3(*(unit(a, s) for a, s in enumerate(signs)))
            total += torch.clamp(-det, min=0)
        for offs in _STARS_3D:
            ref = _det3(*(torch.tensor(o, dtype=u.dtype) for o in offs))  # identity: +2
            det = _det3(*(diff(o) for o in offs)) * torch.sign(ref)
            total += torch.clamp(-det, min=0)
        return total / 12.0
    for signs in _ONE_SIDED_2D:
        det = _det2(*(unit(a, s) for a, s in enumerate(signs)))
        total += torch.clamp(-det, min=0)
    return total / 4.0


def _ndv_map(u: Tensor, grid: Grid) -> Tensor:
    """NDV per voxel on the ``[1:-1]`` interior, float64 CPU, from a world-mm field."""
    d = grid.ndim
    shape = grid.shape
    if any(n < 3 for n in shape):
        return torch.zeros([max(n - 2, 0) for n in shape], dtype=torch.float64)
    index_from_world = grid.matrix("world", "index", dtype=torch.float64)[:d, :d]
    n0 = shape[0]
    out = torch.empty([n - 2 for n in shape], dtype=torch.float64)
    per_row = int(np.prod(shape[1:]))
    for s, e in _slabs(n0 - 2, per_row):  # output rows s..e-1 <-> input rows s+1..e
        slab = u[0, :, s: e + 2].to(device="cpu", dtype=torch.float64)
        u_idx = torch.einsum("jk,k...->j...", index_from_world, slab)
        out[s:e] = _ndv_slab(u_idx)
    return out


def non_diffeomorphic_volume(disp: Tensor | np.ndarray, grid: Grid,
                             mask: Tensor | np.ndarray | Image | None = None) -> dict[str, float]:
    """LUMIR's non-diffeomorphic volume (area in 2D); see the module docstring.

    Returns:
        ``{"ndv_percent", "ndv_mm3", "ndv_voxels"}``: the percentage of the evaluated volume,
        the volume in mm³ and in voxel units.
    """
    u = _field(disp, grid, "displacement")
    m = _mask(mask, grid)
    return _ndv_summary(_ndv_map(u, grid).numpy(), m, grid)


def _ndv_summary(ndv: np.ndarray, mask: np.ndarray | None, grid: Grid) -> dict[str, float]:
    if mask is not None and ndv.size:
        inner = tuple(slice(1, -1) for _ in mask.shape)
        ndv = ndv[mask[inner]]
    total = float(ndv.sum())
    return {"ndv_percent": 100.0 * total / ndv.size if ndv.size else float("nan"),
            "ndv_mm3": total * float(np.prod(grid.spacing)),
            "ndv_voxels": total}


# ----------------------------------------------------------------------------- summary
def displacement_metrics(disp: Tensor | np.ndarray, grid: Grid,
                         mask: Tensor | np.ndarray | Image | None = None, *,
                         name: str = "displacement", ndv: bool = True) -> dict[str, Any]:
    """All regularity metrics of one displacement field, JSON-ready.

    Args:
        disp: ``(1, D, *grid.shape)`` or ``(D, *grid.shape)`` world (LPS mm) displacement,
            components ``x, y, z``, of ``T(x) = x + u(x)`` on the fixed grid.
        grid: the grid the field is sampled on.
        mask: optional region (non-zero voxels) on ``grid``, e.g. the fixed image's mask.
        name: how to call the field in error messages (its file name).
        ndv: also the non-diffeomorphic volume (LUMIR's NDV, the costliest part; without it
            ``ndv_percent`` and ``ndv_mm3`` are ``None``).

    Returns:
        ``{"sdlogj", "sdlogj_excluded_voxels", "sdlogj_l2r", "folding_count",
        "folding_percent", "ndv_percent", "ndv_mm3", "det_j_min", "det_j_max", "det_j_mean",
        "displacement_mean_mm", "displacement_max_mm", "n_voxels", "masked"}`` (see the module
        docstring; undefined values are ``None``).

    Raises:
        InputError: wrong shape, NaN/inf values, several fields, mask not on the grid.
    """
    u = _field(disp, grid, name)
    m = _mask(mask, grid)
    det = jacobian_determinant(u, grid, name=name).numpy()
    sd, excluded = _sdlogj(det, m)
    vals = det if m is None else det[m]
    n = int(vals.size)
    folds = int((vals <= 0).sum())
    u64 = u[0].to(device="cpu", dtype=torch.float64).numpy()
    norm = np.sqrt(np.einsum("k...,k...->...", u64, u64))
    norm = norm if m is None else norm[m]
    out: dict[str, Any] = {
        "sdlogj": sd,
        "sdlogj_excluded_voxels": excluded,
        "sdlogj_l2r": _sdlogj_l2r(det, m),
        "folding_count": folds,
        "folding_percent": 100.0 * folds / n if n else math.nan,
        **({k: v for k, v in _ndv_summary(_ndv_map(u, grid).numpy(), m, grid).items()
            if k != "ndv_voxels"} if ndv else {"ndv_percent": None, "ndv_mm3": None}),
        "det_j_min": float(vals.min()) if n else math.nan,
        "det_j_max": float(vals.max()) if n else math.nan,
        "det_j_mean": float(vals.mean()) if n else math.nan,
        "displacement_mean_mm": float(norm.mean()) if n else math.nan,
        "displacement_max_mm": float(norm.max()) if n else math.nan,
        "n_voxels": n,
        "masked": m is not None,
    }
    return to_jsonable(out)
