"""`medreg evaluate` and `medreg report` end to end: single pair, Learn2Reg cohort, bad input."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import medreg.cli.evaluate  # noqa: F401  (registers the commands until commands.py imports them)
import medreg.cli.report  # noqa: F401
from medreg.cli import main
from medreg.core import Grid, Image
from medreg.io import write_displacement, write_image, write_l2r_displacement, write_landmarks
from medreg.transforms import DisplacementField

SHIFT = (3.0, -2.0, 4.0)  # world mm: the anatomy sits here in the moving image


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _cube(grid: Grid, start_xyz, size) -> np.ndarray:
    a = np.zeros(grid.shape, np.int16)
    x, y, z = start_xyz
    a[z:z + size, y:y + size, x:x + size] = 1
    a[z + 1:z + 3, y + 1:y + 3, x + 1:x + 3] = 2
    return a


def _translation_field(grid: Grid, t) -> DisplacementField:
    u = torch.tensor(t, dtype=torch.float64).view(1, 3, 1, 1, 1).expand(1, 3, *grid.shape)
    return DisplacementField(u.clone(), grid)


@pytest.fixture
def pair(tmp_path):
    grid = Grid((24, 22, 20), (1.0, 1.0, 1.0), (10.0, -5.0, 3.0))
    fixed = _cube(grid, (6, 5, 4), 8)
    warped = np.roll(fixed, 2, axis=2)  # 2 voxels along x: Dice of label 1 = 6/8
    moving = np.roll(np.roll(np.roll(fixed, 3, axis=2), -2, axis=1), 4, axis=0)  # +SHIFT
    write_image(Image(torch.from_numpy(fixed), grid), tmp_path / "fixed_labels.nii.gz")
    write_image(Image(torch.from_numpy(warped), grid), tmp_path / "warped_labels.nii.gz")
    write_image(Image(torch.from_numpy(moving), grid), tmp_path / "moving_labels.nii.gz")
    write_displacement(_translation_field(grid, SHIFT), tmp_path / "displacement.nii.gz")
    pts = torch.tensor(grid.center(), dtype=torch.float64) + torch.tensor(
        [[0.0, 0, 0], [2.0, -1, 3], [-4.0, 2, 1]])
    write_landmarks(pts, tmp_path / "fixed.csv")
    write_landmarks(pts + torch.tensor(SHIFT, dtype=torch.float64), tmp_path / "moving.csv")
    (tmp_path / "names.txt").write_text('0 0 0 0 0 0 0 "Clear"\n1 255 0 0 1 1 1 "Outer"\n'
                                        '2 0 255 0 1 1 1 "Inner"\n')
    return tmp_path


def test_evaluate_single_pair(pair):
    d = pair
    res = run("evaluate", "--fixed-labels", d / "fixed_labels.nii.gz",
              "--warped-labels", d / "warped_labels.nii.gz", "--lut", d / "names.txt",
              "--displacement", d / "displacement.nii.gz",
              "--fixed-landmarks", d / "fixed.csv", "--moving-landmarks", d / "moving.csv",
              "-o", d / "metrics.json", "--csv", d / "labels.csv")
    assert res.exit_code == 0, res.output
    assert "mean Dice" in res.output and "Outer" in res.output and "TRE" in res.output
    m = json.loads((d / "metrics.json").read_text())
    outer = next(r for r in m["labels"]["per_label"] if r["label"] == 1)
    f = _cube(Grid((24, 22, 20)), (6, 5, 4), 8) == 1
    w = np.roll(f, 2, axis=2)
    assert outer["dice"] == pytest.approx(2 * (f & w).sum() / (f.sum() + w.sum()))
    assert outer["hd95"] == pytest.approx(2.0)  # 2 voxels of 1 mm along x
    assert m["labels"]["per_label"][1]["name"] == "Inner"
    assert m["displacement"]["folding_count"] == 0 and m["displacement"]["sdlogj"] == 0.0
    assert m["landmarks"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert m["landmarks"]["initial"]["mean"] == pytest.approx(math.dist((0, 0, 0), SHIFT))
    assert "versions" in m and m["inputs"]["displacement"].endswith("displacement.nii.gz")
    rows = list(csv.DictReader((d / "labels.csv").open()))
    assert [r["label"] for r in rows] == ["1", "2"] and rows[0]["name"] == "Outer"
    # outputs are not overwritten without --overwrite
    res = run("evaluate", "--displacement", d / "displacement.nii.gz", "-o", d / "metrics.json")
    assert res.exit_code == 2 and "--overwrite" in res.output


def test_evaluate_warps_moving_labels(pair):
    d = pair
    res = run("evaluate", "--fixed-labels", d / "fixed_labels.nii.gz",
              "--moving-labels", d / "moving_labels.nii.gz",
              "--displacement", d / "displacement.nii.gz", "--labels", "1,2,7")
    assert res.exit_code == 0, res.output
    assert "absent from both maps (not averaged): 7" in res.output
    assert "mean Dice 1 over 2 labels" in res.output


def test_evaluate_bad_input(pair, tmp_path):
    d = pair
    g2 = Grid((24, 22, 21))
    write_image(Image(torch.zeros(g2.shape, dtype=torch.int16), g2), d / "other.nii.gz")
    res = run("evaluate", "--fixed-labels", d / "fixed_labels.nii.gz",
              "--warped-labels", d / "other.nii.gz")
    assert res.exit_code == 2
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("medreg evaluate: error:") and "other.nii.gz" in line
    res = run("evaluate", "--fixed-labels", d / "fixed_labels.nii.gz",
              "--warped-labels", d / "warped_labels.nii.gz", "--labels", " , ")
    assert res.exit_code == 2 and "empty" in res.output
    res = run("evaluate")
    assert res.exit_code == 2 and "nothing to evaluate" in res.output
    res = run("evaluate", "--fixed-landmarks", d / "fixed.csv")
    assert res.exit_code == 2 and "--moving-landmarks" in res.output
    # a displacement with NaN: the error names the file
    import SimpleITK as sitk

    arr = np.zeros((6, 5, 4, 3), np.float32)
    arr[1, 1, 1, 0] = np.nan
    img = sitk.GetImageFromArray(arr, isVector=True)
    sitk.WriteImage(img, str(d / "nan_disp.mha"))
    res = run("evaluate", "--displacement", d / "nan_disp.mha")
    assert res.exit_code == 2 and "nan_disp.mha" in res.output and "NaN" in res.output
    # a field of another pair (another box, or 2D) next to these labels: refused, naming it
    far = Grid((24, 22, 20), (1.0, 1.0, 1.0), (40.0, -5.0, 3.0))
    write_displacement(_translation_field(far, SHIFT), d / "far.nii.gz")
    flat = Grid((24, 22), (1.0, 1.0), (10.0, -5.0))
    write_displacement(DisplacementField(torch.zeros(1, 2, 22, 24, dtype=torch.float64), flat), d / "flat.nii.gz")
    for name, word in (("far.nii.gz", "another region"), ("flat.nii.gz", "2D")):
        res = run("evaluate", "--fixed-labels", d / "fixed_labels.nii.gz", "--warped-labels",
                  d / "warped_labels.nii.gz", "--displacement", d / name)
        assert res.exit_code == 2 and name in res.output and word in res.output, res.output
    # the same box at half the resolution (as Learn2Reg's fields) is accepted
    half = Grid((12, 11, 10), (2.0, 2.0, 2.0), (10.5, -4.5, 3.5))
    write_displacement(_translation_field(half, SHIFT), d / "half.nii.gz")
    res = run("evaluate", "--fixed-labels", d / "fixed_labels.nii.gz", "--warped-labels",
              d / "warped_labels.nii.gz", "--displacement", d / "half.nii.gz")
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------------------- Learn2Reg
@pytest.fixture
def l2r_task(tmp_path):
    grid = Grid((20, 18, 16), (1.5, 1.5, 1.5))
    root = tmp_path / "Toy"
    for sub in ("imagesTr", "labelsTr", "keypointsTr"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    shifts = {"0001": (0, 0, 0), "0002": (2, 0, 0), "0003": (0, 1, -1)}  # voxels (x, y, z)
    base = _cube(grid, (5, 4, 4), 8)
    kp = np.array([[8.0, 7, 6], [10, 8, 7], [6, 9, 9]])  # voxel i, j, k = x, y, z
    for s, (sx, sy, sz) in shifts.items():
        lab = np.roll(base, (sz, sy, sx), axis=(0, 1, 2))
        name = f"Toy_{s}_0000"
        img = Image(torch.from_numpy(lab.astype(np.float32) + rng.random(grid.shape)
                                     .astype(np.float32) * 0.1), grid)
        write_image(img, root / "imagesTr" / f"{name}.nii.gz")
        write_image(Image(torch.from_numpy(lab), grid), root / "labelsTr" / f"{name}.nii.gz")
        np.savetxt(root / "keypointsTr" / f"{name}.csv", kp + [sx, sy, sz], delimiter=",")
    desc = {"name": "Toy", "labels": {"0": "background", "1": "outer", "2": "inner"},
            "registration_val": [{"fixed": "./imagesTr/Toy_0001_0000.nii.gz",
                                  "moving": f"./imagesTr/Toy_{m}_0000.nii.gz"}
                                 for m in ("0002", "0003")]}
    (root / "Toy_dataset.json").write_text(json.dumps(desc))
    preds = tmp_path / "preds"
    preds.mkdir()
    for m in ("0002", "0003"):  # perfect predictions: the moving shift in mm
        t = [v * 1.5 for v in shifts[m]]
        write_l2r_displacement(_translation_field(grid, t), preds / f"disp_0001_{m}.nii.gz", grid)
    return root, preds


def test_evaluate_l2r_cohort(l2r_task, tmp_path):
    root, preds = l2r_task
    out = tmp_path / "l2r.json"
    res = run("evaluate", "--l2r", root / "Toy_dataset.json", "--predictions", preds,
              "-o", out, "--csv", tmp_path / "pairs.csv")
    assert res.exit_code == 0, res.output
    assert "[2/2] 0001_0000<--0003_0000" in res.output and "worst 30%" in res.output
    m = json.loads(out.read_text())
    assert m["n_pairs"] == 2 and m["task"] == "Toy"
    s = m["summary"]
    assert s["dice"]["mean"] == pytest.approx(1.0) and s["hd95"]["mean"] == pytest.approx(0.0)
    assert s["tre"]["mean"] == pytest.approx(0.0, abs=1e-6) and s["tre_initial"]["mean"] > 1
    assert s["sdlogj_l2r"]["mean"] == pytest.approx(0.0) and "worst30" in s["dice"]
    case = m["cases"]["0001_0000<--0002_0000"]
    assert case["details"]["labels"]["per_label"][0]["name"] == "outer"
    rows = list(csv.DictReader((tmp_path / "pairs.csv").open()))
    assert len(rows) == 2 and rows[0]["file"] == "disp_0001_0002.nii.gz"


def test_evaluate_l2r_missing_prediction(l2r_task):
    root, preds = l2r_task
    (preds / "disp_0001_0003.nii.gz").unlink()
    res = run("evaluate", "--l2r", root / "Toy_dataset.json", "--predictions", preds)
    assert res.exit_code == 2 and "1 of 2 displacement fields are missing" in res.output
    assert "disp_0001_0003.nii.gz" in res.output


# ------------------------------------------------------------------------------- report
def test_report_command(pair, tmp_path):
    d = pair
    out = tmp_path / "out"
    out.mkdir()
    grid = Grid((24, 22, 20), (1.0, 1.0, 1.0), (10.0, -5.0, 3.0))
    rng = np.random.default_rng(1)
    for name in ("fixed", "moving", "warped"):
        img = Image(torch.from_numpy(rng.random(grid.shape).astype(np.float32)), grid)
        write_image(img, (out if name == "warped" else tmp_path) / f"{name}.nii.gz")
    write_displacement(_translation_field(grid, SHIFT), out / "displacement.nii.gz")
    (out / "metrics.json").write_text(json.dumps({"labels": {"mean_dice": 0.7},
                                                  "runtime_s": 3.2}))
    res = run("report", out, "--fixed", tmp_path / "fixed.nii.gz",
              "--moving", tmp_path / "moving.nii.gz")
    assert res.exit_code == 0, res.output
    assert (out / "qc.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "0.7" in html
    res = run("report", tmp_path / "nowhere")
    assert res.exit_code == 2 and "not found" in res.output
    # nothing is replaced silently: an existing report (or any file) needs --overwrite
    victim = tmp_path / "fixed.nii.gz"
    before = victim.read_bytes()
    for args in ((), ("-o", victim)):
        res = run("report", out, *args)
        assert res.exit_code == 2 and "exists already; pass --overwrite" in res.output, res.output
    assert victim.read_bytes() == before
    res = run("report", out, "-o", tmp_path / "page.png")
    assert res.exit_code == 2 and "name it .html" in res.output
    assert run("report", out, "--overwrite").exit_code == 0


# ------------------------------------------------------------------------------- real data
@pytest.mark.data
def test_evaluate_real_brain_pair_identity_dice(shared_data, tmp_path):
    """VoxelMorph's two aseg brains without registration: mean Dice 0.522 over its 30 labels."""
    d = shared_data / "vxm-brain-t1-aseg" / "nifti"
    res = run("evaluate", "--fixed-labels", d / "fixed_labels.nii.gz",
              "--warped-labels", d / "moving_labels.nii.gz",
              "--labels-file", d / "eval_labels.txt", "--no-surface", "-o", tmp_path / "m.json")
    assert res.exit_code == 0, res.output
    labels = json.loads((tmp_path / "m.json").read_text())["labels"]
    dice = [r["dice"] for r in labels["per_label"]]
    assert len(dice) == 30 and labels["absent_labels"] == []
    assert labels["mean_dice"] == pytest.approx(0.522, abs=5e-4)
    assert min(dice) == pytest.approx(0.082, abs=5e-4)
    assert max(dice) == pytest.approx(0.865, abs=5e-4)
