"""Training configuration: typed dataclasses read from a YAML file (``medreg train CONFIG.yaml``).

A config has six top-level keys::

    seed: 0
    model: {name: unet, ndim: 2, features: [8, 16, 16], integrate_steps: 7}   # nets.create
    data:
      train: {folder: {pattern: "images/*.nii.gz", labels: "labels/*.nii.gz"}}
      # or {csv: {path}} | {l2r: {path, split}} |
      #    {synthetic: {images: [...], labels: [...], kind: deformed|labels, length, synth: {...}}}
      val: null                  # another source; default: split `train` by subject
      val_fraction: 0.2
      pairing: {mode: all}       # all | atlas {index, direction} | listed {pairs}
      preprocess: {size: [48, 64, 48]}
      augment: null
    loss:
      similarity: {name: lncc, weight: 1, window: 9}
      regularisation: {diffusion: 1.0}     # name: weight  or  name: {weight, **params}
      dice: 0.0                  # soft Dice on warped one-hot labels (weak supervision)
      supervised: 0.0            # end-point error against the ground-truth field
      landmarks: 0.0             # TRE of the landmark pairs
      bidirectional: false
      level_weights: 1.0
    train: {steps: 1000, batch_size: 1, lr: 1.0e-4, out_dir: runs/example, ...}
    resume: null                 # a run's last.pt/best.pt: continue it (weights, optimiser, step)
    initial_weights: null        # a checkpoint or bundled model: start from its weights (fine-tuning)

Relative paths are resolved against the folder of the config file. Unknown keys are errors that
list the valid keys; missing input files are errors when the config is read, before training.
Units: regularisers see displacements in world mm on the network grid (see
:mod:`medreg.train.losses`).
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from medreg.core.errors import InputError

OPTIMIZERS = ("adam", "adamw")
AMP_MODES = ("bf16", "fp16")
SYNTH_KINDS = ("deformed", "labels")
PAIRING_MODES = ("all", "atlas", "listed")
METRIC_MODES = ("min", "max")


# ----------------------------------------------------------------------------- helpers
def _strict(cls, data: Any, where: str, **extra: Any):
    """``cls(**data)`` after checking that every key of ``data`` is a field of ``cls``."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: "
                         f"{', '.join(sorted(names))}")
    try:
        return cls(**data, **extra)
    except TypeError as exc:  # a required key is missing
        raise InputError(f"{where}: {str(exc).split(') ', 1)[-1]}") from None
    except InputError as exc:  # a section's own check names the section: add the file
        msg, file = str(exc), where.split(": ", 1)[0]
        if msg.startswith(file):
            raise
        raise InputError(f"{file}: {msg}") from None


def _has_magic(path: str) -> bool:
    return glob.has_magic(path)


def _resolve(path: str | None, base: Path | None) -> str | None:
    """``path`` with ``~`` and ``$VARS`` expanded, made absolute against ``base``."""
    if path is None:
        return None
    p = os.path.expanduser(os.path.expandvars(str(path)))
    if base is not None and not os.path.isabs(p):
        p = str(base / p)
    return p


def _check_path(path: str, where: str) -> None:
    """A file/folder must exist; a glob pattern must match at least one file."""
    if _has_magic(path):
        if not glob.glob(path):
            raise InputError(f"{where}: no file matches {path!r}; check the pattern")
    elif not os.path.exists(path):
        raise InputError(f"{where}: {path} not found")


def _choice(value: Any, name: str, choices: tuple[str, ...], where: str) -> str:
    v = str(value).strip().lower()
    if v not in choices:
        raise InputError(f"{where}: unknown {name} {value!r}; choose one of: {', '.join(choices)}")
    return v


def _positive(value: Any, name: str, where: str, *, allow_zero: bool = False,
              integer: bool = False) -> Any:
    try:
        v = int(value) if integer else float(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: {name} must be a number, got {value!r}") from None
    if integer and float(value) != v:
        raise InputError(f"{where}: {name} must be a whole number, got {value!r}")
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InputError(f"{where}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


# ----------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """A network by registry name and its keyword arguments (:func:`medreg.nets.create`)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = "model") -> "ModelConfig":
        if not isinstance(data, Mapping) or "name" not in data:
            raise InputError(f"{where}: expected a mapping with a network 'name' and its "
                             "options, e.g. {name: unet, ndim: 2}")
        params = {str(k): v for k, v in data.items() if k != "name"}
        return cls(str(data["name"]), params)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **copy.deepcopy(self.params)}

    def build(self):
        """The network (``medreg.nets.create``); unknown names/options are an ``InputError``."""
        import medreg.nets  # noqa: F401  (registers the shipped networks)
        from medreg.nets.base import create

        try:
            return create(self.name, **self.params)
        except InputError as exc:
            raise InputError(f"model: {exc}") from None


# ----------------------------------------------------------------------------- data sources
@dataclass
class FolderSource:
    """Images matching the glob ``pattern`` (sorted); ``labels``, ``landmarks`` and ``mask`` are
    path templates with ``{stem}`` / ``{name}`` of each image (e.g. ``labels/{name}``), see
    :func:`medreg.train.data.records_from_folder` (every templated file must exist)."""

    pattern: str
    labels: str | None = None
    landmarks: str | None = None
    mask: str | None = None

    def resolve(self, base: Path | None, where: str) -> None:
        for key in ("pattern", "labels", "landmarks", "mask"):
            setattr(self, key, _resolve(getattr(self, key), base))
        _check_path(self.pattern, f"{where}: folder.pattern")
        self.records()  # every image's label/landmark/mask file must exist

    def records(self) -> list:
        from medreg.train.data import records_from_folder

        return records_from_folder(self.pattern, labels=self.labels, landmarks=self.landmarks,
                                   mask=self.mask)


@dataclass
class CsvSource:
    """A CSV table of subjects (columns as :func:`medreg.train.data.records_from_csv` reads)."""

    path: str

    def resolve(self, base: Path | None, where: str) -> None:
        self.path = _resolve(self.path, base)
        _check_path(self.path, f"{where}: csv.path")

    def records(self) -> list:
        from medreg.train.data import records_from_csv

        return records_from_csv(self.path)


@dataclass
class L2RSource:
    """A Learn2Reg task's ``dataset.json``: the records of ``split`` (``training``, ...) and,
    for ``pairing: {mode: listed}`` without explicit pairs, the pair list named ``pairs``
    (e.g. ``registration_val``; its images must be among the split's records)."""

    path: str
    split: str = "training"
    pairs: str | None = None

    def resolve(self, base: Path | None, where: str) -> None:
        self.path = _resolve(self.path, base)
        _check_path(self.path, f"{where}: l2r.path")

    def records(self) -> list:
        from medreg.train.data import records_from_l2r_json

        return records_from_l2r_json(self.path, self.split)

    def listed_pairs(self, records: list) -> list:
        from medreg.train.data import pairs_from_l2r_json

        if self.pairs is None:
            raise InputError("data: l2r: pairing mode listed needs either pairing.pairs or "
                             "l2r.pairs (the name of the JSON's pair list)")
        return pairs_from_l2r_json(self.path, self.pairs, records)


@dataclass
class SyntheticSource:
    """Pairs generated on the fly (:class:`medreg.train.synth.SyntheticPairDataset`).

    Attributes:
        images: image paths or glob patterns (``kind: deformed``: each pair is an image and a
            randomly deformed copy, with the ground-truth field).
        labels: label-map paths or patterns (``kind: labels``: SynthMorph-style pairs rendered
            from deformed label maps; with ``deformed`` the labels follow the images, one per
            image in the same order).
        kind: ``deformed`` | ``labels``.
        length: pairs per epoch.
        synth: :class:`medreg.train.synth.SynthConfig` keyword arguments.
        shape, spacing: ``kind: labels`` without label maps: random label maps on a grid of
            this tensor shape (``z, y, x``) and spacing (mm, ``x, y, z``).

    Sources are put on their network grid with ``data.preprocess``.
    """

    images: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    kind: str = "deformed"
    length: int = 1000
    synth: dict[str, Any] = field(default_factory=dict)
    shape: list[int] | None = None
    spacing: list[float] | float | None = None

    def __post_init__(self) -> None:
        where = "data: synthetic"
        self.kind = _choice(self.kind, "kind", SYNTH_KINDS, where)
        self.images = [self.images] if isinstance(self.images, str) else list(self.images or [])
        self.labels = [self.labels] if isinstance(self.labels, str) else list(self.labels or [])
        self.length = _positive(self.length, "length", where, integer=True)
        if self.kind == "deformed" and not self.images:
            raise InputError(f"{where}: kind deformed needs 'images' (paths or glob patterns)")
        if self.kind == "labels" and not self.labels and not self.shape:
            raise InputError(f"{where}: kind labels needs 'labels' (label-map paths or patterns) "
                             "or a 'shape' for random label maps")
        if not isinstance(self.synth, Mapping):
            raise InputError(f"{where}: synth must be a mapping of SynthConfig options")
        self.synth_config()

    def synth_config(self):
        """:class:`~medreg.train.synth.SynthConfig` from ``synth``."""
        from medreg.train.synth import SynthConfig

        return _strict(SynthConfig, self.synth, "data: synthetic: synth")

    def resolve(self, base: Path | None, where: str) -> None:
        self.images = [_resolve(p, base) for p in self.images]
        self.labels = [_resolve(p, base) for p in self.labels]
        for key in ("images", "labels"):
            for p in getattr(self, key):
                _check_path(p, f"{where}: synthetic.{key}")

    def files(self, key: str) -> list[str]:
        """The sorted, expanded file list of ``images`` or ``labels``."""
        out: list[str] = []
        for p in getattr(self, key):
            out += sorted(glob.glob(p)) if _has_magic(p) else [p]
        return out

    def dataset(self, prep: Any, augment: Any, seed: int, length: int | None = None):
        """The :class:`~medreg.train.data.SyntheticPairDataset` of this source."""
        from medreg.io import read_image
        from medreg.train.data import SyntheticPairDataset

        images = [read_image(p) for p in self.files("images")]
        images = [im if im.data.is_floating_point() else im.to(torch.float32) for im in images]
        labels = [read_image(p, label=True) for p in self.files("labels")] or None
        if images and labels is not None and len(labels) != len(images):
            raise InputError(f"data: synthetic: {len(labels)} label maps for {len(images)} "
                             "images; give one label map per image (same order)")
        return SyntheticPairDataset(images, labels, cfg=self.synth_config(),
                                    length=self.length if length is None else length, seed=seed,
                                    mode=self.kind, shape=self.shape, spacing=self.spacing,
                                    prep=prep, augment=augment)


#: Data source registry: YAML key → class.
SOURCES: dict[str, type] = {"folder": FolderSource, "csv": CsvSource, "l2r": L2RSource,
                            "synthetic": SyntheticSource}


@dataclass
class SourceConfig:
    """One of :data:`SOURCES`, written ``{kind: {settings}}`` in YAML."""

    kind: str
    spec: Any

    @classmethod
    def from_dict(cls, data: Any, where: str, base: Path | None) -> "SourceConfig":
        if not isinstance(data, Mapping) or len(data) != 1:
            raise InputError(f"{where}: give exactly one source, one of: {', '.join(SOURCES)} "
                             "(e.g. {folder: {pattern: 'images/*.nii.gz'}})")
        kind, settings = next(iter(data.items()))
        if kind not in SOURCES:
            raise InputError(f"{where}: unknown source {kind!r}; valid: {', '.join(SOURCES)}")
        spec = _strict(SOURCES[kind], settings, f"{where}: {kind}")
        spec.resolve(base, where)
        return cls(str(kind), spec)

    @property
    def synthetic(self) -> bool:
        return self.kind == "synthetic"

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: dataclasses.asdict(self.spec)}


@dataclass
class PairingConfig:
    """How subjects form (fixed, moving) pairs: ``all`` ordered pairs, ``atlas`` (subject
    ``index`` against every other, ``direction`` as :func:`medreg.train.data.atlas_pairs`
    takes it) or ``listed`` (``pairs`` of record indices or ids; for an ``l2r`` source the
    JSON's own pairs when ``pairs`` is empty)."""

    mode: str = "all"
    index: int = 0
    direction: str = "atlas_to_subject"
    pairs: list[list[Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mode = _choice(self.mode, "pairing mode", PAIRING_MODES, "data: pairing")
        self.index = _positive(self.index, "index", "data: pairing", allow_zero=True, integer=True)
        if any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in self.pairs):
            raise InputError("data: pairing: pairs must be a list of [fixed, moving] entries")


@dataclass
class DataConfig:
    """Training and validation data (see the module docstring).

    Attributes:
        train, val: sources; without ``val``, record sources are split by subject
            (``val_fraction``, ``split_seed``) and synthetic sources validate on fresh
            pairs of the same generator (another seed, ``train.val_pairs`` of them).
        pairing: pairs of the record sources (applied to each split).
        preprocess: :class:`medreg.train.preprocess.PreprocessConfig` keyword arguments.
        augment: :class:`medreg.train.augment.AugmentConfig` keyword arguments (training
            pairs only), or None.
        cache: keep preprocessed images in memory.
    """

    train: Any
    val: Any = None
    val_fraction: float = 0.2
    split_seed: int | None = None
    pairing: Any = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] | None = None
    cache: bool = True

    @classmethod
    def from_dict(cls, data: Any, where: str, base: Path | None) -> "DataConfig":
        cfg = _strict(cls, data, where)
        cfg.train = SourceConfig.from_dict(cfg.train, f"{where}: train", base)
        if cfg.val is not None:
            cfg.val = SourceConfig.from_dict(cfg.val, f"{where}: val", base)
        cfg.pairing = _strict(PairingConfig, cfg.pairing, f"{where}: pairing")
        if not 0 <= float(cfg.val_fraction) < 1:
            raise InputError(f"{where}: val_fraction must be in [0, 1), got {cfg.val_fraction!r}")
        cfg.val_fraction = float(cfg.val_fraction)
        for key in ("preprocess", "augment"):
            v = getattr(cfg, key)
            if v is not None and not isinstance(v, Mapping):
                raise InputError(f"{where}: {key} must be a mapping of options")
        cfg.preprocess = dict(cfg.preprocess or {})
        cfg.augment = None if cfg.augment is None else dict(cfg.augment)
        cfg.preprocess_config()  # validate the options now
        if cfg.augment is not None:
            cfg.augment_config()
        return cfg

    def preprocess_config(self):
        """:class:`~medreg.train.preprocess.PreprocessConfig` from ``preprocess``."""
        from medreg.train.preprocess import PreprocessConfig

        return _strict(PreprocessConfig, self.preprocess, "data: preprocess")

    def augment_config(self):
        """:class:`~medreg.train.augment.AugmentConfig` from ``augment`` (None: no augmentation)."""
        if self.augment is None:
            return None
        from medreg.train.augment import AugmentConfig

        return _strict(AugmentConfig, self.augment, "data: augment")

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train.to_dict(),
                "val": None if self.val is None else self.val.to_dict(),
                "val_fraction": self.val_fraction, "split_seed": self.split_seed,
                "pairing": dataclasses.asdict(self.pairing),
                "preprocess": copy.deepcopy(self.preprocess),
                "augment": copy.deepcopy(self.augment), "cache": self.cache}


# ----------------------------------------------------------------------------- loss
@dataclass
class LossConfig:
    """Loss terms (built by :func:`medreg.train.losses.build_loss`).

    Attributes:
        similarity: ``{name, weight, **params}`` of a ``medreg.losses`` similarity, or None.
        regularisation: ``{name: weight}`` or ``{name: {weight, **params}}`` of regularisers
            (displacements in world mm on the network grid). With ``train.reg_weight_range``
            every regulariser weight is multiplied by the sampled λ.
        dice: weight of the soft Dice loss of the warped one-hot moving labels.
        dice_background: include label 0 in the Dice loss.
        supervised: weight of the end-point error (mm) against the ground-truth field.
        landmarks: weight of the landmark TRE (mm).
        bidirectional: also score the inverse map (``NetOutput.inverse``: fixed warped to the
            moving image); the forward and backward losses are averaged.
        level_weights: weight of the terms at each coarser level of ``NetOutput.levels``
            (one number for all, or one per level, coarse → fine).
    """

    similarity: dict[str, Any] | None = field(
        default_factory=lambda: {"name": "lncc", "weight": 1.0, "window": 9})
    regularisation: dict[str, Any] = field(default_factory=lambda: {"diffusion": 1.0})
    dice: float = 0.0
    dice_background: bool = False
    supervised: float = 0.0
    landmarks: float = 0.0
    bidirectional: bool = False
    level_weights: float | list[float] = 1.0

    def __post_init__(self) -> None:
        where = "loss"
        for key in ("dice", "supervised", "landmarks"):
            setattr(self, key, _positive(getattr(self, key), key, where, allow_zero=True))
        lw = self.level_weights
        if isinstance(lw, (list, tuple)):
            self.level_weights = [_positive(w, "level_weights", where, allow_zero=True) for w in lw]
        else:
            self.level_weights = _positive(lw, "level_weights", where, allow_zero=True)
        if self.regularisation is None:
            self.regularisation = {}
        if not isinstance(self.regularisation, Mapping):
            raise InputError(f"{where}: regularisation must map names to weights, "
                             "e.g. {diffusion: 1.0}")
        if self.similarity is not None and not isinstance(self.similarity, Mapping):
            raise InputError(f"{where}: similarity must be a mapping like {{name: lncc, weight: 1}}")
        from medreg.train.losses import check_loss_config

        check_loss_config(self)


# ----------------------------------------------------------------------------- optimisation
@dataclass
class EarlyStopping:
    """The monitored validation metric: it picks ``best.pt``, drives the ``plateau`` schedule
    and stops training after ``patience`` validations without improvement (0: never stop).
    ``metric``: ``val_loss``, ``val_dice``, ``val_sdlogj``, ``val_folding_percent`` or
    ``val_loss_<term>`` (an unweighted loss term, e.g. ``val_loss_epe``)."""

    patience: int = 0
    metric: str = "val_loss"
    mode: str = "min"
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        where = "train: early_stopping"
        self.patience = _positive(self.patience, "patience", where, allow_zero=True, integer=True)
        self.mode = _choice(self.mode, "mode", METRIC_MODES, where)
        self.min_delta = _positive(self.min_delta, "min_delta", where, allow_zero=True)
        if not str(self.metric).startswith("val_"):
            raise InputError(f"{where}: metric must be a validation metric (val_loss, val_dice, "
                             f"val_sdlogj, ...), got {self.metric!r}")

    def improved(self, value: float, best: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if best is None:
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta


@dataclass
class TrainParams:
    """Optimisation and bookkeeping (the YAML ``train:`` block).

    Attributes:
        steps: optimiser steps in total (a resumed run continues up to this count).
        batch_size: global batch (split evenly across distributed ranks).
        optimizer: ``adam`` | ``adamw``; ``lr``, ``weight_decay`` its settings.
        schedule: ``none`` | ``cosine`` | ``step`` | ``plateau``, or ``{name, **params}``
            (see :mod:`medreg.train.schedules`); ``warmup``: linear warm-up steps.
        clip_grad_norm: clip the global gradient norm (None: off).
        amp: ``bf16`` | ``fp16`` mixed precision (CUDA only), or None.
        val_every: validate every N steps (and at the end); ``val_pairs``: at most this many
            validation pairs (None: all).
        early_stopping: see :class:`EarlyStopping`.
        checkpoint_every: write ``last.pt`` every N steps (and at the end).
        out_dir: output folder; it must be new or empty unless resuming or ``overwrite``.
        threads: CPU threads (``torch.set_num_threads``); device: ``auto`` | ``cpu`` |
            ``cuda`` | ``cuda:K``; num_workers: DataLoader worker processes.
        log_every: CSV row / progress line every N steps; tensorboard: also write TensorBoard
            event files (if the package is installed).
        reg_weight_range: ``[lo, hi]`` for networks that take a regularisation weight: λ is
            drawn log-uniformly per batch, given to the network and multiplies the
            regulariser weights.
    """

    steps: int = 1000
    batch_size: int = 1
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: Any = "none"
    warmup: int = 0
    clip_grad_norm: float | None = None
    amp: str | None = None
    val_every: int = 100
    val_pairs: int | None = 16
    early_stopping: Any = None
    checkpoint_every: int = 100
    out_dir: str = "runs/train"
    overwrite: bool = False
    threads: int | None = None
    device: str = "auto"
    num_workers: int = 0
    log_every: int = 10
    tensorboard: bool = False
    reg_weight_range: list[float] | None = None

    def __post_init__(self) -> None:
        where = "train"
        for key in ("steps", "batch_size", "val_every", "checkpoint_every", "log_every"):
            setattr(self, key, _positive(getattr(self, key), key, where, integer=True))
        for key in ("warmup", "num_workers"):
            setattr(self, key, _positive(getattr(self, key), key, where, allow_zero=True,
                                         integer=True))
        if self.threads is not None:
            self.threads = _positive(self.threads, "threads", where, integer=True)
        if self.val_pairs is not None:
            self.val_pairs = _positive(self.val_pairs, "val_pairs", where, integer=True)
        self.optimizer = _choice(self.optimizer, "optimizer", OPTIMIZERS, where)
        self.lr = _positive(self.lr, "lr", where)
        self.weight_decay = _positive(self.weight_decay, "weight_decay", where, allow_zero=True)
        if self.clip_grad_norm is not None:
            self.clip_grad_norm = _positive(self.clip_grad_norm, "clip_grad_norm", where)
        if self.amp is not None:
            self.amp = _choice(self.amp, "amp mode", AMP_MODES, where)
        self.early_stopping = _strict(EarlyStopping, self.early_stopping, f"{where}: early_stopping") \
            if not isinstance(self.early_stopping, EarlyStopping) else self.early_stopping
        from medreg.train.schedules import schedule_from_config

        schedule_from_config(self.schedule, self.steps)  # validates name and parameters
        if self.reg_weight_range is not None:
            r = self.reg_weight_range
            if not isinstance(r, (list, tuple)) or len(r) != 2:
                raise InputError(f"{where}: reg_weight_range must be [lo, hi], got {r!r}")
            lo, hi = (_positive(v, "reg_weight_range", where) for v in r)
            if lo > hi:
                raise InputError(f"{where}: reg_weight_range [lo, hi] needs lo <= hi, got {r!r}")
            self.reg_weight_range = [lo, hi]
        dev = str(self.device).strip().lower()
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise InputError(f"{where}: device must be auto, cpu, cuda or cuda:K, got {self.device!r}")
        self.device = dev

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["early_stopping"] = dataclasses.asdict(self.early_stopping)
        return out


# ----------------------------------------------------------------------------- the whole config
@dataclass
class TrainConfig:
    """A training run: ``seed``, ``model``, ``data``, ``loss``, ``train``, ``resume``,
    ``initial_weights`` (fine-tuning: the weights of a checkpoint or bundled model, a fresh
    optimiser and schedule, step 0)."""

    model: ModelConfig
    data: DataConfig
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainParams = field(default_factory=TrainParams)
    seed: int = 0
    resume: str | None = None
    initial_weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain types, in the YAML format (``config_from_dict(cfg.to_dict())`` rebuilds it)."""
        return {"seed": self.seed, "model": self.model.to_dict(), "data": self.data.to_dict(),
                "loss": copy.deepcopy(dataclasses.asdict(self.loss)),
                "train": self.train.to_dict(), "resume": self.resume,
                "initial_weights": self.initial_weights}


def config_from_dict(data: Mapping[str, Any], where: str = "config",
                     base_dir: str | os.PathLike | None = None) -> TrainConfig:
    """Build a :class:`TrainConfig` from a plain mapping (strict about keys).

    Args:
        data: the parsed YAML.
        where: name used in error messages (the file).
        base_dir: folder that relative paths are resolved against (None: the working folder).
    """
    if not isinstance(data, Mapping):
        raise InputError(f"{where}: expected a mapping at the top level")
    allowed = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: "
                         f"{', '.join(sorted(allowed))}")
    for key in ("model", "data"):
        if key not in data:
            raise InputError(f"{where}: missing the '{key}' section")
    base = None if base_dir is None else Path(base_dir)
    seed = _positive(data.get("seed", 0), "seed", where, allow_zero=True, integer=True)
    model = ModelConfig.from_dict(data["model"], f"{where}: model")
    dcfg = DataConfig.from_dict(data["data"], f"{where}: data", base)
    loss = _strict(LossConfig, data.get("loss"), f"{where}: loss")
    params = _strict(TrainParams, data.get("train"), f"{where}: train")
    params.out_dir = _resolve(params.out_dir, base)
    resume = _resolve(data.get("resume"), base)
    if resume is not None:
        _check_path(resume, f"{where}: resume")
    initial = data.get("initial_weights")
    if initial is not None:
        from medreg.train.checkpoint import is_bare_name, resolve_checkpoint

        if resume is not None:
            raise InputError(f"{where}: give either resume (continue a run) or initial_weights "
                             "(start a new run from trained weights), not both")
        text = str(initial)
        initial = str(resolve_checkpoint(text if is_bare_name(text) else _resolve(text, base)))
    return TrainConfig(model=model, data=dcfg, loss=loss, train=params, seed=seed, resume=resume,
                       initial_weights=initial)


def load_train_config(path: str | os.PathLike) -> TrainConfig:
    """Read a training YAML file; relative paths in it are relative to the file's folder."""
    from medreg.io.paths import read_yaml

    p = Path(path)
    return config_from_dict(read_yaml(p), str(p), base_dir=p.resolve().parent)


def apply_overrides(cfg: TrainConfig, **overrides: Any) -> TrainConfig:
    """A copy of ``cfg`` with ``train`` keys (``steps``, ``out_dir``, ``device``, ...), ``seed``
    or ``resume`` replaced; ``None`` values are ignored (the command line's defaults)."""
    data = cfg.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("seed", "resume"):
            data[key] = value
        elif key in data["train"]:
            data["train"][key] = value
        else:
            raise InputError(f"unknown override {key!r}; valid: seed, resume, "
                             f"{', '.join(sorted(data['train']))}")
    return config_from_dict(data, "overrides")
