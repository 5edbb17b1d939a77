"""Classical registration: known transforms recovered on real images, Dice rises, symmetry."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import medreg
from medreg.core import Grid, Image, InputError
from medreg.core.functional import gaussian_smooth
from medreg.engine import config_from_dict, initial_transform, load_preset, merge_overrides
from medreg.io import read_image
from medreg.transforms import (AffineTransform, RigidTransform, StationaryVelocityField,
                               compose_displacements, warp_image, warp_labels)

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "medreg" / "data"


@pytest.fixture(scope="module")
def slice2d() -> Image:
    """An axial slice of the bundled Colin27 T1 (2 mm), as a 2D image in world mm."""
    vol = read_image(BUNDLED / "colin27_t1_2mm.nii.gz")
    g3 = vol.grid
    k = g3.size[2] // 2 + 5
    g2 = Grid(g3.size[:2], g3.spacing[:2], g3.origin[:2], g3.direction[:2, :2])
    return Image(vol.data[0, k].float(), g2, "colin27 slice")


def corners_error(t_est, t_true, grid: Grid) -> float:
    c = grid.corners()
    with torch.no_grad():
        return float((t_est.double()(c) - t_true.double()(c)).norm(dim=-1).max())


def head_endpoint_errors(image: Image, estimate, truth) -> tuple[float, float]:
    """Mean endpoint error (mm) of ``estimate`` against ``truth`` inside the head, and the mean
    true displacement there (the error of the identity)."""
    g = image.grid
    with torch.no_grad():
        est = estimate.displacement(g).double()
        ref = truth.displacement(g)
    head = image.data[0] > 0.2 * float(image.data.max())
    return float((est - ref).norm(dim=1)[0][head].mean()), float(ref.norm(dim=1)[0][head].mean())


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_known_rigid_transform_is_recovered(slice2d, optimizer):
    g = slice2d.grid
    c = torch.tensor(g.center(), dtype=torch.float64)
    truth = RigidTransform(2, rotation=[np.deg2rad(8.0)], translation=[4.0, -6.0], center=c,
                           trainable=False, dtype=torch.float64)
    moving = warp_image(slice2d, truth.inverse(), g)
    cfg = config_from_dict({"initialisation": "none", "stages": [
        {"type": "rigid", "levels": [2, 1], "optimizer": optimizer,
         "iterations": [200, 100] if optimizer == "adam" else [30, 20], "lr": 0.5 if optimizer == "adam" else 1.0,
         "similarity": {"name": "ncc"}, "tolerance": 1e-7}]})
    res = medreg.register(slice2d, moving, config=cfg)
    assert corners_error(res.transform, truth, g) < 0.5 * min(g.spacing)


def test_known_affine_transform_is_recovered(slice2d):
    g = slice2d.grid
    c = torch.tensor(g.center(), dtype=torch.float64)
    a = torch.tensor([[1.06, 0.04], [-0.03, 0.95]], dtype=torch.float64)
    truth = AffineTransform(2, a, [3.0, 2.0], center=c, trainable=False, dtype=torch.float64)
    moving = warp_image(slice2d, truth.inverse(), g)
    cfg = config_from_dict({"initialisation": "none", "stages": [
        {"type": "affine", "levels": [2, 1], "iterations": [250, 150], "lr": 0.3,
         "similarity": {"name": "ncc"}, "tolerance": 1e-8}]})
    res = medreg.register(slice2d, moving, config=cfg)
    assert corners_error(res.transform, truth, g) < 0.5 * min(g.spacing)


def test_known_smooth_deformation_is_recovered(slice2d):
    g = slice2d.grid
    gen = torch.Generator().manual_seed(0)
    v = gaussian_smooth(torch.randn(1, 2, *g.shape, generator=gen, dtype=torch.float64), 12.0, g.spacing)
    v = v * (4.0 / v.abs().max())
    truth = StationaryVelocityField(v, g, steps=7)
    moving = warp_image(slice2d, truth.inverse(), g)
    cfg = config_from_dict({"initialisation": "none", "stages": [
        {"type": "svf", "levels": [2, 1], "iterations": [120, 60], "lr": 0.3,
         "similarity": {"name": "lncc", "window": 7}, "regularisation": {"diffusion": 0.05},
         "gradient_sigma": 1.0, "tolerance": 0}]})
    res = medreg.register(slice2d, moving, config=cfg)
    epe, before = head_endpoint_errors(slice2d, res.transform, truth)
    assert epe < 0.5 * min(g.spacing), (epe, before)


@pytest.mark.parametrize("preset", ["rigid", "affine"])
def test_an_image_registered_to_itself_gives_the_identity(slice2d, preset):
    """Linear stages end on their best parameters, not on Adam's last step, which at a constant
    step size keeps moving about the optimum (0.5 mm off identity before)."""
    res = medreg.register(slice2d, slice2d, preset)
    moved = float(res.transform.displacement(slice2d.grid).detach().norm(dim=1).max())
    assert moved < 1e-3, moved
    for h in res.history:
        assert h["loss_last"] <= h["loss_first"], h


def test_initialisation_aligns_centres(slice2d):
    g = slice2d.grid
    truth = AffineTransform(2, translation=[10.0, -8.0], trainable=False, dtype=torch.float64)
    moving = warp_image(slice2d, truth.inverse(), g)
    for method in ("com", "moments"):
        t = initial_transform(slice2d, moving, method)
        assert torch.allclose(t.translation, torch.tensor([10.0, -8.0], dtype=torch.float64), atol=0.5)


def test_small_3d_real_pair_dice_rises(shared_data):
    d = shared_data / "vxm-brain-t1-aseg" / "nifti"
    from medreg.engine.pyramid import pyramid_level

    def down(path, label=False):
        img = read_image(d / path, label=label)
        if label:
            g = img.grid.downsample(3)
            from medreg.transforms import Identity

            return warp_labels(img, Identity(3), g)
        return pyramid_level(img, 3)

    fixed, moving = down("fixed.nii.gz"), down("moving.nii.gz")
    fl, ml = down("fixed_labels.nii.gz", True), down("moving_labels.nii.gz", True)
    # the preset's pyramid is meant for ~1 mm images: at 3 mm its deformable stage runs at 1/2 and 1
    res = medreg.register(fixed, moving, "fast", fixed_labels=fl, moving_labels=ml, stage2_levels=[2, 1])
    m = res.metrics
    assert m["dice_after"] > m["dice_before"] + 0.05
    assert m["displacement"]["folding_percent"] < 0.1


def test_symmetric_mode_forward_and_backward_compose_to_identity(slice2d):
    g = slice2d.grid
    gen = torch.Generator().manual_seed(1)
    v = gaussian_smooth(torch.randn(1, 2, *g.shape, generator=gen, dtype=torch.float64), 10.0, g.spacing)
    moving = warp_image(slice2d, StationaryVelocityField(v * (3.0 / v.abs().max()), g), g)
    cfg = config_from_dict({"initialisation": "none", "stages": [
        {"type": "svf", "levels": [2], "iterations": [60], "lr": 0.3, "symmetric": True,
         "similarity": {"name": "lncc", "window": 5}, "regularisation": {"diffusion": 0.1}}]})
    res = medreg.register(slice2d, moving, config=cfg)
    assert res.inverse is not None
    with torch.no_grad():
        fwd = res.transform.displacement(g)
        bwd = res.inverse.displacement(g)
    err = compose_displacements(bwd, fwd, g).norm(dim=1)[0, 5:-5, 5:-5]
    assert float(err.mean()) < 0.1 * min(g.spacing)


def test_configs_reject_unknown_keys_and_presets_load():
    for name in ("rigid", "affine", "fast", "accurate", "multimodal", "lung"):
        cfg = load_preset(name)
        assert cfg.stages
    with pytest.raises(InputError, match="unknown key"):
        config_from_dict({"stages": [{"type": "affine", "iterashuns": 3}]})
    with pytest.raises(InputError, match="unknown stage type"):
        config_from_dict({"stages": [{"type": "warp-drive"}]})
    with pytest.raises(InputError, match="unknown override"):
        merge_overrides(load_preset("fast"), nonsense=1)
    assert merge_overrides(load_preset("fast"), stage2_lr=0.1).stages[1].lr == 0.1


@pytest.mark.parametrize("stage, top, words", [
    ({"lr": -1}, {}, "lr must be a number > 0"),
    ({"lr": 0}, {}, "lr must be a number > 0"),
    ({"lr": "fast"}, {}, "lr must be"),
    ({"type": "svf", "regularisation": {"diffusion": -1.0}}, {}, "diffusion weight must be"),
    ({"type": "svf", "regularisation": {"diffusion": {"weight": "high"}}}, {}, "diffusion weight"),
    ({"type": "greedy", "symmetric": "no"}, {}, "symmetric must be true or false"),
    ({"iterations": 1.7}, {}, "iterations must be one whole count"),
    ({"levels": [4, 0.5]}, {}, "levels must be whole shrink factors"),
    ({"levels": "abc"}, {}, "levels must be whole shrink factors"),
    ({"type": "bspline", "control_spacing": "10"}, {}, "control_spacing (mm) must be a number > 0"),
    ({"type": "greedy", "gradient_sigma": "1"}, {}, "gradient_sigma (voxels) must be"),
    ({"tolerance": "small"}, {}, "tolerance must be"),
    ({"patience": -3}, {}, "patience must be a whole number >= 1"),
    ({"type": "svf", "steps": 2.5}, {}, "steps must be a whole number"),
    ({"similarity": {"name": "nosuch"}}, {}, "unknown loss 'nosuch'"),
    ({"similarity": {"name": "lncc", "window": "big"}}, {}, "window must be a number or one number per axis"),
    ({"optimizer": "sgd"}, {}, "unknown optimizer"),
    ({}, {"seed": "abc"}, "seed must be a whole number"),
    ({}, {"small_image_size": "64"}, "small_image_size (voxels) must be"),
    ({}, {"crop_to_foreground": "false"}, "crop_to_foreground must be true or false"),
])
def test_config_values_of_the_wrong_type_or_sign_are_one_clear_error(tmp_path, stage, top, words):
    """A wrong sign or a quoted value would run and 'succeed' (``lr: -1`` climbs the loss,
    ``symmetric: "no"`` is true); a wrong type would end in a traceback mid-run. Each is an
    ``InputError`` naming the file (and the stage) before any image is read."""
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**top, "stages": [{"type": "affine", **stage}]}))
    with pytest.raises(InputError) as err:
        medreg.register("no-such-fixed.nii.gz", "no-such-moving.nii.gz", config=path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and words in msg, msg
    if stage:
        assert f"{path}: stage 1" in msg, msg


def test_a_level_too_coarse_for_the_image_is_a_warning():
    g = Grid((20, 24), (1.0, 1.0))  # x, y: data (1, 24, 20)
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(20.0), indexing="ij")
    fixed = Image(torch.exp(-((yy - 12) ** 2 + (xx - 10) ** 2) / 40)[None], g, "crop")
    cfg = {"initialisation": "none", "stages": [{"type": "affine", "levels": [8, 1], "iterations": 2}]}
    with pytest.warns(UserWarning, match=r"crop is too small along x \(20 voxels; level 1/8\), "
                                         r"y \(24 voxels; level 1/8\).*keep 4 voxels"):
        r = medreg.register(fixed, fixed, config=cfg)
    assert r.history[0]["factor"] == 8  # run on a 4 × 4 grid, not 2 × 3


def test_a_thick_slice_volume_keeps_its_slices_on_coarse_levels():
    """A 64 × 64 × 5 volume of 1 × 1 × 6 mm slices through `fast` (levels 1/4, 1/2): the shrink is
    capped along z, so the greedy levels keep 4–5 slices (at 1/4 they had one, and the force's
    finite differences stopped with a RuntimeError from torch). The in-plane shift is found."""
    g = Grid((64, 64, 5), (1.0, 1.0, 6.0))
    zz, yy, xx = torch.meshgrid(torch.arange(5.0), torch.arange(64.0), torch.arange(64.0), indexing="ij")
    blob = torch.exp(-((xx - 30) ** 2 + (yy - 34) ** 2) / 120 - (zz - 2) ** 2 / 8)
    blob = blob + 0.5 * torch.exp(-((xx - 42) ** 2 + (yy - 24) ** 2) / 40)
    fixed = Image(blob[None], g, "thick fixed")
    truth = AffineTransform(3, translation=[2.0, -1.5, 0.0], trainable=False, dtype=torch.float64)
    moving = warp_image(fixed, truth.inverse(), g)
    with pytest.warns(UserWarning, match=r"too small along z \(5 voxels; level 1/4\)"):
        r = medreg.register(fixed, Image(moving.data, g, "thick moving"), "fast", iterations=20)
    centre = torch.tensor([[30.0, 34.0, 12.0]], dtype=torch.float64)
    with torch.no_grad():
        err = (r.transform(centre) - truth(centre)).norm()
    assert float(err) < 0.5


def test_config_numbers_from_numpy_torch_and_yaml_are_accepted_as_plain_numbers(tmp_path):
    """What the checks must not reject: numpy and 0-d torch numbers (from Python), YAML's
    ``1e-3`` (text to PyYAML's YAML 1.1), whole floats where a count is due; they are stored as
    plain ``int``/``float``/``bool`` and run."""
    cfg = merge_overrides(load_preset("fast"), iterations=np.int64(3), stage2_lr=np.float32(0.2),
                          seed=torch.tensor(5), crop_to_foreground=np.bool_(False),
                          stage1_levels=[np.int64(4)])
    assert cfg.stages[1].iterations == [3, 3] and type(cfg.stages[1].iterations[0]) is int
    assert type(cfg.stages[1].lr) is float and abs(cfg.stages[1].lr - 0.2) < 1e-6
    assert cfg.seed == 5 and type(cfg.seed) is int and cfg.crop_to_foreground is False
    path = tmp_path / "sci.yaml"
    path.write_text("seed: -1\nstages:\n  - {type: affine, levels: [2.0], iterations: 2.0, lr: 1e-1, "
                    "patience: 2.0, tolerance: 1e-6}\n  - {type: svf, levels: [2], iterations: 2, "
                    "steps: 3.0, regularisation: {bending: 1e-3}}\n")
    from medreg.engine import load_config

    loaded = load_config(path)
    affine, svf = loaded.stages
    assert affine.lr == 0.1 and affine.tolerance == 1e-6 and affine.patience == 2 and svf.steps == 3
    assert type(affine.patience) is int and type(svf.steps) is int and loaded.seed == -1
    g = Grid((24, 24), (1.0, 1.0))
    yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
    img = Image(torch.exp(-((yy - 12) ** 2 + (xx - 11) ** 2) / 30)[None], g)
    medreg.register(img, img, config=path)  # runs (whole floats used to fail mid-run)
    for text, words in (("stages:\n  - {levels: [2]}\n", "a stage needs a type"),
                        ("seed: 100000000000000000000000\nstages:\n  - {type: affine}\n", "seed must be below")):
        path.write_text(text)
        with pytest.raises(InputError, match=words):
            load_config(path)


def test_a_binary_file_given_as_the_config_is_a_clear_error(tmp_path):
    path = tmp_path / "image.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)))
    with pytest.raises(InputError, match="not a YAML text file"):
        medreg.register("f.nii.gz", "m.nii.gz", config=path)


def test_config_dict_round_trips_and_survives_a_levels_edit():
    # to_dict writes a setting that is the same on every level as one value, so a user who edits
    # `levels` (in `medreg presets fast` output, or stage1_levels=...) gets a loadable config
    for name in ("fast", "accurate", "discrete", "lung"):
        cfg = load_preset(name)
        assert config_from_dict(cfg.to_dict()) == cfg
    cfg = merge_overrides(load_preset("fast"), stage1_levels=[4, 2])
    assert cfg.stages[0].iterations == [150, 150] and cfg.stages[0].log_jacobian == [0.0, 0.0]
    data = load_preset("fast").to_dict()
    data["stages"][0]["levels"] = [8, 4, 2]
    assert config_from_dict(data).stages[0].iterations == [150] * 3
    # settings that differ per level still have to match the levels given
    data["stages"][1]["levels"] = [8, 4, 2]
    with pytest.raises(InputError, match="one per level"):
        config_from_dict(data)


def test_small_image_settings_are_chosen_by_size_and_validated():
    fast = load_preset("fast")
    # the geometric mean of the voxel counts decides: hippocampus crops are small, a 2 mm brain not
    assert fast.is_small((35, 50, 35)) and not fast.is_small((91, 109, 91))
    assert fast.is_small((40, 40)) and not fast.is_small((100, 100))
    assert not fast.is_small((256, 256, 20))  # a thin slab is not small
    small = fast.stages_for((35, 50, 35))
    assert small[1].levels == [2, 1] and small[1].lr == 0.15 and small[1].gradient_sigma == 3.0
    assert small[1].iterations == fast.stages[1].iterations  # what small_image leaves alone stays
    assert small[0] == fast.stages[0]  # a stage without small_image settings is unchanged
    assert fast.stages_for((91, 109, 91)) == fast.stages
    off = merge_overrides(fast, small_image_size=0)
    assert not off.is_small((1, 1, 1)) and off.stages_for((35, 50, 35)) == off.stages
    assert config_from_dict(fast.to_dict()) == fast
    # discrete settings change key by key: the rest of the search stays the preset's
    disc = load_preset("discrete")
    small_disc = disc.stages_for((35, 50, 35))[1].discrete
    assert small_disc["feature_factor"] == 2 and small_disc["radius_mm"] == 8
    assert {k: v for k, v in small_disc.items() if k not in ("feature_factor", "radius_mm")} == {
        k: v for k, v in disc.stages[1].discrete.items() if k not in ("feature_factor", "radius_mm")}
    # an override of a setting small_image also sets applies on small images too, not silently
    # replaced there; a per-level list for another pyramid keeps small_image's, with a warning
    assert merge_overrides(fast, stage2_lr=0.3).stages_for((35, 50, 35))[1].lr == 0.3
    acc = load_preset("accurate")
    assert acc.stages_for((35, 50, 35))[1].iterations == [50, 45]
    assert merge_overrides(acc, iterations=7).stages_for((35, 50, 35))[1].iterations == [7, 7]
    with pytest.warns(UserWarning, match="stage2_iterations: images under small_image_size keep"):
        kept = merge_overrides(acc, stage2_iterations=[50, 25, 5])
    assert kept.stages[1].iterations == [50, 25, 5] and kept.stages_for((35, 50, 35))[1].iterations == [50, 45]
    # mistakes show when the config is read, not on the first small image
    with pytest.raises(InputError, match="small_image: unknown key"):
        merge_overrides(fast, stage2_small_image={"lvls": [2, 1]})
    with pytest.raises(InputError, match="small_image.*one per level"):
        merge_overrides(fast, stage2_small_image={"levels": [2, 1, 1]})
    with pytest.raises(InputError, match="small_image: cannot change type"):
        merge_overrides(fast, stage2_small_image={"type": "svf"})
    with pytest.raises(InputError, match="small_image_size"):
        merge_overrides(fast, small_image_size=-1)


def test_a_small_image_runs_the_small_image_pyramid():
    vol = read_image(BUNDLED / "colin27_t1_2mm.nii.gz")
    from medreg.engine.pyramid import pyramid_level

    fixed = pyramid_level(vol, 3)  # 31×37×31 voxels of 6 mm
    moving = warp_image(fixed, AffineTransform(3, translation=[4.0, -3.0, 2.0], trainable=False), fixed.grid)
    kw = dict(stage1_iterations=3, stage2_iterations=2)
    res = medreg.register(fixed, moving, "fast", **kw)
    ran = [(h["stage"], h["factor"], h.get("small_image", False)) for h in res.history]
    assert ran == [(1, 4, False), (2, 2, True), (2, 1, True)]
    res = medreg.register(fixed, moving, "fast", small_image_size=0, **kw)
    ran = [(h["stage"], h["factor"], h.get("small_image", False)) for h in res.history]
    assert ran == [(1, 4, False), (2, 4, False), (2, 2, False)]
    # the reported similarity is the one the last stage ran with on this image
    res = medreg.register(fixed, moving, "fast", stage2_small_image={"similarity": {"name": "ncc"}}, **kw)
    assert res.metrics["similarity_after"]["name"] == "ncc"
    assert medreg.register(fixed, moving, "fast", **kw).metrics["similarity_after"]["name"] == "lncc"


def test_seed_gives_bit_identical_results(slice2d):
    g = slice2d.grid
    moving = warp_image(slice2d, AffineTransform(2, translation=[2.0, 1.0], trainable=False), g)
    a = medreg.register(slice2d, moving, "fast", iterations=10, seed=3)
    b = medreg.register(slice2d, moving, "fast", iterations=10, seed=3)
    with torch.no_grad():
        assert torch.equal(a.transform.displacement(g), b.transform.displacement(g))
        assert torch.equal(a.warped.data, b.warped.data)


def test_discrete_stage_through_the_driver(slice2d):
    g = slice2d.grid
    truth = AffineTransform(2, translation=[6.0, -4.0], trainable=False, dtype=torch.float64)
    moving = warp_image(slice2d, truth.inverse(), g)
    cfg = config_from_dict({"initialisation": "none", "stages": [
        {"type": "discrete", "discrete": {"feature_factor": 2, "radius_mm": 12, "io_iterations": 20,
                                          "io_factor": 1, "inverse_consistent": True}}]})
    res = medreg.register(slice2d, moving, config=cfg)
    head = slice2d.data[0] > 0.2 * float(slice2d.data.max())
    with torch.no_grad():
        err = (res.transform.displacement(g) - truth.displacement(g)).norm(dim=1)[0][head]
    assert float(err.mean()) < min(g.spacing)  # mean endpoint error under one voxel
    # the inverse-consistent stage's inverse undoes the forward map: T(T⁻¹(y)) = y
    pts = g.points("world", dtype=torch.float64).reshape(-1, 2)[head.reshape(-1)]
    with torch.no_grad():
        back = res.transform(res.inverse(pts))
    assert float((back - pts).norm(dim=-1).mean()) < 0.25 * min(g.spacing)
    with pytest.raises(InputError, match="discrete"):
        config_from_dict({"stages": [{"type": "svf", "discrete": {"radius_mm": 3}}]})
    with pytest.raises(InputError):
        config_from_dict({"stages": [{"type": "discrete", "discrete": {"radius_mmm": 3}}]})


def test_greedy_stage_absorbs_the_earlier_deformations(slice2d):
    """A greedy stage after a deformable one starts from its displacement: the result is one
    field after the linear map (whose volume step regularises all of it); with no greedy steps it
    is the earlier transform itself; with steps it keeps refining from there."""
    from medreg.transforms import Compose, DisplacementField, LinearTransform

    g = slice2d.grid
    truth = AffineTransform(2, translation=[6.0, -4.0], trainable=False, dtype=torch.float64)
    moving = warp_image(slice2d, truth.inverse(), g)
    discrete = {"type": "discrete", "discrete": {"feature_factor": 2, "radius_mm": 12, "io_iterations": 0}}

    def run(*greedy):
        return medreg.register(slice2d, moving, config={"initialisation": "none", "seed": 0,
                                                        "stages": [discrete, *greedy]})

    greedy = {"type": "greedy", "levels": [1], "similarity": {"name": "lncc", "window": 7}}
    alone, zero = run(), run({**greedy, "iterations": [0]})
    assert isinstance(zero.transform, Compose) and len(zero.transform.transforms) == 2
    lin, field = zero.transform.transforms
    assert isinstance(lin, LinearTransform) and isinstance(field, DisplacementField)
    with torch.no_grad():
        assert torch.allclose(zero.transform.displacement(g), alone.transform.displacement(g), atol=1e-4)
    # on a pyramid too: each level adds back the absorbed field's detail finer than the last
    # level's (it was sampled on the first level only: a full-resolution field lost its detail)
    fine = {"type": "discrete", "discrete": {"feature_factor": 2, "radius_mm": 12,
                                             "io_iterations": 10, "io_factor": 1}}
    alone_fine = medreg.register(slice2d, moving, config={"initialisation": "none", "stages": [fine]})
    zero_fine = medreg.register(slice2d, moving, config={"initialisation": "none", "stages": [
        fine, {**greedy, "levels": [4, 2, 1], "iterations": [0, 0, 0]}]})
    with torch.no_grad():
        assert torch.allclose(zero_fine.transform.displacement(g),
                              alone_fine.transform.displacement(g), atol=1e-4)
    refined = run({**greedy, "iterations": [30], "log_jacobian": [0.1]})
    errs = [head_endpoint_errors(slice2d, r.transform, truth)[0] for r in (alone, refined)]
    assert errs[1] < 0.8 * errs[0], errs  # measured 0.61 vs 0.92 mm (7.2 mm before registration)
    sym = run({**greedy, "iterations": [5], "symmetric": True})  # the midpoint split works too
    assert head_endpoint_errors(slice2d, sym.transform, truth)[0] < 1.5 * errs[0]


@pytest.mark.parametrize("symmetric", [False, True])
def test_greedy_stage_recovers_a_known_smooth_deformation(slice2d, symmetric):
    """Plain and symmetric (midpoint, as SyN) greedy updates recover a known bump."""
    g = slice2d.grid
    x = g.points(dtype=torch.float64) - torch.tensor(g.center(), dtype=torch.float64)
    bump = torch.exp(-x.square().sum(-1) / (2 * 35.0 ** 2))       # a smooth 10 mm bump
    v = torch.stack([8.0 * bump, -6.0 * bump])[None]
    truth = StationaryVelocityField(v, g, steps=7)
    moving = warp_image(slice2d, truth.inverse(), g)
    cfg = config_from_dict({"initialisation": "none", "stages": [
        {"type": "greedy", "levels": [2, 1], "iterations": [100, 60], "lr": 0.25,
         "similarity": {"name": "lncc", "window": 7}, "gradient_sigma": 1.5, "tolerance": 0,
         "symmetric": symmetric}]})
    res = medreg.register(slice2d, moving, config=cfg)
    epe, before = head_endpoint_errors(slice2d, res.transform, truth)
    assert before > 1.0 * min(g.spacing)
    assert epe < 0.5 * min(g.spacing), (epe, before)
    assert res.metrics["displacement"]["folding_percent"] == 0


@pytest.mark.parametrize("symmetric", [False, True])
def test_greedy_log_jacobian_smooths_volume_change_and_still_recovers(slice2d, symmetric):
    """With the volume-change step on, a known smooth bump is still recovered and the field's
    SD of log det J is lower than with smoothing alone (same settings otherwise); in symmetric
    mode each half-field takes its own volume step."""
    g = slice2d.grid
    x = g.points(dtype=torch.float64) - torch.tensor(g.center(), dtype=torch.float64)
    bump = torch.exp(-x.square().sum(-1) / (2 * 35.0 ** 2))
    truth = StationaryVelocityField(torch.stack([8.0 * bump, -6.0 * bump])[None], g, steps=7)
    moving = warp_image(slice2d, truth.inverse(), g)
    out = {}
    for lj in (0.0, 0.1):
        cfg = config_from_dict({"initialisation": "none", "stages": [
            {"type": "greedy", "levels": [2, 1], "iterations": [100, 60], "lr": 0.25,
             "similarity": {"name": "lncc", "window": 7}, "gradient_sigma": 1.5, "tolerance": 0,
             "log_jacobian": [lj, lj], "symmetric": symmetric}]})
        res = medreg.register(slice2d, moving, config=cfg)
        epe, before = head_endpoint_errors(slice2d, res.transform, truth)
        out[lj] = (epe, res.metrics["displacement"]["sdlogj"])
        assert epe < 0.5 * min(g.spacing), (lj, epe, before)
    # measured: EPE 0.72 → 0.56 mm, SDlogJ 0.172 → 0.103; symmetric 0.53 → 0.37 mm, 0.101 → 0.074
    assert out[0.1][1] < 0.9 * out[0.0][1], out


def test_multimodal_preset_recovers_a_deformation_across_contrasts(slice2d):
    """A contrast-inverted, non-linearly remapped copy under a known smooth bump: the
    `multimodal` preset (mutual information) brings the endpoint error well below the bump's."""
    g = slice2d.grid
    x = g.points(dtype=torch.float64) - torch.tensor(g.center(), dtype=torch.float64)
    bump = torch.exp(-x.square().sum(-1) / (2 * 35.0 ** 2))
    truth = StationaryVelocityField(torch.stack([6.0 * bump, 5.0 * bump])[None], g, steps=7)
    t = slice2d.data / slice2d.data.max()
    other = slice2d.with_data(torch.where(t > 0.05, 1.2 - t ** 2, torch.zeros_like(t)))
    moving = warp_image(other, truth.inverse(), g)
    res = medreg.register(slice2d, moving, "multimodal", initialisation="none")
    epe, before = head_endpoint_errors(slice2d, res.transform, truth)
    assert before > 1.0 * min(g.spacing)
    assert epe < 0.35 * before, (epe, before)  # measured 0.62 vs 3.09 mm


def test_lbfgs_stops_when_a_restart_makes_no_progress(slice2d):
    """An L-BFGS step that leaves the loss unchanged restarts the curvature memory; a second
    one in a row ends the level (here at the optimum: the image against itself)."""
    cfg = config_from_dict({"initialisation": "none", "stages": [
        {"type": "rigid", "levels": [1], "optimizer": "lbfgs", "iterations": [50], "lr": 1.0,
         "similarity": {"name": "ssd"}, "tolerance": 0}]})
    res = medreg.register(slice2d, slice2d, config=cfg)
    assert res.history[0]["iterations"] <= 3
    assert corners_error(res.transform, RigidTransform(2, dtype=torch.float64), slice2d.grid) < 1e-6


@pytest.mark.parametrize("symmetric", [False, True])
def test_greedy_masks_keep_an_artefact_out(slice2d, symmetric):
    """A bright artefact pasted into the moving image changes an unmasked greedy registration
    (plain or symmetric); masked out in both images (in symmetric mode the fixed mask is warped
    to the midpoint) it changes nothing: the field equals the one without the artefact."""
    g = slice2d.grid
    x = g.points(dtype=torch.float64) - torch.tensor(g.center(), dtype=torch.float64)
    bump = torch.exp(-x.square().sum(-1) / (2 * 35.0 ** 2))
    truth = StationaryVelocityField(torch.stack([8.0 * bump, -6.0 * bump])[None], g, steps=7)
    moving = warp_image(slice2d, truth.inverse(), g)
    ny, nx = g.shape
    data = moving.data.clone()
    data[0, ny // 2 - 6: ny // 2 + 6, nx // 2 + 6: nx // 2 + 18] = 2.0 * float(data.max())
    corrupted = Image(data, g)
    keep = torch.ones(g.shape)
    # the artefact and a margin of 14 voxels: the 1/2 level's smoothing carries it ~8 voxels
    keep[ny // 2 - 20: ny // 2 + 20, nx // 2 - 8: nx // 2 + 32] = 0
    mask = Image(keep[None], g)
    cfg = config_from_dict({"initialisation": "none", "stages": [
        {"type": "greedy", "levels": [2, 1], "iterations": [60, 30], "lr": 0.25,
         "similarity": {"name": "lncc", "window": 7}, "gradient_sigma": 1.5, "tolerance": 0,
         "symmetric": symmetric}]})

    def field(image, masks):
        kw = {"fixed_mask": mask, "moving_mask": mask} if masks else {}
        with torch.no_grad():
            return medreg.register(slice2d, image, config=cfg, **kw).transform.displacement(g)

    masked = float((field(corrupted, True) - field(moving, True)).norm(dim=1).max())
    unmasked = float((field(corrupted, False) - field(moving, False)).norm(dim=1).max())
    assert masked < 1e-6, masked
    assert unmasked > 1.0, unmasked  # mm


def test_a_mask_means_non_zero_voxels_not_weights(slice2d):
    """A label map given as a mask (values 0, 1, 2, 255) restricts the similarity exactly as its
    binary version does: no voxel counts twice (the API binarises masks, ``!= 0``)."""
    g = slice2d.grid
    moving = warp_image(slice2d, AffineTransform(2, translation=[2.0, -1.5], trainable=False), g)
    ny, nx = g.shape
    labels = torch.zeros(g.shape, dtype=torch.int32)
    labels[ny // 5: 3 * ny // 5, nx // 5: 4 * nx // 5] = 1
    labels[3 * ny // 5: 4 * ny // 5, nx // 5: 4 * nx // 5] = 2
    labels[ny // 2 - 5: ny // 2 + 5, nx // 2 - 5: nx // 2 + 5] = 255
    cfg = {"initialisation": "none", "stages": [{"type": "affine", "levels": [2], "iterations": [15]}]}

    def matrix(mask):
        return medreg.register(slice2d, moving, config=cfg, fixed_mask=Image(mask[None], g)).transform.matrix()

    assert torch.equal(matrix(labels), matrix((labels != 0).to(torch.int32)))
    assert not torch.equal(matrix(labels), matrix(torch.ones_like(labels)))  # the mask is used


def test_greedy_levels_run_on_the_foreground_box_of_a_padded_image(slice2d):
    # the slice in a wide empty border (as FreeSurfer's 256³ volumes): greedy levels are cropped
    g = slice2d.grid.pad(40)
    fixed = Image(torch.nn.functional.pad(slice2d.data, (40, 40, 40, 40)), g, "padded slice")
    truth = AffineTransform(2, translation=[3.0, -2.0], trainable=False)
    moving = warp_image(fixed, truth, g)
    stage = {"type": "greedy", "levels": [2, 1], "iterations": [20, 10], "lr": 0.25,
             "similarity": {"name": "lncc", "window": 9}, "gradient_sigma": 1.7, "log_jacobian": [0.15, 0.1]}
    cfg = {"initialisation": "none", "stages": [stage]}
    crop = medreg.register(fixed, moving, config=cfg)
    full = medreg.register(fixed, moving, config={**cfg, "crop_to_foreground": False})
    assert [h.get("cropped_to") is not None for h in crop.history] == [True, True]
    assert all("cropped_to" not in h for h in full.history)
    assert math.prod(crop.history[-1]["cropped_to"]) < 0.8 * math.prod(g.shape)
    u_crop, u_full = crop.displacement(), full.displacement()
    head = fixed.data[0] > 0.2 * float(fixed.data.max())
    diff = (u_crop - u_full).norm(dim=1)[0][head].mean()
    assert float(diff) < 0.03 * float(u_full.norm(dim=1)[0][head].mean())
    assert float(u_crop[0, :, :5, :5].abs().max()) == 0.0  # no displacement far outside the box
    # a coarse level on the whole grid, then a cropped one: the crop cuts only its own level's
    # change, so what the coarse level moved outside the box stays (no tear, no fold)
    cfg2 = {"initialisation": "none", "stages": [{**stage, "levels": [4, 1], "iterations": [30, 10]}]}
    crop2 = medreg.register(fixed, moving, config=cfg2)
    full2 = medreg.register(fixed, moving, config={**cfg2, "crop_to_foreground": False})
    assert [h.get("cropped_to") is not None for h in crop2.history] == [False, True]
    u_crop, u_full = crop2.displacement(), full2.displacement()
    diff = (u_crop - u_full).norm(dim=1)[0]
    assert float(diff[head].mean()) < 0.03 * float(u_full.norm(dim=1)[0][head].mean())
    # cutting the total field at the crop instead tears it by ~half the largest displacement
    assert float(diff.max()) < 0.2 * float(u_full.norm(dim=1).max())
    assert crop2.metrics["displacement"]["folding_percent"] == 0
    # a global similarity pulls everywhere: never cropped
    ssd = medreg.register(fixed, moving, config={"initialisation": "none", "stages": [
        {**stage, "similarity": {"name": "ssd"}, "iterations": [2, 1]}]})
    assert all("cropped_to" not in h for h in ssd.history)


def test_the_foreground_box_of_a_non_square_level_is_per_axis():
    # x and y sizes differ and the foreground reaches the far end of x: the box is clamped to
    # each axis's own size (a box clamped by the other axis's size cut the image and not the grid)
    from medreg.engine.driver import _crop_level, _foreground_box, _Level

    g = Grid((90, 40), (1.0, 1.0))  # (x, y): tensor (40, 90)
    data = torch.zeros(1, 40, 90)
    data[0, 15:25, 70:88] = 1.0
    level = _Level(Image(data, g), Image(data, g), None, None)
    start, stop = _foreground_box(level, "lncc", 5)
    assert (start, stop) == ([65, 10], [90, 30])
    cropped = _crop_level(level, (start, stop))
    assert cropped.fixed.grid.size == (25, 20) and cropped.fixed.data.shape == (1, 20, 25)


def test_a_cropped_level_keeps_the_whole_levels_lncc(slice2d):
    # LNCC standardises over the voxels it sees: on a crop its eps is rescaled so that the force
    # (the gradient per voxel) inside the crop is the one of the whole level
    from medreg.engine.driver import _box_slices, _crop_similarity, _Level, build_similarity

    g = slice2d.grid.pad(40)
    fixed = Image(torch.nn.functional.pad(slice2d.data, (40, 40, 40, 40)), g, "padded slice")
    warped = warp_image(fixed, AffineTransform(2, translation=[3.0, -2.0], trainable=False), g).batch()
    spec = {"name": "lncc", "window": 9, "eps": 1e-3}
    sim = build_similarity(spec)
    box = ([30, 30], [g.size[0] - 30, g.size[1] - 30])
    cut = _box_slices(box)
    inner = (slice(None), slice(None), slice(10, -10), slice(10, -10))  # windows inside the crop

    def force(module, f, w):
        w = w.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(module(f, w), w)
        return grad * w[0, 0].numel()  # per voxel, independent of the mean's count

    whole = force(sim, fixed.batch(), warped)[cut][inner]
    crop_sim = _crop_similarity(sim, spec, _Level(fixed, fixed, None, None), box, warped)
    assert crop_sim.eps < sim.eps  # less background: larger variances, so a smaller eps
    cropped = force(crop_sim, fixed.batch()[cut], warped[cut])[inner]
    scale = float(whole.abs().max())
    assert float((cropped - whole).abs().max()) < 1e-3 * scale
    plain = force(sim, fixed.batch()[cut], warped[cut])[inner]
    assert float((plain - whole).abs().max()) > 1e-2 * scale


def test_a_cropped_greedy_level_with_nothing_of_the_moving_image_in_it(slice2d):
    """The moving image's content lies outside the fixed image's foreground box (no
    initialisation): the crop's warped image is constant, there is no force, and the level runs
    (the crop's variance ratio divided by zero)."""
    g = slice2d.grid.pad(40)
    fixed = Image(torch.nn.functional.pad(slice2d.data, (40, 40, 40, 40)), g, "padded slice")
    far = Grid(g.size, g.spacing, (g.origin[0] + 400.0, g.origin[1]), g.direction)
    moving = Image(fixed.data, far, "far away")
    stage = {"type": "greedy", "levels": [2], "iterations": [3], "similarity": {"name": "lncc"}}
    r = medreg.register(fixed, moving, config={"initialisation": "none", "stages": [stage]})
    assert r.history[-1]["cropped_to"] is not None and r.history[-1]["loss_first"] == 0.0
    assert float(r.displacement().abs().max()) == 0.0


def test_the_crop_margin_covers_the_reach_of_the_lncc_force():
    """The force on the warped image at ``x`` comes from windows centred up to a kernel radius
    away, each seeing the fixed image another radius away: with a 9-voxel box it is non-zero 8
    voxels from the fixed image's foreground (the margin counted 5)."""
    from medreg.engine.driver import CROP_EXTRA_VOXELS, _crop_margin
    from medreg.losses import functional as L

    n, c = 41, 20
    fixed = torch.zeros(1, 1, n, n)
    fixed[0, 0, c, c] = 1.0  # a one-voxel foreground
    warped = torch.rand(1, 1, n, n, generator=torch.Generator().manual_seed(0)).requires_grad_()
    L.lncc(fixed, warped, window=9).backward()
    g = warped.grad[0, 0].abs()
    # (beyond the windows only the images' global standardisation couples voxels, ~1/N)
    reach = (g > 1e-4 * g.max()).nonzero().sub(c).abs().amax()
    assert int(reach) == 8
    stage = config_from_dict({"stages": [{"type": "greedy", "levels": [1], "gradient_sigma": 1.7,
                                          "similarity": {"name": "lncc", "window": 9}}]}).stages[0]
    assert stage.field_smoothing == 0
    assert _crop_margin(stage, Grid((n, n), (1.0, 1.0))) == 8 + 6 + CROP_EXTRA_VOXELS
