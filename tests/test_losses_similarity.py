"""Similarity metrics: analytic values, brute-force references, masks and gradients."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from medreg.core.errors import InputError
from medreg.core.functional import spatial_gradient
from medreg.losses import functional as L

D64 = torch.float64


def _rand(shape, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype)


def _levels(shape, values, probs, seed=0):
    """An image whose voxels take ``values`` with probabilities ``probs``."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(values), size=shape, p=probs)
    return torch.as_tensor(np.asarray(values)[idx], dtype=D64), idx


# --------------------------------------------------------------------------- shapes & sign
SHAPES = [(2, 1, 11, 12), (2, 1, 7, 8, 9)]


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_ssd_value_and_dtype(shape):
    f, w = _rand(shape, 0), _rand(shape, 1)
    v = L.ssd(f, w)
    assert v.dtype == D64 and v.shape == ()
    assert torch.allclose(v, ((f - w) ** 2).mean())
    assert L.ssd(f, f).item() == 0.0
    assert L.ssd(f.float(), w.float()).dtype == torch.float32


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_ncc_affine_copy_is_perfect(shape):
    f = _rand(shape)
    assert L.ncc(f, 2.5 * f - 7.0).item() == pytest.approx(-1.0, abs=1e-9)
    # signed: an inverted contrast is the worst; squared: it is perfect too
    assert L.ncc(f, -0.3 * f + 1.0).item() == pytest.approx(1.0, abs=1e-9)
    assert L.ncc(f, -0.3 * f + 1.0, squared=True).item() == pytest.approx(-1.0, abs=1e-9)
    assert -1.0 <= L.ncc(f, _rand(shape, 5)).item() <= 1.0


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("kernel", ["box", "gaussian"])
def test_lncc_affine_copy_is_perfect(shape, kernel):
    f = _rand(shape)  # texture everywhere: no flat window
    assert L.lncc(f, 3.0 * f + 2.0, window=5, kernel=kernel).item() == pytest.approx(-1.0, abs=1e-6)
    assert L.lncc(f, -3.0 * f + 2.0, window=5, kernel=kernel).item() == pytest.approx(-1.0, abs=1e-6)
    signed = L.lncc(f, -3.0 * f + 2.0, window=5, kernel=kernel, squared=False)
    assert signed.item() == pytest.approx(1.0, abs=1e-6)
    v = L.lncc(f, _rand(shape, 3), window=5, kernel=kernel)
    assert -1.0 < v.item() < 0.0


def _brute_lncc(f, w, weights_1d, mask=None, eps=1e-8):
    """Reference LNCC²: explicit loops over voxels and their (truncated, weighted) windows.

    ``weights_1d`` are per tensor axis arrays of odd length (window weights).
    """
    f = f[0, 0].numpy()
    w = w[0, 0].numpy()
    m = np.ones_like(f) if mask is None else mask[0, 0].numpy()
    # standardise over the (masked) voxels, as lncc does (it leaves cc unchanged up to eps)
    def std(x):
        mu = (x * m).sum() / m.sum()
        var = (((x - mu) ** 2) * m).sum() / m.sum()
        return (x - mu) / math.sqrt(var + 1e-12)
    f, w = std(f), std(w)
    radii = [len(k) // 2 for k in weights_1d]
    out = np.zeros_like(f)
    for x in itertools.product(*[range(n) for n in f.shape]):
        num = {"n": 0.0, "f": 0.0, "w": 0.0, "ff": 0.0, "ww": 0.0, "fw": 0.0}
        for off in itertools.product(*[range(-r, r + 1) for r in radii]):
            y = tuple(a + o for a, o in zip(x, off))
            if any(c < 0 or c >= n for c, n in zip(y, f.shape)):
                continue
            k = np.prod([weights_1d[a][off[a] + radii[a]] for a in range(len(off))]) * m[y]
            num["n"] += k
            num["f"] += k * f[y]
            num["w"] += k * w[y]
            num["ff"] += k * f[y] ** 2
            num["ww"] += k * w[y] ** 2
            num["fw"] += k * f[y] * w[y]
        n = num["n"]
        a, b = num["f"] / n, num["w"] / n
        vf = max(num["ff"] / n - a * a, 0.0)
        vw = max(num["ww"] / n - b * b, 0.0)
        c = num["fw"] / n - a * b
        out[x] = c * c / (vf * vw + eps)
    return -(out * m).sum() / m.sum()


def test_lncc_equals_brute_force_box():
    f, w = _rand((1, 1, 5, 6, 7), 0), _rand((1, 1, 5, 6, 7), 1)
    w = 0.5 * f + w  # correlated
    ref = _brute_lncc(f, w, [np.ones(3), np.ones(5), np.ones(3)])
    # window (x, y, z) = (3, 5, 3): tensor axes (z, y, x) = (3, 5, 3)
    assert L.lncc(f, w, window=(3, 5, 3)).item() == pytest.approx(ref, rel=1e-10)


def test_lncc_equals_brute_force_gaussian_and_mask():
    f, w = _rand((1, 1, 5, 6, 7), 2), _rand((1, 1, 5, 6, 7), 3)
    w = f + 0.7 * w
    mask = (_rand((1, 1, 5, 6, 7), 4) > 0.3).to(D64)
    kernels = L.window_kernels(3.0, 3, kernel="gaussian", dtype=D64)
    ref = _brute_lncc(f, w, [k.numpy() for k in reversed(kernels)], mask)
    v = L.lncc(f, w, mask, window=3, kernel="gaussian")
    assert v.item() == pytest.approx(ref, rel=1e-10)


def test_lncc_window_in_mm_honours_anisotropic_spacing():
    f, w = _rand((1, 1, 6, 7, 8), 5), _rand((1, 1, 6, 7, 8), 6)
    # 3 mm with spacing (x, y, z) = (1, 0.5, 3) mm: 3, 7 (6 rounded to odd), 1 voxels
    ks = L.window_kernels(3.0, 3, spacing=(1.0, 0.5, 3.0), window_unit="mm")
    assert [k.numel() for k in ks] == [3, 7, 1]
    v_mm = L.lncc(f, w, window=3.0, spacing=(1.0, 0.5, 3.0), window_unit="mm")
    v_vox = L.lncc(f, w, window=(3, 7, 1))
    assert v_mm.item() == pytest.approx(v_vox.item(), rel=1e-12)
    ref = _brute_lncc(f, w, [np.ones(1), np.ones(7), np.ones(3)])
    assert v_vox.item() == pytest.approx(ref, rel=1e-10)
    with pytest.raises(InputError, match="spacing"):
        L.lncc(f, w, window=3.0, window_unit="mm")
    with pytest.raises(ValueError, match="odd"):
        L.lncc(f, w, window=4)


# --------------------------------------------------------------------------- MI
def _entropy(idx):
    _, counts = np.unique(idx, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.mark.parametrize("spatial", [(24, 25), (9, 10, 11)], ids=["2d", "3d"])
def test_mi_of_image_with_itself_is_its_entropy(spatial):
    # 4 levels spread over [0, 1] with 32 bins: ≥ 4 bins apart, so the cubic B-spline windows
    # of different levels do not overlap and MI(I, I) is exactly the entropy of the levels
    img, idx = _levels((1, 1) + spatial, [0.0, 0.3, 0.65, 1.0], [0.1, 0.2, 0.3, 0.4])
    h = _entropy(idx)
    assert -L.mutual_information(img, img, bins=32).item() == pytest.approx(h, abs=1e-9)
    # hard binning (levels on bin centres, narrow Gaussian): MI = H and NMI = 2
    img2, idx2 = _levels((1, 1) + spatial, [0.0, 5 / 15, 9 / 15, 1.0], [0.4, 0.3, 0.2, 0.1])
    kw = dict(bins=16, parzen="gaussian", sigma=0.05)
    assert -L.mutual_information(img2, img2, **kw).item() == pytest.approx(_entropy(idx2), abs=1e-9)
    assert -L.mutual_information(img2, img2, normalised=True, **kw).item() == pytest.approx(2.0, abs=1e-9)
    assert -L.normalised_mutual_information(img2, img2, **kw).item() == pytest.approx(2.0, abs=1e-9)


def test_mi_invariant_to_monotone_remap():
    fixed = _rand((2, 1, 10, 11, 12), 7)
    # a label-like moving image related to the fixed one
    levels = torch.bucketize(fixed + 0.3 * _rand(fixed.shape, 8), torch.tensor([0.4, 0.8, 1.1], dtype=D64))
    moving = levels.to(D64) / 3.0
    base = L.mutual_information(fixed, moving, bins=32).item()
    for remap in (lambda x: x ** 2, lambda x: torch.exp(2 * x), lambda x: 5 * x - 3):
        assert L.mutual_information(fixed, remap(moving), bins=32).item() == pytest.approx(base, abs=1e-9)
        assert L.mutual_information(remap(moving), fixed, bins=32).item() == pytest.approx(base, abs=1e-9)
    # an increasing affine remap of a continuous image: identical bin coordinates
    w = _rand(fixed.shape, 9) + fixed
    for parzen in ("bspline", "gaussian"):
        a = L.mutual_information(fixed, w, parzen=parzen).item()
        assert L.mutual_information(fixed, 4 * w + 1, parzen=parzen).item() == pytest.approx(a, abs=1e-9)
    assert L.mutual_information(fixed, w).item() < L.mutual_information(fixed, _rand(fixed.shape, 10)).item()


def test_mi_range_and_value_range():
    f, w = _rand((1, 1, 8, 9, 10), 11), _rand((1, 1, 8, 9, 10), 12)
    v = L.mutual_information(f, w, bins=16).item()
    assert -math.log(16) <= v <= 0.0
    nmi = L.mutual_information(f, f, bins=16, normalised=True).item()
    assert -2.0 <= nmi <= -1.0
    # intensities outside a given range are clamped to it
    inside = L.mutual_information(f, w, value_range=(0.0, 1.0)).item()
    clamped = L.mutual_information(f, w.clamp(0.2, 0.8), value_range=(0.2, 0.8)).item()
    assert L.mutual_information(f, w, value_range=(0.2, 0.8)).item() == pytest.approx(clamped, abs=1e-12)
    assert inside != clamped
    with pytest.raises(ValueError, match="bins"):
        L.mutual_information(f, w, bins=4)
    with pytest.raises(ValueError, match="bspline, gaussian"):
        L.mutual_information(f, w, parzen="box")


def test_joint_histogram_sums_to_one_and_matches_dense_gaussian():
    f, w = _rand((1, 1, 6, 7, 8), 13), _rand((1, 1, 6, 7, 8), 14)
    p = L.joint_histogram(f, w, bins=12, parzen="gaussian", sigma=0.5, value_range=(0, 1))
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    # dense, untruncated Gaussian Parzen windows (the textbook estimator)
    c = torch.linspace(0, 1, 12, dtype=D64)
    sig = 0.5 / 11

    def wts(x):
        e = torch.exp(-0.5 * ((x.reshape(-1, 1) - c) / sig) ** 2)
        return e / e.sum(1, keepdim=True)

    dense = wts(f).T @ wts(w) / f.numel()
    assert torch.allclose(p[0], dense, atol=1e-9)


# --------------------------------------------------------------------------- MIND
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_mind_descriptors_invariant_to_affine_intensity(shape):
    img = _rand(shape, 15)
    d = L.mind_ssc(img, radius=1, dilation=2)
    assert d.shape == (shape[0], 12 if len(shape) == 5 else 4) + shape[2:]
    assert d.min() > 0 and d.max() <= 1 + 1e-12
    assert torch.allclose(d.amax(1), torch.ones_like(d[:, 0]))  # the nearest pair is 1
    for a, b in [(3.0, 2.0), (0.01, -5.0), (-2.0, 1.0)]:
        assert torch.allclose(L.mind_ssc(a * img + b, radius=1, dilation=2), d, atol=1e-9)
    assert L.mind_loss(img, 7 * img + 3, radius=1, dilation=2).item() == pytest.approx(0.0, abs=1e-12)
    assert 0.0 < L.mind_loss(img, _rand(shape, 16), radius=1, dilation=2).item() <= 1.0


def test_mind_spacing_in_mm():
    img = _rand((1, 1, 8, 9, 10), 17)
    # 2 mm with spacing (x, y, z) = (1, 1, 2): dilation 2, 2, 1 voxels
    mm = L.mind_ssc(img, radius=0, dilation=2.0, spacing=(1.0, 1.0, 2.0))
    assert mm.shape == (1, 12, 8, 9, 10)
    assert not torch.allclose(mm, L.mind_ssc(img, radius=0, dilation=2))
    assert torch.allclose(L.mind_ssc(img, radius=0, dilation=2.0, spacing=(1.0, 1.0, 1.0)),
                          L.mind_ssc(img, radius=0, dilation=2))


# --------------------------------------------------------------------------- NGF
def _smooth_image(shape, seed=0):
    """A smooth image whose gradient vanishes nowhere (a tilted paraboloid plus bumps)."""
    axes = [torch.linspace(-1, 1, n, dtype=D64) for n in shape[2:]]
    grids = torch.meshgrid(*axes, indexing="ij")
    img = sum((k + 2) * g for k, g in enumerate(grids)) + 0.3 * sum(g ** 2 for g in grids)
    img = img + 0.05 * torch.sin(5 * grids[-1] + seed)
    return img.expand(shape).clone()


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_ngf_identical_images_is_minimum(shape):
    img = _smooth_image(shape) + 0.05 * _rand(shape, 18)
    eps = 0.5
    v = L.ngf(img, img, eps=eps)
    g = spatial_gradient(img)
    n2 = (g ** 2).sum(2)
    closed = (1 - (n2 / (n2 + eps ** 2)) ** 2).mean()
    assert v.item() == pytest.approx(closed.item(), rel=1e-12)
    others = [torch.roll(img, 1, -1), img + 0.2 * _rand(shape, 19), img.flip(-1), _rand(shape, 20)]
    assert all(L.ngf(img, o, eps=eps).item() > v.item() for o in others)
    # with a tiny edge parameter NGF(I, a I + b) is 0 (the global minimum) for any a ≠ 0
    smooth = _smooth_image(shape)
    for a, b in [(1.0, 0.0), (3.0, -1.0), (-0.5, 2.0)]:
        assert L.ngf(smooth, a * smooth + b, eps=1e-9).item() == pytest.approx(0.0, abs=1e-9)
    assert 0.0 <= L.ngf(img, _rand(shape, 21)).item() <= 1.0


def test_ngf_uses_spacing():
    img, other = _smooth_image((1, 1, 6, 7, 8)), _rand((1, 1, 6, 7, 8), 22)
    a = L.ngf(img, other, eps=0.1, spacing=(1.0, 1.0, 1.0)).item()
    b = L.ngf(img, other, eps=0.1, spacing=(1.0, 1.0, 4.0)).item()
    assert a != pytest.approx(b)
    # scaling every spacing and eps together leaves NGF unchanged (gradients scale by 1/s)
    c = L.ngf(img, other, eps=0.05, spacing=(2.0, 2.0, 2.0)).item()
    assert a == pytest.approx(c, rel=1e-12)


# --------------------------------------------------------------------------- masks
POINTWISE = {
    "ssd": lambda f, w, m: L.ssd(f, w, m),
    "ncc": lambda f, w, m: L.ncc(f, w, m),
    "lncc_box": lambda f, w, m: L.lncc(f, w, m, window=3),
    "lncc_gauss": lambda f, w, m: L.lncc(f, w, m, window=3, kernel="gaussian"),
    "mi": lambda f, w, m: L.mutual_information(f, w, m, bins=12),
    "mi_gauss": lambda f, w, m: L.mutual_information(f, w, m, bins=12, parzen="gaussian"),
    "nmi": lambda f, w, m: L.mutual_information(f, w, m, bins=12, normalised=True),
}


@pytest.mark.parametrize("name", sorted(POINTWISE))
def test_masked_out_voxels_do_not_matter(name):
    fn = POINTWISE[name]
    shape = (2, 1, 7, 8, 9)
    f, w = _rand(shape, 23), _rand(shape, 24)
    w = 0.5 * f + w
    mask = (_rand((2, 1, 7, 8, 9), 25) > 0.4).to(D64)
    v = fn(f, w, mask)
    out = mask == 0
    f2 = torch.where(out, 10 * _rand(shape, 26) - 3, f)
    w2 = torch.where(out, 10 * _rand(shape, 27) + 2, w)
    assert fn(f2, w2, mask).item() == pytest.approx(v.item(), abs=1e-10)
    assert fn(f2, w2, None).item() != pytest.approx(v.item(), abs=1e-6)


@pytest.mark.parametrize("name", ["ssd", "ncc", "mi", "nmi"])
def test_mask_is_a_masked_mean(name):
    """A box mask gives the statistic of the cropped images (not averaged over all voxels)."""
    fn = POINTWISE[name]
    f, w = _rand((1, 1, 8, 9, 10), 28), _rand((1, 1, 8, 9, 10), 29)
    mask = torch.zeros_like(f)
    mask[..., 2:6, 1:7, 3:9] = 1
    crop = (..., slice(2, 6), slice(1, 7), slice(3, 9))
    assert fn(f, w, mask).item() == pytest.approx(fn(f[crop], w[crop], None).item(), abs=1e-10)


@pytest.mark.parametrize("name", ["mind", "ngf"])
def test_neighbourhood_metrics_ignore_far_masked_out_voxels(name):
    fn = {"mind": lambda f, w, m: L.mind_loss(f, w, m, radius=1, dilation=1),
          "ngf": lambda f, w, m: L.ngf(f, w, m)}[name]
    shape = (1, 1, 12, 13, 14)
    f, w = _rand(shape, 30), _rand(shape, 31)
    mask = torch.zeros(shape, dtype=D64)
    mask[..., 4:8, 4:9, 5:9] = 1
    support = 3  # radius + 2·dilation for MIND, 1 for NGF's central differences
    far = torch.ones(shape, dtype=torch.bool)
    far[..., 4 - support:8 + support, 4 - support:9 + support, 5 - support:9 + support] = False
    v = fn(f, w, mask)
    f2 = torch.where(far, _rand(shape, 32), f)
    w2 = torch.where(far, _rand(shape, 33), w)
    assert fn(f2, w2, mask).item() == pytest.approx(v.item(), abs=1e-10)


def test_mask_shapes_and_errors():
    f, w = _rand((2, 3, 5, 6, 7), 34), _rand((2, 3, 5, 6, 7), 35)
    m = _rand((1, 1, 5, 6, 7), 36) > 0.5
    assert torch.isfinite(L.lncc(f, w, m, window=3))
    assert torch.isfinite(L.ssd(f, w, m[0]))  # (N, *spatial) gets a channel axis
    per_channel = (_rand((2, 3, 5, 6, 7), 37) > 0.5)
    assert torch.isfinite(L.mind_loss(f, w, per_channel, radius=1, dilation=1))
    with pytest.raises(ValueError, match="does not fit"):
        L.ssd(f, w, torch.ones(2, 1, 5, 6, 8))
    with pytest.raises(ValueError, match="differ in shape"):
        L.ssd(f, w[..., :-1])
    assert L.combine_masks(None, None) is None
    both = L.combine_masks(m, torch.ones(1, 1, 5, 6, 7))
    assert both.dtype == torch.float32 and torch.equal(both, m.float())
    empty = torch.zeros(1, 1, 5, 6, 7)
    assert L.ssd(f, w, empty).item() == 0.0


def test_reduction_none_gives_per_sample_values():
    f, w = _rand((3, 1, 6, 7, 8), 38), _rand((3, 1, 6, 7, 8), 39)
    for fn in (L.ssd, L.ncc, L.lncc, L.mutual_information, L.mind_loss, L.ngf):
        per = fn(f, w, reduction="none")
        assert per.shape == (3,)
        assert fn(f, w).item() == pytest.approx(per.mean().item(), rel=1e-12)
        assert fn(f, w, reduction="sum").item() == pytest.approx(per.sum().item(), rel=1e-12)
        assert fn(f[1:2], w[1:2]).item() == pytest.approx(per[1].item(), rel=1e-10)
    with pytest.raises(ValueError, match="mean, sum, none"):
        L.ssd(f, w, reduction="avg")


# --------------------------------------------------------------------------- gradients
GRADCHECK = {
    "ssd": lambda f, w, m: L.ssd(f, w, m),
    "ncc": lambda f, w, m: L.ncc(f, w, m),
    "ncc_squared": lambda f, w, m: L.ncc(f, w, m, squared=True),
    "lncc_box": lambda f, w, m: L.lncc(f, w, m, window=3),
    "lncc_signed": lambda f, w, m: L.lncc(f, w, m, window=3, squared=False),
    "lncc_gauss_mm": lambda f, w, m: L.lncc(f, w, m, window=2.0, kernel="gaussian",
                                            spacing=(1.0, 0.7, 1.5), window_unit="mm"),
    "mi_bspline": lambda f, w, m: L.mutual_information(f, w, m, bins=8),
    "mi_gauss": lambda f, w, m: L.mutual_information(f, w, m, bins=8, parzen="gaussian"),
    "mi_range": lambda f, w, m: L.mutual_information(f, w, m, bins=8, value_range=(0.1, 0.9)),
    "nmi": lambda f, w, m: L.mutual_information(f, w, m, bins=8, normalised=True),
    "mind": lambda f, w, m: L.mind_loss(f, w, m, radius=1, dilation=1),
    "ngf": lambda f, w, m: L.ngf(f, w, m, eps=0.1, spacing=(1.0, 2.0, 0.5)),
}


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_gradcheck_similarity(name, masked):
    fn = GRADCHECK[name]
    shape = (2, 1, 4, 5, 6)
    f = _rand(shape, 40).requires_grad_()
    w = _rand(shape, 41).requires_grad_()
    m = (_rand(shape, 42) > 0.3).to(D64) if masked else None
    assert gradcheck(lambda a, b: fn(a, b, m), (f, w), eps=1e-6, atol=1e-7)


def test_gradcheck_similarity_2d():
    f = _rand((1, 1, 6, 7), 43).requires_grad_()
    w = _rand((1, 1, 6, 7), 44).requires_grad_()
    for name in ("lncc_box", "mi_bspline", "ncc", "ssd"):
        assert gradcheck(lambda a, b: GRADCHECK[name](a, b, None), (f, w), eps=1e-6, atol=1e-7)
    assert gradcheck(lambda a, b: L.mind_loss(a, b, radius=1, dilation=1), (f, w), eps=1e-6, atol=1e-7)
    assert gradcheck(lambda a, b: L.ngf(a, b, eps=0.1), (f, w), eps=1e-6, atol=1e-7)


def test_lncc_gradient_matches_autograd_reference():
    """The hand-written backward of LNCC agrees with autograd through a plain implementation."""
    f = _rand((1, 1, 9, 10, 11), 45).requires_grad_()
    w = _rand((1, 1, 9, 10, 11), 46).requires_grad_()
    v = L.lncc(f, w, window=5)
    gf, gw = torch.autograd.grad(v, (f, w))

    def plain(a, b):
        a = (a - a.mean()) / torch.sqrt(a.var(unbiased=False) + 1e-12)
        b = (b - b.mean()) / torch.sqrt(b.var(unbiased=False) + 1e-12)
        ones = torch.ones_like(a)
        k = torch.ones(1, 1, 5, 5, 5, dtype=D64)
        box = lambda x: torch.nn.functional.conv3d(x, k, padding=2)
        n = box(ones)
        ma, mb = box(a) / n, box(b) / n
        va = (box(a * a) / n - ma ** 2).clamp_min(0)
        vb = (box(b * b) / n - mb ** 2).clamp_min(0)
        c = box(a * b) / n - ma * mb
        return -(c * c / (va * vb + 1e-8)).mean()

    rf, rw = torch.autograd.grad(plain(f, w), (f, w))
    assert torch.allclose(v, plain(f, w), atol=1e-12)
    assert torch.allclose(gf, rf, atol=1e-10) and torch.allclose(gw, rw, atol=1e-10)


def test_float32_large_offsets_are_stable():
    """Standardisation keeps float32 LNCC exact-ish for images far from zero (e.g. CT)."""
    f = _rand((1, 1, 10, 11, 12), 47, torch.float32)
    ct = 1000.0 * f - 1000.0
    v = L.lncc(ct, 2 * ct + 500.0, window=5)
    assert v.item() == pytest.approx(-1.0, abs=1e-4)


def test_lncc_eps_must_be_positive():
    """``eps: 0`` made every window flat in both images 0/0: the registration stopped with a
    NaN loss blamed on the images."""
    f = torch.zeros(1, 1, 12, 12)
    f[..., 4:8, 4:8] = 1.0
    with pytest.raises(InputError, match=r"lncc eps .* must be finite and > 0, got 0"):
        L.lncc(f, f, eps=0)
    assert torch.isfinite(L.lncc(f, f, eps=1e-12))
