"""Initial alignment: geometric centres, centres of mass, or principal axes (moments)."""

from __future__ import annotations

import itertools

import torch

from medreg.core.errors import InputError
from medreg.core.image import Image
from medreg.transforms import AffineTransform


def _mass(image: Image) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative intensity weights (image minus its minimum, float64, the image's shape) and
    their sum; a constant image is an error."""
    w = image.data[0].double()
    w = w - w.min()
    total = w.sum()
    if not torch.isfinite(total) or total <= 0:
        raise InputError(f"{image.name}: the image is constant; there is nothing to register")
    return w, total


def _weights(image: Image) -> tuple[torch.Tensor, torch.Tensor]:
    """World points and normalised weights (:func:`_mass`), one row per voxel."""
    w, total = _mass(image)
    pts = image.grid.points(dtype=torch.float64).reshape(-1, image.ndim)
    return pts, w.reshape(-1) / total


def centre_of_mass(image: Image) -> torch.Tensor:
    """Intensity-weighted centre (world mm), weights the image minus its minimum.

    The centre is affine in the voxel index, so it is the index-space centre (from the
    marginal sums along each axis) mapped to world: no per-voxel coordinates are built.
    """
    w, total = _mass(image)
    d = image.ndim
    index = torch.zeros(d, dtype=torch.float64, device=w.device)
    for axis in range(d):  # tensor axis a holds index component d − 1 − a
        marginal = w.sum(dim=tuple(b for b in range(d) if b != axis))
        index[d - 1 - axis] = (marginal * torch.arange(w.shape[axis], dtype=torch.float64,
                                                       device=w.device)).sum() / total
    return image.grid.transform_points(index, "index", "world")


def principal_axes(image: Image) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre of mass and the eigenvectors (columns, ascending eigenvalues) of the weighted
    covariance of world positions."""
    pts, w = _weights(image)
    c = (pts * w[:, None]).sum(0)
    d = pts - c
    cov = (d * w[:, None]).T @ d
    _, vecs = torch.linalg.eigh(cov)
    return c, vecs


def initial_transform(fixed: Image, moving: Image, method: str = "com") -> AffineTransform:
    """Affine (rigid) transform fixed → moving, centred on the fixed image's centre of mass
    (or geometric centre), that aligns the images' centres (and principal axes for ``moments``).
    """
    d = fixed.ndim
    if method == "none":
        return AffineTransform(d, trainable=False, dtype=torch.float64)
    if method == "geometry":
        cf = torch.tensor(fixed.grid.center(), dtype=torch.float64)
        cm = torch.tensor(moving.grid.center(), dtype=torch.float64)
        return AffineTransform(d, translation=cm - cf, center=cf, trainable=False, dtype=torch.float64)
    if method == "com":
        cf, cm = centre_of_mass(fixed), centre_of_mass(moving)
        return AffineTransform(d, translation=cm - cf, center=cf, trainable=False, dtype=torch.float64)
    if method == "moments":
        cf, ef = principal_axes(fixed)
        cm, em = principal_axes(moving)
        # eigenvectors have arbitrary signs: choose the proper rotation closest to identity
        best, best_trace = None, -float("inf")
        for signs in itertools.product((1.0, -1.0), repeat=d):
            r = em @ torch.diag(torch.tensor(signs, dtype=torch.float64)) @ ef.T
            if torch.linalg.det(r) < 0:
                continue
            tr = float(torch.trace(r))
            if tr > best_trace:
                best, best_trace = r, tr
        return AffineTransform(d, best, cm - cf, center=cf, trainable=False, dtype=torch.float64)
    raise InputError(f"unknown initialisation {method!r}; choose none, geometry, com or moments")
