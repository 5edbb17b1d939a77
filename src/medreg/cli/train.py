"""``medreg train CONFIG.yaml``: train a registration network (also under ``torchrun``)."""

from __future__ import annotations

import sys

import click

from medreg.cli import main


@main.command("train")
@click.argument("config", type=click.Path())
@click.option("--out-dir", type=click.Path(), default=None, help="Output folder (replaces train.out_dir).")
@click.option("--resume", type=click.Path(), default=None, help="Checkpoint (last.pt) to continue from.")
@click.option("--steps", type=int, default=None, help="Total optimiser steps (replaces train.steps).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:K (replaces train.device).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (torch.set_num_threads; at least 1).")
@click.option("--seed", type=int, default=None, help="Random seed (replaces seed).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--overwrite", is_flag=True, help="Replace the outputs of an earlier run in the output folder.")
def train_cmd(config, out_dir, resume, steps, device, threads, seed, quiet, overwrite):
    """Train the network described by CONFIG (YAML; see configs/ for one per mode).

    Writes config.yaml, last.pt and best.pt (checkpoints), train_log.csv, val_log.csv and
    metrics.json into the output folder. For several processes:
    torchrun --nproc_per_node=N -m medreg train CONFIG.yaml (only rank 0 writes)."""
    from medreg.train.config import apply_overrides, load_train_config
    from medreg.train.loop import train

    cfg = load_train_config(config)
    cfg = apply_overrides(cfg, out_dir=out_dir, resume=resume, steps=steps, device=device,
                          threads=threads, seed=seed, overwrite=True if overwrite else None)
    result = train(cfg, quiet=quiet, stream=sys.stderr)
    if quiet or not _is_rank0():
        return
    m = result.metrics
    parts = [f"{result.step} steps"] + [f"{k} {m[k]:.4g}" for k in
                                        ("val_loss", "val_dice", "val_dice_initial", "val_sdlogj")
                                        if k in m]
    if result.stopped_early:
        parts.append("stopped early")
    click.echo(", ".join(parts))
    best = f", best: {result.best_checkpoint.name}" if result.best_checkpoint else ""
    click.echo(f"outputs in {result.out_dir}/: {result.last_checkpoint.name}{best}, "
               "train_log.csv" + (", val_log.csv" if result.val_history else ""))


def _is_rank0() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"
