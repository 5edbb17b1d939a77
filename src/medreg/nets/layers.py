"""Building blocks shared by medreg's networks (dimension-generic: ``ndim`` 2 or 3).

Conventions as in :mod:`medreg.nets.base`: images ``(N, C, *spatial)`` in array order, vector
fields ``(N, D, *spatial)`` in voxel units with components ``x, y, z``, fixed → moving.

Coarse grids (:func:`level_shape`, :func:`resample`) follow ``align_corners=True``: a grid of
``m`` voxels covering an axis of ``n`` voxels puts its first and last voxel centres on the first
and last fine voxel centres, which is the convention of :func:`medreg.nets.functional.resize_field`;
so a field on a coarse grid and the same field resized to the fine grid describe the same map.

Contents: convolution / instance-norm factories (:func:`conv_nd`, :func:`instance_norm`),
:class:`ConvBlock` (conv → [instance norm] → [FiLM] → LeakyReLU), :class:`FiLMGenerator`
(HyperMorph-style conditioning on ``log λ``), :class:`SqueezeExcitation`, :func:`flow_head`
(output conv initialised near zero), :class:`AffineHead` (global pooling → identity-initialised
affine in normalised coordinates → voxel-index affine), :class:`UNetBackbone` (VoxelMorph-style
encoder/decoder), and input checks.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medreg.core.errors import InputError
from medreg.core.functional import gaussian_kernel1d, separable_filter

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_LINEAR_MODE = {2: "bilinear", 3: "trilinear"}

FilmParams = tuple[Tensor, Tensor]


def conv_nd(ndim: int, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
            dilation: int = 1, bias: bool = True) -> nn.Module:
    """A ``ndim``-D convolution with 'same' padding for odd kernels (``dilation`` included)."""
    return _CONV[ndim](in_channels, out_channels, kernel_size, stride=stride,
                       padding=dilation * (kernel_size // 2), dilation=dilation, bias=bias)


def instance_norm(ndim: int, channels: int, affine: bool = True) -> nn.Module:
    """Instance normalisation for ``ndim``-D feature maps (learned scale/shift by default)."""
    return _NORM[ndim](channels, affine=affine)


def apply_film(x: Tensor, film: FilmParams | None) -> Tensor:
    """Feature-wise linear modulation ``x * (1 + γ) + β`` with ``γ, β`` of shape ``(N, C)``."""
    if film is None:
        return x
    scale, shift = film
    view = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    return x * (1.0 + scale.reshape(view)) + shift.reshape(view)


class ConvBlock(nn.Module):
    """conv (k³, stride, dilation) → [instance norm] → [FiLM] → LeakyReLU(``slope``)."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, dilation: int = 1, norm: bool = False,
                 slope: float = 0.2) -> None:
        super().__init__()
        self.out_channels = int(out_channels)
        self.conv = conv_nd(ndim, in_channels, out_channels, kernel_size, stride, dilation)
        self.norm = instance_norm(ndim, out_channels) if norm else nn.Identity()
        self.act = nn.LeakyReLU(slope)

    def forward(self, x: Tensor, film: FilmParams | None = None) -> Tensor:
        return self.act(apply_film(self.norm(self.conv(x)), film))


class FiLMGenerator(nn.Module):
    """Small MLP mapping the regulariser weight ``λ ≥ 0`` (fed as ``log λ``) to one FiLM
    ``(γ, β)`` pair per conv block (HyperMorph-like conditioning).

    ``forward(reg_weight (N,)) -> list[(γ (N, C_i), β (N, C_i))]``; ``λ`` is clamped to
    ``min_weight`` before the log so ``λ = 0`` is allowed. The last layer starts small
    (std ``1e-2``) so an untrained generator modulates only slightly but already depends on λ.
    """

    def __init__(self, channels: Sequence[int], hidden: int = 32, min_weight: float = 1e-4) -> None:
        super().__init__()
        self.channels = [int(c) for c in channels]
        self.min_weight = float(min_weight)
        self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, 2 * sum(self.channels)))
        nn.init.normal_(self.mlp[-1].weight, std=1e-2)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, reg_weight: Tensor) -> list[FilmParams]:
        code = torch.log(reg_weight.clamp_min(self.min_weight)).reshape(-1, 1)
        out = self.mlp(code)
        films, start = [], 0
        for c in self.channels:
            films.append((out[:, start:start + c], out[:, start + c:start + 2 * c]))
            start += 2 * c
        return films


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): global average pool → 1×1 conv (C → C/r) →
    ReLU → 1×1 conv → sigmoid, which rescales each channel."""

    def __init__(self, ndim: int, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(conv_nd(ndim, channels, hidden, 1), nn.ReLU(),
                                conv_nd(ndim, hidden, channels, 1), nn.Sigmoid())

    def forward(self, x: Tensor) -> Tensor:
        pooled = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
        return x * self.fc(pooled)


def flow_head(ndim: int, in_channels: int, out_channels: int | None = None,
              std: float = 1e-5, kernel_size: int = 3) -> nn.Module:
    """Output convolution of a field (``out_channels`` defaults to ``ndim``), weights
    ``N(0, std²)`` and zero bias so an untrained network predicts a near-zero field."""
    conv = conv_nd(ndim, in_channels, out_channels or ndim, kernel_size)
    nn.init.normal_(conv.weight, std=std)
    nn.init.zeros_(conv.bias)
    return conv


def normalised_to_voxel_affine(residual: Tensor, shape: Sequence[int]) -> Tensor:
    """Voxel-index affine ``(N, D, D + 1)`` (``x, y, z``) of ``[I | 0] + residual``, where
    ``residual (N, D, D + 1)`` is given in ``grid_sample`` coordinates (``align_corners=True``,
    -1 … 1 over the grid of ``shape``). Built from the residual so a zero residual gives the
    identity exactly: ``L = I + S⁻¹ R S``, ``t = S⁻¹ (t_n − R·1)`` with ``S = diag(2/(n−1))``."""
    d = len(shape)
    sizes = torch.tensor([max(n - 1, 1) for n in list(shape)[::-1]], device=residual.device,
                         dtype=residual.dtype)
    scale = 2.0 / sizes
    lin_r = residual[:, :, :d]
    lin = lin_r * scale.view(1, 1, d) / scale.view(1, d, 1)
    trans = (residual[:, :, d] - lin_r.sum(dim=2)) / scale.view(1, d)
    eye = torch.eye(d, device=residual.device, dtype=residual.dtype).expand_as(lin)
    return torch.cat([eye + lin, trans.unsqueeze(-1)], dim=2)


class AffineHead(nn.Module):
    """Global average pooling → 1×1 conv → residual ``R`` of an affine in normalised
    coordinates; the affine is ``[I | 0] + R`` (identity at init: weights ``N(0, std²)``, zero
    bias). ``forward(features, shape) -> (affine_voxel (N, D, D+1), residual (N, D, D+1))``."""

    def __init__(self, ndim: int, in_channels: int, std: float = 1e-5) -> None:
        super().__init__()
        self.ndim = ndim
        self.conv = conv_nd(ndim, in_channels, ndim * (ndim + 1), 1)
        nn.init.normal_(self.conv.weight, std=std)
        nn.init.zeros_(self.conv.bias)

    def forward(self, features: Tensor, shape: Sequence[int]) -> tuple[Tensor, Tensor]:
        pooled = features.mean(dim=tuple(range(2, features.dim())), keepdim=True)
        residual = self.conv(pooled).reshape(features.shape[0], self.ndim, self.ndim + 1)
        return normalised_to_voxel_affine(residual, shape), residual


def level_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Shape of the grid downsampled by ``factor`` (align-corners geometry): each axis of ``n``
    voxels gets ``ceil((n − 1) / factor) + 1`` (at least 2) so the coarse spacing is ≤ factor."""
    return tuple(n if factor == 1 else max(2, math.ceil((n - 1) / factor) + 1) for n in shape)


def resample(x: Tensor, shape: Sequence[int], smooth: bool = False) -> Tensor:
    """Resize feature maps / images ``(N, C, *spatial)`` to ``shape`` with (bi/tri)linear
    interpolation, corners aligned (the geometry of :func:`level_shape`). With ``smooth``, a
    Gaussian of σ = 0.5·(downsampling factor) voxels is applied first against aliasing."""
    shape = tuple(int(s) for s in shape)
    if tuple(x.shape[2:]) == shape:
        return x
    if smooth:
        factors = [(n_old - 1) / max(n_new - 1, 1) for n_old, n_new in zip(x.shape[2:], shape)]
        kernels = [gaussian_kernel1d(0.5 * f, dtype=x.dtype, device=x.device) if f > 1.25 else None
                   for f in factors[::-1]]
        x = separable_filter(x, kernels)
    return F.interpolate(x, size=shape, mode=_LINEAR_MODE[len(shape)], align_corners=True)


class UNetBackbone(nn.Module):
    """VoxelMorph-style U-Net trunk (Balakrishnan et al. 2019): returns decoder features.

    Encoder: level ``i`` is a :class:`ConvBlock` to ``features[i]`` followed by 2× max pooling
    (none after the last level, the bottleneck). Decoder: ``len(features) − 1 − stop_level``
    steps of nearest 2× upsampling, concatenation with the encoder skip of that level and a
    :class:`ConvBlock` to the next ``decoder_features`` width; the remaining decoder widths are
    extra blocks at the output level. ``stop_level = 1`` ends the decoder at half resolution.
    Inputs must be a multiple of :attr:`multiple` along every axis (pad with
    :func:`medreg.nets.functional.pad_to_multiple`). ``forward(x, films)`` takes one FiLM pair
    per block (order of :attr:`block_channels`) or ``None``.
    """

    def __init__(self, ndim: int, in_channels: int, features: Sequence[int],
                 decoder_features: Sequence[int], stop_level: int = 0) -> None:
        super().__init__()
        features = [int(f) for f in features]
        decoder_features = [int(f) for f in decoder_features]
        if not features or min(features) < 1 or (decoder_features and min(decoder_features) < 1):
            raise InputError(f"U-Net widths must be positive and non-empty, got "
                             f"features={features}, decoder_features={decoder_features}")
        n_up = len(features) - 1 - stop_level
        if not 0 <= stop_level < len(features):
            raise InputError(f"U-Net stop_level {stop_level} must be in [0, {len(features) - 1}]")
        if len(decoder_features) < n_up:
            raise InputError(f"U-Net needs at least {n_up} decoder widths for {len(features)} "
                             f"encoder levels, got decoder_features={decoder_features}")
        self.ndim = ndim
        self.multiple = 2 ** (len(features) - 1)
        self.pool = (F.max_pool2d, F.max_pool3d)[ndim - 2]
        self.encoder = nn.ModuleList()
        prev = in_channels
        for f in features:
            self.encoder.append(ConvBlock(ndim, prev, f))
            prev = f
        self.decoder = nn.ModuleList()
        for j in range(n_up):
            skip = features[len(features) - 2 - j]
            self.decoder.append(ConvBlock(ndim, prev + skip, decoder_features[j]))
            prev = decoder_features[j]
        self.extra = nn.ModuleList()
        for f in decoder_features[n_up:]:
            self.extra.append(ConvBlock(ndim, prev, f))
            prev = f
        self.out_channels = prev
        self.block_channels = [b.out_channels for b in self.blocks()]

    def blocks(self) -> list[ConvBlock]:
        """All conv blocks in execution order (the order of FiLM parameters)."""
        return [*self.encoder, *self.decoder, *self.extra]

    def forward(self, x: Tensor, films: Sequence[FilmParams] | None = None) -> Tensor:
        film_iter = iter(films) if films is not None else None

        def nxt() -> FilmParams | None:
            return next(film_iter) if film_iter is not None else None

        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x, nxt())
            if i < len(self.encoder) - 1:
                skips.append(x)
                x = self.pool(x, 2)
        for block in self.decoder:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(torch.cat([x, skips.pop()], dim=1), nxt())
        for block in self.extra:
            x = block(x, nxt())
        return x


def check_pair(net: Any, fixed: Tensor, moving: Tensor) -> None:
    """Raise :class:`InputError` unless ``fixed`` and ``moving`` are ``(N, C, *spatial)`` tensors
    of the net's ``ndim`` and ``in_channels`` with identical shapes."""
    name = getattr(net, "name", type(net).__name__)
    for what, t in (("fixed", fixed), ("moving", moving)):
        if not isinstance(t, Tensor) or t.dim() != net.ndim + 2:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"network {name!r}: {what} must be (N, C, *spatial) with {net.ndim} "
                             f"spatial axes, got {got}; add batch/channel axes or set ndim")
        if t.shape[1] != net.in_channels:
            raise InputError(f"network {name!r}: {what} has {t.shape[1]} channels, the net takes "
                             f"{net.in_channels}; set in_channels accordingly")
    if fixed.shape != moving.shape:
        raise InputError(f"network {name!r}: fixed {tuple(fixed.shape)} and moving "
                         f"{tuple(moving.shape)} differ; resample both onto the network grid first")
    if min(fixed.shape[2:]) < 2:
        raise InputError(f"network {name!r}: every spatial axis needs at least 2 voxels, got "
                         f"{tuple(fixed.shape[2:])}")


def as_batch_weight(reg_weight: float | Tensor, batch: int, like: Tensor) -> Tensor:
    """``reg_weight`` (float or ``(N,)``/``(N, 1)`` tensor, λ ≥ 0) as an ``(N,)`` tensor on the
    device and dtype of ``like``; :class:`InputError` on a wrong size or a negative or
    non-finite λ."""
    w = torch.as_tensor(reg_weight, device=like.device, dtype=like.dtype).reshape(-1)
    if w.numel() == 1:
        w = w.expand(batch)
    if w.numel() != batch:
        raise InputError(f"reg_weight has {w.numel()} values for a batch of {batch}; "
                         "give one float or one value per pair")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise InputError("reg_weight must be finite and ≥ 0 (the regulariser weight λ)")
    return w

