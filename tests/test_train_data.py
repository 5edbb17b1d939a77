"""Learning data: preprocessing round trip, readers, samplers, datasets and augmentation."""

import json

import numpy as np
import pytest
import torch

from conftest import oblique_direction
from medreg.core import Grid, Image, InputError
from medreg.io import write_image, write_landmarks
from medreg.nets.functional import warp_voxel
from medreg.train.augment import Augment, AugmentConfig
from medreg.train.batch import Pair, collate_pairs
from medreg.train.data import (PairDataset, Record, all_pairs, atlas_pairs, listed_pairs,
                               pairs_from_l2r_json, records_from_csv, records_from_folder,
                               records_from_l2r_json, split_by_subject)
from medreg.train.preprocess import (PreprocessConfig, field_to_world, network_grid,
                                     prediction_transform, prepare_image)
from medreg.train.synth import SynthConfig, deformed_pair
from medreg.transforms import Identity, TranslationTransform, warp_image


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def fixed3d(oblique_grid3d) -> Image:
    """Odd size 23×31×17, spacing (0.9, 1.3, 2.5), oblique, non-zero origin; a smooth image."""
    g = oblique_grid3d
    pts = g.points(dtype=torch.float64)
    c = torch.tensor(g.center(), dtype=torch.float64)
    r = (pts - c).norm(dim=-1)
    return Image((torch.exp(-(r / 15) ** 2) * 100 + 20).float()[None], g, "fixed.nii.gz")


@pytest.fixture
def moving3d(oblique_grid3d) -> Image:
    g = Grid((27, 25, 21), (1.1, 1.2, 1.7), np.asarray(oblique_grid3d.center()) - [14.0, 13.0, 16.0],
             oblique_direction(3, -12.0))
    pts = g.points(dtype=torch.float64)
    val = torch.sin(pts[..., 0] / 7) + torch.cos(pts[..., 1] / 5) + pts[..., 2] / 30
    return Image(val.float()[None], g, "moving.nii.gz")


# ------------------------------------------------------------------------------ preprocessing
def test_network_grid_keeps_centre_direction_and_field_of_view(oblique_grid3d):
    g = oblique_grid3d
    net = network_grid(g, PreprocessConfig(size=(32, 32, 24)))
    assert net.size == (32, 32, 24) and np.allclose(net.direction, g.direction)
    assert np.allclose(net.center(), g.center(), atol=1e-9)
    assert np.allclose([n * s for n, s in zip(net.size, net.spacing)],
                       [n * s for n, s in zip(g.size, g.spacing)])
    padded = network_grid(g, PreprocessConfig())  # keep spacing, round size up to 16
    assert padded.size == (32, 32, 32) and padded.spacing == g.spacing
    idx = padded.transform_points(torch.tensor(g.origin, dtype=torch.float64), "world", "index")
    assert torch.allclose(idx, torch.tensor([4.0, 0.0, 7.0], dtype=torch.float64), atol=1e-9)
    assert network_grid(g, PreprocessConfig(multiple_of=1)) == g
    iso = network_grid(g, PreprocessConfig(spacing=2.0, multiple_of=8))
    assert iso.spacing == (2.0, 2.0, 2.0) and all(n % 8 == 0 for n in iso.size)
    assert all(n * 2.0 >= e for n, e in zip(iso.size, [n * s for n, s in zip(g.size, g.spacing)]))
    fixed_both = network_grid(g, PreprocessConfig(size=(16, 16, 16), spacing=(1.0, 1.0, 1.0)))
    assert fixed_both.size == (16, 16, 16) and np.allclose(fixed_both.center(), g.center())
    with pytest.raises(InputError):
        network_grid(g, PreprocessConfig(size=(32, 32)))
    with pytest.raises(InputError):
        PreprocessConfig(normalise="histogram")


def test_prediction_written_back_on_the_original_fixed_grid(fixed3d, moving3d):
    cfg = PreprocessConfig(size=(32, 32, 24))
    net = network_grid(fixed3d.grid, cfg)
    data, info = prepare_image(fixed3d, net, cfg)
    assert data.shape == (1, 24, 32, 32) and info.original == fixed3d.grid and info.network == net
    # a zero prediction = the moving image resampled by the identity, in the fixed geometry
    t = prediction_transform(torch.zeros(3, *net.shape), info)
    out = warp_image(moving3d, t, fixed3d.grid)
    ref = warp_image(moving3d, Identity(3), fixed3d.grid)
    g, f = out.grid, fixed3d.grid
    assert g.size == f.size and g.spacing == f.spacing and g.origin == f.origin
    assert np.array_equal(g.direction, f.direction)
    assert torch.allclose(out.data, ref.data, atol=1e-5)
    assert float(ref.data.abs().sum()) > 0  # the images overlap
    # an initial transform: one network voxel along index x, in world mm
    step = torch.tensor(net.direction[:, 0] * net.spacing[0])
    shifted, _ = prepare_image(fixed3d, net, cfg, transform=TranslationTransform(3, step, trainable=False,
                                                                                dtype=torch.float64))
    assert torch.allclose(shifted[..., :-1], data[..., 1:], atol=1e-5)


def test_prediction_maps_fixed_points_to_moving_points(fixed3d):
    cfg = PreprocessConfig(size=(32, 32, 24))
    net = network_grid(fixed3d.grid, cfg)
    _, info = prepare_image(fixed3d, net, cfg)
    # a known world affine map x ↦ A x + b, written as a voxel-unit field on the network grid
    a = torch.tensor([[1.02, 0.03, -0.01], [-0.02, 0.97, 0.04], [0.01, -0.03, 1.05]], dtype=torch.float64)
    b = torch.tensor([3.5, -2.25, 6.0], dtype=torch.float64)
    x_net = net.points(dtype=torch.float64)
    target_idx = net.transform_points(x_net @ a.T + b, "world", "index")
    u_vox = (target_idx - net.points("index", dtype=torch.float64)).movedim(-1, 0)
    t = prediction_transform(u_vox, info)
    pts = fixed3d.grid.points(dtype=torch.float64).reshape(-1, 3)  # original fixed voxel centres
    assert float((t(pts) - (pts @ a.T + b)).abs().max()) < 1e-4
    # a pure translation, with the world vectors from field_to_world
    shift = torch.tensor([4.0, -1.5, 2.5], dtype=torch.float64)
    u_t = net.transform_vectors(shift.expand(*net.shape, 3), "world", "index").movedim(-1, 0)
    assert torch.allclose(field_to_world(u_t, net), shift.view(3, 1, 1, 1).expand(3, *net.shape))
    t2 = prediction_transform(u_t, info)
    assert t2.grid == fixed3d.grid  # sampled on the fixed header
    assert float((t2(pts) - (pts + shift)).abs().max()) < 1e-4
    on_net = prediction_transform(u_vox, info, grid=net)
    assert on_net.grid == net and float((on_net(pts) - (pts @ a.T + b)).abs().max()) < 1e-4
    with pytest.raises(InputError):
        field_to_world(torch.zeros(2, *net.shape), net)


def test_normalisations_and_labels(oblique_grid2d):
    g = oblique_grid2d
    data = torch.linspace(-50.0, 250.0, g.numel).reshape(1, *g.shape)
    img = Image(data, g)
    same = PreprocessConfig(multiple_of=1)
    out, info = prepare_image(img, g, PreprocessConfig(multiple_of=1, normalise="minmax"))
    assert abs(float(out.min())) < 1e-6 and abs(float(out.max()) - 1) < 1e-6
    out, info = prepare_image(img, g, PreprocessConfig(normalise="zscore"))
    assert abs(float(out.mean())) < 1e-5 and abs(float(out.std(unbiased=False)) - 1) < 1e-4
    assert torch.allclose(info.denormalise(out), data, atol=1e-3)
    out, info = prepare_image(img, g, same)
    lo, hi = np.percentile(data.numpy(), [1, 99])
    assert info.shift == pytest.approx((lo,)) and info.scale == pytest.approx((hi - lo,))
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert float((out == 0).float().mean()) == pytest.approx(0.01, abs=0.003)
    out, _ = prepare_image(img, g, PreprocessConfig(normalise="none"))
    assert torch.equal(out, data)
    # outside the image: pad_value
    big = g.pad(3)
    out, _ = prepare_image(img, big, PreprocessConfig(pad_value=-1.0))
    assert float(out[0, 0, 0]) == -1.0 and float(out[0, 10, 10]) >= 0.0
    # labels: nearest, int64, the same label set (on a finer grid)
    lab = torch.zeros(1, *g.shape, dtype=torch.int32)
    lab[0, 5:15, 4:9] = 7
    lab[0, 20:30, 10:25] = 255
    lab[0, 2:4, 20:22] = 3
    fine = network_grid(g, PreprocessConfig(size=(64, 80)))
    out, info = prepare_image(Image(lab, g), fine, same, labels=True)
    assert out.dtype == torch.int64 and info.labels
    assert out.unique().tolist() == [0, 3, 7, 255]
    with pytest.raises(InputError):
        prepare_image(Image(lab.float() + 0.5, g), fine, same, labels=True)


# ------------------------------------------------------------------------------ readers
def write_dataset(root, n=3, size=(12, 10), spacing=(1.5, 2.0)):
    """Tiny 2D images, label maps and landmark files under ``root``."""
    (root / "images").mkdir()
    (root / "labels").mkdir()
    (root / "points").mkdir()
    paths = []
    for i in range(n):
        sz = (size[0] + i, size[1] + 2 * i)  # different native sizes
        g = Grid(sz, spacing, (10.0 * i, -5.0), oblique_direction(2, 10.0 * i))
        img = torch.rand(1, *g.shape, generator=gen(i)) * 100
        lab = torch.zeros(1, *g.shape, dtype=torch.int32)
        lab[0, 2:6, 3:7] = 1 + i % 2
        p = root / "images" / f"sub{i}.nii.gz"
        write_image(Image(img, g), p)
        write_image(Image(lab, g), root / "labels" / f"sub{i}.nii.gz")
        pts = g.transform_points(torch.tensor([[2.0, 3.0], [5.0, 1.0]], dtype=torch.float64),
                                 "index", "world")
        write_landmarks(pts, root / "points" / f"sub{i}.csv")
        paths.append(p)
    return paths


def test_records_from_folder(tmp_path):
    write_dataset(tmp_path)
    recs = records_from_folder(str(tmp_path / "images" / "*.nii.gz"),
                               labels=str(tmp_path / "labels" / "{name}"),
                               landmarks=str(tmp_path / "points" / "{stem}.csv"))
    assert [r.subject for r in recs] == ["sub0", "sub1", "sub2"]
    assert recs[1].labels == tmp_path / "labels" / "sub1.nii.gz"
    assert recs[2].landmarks == tmp_path / "points" / "sub2.csv" and recs[0].mask is None
    (tmp_path / "labels" / "sub1.nii.gz").unlink()
    with pytest.raises(InputError, match="sub1.nii.gz"):
        records_from_folder(str(tmp_path / "images" / "*.nii.gz"), labels=str(tmp_path / "labels" / "{name}"))
    with pytest.raises(InputError, match="no image file"):
        records_from_folder(str(tmp_path / "nothing" / "*.nii.gz"))


def test_records_from_csv(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "list.csv").write_text(
        "image,labels,landmarks,subject\n"
        "images/sub0.nii.gz,labels/sub0.nii.gz,,A\n"
        f"{tmp_path / 'images' / 'sub1.nii.gz'},,points/sub1.csv,\n")
    recs = records_from_csv(tmp_path / "list.csv")
    assert recs[0] == Record(tmp_path / "images/sub0.nii.gz", tmp_path / "labels/sub0.nii.gz", None, "A")
    assert recs[1].subject == "sub1" and recs[1].labels is None
    assert recs[1].landmarks == tmp_path / "points" / "sub1.csv"
    (tmp_path / "bad.csv").write_text("image,labels\nimages/sub9.nii.gz,\n")
    with pytest.raises(InputError, match="sub9.nii.gz"):
        records_from_csv(tmp_path / "bad.csv")
    (tmp_path / "nohead.csv").write_text("path\nimages/sub0.nii.gz\n")
    with pytest.raises(InputError, match="image"):
        records_from_csv(tmp_path / "nohead.csv")


def test_records_from_l2r_json(tmp_path):
    write_dataset(tmp_path, n=3)
    for i in range(3):  # Learn2Reg naming: <task>_<case>_<modality>
        for kind in ("images", "labels"):
            (tmp_path / kind / f"sub{i}.nii.gz").rename(tmp_path / kind / f"TASK_{i:04d}_0000.nii.gz")
    meta = {
        "name": "TASK", "tensorImageSize": {"0": "2D"}, "modality": {"0": "MR"},
        "training": [{"image": f"./images/TASK_{i:04d}_0000.nii.gz",
                      "label": f"./labels/TASK_{i:04d}_0000.nii.gz"} for i in range(3)],
        "registration_val": [{"fixed": "./images/TASK_0001_0000.nii.gz",
                              "moving": "./images/TASK_0002_0000.nii.gz"},
                             {"fixed": "./images/TASK_0002_0000.nii.gz",
                              "moving": "./images/TASK_0001_0000.nii.gz"}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    train = records_from_l2r_json(tmp_path / "dataset.json")
    assert [r.subject for r in train] == ["TASK_0000", "TASK_0001", "TASK_0002"]
    assert train[2].labels.name == "TASK_0002_0000.nii.gz"
    assert train[0].landmarks_frame == "index"  # Learn2Reg keypoints are voxel indices
    val = records_from_l2r_json(tmp_path / "dataset.json", "registration_val")
    assert [r.subject for r in val] == ["TASK_0001", "TASK_0002"] and val[0].labels is not None
    assert pairs_from_l2r_json(tmp_path / "dataset.json") == [(0, 1), (1, 0)]
    assert pairs_from_l2r_json(tmp_path / "dataset.json", records=train) == [(1, 2), (2, 1)]
    with pytest.raises(InputError, match="registration_test"):
        pairs_from_l2r_json(tmp_path / "dataset.json", "registration_test")
    meta["training"][1]["label"] = "./labels/missing_0001.nii.gz"
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="missing_0001.nii.gz"):
        records_from_l2r_json(tmp_path / "dataset.json")


# ------------------------------------------------------------------------------ samplers
def test_samplers_and_split():
    assert len(all_pairs(5)) == 20 and len(all_pairs(5, include_self=True)) == 25
    assert all(f != m for f, m in all_pairs(5)) and len(set(all_pairs(5))) == 20
    assert atlas_pairs(4, 1) == [(0, 1), (2, 1), (3, 1)]
    assert atlas_pairs(4, 1, "subject_to_atlas") == [(1, 0), (1, 2), (1, 3)]
    assert len(atlas_pairs(4, 1, "both")) == 6
    with pytest.raises(InputError):
        atlas_pairs(4, 4)
    with pytest.raises(InputError):
        atlas_pairs(4, 0, "sideways")
    recs = [Record(f"/d/s{i // 2}_{i % 2}.nii.gz", subject=f"s{i // 2}") for i in range(20)]
    train, val = split_by_subject(recs, 0.2, seed=3)
    assert len(train) + len(val) == 20 and len(val) == 4
    assert not ({r.subject for r in train} & {r.subject for r in val})
    assert split_by_subject(recs, 0.2, seed=3) == (train, val)
    assert split_by_subject(recs, 0.2, seed=4) != (train, val)
    assert listed_pairs(recs, [("s0_1", "s3_0")]) == [(1, 6)]  # shared subjects: by stem
    single = [Record(f"/d/x{i}.nii.gz") for i in range(3)]
    assert listed_pairs(single, [("x2", "x0"), ("x1", "x2")]) == [(2, 0), (1, 2)]
    with pytest.raises(InputError, match="x7"):
        listed_pairs(single, [("x7", "x0")])
    with pytest.raises(InputError):
        listed_pairs(recs, [("s1", "s2")])  # ambiguous subject


# ------------------------------------------------------------------------------ datasets
def test_pair_dataset_collates_and_places_landmarks(tmp_path):
    write_dataset(tmp_path)
    recs = records_from_folder(str(tmp_path / "images" / "*.nii.gz"),
                               labels=str(tmp_path / "labels" / "{name}"),
                               landmarks=str(tmp_path / "points" / "{stem}.csv"))
    ds = PairDataset(recs, all_pairs(3), PreprocessConfig(size=(16, 16)))
    assert len(ds) == 6
    pair = ds[1]  # fixed 0, moving 2
    assert isinstance(pair, Pair) and pair.fixed.shape == (1, 16, 16) and pair.moving.shape == (1, 16, 16)
    assert pair.fixed_labels.dtype == torch.int64 and pair.fixed_id == "sub0" and pair.moving_id == "sub2"
    assert pair.meta["fixed_info"].network == pair.grid and pair.meta["moving_path"].endswith("sub2.nii.gz")
    # landmarks: world mm → voxel index of the fixed image's network grid
    orig = pair.meta["fixed_info"].original
    expect = pair.grid.transform_points(
        orig.transform_points(torch.tensor([[2.0, 3.0], [5.0, 1.0]], dtype=torch.float64), "index", "world"),
        "world", "index")
    assert torch.allclose(pair.fixed_points.double(), expect, atol=1e-5)
    assert pair.fixed_points.dtype == torch.float32 and pair.moving_points.shape == (2, 2)
    (tmp_path / "idx.csv").write_text("2.0,3.0\n5.0,1.0\n")
    as_index = [Record(recs[0].image, landmarks=tmp_path / "idx.csv", landmarks_frame="index"), recs[1]]
    p_idx = PairDataset(as_index, [(0, 1)], PreprocessConfig(size=(16, 16)))[0]
    assert torch.allclose(p_idx.fixed_points.double(), expect, atol=1e-5)
    batch = collate_pairs([ds[i] for i in range(len(ds))])
    assert batch.fixed.shape == (6, 1, 16, 16) and batch.moving_labels.shape == (6, 1, 16, 16)
    assert len(ds._cache) == 3 and ds[1].fixed.data_ptr() == pair.fixed.data_ptr()  # cached tensors
    aug = PairDataset(recs, all_pairs(3), PreprocessConfig(size=(16, 16)), Augment(SPATIAL), seed=1)
    a = aug[2]
    assert torch.equal(a.moving, aug[2].moving) and not torch.equal(a.moving, ds[2].moving)
    aug.set_epoch(1)
    assert not torch.equal(a.moving, aug[2].moving)


def test_pair_dataset_landmark_at_bright_voxel(tmp_path, oblique_grid3d):
    g = oblique_grid3d
    rng = torch.Generator().manual_seed(0)
    pts_idx = torch.tensor([[7.0, 12.0, 9.0]], dtype=torch.float64)
    fixed = torch.rand(1, *g.shape, generator=rng) * 10
    fixed[0, 9, 12, 7] = 1000.0
    gm = Grid((20, 24, 18), (1.0, 1.1, 1.6), np.asarray(g.center()) - [10.0, 12.0, 14.0],
              oblique_direction(3, 35.0))
    moving = torch.rand(1, *gm.shape, generator=rng) * 10
    moving[0, 8, 10, 9] = 1000.0
    write_image(Image(fixed, g), tmp_path / "f.nii.gz")
    write_image(Image(moving, gm), tmp_path / "m.nii.gz")
    write_landmarks(g.transform_points(pts_idx, "index", "world"), tmp_path / "f.csv")
    mpt = gm.transform_points(torch.tensor([[9.0, 10.0, 8.0]], dtype=torch.float64), "index", "world")
    write_landmarks(mpt, tmp_path / "m.csv")
    recs = [Record(tmp_path / "f.nii.gz", landmarks=tmp_path / "f.csv"),
            Record(tmp_path / "m.nii.gz", landmarks=tmp_path / "m.csv")]
    ds = PairDataset(recs, [(0, 1)], PreprocessConfig(normalise="none"))
    pair = ds[0]
    assert pair.grid.size == (32, 32, 32) and np.allclose(pair.grid.spacing, g.spacing)
    z, y, x = np.unravel_index(int(pair.fixed.argmax()), pair.fixed.shape[1:])
    assert torch.allclose(pair.fixed_points[0], torch.tensor([x, y, z], dtype=torch.float32))
    assert float(pair.fixed.max()) == pytest.approx(1000.0)
    z, y, x = np.unravel_index(int(pair.moving.argmax()), pair.moving.shape[1:])
    assert float((pair.moving_points[0] - torch.tensor([x, y, z])).abs().max()) <= 1.0


def test_pair_dataset_rejects_labels_off_grid(tmp_path):
    write_dataset(tmp_path, n=2)
    # sub1's label map put on sub0's grid
    (tmp_path / "labels" / "sub0.nii.gz").replace(tmp_path / "labels" / "sub1.nii.gz")
    recs = [Record(tmp_path / "images" / "sub1.nii.gz", tmp_path / "labels" / "sub1.nii.gz")]
    ds = PairDataset(recs, [(0, 0)], PreprocessConfig(size=(8, 8)))
    with pytest.raises(InputError, match="sub1.nii.gz"):
        ds[0]
    with pytest.raises(InputError):
        PairDataset(recs, [(0, 3)], PreprocessConfig())
    # a mask on the image's grid becomes the pair's (float) mask
    masked = [Record(tmp_path / "images" / "sub0.nii.gz", mask=tmp_path / "labels" / "sub1.nii.gz")]
    pair = PairDataset(masked, [(0, 0)], PreprocessConfig(multiple_of=1))[0]
    assert pair.mask.dtype == torch.float32 and float(pair.mask.sum()) == 16.0  # the 4×4 region


# ------------------------------------------------------------------------------ augmentation
def blob_pair(shape=(40, 44), centre=(20.0, 17.0), radius=4.0) -> Pair:
    """Labels 1 (large region) and 2 (small blob) with landmarks at the blob's centroid."""
    grid = Grid(tuple(reversed(shape)), (1.0, 1.2))
    idx = grid.points("index", dtype=torch.float32)
    lab = torch.zeros(1, *shape, dtype=torch.int64)
    lab[0, 6:34, 6:38] = 1
    lab[0][((idx - torch.tensor(centre)).norm(dim=-1) <= radius)] = 2
    img = lab.float() / 2
    pt = idx[lab[0] == 2].mean(0, keepdim=True)
    return Pair(fixed=img.clone(), moving=img.clone(), fixed_labels=lab.clone(), moving_labels=lab.clone(),
                fixed_points=pt.clone(), moving_points=pt.clone(), grid=grid)


def centroid(lab: torch.Tensor, grid: Grid, k: int) -> torch.Tensor:
    idx = grid.points("index", dtype=torch.float32)
    return idx[lab[0] == k].mean(0)


SPATIAL = AugmentConfig(p_affine=1.0, rotation_deg=20, scale=0.15, translation_mm=4, shear=0.05,
                        p_deform=1.0, deform_mm=2.0, deform_smoothness_mm=10.0,
                        p_bias=0.0, p_gamma=0.0, p_noise=0.0, p_blur=0.0)


def test_augment_keeps_images_labels_points_consistent():
    pair = blob_pair()
    moved = 0.0
    for seed in range(3):
        out = Augment(SPATIAL)(pair, gen(seed))
        for side in ("fixed", "moving"):
            lab, pts = getattr(out, f"{side}_labels"), getattr(out, f"{side}_points")
            assert lab.dtype == torch.int64 and set(lab.unique().tolist()) <= {0, 1, 2}
            assert float((pts[0] - centroid(lab, pair.grid, 2)).abs().max()) < 1.0
            # the image moved with the labels
            img = getattr(out, side)
            assert float(((img > 0.75) == (lab == 2)).float().mean()) > 0.99
        moved = max(moved, float((out.fixed_points - pair.fixed_points).abs().max()))
        assert not torch.equal(out.fixed_labels, out.moving_labels)  # sides drawn independently
    assert moved > 1.0  # the points did move
    a, b = Augment(SPATIAL)(pair, gen(5)), Augment(SPATIAL)(pair, gen(5))
    assert torch.equal(a.moving, b.moving) and torch.equal(a.fixed_points, b.fixed_points)
    assert torch.equal(pair.moving_labels, blob_pair().moving_labels)  # input untouched
    only_moving = Augment(AugmentConfig(**{**SPATIAL.__dict__, "fixed": False}))(pair, gen(1))
    assert torch.equal(only_moving.fixed, pair.fixed)


def test_augment_intensity_changes_images_only_and_3d():
    pair = blob_pair()
    cfg = AugmentConfig(p_affine=0, p_deform=0, p_bias=1, p_gamma=1, p_noise=1, p_blur=1)
    out = Augment(cfg)(pair, gen(0))
    assert torch.equal(out.fixed_labels, pair.fixed_labels) and torch.equal(out.moving_points, pair.moving_points)
    assert not torch.allclose(out.fixed, pair.fixed, atol=1e-3) and not torch.allclose(out.fixed, out.moving)
    lab = torch.zeros(1, 16, 18, 20, dtype=torch.int64)
    lab[0, 5:11, 6:12, 7:14] = 4
    p3 = Pair(fixed=lab.float(), moving=lab.float(), fixed_labels=lab, moving_labels=lab,
              moving_points=torch.tensor([[10.0, 8.5, 7.5]]), grid=Grid((20, 18, 16), (1.0, 1.0, 1.5)))
    o3 = Augment(SPATIAL)(p3, gen(2))
    assert o3.moving.shape == lab.shape and o3.fixed_points is None
    assert float((o3.moving_points[0] - centroid(o3.moving_labels, p3.grid, 4)).abs().max()) < 1.0
    with pytest.raises(InputError):
        AugmentConfig(p_affine=1.5)


def test_augment_updates_ground_truth_displacement():
    lab = blob_pair().moving_labels
    smooth = torch.nn.functional.avg_pool2d(lab.float()[None], 5, 1, 2)[0]
    grid = Grid((44, 40), (1.0, 1.2))
    pair = deformed_pair(smooth, lab, grid.spacing, SynthConfig(bias_strength=0, gamma_std=0, noise_std=0),
                         gen(0), grid=grid)
    out = Augment(SPATIAL)(pair, gen(1))
    inside = out.mask[0] > 0
    assert 0.5 < float(inside.float().mean()) < 1.0
    warped = warp_voxel(out.moving[None], out.displacement[None])[0]
    err = (warped - out.fixed).abs()[:, inside].mean()
    before = (out.moving - out.fixed).abs()[:, inside].mean()
    assert float(err) < 0.01 and float(err) < 0.1 * float(before)


def test_network_grid_with_canonical_orientation():
    """``orientation``: an axis-aligned grid with those codes, same centre, covering the image;
    a LIA image put on an RAS grid is the array flipped/permuted accordingly."""
    from medreg.train.preprocess import direction_from_codes

    lia = direction_from_codes("LIA")
    g = Grid((6, 8, 10), (1.0, 1.0, 1.0), (3.0, -2.0, 5.0), lia)
    assert g.orientation() == "LIA"
    net = network_grid(g, PreprocessConfig(orientation="RAS", multiple_of=1))
    assert net.orientation() == "RAS"
    assert np.allclose(net.center(), g.center())
    assert net.size == (6, 10, 8)  # x: L-R extent 6, y: A-P (was z) 10, z: S-I (was y) 8
    data = torch.arange(6 * 8 * 10, dtype=torch.float32).reshape(1, 10, 8, 6)  # (z, y, x)
    img = Image(data, g, "lia")
    out, _ = prepare_image(img, net, PreprocessConfig(orientation="RAS", multiple_of=1, normalise="none"))
    # RAS x = flipped LIA x; RAS y (A) = LIA z (A); RAS z (S) = flipped LIA y (I)
    expect = data[0].flip(-1).permute(1, 0, 2).flip(0)  # (y_lia→z_ras flipped, z_lia→y_ras, x flipped)
    assert torch.allclose(out[0], expect)
    with pytest.raises(InputError):
        PreprocessConfig(orientation="RAX")
    with pytest.raises(InputError):
        PreprocessConfig(orientation="RRS")


def test_pair_dataset_initial_alignment(tmp_path):
    """``initialisation: com``: a moving image that is the fixed one shifted in world space
    lands on the fixed one on the network grid; its landmark moves with it."""
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(20.0), indexing="ij")
    blob = torch.exp(-((yy - 11) ** 2 + (xx - 9) ** 2) / 18.0)[None]
    gf = Grid((20, 24), (1.0, 1.0), (0.0, 0.0))
    gm = Grid((20, 24), (1.0, 1.0), (7.0, -4.0))  # the same array, 7 mm / -4 mm away
    write_image(Image(blob, gf, "f"), tmp_path / "f.nii.gz")
    write_image(Image(blob.clone(), gm, "m"), tmp_path / "m.nii.gz")
    write_landmarks(torch.tensor([[16.0, 7.0]]), tmp_path / "m.csv")  # voxel (9, 11) of m
    recs = [Record(tmp_path / "f.nii.gz", subject="f"),
            Record(tmp_path / "m.nii.gz", landmarks=tmp_path / "m.csv", subject="m")]
    plain = PairDataset(recs, [(0, 1)], PreprocessConfig(multiple_of=4, normalise="none"))[0]
    aligned = PairDataset(recs, [(0, 1)], PreprocessConfig(multiple_of=4, normalise="none",
                                                           initialisation="com"))[0]
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert (plain.fixed - plain.moving)[inner].abs().max() > 0.3
    assert (aligned.fixed - aligned.moving)[inner].abs().max() < 1e-3
    peak = torch.nonzero(aligned.fixed[0] == aligned.fixed[0].max())[0].flip(0).float()
    assert torch.allclose(aligned.moving_points[0], peak, atol=1e-3)
