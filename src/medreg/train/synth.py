r"""Synthetic training data: random smooth diffeomorphisms, random label maps, random contrasts.

Conventions (as :mod:`medreg.train.batch`): tensors carry no batch axis; images ``(C, *shape)``
in array order (``z, y, x``); displacements ``(D, *shape)`` in **voxel units** with components
``x, y, z``, fixed → moving: ``moving(p + u(p)) ≈ fixed(p)``. Spacings are mm in ``x, y, z``
order. Every random draw comes from the given ``torch.Generator`` (drawn on the generator's
device, then moved to ``device``), so a sample is reproducible from its seed on any device.

Ground truth by construction: with ``u = exp(v)`` (scaling and squaring of a smooth random
velocity), the moving image is the source and the fixed image is ``source ∘ (id + u)``, so
``warp_voxel(moving, u) == fixed`` exactly (before independent intensity perturbations).
Label-map synthesis (``synth_label_pair``) follows SynthMorph: random blob label maps, deformed,
and rendered *separately* for fixed and moving with random contrasts, so a network trained on
them learns geometry rather than intensities.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.functional import gaussian_smooth
from medreg.core.grid import Grid
from medreg.nets.functional import integrate_velocity, warp_voxel
from medreg.train.batch import Pair

__all__ = [
    "SynthConfig", "apply_gamma", "deformed_pair", "inside_mask", "perturb_intensity",
    "random_bias_field", "random_label_map", "random_smooth_field", "random_svf_displacement",
    "random_velocity", "render_labels", "synth_label_pair", "warp_unbatched",
]


@dataclass
class SynthConfig:
    """Parameters of the synthetic generators (lengths in mm).

    Attributes:
        magnitude_mm: size of the ground-truth velocity, as its RMS (``norm="rms"``) or maximum
            (``norm="max"``) vector length; the displacement has about the same size.
        smoothness_mm: Gaussian sigma of the random velocity.
        steps: scaling-and-squaring steps.
        norm: ``rms`` or ``max``.
        base_magnitude_mm: a light random deformation applied to the source image before the
            pair is made (variety between epochs); 0 disables it.
        bias_strength: std of the log bias field (0 disables it).
        bias_smoothness_mm: smoothness of the bias field.
        gamma_std: std of ``log γ`` of the random gamma (0 disables it).
        noise_std: std of additive Gaussian noise, in units of the image's range (0 disables).
        blur_sigma_mm: maximum sigma of the random blur of rendered label images.
        n_labels: number of labels of random label maps.
        label_smoothness_mm: blob size of random label maps.
        label_deform_mm: magnitude of the deformation that makes random blobs irregular.
        mean_range: range of the random mean intensity per label.
        std_max: maximum within-label intensity std of rendered images.
    """

    magnitude_mm: float = 3.0
    smoothness_mm: float = 10.0
    steps: int = 7
    norm: str = "rms"
    base_magnitude_mm: float = 0.0
    bias_strength: float = 0.2
    bias_smoothness_mm: float = 40.0
    gamma_std: float = 0.2
    noise_std: float = 0.02
    blur_sigma_mm: float = 1.0
    n_labels: int = 16
    label_smoothness_mm: float = 8.0
    label_deform_mm: float = 3.0
    mean_range: tuple[float, float] = (0.0, 1.0)
    std_max: float = 0.08

    def __post_init__(self) -> None:
        if self.norm not in _NORMS:
            raise InputError(f"SynthConfig.norm must be one of {sorted(_NORMS)}, got {self.norm!r}")
        for name in ("magnitude_mm", "base_magnitude_mm", "bias_strength", "gamma_std",
                     "noise_std", "blur_sigma_mm", "label_deform_mm", "std_max"):
            if getattr(self, name) < 0:
                raise InputError(f"SynthConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("smoothness_mm", "bias_smoothness_mm", "label_smoothness_mm"):
            if not getattr(self, name) > 0:
                raise InputError(f"SynthConfig.{name} must be > 0 mm, got {getattr(self, name)}")
        if int(self.n_labels) < 2:
            raise InputError(f"SynthConfig.n_labels must be >= 2, got {self.n_labels}")


# ------------------------------------------------------------------------------ helpers
def _spacing(spacing: Sequence[float] | float | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)):
        return (float(spacing),) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or any(not s > 0 for s in sp):
        raise InputError(f"spacing must be {ndim} positive values in mm (x, y, z), got {spacing}")
    return sp


def _randn(shape: Sequence[int], generator: torch.Generator, device, dtype) -> Tensor:
    return torch.randn(tuple(shape), generator=generator, device=generator.device,
                       dtype=dtype).to(device)


def _rand(shape: Sequence[int], generator: torch.Generator, device, dtype) -> Tensor:
    return torch.rand(tuple(shape), generator=generator, device=generator.device,
                      dtype=dtype).to(device)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def random_smooth_field(shape: Sequence[int], spacing: Sequence[float] | float | None,
                        smoothness_mm: float, channels: int, generator: torch.Generator, *,
                        device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(channels, *shape)`` Gaussian noise smoothed with sigma ``smoothness_mm``, zero mean and
    unit std per channel.

    The noise is drawn and smoothed (:func:`medreg.core.functional.gaussian_smooth`) on a grid
    about ``smoothness / 2`` mm coarse (at most the image's own), then resized linearly: the
    same kind of field at a fraction of the cost of a wide kernel at full resolution.
    """
    shape = tuple(int(s) for s in shape)
    sp = _spacing(spacing, len(shape))
    sp_zyx = sp[::-1]
    coarse = tuple(max(2, min(n, int(math.ceil(n * s / (smoothness_mm / 2.0)))))
                   for n, s in zip(shape, sp_zyx))
    coarse_sp_xyz = tuple(n * s / c for n, s, c in zip(shape, sp_zyx, coarse))[::-1]
    noise = _randn((1, channels, *coarse), generator, device, dtype)
    smooth = gaussian_smooth(noise, smoothness_mm, coarse_sp_xyz)
    if coarse != shape:
        mode = "bilinear" if len(shape) == 2 else "trilinear"
        smooth = F.interpolate(smooth, size=shape, mode=mode, align_corners=True)
    smooth = smooth[0]
    flat = smooth.flatten(1)
    return (smooth - flat.mean(1).view(-1, *([1] * len(shape)))) / \
        flat.std(1).clamp_min(1e-12).view(-1, *([1] * len(shape)))


_NORMS = {
    "rms": lambda length: length.square().mean().sqrt(),
    "max": lambda length: length.max(),
}


def random_velocity(shape: Sequence[int], spacing: Sequence[float] | float | None,
                    magnitude_mm: float, smoothness_mm: float, generator: torch.Generator, *,
                    norm: str = "rms", device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A smooth random stationary velocity ``(D, *shape)`` in **voxel units** (``x, y, z``).

    Smoothed Gaussian noise per component, scaled so the RMS (or max) vector length in mm is
    ``magnitude_mm``, then divided by the spacing of each index axis.
    """
    shape = tuple(int(s) for s in shape)
    d = len(shape)
    if d not in (2, 3):
        raise InputError(f"synthetic fields are 2D or 3D, got shape {shape}")
    sp = _spacing(spacing, d)
    if norm not in _NORMS:
        raise InputError(f"norm must be one of {sorted(_NORMS)}, got {norm!r}")
    v_mm = random_smooth_field(shape, sp, smoothness_mm, d, generator, device=device, dtype=dtype)
    length = v_mm.square().sum(0).sqrt()
    v_mm = v_mm * (float(magnitude_mm) / _NORMS[norm](length).clamp_min(1e-12))
    scale = torch.tensor(sp, dtype=dtype, device=v_mm.device).view(d, *([1] * d))
    return v_mm / scale


def random_svf_displacement(shape: Sequence[int], spacing: Sequence[float] | float | None,
                            magnitude_mm: float, smoothness_mm: float, generator: torch.Generator,
                            steps: int = 7, device=None, dtype: torch.dtype = torch.float32, *,
                            norm: str = "rms") -> Tensor:
    """A random diffeomorphic displacement ``exp(v) - id``, ``(D, *shape)`` in voxel units.

    ``v`` is :func:`random_velocity`; scaling and squaring
    (:func:`medreg.nets.functional.integrate_velocity`) keeps the map invertible.
    """
    v = random_velocity(shape, spacing, magnitude_mm, smoothness_mm, generator, norm=norm,
                        device=device, dtype=dtype)
    return integrate_velocity(v.unsqueeze(0), steps)[0]


def inside_mask(displacement: Tensor) -> Tensor:
    """``(1, *shape)`` float: 1 where ``p + u(p)`` lies inside the grid (voxel centres' hull)."""
    d = displacement.shape[0]
    shape = displacement.shape[1:]
    axes = [torch.arange(n, device=displacement.device, dtype=displacement.dtype) for n in shape]
    mesh = torch.meshgrid(*axes, indexing="ij")[::-1]  # x, y, z
    inside = torch.ones(shape, dtype=torch.bool, device=displacement.device)
    for c in range(d):
        q = mesh[c] + displacement[c]
        n = shape[d - 1 - c]
        inside &= (q >= -1e-4) & (q <= n - 1 + 1e-4)
    return inside.unsqueeze(0).to(displacement.dtype)


def warp_unbatched(image: Tensor, disp: Tensor, mode: str = "linear", padding: str = "zeros") -> Tensor:
    """``image (C, *S)`` sampled at ``p + disp(p)``; integer label maps by nearest neighbour."""
    if not image.is_floating_point():
        out = warp_voxel(image[None].to(disp.dtype), disp[None], mode="nearest", padding=padding)
        return out[0].round().to(image.dtype)
    return warp_voxel(image[None], disp[None].to(image.dtype), mode=mode, padding=padding)[0]


# ------------------------------------------------------------------------------ intensities
def random_bias_field(shape: Sequence[int], spacing: Sequence[float] | float | None,
                      strength: float, smoothness_mm: float, generator: torch.Generator, *,
                      device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Multiplicative bias ``exp(strength * f)``, ``(1, *shape)``, ``f`` a unit-std smooth field."""
    f = random_smooth_field(shape, spacing, smoothness_mm, 1, generator, device=device, dtype=dtype)
    return torch.exp(float(strength) * f)


def apply_gamma(image: Tensor, gamma: float) -> Tensor:
    """``image`` rescaled to 0…1 (its own min/max), raised to ``gamma`` and scaled back."""
    lo, hi = image.min(), image.max()
    rng = (hi - lo).clamp_min(1e-12)
    return ((image - lo) / rng).clamp(0, 1).pow(gamma) * rng + lo


def perturb_intensity(image: Tensor, spacing: Sequence[float] | float | None, cfg: SynthConfig,
                      generator: torch.Generator) -> Tensor:
    """Random bias field, gamma and Gaussian noise (strengths from ``cfg``) on ``(C, *S)``."""
    shape = image.shape[1:]
    out = image
    if cfg.bias_strength > 0:
        out = out * random_bias_field(shape, spacing, cfg.bias_strength, cfg.bias_smoothness_mm,
                                      generator, device=image.device, dtype=image.dtype)
    if cfg.gamma_std > 0:
        gamma = math.exp(cfg.gamma_std * float(torch.randn((), generator=generator,
                                                           device=generator.device)))
        out = apply_gamma(out, gamma)
    if cfg.noise_std > 0:
        rng = float(out.max() - out.min()) or 1.0
        out = out + cfg.noise_std * rng * _randn(out.shape, generator, out.device, out.dtype)
    return out


# ------------------------------------------------------------------------------ pairs
def deformed_pair(image: Tensor, labels: Tensor | None, spacing: Sequence[float] | float | None,
                  cfg: SynthConfig, generator: torch.Generator, *, grid: Grid | None = None,
                  intensity: bool = True) -> Pair:
    """A pair made from one image and a random diffeomorphism with known displacement.

    ``moving`` is the source (``image``, after an optional light deformation of
    ``cfg.base_magnitude_mm``), ``fixed = moving ∘ (id + u)`` with ``u = exp(v)``, so
    ``warp_voxel(moving, u) == fixed`` (before intensity perturbations, drawn independently for
    each side when ``intensity``). Labels follow by nearest neighbour.

    Args:
        image: ``(C, *S)`` float.
        labels: ``(1, *S)`` integer label map of ``image`` or ``None``.
        spacing: mm, ``x, y, z`` (default 1).
        grid: the grid of ``image`` to store in the pair (default an axis-aligned grid).

    Returns:
        :class:`Pair` with ``displacement`` (voxel units) and ``mask`` (1 where ``p + u(p)``
        lies in the moving image).
    """
    if image.dim() not in (3, 4) or not image.is_floating_point():
        raise InputError(f"deformed_pair needs a float image (C, *spatial), got {tuple(image.shape)} "
                         f"{image.dtype}")
    shape = tuple(image.shape[1:])
    sp = _spacing(spacing if grid is None else grid.spacing, len(shape))
    if labels is not None and tuple(labels.shape[-len(shape):]) != shape:
        raise InputError(f"labels {tuple(labels.shape)} do not match the image {tuple(image.shape)}")
    kw = dict(device=image.device, dtype=image.dtype)
    source, src_labels = image, labels
    if cfg.base_magnitude_mm > 0:
        u0 = random_svf_displacement(shape, sp, cfg.base_magnitude_mm, cfg.smoothness_mm,
                                     generator, cfg.steps, norm=cfg.norm, **kw)
        source = warp_unbatched(image, u0, padding="border")
        src_labels = None if labels is None else warp_unbatched(labels.long(), u0, padding="border")
    u = random_svf_displacement(shape, sp, cfg.magnitude_mm, cfg.smoothness_mm, generator,
                                cfg.steps, norm=cfg.norm, **kw)
    moving = source
    fixed = warp_unbatched(source, u)
    moving_labels = None if src_labels is None else src_labels.long().reshape(1, *shape)
    fixed_labels = None if moving_labels is None else warp_unbatched(moving_labels, u)
    if intensity:
        fixed = perturb_intensity(fixed, sp, cfg, generator)
        moving = perturb_intensity(moving, sp, cfg, generator)
    return Pair(fixed=fixed, moving=moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                displacement=u, mask=inside_mask(u), grid=grid or Grid.from_shape(shape, spacing=sp),
                meta={"synthetic": "deformed"})


def random_label_map(shape: Sequence[int], n_labels: int, generator: torch.Generator,
                     smoothness_mm: float = 8.0, *, spacing: Sequence[float] | float | None = None,
                     deform_mm: float = 3.0, device=None) -> Tensor:
    """A SynthMorph-style random label map ``(1, *shape)`` int64 with labels ``0 … n_labels-1``.

    One smooth random noise image per label, arg-max over labels (blob-like regions about
    ``smoothness_mm`` across), then warped (nearest) by a random smooth diffeomorphism of
    ``deform_mm`` so the region boundaries are irregular.
    """
    shape = tuple(int(s) for s in shape)
    if int(n_labels) < 2:
        raise InputError(f"a random label map needs n_labels >= 2, got {n_labels}")
    sp = _spacing(spacing, len(shape))
    noise = random_smooth_field(shape, sp, smoothness_mm, int(n_labels), generator, device=device)
    labels = noise.argmax(0, keepdim=True)
    if deform_mm > 0:
        u = random_svf_displacement(shape, sp, deform_mm, 2.0 * smoothness_mm, generator,
                                    device=noise.device)
        labels = warp_unbatched(labels, u, padding="border")
    return labels


def render_labels(labels: Tensor, generator: torch.Generator, n_labels: int | None = None, *,
                  spacing: Sequence[float] | float | None = None, cfg: SynthConfig | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """An image ``(1, *S)`` with random contrast from a label map ``(1, *S)``.

    Each label gets a random mean (uniform in ``cfg.mean_range``) and a random within-label
    std (up to ``cfg.std_max``); then a random Gaussian blur (sigma up to ``cfg.blur_sigma_mm``),
    bias field, gamma and noise (:func:`perturb_intensity`); the result is rescaled to 0…1.

    Args:
        n_labels: with labels ``0 … n_labels-1``, the size of the mean table (faster); default
            the label map's distinct values, whatever they are.
    """
    cfg = cfg or SynthConfig()
    if labels.is_floating_point():
        raise InputError("render_labels needs an integer label map")
    shape = labels.shape[1:]
    sp = _spacing(spacing, len(shape))
    if n_labels is None:
        values, index = torch.unique(labels, return_inverse=True)
        count = values.numel()
    else:
        count, index = int(n_labels), labels.long()
        if int(index.min()) < 0 or int(index.max()) >= count:
            raise InputError(f"label values must lie in 0 … {count - 1} for n_labels={count}")
    lo, hi = cfg.mean_range
    means = lo + (hi - lo) * _rand((count,), generator, labels.device, dtype)
    stds = cfg.std_max * _rand((count,), generator, labels.device, dtype)
    image = means[index] + stds[index] * _randn(index.shape, generator, labels.device, dtype)
    if cfg.blur_sigma_mm > 0:
        sigma = _uniform(generator, 0.0, cfg.blur_sigma_mm)
        if sigma > 1e-3:
            image = gaussian_smooth(image[None], sigma, sp)[0]
    image = perturb_intensity(image, sp, cfg, generator)
    lo_v, hi_v = image.min(), image.max()
    return (image - lo_v) / (hi_v - lo_v).clamp_min(1e-12)


def synth_label_pair(shape: Sequence[int], spacing: Sequence[float] | float | None,
                     cfg: SynthConfig, generator: torch.Generator, labels: Tensor | None = None, *,
                     device=None, grid: Grid | None = None) -> Pair:
    """A SynthMorph-style pair: label map → deform → render fixed and moving separately.

    ``moving_labels`` is a random label map (or ``labels``, a real one, ``(1, *shape)``),
    ``fixed_labels = moving_labels ∘ (id + u)`` (nearest) with ``u = exp(v)``; each side is
    rendered with its own random contrast (:func:`render_labels`).

    Returns:
        :class:`Pair` with images, label maps, ground-truth ``displacement`` (voxel units) and
        ``mask``.
    """
    shape = tuple(int(s) for s in shape)
    sp = _spacing(spacing if grid is None else grid.spacing, len(shape))
    if labels is None:
        lab = random_label_map(shape, cfg.n_labels, generator, cfg.label_smoothness_mm, spacing=sp,
                               deform_mm=cfg.label_deform_mm, device=device)
        n_labels = cfg.n_labels
    else:
        if labels.is_floating_point() or tuple(labels.shape[-len(shape):]) != shape:
            raise InputError(f"labels must be an integer map of shape "
                             f"(1, {', '.join(map(str, shape))}), got {tuple(labels.shape)} "
                             f"{labels.dtype}")
        lab = labels.reshape(1, *shape).long().to(device or labels.device)
        n_labels = None
    u = random_svf_displacement(shape, sp, cfg.magnitude_mm, cfg.smoothness_mm, generator,
                                cfg.steps, device=lab.device, norm=cfg.norm)
    fixed_labels = warp_unbatched(lab, u)
    moving = render_labels(lab, generator, n_labels, spacing=sp, cfg=cfg)
    fixed = render_labels(fixed_labels, generator, n_labels, spacing=sp, cfg=cfg)
    return Pair(fixed=fixed, moving=moving, fixed_labels=fixed_labels, moving_labels=lab,
                displacement=u, mask=inside_mask(u), grid=grid or Grid.from_shape(shape, spacing=sp),
                meta={"synthetic": "labels"})
