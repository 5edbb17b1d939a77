"""The Python API given what a script or notebook plausibly passes by mistake: one clear
InputError saying what to give instead, never a traceback from inside pathlib, torch or numpy
(from an audit of the API)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medreg
from medreg.core import Grid, Image, InputError
from medreg.metrics import label_metrics
from medreg.transforms import warp_image


@pytest.fixture
def blob() -> Image:
    g = Grid((20, 18), (1.0, 1.0))
    yy, xx = torch.meshgrid(torch.arange(18.0), torch.arange(20.0), indexing="ij")
    return Image(torch.exp(-((yy - 9) ** 2 + (xx - 10) ** 2) / 20)[None], g, "blob")


def test_register_and_predict_arguments(blob, tmp_path):
    with pytest.raises(InputError, match="expected a path or a medreg Image, got ndarray.*wrap it"):
        medreg.register(blob.data[0].numpy(), blob)
    with pytest.raises(InputError, match="fixed mask: expected a path or a medreg Image, got Tensor"):
        medreg.register(blob, blob, fixed_mask=torch.ones(18, 20))
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        medreg.register(blob, blob, device="gpu")
    with pytest.raises(InputError, match="a list of stages goes under the key 'stages'"):
        medreg.register(blob, blob, config=[{"type": "affine"}])
    with pytest.raises(InputError, match=r"instance steps \(--instance-steps\) must be a whole number"):
        medreg.predict("brain2d", blob, blob, instance_steps="5")
    with pytest.raises(InputError, match="window must be a number or one number per axis, got '9'"):
        medreg.register(blob, blob, config={"stages": [{"type": "greedy", "levels": [1], "iterations": 1,
                                                        "similarity": {"name": "lncc", "window": "9"}}]})


def test_label_metrics_arguments(blob):
    labels = Image((blob.data > 0.5).to(torch.int32) + (blob.data > 0.9).to(torch.int32), blob.grid, "lab")
    assert label_metrics(labels, labels, 1).mean_dice == 1.0  # one id, not a list
    assert label_metrics(labels, labels, np.array([1, 2])).mean_dice == 1.0
    for bad in ([1.5], "12"):
        with pytest.raises(InputError, match="labels must be whole label ids"):
            label_metrics(labels, labels, bad)
    with pytest.raises(InputError, match="expected medreg Images .* got Tensor"):
        label_metrics(labels.data, labels)


def test_training_config_errors_name_the_file(tmp_path):
    from medreg.train.config import load_train_config

    path = tmp_path / "train.yaml"
    path.write_text("model: {name: unet, ndim: 2}\ndata: {train: {synthetic: {kind: labels, shape: [32, 32], "
                    "length: 4}}}\ntrain: {steps: 0}\n")
    with pytest.raises(InputError, match=f"^{path}: train: steps must be > 0"):
        load_train_config(path)


def test_a_levels_override_says_which_per_level_setting_to_give_too():
    from medreg.engine import load_preset, merge_overrides

    with pytest.raises(InputError, match=r"iterations .* got \[50, 45\]; a levels override keeps"):
        merge_overrides(load_preset("fast"), levels=[4, 2, 1])
    cfg = merge_overrides(load_preset("fast"), levels=[4, 2, 1], iterations=5, stage2_log_jacobian=0.1)
    assert cfg.stages[1].levels == [4, 2, 1] and cfg.stages[1].iterations == [5, 5, 5]


def test_write_transform_of_a_matrix_says_how_to_make_a_transform(tmp_path):
    from medreg.io import write_transform

    with pytest.raises(InputError, match=r"takes a medreg transform, got ndarray; .*from_matrix"):
        write_transform(np.eye(4), tmp_path / "t.tfm")
    assert not (tmp_path / "t.tfm").exists()


def test_a_registration_returns_a_fixed_transform(blob):
    """Using the result builds no autograd graph (it kept the optimiser's trainable parameters,
    so every warp of a script held the graph of its coordinates in memory)."""
    moved = Image(torch.roll(blob.data, 2, dims=-1), blob.grid, "moved")
    r = medreg.register(blob, moved, config={"stages": [
        {"type": "affine", "levels": [1], "iterations": 5},
        {"type": "greedy", "levels": [1], "iterations": 3}]}, quiet=True)
    assert [p for p in r.transform.parameters() if p.requires_grad] == []
    field = r.transform.displacement(blob.grid)
    assert not field.requires_grad
    assert not warp_image(moved, r.transform, blob).data.requires_grad
