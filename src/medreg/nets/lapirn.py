"""Laplacian-pyramid registration network (coarse-to-fine cascade of U-Nets).

Reference:
    T. C. W. Mok, A. C. S. Chung (2020), "Large Deformation Diffeomorphic Image Registration
    with Laplacian Pyramid Networks", MICCAI 2020 (LNCS 12263).

Reproduced: ``levels`` sub-networks, coarse to fine; level ``k`` sees the images downsampled by
``2^(L−1−k)``, the moving image warped by the previous level's upsampled field and that field
itself, and predicts a residual; the diffeomorphic variant adds velocities across levels and
integrates them by scaling and squaring. Every level's output is returned (``NetOutput.levels``,
``extras['scale']``) so a loss can be applied at every level, as in LapIRN's progressive training.

Differences: each sub-network is a small U-Net (:class:`~medreg.nets.layers.UNetBackbone`), not
LapIRN's residual-block encoder/decoder, and the feature maps of a coarser level are not passed to
the next; in displacement mode a level's residual ``r`` is *composed* with the upsampled field
(``u = r + u_prev(p + r)``, exact for the warped moving image it was estimated on) rather than
added. Coarse grids use corner-aligned geometry (:func:`~medreg.nets.layers.level_shape`) on the
input's own extent, so coarse fields need no padding and levels' fields are exact resamplings.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from medreg.core.errors import InputError
from medreg.nets.base import NetOutput, RegistrationNet, register_net
from medreg.nets.functional import (compose_voxel, crop_to, integrate_velocity, pad_to_multiple,
                                    resize_field, warp_voxel)
from medreg.nets.layers import UNetBackbone, check_pair, flow_head, level_shape, resample


class FieldUNet(nn.Module):
    """U-Net trunk + near-zero flow head for any input size (pads to the trunk's multiple and
    crops back). ``forward(x (N, C, *spatial)) -> (N, D, *spatial)``."""

    def __init__(self, ndim: int, in_channels: int, features: Sequence[int],
                 decoder_features: Sequence[int]) -> None:
        super().__init__()
        self.backbone = UNetBackbone(ndim, in_channels, features, decoder_features)
        self.head = flow_head(ndim, self.backbone.out_channels)

    def forward(self, x: Tensor) -> Tensor:
        x, shape = pad_to_multiple(x, self.backbone.multiple)
        return crop_to(self.head(self.backbone(x)), shape)


@register_net("lapirn")
class LapIRN(RegistrationNet):
    """Laplacian pyramid of U-Nets.

    Args:
        ndim, in_channels: as every net.
        levels: number of pyramid levels ``L`` (level ``k`` works at factor ``2^(L−1−k)``).
        features, decoder_features: widths of each level's U-Net.
        integrate_steps: 0 → displacements (composed across levels); ``k > 0`` → velocities added
            across levels, each level's field is ``exp(v)`` (``velocity``/``inverse`` set).
    Output: the finest field; ``levels`` holds the coarser levels (coarse → fine), each a
    ``NetOutput`` on its own grid (``level_shape(shape, scale)``) with ``extras['scale']`` (the
    factor), ``extras['fixed']`` and ``extras['moving']`` (that level's downsampled images).
    """

    def __init__(self, ndim: int, in_channels: int = 1, levels: int = 3,
                 features: Sequence[int] = (16, 32, 32),
                 decoder_features: Sequence[int] = (32, 16, 16),
                 integrate_steps: int = 0) -> None:
        super().__init__(ndim, in_channels)
        if levels < 1:
            raise InputError(f"lapirn: levels must be ≥ 1, got {levels}")
        if integrate_steps < 0:
            raise InputError(f"lapirn: integrate_steps must be ≥ 0, got {integrate_steps}")
        self.levels = int(levels)
        self.features = [int(f) for f in features]
        self.decoder_features = [int(f) for f in decoder_features]
        self.integrate_steps = int(integrate_steps)
        self.subnets = nn.ModuleList(
            FieldUNet(ndim, 2 * in_channels + ndim, self.features, self.decoder_features)
            for _ in range(self.levels))

    def forward(self, fixed: Tensor, moving: Tensor,
                reg_weight: float | Tensor | None = None) -> NetOutput:
        """``fixed``, ``moving``: ``(N, C, *spatial)`` on one grid; returns voxel-unit fields."""
        check_pair(self, fixed, moving)
        self.check_regularisation(reg_weight)
        shape = fixed.shape[2:]
        outputs: list[NetOutput] = []
        prev: Tensor | None = None  # previous level's displacement (or velocity)
        for k, subnet in enumerate(self.subnets):
            scale = 2 ** (self.levels - 1 - k)
            lshape = level_shape(shape, scale)
            fixed_k = resample(fixed, lshape, smooth=True)
            moving_k = resample(moving, lshape, smooth=True)
            if prev is None:
                prev_k = fixed.new_zeros((fixed.shape[0], self.ndim, *lshape))
                disp_prev = prev_k
            else:
                prev_k = resize_field(prev, lshape)
                disp_prev = (integrate_velocity(prev_k, self.integrate_steps)
                             if self.integrate_steps else prev_k)
            warped = warp_voxel(moving_k, disp_prev)
            residual = subnet(torch.cat([fixed_k, warped, prev_k], dim=1))
            if self.integrate_steps:
                velocity = prev_k + residual
                out = NetOutput(displacement=integrate_velocity(velocity, self.integrate_steps),
                                velocity=velocity,
                                inverse=integrate_velocity(-velocity, self.integrate_steps))
                prev = velocity
            else:
                out = NetOutput(displacement=compose_voxel(residual, prev_k))
                prev = out.displacement
            out.extras.update(scale=scale, fixed=fixed_k, moving=moving_k)
            outputs.append(out)
        final = outputs[-1]
        final.levels = outputs[:-1]
        return final
