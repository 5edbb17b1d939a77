"""Warping images, label maps and points: exactness and conventions."""

import pytest
import torch

from medreg.core import Grid, Image
from medreg.transforms import (AffineTransform, DisplacementField, Identity, TranslationTransform,
                               warp_image, warp_labels, warp_points)


@pytest.mark.parametrize("fixture", ["oblique_grid2d", "oblique_grid3d"])
@pytest.mark.parametrize("interp", ["linear", "nearest", "bspline"])
def test_identity_is_exact(fixture, interp, request):
    g = request.getfixturevalue(fixture)
    img = torch.rand(1, 2, *g.shape)
    out = warp_image(img, Identity(g.ndim), g, g, interpolation=interp)
    if interp == "bspline":  # the prefilter + spline reproduce samples to rounding
        assert torch.allclose(out, img, atol=1e-5)
    else:
        assert torch.equal(out, img)
    zero = DisplacementField(torch.zeros(1, g.ndim, *g.shape), g)
    assert torch.equal(warp_image(img, zero, g, g), img)


def test_integer_translation_shifts_array_exactly(oblique_grid3d):
    g = oblique_grid3d
    img = torch.rand(1, 1, *g.shape)
    # 2 voxels along index x and 1 along index z, in world mm through the direction matrix
    step = torch.tensor(g.direction, dtype=torch.float64) @ torch.tensor([2 * g.spacing[0], 0.0, g.spacing[2]],
                                                                          dtype=torch.float64)
    t = TranslationTransform(3, translation=step, trainable=False, dtype=torch.float64)
    out = warp_image(img, t, g, g)
    assert torch.equal(out[..., :-1, :, :-2], img[..., 1:, :, 2:])
    assert torch.equal(out[..., -1, :, :], torch.zeros_like(out[..., -1, :, :]))  # outside: fill


def test_fill_and_border_padding():
    g = Grid((6, 5))
    img = torch.arange(30, dtype=torch.float32).view(1, 1, 5, 6) + 1
    t = TranslationTransform(2, translation=[10.0, 0.0], dtype=torch.float64)
    assert torch.equal(warp_image(img, t, g, g, fill=-7.0), torch.full_like(img, -7.0))
    border = warp_image(img, t, g, g, padding="border")
    assert torch.equal(border, img[..., -1:].expand_as(img))


def test_warp_image_keeps_target_geometry_and_dtype():
    src = Grid((10, 8, 6), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0))
    dst = Grid((5, 4, 3), (2.0, 2.0, 4.0), (0.5, 0.5, 1.0))
    im = Image(torch.rand(1, *src.shape, dtype=torch.float64), src, "m.nii.gz")
    out = warp_image(im, Identity(3), dst)
    assert out.grid == dst and out.data.dtype == torch.float64 and out.name == "m.nii.gz"


def test_labels_nearest_and_soft_keep_integer_values(oblique_grid3d):
    g = oblique_grid3d
    lab = torch.zeros(1, 1, *g.shape, dtype=torch.int32)
    lab[..., 3:14, 6:24, 4:18] = 3
    lab[..., 5:11, 10:20, 7:15] = 41
    t = AffineTransform(3, torch.eye(3) * 1.02, torch.tensor([0.7, -0.4, 0.3]),
                        center=torch.tensor(g.center()), trainable=False)
    for mode in ("nearest", "soft"):
        out = warp_labels(lab, t, g, g, mode=mode)
        assert out.dtype == torch.int32
        assert set(torch.unique(out).tolist()) <= {0, 3, 41}
        for v in (3, 41):
            vol_in, vol_out = int((lab == v).sum()), int((out == v).sum())
            assert abs(vol_out - vol_in) < 0.25 * vol_in
    assert torch.equal(warp_labels(lab, Identity(3), g, g, mode="soft"), lab)
    # integer intensities with linear interpolation: rounded and kept in their dtype (as ITK)
    u8 = (torch.rand(1, 1, *g.shape, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    lin = warp_image(u8, t, g, g)
    ref = warp_image(u8.double(), t, g, g).round()  # the same float64 arithmetic, then rounded
    assert lin.dtype == torch.uint8 and torch.equal(lin.float(), ref)


def test_points_go_with_the_transform_direction():
    # moving(x) = fixed(x - s): a feature at p in fixed is at p + s in moving, and T(x) = x + s
    s = torch.tensor([3.0, -2.0], dtype=torch.float64)
    t = TranslationTransform(2, translation=s, trainable=False, dtype=torch.float64)
    fixed_pts = torch.tensor([[1.0, 1.0], [4.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(warp_points(fixed_pts, t), fixed_pts + s)
    assert torch.allclose(warp_points(fixed_pts + s, t.inverse().double()), fixed_pts)
    g = Grid((20, 20))
    fixed_img = torch.zeros(1, 1, 20, 20)
    fixed_img[0, 0, 5, 4] = 1.0  # index (x=4, y=5)
    moving_img = torch.zeros(1, 1, 20, 20)
    moving_img[0, 0, 3, 7] = 1.0  # shifted by s
    assert torch.equal(warp_image(moving_img, t, g, g), fixed_img)
