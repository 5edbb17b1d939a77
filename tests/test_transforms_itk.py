"""Cross-checks against ITK (SimpleITK): warps, points and transform files agree."""

import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medreg.core import Grid, InputError
from medreg.core.functional import gaussian_smooth
from medreg.io import (from_sitk, l2r_from_transform, read_l2r_displacement, read_transform,
                       set_sitk_geometry, to_sitk, transform_from_l2r, write_l2r_displacement,
                       write_transform)
from medreg.transforms import (AffineTransform, BSplineTransform, Compose, DisplacementField,
                               RigidTransform, StationaryVelocityField, warp_image, warp_points)

SITK_INTERP = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def smooth_image(grid: Grid) -> torch.Tensor:
    pts = grid.points(dtype=torch.float64)
    r = pts - torch.tensor(grid.center(), dtype=torch.float64)
    val = torch.sin(r[..., 0] / 6) * torch.cos(r[..., 1] / 7) + 2
    if grid.ndim == 3:
        val = val + torch.sin(r[..., 2] / 9)
    return val.float()[None, None]


def make_transforms(grid: Grid) -> dict:
    gen = torch.Generator().manual_seed(0)
    d = grid.ndim
    c = torch.tensor(grid.center())
    aff = AffineTransform(d, torch.eye(d) + 0.06 * torch.randn(d, d, generator=gen),
                          torch.randn(d, generator=gen) * 2, center=c, trainable=False)
    bs = BSplineTransform.from_grid(grid, 12.0, trainable=False)
    bs.coefficients.normal_(0, 1.5, generator=gen)
    u = gaussian_smooth(torch.randn(1, d, *grid.shape, generator=gen), 4.0, grid.spacing)
    field = DisplacementField(u * (3.0 / u.abs().max()), grid)
    return {"affine": aff, "bspline": bs, "field": field, "composite": Compose(aff, bs, field)}


def interior(arr: np.ndarray, margin: int = 3) -> np.ndarray:
    return arr[tuple(slice(margin, -margin) for _ in range(arr.ndim))]


@pytest.mark.parametrize("fixture", ["oblique_grid3d", "oblique_grid2d"])
@pytest.mark.parametrize("interp", ["linear", "bspline", "nearest"])
def test_warp_equals_sitk_resample(fixture, interp, request):
    grid = request.getfixturevalue(fixture)
    img = smooth_image(grid)
    sim = set_sitk_geometry(sitk.GetImageFromArray(img[0, 0].numpy()), grid)
    rng = float(img.max() - img.min())
    for name, t in make_transforms(grid).items():
        ours = warp_image(img, t, grid, grid, interpolation=interp)[0, 0].numpy()
        ref = sitk.GetArrayFromImage(sitk.Resample(sim, sim, to_sitk(t), SITK_INTERP[interp], 0.0,
                                                   sitk.sitkFloat32))
        err = np.abs(interior(ours) - interior(ref))
        assert err.max() < 1e-3 * rng, (name, interp, err.max())
        assert np.abs(ours - interior(ours).mean()).max() > 0  # not trivially empty


@pytest.mark.parametrize("fixture", ["oblique_grid3d", "oblique_grid2d"])
def test_points_equal_itk_transform_point(fixture, request):
    grid = request.getfixturevalue(fixture)
    pts = grid.points(dtype=torch.float64).reshape(-1, grid.ndim)[::37]
    for name, t in make_transforms(grid).items():
        t = t.double()
        ours = warp_points(pts, t).numpy()
        tx = to_sitk(t)
        ref = np.array([tx.TransformPoint(tuple(p)) for p in pts.tolist()])
        assert np.abs(ours - ref).max() < 1e-4, name


def test_warp_between_different_grids_equals_sitk(oblique_grid3d):
    moving = oblique_grid3d
    fixed = Grid((20, 18, 22), (1.1, 1.0, 1.4), (8.0, -28.0, 0.0))
    img = smooth_image(moving)
    sim = set_sitk_geometry(sitk.GetImageFromArray(img[0, 0].numpy()), moving)
    ref_img = set_sitk_geometry(sitk.Image(list(fixed.size), sitk.sitkFloat32), fixed)
    t = RigidTransform(3, rotation=[0.1, -0.05, 0.2], translation=[1.0, 2.0, -1.0],
                       center=list(fixed.center()), trainable=False)
    ours = warp_image(img, t, fixed, moving)[0, 0].numpy()
    ref = sitk.GetArrayFromImage(sitk.Resample(sim, ref_img, to_sitk(t), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    assert np.abs(ours - ref).max() < 1e-3 * float(img.max() - img.min())
    assert (ours == 0).any() and (ours != 0).any()  # outside the moving image: the fill value


@pytest.mark.parametrize("suffix", [".tfm", ".txt", ".mat", ".h5"])
def test_linear_file_round_trip(tmp_path, suffix):
    t = RigidTransform(3, rotation=[0.2, 0.1, -0.3], translation=[4.0, -2.0, 1.0],
                       center=[10.0, 20.0, 30.0], dtype=torch.float64)
    path = tmp_path / f"t{suffix}"
    write_transform(t, path)
    back = read_transform(path, dtype=torch.float64)
    p = torch.randn(20, 3, dtype=torch.float64) * 50
    assert torch.allclose(back(p), t(p), atol=1e-9)
    # SimpleITK reads the file we wrote and maps points the same way
    tx = sitk.ReadTransform(str(path))
    assert np.allclose([tx.TransformPoint(tuple(q)) for q in p.tolist()], t(p).detach().numpy(), atol=1e-9)


def test_composite_h5_and_field_files_round_trip(tmp_path, oblique_grid3d):
    grid = oblique_grid3d
    ts = make_transforms(grid)
    comp = ts["composite"]
    write_transform(comp, tmp_path / "c.h5")
    back = read_transform(tmp_path / "c.h5")
    assert isinstance(back, Compose) and len(back.transforms) == 3
    p = grid.points().reshape(-1, 3)[::53]
    assert torch.allclose(back(p), comp(p), atol=1e-4)
    write_transform(ts["field"], tmp_path / "d.nii.gz")
    field = read_transform(tmp_path / "d.nii.gz")
    assert field.grid.allclose(grid) and torch.allclose(field.field, ts["field"].field, atol=1e-6)
    # ITK reads our NIfTI field with the same vectors
    img = sitk.ReadImage(str(tmp_path / "d.nii.gz"), sitk.sitkVectorFloat64)
    dft = sitk.DisplacementFieldTransform(img)
    q = p[5:6].double()
    assert np.allclose(dft.TransformPoint(tuple(q[0].tolist())), ts["field"].double()(q)[0].numpy(), atol=1e-4)


@pytest.mark.parametrize("fixture", ["oblique_grid3d", "oblique_grid2d"])
def test_nifti_field_is_what_itk_writes(fixture, request, tmp_path, monkeypatch):
    # .nii.gz fields are written by nibabel, compressed in many gzip members on threads; ITK
    # must read the same vectors and geometry as from the file SimpleITK itself writes (.mha)
    import gzip

    import medreg.io._gzip as pgz
    from medreg.io import write_displacement

    monkeypatch.setattr(pgz, "BLOCK", 4096)  # many members even for a small field
    grid = request.getfixturevalue(fixture)
    field = make_transforms(grid)["field"]
    write_displacement(field, tmp_path / "d.nii.gz")
    write_displacement(field, tmp_path / "d.mha")
    ours, ref = (sitk.ReadImage(str(tmp_path / f), sitk.sitkVectorFloat64) for f in ("d.nii.gz", "d.mha"))
    assert ours.GetDimension() == ref.GetDimension() == grid.ndim
    assert ours.GetNumberOfComponentsPerPixel() == grid.ndim
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(ref))
    assert np.allclose(ours.GetOrigin(), ref.GetOrigin(), atol=1e-5)
    assert np.allclose(ours.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    assert np.allclose(ours.GetDirection(), ref.GetDirection(), atol=1e-6)
    raw = (tmp_path / "d.nii.gz").read_bytes()
    assert raw.count(b"\x1f\x8b\x08") >= len(gzip.decompress(raw)) // 4096 >= 2  # one member per block
    # equal fields give equal files (no time stamps in the members)
    write_displacement(field, tmp_path / "e.nii.gz")
    assert (tmp_path / "e.nii.gz").read_bytes() == raw


def test_svf_exports_as_displacement_field(oblique_grid3d):
    g = oblique_grid3d
    v = gaussian_smooth(torch.randn(1, 3, *g.shape, generator=torch.Generator().manual_seed(4)), 5.0, g.spacing)
    svf = StationaryVelocityField(v * (2.0 / v.abs().max()), g)
    tx = to_sitk(svf)
    assert tx.GetName() == "DisplacementFieldTransform"
    p = g.points().reshape(-1, 3)[500:510]
    ref = np.array([tx.TransformPoint(tuple(q)) for q in p.double().tolist()])
    assert np.abs(svf(p).detach().numpy() - ref).max() < 1e-4


def test_from_sitk_euler_and_similarity():
    e = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, 0.2, 0.3, (4.0, 5.0, 6.0))
    s = sitk.Similarity2DTransform(1.3, 0.4, (1.0, -1.0), (2.0, 2.0))
    for tx in (e, s):
        ours = from_sitk(tx, dtype=torch.float64)
        p = torch.randn(10, tx.GetDimension(), dtype=torch.float64) * 10
        ref = np.array([tx.TransformPoint(tuple(q)) for q in p.tolist()])
        assert np.allclose(ours(p).detach().numpy(), ref, atol=1e-9)


def test_l2r_round_trip_exact(tmp_path):
    fixed = Grid((12, 10, 8), (1.5, 1.5, 2.0), (-5.0, 3.0, 1.0))
    gen = torch.Generator().manual_seed(2)
    disp = (torch.randn(12, 10, 8, 3, generator=gen) * 2).numpy().astype(np.float32)
    t = transform_from_l2r(disp, fixed)
    assert np.array_equal(l2r_from_transform(t, fixed).astype(np.float32), disp)
    write_l2r_displacement(t, tmp_path / "disp_0001_0002.nii.gz", fixed)
    t2 = read_l2r_displacement(tmp_path / "disp_0001_0002.nii.gz", fixed, dtype=torch.float64)
    assert np.array_equal(l2r_from_transform(t2, fixed).astype(np.float32), disp)


def test_l2r_convention_matches_map_coordinates():
    from scipy.ndimage import map_coordinates

    fixed = Grid((14, 12, 10), (2.0, 1.0, 1.5), (3.0, -2.0, 5.0))
    moving = torch.rand(1, 1, *fixed.shape, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    disp = gaussian_smooth(torch.randn(1, 3, 10, 12, 14, generator=gen, dtype=torch.float64), 2.0, (1, 1, 1))[0]
    disp = (disp * 2.0 / disp.abs().max()).permute(3, 2, 1, 0).numpy()  # (X, Y, Z, 3) voxels
    t = transform_from_l2r(disp, fixed)
    ours = warp_image(moving, t, fixed, fixed, padding="border")[0, 0].permute(2, 1, 0).numpy()
    ident = np.stack(np.meshgrid(*[np.arange(n) for n in fixed.size], indexing="ij"))
    ref = map_coordinates(moving[0, 0].permute(2, 1, 0).numpy(), ident + np.moveaxis(disp, -1, 0),
                          order=1, mode="nearest")
    assert np.abs(ours - ref).max() < 1e-9


def test_unreadable_or_foreign_transform_files_get_one_clear_line(tmp_path, capfd):
    """A folder, an empty or truncated .h5, an elastix parameter file and a bare 4×4 matrix each
    get a message saying what the file is (not ITK's list of known IO classes), and the HDF5
    library's error stack does not reach the terminal."""
    good = tmp_path / "good.h5"
    sitk.WriteTransform(sitk.Euler3DTransform((1, 2, 3), 0.1, 0.2, 0.3), str(good))
    data = good.read_bytes()
    (tmp_path / "truncated.h5").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.h5").write_bytes(b"")
    (tmp_path / "folder.tfm").mkdir()
    (tmp_path / "TransformParameters.0.txt").write_text(
        '(Transform "BSplineTransform")\n(NumberOfParameters 3)\n(TransformParameters 0 0 0)\n')
    (tmp_path / "flirt.mat").write_text("1 0 0 2\n0 1 0 3\n0 0 1 4\n0 0 0 1\n")
    cases = {"truncated.h5": "cannot read as an ITK transform (Could not create Transform IO",
             "empty.h5": "not an HDF5 file (empty)", "folder.tfm": "is a folder",
             "TransformParameters.0.txt": "elastix parameter file is not supported",
             "flirt.mat": "plain 4×4 matrix (e.g. FSL FLIRT) is not supported"}
    for name, words in cases.items():
        with pytest.raises(InputError, match=re.escape(words)):
            read_transform(tmp_path / name)
    assert "HDF5-DIAG" not in capfd.readouterr().err
    assert read_transform(good) is not None  # a good file still reads
    # HDF5 allows a user block before the signature (512, 1024, ... bytes): ITK reads it, so do we
    (tmp_path / "userblock.h5").write_bytes(bytes(512) + data)
    assert np.allclose(read_transform(tmp_path / "userblock.h5").matrix().numpy(),
                       read_transform(good).matrix().numpy())
