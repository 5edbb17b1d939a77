r"""Target registration error (TRE) of landmark pairs, in mm.

Convention (the most common bug in TRE code, so spelled out): the transform ``T`` maps points
of the **fixed** image's space to the **moving** image's space (``warped(x) = moving(T(x))``).
Fixed landmark ``f_k`` and moving landmark ``m_k`` mark the same anatomical point, so a perfect
registration has ``T(f_k) = m_k`` and

    ``TRE_k = ‖T(f_k) − m_k‖`` (world LPS mm).

Mapping the moving landmarks with ``T`` (or the fixed ones with ``T⁻¹``) is the wrong direction:
for a pure translation by ``t`` it gives ``2‖t‖`` instead of 0 (tested).

This is Learn2Reg's ``compute_tre`` (github.com/MDL-UzL/L2R ``evaluation/utils.py``: fixed
landmarks plus the displacement sampled there, minus the moving landmarks, scaled by the
spacing) in world coordinates. Learn2Reg samples the displacement with a cubic spline
(``scipy.ndimage.map_coordinates`` default ``order=3``); :func:`field_transform` samples it
linearly, as ITK's displacement field transform and :mod:`medreg.transforms` do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.grid import Grid
from medreg.metrics._common import to_jsonable

__all__ = ["TREResult", "tre", "field_transform", "distance_stats"]

PointMap = Callable[[Tensor], Tensor]


def distance_stats(d: np.ndarray) -> dict[str, float]:
    """``mean, std (ddof=0), median, min, max, p90`` of distances (NaN for an empty array)."""
    d = np.asarray(d, dtype=np.float64)
    if d.size == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "median": nan, "min": nan, "max": nan, "p90": nan}
    return {"mean": float(d.mean()), "std": float(d.std()), "median": float(np.median(d)),
            "min": float(d.min()), "max": float(d.max()), "p90": float(np.percentile(d, 90))}


@dataclass
class TREResult:
    """TRE of ``n`` landmark pairs, mm.

    Attributes:
        mean, std, median, min, max, p90: statistics of the per-landmark errors (std with
            ``ddof=0``).
        n: number of landmark pairs.
        per_landmark: ``‖T(f_k) − m_k‖`` for each pair, in input order.
        initial: the same statistics without registration (``‖f_k − m_k‖``).
        outside_grid: landmarks whose fixed position lies outside the displacement's grid (the
            field was extended with its border value there), when a grid is known.
    """

    mean: float
    std: float
    median: float
    min: float
    max: float
    p90: float
    n: int
    per_landmark: list[float] = field(default_factory=list)
    initial: dict[str, float] = field(default_factory=dict)
    outside_grid: int | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        out = dict(self.__dict__)
        out["definition"] = "TRE_k = ||T(fixed_k) - moving_k||, T: fixed -> moving, world mm"
        return to_jsonable(out)


def _points(p: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(p)
    if t.dim() != 2 or t.shape[1] not in (2, 3):
        raise InputError(f"{name}: landmarks must be a (K, 2) or (K, 3) array, got "
                         f"{tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{name}: landmarks contain NaN or infinite coordinates")
    return t


def field_transform(disp: Tensor, grid: Grid) -> PointMap:
    """``x ↦ x + u(x)`` for a world-mm displacement ``(1, D, *grid.shape)`` on ``grid``.

    ``u`` is interpolated linearly and extended with its border value outside the grid (as
    :class:`medreg.transforms.DisplacementField`).
    """
    from medreg.transforms.dense import displace_points

    u = torch.as_tensor(disp)
    if u.dim() == grid.ndim + 1:
        u = u.unsqueeze(0)

    field = u.to(torch.float64)

    def apply(points: Tensor) -> Tensor:
        return displace_points(field, grid, points.to(device=field.device, dtype=torch.float64))

    return apply


def _outside(points: Tensor, grid: Grid) -> int:
    idx = grid.transform_points(points.to(torch.float64), "world", "index")
    size = torch.tensor(grid.size, dtype=torch.float64)
    tol = 1e-6
    return int(((idx < -0.5 - tol) | (idx > size - 0.5 + tol)).any(dim=-1).sum())


def _apply(transform: PointMap, points: Tensor) -> Tensor:
    """Call ``transform`` with points in the dtype/device of its parameters (nn.Modules)."""
    ref = None
    if isinstance(transform, torch.nn.Module):
        ref = next(iter(list(transform.parameters()) + list(transform.buffers())), None)
    if ref is not None and ref.is_floating_point():
        out = transform(points.to(dtype=ref.dtype, device=ref.device))
    else:
        out = transform(points)
    return torch.as_tensor(out).to(torch.float64)


def tre(fixed_points: Tensor | np.ndarray, moving_points: Tensor | np.ndarray,
        transform: PointMap | None = None, *, grid: Grid | None = None,
        names: tuple[str, str] = ("fixed landmarks", "moving landmarks")) -> TREResult:
    """Target registration error of landmark pairs (see the module docstring).

    Args:
        fixed_points: ``(K, D)`` fixed-image landmarks, world LPS mm, ``x, y, z``.
        moving_points: ``(K, D)`` corresponding moving-image landmarks, world LPS mm.
        transform: any callable mapping ``(K, D)`` fixed-space points to moving space (a
            :mod:`medreg.transforms` module, a displacement field's ``forward``,
            :func:`field_transform`); ``None`` is the identity (TRE before registration).
        grid: the fixed/displacement grid, to count landmarks outside it (optional).
        names: how to call the two point sets in error messages (file names).

    Returns:
        :class:`TREResult` (mm).

    Raises:
        InputError: wrong shapes, different counts or dimensions, NaN coordinates.
    """
    f = _points(fixed_points, names[0])
    m = _points(moving_points, names[1])
    if f.shape != m.shape:
        raise InputError(f"{names[0]} ({f.shape[0]} points, {f.shape[1]}D) and {names[1]} "
                         f"({m.shape[0]} points, {m.shape[1]}D) do not pair up")
    if f.shape[0] == 0:
        raise InputError(f"{names[0]}: no landmarks")
    f = f.to(torch.float64)
    m = m.to(torch.float64)
    with torch.no_grad():
        mapped = f if transform is None else _apply(transform, f)
    if mapped.shape != f.shape:
        raise InputError(f"the transform returned points of shape {tuple(mapped.shape)} for "
                         f"{tuple(f.shape)} landmarks")
    err = torch.linalg.vector_norm(mapped.cpu() - m.cpu(), dim=-1).numpy()
    before = torch.linalg.vector_norm(f.cpu() - m.cpu(), dim=-1).numpy()
    return TREResult(**distance_stats(err), n=int(err.size), per_landmark=err.tolist(),
                     initial=distance_stats(before),
                     outside_grid=None if grid is None else _outside(f, grid))
