"""QC figures: written, non-empty, of the expected size; display orientation."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from scipy import ndimage

from medreg.core import Grid, Image, InputError
from medreg.viz import deformation_figure, plane_views, qc_size, save_figure, save_qc
from medreg.viz.slices import sample_on_view


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _blob_image(grid: Grid, seed: int, name: str) -> Image:
    rng = np.random.default_rng(seed)
    arr = ndimage.gaussian_filter(rng.standard_normal(grid.shape), 2.0).astype(np.float32)
    return Image(torch.from_numpy(arr), grid, name)


def _labels(img: Image, name: str) -> Image:
    a = img.data[0].numpy()
    lab = np.digitize(a, np.percentile(a, [40, 70, 90])).astype(np.int16)
    return Image(torch.from_numpy(lab), img.grid, name)


@pytest.mark.parametrize("ndim", [3, 2])
def test_qc_png_written_with_expected_size(tmp_path, ndim):
    size = (26, 22, 14)[:ndim]
    fixed_grid = Grid(size, (1.0, 1.2, 2.5)[:ndim])
    moving_grid = Grid(tuple(s + 2 for s in size), (1.1, 1.0, 2.0)[:ndim],
                       origin=(-1.0, 0.5, -2.0)[:ndim])
    fixed = _blob_image(fixed_grid, 0, "fixed.nii.gz")
    moving = _blob_image(moving_grid, 1, "moving.nii.gz")
    warped = _blob_image(fixed_grid, 2, "warped.nii.gz")
    u = torch.zeros(1, ndim, *fixed_grid.shape)
    u[0, 0, ..., 5] = -4.0  # a fold to mark
    out = save_qc(tmp_path / "qc.png", fixed, warped, moving,
                  fixed_labels=_labels(fixed, "fl"), moving_labels=_labels(moving, "ml"),
                  warped_labels=_labels(warped, "wl"), displacement=u,
                  metrics={"labels": {"mean_dice": 0.8}, "displacement": {"sdlogj": 0.1}})
    assert out.is_file() and out.stat().st_size > 10_000
    n_rows = 3 if ndim == 3 else 1
    n_cols = 3 + 4 + 2 + 2  # images, checker/difference before/after, labels, grid + det J
    assert _png_size(out) == qc_size(n_cols, n_rows)


def test_qc_without_optional_inputs(tmp_path):
    grid = Grid((20, 18, 12))
    fixed = _blob_image(grid, 0, "f")
    out = save_qc(tmp_path / "qc_small.png", fixed, _blob_image(grid, 1, "w"), panel_px=120,
                  header_px=30)
    assert _png_size(out) == qc_size(4, 3, 120, 30)  # fixed, warped, checker, difference


def test_qc_rejects_images_off_the_fixed_grid(tmp_path):
    fixed = _blob_image(Grid((10, 10, 10)), 0, "fixed.nii.gz")
    other = _blob_image(Grid((10, 10, 11)), 0, "warped.nii.gz")
    with pytest.raises(InputError, match="warped.nii.gz.*fixed image's grid"):
        save_qc(tmp_path / "qc.png", fixed, other)


def test_deformation_figure(tmp_path):
    grid = Grid((16, 14, 12), (1.0, 1.0, 2.0))
    u = torch.zeros(1, 3, *grid.shape)
    u[0, 1] = torch.linspace(-2, 2, grid.shape[0])[:, None, None]
    out = save_figure(deformation_figure(u, grid), tmp_path / "deformation.png")
    assert _png_size(out) == qc_size(2, 3)


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]),
                                       np.diag([1.0, -1.0, -1.0])])
def test_radiological_orientation(direction):
    """The patient's left shows on the right, anterior at the top, superior at the top."""
    grid = Grid((21, 23, 19), (1.0, 0.8, 1.2), direction=direction)
    pts = grid.points("world", dtype=torch.float64)
    c = torch.tensor(grid.center(), dtype=torch.float64)
    rel = (pts - c).numpy()
    views = {v.name: v for v in plane_views(grid)}
    left = views["axial"].take(rel[..., 0])  # world x: increases towards the patient's left
    assert left[:, -1].mean() > 0 > left[:, 0].mean()
    post = views["axial"].take(rel[..., 1])  # world y: posterior, must increase downwards
    assert post[-1].mean() > 0 > post[0].mean()
    sup = views["coronal"].take(rel[..., 2])
    assert sup[0].mean() > 0 > sup[-1].mean()
    ant = views["sagittal"].take(rel[..., 1])  # anterior on the left
    assert ant[:, 0].mean() < 0 < ant[:, -1].mean()
    # sampling through world coordinates agrees with reading the grid directly
    img = Image(torch.from_numpy(rel[..., 0]).float(), grid)
    other = Image(img.data, grid.replace(origin=tuple(o + 1e-2 for o in grid.origin)))
    direct = views["coronal"].take(img.data[0])
    sampled = sample_on_view(other, views["coronal"])
    assert np.allclose(sampled[1:-1, 1:-1], direct[1:-1, 1:-1], atol=0.05)


def test_qc_det_on_planes_equals_the_full_volume(oblique_grid3d):
    """The QC figure computes det J only on the displayed planes (three-voxel slabs): the same
    values as the whole-volume computation there."""
    import numpy as np
    import torch

    from medreg.metrics.jacobian import jacobian_determinant
    from medreg.viz.qc import _det_on_views
    from medreg.viz.slices import plane_views

    g = oblique_grid3d
    torch.manual_seed(0)
    u = torch.randn(1, 3, *g.shape, dtype=torch.float64)
    views = plane_views(g)
    full = jacobian_determinant(u, g).numpy()
    part = _det_on_views(u, g, views)
    for v in views:
        assert np.allclose(v.take(part), v.take(full), rtol=0, atol=1e-12)
    assert np.isnan(part).sum() > 0
