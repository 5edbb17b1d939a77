"""Image IO: NIfTI RAS→LPS at the edge, agreement with SimpleITK, round trips, clear errors."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medreg.core import Frame, GeometryError, Grid, Image, InputError
from medreg.io import (grid_from_nifti_affine, grid_from_sitk, image_info, nifti_affine_from_grid,
                       read_image, set_sitk_geometry, write_image)

# A hand-made oblique, anisotropic RAS affine: in-plane rotation by a 3-4-5 angle, z flipped.
# Columns: i → 0.8 mm along (0.6, 0.8, 0); j → 1.2 mm along (-0.8, 0.6, 0); k → 2.5 mm along -S.
HAND_AFFINE = np.array([
    [0.48, -0.96, 0.0, 10.0],
    [0.64, 0.72, 0.0, -20.0],
    [0.0, 0.0, -2.5, 30.0],
    [0.0, 0.0, 0.0, 1.0],
])


def _save_nifti(path, arr, affine, sform_code=1, qform_code=1, qform=None):
    img = nib.Nifti1Image(arr, None)
    img.set_sform(affine, code=sform_code)
    img.set_qform(affine if qform is None else qform, code=qform_code)
    nib.save(img, str(path))
    return path


def _sitk_grid_info(path):
    """Size, spacing, origin, direction as SimpleITK reads them (header only)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    d = reader.GetDimension()
    return Grid(reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(),
                np.reshape(reader.GetDirection(), (d, d)))


def _random_image(grid, dtype=torch.float32, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        data = torch.randn((channels, *grid.shape), generator=g, dtype=torch.float64).to(dtype)
    else:
        data = torch.randint(0, 40, (channels, *grid.shape), generator=g).to(dtype)
    return Image(data, grid, "synthetic")


# ------------------------------------------------------------------------------ NIfTI geometry
def test_hand_affine_maps_voxel_to_lps_and_keeps_layout(tmp_path):
    arr = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)  # (i, j, k)
    path = _save_nifti(tmp_path / "hand.nii.gz", arr, HAND_AFFINE)
    img = read_image(path)
    grid = img.grid
    assert grid.size == (5, 6, 7) and img.data.shape == (1, 7, 6, 5)
    assert np.allclose(grid.spacing, (0.8, 1.2, 2.5))
    # by hand: RAS(2,3,4) = (0.96 - 2.88 + 10, 1.28 + 2.16 - 20, -10 + 30) → LPS flips r and a
    world = grid.transform_points(torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64),
                                  Frame.INDEX, Frame.WORLD)
    assert torch.allclose(world, torch.tensor([-8.08, 16.56, 20.0], dtype=torch.float64))
    assert img.data[0, 4, 3, 2] == arr[2, 3, 4]  # tensor (z, y, x) = nibabel (k, j, i)
    assert grid.orientation() == "".join(nib.aff2axcodes(HAND_AFFINE))
    assert _sitk_grid_info(path).allclose(grid)


def test_oblique_grid_written_by_sitk_read_by_medreg(tmp_path, oblique_grid3d):
    arr = np.random.default_rng(0).normal(size=oblique_grid3d.shape).astype(np.float32)
    ref = set_sitk_geometry(sitk.GetImageFromArray(arr), oblique_grid3d)
    path = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(ref, str(path))
    img = read_image(path)
    assert img.grid.allclose(oblique_grid3d)
    assert np.array_equal(img.data[0].numpy(), arr)
    for index in [(0, 0, 0), (22, 30, 16), (3.5, 7.25, 11.0)]:
        expected = ref.TransformContinuousIndexToPhysicalPoint(index)
        got = img.grid.transform_points(torch.tensor(index, dtype=torch.float64), "index", "world")
        assert np.allclose(got.numpy(), expected, atol=1e-4)


def test_oblique_grid_written_by_medreg_read_by_sitk(tmp_path, oblique_grid3d):
    image = _random_image(oblique_grid3d)
    path = tmp_path / "oblique.nii.gz"
    write_image(image, path)
    hdr = nib.load(str(path)).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    ref = sitk.ReadImage(str(path))
    assert grid_from_sitk(ref).allclose(oblique_grid3d)
    assert np.array_equal(sitk.GetArrayFromImage(ref), image.data[0].numpy())


def test_affine_helpers_are_inverse(oblique_grid3d, oblique_grid2d):
    for grid in (oblique_grid3d, oblique_grid2d):
        aff = nifti_affine_from_grid(grid)
        assert grid_from_nifti_affine(aff, grid.size).allclose(grid, atol=1e-9)


def test_sform_wins_over_qform_and_warns(tmp_path):
    qform = np.diag([2.0, 3.0, 4.0, 1.0])
    qform[:3, 3] = [10, 20, 30]
    sform = np.diag([-1.0, 1.0, 1.5, 1.0])
    sform[:3, 3] = [5, 6, 7]
    arr = np.zeros((4, 5, 6), np.float32)
    path = _save_nifti(tmp_path / "both.nii", arr, sform, sform_code=2, qform_code=1, qform=qform)
    with pytest.warns(UserWarning, match="sform and qform differ"):
        grid = read_image(path).grid
    assert np.allclose(grid.spacing, (1, 1, 1.5)) and np.allclose(grid.origin, (-5, -6, 7))
    path = _save_nifti(tmp_path / "qonly.nii", arr, sform, sform_code=0, qform_code=1,
                       qform=qform)
    grid = read_image(path).grid
    assert np.allclose(grid.spacing, (2, 3, 4)) and np.allclose(grid.origin, (-10, -20, 30))


def test_no_orientation_header_follows_itk(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), None)
    img.header.set_zooms((2.0, 3.0, 4.0))
    img.set_sform(None, code=0)
    img.set_qform(None, code=0)
    path = tmp_path / "bare.nii"
    nib.save(img, str(path))
    with pytest.warns(UserWarning, match="no orientation"):
        grid = read_image(path).grid
    assert grid.allclose(_sitk_grid_info(path))
    assert grid.orientation() == "LPS"


def test_metre_units_are_converted_like_itk(tmp_path):
    aff = np.diag([0.002, 0.003, 0.004, 1.0])
    aff[:3, 3] = [0.1, 0.2, 0.3]
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), aff)
    img.header.set_xyzt_units("meter")
    path = tmp_path / "metres.nii"
    nib.save(img, str(path))
    grid = read_image(path).grid
    assert np.allclose(grid.spacing, (2, 3, 4)) and np.allclose(grid.origin, (-100, -200, 300))
    assert grid.allclose(_sitk_grid_info(path), atol=1e-3)


def test_2d_nifti_and_single_slice_volume(tmp_path):
    aff = np.diag([0.5, 2.0, 1.0, 1.0])
    path2 = _save_nifti(tmp_path / "flat.nii.gz", np.ones((7, 5), np.float32), aff)
    img2 = read_image(path2)
    assert img2.grid.ndim == 2 and img2.grid.size == (7, 5) and img2.data.shape == (1, 5, 7)
    assert np.allclose(img2.grid.spacing, (0.5, 2.0))
    path3 = _save_nifti(tmp_path / "slab.nii.gz", np.ones((7, 5, 1), np.float32), aff)
    assert read_image(path3).grid.size == (7, 5, 1)  # dim[0] == 3: stays 3D


def test_sheared_affine_is_rejected_with_file_name(tmp_path):
    aff = np.eye(4)
    aff[0, 1] = 0.5  # shear
    path = _save_nifti(tmp_path / "shear.nii.gz", np.zeros((3, 3, 3), np.float32), aff,
                       qform_code=0)
    with pytest.raises(GeometryError, match="shear.nii.gz.*not orthonormal"):
        read_image(path)


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int16, torch.uint8])
def test_round_trip_keeps_geometry_values_and_dtype(tmp_path, suffix, ndim, dtype,
                                                    oblique_grid2d, oblique_grid3d):
    grid = oblique_grid2d if ndim == 2 else oblique_grid3d
    image = _random_image(grid, dtype)
    path = tmp_path / f"img{suffix}"
    write_image(image, path)
    back = read_image(path)
    assert back.grid.allclose(grid)
    assert back.data.dtype == dtype
    assert torch.equal(back.data, image.data)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha"])
def test_int64_labels_stay_integer(tmp_path, suffix, oblique_grid3d):
    image = _random_image(oblique_grid3d, torch.int64)
    write_image(image, tmp_path / f"lab{suffix}")
    back = read_image(tmp_path / f"lab{suffix}")
    assert back.is_label and back.data.dtype == torch.int32
    assert torch.equal(back.data.long(), image.data)


def test_mgz_round_trip(tmp_path, oblique_grid3d):
    image = _random_image(oblique_grid3d, torch.int32)
    write_image(image, tmp_path / "lab.mgz")  # MGH is big-endian on disk
    back = read_image(tmp_path / "lab.mgz")
    assert back.grid.allclose(oblique_grid3d) and torch.equal(back.data, image.data)


@pytest.mark.parametrize("suffix", [".nii.gz", ".mha", ".nrrd"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_multichannel_round_trip(tmp_path, suffix, ndim, oblique_grid2d, oblique_grid3d):
    grid = oblique_grid2d if ndim == 2 else oblique_grid3d
    image = _random_image(grid, torch.float32, channels=ndim)
    path = tmp_path / f"vec{suffix}"
    write_image(image, path)
    with pytest.raises(InputError, match="allow_channels"):
        read_image(path)
    back = read_image(path, allow_channels=True)
    assert back.grid.allclose(grid) and torch.equal(back.data, image.data)
    ref = sitk.ReadImage(str(path))  # ITK sees a vector image on the same grid
    assert ref.GetNumberOfComponentsPerPixel() == ndim and grid_from_sitk(ref).allclose(grid)


def test_write_refuses_missing_folder_and_existing_file(tmp_path, oblique_grid2d):
    image = _random_image(oblique_grid2d)
    with pytest.raises(InputError, match="does not exist"):
        write_image(image, tmp_path / "nope" / "a.nii.gz")
    write_image(image, tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="exists"):
        write_image(image, tmp_path / "a.nii.gz", overwrite=False)
    write_image(image, tmp_path / "a.nii.gz", overwrite=True)


# ------------------------------------------------------------------------------ dtypes and flags
def test_unsigned_types_are_widened(tmp_path):
    arr = np.array([[0, 65535], [7, 3]], dtype=np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "u16.mha"))
    img = read_image(tmp_path / "u16.mha")
    assert img.data.dtype == torch.int32 and int(img.data.max()) == 65535
    # written back as the type it was stored in, while the values fit it
    for suffix in (".mha", ".nii.gz"):
        write_image(img, tmp_path / f"back{suffix}")
        assert sitk.ReadImage(str(tmp_path / f"back{suffix}")).GetPixelID() == sitk.sitkUInt16
    write_image(img.with_data(img.data - 1), tmp_path / "neg.nii.gz")  # -1 does not fit uint16
    assert sitk.ReadImage(str(tmp_path / "neg.nii.gz")).GetPixelID() == sitk.sitkInt32
    # voxels of another kind, or a type the reader was asked for, are written as they are
    write_image(img.with_data(img.data > 5), tmp_path / "mask.nii.gz")
    assert sitk.ReadImage(str(tmp_path / "mask.nii.gz")).GetPixelID() == sitk.sitkUInt8
    asked = read_image(tmp_path / "u16.mha", dtype=torch.int64)
    write_image(asked, tmp_path / "asked.nii.gz")
    assert sitk.ReadImage(str(tmp_path / "asked.nii.gz")).GetPixelID() == sitk.sitkInt32


def test_label_flag_and_dtype_cast(tmp_path, oblique_grid2d):
    grid = oblique_grid2d
    whole = Image(torch.randint(0, 5, (1, *grid.shape)).float(), grid)
    write_image(whole, tmp_path / "whole.nii.gz")
    lab = read_image(tmp_path / "whole.nii.gz", label=True)
    assert lab.data.dtype == torch.int32 and torch.equal(lab.data.float(), whole.data)
    assert read_image(tmp_path / "whole.nii.gz", dtype=torch.float64).data.dtype == torch.float64
    write_image(whole.with_data(whole.data + 0.5), tmp_path / "half.nii.gz")
    with pytest.raises(InputError, match="half.nii.gz.*not whole numbers"):
        read_image(tmp_path / "half.nii.gz", label=True)
    with pytest.raises(InputError, match="not whole numbers"):
        read_image(tmp_path / "half.nii.gz", dtype=torch.int64)


def test_scaled_integers_become_float(tmp_path):
    img = nib.Nifti1Image(np.array([[[1, 2], [3, 4]]], dtype=np.int16), np.eye(4))
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, str(tmp_path / "scaled.nii"))
    data = read_image(tmp_path / "scaled.nii").data
    assert data.dtype == torch.float32 and float(data.max()) == 12.0  # not float64: half the memory


def test_a_2d_slice_keeps_its_place_along_the_third_axis(tmp_path):
    """A 2D NIfTI slice at z = 40 mm (rotated in plane, 3 mm thick) is written back at z = 40,
    and so is an output on its grid (``output_meta``): not at z = 0."""
    from medreg.io import output_meta

    c, s_ = np.cos(0.3), np.sin(0.3)
    aff = np.array([[-1.2 * c, 1.1 * s_, 0, 30.0], [1.2 * s_, 1.1 * c, 0, -20.0],
                    [0, 0, 3.0, 40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(np.random.rand(20, 16).astype(np.float32), aff), str(tmp_path / "slice.nii.gz"))
    image = read_image(tmp_path / "slice.nii.gz")
    assert image.ndim == 2
    write_image(image, tmp_path / "back.nii.gz")
    assert np.allclose(nib.load(str(tmp_path / "back.nii.gz")).affine, aff, atol=1e-5)
    out = Image(torch.zeros(image.grid.shape), image.grid, meta=output_meta(image))
    write_image(out, tmp_path / "out.nii.gz")
    assert np.allclose(nib.load(str(tmp_path / "out.nii.gz")).affine, aff, atol=1e-5)
    # on another grid the slice's matrix does not apply: the third axis is the default again
    other = Image(torch.zeros(5, 5), image.grid.crop((2, 2), (7, 7)), meta=output_meta(image))
    write_image(other, tmp_path / "other.nii.gz")
    assert nib.load(str(tmp_path / "other.nii.gz")).affine[2, 3] == 0.0
    # an sform may leave the slice axis zero (no thickness): the position is kept, 1 mm thick
    flat = aff.copy()
    flat[2, 2] = 0.0
    img = nib.Nifti1Image(np.random.rand(20, 16).astype(np.float32), None)
    img.set_sform(flat, code=2)
    nib.save(img, str(tmp_path / "flat.nii.gz"))
    write_image(read_image(tmp_path / "flat.nii.gz"), tmp_path / "flat_back.nii.gz")
    back = nib.load(str(tmp_path / "flat_back.nii.gz")).affine
    assert back[2, 3] == 40.0 and back[2, 2] == 1.0


def test_a_coronal_2d_slice_is_refused_with_what_to_do(tmp_path):
    aff = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # rows → S
    nib.save(nib.Nifti1Image(np.zeros((6, 5), np.float32), aff), str(tmp_path / "coronal.nii.gz"))
    with pytest.raises(GeometryError, match="x-y plane.*coronal.*3D image one voxel thick"):
        read_image(tmp_path / "coronal.nii.gz")


def test_an_spm_style_qform_gives_no_second_space(tmp_path):
    """sform (aligned, 2) and qform (scanner, 1) with different matrices: the output holds the
    sform matrix in both forms, so both say the sform's space."""
    aff = np.diag([-2.0, 2.0, 2.5, 1.0])
    scanner = aff.copy()
    scanner[:3, 3] = [5.0, 6.0, 7.0]
    img = nib.Nifti1Image(np.zeros((4, 4, 3), np.float32), None)
    img.set_sform(aff, code=2)
    img.set_qform(scanner, code=1)
    nib.save(img, str(tmp_path / "spm.nii.gz"))
    with pytest.warns(UserWarning, match="sform and qform differ"):
        image = read_image(tmp_path / "spm.nii.gz")
    write_image(image, tmp_path / "out.nii.gz")
    hdr = nib.load(str(tmp_path / "out.nii.gz")).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (2, 2)


@pytest.mark.parametrize("codes, written", [((4, 0), (4, 4)), ((2, 1), (2, 1)), ((0, 3), (3, 3)),
                                            ((1, 1), (1, 1))])
def test_nifti_space_codes_are_kept(tmp_path, codes, written):
    """An image in MNI (4) or aligned (2) space is written back in that space, and so is
    anything resampled onto its grid that carries its ``meta``; a form the file left unset
    takes the other's code."""
    aff = np.diag([-2.0, 2.0, 2.5, 1.0])
    aff[:3, 3] = [90.0, -126.0, -72.0]
    img = nib.Nifti1Image(np.arange(60, dtype=np.float32).reshape(5, 4, 3), aff)
    img.set_sform(aff if codes[0] else None, code=codes[0])
    img.set_qform(aff if codes[1] else None, code=codes[1])
    nib.save(img, str(tmp_path / "in.nii.gz"))
    image = read_image(tmp_path / "in.nii.gz")
    assert image.meta["nifti_codes"] == codes
    write_image(image.with_data(image.data * 2), tmp_path / "out.nii.gz")
    hdr = nib.load(str(tmp_path / "out.nii.gz")).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == written
    assert np.allclose(hdr.get_best_affine(), aff)
    # an image made without a file is in scanner space (1), as before
    write_image(Image(image.data, image.grid), tmp_path / "plain.nii.gz")
    hdr = nib.load(str(tmp_path / "plain.nii.gz")).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 1)


# ------------------------------------------------------------------------------ errors
def test_missing_and_garbage_files(tmp_path):
    with pytest.raises(InputError, match="missing.nii.gz: no such file"):
        read_image(tmp_path / "missing.nii.gz")
    for name in ("garbage.nii.gz", "garbage.nii", "garbage.mha", "garbage.xyz"):
        (tmp_path / name).write_bytes(b"this is not an image at all" * 20)
        with pytest.raises(InputError, match=f"{name}: cannot read the image"):
            read_image(tmp_path / name)


def test_4d_series_needs_allow_channels(tmp_path):
    arr = np.stack([np.full((4, 5, 6), t, np.float32) for t in range(3)], axis=-1)
    path = _save_nifti(tmp_path / "series.nii.gz", arr, np.eye(4))
    with pytest.raises(InputError, match="series.nii.gz.*4D with several volumes"):
        read_image(path)
    img = read_image(path, allow_channels=True)
    assert img.data.shape == (3, 6, 5, 4) and img.grid.size == (4, 5, 6)
    assert [float(img.data[c].mean()) for c in range(3)] == [0.0, 1.0, 2.0]
    single = _save_nifti(tmp_path / "one.nii.gz", arr[..., :1], np.eye(4))
    assert read_image(single).data.shape == (1, 6, 5, 4)


def test_complex_nan_and_1d_are_refused(tmp_path):
    cplx = _save_nifti(tmp_path / "cplx.nii", np.ones((3, 3, 3), np.complex64), np.eye(4))
    with pytest.raises(InputError, match="cplx.nii: complex"):
        read_image(cplx)
    arr = np.ones((3, 3, 3), np.float32)
    arr[0, 0, 0] = np.nan
    arr[1, 1, 1] = np.inf
    nan = _save_nifti(tmp_path / "nan.nii.gz", arr, np.eye(4))
    with pytest.raises(InputError, match="nan.nii.gz: 2 of 27 voxels are NaN"):
        read_image(nan)
    assert torch.isnan(read_image(nan, allow_nan=True).data).sum() == 1
    line = _save_nifti(tmp_path / "line.nii", np.ones(5, np.float32), np.eye(4))
    with pytest.raises(InputError, match="line.nii: 1D"):
        read_image(line)


def test_vector_mha_without_allow_channels(tmp_path):
    img = sitk.GetImageFromArray(np.zeros((4, 5, 3), np.float32), isVector=True)
    sitk.WriteImage(img, str(tmp_path / "rgb.mha"))
    with pytest.raises(InputError, match="rgb.mha.*several components"):
        read_image(tmp_path / "rgb.mha")
    colour = sitk.GetImageFromArray(np.zeros((5, 6, 3), np.uint8), isVector=True)  # an RGB picture
    sitk.WriteImage(colour, str(tmp_path / "photo.png"))
    with pytest.raises(InputError, match=r"photo.png: a colour \(RGB\) image; .*greyscale"):
        read_image(tmp_path / "photo.png")


def test_image_info_reports_geometry_and_range(oblique_grid2d):
    data = torch.arange(float(oblique_grid2d.numel)).reshape(1, *oblique_grid2d.shape)
    data[0, 0, 0] = float("nan")
    info = image_info(Image(data, oblique_grid2d, "x"))
    assert info["size"] == [29, 37] and info["orientation"] == oblique_grid2d.orientation()
    assert info["min"] == 1.0 and info["max"] == oblique_grid2d.numel - 1
    assert info["nonfinite"] == 1 and info["dtype"] == "float32" and info["channels"] == 1


# ------------------------------------------------------------------------------ real data
@pytest.mark.data
@pytest.mark.parametrize("rel", [
    "msd-hippocampus/images/hippocampus_004.nii.gz",  # sform and qform, code 1
    "mricron-colin27-aal/aal.nii.gz",  # sform only (code 4), uint8 labels
    "antspy-brain-data/ch2.nii.gz",  # qform only
    "vxm-brain-t1-aseg/nifti/fixed_labels.nii.gz",
])
def test_real_nifti_agrees_with_sitk(shared_data, rel):
    path = shared_data / rel
    img = read_image(path)
    assert img.grid.allclose(_sitk_grid_info(path))
    if "hippocampus" in rel:
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        assert np.array_equal(img.data[0].numpy(), ref)
    if "labels" in rel or "aal" in rel:
        assert img.is_label


@pytest.mark.data
def test_real_mgz_matches_itk_reading_the_same_affine(shared_data, tmp_path):
    path = shared_data / "freesurfer-brains/sub-01/mri/aseg.mgz"
    img = read_image(path)
    assert img.grid.size == (256, 256, 256) and img.grid.orientation() == "LIA"
    assert img.data.dtype == torch.int32  # big-endian int32 on disk
    # ITK cannot read MGH: give it a tiny NIfTI with the same voxel-to-RAS matrix
    tiny = tmp_path / "same_affine.nii"
    _save_nifti(tiny, np.zeros((2, 2, 2), np.float32), nib.load(str(path)).affine)
    ref = _sitk_grid_info(tiny)
    assert np.allclose(img.grid.origin, ref.origin, atol=1e-4)
    assert np.allclose(img.grid.direction, ref.direction) and np.allclose(img.grid.spacing, 1)


@pytest.mark.data
def test_real_mha_and_2d_mha(shared_data):
    for rel in ("elastix-lung-ct-masks-landmarks/3DCT_lung_baseline_small.mha",
                "itkelastix-2d-brain-mri-pair/CT_2D_head_fixed.mha"):
        path = shared_data / rel
        img = read_image(path)
        ref = sitk.ReadImage(str(path))
        assert img.grid.allclose(grid_from_sitk(ref)) and img.grid.ndim == ref.GetDimension()
        assert np.array_equal(img.data[0].numpy(), sitk.GetArrayFromImage(ref))
    lung = read_image(shared_data / "elastix-lung-ct-masks-landmarks/3DCT_lung_baseline_small.mha")
    assert lung.grid.size == (57, 78, 64) and np.allclose(lung.grid.spacing, (2.732, 2.732, 5))


@pytest.mark.data
def test_real_dicom_file_and_series_folder(shared_data, tmp_path, capfd):
    src = shared_data / "pydicom-ct-mr-small"
    single = read_image(src / "CT_small.dcm")
    assert single.grid.size == (128, 128, 1)
    assert np.allclose(single.grid.spacing[:2], 0.661468)
    ref = sitk.ReadImage(str(src / "CT_small.dcm"))
    assert single.grid.allclose(grid_from_sitk(ref))
    assert np.array_equal(single.data[0].numpy(), sitk.GetArrayFromImage(ref))
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(src / "CT_small.dcm", folder / "slice1.dcm")
    series = read_image(folder)
    assert series.grid.allclose(single.grid) and torch.equal(series.data, single.data)
    with pytest.raises(InputError, match="2 DICOM series .*put each series in its own folder"):
        read_image(src)  # the CT and the MR slice are two series
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(src))
    sizes = {read_image(src, series_id=i).grid.size for i in ids}
    assert sizes == {(128, 128, 1), (64, 64, 1)}
    with pytest.raises(InputError, match="no DICOM series 'nope'"):
        read_image(src, series_id="nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(empty)
    assert "No Series were found" not in capfd.readouterr().err  # ITK's own warning stays quiet


def test_overwriting_the_file_just_read(tmp_path, oblique_grid3d):
    path = tmp_path / "same.nii"  # uncompressed: nibabel could memory-map it
    write_image(_random_image(oblique_grid3d), path)
    image = read_image(path)
    write_image(image.with_data(image.data + 1), path)
    assert torch.equal(read_image(path).data, image.data + 1)


def test_parallel_gzip_writer_edge_sizes(tmp_path, monkeypatch):
    # one member per block, none wasted at an exact multiple, one (empty) member for no data;
    # the whole file decompresses to the bytes written
    import gzip

    import medreg.io._gzip as pgz

    monkeypatch.setattr(pgz, "BLOCK", 4)
    for data, members in ((b"", 1), (b"abcd", 1), (b"abcdefgh", 2), (b"abcdefghij", 3)):
        with pgz.ParallelGzipWriter(tmp_path / "t.gz", threads=2) as f:
            for i in range(0, len(data), 3):  # writes that straddle the blocks
                f.write(data[i:i + 3])
            assert f.tell() == len(data)
        raw = (tmp_path / "t.gz").read_bytes()
        assert raw.count(b"\x1f\x8b\x08") == members and gzip.decompress(raw) == data


def test_a_failed_write_leaves_no_file_behind(tmp_path, oblique_grid3d):
    """A format that cannot hold the image is an InputError, and the empty file the writer had
    opened is removed, so the same command can be run again with another name (or the same)."""
    img = Image(torch.rand(oblique_grid3d.shape), oblique_grid3d)
    target = tmp_path / "result.png"  # PNG holds no 3D float image
    for _ in range(2):  # the second try gets the same message, not "exists already"
        with pytest.raises(InputError, match="cannot write the image"):
            write_image(img, target)
        assert not target.exists()
