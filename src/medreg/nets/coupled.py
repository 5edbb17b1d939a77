"""Coupled linear + deformable registration network with a fold-free (monotone) grid.

Reference:
    S. Christodoulidis*, M. Sahasrabudhe*, M. Vakalopoulou, G. Chassagnon, M.-P. Revel,
    S. Mougiakakou, N. Paragios (2018), "Linear and Deformable Image Registration with 3D
    Convolutional Neural Networks", RAMBO workshop, MICCAI 2018 (LNCS 11040).
    (Referred to in the task as Stergios et al.)

Reproduced: the encoder of 3×3(×3) convolutions with dilation rates 1, 1, 2, 3, 5, each with
instance normalisation and LeakyReLU; merging of all encoder outputs with the input images; the
linear branch (global average pooling → 1×1 conv → affine, a residual added to ``[I | 0]``); the
deformable branch (squeeze-and-excitation → conv + instance norm + LeakyReLU → ``2·sigmoid``)
predicting the spatial gradients ``Φ ∈ (0, 2)`` whose cumulative sum along each axis is the
sampling grid; the deformable grid applied first, then the affine (``p ↦ A(grid(p))``); the
regulariser ``α‖A − A_I‖₁ + β‖Φ − Φ_I‖₁`` with α = β = 1e-6 (returned as ``NetOutput.penalty``,
sums over elements, averaged over the batch; ``A`` in normalised ``[-1, 1]`` coordinates).

Grid normalisation (chosen here, the paper leaves it to the spatial transformer): along axis
``a``, ``grid_a(p) = Σ_{i=1}^{p_a} Φ_a(…, i, …)`` (cumulative sum minus the first element), in
voxel units, so ``Φ ≡ 1`` gives exactly the identity and the first voxel of every row stays at 0
(translations are left to the affine). Because ``Φ > 0`` the grid is strictly increasing along
every axis (no fold along grid lines); cross-derivatives ``∂grid_x/∂y`` are not constrained, so
a Jacobian determinant > 0 of the full map is typical but not guaranteed by construction.
Not reproduced: the paper's widths and training schedule (widths are configurable; defaults are
small for CPU), its MSE loss (losses live in :mod:`medreg.losses`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from medreg.core.errors import InputError
from medreg.nets.base import NetOutput, RegistrationNet, register_net
from medreg.nets.functional import identity_grid
from medreg.nets.layers import AffineHead, ConvBlock, SqueezeExcitation, check_pair, flow_head


def gradients_to_grid(gradients: Tensor) -> Tensor:
    """Sampling grid ``(N, D, *spatial)`` in voxel indices (``x, y, z``) from the per-axis spatial
    gradients ``Φ (N, D, *spatial)``: component ``c`` is the cumulative sum of ``Φ_c`` along its
    own axis minus its first element, so ``Φ ≡ 1`` gives the identity exactly."""
    d = gradients.shape[1]
    comps = []
    for c in range(d):
        axis = 2 + d - 1 - c  # component x runs along the last array axis
        g = gradients[:, c:c + 1]
        comps.append(torch.cumsum(g, dim=axis) - g.narrow(axis, 0, 1))
    return torch.cat(comps, dim=1)


@register_net("coupled")
class CoupledNet(RegistrationNet):
    """Coupled linear + deformable network; sampling point ``A(grid_def(p))``.

    Args:
        ndim, in_channels: as every net.
        features: width of each dilated encoder conv.
        dilations: dilation rate of each encoder conv (paper: 1, 1, 2, 3, 5).
        decoder_features: widths of the deformable branch's convs (before the output conv).
        se_reduction: channel reduction of the squeeze-and-excitation block.
        alpha, beta: weights of ``‖A − A_I‖₁`` and ``‖Φ − Φ_I‖₁`` in ``NetOutput.penalty``.
        deformable_only: no linear branch (affine fixed at identity).
        linear_only: no deformable branch (``Φ ≡ 1``): an affine network.
    Output: ``displacement = A(grid(p)) − p`` (voxel units), ``affine`` (voxel-index ``A``),
    ``penalty``, ``extras['gradients'] = Φ`` and ``extras['grid']`` (deformable grid, voxels).
    """

    def __init__(self, ndim: int, in_channels: int = 1, features: int = 16,
                 dilations: Sequence[int] = (1, 1, 2, 3, 5),
                 decoder_features: Sequence[int] = (16, 16),
                 se_reduction: int = 4, alpha: float = 1e-6, beta: float = 1e-6,
                 deformable_only: bool = False, linear_only: bool = False) -> None:
        super().__init__(ndim, in_channels)
        if deformable_only and linear_only:
            raise InputError("coupled: deformable_only and linear_only exclude each other; set one")
        if features < 1 or not dilations or min(dilations) < 1:
            raise InputError(f"coupled: need features ≥ 1 and dilations ≥ 1, got {features}, "
                             f"{dilations}")
        self.features = int(features)
        self.dilations = [int(r) for r in dilations]
        self.decoder_features = [int(f) for f in decoder_features]
        self.se_reduction = int(se_reduction)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.deformable_only = bool(deformable_only)
        self.linear_only = bool(linear_only)
        self.encoder = nn.ModuleList()
        prev = 2 * in_channels
        for r in self.dilations:
            self.encoder.append(ConvBlock(ndim, prev, self.features, dilation=r, norm=True))
            prev = self.features
        merged = 2 * in_channels + self.features * len(self.dilations)
        self.linear = None if self.deformable_only else AffineHead(ndim, merged)
        self.se = None
        self.decoder = nn.ModuleList()
        self.gradient_head = None
        if not self.linear_only:
            self.se = SqueezeExcitation(ndim, merged, self.se_reduction)
            prev = merged
            for f in self.decoder_features:
                self.decoder.append(ConvBlock(ndim, prev, f, norm=True))
                prev = f
            # logits 0 → sigmoid 0.5 → Φ = 1 (identity); weights N(0, 1e-5²), bias 0
            self.gradient_head = flow_head(ndim, prev, ndim, kernel_size=1)

    def forward(self, fixed: Tensor, moving: Tensor,
                reg_weight: float | Tensor | None = None) -> NetOutput:
        """``fixed``, ``moving``: ``(N, C, *spatial)`` on one grid (any size; no padding needed)."""
        check_pair(self, fixed, moving)
        self.check_regularisation(reg_weight)
        shape = fixed.shape[2:]
        n, d = fixed.shape[0], self.ndim
        x = torch.cat([fixed, moving], dim=1)
        outs = [x]
        for block in self.encoder:
            outs.append(block(outs[-1]))
        merged = torch.cat(outs, dim=1)
        ident = identity_grid(shape, device=fixed.device, dtype=fixed.dtype)
        penalty = fixed.new_zeros(())
        extras: dict[str, Tensor] = {}
        if self.gradient_head is not None:
            h = self.se(merged)
            for block in self.decoder:
                h = block(h)
            phi = 2.0 * torch.sigmoid(self.gradient_head(h))
            grid = gradients_to_grid(phi)
            penalty = penalty + self.beta * (phi - 1.0).abs().flatten(1).sum(1).mean()
            extras["gradients"] = phi
        else:
            grid = ident.expand(n, *ident.shape[1:])
        extras["grid"] = grid
        disp = grid - ident
        affine = None
        if self.linear is not None:
            affine, residual = self.linear(merged, shape)
            penalty = penalty + self.alpha * residual.abs().flatten(1).sum(1).mean()
            lin_minus_eye = affine[:, :, :d] - torch.eye(d, device=fixed.device, dtype=fixed.dtype)
            flat = grid.flatten(2)
            disp = disp + (lin_minus_eye @ flat + affine[:, :, d:]).view(n, d, *shape)
        return NetOutput(displacement=disp, affine=affine, penalty=penalty, extras=extras)
