r"""Label overlap after registration: Dice, HD95, Hausdorff and ASSD per label, and their means.

``label_metrics(fixed_labels, warped_labels)`` compares the fixed image's label map with the
moving label map warped onto the fixed grid (``warped(x) = moving(T(x))``).

Per label ``l`` with masks ``F = fixed == l`` and ``W = warped == l``:

* **Dice** = ``2 |F ∩ W| / (|F| + |W|)`` (voxel counts; all voxels have the same volume).
* **HD95**, **HD**, **ASSD**: surface distances in mm, see :mod:`medreg.metrics.surface`.

Every requested label gets a ``status`` and nothing is averaged silently:

* ``ok``: present in both maps.
* ``absent``: in neither map. Dice and distances are undefined (``null`` in JSON). The label
  is **left out of every mean** and listed in ``absent_labels``.
* ``missing_in_warped`` / ``missing_in_fixed``: in one map only. Dice is 0 and **counts in the
  mean Dice** (a structure that vanished is a real failure). Distances are undefined
  (Learn2Reg's script gives ``inf``, which makes the mean infinite). Here they are left out of
  the mean HD95/HD/ASSD and the label is listed in ``missing_in_warped`` /
  ``missing_in_fixed``.

Learn2Reg's ``compute_dice`` skips (NaN) a label absent from the fixed or from the *original
moving* map. That check needs the moving labels, so :func:`label_metrics` only sees the warped
map and cannot make it; the Learn2Reg cohort mode makes it (see :mod:`medreg.metrics.l2r`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage

from medreg.core.errors import InputError
from medreg.core.image import Image
from medreg.metrics._common import check_same_grid, label_array, to_jsonable
from medreg.metrics.surface import surface_metrics

__all__ = ["LabelScore", "LabelMetrics", "dice", "label_metrics"]

_FIND_OBJECTS_MAX = 1 << 20  # label ids above this use the slow per-label bounding box


@dataclass
class LabelScore:
    """Scores of one label.

    Attributes:
        label: label id.
        name: label name ("" if unknown).
        status: ``ok``, ``absent``, ``missing_in_warped`` or ``missing_in_fixed``.
        dice: Dice overlap in [0, 1] (NaN when absent from both maps).
        hd95: 95th-percentile symmetric surface distance, mm (NaN unless ``ok``).
        hd: Hausdorff distance of the surfaces, mm (NaN unless ``ok``).
        assd: average symmetric surface distance, mm (NaN unless ``ok``).
        voxels_fixed: voxel count in the fixed map.
        voxels_warped: voxel count in the warped map.
        volume_fixed_mm3: volume in the fixed map, mm³.
        volume_warped_mm3: volume in the warped map, mm³.
    """

    label: int
    name: str
    status: str
    dice: float
    hd95: float
    hd: float
    assd: float
    voxels_fixed: int
    voxels_warped: int
    volume_fixed_mm3: float
    volume_warped_mm3: float

    def to_dict(self) -> dict:
        """JSON-ready dict (undefined values as ``None``)."""
        return to_jsonable(self.__dict__)


@dataclass
class LabelMetrics:
    """Per-label scores and their means (see the module docstring for the averaging rules).

    Attributes:
        per_label: one :class:`LabelScore` per requested label, in request order.
        mean_dice: mean Dice over labels present in at least one map (NaN if none).
        mean_hd95: mean HD95 over ``ok`` labels, mm.
        mean_hd: mean Hausdorff distance over ``ok`` labels, mm.
        mean_assd: mean ASSD over ``ok`` labels, mm.
        labels_evaluated: the ids in the Dice mean.
        absent_labels: requested ids found in neither map (excluded from every mean).
        missing_in_warped: ids in the fixed map only (Dice 0; no distances).
        missing_in_fixed: ids in the warped map only (Dice 0; no distances).
        surface: whether distances were computed.
    """

    per_label: list[LabelScore]
    mean_dice: float
    mean_hd95: float
    mean_hd: float
    mean_assd: float
    labels_evaluated: list[int] = field(default_factory=list)
    absent_labels: list[int] = field(default_factory=list)
    missing_in_warped: list[int] = field(default_factory=list)
    missing_in_fixed: list[int] = field(default_factory=list)
    surface: bool = True

    def score(self, label: int) -> LabelScore:
        """The :class:`LabelScore` of ``label``."""
        for s in self.per_label:
            if s.label == label:
                return s
        raise KeyError(label)

    def to_dict(self) -> dict:
        """JSON-ready dict: the means, the label lists and ``per_label`` rows."""
        out = {k: v for k, v in self.__dict__.items() if k != "per_label"}
        out["n_labels"] = len(self.per_label)
        out["per_label"] = [s.to_dict() for s in self.per_label]
        out["definitions"] = {
            "dice": "2|F∩W|/(|F|+|W|) per label; mean over labels present in at least one map",
            "hd95": "max of the two directed 95th percentiles of surface-voxel distances, mm "
                    "(Learn2Reg robust Hausdorff, physical spacing); mean over labels in both",
            "assd": "mean of the pooled directed surface distances, mm",
        }
        return to_jsonable(out)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap ``2|A∩B| / (|A|+|B|)`` of two boolean arrays (NaN when both are empty)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def _counts(values: np.ndarray) -> dict[int, int]:
    flat = values.ravel()
    if flat.size == 0:
        return {}
    lo, hi = int(flat.min()), int(flat.max())
    if lo >= 0 and hi < _FIND_OBJECTS_MAX:
        c = np.bincount(flat.astype(np.int64, copy=False))
        nz = np.nonzero(c)[0]
        return dict(zip(nz.tolist(), c[nz].tolist()))
    u, c = np.unique(flat, return_counts=True)
    return dict(zip(u.tolist(), c.tolist()))


def _boxes(arr: np.ndarray, labels: Sequence[int]) -> dict[int, tuple[slice, ...]]:
    """Bounding boxes of the requested labels (labels not present are missing)."""
    out: dict[int, tuple[slice, ...]] = {}
    if arr.size == 0:
        return out
    lo, hi = int(arr.min()), int(arr.max())
    wanted = [l for l in labels if lo <= l <= hi]
    if lo >= 0 and hi < _FIND_OBJECTS_MAX and 0 not in wanted:
        objs = ndimage.find_objects(arr.astype(np.int64, copy=False), max_label=hi)
        for l in wanted:
            if 1 <= l <= len(objs) and objs[l - 1] is not None:
                out[l] = objs[l - 1]
        return out
    for l in wanted:  # generic path (negative ids, huge ids or background requested)
        idx = np.nonzero(arr == l)
        if idx[0].size:
            out[l] = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    return out


def _union_box(a: tuple[slice, ...] | None, b: tuple[slice, ...] | None,
               shape: tuple[int, ...]) -> tuple[slice, ...]:
    boxes = [x for x in (a, b) if x is not None]
    out = []
    for axis, n in enumerate(shape):
        start = min(bx[axis].start for bx in boxes)
        stop = max(bx[axis].stop for bx in boxes)
        # one voxel of margin keeps the surface definition of the full image
        out.append(slice(max(start - 1, 0), min(stop + 1, n)))
    return tuple(out)


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def label_metrics(fixed_labels: Image, warped_labels: Image, labels: Sequence[int] | None = None,
                  names: Mapping[int, str] | None = None, *, surface: bool = True,
                  percentile: float = 95.0) -> LabelMetrics:
    """Dice and surface distances per label between the fixed and the warped label maps.

    Args:
        fixed_labels: the fixed image's label map.
        warped_labels: the moving label map resampled on the fixed grid (same grid).
        labels: the label ids to evaluate; default every non-zero id found in either map.
        names: optional ``{id: name}`` (e.g. from :func:`medreg.metrics.read_label_names`).
        surface: also compute HD95, HD and ASSD (the costly part); otherwise they are NaN.
        percentile: the robust Hausdorff percentile (95).

    Returns:
        :class:`LabelMetrics` (``.to_dict()`` for JSON).

    Raises:
        InputError: different grids or shapes, multi-channel, NaN or non-integer label maps,
            or an empty label list (each message names the file).
    """
    check_same_grid(fixed_labels, warped_labels)
    f = label_array(fixed_labels)
    w = label_array(warped_labels)
    count_f = _counts(f)
    count_w = _counts(w)
    if labels is None:
        found = sorted((set(count_f) | set(count_w)) - {0})
        if not found:
            raise InputError(f"no labels to evaluate: {fixed_labels.name} and "
                             f"{warped_labels.name} contain only background (0)")
        labels = found
    else:
        if isinstance(labels, (int, float)) or (hasattr(labels, "ndim") and labels.ndim == 0):
            labels = [labels]  # one label id
        if isinstance(labels, str) or any(isinstance(v, str) or float(v) != int(v) for v in labels):
            raise InputError(f"labels must be whole label ids (e.g. [1, 2]), got {labels!r}")
        labels = [int(v) for v in labels]
        if not labels:
            raise InputError("the label list is empty; give at least one label id")
        if len(set(labels)) != len(labels):
            labels = list(dict.fromkeys(labels))
    names = dict(names or {})
    voxel_mm3 = float(np.prod(fixed_labels.grid.spacing))

    count_both = _counts(f[f == w])
    box_f = _boxes(f, labels) if surface else {}
    box_w = _boxes(w, labels) if surface else {}

    nan = float("nan")
    scores: list[LabelScore] = []
    for l in labels:
        nf, nw, nfw = count_f.get(l, 0), count_w.get(l, 0), count_both.get(l, 0)
        if nf == 0 and nw == 0:
            status, d = "absent", nan
        elif nw == 0:
            status, d = "missing_in_warped", 0.0
        elif nf == 0:
            status, d = "missing_in_fixed", 0.0
        else:
            status, d = "ok", 2.0 * nfw / (nf + nw)
        dist = {"hd95": nan, "hd": nan, "assd": nan}
        if surface and status == "ok":
            box = _union_box(box_f.get(l), box_w.get(l), f.shape)
            dist = surface_metrics(f[box] == l, w[box] == l, fixed_labels.grid.spacing,
                                   percentile)
        scores.append(LabelScore(
            label=l, name=str(names.get(l, "")), status=status, dice=d, hd95=dist["hd95"],
            hd=dist["hd"], assd=dist["assd"], voxels_fixed=nf, voxels_warped=nw,
            volume_fixed_mm3=nf * voxel_mm3, volume_warped_mm3=nw * voxel_mm3))

    evaluated = [s for s in scores if s.status != "absent"]
    ok = [s for s in scores if s.status == "ok"]
    return LabelMetrics(
        per_label=scores,
        mean_dice=_nanmean([s.dice for s in evaluated]),
        mean_hd95=_nanmean([s.hd95 for s in ok]) if surface else nan,
        mean_hd=_nanmean([s.hd for s in ok]) if surface else nan,
        mean_assd=_nanmean([s.assd for s in ok]) if surface else nan,
        labels_evaluated=[s.label for s in evaluated],
        absent_labels=[s.label for s in scores if s.status == "absent"],
        missing_in_warped=[s.label for s in scores if s.status == "missing_in_warped"],
        missing_in_fixed=[s.label for s in scores if s.status == "missing_in_fixed"],
        surface=surface,
    )
