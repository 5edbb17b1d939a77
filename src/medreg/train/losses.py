r"""The training loss of a registration network, built from :class:`~medreg.train.config.LossConfig`.

Given a :class:`~medreg.nets.base.NetOutput` and a :class:`~medreg.train.batch.PairBatch` on the
network grid, :class:`TrainingLoss` returns ``Σ weight · term`` and every term's unweighted value:

* **similarity** (``medreg.losses`` registry, e.g. ``lncc``) of the fixed image and the moving
  image warped by ``u`` (:func:`medreg.nets.functional.warp_voxel`), within ``PairBatch.mask``;
* **regularisers** of ``u`` in **world mm** on the network grid: the voxel-unit field is mapped
  by ``direction · diag(spacing)`` of each pair's grid, so weights mean the same at every
  resolution (see :mod:`medreg.losses.functional`); with a sampled λ (conditional networks) every
  regulariser weight is multiplied by λ;
* **dice** (weak supervision): soft Dice of the fixed one-hot labels and the moving one-hot
  labels warped linearly by ``u`` (label ids of the batch mapped to channels; background out
  unless ``dice_background``);
* **epe** (supervised): end-point error in mm against ``PairBatch.displacement``, masked;
* **tre** (landmarks): mm distance between ``T(fixed landmarks) = p + u(p)`` and the moving
  landmarks;
* ``NetOutput.penalty`` (already weighted by the network);
* every coarser level of ``NetOutput.levels`` scored the same way on images, labels, fields and
  grids resampled to its size (corner-aligned, as :func:`medreg.nets.functional.resize_field`),
  times ``level_weights``;
* with ``bidirectional``, the same terms for ``NetOutput.inverse`` with the roles of fixed and
  moving swapped (no supervised term: the inverse ground truth is unknown), averaged with the
  forward terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medreg.core.enums import Frame
from medreg.core.errors import InputError
from medreg.core.functional import gaussian_smooth
from medreg.core.grid import Grid
from medreg.losses.registry import create
from medreg.nets.functional import resize_field, voxel_to_norm, warp_voxel

if TYPE_CHECKING:
    from medreg.nets.base import NetOutput
    from medreg.train.batch import PairBatch
    from medreg.train.config import LossConfig

__all__ = ["LossOutput", "TrainingLoss", "build_loss", "check_loss_config", "displacement_mm",
           "label_channels"]


@dataclass
class LossOutput:
    """Result of :class:`TrainingLoss`.

    Attributes:
        total: the weighted sum (scalar, differentiable).
        terms: unweighted term values by label (detached scalars), for logging.
    """

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- geometry helpers
def _grids(grids: Sequence[Grid | None], shape: Sequence[int]) -> list[Grid]:
    """The batch's grids (a 1 mm identity grid where a pair has none)."""
    out = []
    for g in grids:
        if g is None:
            g = Grid.from_shape(shape)
        elif tuple(g.shape) != tuple(shape):
            raise InputError(f"a pair's grid {g.shape} does not match its tensors {tuple(shape)}; "
                             "datasets must give the network grid")
        out.append(g)
    return out


def _uniform(grids: Sequence[Grid]) -> bool:
    """All grids share spacing and direction (the values batched terms depend on)."""
    g0 = grids[0]
    return all(np.allclose(g.spacing, g0.spacing) and np.allclose(g.direction, g0.direction)
               for g in grids[1:])


def displacement_mm(disp: Tensor, grids: Sequence[Grid]) -> Tensor:
    """Voxel-unit displacements ``(N, D, *spatial)`` (components ``x, y, z``) → world mm vectors
    (``direction · diag(spacing) · u`` of each sample's grid)."""
    mats = [torch.as_tensor(g.direction @ np.diag(g.spacing), dtype=disp.dtype) for g in grids]
    m = torch.stack(mats).to(disp.device)
    if len(grids) == 1 and disp.shape[0] > 1:
        m = m.expand(disp.shape[0], -1, -1)
    return torch.einsum("nij,nj...->ni...", m, disp)


def _per_grid(fn: Callable[..., Tensor], tensors: Sequence[Tensor | None],
              grids: Sequence[Grid]) -> Tensor:
    """``fn(*tensors, grid)`` batched when the grids agree, else the mean of per-sample values."""
    if _uniform(grids):
        return fn(*tensors, grids[0])
    vals = [fn(*[None if t is None else t[i:i + 1] for t in tensors], g)
            for i, g in enumerate(grids)]
    return torch.stack(vals).mean()


def label_channels(fixed: Tensor, moving: Tensor, background: bool = False
                   ) -> tuple[Tensor, Tensor, list[int]]:
    """One-hot maps of two ``(N, 1, *spatial)`` integer label maps over the label ids present in
    either (sorted ids → channels 0..L−1), and the channels to score (label 0 left out unless
    ``background``)."""
    ids = torch.unique(torch.cat([fixed.flatten(), moving.flatten()]))
    n = int(ids.numel())

    def onehot(lab: Tensor) -> Tensor:
        idx = torch.searchsorted(ids, lab[:, 0].contiguous())
        return F.one_hot(idx, n).movedim(-1, 1).float()

    keep = [i for i, v in enumerate(ids.tolist()) if background or v != 0]
    return onehot(fixed), onehot(moving), keep


def _resample(x: Tensor, shape: Sequence[int]) -> Tensor:
    """Corner-aligned linear resampling of ``(N, C, *spatial)`` to ``shape``, Gaussian
    pre-smoothed when shrinking (σ = (factor − 1) / 2 voxels per axis)."""
    old = x.shape[2:]
    if tuple(old) == tuple(shape):
        return x
    factors = [(o - 1) / max(n - 1, 1) for o, n in zip(old, shape)]  # tensor order
    sigma = [max(f - 1.0, 0.0) / 2.0 for f in factors][::-1]  # x, y, z
    if any(s > 0 for s in sigma):
        x = gaussian_smooth(x, sigma, [1.0] * len(shape))
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(x, size=tuple(shape), mode=mode, align_corners=True)


def _level_grid(g: Grid, shape: Sequence[int]) -> Grid:
    """The grid of a corner-aligned resampling of ``g`` to ``shape`` (same first and last voxel
    centres, as :func:`~medreg.nets.functional.resize_field` assumes)."""
    size = tuple(int(n) for n in shape[::-1])
    spacing = [sp * (n - 1) / max(m - 1, 1) for sp, n, m in zip(g.spacing, g.size, size)]
    return Grid(size, spacing, g.origin, g.direction)


# ----------------------------------------------------------------------------- one resolution
@dataclass
class _View:
    """What the terms compare, at one resolution and in one direction."""

    fixed: Tensor
    moving: Tensor
    grids: list[Grid]
    fixed_onehot: Tensor | None = None
    moving_onehot: Tensor | None = None
    keep: list[int] = field(default_factory=list)
    target: Tensor | None = None  # ground-truth displacement, voxel units
    mask: Tensor | None = None
    fixed_points: list[Tensor | None] = field(default_factory=list)
    moving_points: list[Tensor | None] = field(default_factory=list)

    def swapped(self) -> "_View":
        return _View(self.moving, self.fixed, self.grids, self.moving_onehot, self.fixed_onehot,
                     self.keep, None, None, self.moving_points, self.fixed_points)

    def resized(self, shape: Sequence[int]) -> "_View":
        shape = tuple(int(s) for s in shape)
        if shape == tuple(self.fixed.shape[2:]):
            return self
        old = self.fixed.shape[2:]
        scale = torch.tensor([(n - 1) / max(o - 1, 1) for n, o in zip(shape[::-1], old[::-1])])

        def pts(p: Tensor | None) -> Tensor | None:
            return None if p is None else p * scale.to(p)

        return _View(
            _resample(self.fixed, shape), _resample(self.moving, shape),
            [_level_grid(g, shape) for g in self.grids],
            None if self.fixed_onehot is None else _resample(self.fixed_onehot, shape),
            None if self.moving_onehot is None else _resample(self.moving_onehot, shape),
            self.keep,
            None if self.target is None else resize_field(self.target, shape),
            None if self.mask is None else _resample(self.mask, shape),
            [pts(p) for p in self.fixed_points], [pts(p) for p in self.moving_points])


def _sample_at(field_: Tensor, points: Tensor) -> Tensor:
    """Values of ``(1, D, *spatial)`` at ``(K, D)`` voxel points (``x, y, z``) → ``(K, D)``."""
    d = points.shape[-1]
    norm = voxel_to_norm(points.to(field_.dtype), field_.shape[2:])
    grid = norm.view(1, *([1] * (d - 1)), -1, d)
    out = F.grid_sample(field_, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(field_.shape[1], -1).T


class TrainingLoss(nn.Module):
    """The weighted training loss (see the module docstring).

    Args:
        cfg: the ``loss`` section of a training config.
    """

    def __init__(self, cfg: "LossConfig") -> None:
        super().__init__()
        self.cfg = cfg
        self.similarity: nn.Module | None = None
        self.similarity_label = ""
        self.similarity_weight = 0.0
        if cfg.similarity is not None:
            s = dict(cfg.similarity)
            name = s.pop("name", None)
            if name is None:
                raise InputError("loss: similarity needs a 'name' (e.g. lncc, ncc, mse, mi, mind)")
            self.similarity_weight = _weight(s.pop("weight", 1.0), "similarity")
            self.similarity = _module(name, s, "similarity", "loss: similarity")
            self.similarity_label = str(name).lower()
        self.reg_weights: dict[str, float] = {}
        self.regularisers = nn.ModuleDict()
        for label, spec in cfg.regularisation.items():
            if isinstance(spec, Mapping):
                spec = dict(spec)
                weight = spec.pop("weight", 1.0)
                name = spec.pop("name", label)
            else:
                weight, name, spec = spec, label, {}
            self.reg_weights[str(label)] = _weight(weight, f"regularisation {label}")
            self.regularisers[str(label)] = _module(name, spec, "regulariser",
                                                    f"loss: regularisation {label}")
        self.dice = create("dice") if cfg.dice > 0 else None
        self.epe = create("epe") if cfg.supervised > 0 else None
        self.tre = create("tre") if cfg.landmarks > 0 else None
        if self.similarity is None and self.dice is None and self.epe is None and self.tre is None:
            raise InputError("loss: no data term; give a similarity or a dice, supervised or "
                             "landmarks weight > 0")

    # ------------------------------------------------------------------ terms at one resolution
    def _terms(self, view: _View, disp: Tensor, reg_scale: float, supervised: bool
               ) -> tuple[Tensor, dict[str, Tensor]]:
        total = disp.new_zeros(())
        terms: dict[str, Tensor] = {}

        def add(label: str, weight: float, value: Tensor) -> None:
            nonlocal total
            terms[label] = value.detach()
            total = total + weight * value

        if self.similarity is not None and self.similarity_weight > 0:
            warped = warp_voxel(view.moving, disp)
            sim = self.similarity
            add(self.similarity_label, self.similarity_weight,
                _per_grid(lambda f, w, m, g: sim(f, w, m, spacing=g),
                          [view.fixed, warped, view.mask], view.grids))
        if self.regularisers or self.epe is not None:
            u_mm = displacement_mm(disp, view.grids)
        for label, module in self.regularisers.items():
            add(label, self.reg_weights[label] * reg_scale,
                _per_grid(lambda u, g, m=module: m(u, g), [u_mm], view.grids))
        if self.dice is not None and view.fixed_onehot is not None and view.keep:
            warped_oh = warp_voxel(view.moving_onehot, disp)
            add("dice", self.cfg.dice,
                self.dice(view.fixed_onehot[:, view.keep], warped_oh[:, view.keep], view.mask))
        if supervised and self.epe is not None:
            if view.target is None:
                raise InputError("loss: supervised > 0 needs pairs with a ground-truth "
                                 "displacement (e.g. a synthetic source of kind deformed)")
            target = displacement_mm(view.target.to(disp), view.grids)
            add("epe", self.cfg.supervised, self.epe(u_mm, target, view.mask))
        if self.tre is not None:
            tre = self._landmarks(view, disp)
            if tre is not None:
                add("tre", self.cfg.landmarks, tre)
        return total, terms

    def _landmarks(self, view: _View, disp: Tensor) -> Tensor | None:
        vals = []
        for i, (pf, pm) in enumerate(zip(view.fixed_points, view.moving_points)):
            if pf is None or pm is None or len(pf) == 0:
                continue
            if pf.shape != pm.shape:
                raise InputError(f"pair {i}: fixed and moving landmarks differ in count "
                                 f"({tuple(pf.shape)} vs {tuple(pm.shape)})")
            pf = pf.to(disp)
            mapped = pf + _sample_at(disp[i:i + 1], pf)
            g = view.grids[i]
            vals.append(self.tre(g.transform_points(mapped, Frame.INDEX, Frame.WORLD),
                                 g.transform_points(pm.to(disp), Frame.INDEX, Frame.WORLD)))
        return torch.stack(vals).mean() if vals else None

    # ------------------------------------------------------------------ everything
    def forward(self, out: "NetOutput", batch: "PairBatch",
                reg_weight: float | None = None) -> LossOutput:
        """The loss of a network output on a batch.

        Args:
            out: the network's output (voxel units of the network grid).
            batch: the pairs (network grid).
            reg_weight: λ of conditional training: multiplies every regulariser weight.
        """
        disp = out.displacement.float()
        view = self.view(batch)
        scale = 1.0 if reg_weight is None else float(reg_weight)
        total, terms = self._directed(view, out, disp, scale, supervised=True, prefix="")
        if self.cfg.bidirectional:
            if out.inverse is None:
                raise InputError("loss: bidirectional needs a network that returns the inverse "
                                 "field (a diffeomorphic network); set bidirectional: false")
            inv_levels = [replace(lv, displacement=lv.inverse) for lv in out.levels
                          if lv.inverse is not None]
            inv_out = replace(out, displacement=out.inverse, levels=inv_levels)
            t_inv, terms_inv = self._directed(view.swapped(), inv_out, out.inverse.float(),
                                              scale, supervised=False, prefix="inv_")
            total = 0.5 * (total + t_inv)
            terms.update(terms_inv)
        if out.penalty is not None:
            terms["penalty"] = out.penalty.detach().float()
            total = total + out.penalty.float()
        return LossOutput(total, terms)

    def _directed(self, view: _View, out: "NetOutput", disp: Tensor, scale: float,
                  supervised: bool, prefix: str) -> tuple[Tensor, dict[str, Tensor]]:
        total, terms = self._terms(view, disp, scale, supervised)
        terms = {prefix + k: v for k, v in terms.items()}
        weights = self._level_weights(len(out.levels))
        for k, (level, w) in enumerate(zip(out.levels, weights)):
            if w == 0:
                continue
            lv_disp = level.displacement.float()
            t, lt = self._terms(view.resized(lv_disp.shape[2:]), lv_disp, scale, supervised)
            total = total + w * t
            terms.update({f"{prefix}level{k}_{name}": v for name, v in lt.items()})
        return total, terms

    def _level_weights(self, n: int) -> list[float]:
        lw = self.cfg.level_weights
        if isinstance(lw, list):
            if n and len(lw) != n:
                raise InputError(f"loss: level_weights has {len(lw)} values but the network "
                                 f"returns {n} levels; give one weight per level or one number")
            return lw
        return [float(lw)] * n

    def view(self, batch: "PairBatch") -> _View:
        """The full-resolution forward view of a batch (float images, one-hot labels)."""
        fixed = batch.fixed.float()
        grids = _grids(batch.grids or [None] * len(batch), fixed.shape[2:])
        fo = mo = None
        keep: list[int] = []
        if self.dice is not None:
            if batch.fixed_labels is None or batch.moving_labels is None:
                raise InputError("loss: dice > 0 needs pairs with fixed and moving labels")
            fo, mo, keep = label_channels(batch.fixed_labels, batch.moving_labels,
                                          self.cfg.dice_background)
        if self.tre is not None and all(p is None for p in batch.fixed_points):
            raise InputError("loss: landmarks > 0 needs pairs with landmarks")
        return _View(fixed, batch.moving.float(), grids, fo, mo, keep,
                     None if batch.displacement is None else batch.displacement.float(),
                     None if batch.mask is None else batch.mask.float(),
                     list(batch.fixed_points) or [None] * len(batch),
                     list(batch.moving_points) or [None] * len(batch))


def _weight(value: Any, what: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise InputError(f"loss: weight of {what} must be a number, got {value!r}") from None
    if not np.isfinite(w) or w < 0:
        raise InputError(f"loss: weight of {what} must be finite and >= 0, got {value!r}")
    return w


def _module(name: str, params: Mapping[str, Any], kind: str, where: str) -> nn.Module:
    try:
        module = create(name, **params)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    if getattr(module, "kind", None) != kind:
        raise InputError(f"{where}: {name!r} is a {getattr(module, 'kind', '?')} loss, not a {kind}")
    return module


def build_loss(cfg: "LossConfig") -> TrainingLoss:
    """The :class:`TrainingLoss` of a config's ``loss`` section."""
    return TrainingLoss(cfg)


def check_loss_config(cfg: "LossConfig") -> None:
    """Raise ``InputError`` if the loss section cannot be built (called when a config is read)."""
    TrainingLoss(cfg)
