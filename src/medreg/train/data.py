r"""Datasets and pair samplers for learning-based registration.

A dataset is a list of :class:`Record` (one image with its optional label map, landmarks and
mask, and a subject id) plus a list of pairs ``(fixed_index, moving_index)`` from a sampler
(:func:`all_pairs`, :func:`atlas_pairs`, :func:`listed_pairs`, :func:`pairs_from_l2r_json`).
Records come from a folder (:func:`records_from_folder`), a CSV file (:func:`records_from_csv`)
or a Learn2Reg ``dataset.json`` (:func:`records_from_l2r_json`).

:class:`PairDataset` loads and preprocesses both images of a pair onto the **fixed** image's
network grid (:func:`medreg.train.preprocess.network_grid`), so every tensor of a
:class:`~medreg.train.batch.Pair` lives on that grid: images float32 (normalised), label maps
int64 (original ids), landmarks as continuous voxel indices ``x, y, z``. Landmark files hold
world LPS mm (:func:`medreg.io.read_landmarks`). :class:`SyntheticPairDataset` draws pairs with
a known displacement from :mod:`medreg.train.synth`, reproducibly per ``(seed, epoch, index)``.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from medreg.core.errors import InputError
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.engine.initialise import initial_transform
from medreg.io.images import read_image
from medreg.io.landmarks import read_landmarks
from medreg.io.paths import file_suffix
from medreg.train.augment import Augment
from medreg.train.batch import Pair
from medreg.train.preprocess import (PrepInfo, PreprocessConfig, network_grid, normalise_image,
                                     prepare_image, resample_prepared)
from medreg.train.synth import SynthConfig, deformed_pair, synth_label_pair
from medreg.transforms import SpatialTransform

__all__ = [
    "PairDataset", "Record", "SyntheticPairDataset", "all_pairs", "atlas_pairs", "listed_pairs",
    "pairs_from_l2r_json", "records_from_csv", "records_from_folder", "records_from_l2r_json",
    "split_by_subject",
]


def file_stem(path: str | os.PathLike) -> str:
    """File name without its image ending (``x.nii.gz`` → ``x``)."""
    name = Path(path).name
    suffix = file_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


@dataclass
class Record:
    """One image of a dataset.

    Attributes:
        image: the image file.
        labels: its label map (same grid), or ``None``.
        landmarks: its landmark file (world LPS mm), or ``None``.
        subject: subject id (splits never separate one subject's records); default the image's
            file stem.
        mask: a mask on the image's grid, or ``None``.
        landmarks_frame: ``world`` (the file holds LPS mm, or says its frame, as
            :func:`medreg.io.read_landmarks` reads it) or ``index`` (plain numbers are voxel
            indices ``x, y, z`` of the image, as Learn2Reg's keypoint CSV files).
    """

    image: Path
    labels: Path | None = None
    landmarks: Path | None = None
    subject: str = ""
    mask: Path | None = None
    landmarks_frame: str = "world"

    def __post_init__(self) -> None:
        self.image = Path(self.image)
        for name in ("labels", "landmarks", "mask"):
            value = getattr(self, name)
            if value is not None and value != "":
                setattr(self, name, Path(value))
            else:
                setattr(self, name, None)
        if not self.subject:
            self.subject = file_stem(self.image)
        if self.landmarks_frame not in ("world", "index"):
            raise InputError(f"landmarks_frame must be 'world' or 'index', got "
                             f"{self.landmarks_frame!r}")


def _check_files(rec: Record, where: str) -> Record:
    for name in ("image", "labels", "landmarks", "mask"):
        p = getattr(rec, name)
        if p is not None and not p.exists():
            raise InputError(f"{p}: no such {name} file (listed by {where}); fix the path or "
                             "remove the entry")
    return rec


# ------------------------------------------------------------------------------ readers
def records_from_folder(pattern: str, labels: str | None = None, landmarks: str | None = None,
                        mask: str | None = None) -> list[Record]:
    """Records for the files matching a glob ``pattern`` (sorted).

    ``labels``, ``landmarks`` and ``mask`` are path templates with ``{stem}`` (the file name
    without its ending) and/or ``{name}`` (the file name), e.g. ``"data/labels/{name}"``. The
    subject id is the stem.

    Raises:
        InputError: no file matches, or a templated file is missing (the message names it).
    """
    files = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if Path(p).is_file())
    if not files:
        raise InputError(f"no image file matches {pattern!r}; check the folder and the pattern")
    out = []
    for f in files:
        path = Path(f)
        keys = {"stem": file_stem(path), "name": path.name}
        try:
            extra = {k: (None if t is None else Path(t.format(**keys)))
                     for k, t in (("labels", labels), ("landmarks", landmarks), ("mask", mask))}
        except (KeyError, IndexError) as exc:
            raise InputError(f"bad path template ({exc}); use {{stem}} or {{name}}") from None
        out.append(_check_files(Record(path, subject=keys["stem"], **extra), f"pattern {pattern!r}"))
    return out


_CSV_COLUMNS = ("image", "labels", "landmarks", "mask", "subject")


def records_from_csv(path: str | os.PathLike) -> list[Record]:
    """Records from a CSV file with a header row: ``image`` (required), ``labels``,
    ``landmarks``, ``mask``, ``subject`` (optional, empty cells allowed). Relative paths are
    relative to the CSV file's folder; other columns are ignored."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if "image" not in header:
            raise InputError(f"{path}: the header must name an 'image' column (and optionally "
                             f"{', '.join(_CSV_COLUMNS[1:])}); got {reader.fieldnames}")
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
                for row in reader]
    base = path.parent
    out = []
    for i, row in enumerate(rows, start=2):
        if not row.get("image"):
            raise InputError(f"{path}: line {i} has no image")

        def resolve(value: str | None) -> Path | None:
            if not value:
                return None
            p = Path(value).expanduser()
            return p if p.is_absolute() else base / p

        rec = Record(resolve(row["image"]), resolve(row.get("labels")), resolve(row.get("landmarks")),
                     row.get("subject", ""), resolve(row.get("mask")))
        out.append(_check_files(rec, f"{path} line {i}"))
    if not out:
        raise InputError(f"{path}: no records")
    return out


#: Learn2Reg keys of one image's files → Record fields.
_L2R_FILES = {"image": "image", "label": "labels", "keypoints": "landmarks", "mask": "mask"}
#: Splits of image lists and of pair lists in a Learn2Reg ``dataset.json``.
_L2R_IMAGE_SPLITS = ("training", "validation", "test")
_L2R_PAIR_SPLITS = ("registration_val", "registration_test", "training_paired_images")
_L2R_CASE = re.compile(r"^(.*)_\d{4}$")


def _l2r_load(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object (a Learn2Reg dataset.json)")
    return data


def _l2r_entries(data: dict, split: str, path: Path) -> list:
    if split not in data:
        present = [k for k in _L2R_IMAGE_SPLITS + _L2R_PAIR_SPLITS if k in data]
        raise InputError(f"{path}: no split {split!r}; it has {present}")
    entries = data[split]
    if not isinstance(entries, list):
        raise InputError(f"{path}: {split!r} must be a list")
    return entries


def _l2r_subject(image: Path) -> str:
    """``OASIS_0001_0000`` → ``OASIS_0001`` (Learn2Reg's ``<task>_<case>_<modality/time>``)."""
    stem = file_stem(image)
    m = _L2R_CASE.match(stem)
    return m.group(1) if m else stem


def records_from_l2r_json(path: str | os.PathLike, split: str = "training") -> list[Record]:
    """Records of a Learn2Reg ``dataset.json``.

    ``split`` is an image list (``training``, ``validation``, ``test``: entries
    ``{"image", "label"?, "mask"?, "keypoints"?}``) or a pair list (``registration_val``,
    ``registration_test``, ``training_paired_images``: entries ``{"fixed", "moving"}``), whose
    records are its distinct images in order of appearance, with label/mask/keypoints taken
    from the image lists when they list the same file. Paths are relative to the JSON's folder.
    Keypoint files hold voxel indices (``landmarks_frame="index"``), as Learn2Reg's CSVs.
    The subject id is the file stem without the trailing ``_NNNN`` (so both time points of a
    paired case share a subject).
    """
    path = Path(path)
    data = _l2r_load(path)
    base = path.parent
    entries = _l2r_entries(data, split, path)

    def resolve(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (base / p)

    def record(entry: dict) -> Record:
        files = {field_: resolve(entry[key]) for key, field_ in _L2R_FILES.items() if entry.get(key)}
        return Record(subject=_l2r_subject(files["image"]), landmarks_frame="index", **files)

    known: dict[Path, dict] = {}
    for s in _L2R_IMAGE_SPLITS:
        for e in data.get(s, []) or []:
            if isinstance(e, dict) and e.get("image"):
                known[resolve(e["image"]).resolve()] = e
    out: list[Record] = []
    seen: set[Path] = set()
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"image": e}
        if not isinstance(e, dict):
            raise InputError(f"{path}: entry {i} of {split!r} is not an object")
        if "image" in e:
            imgs = [e]
        elif "fixed" in e and "moving" in e:
            imgs = [known.get(resolve(e[k]).resolve(), {"image": e[k]}) for k in ("fixed", "moving")]
        else:
            raise InputError(f"{path}: entry {i} of {split!r} has neither 'image' nor "
                             f"'fixed'/'moving' (keys {sorted(e)})")
        for img in imgs:
            rec = record(img)
            key = rec.image.resolve()
            if key not in seen:
                seen.add(key)
                out.append(_check_files(rec, f"{path} ({split})"))
    if not out:
        raise InputError(f"{path}: split {split!r} is empty")
    return out


def pairs_from_l2r_json(path: str | os.PathLike, split: str = "registration_val",
                        records: Sequence[Record] | None = None) -> list[tuple[int, int]]:
    """``(fixed_index, moving_index)`` pairs of a Learn2Reg pair list.

    Indices point into ``records`` (matched by image file), by default
    ``records_from_l2r_json(path, split)``.

    Raises:
        InputError: a pair names an image that is not among ``records``.
    """
    path = Path(path)
    data = _l2r_load(path)
    entries = _l2r_entries(data, split, path)
    if records is None:
        records = records_from_l2r_json(path, split)
    index = {Path(r.image).resolve(): i for i, r in enumerate(records)}
    out = []
    for i, e in enumerate(entries):
        if not (isinstance(e, dict) and "fixed" in e and "moving" in e):
            raise InputError(f"{path}: {split!r} is not a pair list (entry {i} lacks 'fixed'/'moving')")
        pair = []
        for key in ("fixed", "moving"):
            p = Path(e[key])
            p = (p if p.is_absolute() else path.parent / p).resolve()
            if p not in index:
                raise InputError(f"{path}: {split!r} entry {i} names {e[key]}, which is not among "
                                 "the records; load the records of the split that lists it")
            pair.append(index[p])
        out.append((pair[0], pair[1]))
    return out


# ------------------------------------------------------------------------------ splits, samplers
def split_by_subject(records: Sequence[Record], val_fraction: float,
                     seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Split records into ``(train, val)`` so that no subject is in both.

    ``round(val_fraction * n_subjects)`` subjects (at least one when ``val_fraction > 0`` and
    there are two or more) drawn with ``seed`` go to validation; record order is kept.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    subjects = sorted({r.subject for r in records})
    n_val = int(round(val_fraction * len(subjects)))
    if val_fraction > 0 and len(subjects) > 1:
        n_val = min(max(n_val, 1), len(subjects) - 1)
    rng = random.Random(seed)
    shuffled = subjects[:]
    rng.shuffle(shuffled)
    val_subjects = set(shuffled[:n_val])
    train = [r for r in records if r.subject not in val_subjects]
    val = [r for r in records if r.subject in val_subjects]
    return train, val


def all_pairs(n: int, include_self: bool = False) -> list[tuple[int, int]]:
    """Every ordered pair ``(fixed, moving)`` of ``n`` records: ``n (n − 1)`` (``n²`` with
    ``include_self``)."""
    return [(i, j) for i in range(n) for j in range(n) if include_self or i != j]


_ATLAS_DIRECTIONS: dict[str, Callable[[int, int], list[tuple[int, int]]]] = {
    # the atlas is moved onto each subject: subject fixed, atlas moving
    "atlas_to_subject": lambda s, a: [(s, a)],
    # each subject is moved onto the atlas: atlas fixed, subject moving
    "subject_to_atlas": lambda s, a: [(a, s)],
    "both": lambda s, a: [(s, a), (a, s)],
}


def atlas_pairs(n: int, atlas_index: int, direction: str = "atlas_to_subject") -> list[tuple[int, int]]:
    """Pairs between one atlas record and every other record.

    ``direction``: ``atlas_to_subject`` (the atlas is the moving image), ``subject_to_atlas``
    (the atlas is the fixed image) or ``both``.
    """
    if direction not in _ATLAS_DIRECTIONS:
        raise InputError(f"unknown atlas direction {direction!r}; choose one of "
                         f"{', '.join(_ATLAS_DIRECTIONS)}")
    if not 0 <= atlas_index < n:
        raise InputError(f"atlas index {atlas_index} is outside the {n} records")
    make = _ATLAS_DIRECTIONS[direction]
    return [p for s in range(n) if s != atlas_index for p in make(s, atlas_index)]


def listed_pairs(records: Sequence[Record], pairs: Iterable[tuple[str, str]]) -> list[tuple[int, int]]:
    """Index pairs for ``(fixed_id, moving_id)`` given by subject id (or image file stem when
    subjects are shared by several records)."""
    lookup: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        lookup.setdefault(r.subject, []).append(i)
    stems: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        stems.setdefault(file_stem(r.image), []).append(i)

    def find(key: str) -> int:
        hits = lookup.get(key)
        if hits is None or len(hits) > 1:
            hits = stems.get(key, hits)
        if not hits:
            raise InputError(f"no record has subject or image stem {key!r}")
        if len(hits) > 1:
            raise InputError(f"{key!r} names {len(hits)} records; use an image stem to pick one")
        return hits[0]

    return [(find(str(f)), find(str(m))) for f, m in pairs]


# ------------------------------------------------------------------------------ datasets
@dataclass
class _Loaded:
    """One record read and normalised on its own grid (what the cache holds)."""

    image: Image
    labels: Image | None
    landmarks: Tensor | None
    mask: Image | None
    info: PrepInfo
    prepared: dict = field(default_factory=dict)  # grid key → (image, labels, mask) on that grid


def _grid_key(grid: Grid) -> tuple:
    return (grid.size, tuple(np.round(grid.spacing, 6)), tuple(np.round(grid.origin, 5)),
            tuple(np.round(grid.direction, 6).ravel()))


def _seed(*values: int) -> int:
    """A 63-bit seed mixing integers (reproducible, order-sensitive)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class PairDataset(Dataset):
    """Registration pairs from files, preprocessed onto the fixed image's network grid.

    Args:
        records: the images.
        pairs: ``(fixed_index, moving_index)`` into ``records``.
        prep: network grid and normalisation.
        augment: random augmentation applied to each returned pair.
        cache: keep each record's normalised image, label map and landmarks in memory after the
            first read, and its tensors on its own network grid (so a dataset of images on one
            grid is read and resampled once). With ``DataLoader`` workers each worker has its
            own cache.
        seed: augmentation seed; item ``i`` of epoch ``e`` uses ``(seed, e, i)``
            (:meth:`set_epoch`).

    ``dataset[i]`` is a :class:`Pair` whose ``mask`` is the fixed record's mask (when it has
    one) and whose ``meta`` holds ``fixed_info``/``moving_info``
    (:class:`~medreg.train.preprocess.PrepInfo`) and the record files.
    """

    def __init__(self, records: Sequence[Record], pairs: Sequence[tuple[int, int]],
                 prep: PreprocessConfig, augment: Augment | None = None, cache: bool = True,
                 seed: int = 0) -> None:
        self.records = list(records)
        self.pairs = [(int(f), int(m)) for f, m in pairs]
        n = len(self.records)
        for f, m in self.pairs:
            if not (0 <= f < n and 0 <= m < n):
                raise InputError(f"pair ({f}, {m}) points outside the {n} records")
        self.prep = prep
        self.augment = augment
        self.cache = cache
        self.seed = int(seed)
        self.epoch = 0
        self._cache: dict[int, _Loaded] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before each epoch)."""
        self.epoch = int(epoch)

    def _load(self, index: int) -> _Loaded:
        if index in self._cache:
            return self._cache[index]
        rec = self.records[index]
        image = read_image(rec.image)
        if not image.data.is_floating_point():
            image = image.to(torch.float32)
        norm, shift, scale, clip = normalise_image(image, self.prep)
        labels = self._read_on_grid(rec.labels, image, "label map")
        mask = self._read_on_grid(rec.mask, image, "mask")
        landmarks = None
        if rec.landmarks is not None:
            landmarks = read_landmarks(rec.landmarks, grid=image.grid)
            if landmarks.shape[1] != image.ndim:
                raise InputError(f"{rec.landmarks}: {landmarks.shape[1]}D points for a "
                                 f"{image.ndim}D image")
            if rec.landmarks_frame == "index":
                landmarks = image.grid.transform_points(landmarks, "index", "world")
        info = PrepInfo(image.grid, image.grid, self.prep.normalise, shift, scale, clip, str(rec.image))
        loaded = _Loaded(norm, labels, landmarks, mask, info)
        if self.cache:
            self._cache[index] = loaded
        return loaded

    @staticmethod
    def _read_on_grid(path: Path | None, image: Image, what: str) -> Image | None:
        """A label map or mask that must lie on ``image``'s grid."""
        if path is None:
            return None
        out = read_image(path, label=True)
        if not out.grid.allclose(image.grid):
            raise InputError(f"{path}: the {what}'s grid {out.grid} differs from its image's "
                             f"{image.grid} ({image.name}); resample it onto the image")
        return out

    def _on_grid(self, loaded: _Loaded, grid: Grid, own: bool
                 ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        key = _grid_key(grid)
        if key in loaded.prepared:
            return loaded.prepared[key]
        image = resample_prepared(loaded.image, grid, self.prep)
        labels = None if loaded.labels is None else resample_prepared(loaded.labels, grid, self.prep,
                                                                      labels=True)
        mask = None if loaded.mask is None else \
            (resample_prepared(loaded.mask, grid, self.prep, labels=True) > 0).float()
        out = (image, labels, mask)
        if self.cache and own:
            loaded.prepared[key] = out
        return out

    def __getitem__(self, idx: int) -> Pair:
        fi, mi = self.pairs[idx]
        fix, mov = self._load(fi), self._load(mi)
        grid = network_grid(fix.image.grid, self.prep)
        f_img, f_lab, f_mask = self._on_grid(fix, grid, own=True)
        if self.prep.initialisation == "none":
            own_moving = _grid_key(network_grid(mov.image.grid, self.prep)) == _grid_key(grid)
            m_img, m_lab, _ = self._on_grid(mov, grid, own=own_moving)
            init = None
        else:  # the moving image goes on the grid through the initial alignment T₀
            init = initial_transform(fix.image, mov.image, self.prep.initialisation).to(torch.float32)
            m_img = resample_prepared(mov.image, grid, self.prep, transform=init)
            m_lab = None if mov.labels is None else resample_prepared(
                mov.labels, grid, self.prep, labels=True, transform=init)

        def points(loaded: _Loaded, inverse: SpatialTransform | None = None) -> Tensor | None:
            if loaded.landmarks is None:
                return None
            pts = loaded.landmarks if inverse is None else inverse(loaded.landmarks.to(torch.float32))
            return grid.transform_points(pts, "world", "index").float()

        f_rec, m_rec = self.records[fi], self.records[mi]
        meta = {
            "fixed_info": _with_network(fix.info, grid), "moving_info": _with_network(mov.info, grid),
            "fixed_path": str(f_rec.image), "moving_path": str(m_rec.image),
            "fixed_labels_path": None if f_rec.labels is None else str(f_rec.labels),
            "moving_labels_path": None if m_rec.labels is None else str(m_rec.labels),
            "pair_index": idx, "initial_transform": init,
        }
        pair = Pair(fixed=f_img, moving=m_img, fixed_labels=f_lab, moving_labels=m_lab,
                    fixed_points=points(fix),
                    moving_points=points(mov, None if init is None else init.inverse()), mask=f_mask, grid=grid,
                    fixed_id=f_rec.subject, moving_id=m_rec.subject, meta=meta)
        if self.augment is not None:
            gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, idx))
            pair = self.augment(pair, gen)
        return pair


def _with_network(info: PrepInfo, grid: Grid) -> PrepInfo:
    return PrepInfo(info.original, grid, info.normalise, info.shift, info.scale, info.clip,
                    info.name, info.labels)


#: mode → generator of one synthetic pair ``(image, labels, grid, cfg, generator) -> Pair``.
_SYNTH_MODES: dict[str, Callable[..., Pair]] = {
    "deformed": lambda image, labels, grid, cfg, gen: deformed_pair(image, labels, grid.spacing,
                                                                     cfg, gen, grid=grid),
    "labels": lambda image, labels, grid, cfg, gen: synth_label_pair(grid.shape, grid.spacing, cfg,
                                                                      gen, labels, grid=grid),
}


class SyntheticPairDataset(Dataset):
    """Pairs with a known displacement, drawn from :mod:`medreg.train.synth`.

    Args:
        images: source images: :class:`~medreg.core.Image` (prepared onto their network grid
            with ``prep``) or ``(C, *S)`` tensors already on a network grid (``spacing`` mm).
            May be empty/``None`` in ``labels`` mode with ``shape`` given (pure SynthMorph).
        labels: label maps of the images (same order; ``Image`` or ``(1, *S)`` tensors).
        cfg: synthesis parameters.
        length: items per epoch.
        seed: item ``i`` of epoch ``e`` is drawn from a generator seeded with ``(seed, e, i)``,
            so distributed ranks that take different indices draw different, reproducible samples.
        mode: ``deformed`` (:func:`~medreg.train.synth.deformed_pair`: a source image and its
            warped copy) or ``labels`` (:func:`~medreg.train.synth.synth_label_pair`: label maps
            rendered with random contrasts; the images are not used, their label maps are when
            given, otherwise random label maps of ``shape``).
        shape, spacing: the grid of random label maps (``labels`` mode without label maps) and
            the spacing of tensor inputs.
        prep: preprocessing of :class:`Image` inputs (default :class:`PreprocessConfig`).
        augment: augmentation applied after synthesis (the ground truth follows it).
    """

    def __init__(self, images: Sequence[Image | Tensor] | None = None,
                 labels: Sequence[Image | Tensor | None] | None = None, *,
                 cfg: SynthConfig | None = None, length: int = 100, seed: int = 0,
                 mode: str = "deformed", shape: Sequence[int] | None = None,
                 spacing: Sequence[float] | float | None = None,
                 prep: PreprocessConfig | None = None, augment: Augment | None = None) -> None:
        if mode not in _SYNTH_MODES:
            raise InputError(f"unknown synthetic mode {mode!r}; choose one of "
                             f"{', '.join(_SYNTH_MODES)}")
        if int(length) < 1:
            raise InputError(f"length must be >= 1, got {length}")
        images = list(images or [])
        labels = list(labels) if labels is not None else [None] * len(images)
        if labels and images and len(labels) != len(images):
            raise InputError(f"{len(labels)} label maps for {len(images)} images")
        prep = prep or PreprocessConfig()
        self.sources: list[tuple[Tensor | None, Tensor | None, Grid]] = []
        for k in range(max(len(images), len(labels))):
            img = images[k] if images else None
            lab = labels[k]
            self.sources.append(self._source(img, lab, prep, spacing))
        if not self.sources:
            if mode != "labels" or shape is None:
                raise InputError("SyntheticPairDataset needs images (or, in 'labels' mode, label "
                                 "maps or a shape)")
            sp = spacing if spacing is not None else 1.0
            self.sources.append((None, None, Grid.from_shape(tuple(shape), spacing=sp)))
        if mode == "deformed" and any(s[0] is None for s in self.sources):
            raise InputError("'deformed' mode needs an image for every source")
        self.cfg = cfg or SynthConfig()
        self.length = int(length)
        self.seed = int(seed)
        self.mode = mode
        self.augment = augment
        self.epoch = 0

    @staticmethod
    def _source(image: Image | Tensor | None, labels: Image | Tensor | None, prep: PreprocessConfig,
                spacing: Sequence[float] | float | None) -> tuple[Tensor | None, Tensor | None, Grid]:
        """One source on its grid: ``(image (C, *S) | None, labels (1, *S) | None, grid)``."""
        if isinstance(image, Image):
            grid = network_grid(image.grid, prep)
            data, _ = prepare_image(image, grid, prep)
            lab = None
            if labels is not None:
                lab_img = labels if isinstance(labels, Image) else Image(labels, image.grid, "labels")
                if not lab_img.grid.allclose(image.grid):
                    raise InputError(f"{lab_img.name}: the label map's grid differs from its "
                                     f"image's ({image.name}); resample it onto the image")
                lab, _ = prepare_image(lab_img, grid, prep, labels=True)
            return data, lab, grid
        if isinstance(labels, Image):
            if image is not None:
                raise InputError("give images and label maps both as Image or both as tensors")
            grid = network_grid(labels.grid, prep)
            lab, _ = prepare_image(labels, grid, prep, labels=True)
            return None, lab, grid
        ref = image if image is not None else labels
        if ref is None:
            raise InputError("a synthetic source needs an image or a label map")
        d = ref.dim() - 1
        grid = Grid.from_shape(tuple(ref.shape[1:]), spacing=spacing if spacing is not None else 1.0)
        if image is not None and not image.is_floating_point():
            raise InputError("synthetic source images must be float tensors (C, *spatial)")
        if labels is not None and tuple(labels.shape[-d:]) != tuple(ref.shape[1:]):
            raise InputError(f"label map {tuple(labels.shape)} does not match its image "
                             f"{tuple(ref.shape)}")
        lab = None if labels is None else labels.reshape(1, *ref.shape[1:]).long()
        return image, lab, grid

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Select the draws of ``epoch`` (call before each epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, idx: int) -> Pair:
        if not 0 <= idx < self.length:
            raise IndexError(idx)
        gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, idx))
        k = int(torch.randint(len(self.sources), (), generator=gen))
        image, labels, grid = self.sources[k]
        pair = _SYNTH_MODES[self.mode](image, labels, grid, self.cfg, gen)
        pair.fixed_id = pair.moving_id = f"synth{k}"
        pair.meta = {**pair.meta, "source": k, "seed": (self.seed, self.epoch, idx)}
        if self.augment is not None:
            pair = self.augment(pair, gen)
        return pair
