r"""Display planes of a grid in radiological orientation, and sampling of any image on them.

A :class:`PlaneView` is one 2D cut through a :class:`~medreg.core.grid.Grid`, laid out the way
radiologists read images (LPS world: ``+x`` = patient's left, ``+y`` = posterior, ``+z`` =
superior):

* **axial** (normal ``z``): patient's left on the right of the screen, anterior at the top;
* **coronal** (normal ``y``): patient's left on the right, superior at the top;
* **sagittal** (normal ``x``): anterior on the left, superior at the top.

For an oblique grid the cut follows the voxel axis closest to each world axis (as ITK-SNAP
shows oblique volumes in voxel space). A 2D grid has one view, ``x`` to the right and ``y``
down. Each view gives the 2D array of a volume on its grid (:meth:`PlaneView.take`), the world
positions of its pixels (:meth:`PlaneView.world_points`) to sample images that live on other
grids (:func:`sample_on_view`), and the extent in mm for ``imshow`` (square pixels in mm).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from medreg.core.grid import Grid
from medreg.core.image import Image

__all__ = ["PlaneView", "plane_views", "sample_on_view"]

# (name, world normal, world axis to the right, sign, world axis downwards, sign)
_PLANES = (
    ("axial", 2, 0, +1, 1, +1),
    ("coronal", 1, 0, +1, 2, -1),
    ("sagittal", 0, 1, +1, 2, -1),
)


@dataclass(frozen=True)
class PlaneView:
    """One display plane of a grid.

    Attributes:
        name: ``axial``, ``coronal``, ``sagittal`` (3D) or ``slice`` (2D).
        grid: the grid the view cuts.
        normal_axis: index axis (0 = x) across the plane, or -1 in 2D.
        slice_index: voxel index along ``normal_axis``.
        col_axis: index axis shown left → right.
        row_axis: index axis shown top → bottom.
        col_flip: columns run against ``col_axis``.
        row_flip: rows run against ``row_axis``.
    """

    name: str
    grid: Grid
    normal_axis: int
    slice_index: int
    col_axis: int
    row_axis: int
    col_flip: bool
    row_flip: bool

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the 2D view."""
        return self.grid.size[self.row_axis], self.grid.size[self.col_axis]

    @property
    def pixel_mm(self) -> tuple[float, float]:
        """``(row, col)`` pixel size in mm."""
        return self.grid.spacing[self.row_axis], self.grid.spacing[self.col_axis]

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """``imshow`` extent ``(left, right, bottom, top)`` in mm (origin top-left)."""
        (r, c), (pr, pc) = self.shape, self.pixel_mm
        return 0.0, c * pc, r * pr, 0.0

    def index_points(self) -> Tensor:
        """Continuous voxel indices ``(rows, cols, D)`` (``x, y, z``) of the view's pixels."""
        rows, cols = self.shape
        r = torch.arange(rows, dtype=torch.float64)
        c = torch.arange(cols, dtype=torch.float64)
        if self.row_flip:
            r = rows - 1 - r
        if self.col_flip:
            c = cols - 1 - c
        pts = torch.zeros(rows, cols, self.grid.ndim, dtype=torch.float64)
        pts[..., self.row_axis] = r[:, None]
        pts[..., self.col_axis] = c[None, :]
        if self.normal_axis >= 0:
            pts[..., self.normal_axis] = float(self.slice_index)
        return pts

    def world_points(self) -> Tensor:
        """World positions (LPS mm) ``(rows, cols, D)`` of the view's pixels."""
        return self.grid.transform_points(self.index_points(), "index", "world")

    def take(self, volume: Tensor | np.ndarray) -> np.ndarray:
        """The view of a volume on :attr:`grid` (tensor order ``(z, y, x)``), ``(rows, cols)``."""
        vol = volume.detach().cpu().numpy() if isinstance(volume, Tensor) else np.asarray(volume)
        idx = self.index_points().round().long().numpy()
        d = self.grid.ndim
        return vol[tuple(idx[..., d - 1 - t] for t in range(d))]

    def screen_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """World unit vectors of the screen's right and down directions (for in-plane vectors)."""
        right = self.grid.direction[:, self.col_axis] * (-1.0 if self.col_flip else 1.0)
        down = self.grid.direction[:, self.row_axis] * (-1.0 if self.row_flip else 1.0)
        return right, down


def _axis_map(grid: Grid) -> tuple[list[int], list[int]]:
    """For each world axis the closest index axis and its sign along that world axis."""
    d = grid.ndim
    dmat = grid.direction
    world_of = [int(np.argmax(np.abs(dmat[:, j]))) for j in range(d)]
    if sorted(world_of) != list(range(d)):  # 45° ambiguity: keep voxel order
        world_of = list(range(d))
    index_of = [world_of.index(w) for w in range(d)]
    sign = [1 if dmat[w, index_of[w]] >= 0 else -1 for w in range(d)]
    return index_of, sign


def plane_views(grid: Grid, center: tuple[float, ...] | None = None) -> list[PlaneView]:
    """The display views of ``grid``: axial, coronal, sagittal (3D) or one slice (2D).

    Args:
        grid: the (fixed) grid.
        center: world point (LPS mm) the 3D cuts go through; default the grid's centre.
    """
    index_of, sign = _axis_map(grid)
    if grid.ndim == 2:
        return [PlaneView("slice", grid, -1, 0, index_of[0], index_of[1], sign[0] < 0,
                          sign[1] < 0)]
    if center is None:
        mid = [(n - 1) // 2 for n in grid.size]
    else:
        c = torch.as_tensor(center, dtype=torch.float64)
        idx = grid.transform_points(c, "world", "index").round().long().tolist()
        mid = [min(max(int(i), 0), n - 1) for i, n in zip(idx, grid.size)]
    views = []
    for name, normal, right, rsign, down, dsign in _PLANES:
        jn, jc, jr = index_of[normal], index_of[right], index_of[down]
        views.append(PlaneView(name, grid, jn, mid[jn], jc, jr,
                               col_flip=sign[right] * rsign < 0,
                               row_flip=sign[down] * dsign < 0))
    return views


def sample_on_view(image: Image, view: PlaneView, *, nearest: bool = False,
                   channel: int = 0) -> np.ndarray:
    """Sample one channel of ``image`` (any grid) at the view's pixels (world positions).

    Linear interpolation (``nearest`` for label maps); 0 outside the image. Images on the
    view's own grid are read directly.
    """
    if image.grid.allclose(view.grid, atol=1e-4):
        return view.take(image.data[channel])
    src = image.data[channel].detach().cpu().to(torch.float64)
    norm = image.grid.transform_points(view.world_points(), "world", "norm")
    d = image.grid.ndim
    pts = norm.reshape(1, *([1] * (d - 2)), *norm.shape[:2], d)
    out = F.grid_sample(src[None, None], pts, mode="nearest" if nearest else "bilinear",
                        padding_mode="zeros", align_corners=True)
    arr = out.reshape(norm.shape[:2]).numpy()
    if not image.data.is_floating_point():
        arr = np.rint(arr).astype(image.data.cpu().numpy().dtype)
    return arr
