"""Label overlap and surface distances: analytic cases and agreement with SimpleITK."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from medreg.core import Grid, Image, InputError
from medreg.metrics import (assd, dice, hausdorff, hd95, label_metrics, surface,
                            surface_distances, surface_metrics, to_jsonable)


def _cube(shape, start, size):
    a = np.zeros(shape, dtype=np.int16)
    a[tuple(slice(s, s + size) for s in start)] = 1
    return a


# ------------------------------------------------------------------------------- analytic
def test_identical_maps_give_dice_one_and_zero_distances(oblique_grid3d):
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, size=oblique_grid3d.shape).astype(np.int32)
    img = Image(torch.from_numpy(lab), oblique_grid3d, "fixed.nii.gz")
    lm = label_metrics(img, Image(torch.from_numpy(lab.copy()), oblique_grid3d, "warped.nii.gz"))
    assert lm.labels_evaluated == [1, 2, 3]
    for s in lm.per_label:
        assert s.status == "ok"
        assert s.dice == 1.0
        assert s.hd95 == 0.0 and s.hd == 0.0 and s.assd == 0.0
    assert lm.mean_dice == 1.0 and lm.mean_hd95 == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])  # tensor axis z, y, x
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_cube_exact_dice_and_hd95(axis, k):
    spacing = (0.7, 1.3, 2.1)  # x, y, z
    grid = Grid((30, 28, 26), spacing)
    n = 10
    a = _cube(grid.shape, (6, 7, 8), n)
    b = np.roll(a, k, axis=axis)
    lm = label_metrics(Image(torch.from_numpy(a), grid), Image(torch.from_numpy(b), grid))
    s = lm.score(1)
    assert s.dice == pytest.approx((n - k) / n, abs=1e-12)
    step = spacing[2 - axis]  # tensor axis -> (x, y, z) spacing
    assert s.hd95 == pytest.approx(k * step, abs=1e-9)
    assert s.hd == pytest.approx(k * step, abs=1e-9)
    assert 0 < s.assd < k * step


def test_shifted_square_2d():
    grid = Grid((40, 30), (0.5, 2.0))
    a = _cube(grid.shape, (5, 8), 12)
    b = np.roll(a, 2, axis=1)  # along x
    assert hd95(a, b, grid.spacing) == pytest.approx(1.0)
    assert dice(a, b) == pytest.approx(10 / 12)


def test_surface_counts_image_border():
    m = np.zeros((5, 6), bool)
    m[:, :3] = True
    s = surface(m)
    assert s[:, 2].all() and s[0].sum() == 3 and s[:, 0].all()
    assert not s[2, 1]


def test_empty_masks():
    e = np.zeros((6, 6, 6), bool)
    f = e.copy()
    f[2:4, 2:4, 2:4] = True
    assert math.isnan(hd95(e, e))
    assert math.isinf(hd95(e, f)) and math.isinf(assd(f, e))
    d_ab, d_ba = surface_distances(f, e)
    assert np.isinf(d_ab).all() and d_ba.size == 0


def test_absent_and_missing_labels_are_reported_not_averaged():
    grid = Grid((12, 12, 12))
    f = np.zeros(grid.shape, np.int32)
    w = np.zeros(grid.shape, np.int32)
    f[1:5, 1:5, 1:5] = 1
    w[1:5, 1:5, 1:5] = 1
    f[6:9, 6:9, 6:9] = 2  # lost in the warped map
    w[6:9, 1:4, 1:4] = 3  # only in the warped map
    lm = label_metrics(Image(torch.from_numpy(f), grid), Image(torch.from_numpy(w), grid),
                       labels=[1, 2, 3, 4], names={1: "one", 4: "four"})
    st = {s.label: s.status for s in lm.per_label}
    assert st == {1: "ok", 2: "missing_in_warped", 3: "missing_in_fixed", 4: "absent"}
    assert lm.absent_labels == [4]
    assert lm.missing_in_warped == [2] and lm.missing_in_fixed == [3]
    assert lm.labels_evaluated == [1, 2, 3]
    assert lm.mean_dice == pytest.approx(1 / 3)  # 1, 0, 0; label 4 left out
    assert lm.mean_hd95 == 0.0  # only label 1 has distances
    d = lm.to_dict()
    json.dumps(d, allow_nan=False)  # strict JSON: undefined values are null
    row4 = next(r for r in d["per_label"] if r["label"] == 4)
    assert row4["dice"] is None and row4["name"] == "four"
    assert lm.score(1).name == "one"


def test_errors_name_the_files():
    g1, g2 = Grid((8, 8, 8)), Grid((8, 8, 9))
    a = Image(torch.zeros(g1.shape, dtype=torch.int32), g1, "fixed_labels.nii.gz")
    b = Image(torch.zeros(g2.shape, dtype=torch.int32), g2, "warped_labels.nii.gz")
    with pytest.raises(InputError, match="fixed_labels.nii.gz.*warped_labels.nii.gz"):
        label_metrics(a, b)
    c = Image(torch.zeros(g1.shape, dtype=torch.int32), g1.replace(spacing=(1, 1, 2)), "c.nii")
    with pytest.raises(InputError, match="geometry"):
        label_metrics(a, c)
    with pytest.raises(InputError, match="only background"):
        label_metrics(a, a)
    with pytest.raises(InputError, match="empty"):
        label_metrics(a, a, labels=[])
    nan = torch.zeros(g1.shape)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="nan.nii.*NaN"):
        label_metrics(a, Image(nan, g1, "nan.nii"))
    frac = torch.full(g1.shape, 0.5)
    with pytest.raises(InputError, match="non-integer"):
        label_metrics(Image(frac, g1, "f.nii"), a)


def test_to_jsonable_handles_numpy_and_nonfinite():
    out = to_jsonable({"a": np.float32(1.5), "b": float("inf"), "c": np.arange(2),
                       "d": torch.tensor(3), 4: (np.int64(2),)})
    assert out == {"a": 1.5, "b": None, "c": [0, 1], "d": 3, "4": [2]}


# ------------------------------------------------------------------------------- SimpleITK
def _random_labels(shape, seed, n_labels=3, sigma=2.5):
    rng = np.random.default_rng(seed)
    fields = [ndimage.gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(n_labels)]
    stack = np.stack(fields)
    lab = stack.argmax(0) + 1
    lab[stack.max(0) < np.percentile(stack.max(0), 40)] = 0
    lab[:2], lab[-2:], lab[:, :2], lab[:, -2:], lab[..., :2], lab[..., -2:] = 0, 0, 0, 0, 0, 0
    return lab.astype(np.int16)


def _sitk(arr, grid):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction.ravel().tolist())
    return img


def _sitk_surface_hd95(a_img, b_img, label):
    """HD95 from SimpleITK's contours and Maurer distance maps (independent implementation)."""
    def contour(img):
        return sitk.LabelContour(sitk.Equal(img, label), fullyConnected=False)

    def dist_to(img):
        return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            contour(img), insideIsPositive=False, squaredDistance=False, useImageSpacing=True))

    ca = sitk.GetArrayFromImage(contour(a_img)) > 0
    cb = sitk.GetArrayFromImage(contour(b_img)) > 0
    d_ab = np.maximum(dist_to(b_img)[ca], 0)
    d_ba = np.maximum(dist_to(a_img)[cb], 0)
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


@pytest.mark.parametrize("seed", [1, 2])
def test_agrees_with_simpleitk_on_random_label_maps(oblique_grid3d, seed):
    grid = oblique_grid3d
    f = _random_labels(grid.shape, seed)
    w = _random_labels(grid.shape, seed + 100)
    lm = label_metrics(Image(torch.from_numpy(f), grid), Image(torch.from_numpy(w), grid))
    fi, wi = _sitk(f, grid), _sitk(w, grid)
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(fi, wi)
    diag = float(np.linalg.norm(grid.spacing))
    hd_filter = sitk.HausdorffDistanceImageFilter()
    for s in lm.per_label:
        assert s.status == "ok"
        assert s.dice == pytest.approx(overlap.GetDiceCoefficient(s.label), abs=1e-9)
        assert abs(s.hd95 - _sitk_surface_hd95(fi, wi, s.label)) <= diag
        hd_filter.Execute(sitk.Equal(fi, s.label), sitk.Equal(wi, s.label))
        assert abs(s.hd - hd_filter.GetHausdorffDistance()) <= diag


def test_surface_metrics_2d_matches_simpleitk():
    grid = Grid((48, 40), (0.8, 1.6))
    f = _random_labels(grid.shape, 7, n_labels=2, sigma=3)
    w = _random_labels(grid.shape, 8, n_labels=2, sigma=3)
    fi, wi = _sitk(f, grid), _sitk(w, grid)
    for label in (1, 2):
        ours = surface_metrics(f == label, w == label, grid.spacing)
        assert abs(ours["hd95"] - _sitk_surface_hd95(fi, wi, label)) <= np.linalg.norm(grid.spacing)
        assert hausdorff(f == label, w == label, grid.spacing) == ours["hd"]


def test_surface_distances_equal_brute_force_on_anisotropic_3d():
    """Each directed distance is the exact mm distance to the nearest surface-voxel centre of the
    other mask (spacing in (x, y, z) order applied to the reversed tensor axes)."""
    from medreg.metrics.surface import surface, surface_distances

    spacing = (0.7, 1.3, 2.1)
    a = _random_labels((14, 17, 19), 3, n_labels=1, sigma=2) == 1
    b = _random_labels((14, 17, 19), 4, n_labels=1, sigma=2) == 1
    d_ab, d_ba = surface_distances(a, b, spacing)
    scale = np.array(spacing[::-1])
    pa, pb = np.argwhere(surface(a)) * scale, np.argwhere(surface(b)) * scale
    pair = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    np.testing.assert_allclose(d_ab, pair.min(1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(d_ba, pair.min(0), rtol=0, atol=1e-12)
