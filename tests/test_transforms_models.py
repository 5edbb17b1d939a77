"""Transform models: parameterisations, composition, inverses, Jacobians, gradients."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medreg.core import GeometryError, Grid
from medreg.core.functional import gaussian_smooth
from medreg.transforms import (AffineTransform, BSplineTransform, Compose, DisplacementField,
                               Identity, RigidTransform, SimilarityTransform,
                               StationaryVelocityField, TranslationTransform,
                               compose_displacements, jacobian_det, rotation_matrix, warp_image)


def smooth_field(grid: Grid, sigma_mm: float, amplitude: float, seed: int = 0,
                 dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(1, grid.ndim, *grid.shape, generator=gen, dtype=dtype)
    u = gaussian_smooth(u, sigma_mm, grid.spacing)
    return u * (amplitude / u.abs().max())


def test_euler_angles_follow_itk():
    angles = [0.3, -0.2, 0.5]
    ours = rotation_matrix(torch.tensor(angles, dtype=torch.float64), 3, "euler").numpy()
    itk = sitk.Euler3DTransform((0, 0, 0), *angles)
    assert np.allclose(ours, np.asarray(itk.GetMatrix()).reshape(3, 3), atol=1e-12)


def test_rotation_parameterisations_agree():
    axis = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    axis = axis / axis.norm()
    angle = 0.7
    rv = rotation_matrix(axis * angle, 3, "rotvec")
    q = torch.cat([torch.tensor([np.cos(angle / 2)]), np.sin(angle / 2) * axis]).double()
    rq = rotation_matrix(q, 3, "quaternion")
    assert torch.allclose(rv, rq, atol=1e-12)
    versor = sitk.VersorTransform(tuple(axis.tolist()), angle)
    assert np.allclose(rq.numpy(), np.asarray(versor.GetMatrix()).reshape(3, 3), atol=1e-12)


def test_rigid_about_centre_keeps_centre_fixed():
    c = [10.0, -5.0, 3.0]
    t = RigidTransform(3, rotation=[0.2, 0.1, -0.3], center=c, dtype=torch.float64)
    assert torch.allclose(t(torch.tensor(c, dtype=torch.float64)), torch.tensor(c, dtype=torch.float64))
    a = t.linear_matrix()
    assert torch.allclose(a @ a.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    s = SimilarityTransform(2, scale=1.5, rotation=[0.3], dtype=torch.float64)
    assert torch.allclose(torch.linalg.det(s.linear_matrix()), torch.tensor(2.25, dtype=torch.float64))


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_inverse_is_exact(ndim):
    gen = torch.Generator().manual_seed(1)
    a = torch.eye(ndim, dtype=torch.float64) + 0.1 * torch.randn(ndim, ndim, generator=gen, dtype=torch.float64)
    t = AffineTransform(ndim, a, torch.randn(ndim, generator=gen, dtype=torch.float64),
                        center=torch.randn(ndim, generator=gen, dtype=torch.float64), dtype=torch.float64)
    p = torch.randn(30, ndim, dtype=torch.float64) * 20
    inv = t.inverse()
    assert torch.allclose(inv.double()(t(p)), p, atol=1e-9)
    assert torch.allclose(Compose(t, inv).double()(p), p, atol=1e-9)


def test_compose_order_is_itk_order():
    a = TranslationTransform(2, translation=[1.0, 0.0], dtype=torch.float64)
    r = RigidTransform(2, rotation=[np.pi / 2], dtype=torch.float64)
    p = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    # Compose(a, r): rotate first, then translate
    assert torch.allclose(Compose(a, r)(p), torch.tensor([[1.0, 1.0]], dtype=torch.float64), atol=1e-12)
    assert torch.allclose((r @ a)(p), torch.tensor([[0.0, 2.0]], dtype=torch.float64), atol=1e-12)
    itk = sitk.CompositeTransform([sitk.TranslationTransform(2, (1.0, 0.0)), sitk.Euler2DTransform((0, 0), np.pi / 2)])
    assert np.allclose(itk.TransformPoint((1.0, 0.0)), (1.0, 1.0))


def test_svf_inverse_composes_to_identity(oblique_grid3d):
    g = oblique_grid3d
    v = smooth_field(g, 6.0, 3.0)
    svf = StationaryVelocityField(v, g, steps=8)
    u = svf.displacement(g)
    ui = svf.inverse().displacement(g)
    err = compose_displacements(ui, u, g)[..., 3:-3, 3:-3, 3:-3]
    assert err.abs().max() < 0.05  # mm, for a 3 mm field
    assert jacobian_det(svf, g).min() > 0


def test_svf_of_zero_and_of_constant_velocity():
    g = Grid((16, 12), (1.5, 2.0))
    zero = StationaryVelocityField(torch.zeros(1, 2, *g.shape), g)
    assert torch.equal(zero.displacement(g), torch.zeros(1, 2, *g.shape))
    v = torch.zeros(1, 2, *g.shape, dtype=torch.float64)
    v[:, 0] = 2.5  # a constant velocity integrates to a translation
    u = StationaryVelocityField(v, g, steps=5).displacement(g)
    assert torch.allclose(u[..., :, :-3], torch.full_like(u[..., :, :-3], 0.0) + v[..., :, :-3], atol=1e-9)


def test_displacement_inverse_reports_residual(oblique_grid3d):
    g = oblique_grid3d
    u = smooth_field(g, 8.0, 2.0, seed=3)
    df = DisplacementField(u, g)
    inv = df.inverse(iterations=100, tolerance=1e-6)
    assert inv.inverse_residual is not None and inv.inverse_residual < 1e-3
    err = compose_displacements(u, inv.field, g)[..., 3:-3, 3:-3, 3:-3]
    assert err.abs().max() < 1e-2
    # a composite's inverse reports its numerical part's residual (linear parts are exact)
    from medreg.transforms import Compose

    both = Compose(AffineTransform(3, translation=[1.0, 0.0, 0.0], dtype=torch.float32), df).inverse()
    assert both.inverse_residual == pytest.approx(df.inverse().inverse_residual)
    assert Compose(AffineTransform(3), AffineTransform(3)).inverse().inverse_residual is None


def test_jacobian_det_of_scaling_and_fold():
    g = Grid((20, 20), (0.7, 1.3))
    s = AffineTransform(2, torch.diag(torch.tensor([1.2, 0.5], dtype=torch.float64)), dtype=torch.float64)
    assert torch.allclose(jacobian_det(s, g), torch.full((1, 20, 20), 0.6, dtype=torch.float64))
    mirror = AffineTransform(2, torch.diag(torch.tensor([-1.0, 1.0], dtype=torch.float64)), dtype=torch.float64)
    assert (jacobian_det(mirror, g) < 0).all()


def test_bspline_reproduces_constant_and_is_zero_outside():
    g = Grid((20, 16), (1.0, 2.0), (3.0, -4.0))
    b = BSplineTransform.from_grid(g, 8.0, dtype=torch.float64)
    with torch.no_grad():
        b.coefficients[:, 0] = 1.5  # constant coefficients -> constant displacement (partition of unity)
    u = b.displacement(g)
    assert torch.allclose(u[:, 0], torch.full_like(u[:, 0], 1.5), atol=1e-12)
    assert torch.equal(u[:, 1], torch.zeros_like(u[:, 1]))
    far = torch.tensor([[1000.0, 1000.0]], dtype=torch.float64)
    assert torch.equal(b(far), far)


def test_dimension_mismatch_errors():
    g3 = Grid((4, 4, 4))
    with pytest.raises(GeometryError, match="2D transform"):
        TranslationTransform(2).displacement(g3)
    with pytest.raises(GeometryError):
        Compose(TranslationTransform(2), TranslationTransform(3))
    with pytest.raises(GeometryError, match="shape"):
        DisplacementField(torch.zeros(1, 3, 4, 4, 5), g3)


def test_gradcheck_warp_wrt_displacement_and_affine():
    g = Grid((6, 5, 4), (1.0, 1.5, 2.0), (0.5, -1.0, 2.0))
    img = torch.rand(1, 1, *g.shape, dtype=torch.float64)
    u0 = smooth_field(g, 2.0, 0.6, seed=5)

    def by_field(u):
        return warp_image(img, DisplacementField(u, g), g, g, padding="border")

    assert torch.autograd.gradcheck(by_field, (u0.clone().requires_grad_(),), eps=1e-6, atol=1e-5)

    def by_affine(a, t):
        tr = AffineTransform(3, a, t, center=[1.0, 2.0, 3.0], trainable=False, dtype=torch.float64)
        return warp_image(img, tr, g, g, padding="border")

    a = (torch.eye(3, dtype=torch.float64) + 0.05 * torch.rand(3, 3, dtype=torch.float64)).requires_grad_()
    t = (0.3 * torch.rand(3, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(by_affine, (a, t), eps=1e-6, atol=1e-5)


def test_gradcheck_warp_at_identity_on_axis_aligned_grid():
    """Every matrix entry gets its gradient where it is exactly 0 (an identity start on an
    axis-aligned grid): rotations and shears are not frozen at their start, alone or composed
    after a displacement field (a deformable stage with a trainable linear part)."""
    g = Grid((7, 6, 5), (1.0, 1.5, 2.0))
    img = torch.rand(1, 1, *g.shape, dtype=torch.float64)
    u0 = smooth_field(g, 2.0, 0.6, seed=3)

    def by_affine(a, t):
        tr = AffineTransform(3, a, t, center=[1.0, 2.0, 3.0], trainable=False, dtype=torch.float64)
        return warp_image(img, tr, g, g, padding="border")

    # identity matrix (exact zeros off the diagonal), a sub-voxel shift keeps the samples off
    # the voxel centres, where linear interpolation has kinks
    a = torch.eye(3, dtype=torch.float64).requires_grad_()
    t = torch.tensor([0.3, 0.4, 0.7], dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(by_affine, (a, t), eps=1e-6, atol=1e-5)
    by_affine(a, t).pow(2).sum().backward()
    assert (a.grad - torch.diag(torch.diagonal(a.grad))).abs().max() > 1e-3

    def by_both(a, u):
        tr = AffineTransform(3, a, [0.3, 0.4, 0.7], trainable=False, dtype=torch.float64)
        return warp_image(img, Compose(tr, DisplacementField(u, g)), g, g, padding="border")

    assert torch.autograd.gradcheck(by_both, (a.detach().clone().requires_grad_(),
                                              u0.clone().requires_grad_()), eps=1e-6, atol=1e-5)


def test_gradcheck_svf_and_bspline():
    g = Grid((7, 6), (1.0, 1.5))
    img = torch.rand(1, 1, *g.shape, dtype=torch.float64)
    v0 = smooth_field(g, 2.0, 0.5, seed=2)

    def by_velocity(v):
        return warp_image(img, StationaryVelocityField(v, g, steps=3), g, g, padding="border")

    assert torch.autograd.gradcheck(by_velocity, (v0.clone().requires_grad_(),), eps=1e-6, atol=1e-5)
    ctrl = BSplineTransform.from_grid(g, 3.0).control
    c0 = 0.3 * torch.rand(1, 2, *ctrl.shape, dtype=torch.float64)

    def by_coeff(c):
        b = BSplineTransform(ctrl, c, trainable=False, dtype=torch.float64)
        return warp_image(img, b, g, g, padding="border")

    assert torch.autograd.gradcheck(by_coeff, (c0.clone().requires_grad_(),), eps=1e-6, atol=1e-5)


def test_device_and_dtype_follow_parameters():
    g = Grid((8, 8))
    t = TranslationTransform(2, translation=[1.0, 2.0], dtype=torch.float64)
    assert t.displacement(g).dtype == torch.float64
    assert Identity(2).displacement(g).dtype == torch.float32


def test_displacement_field_on_another_grid():
    """A field sampled on one grid and warped onto another (no recursion; values interpolated)."""
    import torch

    from medreg.core import Grid
    from medreg.transforms import DisplacementField, warp_image

    src = Grid((8, 8))
    u = torch.zeros(1, 2, 8, 8)
    u[:, 0] = 1.5  # +1.5 mm along x everywhere
    t = DisplacementField(u, src)
    target = Grid((5, 6), (1.5, 1.2))
    disp = t.displacement(target)
    assert disp.shape == (1, 2, 6, 5)
    assert torch.allclose(disp[:, 0], torch.full_like(disp[:, 0], 1.5))
    img = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)
    out = warp_image(img, t, target, src)
    assert out.shape == (1, 1, 6, 5)
