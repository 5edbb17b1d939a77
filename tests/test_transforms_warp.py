"""Warping images, label maps and points: exactness and conventions."""

import numpy as np
import pytest
import torch

from medreg.core import GeometryError, Grid, Image, InputError
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


def test_identity_on_the_same_grid_is_a_copy_equal_to_the_sampled_result(oblique_grid3d):
    # warp_image skips sampling for Identity onto the source grid: same values, dtype, gradient
    # and geometry as sampling through an identity matrix (which takes the resampling path)
    g = oblique_grid3d
    img = torch.rand(1, 1, *g.shape, requires_grad=True)
    eye = AffineTransform(3, torch.eye(3), torch.zeros(3), trainable=False)
    out = warp_image(img, Identity(3), g, g)
    assert torch.equal(out, warp_image(img.detach(), eye, g, g)) and out.data_ptr() != img.data_ptr()
    # the float32 autograd path to rounding (border padding: its zeros padding may drop edge
    # nodes that rounding puts a hair outside, which the copy keeps)
    assert torch.allclose(out, warp_image(img, eye, g, g, padding="border"), atol=1e-5)
    out.sum().backward()
    assert torch.equal(img.grad, torch.ones_like(img))
    lab = Image(torch.randint(0, 5, (1, *g.shape), dtype=torch.int16), g, "l.nii.gz")
    wl = warp_labels(lab, Identity(3), g)
    assert wl.grid == g and wl.data.dtype == torch.int16 and torch.equal(wl.data, lab.data)
    # a tensor whose shape is not its source grid's is refused (it was resampled as if it were
    # on that grid: a silently wrong geometry), nothing passes through
    small = Grid(tuple(n // 2 for n in g.size), tuple(2 * s for s in g.spacing), g.origin, g.direction)
    with pytest.raises(GeometryError, match="a tensor on the source grid must be"):
        warp_image(img.detach(), Identity(3), small, small)


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


# --- the fast default path (issue 2): exact on the dyadic lattice, float32 elsewhere ---------

from medreg.transforms import Compose  # noqa: E402
from medreg.transforms import functional as TF  # noqa: E402


def _with_zero_background(g, channels=2, seed=0):
    img = torch.rand(1, channels, *g.shape, generator=torch.Generator().manual_seed(seed))
    img[..., :3] = 0.0  # exact zeros next to non-zeros: a 1e-15 leak would show
    return img


@pytest.mark.parametrize("fixture", ["oblique_grid2d", "oblique_grid3d"])
def test_default_warp_is_exact_for_identities_and_integer_shifts(fixture, request):
    g = request.getfixturevalue(fixture)
    d = g.ndim
    img = _with_zero_background(g)
    zero = DisplacementField(torch.zeros(1, d, *g.shape), g)
    eye32 = AffineTransform(d, torch.eye(d), torch.zeros(d), trainable=False)
    for t in (Identity(d), zero, eye32, Compose(eye32, zero)):
        for interp in ("linear", "nearest"):
            for pad in ("zeros", "border"):
                assert torch.equal(warp_image(img, t, g, g, interpolation=interp, padding=pad), img)
    # 2 voxels along index x (and 1 along z in 3D), world mm through the oblique direction
    vox = torch.tensor([2.0, 0.0, 1.0][:d], dtype=torch.float64)
    step = torch.tensor(g.direction, dtype=torch.float64) @ (vox * torch.tensor(g.spacing, dtype=torch.float64))
    shift = TranslationTransform(d, translation=step, trainable=False, dtype=torch.float64)
    for t in (shift, Compose(shift, zero)):
        out = warp_image(img, t, g, g)
        if d == 3:
            assert torch.equal(out[..., :-1, :, :-2], img[..., 1:, :, 2:])
            assert torch.equal(out[..., -1, :, :], torch.zeros_like(out[..., -1, :, :]))
        else:
            assert torch.equal(out[..., :, :-2], img[..., :, 2:])
        assert torch.equal(out[..., -2:], torch.zeros_like(out[..., -2:]))


@pytest.mark.parametrize("fixture", ["oblique_grid2d", "oblique_grid3d"])
def test_default_warp_matches_float64_for_a_smooth_field(fixture, request):
    from medreg.core.functional import gaussian_smooth

    g = request.getfixturevalue(fixture)
    gen = torch.Generator().manual_seed(1)
    img = gaussian_smooth(torch.rand(1, 1, *g.shape, generator=gen), 1.5, g.spacing)
    u = gaussian_smooth(torch.randn(1, g.ndim, *g.shape, generator=gen), 3.0, g.spacing)
    field = DisplacementField(u * (4.0 / u.abs().max()), g)  # moves points out of the grid
    for t in (field, Compose(AffineTransform(g.ndim, torch.eye(g.ndim) * 1.05, torch.ones(g.ndim),
                                             trainable=False), field)):
        for interp in ("linear", "nearest"):
            for pad, fill in (("zeros", -5.0), ("border", 0.0)):
                ours = warp_image(img, t, g, g, interpolation=interp, padding=pad, fill=fill)
                ref = warp_image(img, t, g, g, interpolation=interp, padding=pad, fill=fill,
                                 precise=True)
                if interp == "linear":
                    assert torch.allclose(ours, ref, atol=2e-6, rtol=0)
                else:  # a point within rounding of a voxel boundary may pick either voxel
                    assert (ours != ref).float().mean() < 1e-3
                if pad == "zeros":
                    assert torch.equal(ours == fill, ref == fill)  # the same outside points


def test_sample_lattice_equals_float64_sampling_including_outside_and_nan():
    gen = torch.Generator().manual_seed(2)
    for shape in [(7, 9, 11), (1, 9, 6), (5, 7), (2, 3, 3)]:
        d = len(shape)
        grid = Grid(tuple(reversed(shape)))
        lattice = TF.dyadic_grid(grid)
        assert all(n in (1, 2) or ((n - 1) & (n - 2)) == 0 for n in lattice.size)
        img = torch.rand(2, 2, *shape, generator=gen)
        norm = torch.rand(2, *shape, d, generator=gen, dtype=torch.float64) * 2.4 - 1.2
        norm[0, ..., 0].view(-1)[:2] = float("nan")
        pts = lattice.transform_points(grid.transform_points(norm, "norm", "index"), "index", "norm")
        ref = TF.sample(img.double(), norm, "linear", "zeros", -3.0).float()
        out = TF.sample_lattice(img, pts.float(), "linear", "zeros", -3.0)
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), shape
        assert (out[0][:, torch.isnan(norm[0]).any(-1)] == -3.0).all()  # NaN points: outside


def test_fast_no_grad_sampling_equals_the_autograd_path():
    gen = torch.Generator().manual_seed(3)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the batch split of grid_sample across threads
    try:
        for shape in [(7, 6, 5), (9, 8)]:
            d = len(shape)
            img = torch.rand(1, 2, *shape, generator=gen)
            m = torch.eye(d + 1, dtype=torch.float64)
            m[:d, :d] += 0.1 * torch.randn(d, d, generator=gen, dtype=torch.float64)
            m[:d, :d] *= 0.3
            m[:d, d] = 0.2 * torch.randn(d, generator=gen, dtype=torch.float64)
            field = 0.3 * torch.randn(1, d, *shape, generator=gen)
            with torch.no_grad():
                fast = TF.affine_field_points(m, m[:d, :d], field, shape)
            slow = TF.affine_field_points(m, m[:d, :d], field.requires_grad_(), shape)
            assert slow.requires_grad and torch.allclose(fast, slow.detach(), atol=1e-6, rtol=0)
            for pad in ("zeros", "border", "reflection"):
                for interp in ("linear", "nearest"):
                    with torch.no_grad():
                        a = TF.sample(img, fast, interp, pad, 2.0)
                    b = TF.sample(img, fast.clone().requires_grad_(), interp, pad, 2.0)
                    assert torch.equal(a, b.detach()), (shape, pad, interp)
    finally:
        torch.set_num_threads(torch_threads)


def test_gradients_still_flow_through_warp_image(oblique_grid3d):
    g = oblique_grid3d
    img = torch.rand(1, 1, *g.shape, generator=torch.Generator().manual_seed(4), requires_grad=True)
    field = DisplacementField.zeros(g)
    with torch.no_grad():
        field.field.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    out = warp_image(img, field, g, g)
    assert out.requires_grad
    out.square().sum().backward()
    assert field.field.grad.abs().sum() > 0 and img.grad.abs().sum() > 0


def test_warps_refuse_what_would_be_silently_wrong_and_keep_the_targets_header(tmp_path):
    """From an audit of the Python API: integer points are mapped as float (a linear transform
    cast its matrix to int), a tensor must have its source grid's shape, soft label warping puts
    0 outside the moving image even without a label 0, non-transforms and numpy arrays get one
    clear error, and an Image target gives the output that image's header."""
    from medreg.io import read_image, write_image
    from medreg.transforms import RigidTransform

    g = Grid((12, 10, 8), (1.5, 1.0, 2.0), (4.0, -3.0, 2.0))
    rigid = RigidTransform(3, rotation=[0.1, -0.2, 0.3], translation=[1.0, 2.0, 3.0],
                           center=list(g.center()), dtype=torch.float64)
    ints = torch.tensor([[10, 20, 30], [-5, 3, 12]])
    assert torch.allclose(warp_points(ints, rigid), warp_points(ints.double(), rigid))
    assert torch.allclose(warp_points([[10, 20, 30]], rigid), warp_points(ints[:1].double(), rigid))
    img = Image(torch.rand(1, *g.shape), g, "img")
    with pytest.raises(GeometryError, match=r"must be \(N, C, 8, 10, 12\)"):
        warp_image(img.data.permute(0, 3, 2, 1)[None], rigid, g, g)  # x, y, z order
    with pytest.raises(InputError, match="numpy array has no geometry"):
        warp_image(img.data.numpy(), rigid, g)
    with pytest.raises(InputError, match="must be a medreg transform"):
        warp_image(img, torch.eye(4), g)
    labels = Image(torch.randint(1, 4, (1, *g.shape), dtype=torch.int16), g, "labels")  # no 0
    wide = g.pad(3)
    soft = warp_labels(labels, Identity(3), wide, mode="soft")
    near = warp_labels(labels, Identity(3), wide, mode="nearest")
    assert int(soft.data[0, 0, 0, 0]) == 0 == int(near.data[0, 0, 0, 0])
    # an Image target: its header (here MNI space codes from the file) comes with the output
    import nibabel as nib

    nii = nib.Nifti1Image(np.random.rand(*g.size).astype(np.float32), np.diag([1.5, 1.0, 2.0, 1.0]))
    nii.set_sform(nii.affine, code=4)
    nii.set_qform(nii.affine, code=4)
    nib.save(nii, tmp_path / "mni.nii.gz")
    fixed = read_image(tmp_path / "mni.nii.gz")
    write_image(warp_image(img, rigid, fixed), tmp_path / "out.nii.gz")
    out = nib.load(tmp_path / "out.nii.gz")
    assert int(out.header["sform_code"]) == 4 and int(out.header["qform_code"]) == 4
