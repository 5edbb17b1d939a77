"""The training loop: ``train(cfg) -> TrainResult`` (``medreg train CONFIG.yaml``).

One optimiser step per global batch of ``train.batch_size`` pairs (split across ranks under
``torchrun``). Every ``val_every`` steps the validation pairs are scored: the loss, the Dice of
the moving labels warped by nearest neighbour (``val_dice``; ``val_dice_initial`` before
registration), the SD of log det J (``val_sdlogj``) and the folded-voxel percentage of the
predicted field in world mm on the network grid. The monitored metric
(``train.early_stopping``) picks ``best.pt``, drives the ``plateau`` schedule and stops training
early. ``out_dir`` receives::

    config.yaml     the resolved config        last.pt / best.pt   checkpoints
    train_log.csv   step, lr, loss, terms      val_log.csv         validation metrics
    metrics.json    final metrics              tensorboard/        (when enabled and installed)

Runs are reproducible on the CPU for a seed and thread count: the model is initialised from
``seed``, the pair order of epoch ``e`` is a permutation seeded with ``seed + e``, datasets
draw item ``i`` of epoch ``e`` from ``(seed, e, i)``, λ of conditional training from
``(seed, step)``; a resumed run restores the weights, the optimiser, the schedule and the
random states and continues within its epoch, so its losses match an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import yaml
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from medreg.core.errors import InputError, MedregError
from medreg.core.grid import Grid
from medreg.metrics import dice as dice_score
from medreg.metrics import folding, sdlogj
from medreg.nets.functional import warp_voxel
from medreg.train.batch import PairBatch, collate_pairs
from medreg.train.checkpoint import read_checkpoint, save_checkpoint
from medreg.train.config import TrainConfig
from medreg.train.distributed import (DistInfo, ResumableSampler, all_reduce_sums, barrier,
                                      cleanup, init_distributed, per_rank_batch)
from medreg.train.logging import CsvLog, Progress, TensorBoard
from medreg.train.losses import TrainingLoss, build_loss, displacement_mm
from medreg.train.schedules import schedule_from_config, warmup_factor

__all__ = ["TrainResult", "TrainingDiverged", "build_datasets", "prepare_out_dir", "train"]

#: Files a training run writes into ``out_dir`` (removed first with ``overwrite``).
OUTPUT_FILES = ("config.yaml", "last.pt", "best.pt", "train_log.csv", "val_log.csv",
                "metrics.json")

#: Optimiser registry.
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_VAL_SEED_OFFSET = 1_000_003


class TrainingDiverged(MedregError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        out_dir: the output folder.
        best_checkpoint: ``best.pt`` (best monitored validation metric), or None without
            validation.
        last_checkpoint: ``last.pt`` (the final state).
        step: optimiser steps done in total (a resumed run counts from its checkpoint).
        history: this run's training rows (every ``log_every`` steps: step, lr, loss, terms).
        val_history: this run's validation rows.
        metrics: the last validation metrics (empty without validation).
        stopped_early: early stopping ended the run.
    """

    out_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    val_history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


# ----------------------------------------------------------------------------- data
def _split_pairs(records: list, pairs: list[tuple[int, int]], fraction: float, seed: int,
                 atlas: int | None) -> tuple[list, list]:
    """Split index pairs by subject: a pair goes to validation when all its subjects other than
    the atlas are validation subjects, to training when all are training subjects (cross pairs
    are dropped)."""
    from medreg.train.data import split_by_subject

    others = [r for i, r in enumerate(records) if i != atlas]
    _, val_recs = split_by_subject(others, fraction, seed)
    val_subjects = {r.subject for r in val_recs}
    train_p, val_p = [], []
    for pair in pairs:
        sides = {records[i].subject in val_subjects for i in pair if i != atlas}
        if sides == {True}:
            val_p.append(pair)
        elif sides == {False}:
            train_p.append(pair)
    return train_p, val_p


def _pairs(cfg: TrainConfig, source: Any, records: list) -> list[tuple[int, int]]:
    from medreg.train.data import all_pairs, atlas_pairs, listed_pairs

    p = cfg.data.pairing
    if p.mode == "all":
        return all_pairs(len(records))
    if p.mode == "atlas":
        return atlas_pairs(len(records), p.index, p.direction)
    if p.pairs:
        return listed_pairs(records, [(str(a), str(b)) for a, b in p.pairs])
    if hasattr(source.spec, "listed_pairs"):
        return source.spec.listed_pairs(records)
    raise InputError("data: pairing mode listed needs 'pairs: [[fixed, moving], ...]'")


def build_datasets(cfg: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """The training and validation datasets of a config (validation None when there is none).

    Record sources give :class:`~medreg.train.data.PairDataset`\\ s (training augmented);
    without a ``val`` source the records are split by subject. A synthetic source validates on
    fresh pairs of its generator (another seed, ``train.val_pairs`` pairs, no augmentation).
    """
    from medreg.train.augment import Augment
    from medreg.train.data import PairDataset

    d = cfg.data
    prep = d.preprocess_config()
    aug_cfg = d.augment_config()
    augment = None if aug_cfg is None else Augment(aug_cfg)

    def from_records(source, augment_, seed, split: bool):
        records = source.spec.records()
        pairs = _pairs(cfg, source, records)
        val = None
        if split and d.val_fraction > 0:
            atlas = d.pairing.index if d.pairing.mode == "atlas" else None
            split_seed = cfg.seed if d.split_seed is None else d.split_seed
            pairs, val_pairs = _split_pairs(records, pairs, d.val_fraction, split_seed, atlas)
            if not val_pairs:
                raise InputError("data: the subject split left no validation pair; raise "
                                 "val_fraction or give a val source")
            val = PairDataset(records, val_pairs, prep, None, d.cache, seed)
        if not pairs:
            raise InputError("data: no training pair; check the source and the pairing")
        return PairDataset(records, pairs, prep, augment_, d.cache, seed), val

    src = d.train
    if src.synthetic:
        train_ds = src.spec.dataset(prep, augment, cfg.seed)
        val_ds = None
        if d.val is None:
            val_ds = src.spec.dataset(prep, None, cfg.seed + _VAL_SEED_OFFSET,
                                      length=cfg.train.val_pairs or 16)
    else:
        train_ds, val_ds = from_records(src, augment, cfg.seed, split=d.val is None)
    if d.val is not None:
        if d.val.synthetic:
            val_ds = d.val.spec.dataset(prep, None, cfg.seed + _VAL_SEED_OFFSET)
        else:
            val_ds, _ = from_records(d.val, None, cfg.seed, split=False)
    return train_ds, val_ds


# ----------------------------------------------------------------------------- bookkeeping
def prepare_out_dir(out_dir: str | Path, *, resume: bool, overwrite: bool,
                    create: bool = True) -> Path:
    """Check (and with ``create`` make) the output folder: it must be new or empty unless the
    run resumes or ``overwrite`` is set (then the previous run's files are removed)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another train.out_dir")
    if out.is_dir() and any(out.iterdir()) and not (resume or overwrite):
        raise InputError(f"{out}: the output folder is not empty; choose a new out_dir "
                         "(--out-dir), resume a run (--resume) or pass --overwrite")
    if create:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume:
            for name in OUTPUT_FILES:
                (out / name).unlink(missing_ok=True)
    return out


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2]},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    npst = state["numpy"]
    np.random.set_state(("MT19937", npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu().to(torch.uint8), device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"train: device {name} requested but CUDA is not available; "
                             "use device: cpu")
        if info.enabled:
            return torch.device("cuda", info.local_rank)
    return torch.device(name)


def _reg_weight(rng: list[float] | None, seed: int, step: int) -> float | None:
    """λ drawn log-uniformly from ``[lo, hi]``, reproducibly from ``(seed, step)``."""
    if rng is None:
        return None
    lo, hi = rng
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    u = float(torch.rand((), generator=g, dtype=torch.float64))
    return math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))


def _forward(model: torch.nn.Module, batch: PairBatch, lam: float | None):
    if lam is None:
        return model(batch.fixed, batch.moving)
    weight = torch.full((len(batch),), lam, dtype=batch.fixed.dtype, device=batch.fixed.device)
    return model(batch.fixed, batch.moving, reg_weight=weight)


# ----------------------------------------------------------------------------- validation
def _pair_dice(fixed: Tensor, warped: Tensor) -> float:
    """Mean Dice over the non-zero labels present in either map (NaN when there are none)."""
    f, w = fixed.cpu().numpy(), warped.cpu().numpy()
    labels = [v for v in np.union1d(np.unique(f), np.unique(w)) if v != 0]
    if not labels:
        return float("nan")
    return float(np.nanmean([dice_score(f == v, w == v) for v in labels]))


def _val_indices(n: int, limit: int | None) -> list[int]:
    """At most ``limit`` indices spread evenly over ``range(n)``."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, limit)})


@torch.no_grad()
def validate(model: torch.nn.Module, loss_fn: TrainingLoss, data: Dataset, *, info: DistInfo,
             device: torch.device, limit: int | None, lam: float | None,
             amp: torch.dtype | None = None, num_workers: int = 0) -> dict[str, float]:
    """Validation metrics averaged over (up to ``limit``) pairs, summed across ranks.

    Returns ``val_loss``, ``val_loss_<term>`` (unweighted terms), ``val_dice`` / ``val_dice_initial`` (pairs with
    labels), ``val_sdlogj`` and ``val_folding_percent`` of the field in world mm.
    """
    idx = _val_indices(len(data), limit)[info.rank::info.world_size]  # type: ignore[arg-type]
    loader = DataLoader(Subset(data, idx), batch_size=1, shuffle=False, collate_fn=collate_pairs,
                        num_workers=num_workers, worker_init_fn=_worker_init)
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {"n": 0.0, "loss": 0.0, "dice": 0.0, "dice_initial": 0.0,
                              "dice_n": 0.0, "sdlogj": 0.0, "sdlogj_n": 0.0, "folding": 0.0}
    term_names = sorted(loss_fn_terms(loss_fn))
    for name in term_names:
        sums[f"term_{name}"] = 0.0
        sums[f"termn_{name}"] = 0.0
    for batch in loader:
        batch = batch.to(device)
        ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
        with ctx:
            out = _forward(model, batch, lam)
        value = loss_fn(out, batch, lam)
        sums["n"] += 1
        sums["loss"] += float(value.total)
        for name, v in value.terms.items():
            if f"term_{name}" in sums:
                sums[f"term_{name}"] += float(v)
                sums[f"termn_{name}"] += 1
        disp = out.displacement.float()
        if batch.fixed_labels is not None and batch.moving_labels is not None:
            warped = warp_voxel(batch.moving_labels.float(), disp, mode="nearest").round().long()
            dv = _pair_dice(batch.fixed_labels, warped)
            d0 = _pair_dice(batch.fixed_labels, batch.moving_labels)
            if math.isfinite(dv) and math.isfinite(d0):
                sums["dice"] += dv
                sums["dice_initial"] += d0
                sums["dice_n"] += 1
        grid = batch.grids[0] if batch.grids and batch.grids[0] is not None \
            else Grid.from_shape(disp.shape[2:])
        u_mm = displacement_mm(disp, [grid]).double().cpu()
        s = sdlogj(u_mm, grid)
        if math.isfinite(s):
            sums["sdlogj"] += s
            sums["sdlogj_n"] += 1
        sums["folding"] += folding(u_mm, grid)["folding_percent"]
    model.train(was_training)
    tot = all_reduce_sums(sums, info, device if device.type == "cuda" else "cpu")
    n = max(tot["n"], 1.0)
    out_m = {"val_loss": tot["loss"] / n, "val_folding_percent": tot["folding"] / n,
             "val_pairs": tot["n"]}
    if tot["sdlogj_n"]:
        out_m["val_sdlogj"] = tot["sdlogj"] / tot["sdlogj_n"]
    if tot["dice_n"]:
        out_m["val_dice"] = tot["dice"] / tot["dice_n"]
        out_m["val_dice_initial"] = tot["dice_initial"] / tot["dice_n"]
    for name in term_names:
        if tot[f"termn_{name}"]:
            out_m[f"val_loss_{name}"] = tot[f"term_{name}"] / tot[f"termn_{name}"]
    return out_m


def loss_fn_terms(loss_fn: TrainingLoss) -> list[str]:
    """The full-resolution forward term labels a loss can report (for validation averages)."""
    names = list(loss_fn.regularisers.keys())
    if loss_fn.similarity is not None:
        names.append(loss_fn.similarity_label)
    names += [n for n, m in (("dice", loss_fn.dice), ("epe", loss_fn.epe), ("tre", loss_fn.tre))
              if m is not None]
    return names


# ----------------------------------------------------------------------------- training
def train(cfg: TrainConfig, *, train_data: Dataset | None = None, val_data: Dataset | None = None,
          quiet: bool = False, stream: TextIO | None = None, bar: bool | None = None
          ) -> TrainResult:
    """Train a registration network as ``cfg`` says (see the module docstring).

    Args:
        cfg: the training config.
        train_data, val_data: datasets of :class:`~medreg.train.batch.Pair` to use instead of
            the config's ``data`` sources (``val_data`` is only used together with
            ``train_data``).
        quiet: no progress output.
        stream: where progress goes (default stderr).
        bar: force the tqdm bar on/off (default: when ``stream`` is a terminal).

    Raises:
        InputError: a bad config (before any training step).
        TrainingDiverged: the loss became NaN or infinite.
    """
    t = cfg.train
    device_type = "cuda" if (t.device.startswith("cuda") or
                             (t.device == "auto" and torch.cuda.is_available())) else "cpu"
    owned = not torch.distributed.is_initialized()
    info = init_distributed(device_type)
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    try:
        return _train(cfg, info, train_data, val_data, quiet, stream, bar)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        if owned:
            cleanup(info)


def _train(cfg: TrainConfig, info: DistInfo, train_data: Dataset | None,
           val_data: Dataset | None, quiet: bool, stream: TextIO | None, bar: bool | None
           ) -> TrainResult:
    t = cfg.train
    main = info.is_main
    stream = stream or sys.stderr
    # ---- everything that can fail on input, before any step
    per_rank = per_rank_batch(t.batch_size, info.world_size)
    device = _device(t.device, info)
    if t.amp is not None and device.type != "cuda":
        raise InputError(f"train: amp {t.amp} needs a CUDA device (device is {device}); "
                         "set amp: null on the CPU")
    amp = _AMP_DTYPES[t.amp] if t.amp is not None else None
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    out_dir = prepare_out_dir(t.out_dir, resume=cfg.resume is not None, overwrite=t.overwrite,
                              create=False)
    _seed_everything(cfg.seed)
    model = cfg.model.build().to(device)
    if t.reg_weight_range is not None and not model.supports_regularisation:
        raise InputError(f"train: reg_weight_range needs a network that takes a regularisation "
                         f"weight; {cfg.model.name!r} does not (e.g. unet with conditional: true)")
    loss_fn = build_loss(cfg.loss).to(device)
    if train_data is None:
        train_data, val_data = build_datasets(cfg)
    preprocess = cfg.data.preprocess_config()
    optimizer = OPTIMIZERS[t.optimizer](model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    schedule = schedule_from_config(t.schedule, t.steps, t.warmup)
    es = t.early_stopping
    step, best, bad = 0, None, 0
    resume_state = None
    if cfg.initial_weights is not None:
        init_state, ipath = read_checkpoint(cfg.initial_weights, "cpu")
        try:
            model.load_state_dict(init_state["state_dict"])
        except (RuntimeError, KeyError) as exc:
            raise InputError(f"{ipath}: its weights do not fit the configured model "
                             f"({str(exc).splitlines()[0]}); initial_weights needs the same "
                             "network settings") from None
    if cfg.resume is not None:
        resume_state, rpath = read_checkpoint(cfg.resume, "cpu")
        try:
            model.load_state_dict(resume_state["state_dict"])
        except RuntimeError as exc:
            raise InputError(f"{rpath}: its weights do not fit the configured model "
                             f"({str(exc).splitlines()[0]})") from None
        if "optimizer" not in resume_state:
            raise InputError(f"{rpath}: has no optimiser state (not a training checkpoint); "
                             "resume from last.pt or best.pt of a run")
        optimizer.load_state_dict(resume_state["optimizer"])
        schedule.load_state_dict(resume_state.get("scheduler", {}))
        step = int(resume_state["step"])
        extra = resume_state.get("extra", {})
        best, bad = extra.get("best"), int(extra.get("bad", 0))
        if step >= t.steps:
            raise InputError(f"{rpath}: already trained for {step} steps; raise train.steps "
                             f"(--steps) above {step} to continue")
    sampler = ResumableSampler(train_data, info.world_size, info.rank, shuffle=True,  # type: ignore[arg-type]
                               seed=cfg.seed, batch_per_rank=per_rank)
    per_epoch = sampler.batches_per_epoch()
    if per_epoch < 1:
        raise InputError(f"data: {len(train_data)} training pairs are fewer than the global "  # type: ignore[arg-type]
                         f"batch of {t.batch_size}; lower train.batch_size")
    loader = DataLoader(train_data, batch_size=per_rank, sampler=sampler, drop_last=True,
                        collate_fn=collate_pairs, num_workers=t.num_workers,
                        worker_init_fn=_worker_init, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed))
    # ---- outputs (rank 0), after every rank has checked the folder
    barrier(info)
    if main:
        prepare_out_dir(out_dir, resume=cfg.resume is not None, overwrite=t.overwrite)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    barrier(info)
    keep = step if resume_state is not None else None
    train_log = CsvLog(out_dir / "train_log.csv", keep_until=keep) if main else None
    val_log = CsvLog(out_dir / "val_log.csv", keep_until=keep) if main else None
    tb = TensorBoard(out_dir / "tensorboard", t.tensorboard and main, stream)
    progress = Progress(t.steps, step, t.log_every, quiet=quiet or not main, stream=stream, bar=bar)
    if resume_state is not None and "rng" in resume_state:
        _set_rng_state(resume_state["rng"], device)
    net = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    lam_val = None if t.reg_weight_range is None else math.sqrt(t.reg_weight_range[0] *
                                                                t.reg_weight_range[1])
    train_cfg_dict = cfg.to_dict()
    history: list[dict[str, float]] = []
    val_history: list[dict[str, float]] = []
    metrics: dict[str, float] = {}
    stopped = False
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"

    def save(path: Path) -> None:
        save_checkpoint(path, model=model, preprocess=preprocess, train_config=train_cfg_dict,
                        step=step, optimizer=optimizer, scheduler=schedule,
                        rng=_rng_state(device), metrics=metrics,
                        extra={"best": best, "bad": bad, "world_size": info.world_size})

    t0 = time.perf_counter()
    net.train()
    epoch, skip = divmod(step, per_epoch)
    window: dict[str, float] = {}
    window_n = 0
    while step < t.steps and not stopped:
        sampler.set_position(epoch, skip)
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        for batch in loader:
            lr = t.lr * warmup_factor(step, t.warmup) * schedule.factor(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = batch.to(device)
            lam = _reg_weight(t.reg_weight_range, cfg.seed, step)
            ctx = torch.autocast(device.type, dtype=amp) if amp is not None else nullcontext()
            with ctx:
                out = _forward(net, batch, lam)
            value = loss_fn(out, batch, lam)
            if not torch.isfinite(value.total):
                raise TrainingDiverged(f"training diverged at step {step + 1} (loss "
                                       f"{float(value.total)}); lower train.lr or enable "
                                       "clip_grad_norm")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(value.total).backward()
                scaler.unscale_(optimizer)
            else:
                value.total.backward()
            if t.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            window["loss"] = window.get("loss", 0.0) + float(value.total.detach())
            for k, v in value.terms.items():
                window[k] = window.get(k, 0.0) + float(v)
            window_n += 1
            if step % t.log_every == 0 or step == t.steps:
                avg = all_reduce_sums({k: v / window_n for k, v in window.items()}, info)
                row = {"step": step, "epoch": epoch, "lr": lr,
                       **{k: v / info.world_size for k, v in avg.items()},
                       "seconds": time.perf_counter() - t0}
                if lam is not None:
                    row["reg_weight"] = lam
                history.append(row)
                if main:
                    train_log.write(row)  # type: ignore[union-attr]
                    tb.scalars({k: v for k, v in row.items() if k not in ("step", "epoch")},
                               step, "train/")
                window, window_n = {}, 0
            progress.update(step, float(value.total.detach()))
            if val_data is not None and (step % t.val_every == 0 or step == t.steps):
                # the bare model: ranks may score different numbers of pairs, and DDP's
                # forward would start collectives
                metrics = validate(model, loss_fn, val_data, info=info, device=device,
                                   limit=t.val_pairs, lam=lam_val, amp=amp,
                                   num_workers=t.num_workers)
                if es.metric not in metrics:
                    raise InputError(f"train: early_stopping metric {es.metric!r} is not "
                                     f"measured; available: {', '.join(sorted(metrics))}")
                value_m = metrics[es.metric]
                improved = es.improved(value_m, best)
                schedule.observe(value_m, improved)
                if improved:
                    best, bad = value_m, 0
                    if main:
                        save(best_path)
                else:
                    bad += 1
                    stopped = es.patience > 0 and bad >= es.patience
                vrow = {"step": step, **metrics, "best": best}
                val_history.append(vrow)
                if main:
                    val_log.write(vrow)  # type: ignore[union-attr]
                    tb.scalars(metrics, step, "val/")
                    progress.message(f"step {step}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in metrics.items() if k != "val_pairs"))
            if main and (step % t.checkpoint_every == 0 or step == t.steps or stopped):
                save(last_path)
            if step >= t.steps or stopped:
                break
        epoch, skip = epoch + 1, 0
    progress.close()
    tb.close()
    if main:
        summary = {"step": step, "stopped_early": stopped, "best": best,
                   "monitor": es.metric, "metrics": metrics,
                   "seconds": time.perf_counter() - t0, "world_size": info.world_size}
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    barrier(info)
    return TrainResult(out_dir=out_dir, best_checkpoint=best_path if best is not None else None,
                       last_checkpoint=last_path, step=step, history=history,
                       val_history=val_history, metrics=metrics, stopped_early=stopped)
