"""The contract between datasets / synthetic generators and the training loop.

A :class:`Pair` is one training example already on the **network grid** (see
``medreg.train.preprocess``): fixed and moving share that grid. Conventions as in
``medreg.nets.base``: displacements are voxel units of the network grid, components ``x, y, z``,
fixed → moving (``moving(p + u(p)) ≈ fixed(p)``); points are continuous voxel indices ``x, y, z``
on the network grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from medreg.core.grid import Grid


@dataclass
class Pair:
    """One example. Tensors carry no batch axis.

    Attributes:
        fixed, moving: ``(C, *spatial)`` float32, intensity-normalised.
        fixed_labels, moving_labels: ``(1, *spatial)`` int64 label maps (original label ids).
        fixed_points, moving_points: ``(K, D)`` corresponding landmarks, voxel index ``x, y, z``.
        displacement: ``(D, *spatial)`` ground-truth field for supervised training.
        mask: ``(1, *spatial)`` float, where the ground truth / similarity is valid (1 inside).
        grid: the network grid (world geometry of the preprocessed fixed image).
        fixed_id, moving_id: subject identifiers (for logs and splits).
        meta: anything the writer needs to undo preprocessing (``PrepInfo`` objects, paths).
    """

    fixed: Tensor
    moving: Tensor
    fixed_labels: Tensor | None = None
    moving_labels: Tensor | None = None
    fixed_points: Tensor | None = None
    moving_points: Tensor | None = None
    displacement: Tensor | None = None
    mask: Tensor | None = None
    grid: Grid | None = None
    fixed_id: str = ""
    moving_id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


_STACKED = ("fixed", "moving", "fixed_labels", "moving_labels", "displacement", "mask")


@dataclass
class PairBatch:
    """A collated batch: image-like tensors stacked to ``(N, …)``; points, grids, ids and meta
    as lists (their lengths may differ). A stacked field is ``None`` unless every pair has it."""

    fixed: Tensor
    moving: Tensor
    fixed_labels: Tensor | None = None
    moving_labels: Tensor | None = None
    displacement: Tensor | None = None
    mask: Tensor | None = None
    fixed_points: list[Tensor | None] = field(default_factory=list)
    moving_points: list[Tensor | None] = field(default_factory=list)
    grids: list[Grid | None] = field(default_factory=list)
    fixed_ids: list[str] = field(default_factory=list)
    moving_ids: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.fixed.shape[0])

    def to(self, device: torch.device | str) -> "PairBatch":
        """Move tensors (not grids/meta) to ``device``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device, non_blocking=True)
            elif f.name in ("fixed_points", "moving_points"):
                v = [None if p is None else p.to(device) for p in v]
            out[f.name] = v
        return PairBatch(**out)


def collate_pairs(pairs: Sequence[Pair]) -> PairBatch:
    """``DataLoader`` collate function for :class:`Pair` items (all on grids of one shape)."""
    if not pairs:
        raise ValueError("collate_pairs: empty batch")
    shapes = {tuple(p.fixed.shape) for p in pairs} | {tuple(p.moving.shape) for p in pairs}
    if len(shapes) != 1:
        raise ValueError(f"collate_pairs: examples have different shapes {sorted(shapes)}; "
                         "preprocess them to one network size (crop/pad) before batching")
    out: dict[str, Any] = {}
    for name in _STACKED:
        values = [getattr(p, name) for p in pairs]
        out[name] = torch.stack(values) if all(v is not None for v in values) else None
    out["fixed_points"] = [p.fixed_points for p in pairs]
    out["moving_points"] = [p.moving_points for p in pairs]
    out["grids"] = [p.grid for p in pairs]
    out["fixed_ids"] = [p.fixed_id for p in pairs]
    out["moving_ids"] = [p.moving_id for p in pairs]
    out["meta"] = [p.meta for p in pairs]
    return PairBatch(**out)
