"""`medreg register` end to end: outputs, ITK reproduces the warp, determinism, bad input."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from medreg.cli import main
from medreg.core import Grid, Image
from medreg.io import read_image, write_image
from medreg.transforms import AffineTransform, Identity, warp_image, warp_labels

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "medreg" / "data"

SMALL_CONFIG = """
initialisation: com
stages:
  - type: affine
    levels: [2]
    iterations: [30]
    similarity: {name: ncc}
  - type: svf
    levels: [2]
    iterations: [15]
    similarity: {name: lncc, window: 5}
    regularisation: {diffusion: 0.5}
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 3D pair from the bundled Colin27 (cropped, 2 mm): moving is a rotated, shifted copy
    on a different grid (other size, spacing and orientation)."""
    tmp = tmp_path_factory.mktemp("pair")
    vol = read_image(BUNDLED / "colin27_t1_2mm.nii.gz")
    lab = read_image(BUNDLED / "colin27_aal_2mm.nii.gz")
    g = vol.grid.crop((20, 25, 25), (70, 85, 65))
    fixed = warp_image(vol.to(torch.float32), Identity(3), g)
    fixed_lab = warp_labels(lab, Identity(3), g)
    mg = Grid((44, 52, 36), (2.2, 2.1, 2.3), g.origin, np.diag([1.0, -1.0, 1.0]) @ g.direction)
    mg = mg.replace(origin=(np.asarray(g.center()) - mg.direction @ (np.asarray(mg.size) - 1) / 2 * np.asarray(mg.spacing)).tolist())
    truth = AffineTransform(3, torch.eye(3, dtype=torch.float64), [3.0, -2.0, 1.5],
                            center=list(g.center()), trainable=False, dtype=torch.float64)
    moving = warp_image(vol.to(torch.float32), truth.inverse(), mg)
    moving_lab = warp_labels(lab, truth.inverse(), mg)
    fixed.meta["nifti_codes"] = (4, 2)  # fixed in a standard space (MNI sform, aligned qform)
    for name, img in [("fixed", fixed), ("moving", moving), ("fixed_lab", fixed_lab), ("moving_lab", moving_lab)]:
        write_image(img, tmp / f"{name}.nii.gz")
    (tmp / "small.yaml").write_text(SMALL_CONFIG)
    return tmp


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_register_writes_all_outputs_that_itk_reproduces(pair, tmp_path):
    out = tmp_path / "out"
    res = run("register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "-o", out, "--config", pair / "small.yaml",
              "--fixed-labels", pair / "fixed_lab.nii.gz", "--moving-labels", pair / "moving_lab.nii.gz", "--quiet")
    assert res.exit_code == 0, res.output
    for f in ("warped.nii.gz", "warped_labels.nii.gz", "transform.h5", "displacement.nii.gz", "metrics.json", "qc.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    import json

    m = json.loads((out / "metrics.json").read_text())
    assert m["dice_after"] > m["dice_before"]
    assert "versions" in m and "preset_config" in m
    fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(pair / "moving.nii.gz"), sitk.sitkFloat32)
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    assert warped.GetSize() == fixed.GetSize() and np.allclose(warped.GetOrigin(), fixed.GetOrigin())
    assert np.allclose(warped.GetDirection(), fixed.GetDirection())
    import nibabel as nib

    for name in ("warped.nii.gz", "warped_labels.nii.gz", "displacement.nii.gz"):  # fixed's space
        hdr = nib.load(str(out / name)).header
        assert (hdr["sform_code"], hdr["qform_code"]) == (4, 2), name
    tx = sitk.ReadTransform(str(out / "transform.h5"))
    ref = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    ours = sitk.GetArrayFromImage(warped)
    rng = float(ours.max() - ours.min())
    _assert_same_warp(ours, ref, rng, fixed, moving, tx)
    # the displacement field file reproduces the warp too
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    ref2 = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field),
                                                sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    _assert_same_warp(ours, ref2, rng, fixed, moving, tx)


def test_ants_apply_transforms_reproduces_the_warp(pair, tmp_path):
    """`transform.h5` read by ANTs (antspyx's antsApplyTransforms; installed by `make
    bench-setup`, skipped without it) warps the moving image as `warped.nii.gz`: moving on
    another grid, spacing and axis orientation than fixed."""
    ants = pytest.importorskip("ants")
    out = tmp_path / "out"
    res = run("register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "-o", out, "--config",
              pair / "small.yaml", "--quiet")
    assert res.exit_code == 0, res.output
    fixed_a = ants.image_read(str(pair / "fixed.nii.gz"), pixeltype="float")
    moving_a = ants.image_read(str(pair / "moving.nii.gz"), pixeltype="float")
    warped_a = ants.apply_transforms(fixed_a, moving_a, transformlist=[str(out / "transform.h5")],
                                     interpolator="linear")
    ref = warped_a.numpy().transpose(2, 1, 0)  # antspy arrays are (x, y, z); ours (z, y, x)
    fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"))
    moving = sitk.ReadImage(str(pair / "moving.nii.gz"), sitk.sitkFloat32)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert np.allclose(warped_a.origin, fixed.GetOrigin()) and ref.shape == ours.shape
    _assert_same_warp(ours, ref, float(ours.max() - ours.min()), fixed, moving,
                      sitk.ReadTransform(str(out / "transform.h5")))


def _assert_same_warp(ours, ref, rng, fixed, moving, tx):
    """Our warp equals ITK's inside the image (2 border voxels off), except where a point lands
    within 1e-3 voxel of the moving image's edge (index −0.5 or size − 0.5): there float32 vs
    float64 rounding decides inside (interpolated) or outside (0) for either tool."""
    bad = np.argwhere(np.abs(ours - ref)[2:-2, 2:-2, 2:-2] >= 1e-3 * rng) + 2
    size = np.asarray(moving.GetSize())
    for k in bad:
        pt = fixed.TransformIndexToPhysicalPoint([int(i) for i in k[::-1]])
        ci = np.asarray(moving.TransformPhysicalPointToContinuousIndex(tx.TransformPoint(pt)))
        edge = np.minimum(np.abs(ci + 0.5), np.abs(ci - (size - 0.5))).min()
        assert edge < 1e-3, (tuple(k), ci, ours[tuple(k)], ref[tuple(k)])
    assert len(bad) <= 1e-4 * ours.size, len(bad)


def test_seed_gives_identical_outputs(pair, tmp_path):
    (tmp_path / "tiny.yaml").write_text(SMALL_CONFIG.replace("[30]", "[8]").replace("[15]", "[5]"))
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        res = run("register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "-o", out, "--config",
                  tmp_path / "tiny.yaml", "--seed", 7, "--quiet")
        assert res.exit_code == 0, res.output
        outs.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz"))))
    assert np.array_equal(outs[0], outs[1])


def _one_line(res, *words):
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("medreg register: error:"), res.output
    for w in words:
        assert w in lines[0], lines[0]


def test_bad_inputs(pair, tmp_path):
    f, m = pair / "fixed.nii.gz", pair / "moving.nii.gz"
    cfg = pair / "small.yaml"
    g2 = Grid((20, 20))
    write_image(Image(torch.rand(20, 20), g2), tmp_path / "flat.nii.gz")
    _one_line(run("register", f, tmp_path / "flat.nii.gz", "-o", tmp_path / "o1", "--config", cfg), "2D", "3D")
    fixed = read_image(f)
    write_image(Image(torch.zeros(fixed.grid.shape, dtype=torch.uint8), fixed.grid), tmp_path / "empty.nii.gz")
    _one_line(run("register", f, m, "-o", tmp_path / "o2", "--config", cfg, "--fixed-mask", tmp_path / "empty.nii.gz"),
              "empty")
    write_image(Image(torch.full(fixed.grid.shape, 5.0), fixed.grid), tmp_path / "const.nii.gz")
    _one_line(run("register", tmp_path / "const.nii.gz", m, "-o", tmp_path / "o3", "--config", cfg), "constant")
    nan = fixed.data.float().clone()
    nan[0, 3, 3, 3] = float("nan")
    write_image(Image(nan, fixed.grid), tmp_path / "nan.mha")
    _one_line(run("register", tmp_path / "nan.mha", m, "-o", tmp_path / "o4", "--config", cfg), "nan.mha")
    _one_line(run("register", f, m, "-o", tmp_path / "o5", "--config", cfg, "--moving-labels", pair / "fixed_lab.nii.gz"),
              "grid")
    out = tmp_path / "o6"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"x")
    _one_line(run("register", f, m, "-o", out, "--config", cfg), "--overwrite")
    # a 3D image one or two slices thick (a slice saved as 3D): one line naming the file and axis
    thin = fixed.grid.crop((0, 0, 10), (fixed.grid.size[0], fixed.grid.size[1], 12))
    write_image(warp_image(fixed, Identity(3), thin), tmp_path / "slab.nii.gz")
    _one_line(run("register", tmp_path / "slab.nii.gz", m, "-o", tmp_path / "o8", "--config", cfg),
              "slab.nii.gz", "z (2)", "2D")
    res = run("register", f, m, "-o", tmp_path / "o9", "--threads", 0)
    assert res.exit_code == 2 and "--threads" in res.output and "Traceback" not in res.output
    (tmp_path / "bad.yaml").write_text("stages:\n  - type: affine\n    iteratons: 3\n")
    _one_line(run("register", f, m, "-o", tmp_path / "o7", "--config", tmp_path / "bad.yaml"), "iteratons")
    # fixed labels alone would be ignored; an OUTDIR named like a file is a mistake (ANTs' prefix)
    _one_line(run("register", f, m, "-o", tmp_path / "o10", "--config", cfg, "--fixed-labels", pair / "fixed_lab.nii.gz"),
              "--fixed-labels needs --moving-labels")
    _one_line(run("register", f, m, "-o", tmp_path / "result.nii.gz", "--config", cfg), "looks like a file name")
    assert not (tmp_path / "result.nii.gz").exists()


def test_overwrite_removes_the_earlier_runs_outputs(pair, tmp_path):
    (tmp_path / "tiny.yaml").write_text(SMALL_CONFIG.replace("[30]", "[3]").replace("[15]", "[2]"))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("warped.nii.gz", "warped_labels.nii.gz", "qc.png", "report.html"):  # an earlier run's
        (out / name).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    res = run("register", pair / "fixed.nii.gz", pair / "moving.nii.gz", "-o", out, "--config",
              tmp_path / "tiny.yaml", "--overwrite", "--quiet")
    assert res.exit_code == 0, res.output
    # this run has no labels: the old warped labels must not sit beside its transform
    assert not (out / "warped_labels.nii.gz").exists()
    assert not (out / "report.html").exists()  # `medreg report`'s page described the old run
    assert (out / "warped.nii.gz").read_bytes() != b"old" and (out / "qc.png").read_bytes() != b"old"
    assert (out / "notes.txt").read_text() == "mine"  # files that are not outputs are left alone
