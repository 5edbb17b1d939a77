"""Distributed training: 2 CPU processes (gloo, torchrun) match one process with the same
global batch."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medreg.core import Grid, Image
from medreg.io import read_image, write_image
from medreg.train.config import load_train_config
from medreg.train.distributed import ResumableSampler
from medreg.train.loop import train

REPO = Path(__file__).resolve().parents[1]
COLIN = REPO / "src" / "medreg" / "data" / "colin27_t1_2mm.nii.gz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sampler_gives_each_global_batch_the_same_pairs_for_any_world_size():
    data = list(range(20))
    single = ResumableSampler(data, 1, 0, seed=5, batch_per_rank=4)
    single.set_position(2)
    ranks = [ResumableSampler(data, 2, r, seed=5, batch_per_rank=2) for r in range(2)]
    for s in ranks:
        s.set_position(2)
    one = list(single)
    two = [list(s) for s in ranks]
    assert len(one) == 20 and sorted(one) == data
    for k in range(5):  # global batch k
        assert sorted(one[4 * k:4 * k + 4]) == sorted(two[0][2 * k:2 * k + 2] + two[1][2 * k:2 * k + 2])
    single.set_position(2, skip_batches=3)  # resumed part-way into epoch 2
    assert list(single) == one[12:] and len(single) == 8


def test_two_process_gloo_run_matches_one_process(tmp_path):
    im = read_image(COLIN)
    img = tmp_path / "slice.nii.gz"
    write_image(Image(im.data[:, 45].float(), Grid(im.grid.size[:2], im.grid.spacing[:2])), img)
    cfg = {
        "seed": 1,
        "model": {"name": "unet", "ndim": 2, "features": [4, 8], "decoder_features": [8, 4]},
        "data": {"train": {"synthetic": {"images": [str(img)], "length": 16,
                                         "synth": {"magnitude_mm": 6.0}}},
                 "preprocess": {"size": [32, 32]}},
        "loss": {"similarity": {"name": "lncc", "window": 5}, "regularisation": {"diffusion": 0.1}},
        "train": {"steps": 6, "batch_size": 4, "lr": 3e-3, "val_every": 3, "val_pairs": 4,
                  "log_every": 1, "out_dir": str(tmp_path / "ddp"), "device": "cpu"},
    }
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--node_rank=0",
           "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           "-m", "medreg", "train", str(cfg_file), "--threads", "1", "--quiet"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ddp"
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 6
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()

    single_cfg = load_train_config(cfg_file)
    single_cfg.train.out_dir = str(tmp_path / "single")
    torch.set_num_threads(1)
    single = train(single_cfg, quiet=True)
    ddp_loss = [float(r["loss"]) for r in rows]
    one_loss = [r["loss"] for r in single.history]
    assert ddp_loss == pytest.approx(one_loss, rel=2e-3, abs=1e-4)
    assert summary["metrics"]["val_loss"] == pytest.approx(single.metrics["val_loss"], rel=2e-3)
    assert summary["metrics"]["val_pairs"] == single.metrics["val_pairs"] == 4
