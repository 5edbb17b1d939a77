"""Checkpoints: plain-type storage, bit-identical reload, bundled names, resume continuity."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from medreg.core import Grid, Image
from medreg.core.errors import InputError
from medreg.io import read_image, write_image
from medreg.nets import create
from medreg.train.checkpoint import bundled_models, load_checkpoint, save_checkpoint
from medreg.train.config import config_from_dict
from medreg.train.loop import train
from medreg.train.preprocess import PreprocessConfig

COLIN = Path(__file__).resolve().parents[1] / "src" / "medreg" / "data" / "colin27_t1_2mm.nii.gz"


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory) -> Path:
    """An axial slice of the bundled Colin27 T1 as a 2D NIfTI file."""
    im = read_image(COLIN)
    path = tmp_path_factory.mktemp("slice") / "slice.nii.gz"
    write_image(Image(im.data[:, 45].float(), Grid(im.grid.size[:2], im.grid.spacing[:2])), path)
    return path


def tiny(slice_file: Path, out_dir: Path, **train_kw) -> dict:
    return {
        "seed": 3,
        "model": {"name": "unet", "ndim": 2, "features": [4, 8], "decoder_features": [8, 4],
                  "integrate_steps": 4},
        "data": {"train": {"synthetic": {"images": [str(slice_file)], "length": 12,
                                         "synth": {"magnitude_mm": 6.0}}},
                 "preprocess": {"size": [32, 32]}},
        "loss": {"similarity": {"name": "mse"}, "regularisation": {"diffusion": 0.05},
                 "bidirectional": True},
        "train": {"steps": 10, "batch_size": 2, "lr": 2e-3, "val_every": 4, "val_pairs": 2,
                  "log_every": 1, "checkpoint_every": 100, "out_dir": str(out_dir),
                  "schedule": {"name": "step", "step_size": 4, "gamma": 0.5}, "warmup": 2,
                  **train_kw},
    }


def test_save_load_gives_bit_identical_predictions(tmp_path):
    torch.manual_seed(0)
    net = create("unet", ndim=2, features=[4, 8], decoder_features=[8, 4], integrate_steps=3)
    for p in net.parameters():  # non-trivial weights
        p.data.add_(0.05 * torch.randn_like(p))
    prep = PreprocessConfig(size=(32, 32), normalise="minmax")
    path = save_checkpoint(tmp_path / "m.pt", model=net, preprocess=prep,
                           train_config={"seed": 1, "note": ("a", 2)}, step=7,
                           metrics={"val_dice": 0.5})
    raw = torch.load(path, weights_only=True)  # plain types and tensors only
    assert raw["step"] == 7 and raw["model"]["name"] == "unet" and raw["train_config"]["note"] == ["a", 2]
    loaded = load_checkpoint(path)
    assert not loaded.net.training and loaded.step == 7 and loaded.metrics == {"val_dice": 0.5}
    assert loaded.preprocess == prep and loaded.path == path
    x = torch.rand(2, 1, 32, 32)
    y = torch.rand(2, 1, 32, 32)
    net.eval()
    with torch.no_grad():
        a, b = net(x, y), loaded.net(x, y)
    assert torch.equal(a.displacement, b.displacement) and torch.equal(a.inverse, b.inverse)
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_bundled_model_names_and_unknown_names(tmp_path):
    names = bundled_models()
    assert names == sorted(names)
    with pytest.raises(InputError, match="unknown model 'no_such_model'; bundled models:"):
        load_checkpoint("no_such_model")
    with pytest.raises(InputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(InputError, match="not a medreg checkpoint"):
        load_checkpoint(bad)
    # an image (or any non-pickle) given as the model: our message, not torch's unsafe advice
    image = tmp_path / "fixed.nii.gz"
    image.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(200)))
    with pytest.raises(InputError, match="not a medreg checkpoint; give a .pt file") as err:
        load_checkpoint(image)
    assert "weights_only" not in str(err.value)


def test_a_checkpoint_that_fails_to_load_for_another_reason_says_why(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise RuntimeError("Attempting to deserialize object on a CUDA device but "
                           "torch.cuda.is_available() is False.")

    monkeypatch.setattr(torch, "load", no_cuda)
    with pytest.raises(InputError, match="cannot load the checkpoint .*CUDA device"):
        load_checkpoint("hippocampus")


def test_resume_continues_the_step_count_and_the_loss_trajectory(slice_file, tmp_path):
    full = train(config_from_dict(tiny(slice_file, tmp_path / "full")), quiet=True)
    assert full.step == 10 and [r["step"] for r in full.history] == list(range(1, 11))

    part_dir = tmp_path / "part"
    first = train(config_from_dict(tiny(slice_file, part_dir, steps=6)), quiet=True)
    assert first.step == 6
    # a non-empty out_dir is refused without resume/overwrite
    with pytest.raises(InputError, match="not empty"):
        train(config_from_dict(tiny(slice_file, part_dir)), quiet=True)
    cfg = tiny(slice_file, part_dir)
    cfg["resume"] = str(part_dir / "last.pt")
    second = train(config_from_dict(cfg), quiet=True)
    assert second.step == 10
    assert [r["step"] for r in second.history] == [7, 8, 9, 10]
    expected = {r["step"]: r for r in full.history}
    for row in second.history:
        ref = expected[row["step"]]
        assert row["lr"] == pytest.approx(ref["lr"], rel=1e-12)
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), row["step"]
    assert second.metrics["val_loss"] == pytest.approx(full.metrics["val_loss"], rel=1e-5)
    # the CSV log holds steps 1..10 once each
    rows = list(csv.DictReader((part_dir / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    # resuming a finished run asks for more steps
    cfg["resume"] = str(part_dir / "last.pt")
    with pytest.raises(InputError, match="already trained for 10 steps"):
        train(config_from_dict(cfg), quiet=True)


def test_initial_weights_start_a_fresh_run_from_trained_weights(slice_file, tmp_path):
    """Fine-tuning: the new run starts at step 0 from the given weights (its first loss is the
    trained model's, well below a fresh model's), with its own optimiser and schedule."""
    base = train(config_from_dict(tiny(slice_file, tmp_path / "base", steps=10)), quiet=True)
    fresh = train(config_from_dict(tiny(slice_file, tmp_path / "fresh", steps=1, lr=1e-12)), quiet=True)
    cfg = tiny(slice_file, tmp_path / "tuned", steps=1, lr=1e-12, warmup=0)
    cfg["initial_weights"] = str(tmp_path / "base" / "last.pt")
    tuned = train(config_from_dict(cfg), quiet=True)
    assert tuned.step == 1 and [r["step"] for r in tuned.history] == [1]
    trained = torch.load(tmp_path / "base" / "last.pt", weights_only=True)["state_dict"]
    after = torch.load(tmp_path / "tuned" / "last.pt", weights_only=True)["state_dict"]
    for k, v in trained.items():  # a step of lr 1e-12 leaves the initial weights (to 1e-9)
        torch.testing.assert_close(after[k], v, rtol=0, atol=1e-9)
    assert tuned.history[0]["loss"] < fresh.history[0]["loss"]
    assert base.step == 10
    # a bundled model's name is accepted; a model that does not fit and resume + initial are errors
    cfg["initial_weights"] = "brain2d"
    cfg["train"]["out_dir"] = str(tmp_path / "other")
    with pytest.raises(InputError, match="do not fit the configured model"):
        train(config_from_dict(cfg), quiet=True)
    cfg["resume"] = str(tmp_path / "base" / "last.pt")
    with pytest.raises(InputError, match="not both"):
        config_from_dict(cfg)
