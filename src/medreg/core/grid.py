r"""The sampling grid of an image: size, spacing, origin and direction (ITK's image geometry).

A :class:`Grid` is the only place where matrices between the index, normalised and world frames
are built (:meth:`Grid.matrix`). Everything else asks it.

Convention:
    ``world = origin + direction @ diag(spacing) @ index`` with ``index`` a continuous voxel
    index in ``(x, y, z)`` order and ``world`` in LPS millimetres. ``norm`` is the coordinate
    ``torch.nn.functional.grid_sample`` expects with ``align_corners=True``:
    ``norm = 2 * index / (size - 1) - 1`` (the centres of the first and last voxels are -1 and
    +1; an axis of size 1 uses ``norm = index``).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from medreg.core.enums import Frame
from medreg.core.errors import GeometryError

#: Tolerance on |DᵀD − I| for a direction matrix to be accepted as orthonormal.
DIRECTION_TOLERANCE = 1e-4

_LPS_LETTERS = (("L", "R"), ("P", "A"), ("S", "I"))


def _as_tuple(value: Iterable[float] | float, ndim: int, name: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)):
        return (float(value),) * ndim
    out = tuple(float(v) for v in value)
    if len(out) != ndim:
        raise GeometryError(f"{name} has {len(out)} values but the grid has {ndim} dimensions")
    return out


class Grid:
    """Geometry of a regular sampling grid in 2D or 3D.

    Args:
        size: number of voxels per axis, ``(x, y, z)`` order (ITK's ``GetSize()``).
        spacing: voxel spacing in mm, ``(x, y, z)``; default 1.
        origin: world (LPS mm) position of the centre of voxel 0; default 0.
        direction: ``D×D`` direction cosines; column ``j`` is the world direction of index
            axis ``j`` (ITK's ``GetDirection()`` reshaped row-major); default identity.

    Raises:
        GeometryError: on non-positive size or spacing, or a direction that is not orthonormal.
    """

    __slots__ = ("_size", "_spacing", "_origin", "_direction", "_frames")

    def __init__(
        self,
        size: Sequence[int],
        spacing: Sequence[float] | float | None = None,
        origin: Sequence[float] | float | None = None,
        direction: Sequence[Sequence[float]] | np.ndarray | Sequence[float] | None = None,
    ) -> None:
        size_t = tuple(int(s) for s in size)
        ndim = len(size_t)
        if ndim not in (2, 3):
            raise GeometryError(f"a grid must be 2D or 3D, got {ndim} dimensions (size {size_t})")
        if any(s < 1 for s in size_t):
            raise GeometryError(f"grid size must be positive, got {size_t}")
        spacing_t = _as_tuple(1.0 if spacing is None else spacing, ndim, "spacing")
        if any(not (s > 0 and math.isfinite(s)) for s in spacing_t):
            raise GeometryError(f"spacing must be positive and finite, got {spacing_t}")
        origin_t = _as_tuple(0.0 if origin is None else origin, ndim, "origin")
        if any(not math.isfinite(o) for o in origin_t):
            raise GeometryError(f"origin must be finite, got {origin_t}")
        if direction is None:
            dmat = np.eye(ndim)
        else:
            dmat = np.asarray(direction, dtype=np.float64)
            if dmat.size != ndim * ndim:
                raise GeometryError(f"direction must have {ndim}x{ndim} values, got {dmat.size}")
            dmat = dmat.reshape(ndim, ndim)
        if not np.all(np.isfinite(dmat)):
            raise GeometryError("direction matrix contains NaN or infinite values")
        err = np.abs(dmat.T @ dmat - np.eye(ndim)).max()
        if err > DIRECTION_TOLERANCE:
            raise GeometryError(
                f"direction matrix is not orthonormal (|DᵀD−I| = {err:.3g}; det = "
                f"{np.linalg.det(dmat):.3g}): the header is sheared or singular; "
                "reorient/resample the image (e.g. with ITK or FSL) before registration"
            )
        dmat.setflags(write=False)
        self._size = size_t
        self._spacing = spacing_t
        self._origin = origin_t
        self._direction = dmat
        #: cache of the read-only frame matrices (a grid never changes after construction)
        self._frames: dict = {}

    # ------------------------------------------------------------------ properties
    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return len(self._size)

    @property
    def size(self) -> tuple[int, ...]:
        """Voxels per axis, ``(x, y, z)``."""
        return self._size

    @property
    def shape(self) -> tuple[int, ...]:
        """Voxels per axis in tensor order, ``(z, y, x)``."""
        return tuple(reversed(self._size))

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel spacing in mm, ``(x, y, z)``."""
        return self._spacing

    @property
    def origin(self) -> tuple[float, ...]:
        """World position (LPS mm) of the centre of voxel 0."""
        return self._origin

    @property
    def direction(self) -> np.ndarray:
        """``D×D`` direction cosines (read-only); column j is index axis j in world."""
        return self._direction

    @property
    def numel(self) -> int:
        """Number of voxels."""
        return int(np.prod(self._size))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_shape(cls, shape: Sequence[int], **kwargs) -> "Grid":
        """Grid from a tensor shape ``(z, y, x)`` (other geometry as keyword arguments)."""
        return cls(tuple(reversed(tuple(shape))), **kwargs)

    def replace(self, **kwargs) -> "Grid":
        """Copy with some of ``size``, ``spacing``, ``origin``, ``direction`` replaced."""
        args = {"size": self._size, "spacing": self._spacing, "origin": self._origin,
                "direction": self._direction}
        unknown = set(kwargs) - set(args)
        if unknown:
            raise TypeError(f"Grid.replace got unknown fields {sorted(unknown)}")
        args.update(kwargs)
        return Grid(**args)

    def to_dict(self) -> dict:
        """Plain-Python description (JSON/YAML serialisable)."""
        return {"size": list(self._size), "spacing": list(self._spacing),
                "origin": list(self._origin), "direction": self._direction.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Grid":
        return cls(d["size"], d.get("spacing"), d.get("origin"), d.get("direction"))

    # ------------------------------------------------------------------ comparison
    def allclose(self, other: "Grid", atol: float = 1e-4) -> bool:
        """Same size and geometry within ``atol`` (mm for origin, relative for spacing)."""
        return (
            isinstance(other, Grid)
            and self._size == other._size
            and np.allclose(self._spacing, other._spacing, rtol=1e-5, atol=atol)
            and np.allclose(self._origin, other._origin, atol=atol)
            and np.allclose(self._direction, other._direction, atol=atol)
        )

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        if not isinstance(other, Grid):
            return False
        if (self._size == other._size and self._spacing == other._spacing
                and self._origin == other._origin
                and np.array_equal(self._direction, other._direction)):
            return True
        return self.allclose(other, atol=1e-6)

    def __hash__(self) -> int:
        return hash(self._size)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:g}" for s in self._spacing)
        org = ", ".join(f"{o:.4g}" for o in self._origin)
        return (f"Grid(size={self._size}, spacing=({sp}), origin=({org}), "
                f"orientation={self.orientation()})")

    # ------------------------------------------------------------------ frames
    def _affine(self, frame: Frame, inverse: bool = False) -> np.ndarray:
        """Homogeneous matrix ``index_from_<frame>`` (``<frame>_from_index`` with ``inverse``)
        in float64, read-only (computed once per grid)."""
        key = (frame, inverse)
        m = self._frames.get(key)
        if m is None:
            m = np.linalg.inv(self._affine(frame)) if inverse else self._index_from(frame)
            m.setflags(write=False)
            self._frames[key] = m
        return m

    def _index_from(self, frame: Frame) -> np.ndarray:
        d = self.ndim
        m = np.eye(d + 1)
        if frame is Frame.INDEX:
            return m
        if frame is Frame.NORM:
            for i, n in enumerate(self._size):
                if n > 1:
                    m[i, i] = (n - 1) / 2.0
                    m[i, d] = (n - 1) / 2.0
            return m
        # world -> index = (D S)^-1 (x - o)
        ds = self._direction * np.asarray(self._spacing)[None, :]
        inv = np.linalg.inv(ds)
        m[:d, :d] = inv
        m[:d, d] = -inv @ np.asarray(self._origin)
        return m

    def matrix_np(self, from_frame: Frame | str, to_frame: Frame | str,
                  to_grid: "Grid | None" = None) -> np.ndarray:
        """As :meth:`matrix`, as a float64 numpy array."""
        src = Frame.from_arg(from_frame)
        dst = Frame.from_arg(to_frame)
        other = self if to_grid is None else to_grid
        if other.ndim != self.ndim:
            raise GeometryError(f"cannot relate a {self.ndim}D grid to a {other.ndim}D grid")
        index_from_src = self._affine(src)
        # between two grids, go through the world frame
        if other is self:
            dst_index_from_src_index = np.eye(self.ndim + 1)
        else:
            world_from_index_self = self._affine(Frame.WORLD, inverse=True)
            dst_index_from_src_index = other._affine(Frame.WORLD) @ world_from_index_self
        dst_from_dst_index = other._affine(dst, inverse=True)
        return dst_from_dst_index @ dst_index_from_src_index @ index_from_src

    def matrix(self, from_frame: Frame | str, to_frame: Frame | str,
               to_grid: "Grid | None" = None, *, dtype: torch.dtype = torch.float64,
               device: torch.device | str | None = None) -> Tensor:
        """Homogeneous ``(D+1, D+1)`` matrix ``<to>_from_<from>``.

        Maps points given in ``from_frame`` of this grid to ``to_frame`` of ``to_grid``
        (default: this grid). Built in float64, then cast to ``dtype`` on ``device``.
        """
        return torch.as_tensor(self.matrix_np(from_frame, to_frame, to_grid), dtype=dtype,
                               device=device)

    # named shortcuts
    def world_from_index(self, **kw) -> Tensor:
        return self.matrix(Frame.INDEX, Frame.WORLD, **kw)

    def index_from_world(self, **kw) -> Tensor:
        return self.matrix(Frame.WORLD, Frame.INDEX, **kw)

    def norm_from_world(self, **kw) -> Tensor:
        return self.matrix(Frame.WORLD, Frame.NORM, **kw)

    def world_from_norm(self, **kw) -> Tensor:
        return self.matrix(Frame.NORM, Frame.WORLD, **kw)

    def transform_points(self, points: Tensor, from_frame: Frame | str, to_frame: Frame | str,
                         to_grid: "Grid | None" = None) -> Tensor:
        """Map points ``(..., D)`` between frames (dtype and device follow ``points``)."""
        m = self.matrix(from_frame, to_frame, to_grid, dtype=points.dtype, device=points.device)
        d = self.ndim
        return points @ m[:d, :d].T + m[:d, d]

    def transform_vectors(self, vectors: Tensor, from_frame: Frame | str, to_frame: Frame | str,
                          to_grid: "Grid | None" = None, *, channel_dim: int = -1) -> Tensor:
        """Map free vectors (no translation) between frames; components along ``channel_dim``."""
        m = self.matrix(from_frame, to_frame, to_grid, dtype=vectors.dtype,
                        device=vectors.device)[: self.ndim, : self.ndim]
        v = vectors.movedim(channel_dim, -1)
        return (v @ m.T).movedim(-1, channel_dim)

    def points(self, frame: Frame | str = Frame.WORLD, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Tensor:
        """Coordinates of every voxel centre, shape ``(*shape, D)`` (components x, y, z)."""
        frame = Frame.from_arg(frame)
        d = self.ndim
        m = self.matrix(Frame.INDEX, frame, dtype=torch.float64, device=device)
        # affine in the index: the sum of one (n_axis, D) profile per axis, broadcast (float64,
        # as a matrix product of the index mesh would be, without building that mesh)
        out = m[:d, d].reshape((1,) * d + (d,))
        for axis, n in enumerate(self.shape):  # tensor axis a holds index component d − 1 − a
            i = torch.arange(n, dtype=torch.float64, device=device)
            view = [1] * d + [d]
            view[axis] = n
            out = out + (i[:, None] * m[:d, d - 1 - axis]).reshape(view)
        return out.to(dtype)

    # ------------------------------------------------------------------ derived grids
    def center(self) -> tuple[float, ...]:
        """World position of the grid's geometric centre."""
        mid = torch.tensor([(n - 1) / 2.0 for n in self._size], dtype=torch.float64)
        return tuple(self.transform_points(mid, Frame.INDEX, Frame.WORLD).tolist())

    def corners(self, edges: bool = False) -> Tensor:
        """World positions of the ``2**D`` corner voxel centres, ``(2**D, D)`` float64; with
        ``edges`` the corners of the voxels' outer edges (index −0.5 and ``size − 0.5``)."""
        import itertools

        lo, hi = (-0.5, 0.5) if edges else (0.0, 1.0)
        idx = torch.tensor(list(itertools.product(*[(lo, n - hi) for n in self._size])),
                           dtype=torch.float64)
        return self.transform_points(idx, Frame.INDEX, Frame.WORLD)

    def resize(self, size: Sequence[int]) -> "Grid":
        """Grid covering the same physical box (voxel edges) with another number of voxels."""
        size_t = tuple(int(s) for s in size)
        if len(size_t) != self.ndim:
            raise GeometryError(f"resize needs {self.ndim} sizes, got {size_t}")
        spacing = tuple(sp * n / m for sp, n, m in zip(self._spacing, self._size, size_t))
        # keep the outer edge of voxel 0: origin - sp/2 stays fixed
        shift = np.asarray([(s_new - s_old) / 2.0 for s_new, s_old in zip(spacing, self._spacing)])
        origin = np.asarray(self._origin) + self._direction @ shift
        return Grid(size_t, spacing, origin.tolist(), self._direction)

    def downsample(self, factor: float | Sequence[float] = 2) -> "Grid":
        """Grid with ``size / factor`` voxels (at least 1) over the same physical box."""
        f = _as_tuple(factor, self.ndim, "factor")
        return self.resize([max(1, int(round(n / fi))) for n, fi in zip(self._size, f)])

    def with_spacing(self, spacing: Sequence[float] | float) -> "Grid":
        """Grid over (about) the same physical box with the given spacing."""
        sp = _as_tuple(spacing, self.ndim, "spacing")
        size = [max(1, int(round(n * s / t))) for n, s, t in zip(self._size, self._spacing, sp)]
        # the centre of the physical box stays where it is
        c_old = np.asarray(self.center())
        half = np.asarray([(n - 1) * s / 2.0 for n, s in zip(size, sp)])
        origin = c_old - self._direction @ half
        return Grid(tuple(size), sp, origin.tolist(), self._direction)

    def crop(self, start: Sequence[int], stop: Sequence[int]) -> "Grid":
        """Sub-grid of voxels ``start <= index < stop`` (``(x, y, z)``); world positions kept.

        ``start`` may be negative and ``stop`` beyond the size: that pads.
        """
        start_t = tuple(int(s) for s in start)
        stop_t = tuple(int(s) for s in stop)
        if len(start_t) != self.ndim or len(stop_t) != self.ndim:
            raise GeometryError(f"crop needs {self.ndim} start and stop indices")
        size = tuple(b - a for a, b in zip(start_t, stop_t))
        if any(s < 1 for s in size):
            raise GeometryError(f"empty crop {start_t}..{stop_t}")
        origin = self.transform_points(torch.tensor(start_t, dtype=torch.float64), Frame.INDEX,
                                       Frame.WORLD)
        return Grid(size, self._spacing, origin.tolist(), self._direction)

    def pad(self, before: Sequence[int] | int, after: Sequence[int] | int | None = None) -> "Grid":
        """Grid grown by ``before``/``after`` voxels per axis (``(x, y, z)``)."""
        b = [int(v) for v in _as_tuple(before, self.ndim, "pad")]
        a = b if after is None else [int(v) for v in _as_tuple(after, self.ndim, "pad")]
        return self.crop([-v for v in b], [n + v for n, v in zip(self._size, a)])

    # ------------------------------------------------------------------ orientation
    def orientation(self) -> str:
        """Axis codes: the anatomical direction each index axis ``x, y, z`` increases towards.

        Same convention as nibabel's ``aff2axcodes`` (a NIfTI with an identity RAS affine is
        ``"RAS"``; ITK's "RAI" code names the opposite ends).
        """
        letters = []
        for j in range(self.ndim):
            col = self._direction[:, j]
            k = int(np.argmax(np.abs(col)))
            # LPS: +x is L, +y is P, +z is S
            pos, neg = _LPS_LETTERS[k]
            letters.append(pos if col[k] > 0 else neg)
        return "".join(letters)
