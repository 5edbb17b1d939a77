"""Synthetic training data: ground truth by construction, checked through the world-mm path."""

from pathlib import Path

import numpy as np
import pytest
import torch

from medreg.core import Grid, Image, InputError
from medreg.core.functional import jacobian_det
from medreg.io import read_image
from medreg.metrics.overlap import dice
from medreg.nets.functional import warp_voxel
from medreg.train.batch import collate_pairs
from medreg.train.data import SyntheticPairDataset
from medreg.train.preprocess import PreprocessConfig, field_to_world
from medreg.train.synth import (SynthConfig, deformed_pair, random_label_map,
                                random_svf_displacement, render_labels, synth_label_pair)
from medreg.transforms import DisplacementField, Identity, warp_image, warp_labels

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(bias_strength=0.0, gamma_std=0.0, noise_std=0.0)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def brain3d() -> Image:
    """The bundled Colin27 T1 (2 mm), downsampled to 4 mm and scaled to 0…1."""
    im = read_image(REPO / "src/medreg/data/colin27_t1_2mm.nii.gz", dtype=torch.float32)
    grid = im.grid.downsample(2)
    out = warp_image(im, Identity(3), grid)
    return out.with_data(out.data / out.data.max())


@pytest.fixture
def atlas2d(shared_data):
    z = np.load(shared_data / "vxm-brain-t1-aseg" / "l2r2019_atlas_norm_2d.npz")
    vol = torch.from_numpy(z["vol"][::2, ::2].copy()).float()[None]
    seg = torch.from_numpy(z["seg"][::2, ::2].copy()).long()[None]
    return vol, seg


def world_warp(moving: torch.Tensor, disp_vox: torch.Tensor, grid: Grid, labels: bool = False):
    """``moving ∘ (id + u)`` through medreg.transforms (world mm) instead of voxel units."""
    t = DisplacementField(field_to_world(disp_vox.double(), grid)[None], grid)
    if labels:
        return warp_labels(moving[None], t, grid, grid)[0]
    return warp_image(moving[None].double(), t, grid, grid)[0].float()


@pytest.mark.parametrize("shape,spacing", [((48, 40), (1.0, 1.5)), ((20, 24, 18), (1.5, 1.0, 2.0))])
def test_svf_displacement_magnitude_invertible_deterministic(shape, spacing):
    u = random_svf_displacement(shape, spacing, 3.0, 12.0, gen(1))
    assert u.shape == (len(shape), *shape) and u.dtype == torch.float32
    assert torch.equal(u, random_svf_displacement(shape, spacing, 3.0, 12.0, gen(1)))
    assert not torch.allclose(u, random_svf_displacement(shape, spacing, 3.0, 12.0, gen(2)))
    grid = Grid(tuple(reversed(shape)), spacing)  # size and spacing in x, y, z order
    mm = field_to_world(u, grid)
    rms = float(mm.square().sum(0).mean().sqrt())
    assert 0.6 * 3.0 < rms < 1.4 * 3.0
    big = random_svf_displacement(shape, spacing, 8.0, 10.0, gen(3))
    det = jacobian_det(field_to_world(big, grid)[None].double(), grid)
    assert float(det.min()) > 0  # no folding even for large smooth fields
    mx = random_svf_displacement(shape, spacing, 2.0, 12.0, gen(4), norm="max")
    assert float(field_to_world(mx, grid).square().sum(0).sqrt().max()) < 2.0 * 1.3


def check_deformed_pair(image: torch.Tensor, labels, grid: Grid):
    cfg = SynthConfig(magnitude_mm=4.0, smoothness_mm=12.0, **QUIET)
    pair = deformed_pair(image, labels, grid.spacing, cfg, gen(5), grid=grid)
    assert pair.displacement.shape == (grid.ndim, *grid.shape) and pair.grid is grid
    inside = pair.mask[0] > 0
    assert 0.5 < float(inside.float().mean()) < 1.0
    # the ground truth warps moving onto fixed, also through the geometry-exact world path
    warped = world_warp(pair.moving, pair.displacement, grid)
    err = (warped - pair.fixed).abs()[:, inside]
    assert float(err.max()) < 1e-4 * float(image.abs().max())
    assert float((pair.moving - pair.fixed).abs()[:, inside].mean()) > 0.02 * float(image.max())
    if labels is not None:
        wl = world_warp(pair.moving_labels, pair.displacement, grid, labels=True)
        agree = (wl == pair.fixed_labels)[:, inside].float().mean()
        assert float(agree) > 0.999
    # with intensity perturbations: same geometry, different intensities
    noisy = deformed_pair(image, labels, grid.spacing, SynthConfig(magnitude_mm=4.0, smoothness_mm=12.0),
                          gen(5), grid=grid)
    assert torch.equal(noisy.displacement, pair.displacement)
    a, b = world_warp(noisy.moving, noisy.displacement, grid)[:, inside], noisy.fixed[:, inside]
    assert float((a - b).abs().mean()) > 1e-3
    assert float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) > 0.8


@pytest.mark.data
def test_deformed_pair_2d_real_slice(atlas2d):
    vol, seg = atlas2d
    check_deformed_pair(vol, seg, Grid.from_shape(vol.shape[1:], spacing=2.0))


def test_deformed_pair_3d_brain(brain3d):
    check_deformed_pair(brain3d.data, None, brain3d.grid)


def test_deformed_pair_base_deformation_and_bad_input(brain3d):
    img = brain3d.data
    cfg = SynthConfig(base_magnitude_mm=3.0, **QUIET)
    pair = deformed_pair(img, None, brain3d.grid.spacing, cfg, gen(0))
    assert not torch.allclose(pair.moving, img)  # the source itself was deformed
    assert torch.allclose(warp_voxel(pair.moving[None], pair.displacement[None], padding="zeros")[0],
                          pair.fixed)
    with pytest.raises(InputError):
        deformed_pair(img.long(), None, 1.0, cfg, gen(0))
    with pytest.raises(InputError):
        SynthConfig(magnitude_mm=-1)


def test_random_label_map():
    lab = random_label_map((64, 56), 8, gen(0), 6.0)
    assert lab.shape == (1, 64, 56) and lab.dtype == torch.int64
    assert lab.unique().tolist() == list(range(8))
    assert torch.equal(lab, random_label_map((64, 56), 8, gen(0), 6.0))
    lab3 = random_label_map((24, 28, 20), 5, gen(1), 5.0, spacing=(1.0, 1.0, 1.5))
    assert lab3.unique().tolist() == list(range(5))
    # blob-like: most voxels share the label of their neighbour
    assert float((lab[:, 1:] == lab[:, :-1]).float().mean()) > 0.8


def test_render_labels_contrast_follows_labels():
    lab = random_label_map((64, 64), 6, gen(0), 8.0)
    img = render_labels(lab, gen(1), 6, cfg=SynthConfig(blur_sigma_mm=0.0, **QUIET))
    assert img.shape == lab.shape and float(img.min()) == 0.0 and abs(float(img.max()) - 1.0) < 1e-6
    means = torch.stack([img[lab == k].mean() for k in range(6)])
    resid = img - means[lab]
    assert float(resid.var() / img.var()) < 0.3  # intensities are explained by the labels
    other = render_labels(lab, gen(2), 6, cfg=SynthConfig(blur_sigma_mm=0.0, **QUIET))
    means2 = torch.stack([other[lab == k].mean() for k in range(6)])
    assert float((means - means2).abs().max()) > 0.1
    big = lab * 40 + 3  # arbitrary label ids
    assert render_labels(big, gen(1)).shape == lab.shape
    with pytest.raises(InputError):
        render_labels(big, gen(1), 6)


@pytest.mark.parametrize("shape,spacing", [((64, 60), (1.0, 1.0)), ((24, 28, 20), (1.5, 1.0, 1.0))])
def test_synth_label_pair(shape, spacing):
    cfg = SynthConfig(n_labels=6, magnitude_mm=3.0, label_smoothness_mm=7.0)
    pair = synth_label_pair(shape, spacing, cfg, gen(3))
    grid = pair.grid
    assert grid.shape == tuple(shape) and grid.spacing == spacing
    assert pair.moving_labels.unique().tolist() == list(range(6))
    inside = pair.mask[0] > 0
    wl = world_warp(pair.moving_labels, pair.displacement, grid, labels=True)
    for k in range(1, 6):
        a = (wl[0] == k) & inside
        b = (pair.fixed_labels[0] == k) & inside
        assert dice(a.numpy(), b.numpy()) > 0.98
    # separately rendered: same labels, different contrasts
    mf = torch.stack([pair.fixed[pair.fixed_labels == k].mean() for k in range(6)])
    mm = torch.stack([pair.moving[pair.moving_labels == k].mean() for k in range(6)])
    assert float((mf - mm).abs().max()) > 0.1
    again = synth_label_pair(shape, spacing, cfg, gen(3))
    assert torch.equal(again.fixed, pair.fixed) and torch.equal(again.displacement, pair.displacement)


@pytest.mark.data
def test_synth_label_pair_from_real_labels(atlas2d):
    _, seg = atlas2d
    pair = synth_label_pair(seg.shape[1:], 2.0, SynthConfig(magnitude_mm=3.0), gen(0), labels=seg)
    assert torch.equal(pair.moving_labels, seg)
    assert set(pair.fixed_labels.unique().tolist()) <= set(seg.unique().tolist())
    inside = pair.mask[0] > 0
    assert float((pair.fixed_labels == seg)[:, inside].float().mean()) < 0.99  # it moved


def test_synthetic_dataset_reproducible_per_epoch_and_collates():
    images = [torch.rand(1, 32, 40), torch.rand(1, 32, 40)]
    ds = SyntheticPairDataset(images, cfg=SynthConfig(magnitude_mm=2.0), length=5, seed=7, spacing=1.5)
    a, b = ds[3], ds[3]
    assert torch.equal(a.fixed, b.fixed) and torch.equal(a.displacement, b.displacement)
    assert not torch.equal(ds[2].displacement, a.displacement)
    ds.set_epoch(1)
    assert not torch.equal(ds[3].displacement, a.displacement)
    ds.set_epoch(0)
    assert torch.equal(ds[3].displacement, a.displacement)
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert batch.fixed.shape == (5, 1, 32, 40) and batch.displacement.shape == (5, 2, 32, 40)
    assert batch.mask.shape == (5, 1, 32, 40) and batch.grids[0].spacing == (1.5, 1.5)
    sm = SyntheticPairDataset(mode="labels", shape=(24, 20, 16), length=2,
                              cfg=SynthConfig(n_labels=4))
    p = sm[0]
    assert p.fixed.shape == (1, 24, 20, 16) and p.fixed_labels.dtype == torch.int64
    with pytest.raises(InputError):
        SyntheticPairDataset(mode="deformed", length=2)
    with pytest.raises(InputError):
        SyntheticPairDataset(images, mode="nope")


def test_synthetic_dataset_prepares_images(brain3d):
    ds = SyntheticPairDataset([brain3d], cfg=SynthConfig(**QUIET), length=2,
                              prep=PreprocessConfig(size=(24, 28, 24)))
    p = ds[0]
    assert p.fixed.shape == (1, 24, 28, 24) and p.grid.size == (24, 28, 24)
    assert float(p.moving.max()) <= 1.0 and float(p.moving.min()) >= 0.0  # percentile-normalised
