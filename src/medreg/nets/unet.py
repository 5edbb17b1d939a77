"""VoxelMorph-style U-Net registration network, optionally diffeomorphic and conditional.

References:
    G. Balakrishnan, A. Zhao, M. R. Sabuncu, J. Guttag, A. V. Dalca (2019), "VoxelMorph: A
    Learning Framework for Deformable Medical Image Registration", IEEE TMI 38(8).
    A. V. Dalca, G. Balakrishnan, J. Guttag, M. R. Sabuncu (2019), "Unsupervised learning of
    probabilistic diffeomorphic registration for images and surfaces", MedIA 57.
    A. Hoopes, M. Hoffmann, B. Fischl, J. Guttag, A. V. Dalca (2021), "HyperMorph: Amortized
    Hyperparameter Learning for Image Registration", IPMI.

Reproduced: the encoder/decoder with skip connections and LeakyReLU(0.2), max pooling and
nearest upsampling, the output conv initialised to ``N(0, 1e-5²)``, the stationary velocity
integrated by scaling and squaring (``integrate_steps``) with the inverse ``exp(−v)``, and the
half-resolution field (vxm's ``int_downsize = 2``, here by ending the decoder one level early).
Conditional mode follows HyperMorph's idea (a network conditioned on the regulariser weight λ)
but uses FiLM modulation of every conv block from an MLP on ``log λ`` instead of HyperMorph's
hypernetwork that generates all weights. Not reproduced: the probabilistic (variational) output
of Dalca et al.; vxm's exact default widths (configurable here, smaller by default for CPU).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from medreg.core.errors import InputError
from medreg.nets.base import NetOutput, RegistrationNet, register_net
from medreg.nets.functional import crop_to, integrate_velocity, pad_to_multiple, resize_field
from medreg.nets.layers import FiLMGenerator, UNetBackbone, as_batch_weight, check_pair, flow_head


@register_net("unet")
class UNet(RegistrationNet):
    """U-Net on ``cat(fixed, moving)`` predicting a displacement (or a velocity) in voxel units.

    Args:
        ndim: 2 or 3.
        in_channels: channels of each image (fixed and moving have the same).
        features: encoder widths, one per level (``len − 1`` poolings; inputs are padded to a
            multiple of ``2 ** (len − 1)`` and cropped back).
        decoder_features: decoder widths: the first ones after each upsampling, the rest as extra
            blocks at the output resolution.
        integrate_steps: 0 → the head is the displacement; ``k > 0`` → the head is a stationary
            velocity ``v`` and the displacement is ``exp(v)`` by ``k`` squarings
            (``NetOutput.velocity = v``, ``NetOutput.inverse = exp(−v)``).
        half_resolution: predict the field at half resolution and resize it up (cheaper; the
            decoder ends one level early).
        conditional: condition every conv block on the regulariser weight λ (``reg_weight``).
        default_reg_weight: λ used by a conditional net when ``reg_weight`` is ``None``.
    """

    def __init__(self, ndim: int, in_channels: int = 1, features: Sequence[int] = (16, 32, 32, 32),
                 decoder_features: Sequence[int] = (32, 32, 32, 16, 16), integrate_steps: int = 0,
                 half_resolution: bool = False, conditional: bool = False,
                 default_reg_weight: float = 1.0) -> None:
        super().__init__(ndim, in_channels)
        if integrate_steps < 0:
            raise InputError(f"unet: integrate_steps must be ≥ 0, got {integrate_steps}")
        if half_resolution and len(features) < 2:
            raise InputError("unet: half_resolution needs at least 2 encoder levels in features")
        if default_reg_weight < 0:
            raise InputError(f"unet: default_reg_weight must be ≥ 0, got {default_reg_weight}")
        self.features = [int(f) for f in features]
        self.decoder_features = [int(f) for f in decoder_features]
        self.integrate_steps = int(integrate_steps)
        self.half_resolution = bool(half_resolution)
        self.conditional = bool(conditional)
        self.default_reg_weight = float(default_reg_weight)
        self.supports_regularisation = self.conditional
        self.backbone = UNetBackbone(ndim, 2 * in_channels, self.features, self.decoder_features,
                                     stop_level=1 if self.half_resolution else 0)
        self.head = flow_head(ndim, self.backbone.out_channels)
        self.film = FiLMGenerator(self.backbone.block_channels) if self.conditional else None

    def forward(self, fixed: Tensor, moving: Tensor,
                reg_weight: float | Tensor | None = None) -> NetOutput:
        """``fixed``, ``moving``: ``(N, C, *spatial)`` on one grid; ``reg_weight``: λ ≥ 0 (float
        or ``(N,)``), only for a conditional net. Returns the fixed → moving displacement in
        voxel units (``extras['reg_weight']`` holds the λ used by a conditional net)."""
        check_pair(self, fixed, moving)
        self.check_regularisation(reg_weight)
        extras: dict[str, Tensor] = {}
        films = None
        if self.film is not None:
            weight = self.default_reg_weight if reg_weight is None else reg_weight
            lam = as_batch_weight(weight, fixed.shape[0], fixed)
            films = self.film(lam)
            extras["reg_weight"] = lam
        x, shape = pad_to_multiple(torch.cat([fixed, moving], dim=1), self.backbone.multiple)
        padded = x.shape[2:]
        field = self.head(self.backbone(x, films))

        def finish(f: Tensor) -> Tensor:
            return crop_to(resize_field(f, padded), shape)

        if self.integrate_steps == 0:
            return NetOutput(displacement=finish(field), extras=extras)
        disp = integrate_velocity(field, self.integrate_steps)
        inverse = integrate_velocity(-field, self.integrate_steps)
        return NetOutput(displacement=finish(disp), velocity=finish(field),
                         inverse=finish(inverse), extras=extras)
