"""Training loop: learning in three modes, config validation, example configs and the CLI."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from medreg.core import Grid, Image
from medreg.core.errors import InputError
from medreg.io import read_image, write_image
from medreg.train.config import config_from_dict, load_train_config
from medreg.train.distributed import DistInfo, per_rank_batch
from medreg.train.losses import build_loss
from medreg.train.loop import build_datasets, train

REPO = Path(__file__).resolve().parents[1]
COLIN = REPO / "src" / "medreg" / "data" / "colin27_t1_2mm.nii.gz"


def write_slice(folder: Path) -> tuple[Path, Path]:
    """An axial slice of the bundled Colin27 T1 (2 mm) and a 4-class label map of it
    (background and intensity tertiles of the head), as 2D NIfTI files."""
    im = read_image(COLIN)
    s = im.data[:, 45].float()
    grid = Grid(im.grid.size[:2], im.grid.spacing[:2])
    fg = s[s > 0]
    q = torch.quantile(fg, torch.tensor([1 / 3, 2 / 3]))
    lab = torch.zeros_like(s, dtype=torch.int16)
    lab[s > 0] = (1 + (s[s > 0] > q[0]).short() + (s[s > 0] > q[1]).short())
    img_path, lab_path = folder / "slice.nii.gz", folder / "slice_labels.nii.gz"
    write_image(Image(s, grid, "slice"), img_path)
    write_image(Image(lab, grid, "labels"), lab_path)
    return img_path, lab_path


@pytest.fixture(scope="module")
def slice_files(tmp_path_factory) -> tuple[Path, Path]:
    return write_slice(tmp_path_factory.mktemp("slice"))


def base_config(files: tuple[Path, Path], out_dir: Path, **train) -> dict:
    """A tiny 2D config: synthetic deformations of the slice on a 48×48 grid."""
    img, lab = files
    return {
        "seed": 0,
        "model": {"name": "unet", "ndim": 2, "features": [8, 16, 16],
                  "decoder_features": [16, 16, 8]},
        "data": {
            "train": {"synthetic": {
                "images": [str(img)], "labels": [str(lab)], "kind": "deformed", "length": 64,
                "synth": {"magnitude_mm": 8.0, "smoothness_mm": 15.0, "bias_strength": 0.0,
                          "gamma_std": 0.0, "noise_std": 0.0}}},
            "preprocess": {"size": [48, 48]},
        },
        "loss": {"similarity": {"name": "lncc", "window": 5}, "regularisation": {"diffusion": 0.1}},
        "train": {"steps": 150, "batch_size": 4, "lr": 3e-3, "val_every": 150, "val_pairs": 8,
                  "log_every": 25, "out_dir": str(out_dir), **train},
    }


MODES = {
    "unsupervised": {"similarity": {"name": "lncc", "window": 5},
                     "regularisation": {"diffusion": 0.1}},
    "weakly_supervised": {"similarity": None, "regularisation": {"diffusion": 0.1}, "dice": 1.0},
    "supervised": {"similarity": None, "regularisation": {"diffusion": 0.01}, "supervised": 1.0},
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_training_lowers_loss_and_improves_dice(mode, slice_files, tmp_path):
    data = base_config(slice_files, tmp_path / "run")
    data["loss"] = MODES[mode]
    result = train(config_from_dict(data), quiet=True)
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert last < first - 0.05 * abs(first), (first, last)
    m = result.metrics  # unseen pairs: the validation generator has another seed
    assert m["val_pairs"] == 8
    assert m["val_dice"] > m["val_dice_initial"] + 0.05, m
    assert m["val_folding_percent"] < 1.0
    assert result.step == 150 and result.best_checkpoint.is_file()
    assert (tmp_path / "run" / "train_log.csv").is_file()


def test_conditional_training_samples_reg_weight(slice_files, tmp_path):
    data = base_config(slice_files, tmp_path / "run", steps=4, val_every=4, log_every=1,
                       reg_weight_range=[0.01, 1.0])
    data["model"]["conditional"] = True
    result = train(config_from_dict(data), quiet=True)
    lams = [row["reg_weight"] for row in result.history]
    assert all(0.01 <= v <= 1.0 for v in lams) and len(set(lams)) == 4
    data["model"]["conditional"] = False
    data["train"]["out_dir"] = str(tmp_path / "run2")
    with pytest.raises(InputError, match="reg_weight_range"):
        train(config_from_dict(data), quiet=True)


# ----------------------------------------------------------------------------- config errors
def test_unknown_keys_are_named_with_the_valid_ones(slice_files, tmp_path):
    data = base_config(slice_files, tmp_path / "run")
    bad = copy.deepcopy(data)
    bad["trian"] = {}
    with pytest.raises(InputError, match=r"unknown key\(s\) trian; valid keys: data, initial_weights, loss"):
        config_from_dict(bad)
    bad = copy.deepcopy(data)
    bad["train"]["stepz"] = 3
    with pytest.raises(InputError, match=r"train: unknown key\(s\) stepz; valid keys: .*steps"):
        config_from_dict(bad)
    bad = copy.deepcopy(data)
    bad["data"]["train"]["synthetic"]["synth"]["magnitude"] = 3
    with pytest.raises(InputError, match="magnitude"):
        config_from_dict(bad)
    bad = copy.deepcopy(data)
    bad["loss"]["regularisation"] = {"diffusoin": 1.0}
    with pytest.raises(InputError, match="unknown loss 'diffusoin'"):
        config_from_dict(bad)
    bad = copy.deepcopy(data)
    bad["train"]["schedule"] = {"name": "cosine", "gamma": 0.5}
    with pytest.raises(InputError, match="schedule cosine has no option"):
        config_from_dict(bad)


def test_missing_files_fail_when_the_config_is_read(slice_files, tmp_path):
    data = base_config(slice_files, tmp_path / "run")
    data["data"]["train"]["synthetic"]["images"] = [str(tmp_path / "nope.nii.gz")]
    with pytest.raises(InputError, match="nope.nii.gz not found"):
        config_from_dict(data)
    data["data"]["train"] = {"folder": {"pattern": str(tmp_path / "*.mha")}}
    with pytest.raises(InputError, match=r"no file matches"):
        config_from_dict(data)
    cfg_file = tmp_path / "c.yaml"
    data = base_config(slice_files, tmp_path / "run")
    data["resume"] = "missing.pt"
    cfg_file.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError, match="missing.pt not found"):
        load_train_config(cfg_file)


def test_batch_not_divisible_by_world_size_fails_before_training(slice_files, tmp_path,
                                                                 monkeypatch):
    with pytest.raises(InputError, match="not divisible by the 2 distributed processes"):
        per_rank_batch(3, 2)
    assert per_rank_batch(4, 2) == 2
    import medreg.train.loop as loop

    monkeypatch.setattr(loop, "init_distributed", lambda device_type: DistInfo(0, 2, 0, False))
    data = base_config(slice_files, tmp_path / "run", batch_size=3)
    with pytest.raises(InputError, match="batch_size 3 is not divisible"):
        train(config_from_dict(data), quiet=True)
    assert not (tmp_path / "run").exists()


def test_amp_on_cpu_is_refused(slice_files, tmp_path):
    data = base_config(slice_files, tmp_path / "run", amp="bf16", device="cpu")
    with pytest.raises(InputError, match="amp bf16 needs a CUDA device"):
        train(config_from_dict(data), quiet=True)


# ----------------------------------------------------------------------------- example configs
@pytest.mark.data
@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_build(path, shared_data):
    cfg = load_train_config(path)
    net = cfg.model.build()
    assert net.ndim == len(cfg.data.preprocess["size"])
    build_loss(cfg.loss)
    train_ds, val_ds = build_datasets(cfg)
    assert len(train_ds) > 0 and val_ds is not None and len(val_ds) > 0
    assert cfg.train.batch_size <= len(train_ds)


# ----------------------------------------------------------------------------- command line
def test_cli_train_end_to_end(slice_files, tmp_path):
    from medreg.cli import main

    data = base_config(slice_files, tmp_path / "ignored", val_every=3, checkpoint_every=2,
                       log_every=1)
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "cli_run"
    runner = CliRunner()
    res = runner.invoke(main, ["train", str(cfg_file), "--out-dir", str(out), "--steps", "4",
                               "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "4 steps" in res.output
    for name in ("last.pt", "best.pt", "config.yaml", "metrics.json", "train_log.csv",
                 "val_log.csv"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows)  # not NaN
    # a second run into the same folder is refused, in one line, before training
    res = runner.invoke(main, ["train", str(cfg_file), "--out-dir", str(out), "--steps", "4"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "not empty" in res.output
    # unless --overwrite
    res = runner.invoke(main, ["train", str(cfg_file), "--out-dir", str(out), "--steps", "2",
                               "--overwrite", "--quiet"])
    assert res.exit_code == 0, res.output
    assert len(list(csv.DictReader((out / "train_log.csv").open()))) == 2


def test_cli_config_error_is_one_line(slice_files, tmp_path):
    from medreg.cli import main

    data = base_config(slice_files, tmp_path / "run")
    data["model"]["widths"] = [8]
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["train", str(cfg_file)])
    assert res.exit_code == 2
    assert res.output.startswith("medreg train: error: model: network 'unet' has no option(s) widths")
    assert res.output.strip().count("\n") == 0
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the loss
def test_loss_terms_are_in_mm_and_cover_levels_and_both_directions():
    from medreg.nets.base import NetOutput
    from medreg.train.batch import Pair, collate_pairs
    from medreg.train.config import LossConfig

    grid = Grid((20, 16), (2.0, 0.5))
    pf = torch.tensor([[3.0, 4.0], [10.0, 8.0]])
    pm = pf + torch.tensor([[1.0, 2.0], [0.0, -4.0]])  # voxel offsets: (2, 1) mm and (0, 2) mm
    pair = Pair(fixed=torch.rand(1, 16, 20), moving=torch.rand(1, 16, 20), fixed_points=pf,
                moving_points=pm, displacement=torch.zeros(2, 16, 20), grid=grid)
    batch = collate_pairs([pair, pair])
    zero = torch.zeros(2, 2, 16, 20)
    loss = build_loss(LossConfig(similarity=None, regularisation={}, landmarks=1.0, supervised=1.0))
    value = loss(NetOutput(displacement=zero), batch)
    assert float(value.terms["tre"]) == pytest.approx((5 ** 0.5 + 2.0) / 2)  # mm, not voxels
    assert float(value.terms["epe"]) == 0.0
    # a 1-voxel shift along x is 2 mm of end-point error on this grid
    shift = zero.clone()
    shift[:, 0] = 1.0
    assert float(loss(NetOutput(displacement=shift), batch).terms["epe"]) == pytest.approx(2.0)
    # coarser levels and the inverse direction add their own terms
    level = NetOutput(displacement=torch.zeros(2, 2, 8, 10), inverse=torch.zeros(2, 2, 8, 10),
                      extras={"scale": 2})
    out = NetOutput(displacement=zero, inverse=zero, levels=[level],
                    penalty=torch.tensor(0.25))
    both = build_loss(LossConfig(regularisation={"diffusion": 1.0}, bidirectional=True,
                                 level_weights=[0.5]))
    v = both(out, batch)
    assert {"lncc", "diffusion", "level0_lncc", "inv_lncc", "inv_level0_lncc",
            "penalty"} <= set(v.terms)
    fwd = float(v.terms["lncc"]) + 0.5 * float(v.terms["level0_lncc"])
    inv = float(v.terms["inv_lncc"]) + 0.5 * float(v.terms["inv_level0_lncc"])
    assert float(v.total) == pytest.approx(0.5 * (fwd + inv) + 0.25, rel=1e-5)
    with pytest.raises(InputError, match="bidirectional needs a network"):
        both(NetOutput(displacement=zero), batch)


def test_progress_bar_and_missing_tensorboard_notice(slice_files, tmp_path):
    import io

    stream = io.StringIO()
    data = base_config(slice_files, tmp_path / "run", steps=3, val_every=3, tensorboard=True)
    train(config_from_dict(data), stream=stream, bar=True)
    text = stream.getvalue()
    assert "loss" in text and "3/3" in text
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert "tensorboard is not installed" in text
