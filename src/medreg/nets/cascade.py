"""Multi-stage cascade: an affine stage followed by deformable U-Net stages (DLIR style).

Reference:
    B. D. de Vos, F. F. Berendsen, M. A. Viergever, H. Sokooti, M. Staring, I. Išgum (2019),
    "A deep learning framework for unsupervised affine and deformable image registration",
    Medical Image Analysis 52.

Reproduced: a stack of ConvNets trained stage by stage: an affine stage (a small CNN whose
pooled features regress an affine, identity-initialised) followed by deformable stages, each
seeing the fixed image and the moving image warped by everything before (resampled once from the
original moving image), its field composed with the previous ones; stages can be frozen
(:meth:`CascadeNet.freeze_stages`) for DLIR's stage-wise training, and every stage's cumulative
output is returned for per-stage losses.

Differences: DLIR's affine ConvNet has separate fixed/moving pipelines, here one shared-weight
pipeline runs on both and the pooled features are concatenated; DLIR's deformable stages predict
B-spline control points, here each stage is a small U-Net whose field may be predicted on a
coarser grid (``stage_downsample`` = 2^k ends the decoder k levels early and upsamples the field
linearly — a coarse-grid, B-spline-like parameterisation, with linear rather than cubic B-spline
interpolation).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from medreg.core.errors import InputError
from medreg.nets.base import NetOutput, RegistrationNet, register_net
from medreg.nets.functional import (affine_to_displacement, compose_voxel, crop_to, pad_to_multiple,
                                    resize_field, warp_voxel)
from medreg.nets.layers import AffineHead, ConvBlock, UNetBackbone, check_pair, flow_head


class AffineStage(nn.Module):
    """Shared-weight CNN on fixed and moving (conv blocks, 2× average pooling between them),
    pooled features concatenated → :class:`AffineHead` (identity-initialised).
    ``forward(fixed, moving) -> (N, D, D + 1)`` voxel-index affine, fixed → moving."""

    def __init__(self, ndim: int, in_channels: int, features: Sequence[int]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        prev = in_channels
        for f in features:
            self.blocks.append(ConvBlock(ndim, prev, int(f)))
            prev = int(f)
        self.pool = (nn.functional.avg_pool2d, nn.functional.avg_pool3d)[ndim - 2]
        self.head = AffineHead(ndim, 2 * prev)

    def encode(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.blocks) - 1 and min(x.shape[2:]) >= 2:
                x = self.pool(x, 2, ceil_mode=True)
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        feats = self.encode(torch.cat([fixed, moving], dim=0))
        n = fixed.shape[0]
        affine, _ = self.head(torch.cat([feats[:n], feats[n:]], dim=1), fixed.shape[2:])
        return affine


class DeformableStage(nn.Module):
    """U-Net on ``cat(fixed, warped moving)`` → residual displacement (voxel units), predicted at
    ``1/downsample`` resolution and resized up; near-zero at init."""

    def __init__(self, ndim: int, in_channels: int, features: Sequence[int],
                 decoder_features: Sequence[int], downsample: int) -> None:
        super().__init__()
        stop = int(downsample).bit_length() - 1
        if downsample < 1 or 2 ** stop != downsample or stop >= len(features):
            raise InputError(f"cascade: stage_downsample must be a power of 2 below "
                             f"{2 ** len(features)}, got {downsample}")
        self.backbone = UNetBackbone(ndim, 2 * in_channels, features, decoder_features, stop)
        self.head = flow_head(ndim, self.backbone.out_channels)

    def forward(self, fixed: Tensor, warped: Tensor) -> Tensor:
        x, shape = pad_to_multiple(torch.cat([fixed, warped], dim=1), self.backbone.multiple)
        field = self.head(self.backbone(x))
        return crop_to(resize_field(field, x.shape[2:]), shape)


@register_net("cascade")
class CascadeNet(RegistrationNet):
    """Affine stage + ``stages`` deformable stages; stage 0 is the affine stage.

    Args:
        ndim, in_channels: as every net.
        stages: number of deformable stages after the affine stage.
        affine_features: widths of the affine stage's conv blocks.
        features, decoder_features: widths of each deformable stage's U-Net.
        stage_downsample: one int per deformable stage (or one for all): the field of that stage
            is predicted on a grid coarser by this power of 2 (1 = full resolution).
        trainable_stages: indices (0 = affine) of the stages to train; ``None`` = all. Others
            have ``requires_grad = False`` (see :meth:`freeze_stages`).
    Output: the total displacement; ``affine`` = the affine stage's matrix; ``levels`` = each
    stage's cumulative ``NetOutput`` (``extras['scale'] = 1``, ``extras['stage']``).
    """

    def __init__(self, ndim: int, in_channels: int = 1, stages: int = 2,
                 affine_features: Sequence[int] = (8, 16, 32, 32),
                 features: Sequence[int] = (16, 32, 32),
                 decoder_features: Sequence[int] = (32, 16, 16),
                 stage_downsample: int | Sequence[int] = 1,
                 trainable_stages: Sequence[int] | None = None) -> None:
        super().__init__(ndim, in_channels)
        if stages < 0:
            raise InputError(f"cascade: stages must be ≥ 0, got {stages}")
        self.stages = int(stages)
        self.affine_features = [int(f) for f in affine_features]
        self.features = [int(f) for f in features]
        self.decoder_features = [int(f) for f in decoder_features]
        down = ([int(stage_downsample)] * self.stages if isinstance(stage_downsample, int)
                else [int(s) for s in stage_downsample])
        if len(down) != self.stages:
            raise InputError(f"cascade: stage_downsample has {len(down)} values for "
                             f"{self.stages} deformable stages")
        self.stage_downsample = stage_downsample if isinstance(stage_downsample, int) else down
        self.affine_stage = AffineStage(ndim, in_channels, self.affine_features)
        self.deformable = nn.ModuleList(
            DeformableStage(ndim, in_channels, self.features, self.decoder_features, s)
            for s in down)
        self.trainable_stages: list[int] | None = None
        self.set_trainable(trainable_stages)

    def stage_modules(self) -> list[nn.Module]:
        """Stage 0 is the affine stage, stages 1 … ``stages`` the deformable ones."""
        return [self.affine_stage, *self.deformable]

    def set_trainable(self, stages: Sequence[int] | None) -> None:
        """Train only the stages whose indices are in ``stages`` (``None`` = all)."""
        total = self.stages + 1
        if stages is not None:
            stages = sorted({int(s) for s in stages})
            if any(not 0 <= s < total for s in stages):
                raise InputError(f"cascade: trainable_stages {stages} out of range 0 … {total - 1}")
        self.trainable_stages = None if stages is None or len(stages) == total else list(stages)
        for i, module in enumerate(self.stage_modules()):
            module.requires_grad_(stages is None or i in stages)

    def freeze_stages(self, n: int) -> None:
        """Freeze the first ``n`` stages (the affine stage counts as the first): their parameters
        get ``requires_grad = False``; the later stages become trainable."""
        if not 0 <= n <= self.stages + 1:
            raise InputError(f"cascade: can freeze 0 … {self.stages + 1} stages, got {n}")
        self.set_trainable(range(n, self.stages + 1))

    def _frozen(self, i: int) -> bool:
        return self.trainable_stages is not None and i not in self.trainable_stages

    def forward(self, fixed: Tensor, moving: Tensor,
                reg_weight: float | Tensor | None = None) -> NetOutput:
        """``fixed``, ``moving``: ``(N, C, *spatial)`` on one grid; returns voxel-unit fields."""
        check_pair(self, fixed, moving)
        self.check_regularisation(reg_weight)
        shape = fixed.shape[2:]
        # a leading run of frozen stages needs no autograd graph
        no_grad_upto = 0
        while no_grad_upto <= self.stages and self._frozen(no_grad_upto):
            no_grad_upto += 1
        with torch.set_grad_enabled(torch.is_grad_enabled() and no_grad_upto == 0):
            affine = self.affine_stage(fixed, moving)
            total = affine_to_displacement(affine, shape)
        levels = [NetOutput(displacement=total, affine=affine, extras={"scale": 1, "stage": 0})]
        for i, stage in enumerate(self.deformable, start=1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and no_grad_upto <= i):
                warped = warp_voxel(moving, total)
                total = compose_voxel(stage(fixed, warped), total)
            levels.append(NetOutput(displacement=total, affine=affine,
                                    extras={"scale": 1, "stage": i}))
        final = levels[-1]
        return NetOutput(displacement=final.displacement, affine=affine, levels=levels[:-1],
                         extras={"stage": self.stages})
