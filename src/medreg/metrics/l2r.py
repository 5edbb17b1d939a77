r"""Learn2Reg-style task descriptions and per-pair evaluation.

A Learn2Reg task folder holds ``imagesTr/NAME_XXXX_MMMM.nii.gz`` (subject ``XXXX``, modality
``MMMM``) with ``labelsTr``, ``masksTr``, ``landmarksTr``/``keypointsTr`` next to it, and a JSON
description. :meth:`L2RTask.from_json` reads either

* a **dataset description** (``NAME_dataset.json``: ``"registration_val"``,
  ``"registration_test"``, ``"training_paired_images"`` pair lists, ``"labels"`` names), or
* an **evaluation config** (``NAME_VAL_evaluation_config.json``: ``"eval_pairs"``,
  ``"evaluation_methods"``, ``"masked_evaluation"``),

as Learn2Reg's ``evaluation.py`` (github.com/MDL-UzL/L2R) does. Predictions are
``disp_XXXX_YYYY.nii.gz`` (fixed subject, moving subject) or, between modalities,
``disp_XXXX_MMMM_YYYY_NNNN.nii.gz``: voxel displacements on the fixed grid (read with
:func:`medreg.io.read_l2r_displacement`).

Per pair (:func:`evaluate_l2r_pair`), following ``evaluation.py``:

* ``dice``, ``hd95``: the moving labels are warped by nearest neighbour; a label absent from the
  fixed map or from the (original) moving map is skipped (listed in ``skipped_labels``), the
  others are averaged (:func:`medreg.metrics.label_metrics`; HD95 in mm).
* ``tre``: landmark CSVs hold voxel indices (``i, j, k`` = ``x, y, z``); they are converted to
  world mm with each image's grid and :func:`medreg.metrics.tre` gives ``‖T(f) − m‖``.
* ``sdlogj_l2r`` (Learn2Reg's ``LogJacDetStd``, within the fixed mask when
  ``"masked_evaluation"``), plus ``sdlogj``, ``folding_percent`` and ``ndv_percent``
  (:func:`medreg.metrics.displacement_metrics`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.metrics._common import label_array, to_jsonable
from medreg.metrics.jacobian import displacement_metrics
from medreg.metrics.landmarks import tre
from medreg.metrics.overlap import label_metrics

__all__ = ["L2RPair", "L2RTask", "evaluate_l2r_pair", "l2r_points_to_world"]

_CASE = re.compile(r"_(\d{4})_(\d{4})\.(?:nii\.gz|nii|npz|npy)$")

#: Pair-list keys, in the order tried when no split is given.
PAIR_KEYS = ("eval_pairs", "registration_val", "registration_test", "training_paired_images")

_SPLIT_ALIASES = {"val": "registration_val", "validation": "registration_val",
                  "test": "registration_test", "train": "training_paired_images",
                  "training": "training_paired_images", "eval": "eval_pairs"}


@dataclass(frozen=True)
class L2RPair:
    """One fixed/moving pair of a Learn2Reg task (paths relative to the task folder)."""

    fixed: str
    moving: str

    def _case(self, path: str) -> tuple[str, str]:
        m = _CASE.search(os.path.basename(path))
        if not m:
            raise InputError(f"Learn2Reg image name {path!r} does not end in _XXXX_YYYY.nii.gz")
        return m.group(1), m.group(2)

    @property
    def fixed_case(self) -> tuple[str, str]:
        """``(subject, modality)`` of the fixed image, e.g. ``("0395", "0000")``."""
        return self._case(self.fixed)

    @property
    def moving_case(self) -> tuple[str, str]:
        """``(subject, modality)`` of the moving image."""
        return self._case(self.moving)

    @property
    def key(self) -> str:
        """Learn2Reg's case key ``XXXX_MMMM<--YYYY_NNNN`` (fixed <-- moving)."""
        (fs, fm), (ms, mm) = self.fixed_case, self.moving_case
        return f"{fs}_{fm}<--{ms}_{mm}"

    def displacement_names(self) -> list[str]:
        """Accepted prediction file names, preferred first (``disp_XXXX_YYYY.nii.gz`` ...)."""
        (fs, fm), (ms, mm) = self.fixed_case, self.moving_case
        short, full = f"disp_{fs}_{ms}", f"disp_{fs}_{fm}_{ms}_{mm}"
        same = fm == mm or (fm == "0000" and mm == "0001")
        stems = [short, full] if same else [full, short]
        return [s + ext for s in stems for ext in (".nii.gz", ".nii", ".npz")]


@dataclass
class L2RTask:
    """A Learn2Reg task: its folder, pairs and evaluation methods.

    Attributes:
        name: task name.
        root: the task folder (paths in the JSON are relative to it).
        pairs: the pairs to evaluate.
        methods: Learn2Reg ``evaluation_methods`` entries (``{"name", "metric", ...}``), given
            by the JSON or inferred from the files present (:meth:`infer_methods`).
        label_names: ``{id: name}`` from the JSON's ``"labels"`` (background removed).
        masked: evaluate SDlogJ inside the fixed mask (``"masked_evaluation"``).
        source: the JSON file.
        split: the pair-list key used.
    """

    name: str
    root: Path
    pairs: list[L2RPair]
    methods: list[dict[str, Any]] = field(default_factory=list)
    label_names: dict[int, str] = field(default_factory=dict)
    masked: bool = False
    source: Path | None = None
    split: str = ""

    @classmethod
    def from_json(cls, path: str | os.PathLike, split: str | None = None,
                  root: str | os.PathLike | None = None) -> "L2RTask":
        """Read a dataset description or an evaluation config.

        Args:
            path: the JSON file.
            split: pair list: ``val``, ``test``, ``train``, ``eval`` or a key of the JSON; by
                default the first of :data:`PAIR_KEYS` present.
            root: the task folder; default the JSON's folder.

        Raises:
            InputError: unreadable JSON, no pair list, malformed pairs.
        """
        p = Path(path)
        if not p.is_file():
            raise InputError(f"Learn2Reg task description not found: {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise InputError(f"{p}: expected a JSON object")
        if split:
            key = _SPLIT_ALIASES.get(split.lower(), split)
            if key not in data:
                raise InputError(f"{p}: no pair list {key!r}; it has "
                                 f"{[k for k in PAIR_KEYS if k in data] or 'none'}")
        else:
            key = next((k for k in PAIR_KEYS if data.get(k)), "")
            if not key:
                raise InputError(f"{p}: no pairs to evaluate (none of {', '.join(PAIR_KEYS)})")
        raw = data[key]
        if not isinstance(raw, list) or not raw:
            raise InputError(f"{p}: {key!r} is not a non-empty list of pairs")
        pairs = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict) or "fixed" not in item or "moving" not in item:
                raise InputError(f"{p}: {key}[{i}] must be an object with 'fixed' and 'moving'")
            pair = L2RPair(str(item["fixed"]), str(item["moving"]))
            pair.key  # validates the names
            pairs.append(pair)
        names: dict[int, str] = {}
        labels = data.get("labels")
        if isinstance(labels, dict):
            for k, v in labels.items():
                try:
                    idx = int(k)
                except ValueError:
                    continue
                if idx != 0:
                    names[idx] = str(v)
        name = str(data.get("task_name") or data.get("name") or p.stem)
        task = cls(name=name, root=Path(root) if root else p.parent, pairs=pairs,
                   methods=list(data.get("evaluation_methods") or []), label_names=names,
                   masked=bool(data.get("masked_evaluation", False)), source=p, split=key)
        if not task.methods:
            task.methods = task.infer_methods()
        return task

    # ------------------------------------------------------------------ paths
    def path(self, rel: str) -> Path:
        """Absolute path of a JSON-relative path."""
        return (self.root / rel).resolve() if not os.path.isabs(rel) else Path(rel)

    def label_path(self, image_rel: str) -> Path:
        """``imagesTr/..`` → ``labelsTr/..``."""
        return self.path(image_rel.replace("images", "labels"))

    def mask_path(self, image_rel: str) -> Path:
        """``imagesTr/..`` → ``masksTr/..``."""
        return self.path(image_rel.replace("images", "masks"))

    def landmark_path(self, image_rel: str, dest: str) -> Path:
        """``imagesTr/X.nii.gz`` → ``<dest>Tr/X.csv``."""
        rel = image_rel.replace("images", dest)
        rel = re.sub(r"\.nii(\.gz)?$", ".csv", rel)
        return self.path(rel)

    def find_displacement(self, pair: L2RPair, directory: str | os.PathLike) -> Path:
        """The prediction file of ``pair`` in ``directory``.

        Raises:
            InputError: none of the accepted names exists (the message lists them).
        """
        d = Path(directory)
        names = pair.displacement_names()
        for n in names:
            if (d / n).is_file():
                return d / n
        raise InputError(f"{d}: missing displacement for pair {pair.key}: expected "
                         f"{names[0]} (or {names[len(names) // 2]})")

    def infer_methods(self) -> list[dict[str, Any]]:
        """Evaluation methods from the files of the first pair (no ``evaluation_methods``).

        Labels (``labelsTr``) give DSC and HD95 (label ids from the JSON ``"labels"`` or, when
        it names none, every label found); landmark or keypoint CSVs give TRE; SDlogJ always.
        """
        first = self.pairs[0]
        methods: list[dict[str, Any]] = [{"name": "LogJacDetStd", "metric": "sdlogj"}]
        if self.label_path(first.fixed).is_file() and self.label_path(first.moving).is_file():
            ids = sorted(self.label_names) or None
            methods += [{"name": "DSC", "metric": "dice", "labels": ids},
                        {"name": "HD95", "metric": "hd95", "labels": ids}]
        for dest in ("landmarks", "keypoints"):
            if (self.landmark_path(first.fixed, dest).is_file()
                    and self.landmark_path(first.moving, dest).is_file()):
                methods.append({"name": "TRE_lm" if dest == "landmarks" else "TRE_kp",
                                "metric": "tre", "dest": dest})
                break
        return methods

    def metric_kinds(self) -> set[str]:
        """The ``metric`` values of :attr:`methods`."""
        return {str(m.get("metric")) for m in self.methods}

    def labels_for(self, metric: str) -> list[int] | None:
        """Label ids of the first method with this ``metric`` (None: all found)."""
        for m in self.methods:
            if m.get("metric") == metric:
                labels = m.get("labels")
                return [int(v) for v in labels] if labels else None
        return None

    def tre_dest(self) -> str | None:
        """The landmark folder stem of the TRE method (``landmarks``/``keypoints``)."""
        for m in self.methods:
            if m.get("metric") == "tre":
                return str(m.get("dest", "landmarks"))
        return None


def l2r_points_to_world(points: np.ndarray | Tensor, grid: Grid) -> Tensor:
    """Learn2Reg landmark rows (voxel indices ``i, j, k`` = ``x, y, z``) to world LPS mm."""
    idx = torch.as_tensor(np.asarray(points, dtype=np.float64))
    if idx.dim() == 1:
        idx = idx[None]
    if idx.dim() != 2 or idx.shape[1] != grid.ndim:
        raise InputError(f"Learn2Reg landmarks must be (K, {grid.ndim}) voxel indices, got "
                         f"{tuple(idx.shape)}")
    return grid.transform_points(idx, "index", "world")


def evaluate_l2r_pair(task: L2RTask, pair: L2RPair, *, displacement: Tensor, grid: Grid,
                      transform: Callable[[Tensor], Tensor],
                      warp: Callable[[Image], Image] | None = None,
                      fixed_labels: Image | None = None, moving_labels: Image | None = None,
                      fixed_landmarks: Tensor | None = None,
                      moving_landmarks: Tensor | None = None,
                      mask: Image | np.ndarray | None = None) -> dict[str, Any]:
    """Learn2Reg metrics of one pair from already loaded data.

    Args:
        task: the task (which metrics, which labels).
        pair: the pair.
        displacement: ``(1, D, *grid.shape)`` world-mm displacement on the fixed grid.
        grid: the fixed grid.
        transform: fixed → moving point map (for TRE).
        warp: resamples a moving label map onto the fixed grid by nearest neighbour (needed
            with labels).
        fixed_labels, moving_labels: label maps (for ``dice``/``hd95``).
        fixed_landmarks, moving_landmarks: ``(K, D)`` world mm (for ``tre``).
        mask: fixed mask for ``masked_evaluation``.

    Returns:
        ``{"pair", "dice", "hd95", "tre", "sdlogj_l2r", "sdlogj", "folding_percent",
        "ndv_percent", "details": {...}}``: the flat numbers :func:`summarize_cohort` reads,
        and per-label / per-landmark details.
    """
    kinds = task.metric_kinds()
    row: dict[str, Any] = {"pair": pair.key}
    details: dict[str, Any] = {}
    dm = displacement_metrics(displacement, grid, mask if task.masked else None,
                              name=f"displacement of {pair.key}")
    row.update(sdlogj_l2r=dm["sdlogj_l2r"], sdlogj=dm["sdlogj"],
               folding_percent=dm["folding_percent"], ndv_percent=dm["ndv_percent"])
    details["displacement"] = dm
    if kinds & {"dice", "hd95"}:
        if fixed_labels is None or moving_labels is None or warp is None:
            raise InputError(f"pair {pair.key}: label maps are needed for Dice/HD95")
        f_ids = set(np.unique(label_array(fixed_labels)).tolist()) - {0}
        m_ids = set(np.unique(label_array(moving_labels)).tolist()) - {0}
        wanted = task.labels_for("dice") or task.labels_for("hd95") or sorted(f_ids | m_ids)
        used = [l for l in wanted if l in f_ids and l in m_ids]
        skipped = [l for l in wanted if l not in used]
        if not used:
            raise InputError(f"pair {pair.key}: none of the task's labels is present in both "
                             f"{fixed_labels.name} and {moving_labels.name}")
        warped = warp(moving_labels)
        lm = label_metrics(fixed_labels, warped, used, task.label_names,
                           surface="hd95" in kinds)
        if "dice" in kinds:
            row["dice"] = lm.mean_dice
        if "hd95" in kinds:
            row["hd95"] = lm.mean_hd95
        d = lm.to_dict()
        d["skipped_labels"] = skipped
        details["labels"] = d
    if "tre" in kinds:
        if fixed_landmarks is None or moving_landmarks is None:
            raise InputError(f"pair {pair.key}: landmarks are needed for TRE")
        t = tre(fixed_landmarks, moving_landmarks, transform, grid=grid)
        row["tre"] = t.mean
        row["tre_initial"] = t.initial["mean"]
        details["landmarks"] = t.to_dict()
    row["details"] = details
    return to_jsonable(row)
