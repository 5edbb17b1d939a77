"""Regularisers: closed forms, physical units (spacing, resolution, direction), gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from medreg.core import Grid
from medreg.losses import Bending, Diffusion, Elastic, JacobianPenalty, TotalVariation
from medreg.losses import functional as L

D64 = torch.float64


def _field(grid: Grid, fn) -> torch.Tensor:
    """Sample ``fn(world points (..., D)) -> (..., D)`` on ``grid`` as ``(1, D, *shape)``."""
    pts = grid.points(dtype=D64)
    return fn(pts).movedim(-1, 0).unsqueeze(0).contiguous()


def _random_matrix(d, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(d, d, generator=g, dtype=D64)


GRIDS = {
    "3d_aniso": lambda: Grid((9, 8, 7), (0.8, 1.5, 2.5), (3.0, -2.0, 1.0)),
    "2d_aniso": lambda: Grid((10, 9), (0.7, 1.9), (1.0, 2.0)),
}


@pytest.fixture(params=sorted(GRIDS) + ["3d_oblique", "2d_oblique"])
def grid(request, oblique_grid3d, oblique_grid2d):
    if request.param == "3d_oblique":
        return oblique_grid3d
    if request.param == "2d_oblique":
        return oblique_grid2d
    return GRIDS[request.param]()


# --------------------------------------------------------------------------- closed forms
def test_bending_affine_is_zero_and_quadratic_is_closed_form(grid):
    d = grid.ndim
    a, b = _random_matrix(d, 1), torch.arange(d, dtype=D64)
    affine = _field(grid, lambda x: x @ a.T + b)
    assert L.bending(affine, grid).item() == pytest.approx(0.0, abs=1e-10)
    hs = []
    for k in range(d):
        h = _random_matrix(d, 10 + k, 0.05)
        hs.append(h + h.T)  # symmetric Hessians

    def quad(x):
        comps = [0.5 * ((x @ h) * x).sum(-1) for h in hs]
        return torch.stack(comps, -1) + x @ a.T

    expected = sum((h ** 2).sum() for h in hs).item()
    # spacing alone suffices even for the oblique grid: |H|_F is rotation invariant
    assert L.bending(_field(grid, quad), grid).item() == pytest.approx(expected, rel=1e-9)
    assert L.bending(_field(grid, quad), grid.spacing).item() == pytest.approx(expected, rel=1e-9)


def test_diffusion_and_tv_of_linear_field(grid):
    d = grid.ndim
    g = _random_matrix(d, 2)
    u = _field(grid, lambda x: x @ g.T + 1.0)
    assert L.diffusion(u, grid).item() == pytest.approx((g ** 2).sum().item(), rel=1e-10)
    row_norms = torch.sqrt((g ** 2).sum(1) + 1e-6) - 1e-3
    assert L.total_variation(u, grid, eps=1e-3).item() == pytest.approx(row_norms.sum().item(), rel=1e-9)
    translation = _field(grid, lambda x: torch.ones_like(x) * 3.0)
    for fn in (L.diffusion, L.bending, L.elastic, L.total_variation, L.jacobian_penalty):
        assert fn(translation, grid).item() == pytest.approx(0.0, abs=1e-12)


def test_tv_l1_on_axis_aligned_grid():
    grid = Grid((8, 9, 10), (0.5, 1.0, 2.0))
    g = _random_matrix(3, 3)
    u = _field(grid, lambda x: x @ g.T)
    assert L.total_variation(u, grid, mode="l1").item() == pytest.approx(g.abs().sum().item(), rel=1e-10)


def test_elastic_closed_form_and_direction(grid):
    d = grid.ndim
    g = _random_matrix(d, 4)
    strain = 0.5 * (g + g.T)
    skew = 0.5 * (g - g.T)
    mu, lam = 0.7, 1.3
    expected = mu * (strain ** 2).sum() + 0.5 * lam * torch.trace(strain) ** 2
    u = _field(grid, lambda x: x @ g.T)
    assert L.elastic(u, grid, mu=mu, lam=lam).item() == pytest.approx(expected.item(), rel=1e-9)
    # an infinitesimal rotation has no strain
    rot = _field(grid, lambda x: x @ skew.T)
    assert L.elastic(rot, grid).item() == pytest.approx(0.0, abs=1e-12)
    if not np.allclose(grid.direction, np.eye(d)):
        # a spacing alone cannot know the grid is rotated: the Grid matters here
        assert L.elastic(rot, grid.spacing).item() > 1e-4


def test_jacobian_penalties_of_linear_field(grid):
    d = grid.ndim
    g = _random_matrix(d, 5, 0.3)
    det = torch.det(torch.eye(d, dtype=D64) + g).item()
    u = _field(grid, lambda x: x @ g.T)
    assert L.jacobian_penalty(u, grid, mode="log2").item() == pytest.approx(math.log(det) ** 2, rel=1e-9)
    assert L.jacobian_penalty(u, grid, threshold=det + 0.5).item() == pytest.approx(0.25, rel=1e-9)
    assert L.jacobian_penalty(u, grid, threshold=det - 0.5).item() == 0.0
    # folding: det(I + G) < 0
    fold = torch.zeros(d, d, dtype=D64)
    fold[0, 0] = -2.0
    det_f = torch.det(torch.eye(d, dtype=D64) + fold).item()
    assert det_f < 0
    uf = _field(grid, lambda x: x @ fold.T)
    assert L.jacobian_penalty(uf, grid).item() == pytest.approx((0.1 - det_f) ** 2, rel=1e-9)


# --------------------------------------------------------------------------- resolution
def _smooth(x):
    """A smooth field with a few full periods over the 40 mm box (world mm in, mm out)."""
    k = 2 * math.pi / 40.0
    return torch.stack([1.5 * torch.sin(k * x[..., 1]) * torch.cos(k * x[..., 2]),
                        1.0 * torch.sin(k * x[..., 0] + 0.5),
                        0.8 * torch.cos(k * x[..., 0]) * torch.sin(k * x[..., 1])], -1)


REGULARISERS = {
    "diffusion": lambda u, g: L.diffusion(u, g),
    "bending": lambda u, g: L.bending(u, g),
    "elastic": lambda u, g: L.elastic(u, g, mu=1.0, lam=0.5),
    "tv": lambda u, g: L.total_variation(u, g),
    "jacobian_log2": lambda u, g: L.jacobian_penalty(u, g, mode="log2"),
}


@pytest.mark.parametrize("name", sorted(REGULARISERS))
def test_same_physical_field_at_two_resolutions(name):
    fn = REGULARISERS[name]
    # the same 40 mm box sampled at 2 mm, at 1 mm and anisotropically
    coarse = Grid((21, 21, 21), 2.0)
    fine = Grid((41, 41, 41), 1.0)
    aniso = Grid((41, 21, 81), (1.0, 2.0, 0.5))
    v_c = fn(_field(coarse, _smooth), coarse).item()
    v_f = fn(_field(fine, _smooth), fine).item()
    v_a = fn(_field(aniso, _smooth), aniso).item()
    assert v_f > 0
    assert v_c == pytest.approx(v_f, rel=0.04)
    assert v_a == pytest.approx(v_f, rel=0.04)
    # and in voxel units it would not be: the spacing is honoured
    assert fn(_field(coarse, _smooth), 1.0).item() != pytest.approx(v_c, rel=0.2)


def test_diffusion_converges_to_the_continuous_value():
    # u_y = A sin(k x): |∇u|² = A² k² cos²(k x), mean A² k² / 2 over full periods
    k, amp = 2 * math.pi / 40.0, 1.3
    values = []
    for n, h in ((21, 2.0), (41, 1.0), (81, 0.5)):
        grid = Grid((n, 5, 4), (h, 1.0, 1.0))
        u = _field(grid, lambda x: torch.stack([0 * x[..., 0], amp * torch.sin(k * x[..., 0]),
                                                0 * x[..., 0]], -1))
        values.append(L.diffusion(u, grid).item())
    exact = amp ** 2 * k ** 2 / 2
    errors = [abs(v - exact) / exact for v in values]
    assert errors[-1] < 0.01 and errors[0] > errors[1] > errors[2]


# --------------------------------------------------------------------------- gradients
GRADCHECK = {
    "diffusion": lambda u, g: L.diffusion(u, g),
    "bending": lambda u, g: L.bending(u, g),
    "elastic": lambda u, g: L.elastic(u, g, mu=0.6, lam=1.4),
    "tv_isotropic": lambda u, g: L.total_variation(u, g),
    "tv_l1": lambda u, g: L.total_variation(u, g, mode="l1"),
    "jacobian_hinge": lambda u, g: L.jacobian_penalty(u, g, threshold=0.5),
    "jacobian_log2": lambda u, g: L.jacobian_penalty(u, g, mode="log2"),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK))
@pytest.mark.parametrize("ndim", [2, 3])
def test_gradcheck_regulariser(name, ndim, oblique_grid3d, oblique_grid2d):
    gen = torch.Generator().manual_seed(6)
    shape = (2, 3, 4, 5, 6) if ndim == 3 else (2, 2, 5, 6)
    scale = 0.8 if name == "jacobian_hinge" else 0.2  # the hinge needs some folded voxels
    u = (scale * torch.randn(shape, generator=gen, dtype=D64)).requires_grad_()
    grid = Grid.from_shape(shape[2:], spacing=(0.7, 1.3, 2.0)[:ndim],
                           direction=(oblique_grid3d if ndim == 3 else oblique_grid2d).direction)
    fn = GRADCHECK[name]
    if name == "jacobian_hinge":
        assert fn(u, grid).item() > 0
    assert gradcheck(lambda x: fn(x, grid), (u,), eps=1e-6, atol=1e-7)


def test_zero_field_has_finite_gradients():
    u = torch.zeros(1, 3, 4, 5, 6, dtype=D64, requires_grad=True)
    for fn in list(REGULARISERS.values()) + [lambda x, g: L.total_variation(x, g, mode="l1")]:
        (gr,) = torch.autograd.grad(fn(u, (1.0, 2.0, 3.0)), (u,))
        assert torch.isfinite(gr).all() and gr.abs().max() == 0


# --------------------------------------------------------------------------- modules and inputs
class _FakeTransform:
    """Duck-typed transform: anything with ``displacement(grid)`` → ``(1, D, *grid.shape)``."""

    def __init__(self, g):
        self.g = g

    def displacement(self, grid):
        return _field(grid, lambda x: x @ self.g.T)


def test_modules_accept_transforms_and_grids(oblique_grid3d):
    g = _random_matrix(3, 7)
    t = _FakeTransform(g)
    u = t.displacement(oblique_grid3d)
    for module in (Diffusion(), Bending(), Elastic(mu=2.0), TotalVariation(), JacobianPenalty(mode="log2")):
        assert module(t, oblique_grid3d).item() == pytest.approx(module(u, oblique_grid3d).item(), rel=1e-12)
    assert Diffusion()(u, oblique_grid3d).item() == pytest.approx((g ** 2).sum().item(), rel=1e-10)
    with pytest.raises(ValueError, match="Grid"):
        Diffusion()(t, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="not sampled on the grid"):
        Diffusion()(u[..., :-1], oblique_grid3d)
    with pytest.raises(ValueError, match="D = 2 or 3"):
        Bending()(torch.zeros(1, 2, 4, 5, 6))
    with pytest.raises(ValueError, match="2 values"):
        L.diffusion(torch.zeros(1, 3, 4, 5, 6), (1.0, 1.0))
    per = Bending(reduction="none")(torch.randn(3, 2, 6, 7, dtype=D64), (1.0, 2.0))
    assert per.shape == (3,)
    assert Elastic().extra_repr().startswith("mu=1")
