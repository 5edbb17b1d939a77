"""Two-stream feature pyramid with a local correlation (cost volume) and warping at every level.

References:
    D. Sun, X. Yang, M.-Y. Liu, J. Kautz (2018), "PWC-Net: CNNs for Optical Flow Using Pyramid,
    Warping, and Cost Volume", CVPR 2018.
    X. Hu, M. Kang, W. Huang, M. R. Scott, R. Wiest, M. Reyes (2019), "Dual-Stream Pyramid
    Registration Network", MICCAI 2019 (LNCS 11765).

Reproduced: a shared-weight feature encoder applied to both images (two streams), a coarse →
fine estimation where at each level the moving features are warped by the upsampled current
field, a local correlation layer (``(2r+1)^D`` displacements within ``search_radius`` voxels of
that level) feeds a small decoder together with the fixed features and the current field, and
the decoder's residual refines the field down to full resolution; every level's field is returned.

Differences: the pyramid is built by corner-aligned linear resampling
(:func:`~medreg.nets.layers.resample`) instead of strided convolutions, so every level's grid is
exactly ``level_shape(shape, 2^k)`` and no padding is needed; residuals are composed with the
current field (``u = r + u_prev(p + r)``) rather than added; no context network (PWC-Net) and no
3D-decoder-feature stream (Dual-PRNet's decoder pyramid) — features come from the encoder only.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from medreg.core.errors import InputError
from medreg.nets.base import NetOutput, RegistrationNet, register_net
from medreg.nets.functional import compose_voxel, resize_field, warp_voxel
from medreg.nets.layers import ConvBlock, check_pair, flow_head, level_shape, resample


def _windows(spatial: Sequence[int], radius: int) -> list[tuple[slice, ...]]:
    """Index of the window of a ``radius``-padded tensor for every offset in ``[-r, r]^D``
    (array-axis order, last axis fastest)."""
    return [(slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(off, spatial))
            for off in itertools.product(range(2 * radius + 1), repeat=len(spatial))]


class _LocalCorrelation(torch.autograd.Function):
    """Cost volume with a hand-written backward: one offset at a time in both passes, so the
    memory beyond inputs and output is one feature-map-sized temporary (no per-offset graph)."""

    @staticmethod
    def forward(ctx, fixed: Tensor, moving: Tensor, radius: int) -> Tensor:
        spatial = fixed.shape[2:]
        padded = F.pad(moving, [radius] * (2 * len(spatial)))
        windows = _windows(spatial, radius)
        out = fixed.new_empty((fixed.shape[0], len(windows), *spatial))
        for k, win in enumerate(windows):
            out[:, k] = (fixed * padded[win]).sum(dim=1)
        ctx.save_for_backward(fixed, moving)
        ctx.radius = radius
        return out / fixed.shape[1]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        fixed, moving = ctx.saved_tensors
        r = ctx.radius
        spatial = fixed.shape[2:]
        padded = F.pad(moving, [r] * (2 * len(spatial)))
        grad = grad / fixed.shape[1]
        grad_fixed = torch.zeros_like(fixed) if ctx.needs_input_grad[0] else None
        grad_padded = torch.zeros_like(padded) if ctx.needs_input_grad[1] else None
        for k, win in enumerate(_windows(spatial, r)):
            g = grad[:, k:k + 1]
            if grad_fixed is not None:
                grad_fixed.addcmul_(g, padded[win])
            if grad_padded is not None:
                grad_padded[win].addcmul_(g, fixed)
        grad_moving = None
        if grad_padded is not None:
            grad_moving = grad_padded[(slice(None), slice(None))
                                      + tuple(slice(r, r + n) for n in spatial)]
        return grad_fixed, grad_moving, None


def local_correlation(fixed: Tensor, moving: Tensor, radius: int) -> Tensor:
    """Cost volume ``(N, (2r+1)^D, *spatial)`` of feature maps ``(N, C, *spatial)``: for every
    integer offset ``δ`` in ``[-r, r]^D`` (array-axis order, last axis fastest), the channel mean
    of ``fixed(p) · moving(p + δ)`` (zero outside ``moving``). Dimension-generic; offsets are
    processed one at a time in the forward and backward passes, so extra memory stays about one
    feature map whatever the radius (first-order gradients only)."""
    if fixed.shape != moving.shape:
        raise InputError(f"local_correlation: feature maps {tuple(fixed.shape)} and "
                         f"{tuple(moving.shape)} differ")
    return _LocalCorrelation.apply(fixed, moving, int(radius))


@register_net("pyramid_corr")
class PyramidCorrNet(RegistrationNet):
    """Feature pyramid + correlation + warping, coarse to fine.

    Args:
        ndim, in_channels: as every net.
        features: encoder widths, one per pyramid level (level ``k`` at factor ``2^k``; each level
            has two conv blocks).
        decoder_features: widths of each level's decoder conv blocks (before the flow head).
        search_radius: correlation radius in voxels of each level (default 3 in 2D, 2 in 3D).
        finest_level: the last level where a field is estimated (default 0 = full resolution in
            2D, 1 = half resolution in 3D, where a full-resolution cost volume is slow on CPU);
            its field is resized to full resolution (PWC-Net stops at 1/4).
    Output: the full-resolution displacement; ``levels`` holds the coarser levels' fields
    (coarse → fine), each on ``level_shape(shape, scale)`` with ``extras['scale']``.
    """

    def __init__(self, ndim: int, in_channels: int = 1, features: Sequence[int] = (16, 32, 32),
                 decoder_features: Sequence[int] = (32, 16), search_radius: int | None = None,
                 finest_level: int | None = None) -> None:
        super().__init__(ndim, in_channels)
        self.features = [int(f) for f in features]
        self.decoder_features = [int(f) for f in decoder_features]
        self.search_radius = int(search_radius if search_radius is not None
                                 else (3 if ndim == 2 else 2))
        if not self.features or min(self.features) < 1:
            raise InputError(f"pyramid_corr: features must be positive widths, got {self.features}")
        self.finest_level = int(finest_level if finest_level is not None
                                else (0 if ndim == 2 else 1))
        if not 0 <= self.finest_level < len(self.features):
            raise InputError(f"pyramid_corr: finest_level must be in "
                             f"[0, {len(self.features) - 1}], got {self.finest_level}")
        if self.search_radius < 0:
            raise InputError(f"pyramid_corr: search_radius must be ≥ 0, got {self.search_radius}")
        self.encoder = nn.ModuleList()
        prev = in_channels
        for f in self.features:
            self.encoder.append(nn.Sequential(ConvBlock(ndim, prev, f), ConvBlock(ndim, f, f)))
            prev = f
        n_corr = (2 * self.search_radius + 1) ** ndim
        self.decoders = nn.ModuleList()
        self.heads = nn.ModuleList()
        for f in self.features[self.finest_level:]:
            blocks, c = [], n_corr + f + ndim
            for w in self.decoder_features:
                blocks.append(ConvBlock(ndim, c, w))
                c = w
            self.decoders.append(nn.Sequential(*blocks))
            self.heads.append(flow_head(ndim, c))

    def pyramid(self, image: Tensor, shape: Sequence[int]) -> list[Tensor]:
        """Features of every level, fine → coarse (level ``k`` on ``level_shape(shape, 2^k)``)."""
        feats, x = [], image
        for k, enc in enumerate(self.encoder):
            x = enc(resample(x, level_shape(shape, 2 ** k), smooth=True))
            feats.append(x)
        return feats

    def forward(self, fixed: Tensor, moving: Tensor,
                reg_weight: float | Tensor | None = None) -> NetOutput:
        """``fixed``, ``moving``: ``(N, C, *spatial)`` on one grid; returns voxel-unit fields."""
        check_pair(self, fixed, moving)
        self.check_regularisation(reg_weight)
        shape = fixed.shape[2:]
        n = fixed.shape[0]
        feats = self.pyramid(torch.cat([fixed, moving], dim=0), shape)
        field: Tensor | None = None
        outputs: list[NetOutput] = []
        for k in reversed(range(self.finest_level, len(self.features))):
            f_fix, f_mov = feats[k][:n], feats[k][n:]
            lshape = f_fix.shape[2:]
            field = (f_fix.new_zeros((n, self.ndim, *lshape)) if field is None
                     else resize_field(field, lshape))
            corr = local_correlation(f_fix, warp_voxel(f_mov, field, padding="zeros"),
                                     self.search_radius)
            corr = F.leaky_relu(corr, 0.1)
            j = k - self.finest_level
            residual = self.heads[j](self.decoders[j](torch.cat([corr, f_fix, field], dim=1)))
            field = compose_voxel(residual, field)
            outputs.append(NetOutput(displacement=field, extras={"scale": 2 ** k}))
        if self.finest_level == 0:
            final = outputs.pop()
        else:
            final = NetOutput(displacement=resize_field(field, shape), extras={"scale": 1})
        final.levels = outputs
        return final
