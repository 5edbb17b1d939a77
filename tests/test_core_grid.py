"""Grid: frame conversions, derived grids and conventions."""

import numpy as np
import pytest
import torch

from medreg.core import Frame, GeometryError, Grid
from medreg.core.functional import jacobian_det, spatial_gradient


@pytest.mark.parametrize("fixture", ["oblique_grid2d", "oblique_grid3d"])
def test_index_world_round_trip(fixture, request):
    g = request.getfixturevalue(fixture)
    idx = torch.rand(50, g.ndim, dtype=torch.float64) * torch.tensor(g.size, dtype=torch.float64)
    world = g.transform_points(idx, Frame.INDEX, Frame.WORLD)
    back = g.transform_points(world, "world", "index")
    assert torch.allclose(back, idx, atol=1e-5)
    norm = g.transform_points(world, "world", "norm")
    assert torch.allclose(g.transform_points(norm, "norm", "index"), idx, atol=1e-5)


def test_world_formula_matches_itk_definition(oblique_grid3d):
    g = oblique_grid3d
    i = np.array([3.0, 7.0, 2.0])
    expected = np.asarray(g.origin) + g.direction @ (np.asarray(g.spacing) * i)
    got = g.transform_points(torch.tensor(i), "index", "world").numpy()
    assert np.allclose(got, expected, atol=1e-9)


def test_norm_frame_is_grid_sample_align_corners(oblique_grid3d):
    g = oblique_grid3d
    n = g.points("norm", dtype=torch.float64)
    assert torch.allclose(n[0, 0, 0], torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64))
    assert torch.allclose(n[-1, -1, -1], torch.ones(3, dtype=torch.float64))
    # last component (z) varies along the first tensor axis
    assert n[1, 0, 0, 2] > n[0, 0, 0, 2] and n[1, 0, 0, 0] == n[0, 0, 0, 0]


def test_matrix_between_grids_chains_through_world(oblique_grid3d):
    a = oblique_grid3d
    b = Grid((10, 11, 12), (2.0, 1.0, 3.0), (5.0, 4.0, -3.0))
    idx = torch.rand(20, 3, dtype=torch.float64) * 9
    direct = a.transform_points(idx, "index", "index", to_grid=b)
    via = b.transform_points(a.transform_points(idx, "index", "world"), "world", "index")
    assert torch.allclose(direct, via, atol=1e-9)


@pytest.mark.parametrize("fixture", ["oblique_grid2d", "oblique_grid3d"])
def test_crop_pad_downsample_keep_world_positions(fixture, request):
    g = request.getfixturevalue(fixture)
    start = [2] * g.ndim
    c = g.crop(start, [s - 1 for s in g.size])
    p_c = c.transform_points(torch.zeros(g.ndim, dtype=torch.float64), "index", "world")
    p_g = g.transform_points(torch.tensor(start, dtype=torch.float64), "index", "world")
    assert torch.allclose(p_c, p_g, atol=1e-9)
    p = g.pad(3)
    assert p.size == tuple(s + 6 for s in g.size)
    assert torch.allclose(p.transform_points(torch.full((g.ndim,), 3.0, dtype=torch.float64), "index", "world"),
                          torch.tensor(g.origin, dtype=torch.float64), atol=1e-9)
    # downsampling keeps the physical box (outer voxel edges) and the centre
    d = g.downsample(2)
    assert np.allclose(d.center(), g.center(), atol=1e-6)
    ext_g = np.asarray(g.size) * np.asarray(g.spacing)
    ext_d = np.asarray(d.size) * np.asarray(d.spacing)
    assert np.allclose(ext_g, ext_d)


def test_with_spacing_keeps_centre(oblique_grid3d):
    g = oblique_grid3d.with_spacing(2.0)
    assert g.spacing == (2.0, 2.0, 2.0)
    assert np.allclose(g.center(), oblique_grid3d.center(), atol=1e-6)


def test_invalid_geometry_is_rejected():
    with pytest.raises(GeometryError, match="not orthonormal"):
        Grid((4, 4, 4), direction=[[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    with pytest.raises(GeometryError, match="spacing"):
        Grid((4, 4), spacing=(1.0, 0.0))
    with pytest.raises(GeometryError, match="2D or 3D"):
        Grid((4, 4, 4, 4))


def test_orientation_codes():
    assert Grid((2, 2, 2)).orientation() == "LPS"
    ras = np.diag([-1.0, -1.0, 1.0])  # index x increases towards R, y towards A
    assert Grid((2, 2, 2), direction=ras).orientation() == "RAS"


def test_spatial_gradient_and_jacobian_of_linear_field(oblique_grid3d):
    g = oblique_grid3d
    a = torch.tensor([[0.1, 0.02, 0.0], [0.0, -0.05, 0.03], [0.01, 0.0, 0.2]], dtype=torch.float64)
    pts = g.points(dtype=torch.float64)
    u = (pts @ a.T).movedim(-1, 0)[None]
    det = jacobian_det(u, g)
    assert torch.allclose(det, torch.linalg.det(torch.eye(3, dtype=torch.float64) + a).expand_as(det), atol=1e-9)
    x = torch.arange(10, dtype=torch.float64).view(1, 1, 1, 10) * 3.0
    gx = spatial_gradient(x, spacing=(0.5, 1.0))
    assert torch.allclose(gx[:, :, 0], torch.full_like(x, 6.0))
    assert torch.equal(gx[:, :, 1], torch.zeros_like(x))


def test_spatial_gradient_adjoint_and_cofactors():
    """⟨∂u, g⟩ = ⟨u, ∂ᵀg⟩ for the central/one-sided differences (2D and 3D, anisotropic, axes of
    length 2 and 3 included); cofactors are the derivatives of the determinant (autograd)."""
    from medreg.core.functional import cofactor_small, det_small, spatial_gradient_adjoint

    gen = torch.Generator().manual_seed(3)
    for shape, spacing in (((7, 2), (0.7, 1.3)), ((3, 5, 4), (1.0, 2.0, 0.6))):
        d = len(shape)
        u = torch.randn(2, 3, *shape, dtype=torch.float64, generator=gen)
        g = torch.randn(2, 3, d, *shape, dtype=torch.float64, generator=gen)
        lhs = (spatial_gradient(u, spacing) * g).sum()
        rhs = (u * spatial_gradient_adjoint(g, spacing)).sum()
        assert float(lhs) == pytest.approx(float(rhs), rel=1e-12)
        jac = torch.randn(2, d, d, 4, 3, dtype=torch.float64, generator=gen).requires_grad_(True)
        (ref,) = torch.autograd.grad(det_small(jac).sum(), jac)
        assert torch.allclose(cofactor_small(jac.detach()), ref, atol=1e-12)
        # the no-autograd path (entries written in place) is bit-identical to the autograd one
        j32 = jac.detach().float().mul(3.7).requires_grad_(True)
        assert torch.equal(cofactor_small(j32).detach(), cofactor_small(j32.detach()))


def test_matvec_field_diagonal_and_general():
    from medreg.core.functional import matvec_field

    g = torch.Generator().manual_seed(1)
    f = torch.randn(2, 3, 4, 5, 6, generator=g, dtype=torch.float64)
    for m in (torch.diag(torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64)),
              torch.randn(3, 3, generator=g, dtype=torch.float64)):
        ref = torch.einsum("ij,nj...->ni...", m, f)
        torch.testing.assert_close(matvec_field(m, f), ref, rtol=1e-14, atol=1e-14)
    m = torch.randn(3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(matvec_field(m, f, diagonal=False), torch.einsum("ij,nj...->ni...", m, f))


def test_corners_of_voxel_centres_and_of_voxel_edges(oblique_grid3d):
    g = oblique_grid3d
    centres, edges = g.corners(), g.corners(edges=True)
    assert centres.shape == edges.shape == (8, 3)
    idx = g.transform_points(edges, "world", "index")
    assert torch.allclose(idx.amin(0), torch.full((3,), -0.5, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(idx.amax(0), torch.tensor(g.size, dtype=torch.float64) - 0.5, atol=1e-9)
    assert torch.allclose(g.transform_points(centres, "world", "index").amax(0),
                          torch.tensor(g.size, dtype=torch.float64) - 1, atol=1e-9)
