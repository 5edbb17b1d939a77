r"""Data augmentation for registration pairs, geometry-exact and consistent across data kinds.

Spatial augmentation warps each side of a :class:`~medreg.train.batch.Pair` by its own random
map ``T`` (an affine in physical mm about the grid centre, after a random smooth SVF
deformation ``exp(v)``): the augmented image is ``image ∘ T`` (pull back). Everything that lives
on that side follows **the same** ``T``: images (linear), label maps and masks (nearest), and
landmarks, which move with the image: a point ``p`` of ``image`` is at ``T⁻¹(p)`` in
``image ∘ T`` (the affine inverse is exact, the SVF inverse is ``exp(−v)``). A ground-truth
displacement ``u`` (synthetic pairs) becomes ``T_m⁻¹ ∘ (id + u) ∘ T_f − id``, so supervision
stays correct. Intensity augmentation (bias field = exp of a smooth random field, gamma,
Gaussian noise, blur) touches images only. Fixed and moving sides are drawn independently.

Conventions as :mod:`medreg.train.batch`: tensors without batch axis, displacements and points
in voxel units of the pair's grid (components ``x, y, z``); lengths in the config are mm and
angles degrees, converted with ``pair.grid.spacing`` (1 mm when the pair has no grid).

We use medreg's own voxel-unit operations (:mod:`medreg.nets.functional`) rather than TorchIO
or MONAI transforms because (1) they work on tensors on any device, batched or not, inside the
data loader or on the GPU after collation; (2) one transform object is applied to images, label
maps, masks, points and ground-truth fields, so they cannot drift apart; (3) they share medreg's
geometry conventions (x, y, z components, pull-back maps, ``align_corners=True``) with the
networks and losses, with no extra dependency and its own conventions to translate.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.functional import gaussian_smooth
from medreg.nets.functional import identity_grid, integrate_velocity, voxel_to_norm
from medreg.train.batch import Pair
from medreg.train.synth import apply_gamma, random_bias_field, random_velocity, warp_unbatched
from medreg.transforms import rotation_matrix

__all__ = ["Augment", "AugmentConfig", "RandomMap", "sample_points"]


@dataclass
class AugmentConfig:
    """Probabilities and ranges of the random augmentations (mm, degrees).

    Attributes:
        p_affine: probability of a random affine per side.
        rotation_deg: rotation angles uniform in ``±rotation_deg`` (one in 2D, three in 3D).
        scale: per-axis scale factors uniform in ``1 ± scale``.
        translation_mm: translation uniform in ``±translation_mm`` per axis.
        shear: off-diagonal shear terms uniform in ``±shear``.
        p_deform: probability of a random smooth (SVF) deformation per side.
        deform_mm: RMS length of its velocity (mm).
        deform_smoothness_mm: Gaussian sigma of its velocity (mm).
        steps: scaling-and-squaring steps.
        p_bias, bias_strength, bias_smoothness_mm: multiplicative ``exp`` bias field (std of
            its log) and its smoothness.
        p_gamma, gamma_range: random gamma on the image's own 0…1 range.
        p_noise, noise_std: additive Gaussian noise (image intensity units).
        p_blur, blur_sigma_mm: Gaussian blur with sigma uniform in the range (mm).
        fixed, moving: which sides are augmented.
    """

    p_affine: float = 0.5
    rotation_deg: float = 10.0
    scale: float = 0.1
    translation_mm: float = 5.0
    shear: float = 0.03
    p_deform: float = 0.5
    deform_mm: float = 2.0
    deform_smoothness_mm: float = 15.0
    steps: int = 7
    p_bias: float = 0.3
    bias_strength: float = 0.3
    bias_smoothness_mm: float = 40.0
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.3
    noise_std: float = 0.03
    p_blur: float = 0.2
    blur_sigma_mm: tuple[float, float] = (0.3, 1.0)
    fixed: bool = True
    moving: bool = True

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.name.startswith("p_") and not 0.0 <= float(getattr(self, f.name)) <= 1.0:
                raise InputError(f"AugmentConfig.{f.name} is a probability in 0…1, got "
                                 f"{getattr(self, f.name)}")
        if not 0 <= self.scale < 1:
            raise InputError(f"AugmentConfig.scale must be in [0, 1), got {self.scale}")
        lo, hi = self.gamma_range
        if not 0 < lo <= hi:
            raise InputError(f"AugmentConfig.gamma_range must be 0 < low <= high, got "
                             f"{self.gamma_range}")
        lo, hi = self.blur_sigma_mm
        if not 0 <= lo <= hi:
            raise InputError(f"AugmentConfig.blur_sigma_mm must be 0 <= low <= high, got "
                             f"{self.blur_sigma_mm}")
        if self.deform_smoothness_mm <= 0 or self.bias_smoothness_mm <= 0:
            raise InputError("AugmentConfig smoothness values must be > 0 mm")


def sample_points(field: Tensor, points: Tensor) -> Tensor:
    """Linear sample of ``field (C, *S)`` at voxel points ``(P, D)`` (``x, y, z``), border
    extension; returns ``(P, C)``."""
    d = points.shape[-1]
    shape = field.shape[1:]
    norm = voxel_to_norm(points.to(field.dtype), shape)
    grid = norm.reshape(1, -1, *([1] * (d - 1)), d)
    out = F.grid_sample(field[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.reshape(field.shape[0], -1).T


class RandomMap:
    """One random map ``T(p) = A (p + s(p)) + b`` on a grid (voxel units, ``x, y, z``).

    ``s = exp(v) - id`` is an SVF displacement (or none), ``A, b`` a voxel-index affine. Its
    inverse is ``T⁻¹(p) = q + s⁻(q)`` with ``q = A⁻¹ (p − b)`` and ``s⁻ = exp(−v) − id``.
    """

    def __init__(self, shape: Sequence[int], matrix: Tensor, offset: Tensor,
                 velocity: Tensor | None = None, steps: int = 7) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.matrix = matrix
        self.offset = offset
        self.inv_matrix = torch.linalg.inv(matrix)
        if velocity is None:
            self.fwd = self.inv = None
        else:
            self.fwd = integrate_velocity(velocity[None], steps)[0]
            self.inv = integrate_velocity(-velocity[None], steps)[0]

    def forward(self, points: Tensor) -> Tensor:
        """``T(points)`` for ``(P, D)`` voxel points."""
        p = points if self.fwd is None else points + sample_points(self.fwd, points)
        return p @ self.matrix.T.to(p) + self.offset.to(p)

    def inverse(self, points: Tensor) -> Tensor:
        """``T⁻¹(points)`` for ``(P, D)`` voxel points."""
        q = (points - self.offset.to(points)) @ self.inv_matrix.T.to(points)
        return q if self.inv is None else q + sample_points(self.inv, q)

    def _grid_points(self, ref: Tensor) -> Tensor:
        d = len(self.shape)
        return identity_grid(self.shape, device=ref.device, dtype=ref.dtype)[0].reshape(d, -1).T

    def displacement(self, ref: Tensor) -> Tensor:
        """Dense ``T(p) − p``, ``(D, *shape)`` (dtype/device of ``ref``)."""
        pts = self._grid_points(ref)
        return (self.forward(pts) - pts).T.reshape(len(self.shape), *self.shape)


def _draw_affine(generator: torch.Generator, cfg: AugmentConfig, shape: Sequence[int],
                 spacing: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Random voxel-index affine ``(A, b)``: a physical-mm affine about the grid centre."""
    d = len(shape)

    def uni(n: int, half: float) -> Tensor:
        r = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).cpu()
        return (2 * r - 1) * half

    angles = uni(1 if d == 2 else 3, math.radians(cfg.rotation_deg))
    rot = rotation_matrix(angles, d)
    scale = torch.diag(1.0 + uni(d, cfg.scale))
    shear = torch.eye(d, dtype=torch.float64) + torch.triu(uni(d * d, cfg.shear).view(d, d), 1)
    trans_mm = uni(d, cfg.translation_mm)
    m_mm = rot @ shear @ scale
    sp = torch.tensor(list(spacing), dtype=torch.float64)
    a = m_mm * sp[None, :] / sp[:, None]  # S⁻¹ M S
    centre = torch.tensor([(n - 1) / 2.0 for n in shape[::-1]], dtype=torch.float64)
    b = centre - a @ centre + trans_mm / sp
    return a, b


class Augment:
    """Random spatial and intensity augmentation of a :class:`Pair` (see the module docstring).

    ``augment(pair, generator)`` returns a new pair; the same generator state gives the same
    result. Random numbers are drawn on the generator's device; tensors stay on the pair's.
    """

    def __init__(self, cfg: AugmentConfig | None = None) -> None:
        self.cfg = cfg or AugmentConfig()

    # -------------------------------------------------------------- random draws
    def _coin(self, p: float, generator: torch.Generator) -> bool:
        return p > 0 and float(torch.rand((), generator=generator, device=generator.device)) < p

    def _uniform(self, lo: float, hi: float, generator: torch.Generator) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator, device=generator.device))

    def random_map(self, shape: Sequence[int], spacing: Sequence[float], generator: torch.Generator,
                   *, device=None, dtype: torch.dtype = torch.float32) -> RandomMap | None:
        """A random :class:`RandomMap` for one side, or ``None`` when no spatial op is drawn."""
        cfg = self.cfg
        d = len(shape)
        affine = self._coin(cfg.p_affine, generator)
        deform = self._coin(cfg.p_deform, generator) and cfg.deform_mm > 0
        if not (affine or deform):
            return None
        if affine:
            a, b = _draw_affine(generator, cfg, shape, spacing)
        else:
            a, b = torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
        v = None
        if deform:
            v = random_velocity(shape, spacing, cfg.deform_mm, cfg.deform_smoothness_mm, generator,
                                device=device, dtype=dtype)
        return RandomMap(shape, a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype),
                         v, cfg.steps)

    def intensity(self, image: Tensor, spacing: Sequence[float], generator: torch.Generator) -> Tensor:
        """Random bias field, gamma, noise and blur on ``(C, *S)`` (each with its probability)."""
        cfg = self.cfg
        out = image
        if self._coin(cfg.p_bias, generator) and cfg.bias_strength > 0:
            out = out * random_bias_field(image.shape[1:], spacing, cfg.bias_strength,
                                          cfg.bias_smoothness_mm, generator, device=image.device,
                                          dtype=image.dtype)
        if self._coin(cfg.p_gamma, generator):
            lo, hi = cfg.gamma_range
            out = apply_gamma(out, math.exp(self._uniform(math.log(lo), math.log(hi), generator)))
        if self._coin(cfg.p_blur, generator):
            sigma = self._uniform(*cfg.blur_sigma_mm, generator)
            if sigma > 1e-3:
                out = gaussian_smooth(out[None], sigma, spacing)[0]
        if self._coin(cfg.p_noise, generator) and cfg.noise_std > 0:
            noise = torch.randn(out.shape, generator=generator, device=generator.device,
                                dtype=out.dtype).to(out.device)
            out = out + cfg.noise_std * noise
        return out

    # -------------------------------------------------------------- application
    @staticmethod
    def _apply_side(tmap: RandomMap | None, image: Tensor, labels: Tensor | None,
                    points: Tensor | None, disp: Tensor | None
                    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        if tmap is None:
            return image, labels, points
        image = warp_unbatched(image, disp, "linear", "zeros")
        if labels is not None:
            labels = warp_unbatched(labels, disp, "nearest", "zeros")
        if points is not None:
            points = tmap.inverse(points.to(disp.dtype)).to(points.dtype)
        return image, labels, points

    def __call__(self, pair: Pair, generator: torch.Generator) -> Pair:
        """A new, augmented pair (the input is not modified)."""
        cfg = self.cfg
        shape = tuple(pair.fixed.shape[1:])
        d = len(shape)
        spacing = tuple(pair.grid.spacing) if pair.grid is not None else (1.0,) * d
        ref = pair.fixed if pair.fixed.is_floating_point() else pair.fixed.float()
        kw = dict(device=ref.device, dtype=ref.dtype)
        t_fix = self.random_map(shape, spacing, generator, **kw) if cfg.fixed else None
        t_mov = self.random_map(shape, spacing, generator, **kw) if cfg.moving else None
        d_fix = None if t_fix is None else t_fix.displacement(ref)
        d_mov = None if t_mov is None else t_mov.displacement(ref)

        fixed, fixed_labels, fixed_points = self._apply_side(
            t_fix, pair.fixed, pair.fixed_labels, pair.fixed_points, d_fix)
        moving, moving_labels, moving_points = self._apply_side(
            t_mov, pair.moving, pair.moving_labels, pair.moving_points, d_mov)

        displacement, mask = pair.displacement, pair.mask
        if displacement is not None and (t_fix is not None or t_mov is not None):
            # u' = T_m⁻¹ ∘ (id + u) ∘ T_f − id on the grid
            grid_pts = identity_grid(shape, device=ref.device, dtype=displacement.dtype)[0]
            grid_pts = grid_pts.reshape(d, -1).T
            r = grid_pts if t_fix is None else t_fix.forward(grid_pts)
            s = r + sample_points(displacement, r)
            t = s if t_mov is None else t_mov.inverse(s)
            displacement = (t - grid_pts).T.reshape(d, *shape)
            inside = torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
            for c in range(d):
                inside &= (t[:, c] >= -1e-4) & (t[:, c] <= shape[d - 1 - c] - 1 + 1e-4)
            inside = inside.view(1, *shape).to(displacement.dtype)
            if mask is not None and d_fix is not None:
                mask = warp_unbatched(mask, d_fix, "nearest", "zeros")
            mask = inside if mask is None else mask * inside
        elif mask is not None and d_fix is not None:
            mask = warp_unbatched(mask, d_fix, "nearest", "zeros")

        fixed = self.intensity(fixed, spacing, generator)
        moving = self.intensity(moving, spacing, generator)
        return dataclasses.replace(
            pair, fixed=fixed, moving=moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
            fixed_points=fixed_points, moving_points=moving_points, displacement=displacement,
            mask=mask, meta={**pair.meta, "augmented": True})
