"""`medreg apply` end to end: images, labels, points, several transforms, bad input."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from medreg.cli import main
from medreg.core import Grid, Image
from medreg.io import (read_image, read_landmarks, read_named_landmarks, write_image, write_landmarks,
                       write_transform)
from medreg.transforms import RigidTransform, TranslationTransform

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "medreg" / "data"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


@pytest.fixture
def tiny(tmp_path):
    g = Grid((12, 10, 8), (1.5, 1.0, 2.0), (4.0, -3.0, 2.0))
    img = Image(torch.rand(*g.shape), g, "tiny")
    write_image(img, tmp_path / "tiny.nii.gz")
    return tmp_path, g, img


def test_apply_bundled_real_image_matches_sitk(tmp_path):
    t1 = BUNDLED / "colin27_t1_2mm.nii.gz"
    tfm = BUNDLED / "demo_rigid.tfm"
    res = run("apply", tfm, t1, "-r", t1, "-o", tmp_path / "w.nii.gz")
    assert res.exit_code == 0, res.output
    assert "w.nii.gz" in res.output
    ours = sitk.ReadImage(str(tmp_path / "w.nii.gz"))
    img = sitk.ReadImage(str(t1))
    ref = sitk.Resample(img, img, sitk.ReadTransform(str(tfm)), sitk.sitkLinear, 0.0)
    assert ours.GetSize() == img.GetSize()
    assert np.allclose(ours.GetOrigin(), img.GetOrigin()) and np.allclose(ours.GetDirection(), img.GetDirection())
    diff = np.abs(sitk.GetArrayFromImage(ours).astype(float) - sitk.GetArrayFromImage(ref).astype(float))
    assert diff.max() <= 1  # uint8 rounding
    labels = run("apply", tfm, BUNDLED / "colin27_aal_2mm.nii.gz", "-r", t1, "-o", tmp_path / "l.nii.gz",
                 "--interpolation", "nearest")
    assert labels.exit_code == 0
    lab = read_image(tmp_path / "l.nii.gz")
    assert lab.is_label and set(torch.unique(lab.data).tolist()) <= set(range(117))


def test_apply_writes_in_the_references_space(tmp_path):
    """A reference in MNI space (NIfTI sform code 4) gives an output tagged MNI too, not
    scanner: viewers (FSLeyes, AFNI) show the two in one space only then."""
    import nibabel as nib

    t1 = BUNDLED / "colin27_t1_2mm.nii.gz"
    ref = nib.load(str(t1))
    mni = nib.Nifti1Image(np.asanyarray(ref.dataobj), ref.affine)
    mni.set_sform(ref.affine, code=4)
    mni.set_qform(ref.affine, code=4)
    nib.save(mni, str(tmp_path / "ref_mni.nii.gz"))
    res = run("apply", BUNDLED / "demo_rigid.tfm", t1, "-r", tmp_path / "ref_mni.nii.gz", "-o",
              tmp_path / "w.nii.gz")
    assert res.exit_code == 0, res.output
    hdr = nib.load(str(tmp_path / "w.nii.gz")).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (4, 4)
    assert np.allclose(hdr.get_best_affine(), ref.affine)


def test_apply_keeps_a_uint16_label_maps_type(tiny):
    tmp, g, img = tiny
    labels = Image(torch.randint(0, 3, g.shape) * 30000, g, "u16 labels")
    write_image(labels, tmp / "lab.nii.gz")
    import nibabel as nib

    raw = nib.load(str(tmp / "lab.nii.gz"))
    nib.save(nib.Nifti1Image(np.asanyarray(raw.dataobj).astype(np.uint16), raw.affine), str(tmp / "u16.nii.gz"))
    write_transform(TranslationTransform(3, translation=[1.5, 0.0, 0.0], dtype=torch.float64), tmp / "t.mat")
    res = run("apply", tmp / "t.mat", tmp / "u16.nii.gz", "-r", tmp / "tiny.nii.gz", "-o", tmp / "w.nii.gz",
              "--interpolation", "nearest")
    assert res.exit_code == 0, res.output
    out = nib.load(str(tmp / "w.nii.gz"))
    assert out.get_data_dtype() == np.uint16 and set(np.unique(np.asanyarray(out.dataobj))) <= {0, 30000, 60000}


def test_soft_interpolation_takes_a_label_map_stored_as_float(tiny):
    """``-n soft`` accepts what ``register --moving-labels`` accepts: a label map written as
    float with whole values (as many tools save them) gives the same labels as the integer file."""
    tmp, g, _ = tiny
    labels = torch.randint(0, 4, g.shape, generator=torch.Generator().manual_seed(3))
    write_image(Image(labels.to(torch.int16), g), tmp / "int.nii.gz")
    write_image(Image(labels.to(torch.float32), g), tmp / "float.nii.gz")
    write_transform(TranslationTransform(3, translation=[1.5, -0.5, 0.0], dtype=torch.float64), tmp / "t.tfm")
    for name in ("int", "float"):
        res = run("apply", tmp / "t.tfm", tmp / f"{name}.nii.gz", "-r", tmp / "tiny.nii.gz",
                  "-o", tmp / f"w_{name}.nii.gz", "-n", "soft")
        assert res.exit_code == 0, res.output
    a, b = read_image(tmp / "w_int.nii.gz"), read_image(tmp / "w_float.nii.gz")
    assert torch.equal(a.data.long(), b.data.long()) and len(torch.unique(a.data)) > 2
    write_image(Image(labels.to(torch.float32) + 0.5, g), tmp / "half.nii.gz")
    res = run("apply", tmp / "t.tfm", tmp / "half.nii.gz", "-r", tmp / "tiny.nii.gz", "-o", tmp / "w_half.nii.gz", "-n", "soft")
    assert res.exit_code == 2 and "half.nii.gz" in res.output


def test_apply_takes_only_the_grid_of_the_reference(tiny):
    """A reference with NaN voxels or several volumes (an fMRI run) gives its grid, as
    antsApplyTransforms -r does; the image that is resampled is still checked."""
    import nibabel as nib

    tmp, g, img = tiny
    write_transform(TranslationTransform(3, translation=[1.0, 0.0, 0.0], dtype=torch.float64), tmp / "t.mat")
    ref = nib.load(str(tmp / "tiny.nii.gz"))
    vol = np.asanyarray(ref.dataobj).astype(np.float32)
    vol[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(vol, ref.affine), str(tmp / "nan_ref.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([vol, vol, vol], -1), ref.affine), str(tmp / "run_4d.nii.gz"))
    for name in ("nan_ref.nii.gz", "run_4d.nii.gz"):
        res = run("apply", tmp / "t.mat", tmp / "tiny.nii.gz", "-r", tmp / name, "-o", tmp / f"w_{name}")
        assert res.exit_code == 0, res.output
        out = read_image(tmp / f"w_{name}")
        assert out.grid.allclose(g) and bool(torch.isfinite(out.data).all())
    # a statistic map with a NaN background is resampled with its NaNs carried through (as ITK)
    res = run("apply", tmp / "t.mat", tmp / "nan_ref.nii.gz", "-r", tmp / "tiny.nii.gz", "-o", tmp / "x.nii.gz")
    assert res.exit_code == 0 and "1 NaN/infinite voxels" in res.output
    out = read_image(tmp / "x.nii.gz", allow_nan=True).data[0]
    nan = torch.isnan(out)
    assert 1 <= int(nan.sum()) <= 8 and bool(nan[:3, :3, :3].any())  # near the NaN voxel only
    assert bool(torch.isfinite(out[~nan]).all())


def test_apply_real_shared_image(tmp_path, shared_data):
    fixed = shared_data / "vxm-brain-t1-aseg" / "nifti" / "fixed.nii.gz"
    t = TranslationTransform(3, translation=[2.0, 0.0, -1.0], dtype=torch.float64)
    write_transform(t, tmp_path / "t.mat")
    res = run("apply", tmp_path / "t.mat", fixed, "-r", fixed, "-o", tmp_path / "w.nii.gz")
    assert res.exit_code == 0, res.output
    assert read_image(tmp_path / "w.nii.gz").grid.allclose(read_image(fixed).grid)


def test_apply_several_transforms_in_itk_order(tiny):
    tmp, g, img = tiny
    a = TranslationTransform(3, translation=[3.0, 0.0, 0.0], dtype=torch.float64)
    r = RigidTransform(3, rotation=[0.0, 0.0, 0.3], center=list(g.center()), dtype=torch.float64)
    write_transform(a, tmp / "a.tfm")
    write_transform(r, tmp / "r.h5")
    pts = torch.tensor([[5.0, 1.0, 4.0], [10.0, 2.0, 6.0]], dtype=torch.float64)
    write_landmarks(pts, tmp / "p.csv")
    res = run("apply", tmp / "a.tfm", tmp / "r.h5", "--points", tmp / "p.csv", "-o", tmp / "o.csv")
    assert res.exit_code == 0, res.output
    out = read_landmarks(tmp / "o.csv")
    assert torch.allclose(out, a(r(pts)), atol=1e-9)  # r (listed last) applied first
    res = run("apply", tmp / "a.tfm", tmp / "r.h5", "--points", tmp / "o.csv", "-o", tmp / "back.csv", "--inverse")
    assert res.exit_code == 0
    assert torch.allclose(read_landmarks(tmp / "back.csv"), pts, atol=1e-9)
    # named points keep their names (a CSV label column in, Slicer labels out)
    write_landmarks(pts, tmp / "named.csv", names=["apex", "base"])
    res = run("apply", tmp / "a.tfm", "--points", tmp / "named.csv", "-o", tmp / "named_out.fcsv")
    assert res.exit_code == 0, res.output
    moved, names = read_named_landmarks(tmp / "named_out.fcsv")
    assert names == ["apex", "base"] and torch.allclose(moved, a(pts), atol=1e-9)
    res = run("apply", tmp / "a.tfm", tmp / "r.h5", tmp / "tiny.nii.gz", "-r", tmp / "tiny.nii.gz",
              "-o", tmp / "w.nii.gz", "--interpolation", "bspline")
    assert res.exit_code == 0
    assert read_image(tmp / "w.nii.gz").grid.allclose(g)


def _one_line_error(res, *words):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("medreg apply: error:"), res.output
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs_give_one_line(tiny):
    tmp, g, _ = tiny
    t2 = TranslationTransform(2, translation=[1.0, 0.0])
    write_transform(t2, tmp / "t2.tfm")
    _one_line_error(run("apply", tmp / "missing.tfm", tmp / "tiny.nii.gz", "-r", tmp / "tiny.nii.gz", "-o", tmp / "o.nii.gz"),
                    "missing.tfm")
    _one_line_error(run("apply", tmp / "t2.tfm", tmp / "tiny.nii.gz", "-r", tmp / "tiny.nii.gz", "-o", tmp / "o.nii.gz"),
                    "2D", "3D")
    (tmp / "bad.nii.gz").write_bytes(b"not a nifti file at all")
    write_transform(TranslationTransform(3), tmp / "t3.tfm")
    _one_line_error(run("apply", tmp / "t3.tfm", tmp / "bad.nii.gz", "-r", tmp / "tiny.nii.gz", "-o", tmp / "o.nii.gz"),
                    "bad.nii.gz")
    (tmp / "bad.tfm").write_text("#Insight Transform File V1.0\nnonsense\n")
    _one_line_error(run("apply", tmp / "bad.tfm", tmp / "tiny.nii.gz", "-r", tmp / "tiny.nii.gz", "-o", tmp / "o.nii.gz"),
                    "bad.tfm")
    (tmp / "exists.nii.gz").write_bytes(b"")
    _one_line_error(run("apply", tmp / "t3.tfm", tmp / "tiny.nii.gz", "-r", tmp / "tiny.nii.gz", "-o", tmp / "exists.nii.gz"),
                    "--overwrite")
    # the image and the transform swapped: say that the order is wrong
    _one_line_error(run("apply", tmp / "tiny.nii.gz", tmp / "t3.tfm", "-r", tmp / "tiny.nii.gz", "-o", tmp / "o.nii.gz"),
                    "tiny.nii.gz", "the transforms come first and the image to resample last")
    # a landmark file without landmarks: as evaluate says, not an empty output
    (tmp / "none.csv").write_text("x,y,z\n")
    _one_line_error(run("apply", tmp / "t3.tfm", "--points", tmp / "none.csv", "-o", tmp / "mapped.csv"),
                    "none.csv", "no landmarks")
    assert not (tmp / "mapped.csv").exists()
