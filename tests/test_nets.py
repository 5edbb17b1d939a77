"""Tests of medreg.nets: the five registration networks and their shared layers.

Sizes are small and odd (2D 37×29, 3D 19×23×17) so padding/cropping paths are exercised.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import medreg.nets as nets
from medreg.core.errors import InputError
from medreg.core.functional import gaussian_smooth
from medreg.nets.coupled import gradients_to_grid
from medreg.nets.functional import (affine_to_displacement, compose_voxel, identity_grid,
                                    integrate_velocity, resize_field, warp_voxel)
from medreg.nets.layers import level_shape, normalised_to_voxel_affine
from medreg.nets.pyramid_corr import local_correlation

SHAPES = {2: (37, 29), 3: (19, 23, 17)}

# (name, small non-default options): every network and its main variants
CASES = [
    ("unet", dict(features=(8, 16, 16), decoder_features=(16, 16, 8))),
    ("unet", dict(features=(8, 16, 16), decoder_features=(16, 8), integrate_steps=4,
                  half_resolution=True)),
    ("unet", dict(features=(8, 16), decoder_features=(8, 8), conditional=True,
                  default_reg_weight=0.5)),
    ("coupled", dict(features=8, decoder_features=(8,))),
    ("coupled", dict(features=8, decoder_features=(8,), deformable_only=True)),
    ("coupled", dict(features=8, linear_only=True)),
    ("lapirn", dict(levels=2, features=(8, 8), decoder_features=(8, 8))),
    ("lapirn", dict(levels=3, features=(8, 8), decoder_features=(8,), integrate_steps=3)),
    ("cascade", dict(stages=2, affine_features=(8, 8), features=(8, 8), decoder_features=(8, 8),
                     stage_downsample=[1, 2])),
    ("pyramid_corr", dict(features=(8, 8, 8), decoder_features=(8,), search_radius=1,
                          finest_level=0)),
    ("pyramid_corr", dict(features=(8, 8, 8), decoder_features=(8,), finest_level=1)),
]
IDS = [f"{n}-{i}" for i, (n, _) in enumerate(CASES)]


def images(ndim: int, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random fixed/moving images ``(batch, 1, *SHAPES[ndim])``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * batch, 1, *SHAPES[ndim], generator=g)
    x = gaussian_smooth(x, 1.5, [1.0] * ndim)
    return x[:batch], x[batch:]


def perturb(net: torch.nn.Module, std: float = 0.02, seed: int = 1) -> None:
    """Add noise to every parameter (so near-zero output heads produce visible fields)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))


def blob_image(shape, centres, sigma=3.0) -> torch.Tensor:
    """Sum of Gaussian blobs ``(1, 1, *shape)``; ``centres`` in array order (voxels)."""
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    out = torch.zeros(shape)
    for amp, c in centres:
        r2 = sum((a - ci) ** 2 for a, ci in zip(axes, c))
        out += amp * torch.exp(-r2 / (2 * sigma ** 2))
    return out[None, None]


# ---------------------------------------------------------------- contract of every network

def test_registry_lists_all_networks():
    assert set(nets.available()) >= {"unet", "coupled", "lapirn", "cascade", "pyramid_corr"}
    with pytest.raises(InputError, match="unknown network"):
        nets.create("nope", ndim=2)
    with pytest.raises(InputError, match="no option"):
        nets.create("unet", ndim=2, widths=3)
    with pytest.raises(InputError, match="ndim"):
        nets.create("unet", ndim=4)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_shape_finite_and_config_roundtrip(name, opts, ndim):
    torch.manual_seed(0)
    net = nets.create(name, ndim=ndim, **opts)
    perturb(net)
    fixed, moving = images(ndim)
    out = net(fixed, moving)
    assert isinstance(out, nets.NetOutput)
    assert out.displacement.shape == (2, ndim, *SHAPES[ndim])
    assert torch.isfinite(out.displacement).all()
    assert out.displacement.abs().max() > 1e-6  # the perturbed net is not the identity
    # the two pairs of the batch are treated separately
    single = net(fixed[1:], moving[1:])
    torch.testing.assert_close(single.displacement, out.displacement[1:], atol=1e-5, rtol=1e-4)

    cfg = net.config()
    assert cfg["name"] == name
    rebuilt = nets.create(**cfg)
    assert rebuilt.config() == cfg
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in net.parameters()]
    rebuilt.load_state_dict(net.state_dict())
    again = rebuilt(fixed, moving)
    assert torch.equal(again.displacement, out.displacement)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_gradient_reaches_every_parameter(name, opts, ndim):
    torch.manual_seed(0)
    net = nets.create(name, ndim=ndim, **opts)
    perturb(net)
    fixed, moving = images(ndim)
    out = net(fixed, moving)
    loss = F.mse_loss(warp_voxel(moving, out.displacement), fixed) + out.displacement.mean()
    if out.penalty is not None:
        loss = loss + out.penalty
    loss.backward()
    dead = [n for n, p in net.named_parameters()
            if p.requires_grad and (p.grad is None or not bool((p.grad != 0).any()))]
    assert not dead, f"no gradient reaches {dead}"


@pytest.mark.parametrize("name", ["unet", "coupled", "lapirn", "cascade", "pyramid_corr"])
def test_bad_input_is_an_input_error(name):
    net = nets.create(name, ndim=2)
    fixed, moving = images(2, batch=1)
    with pytest.raises(InputError, match="differ"):
        net(fixed, moving[..., :-1])
    with pytest.raises(InputError, match="spatial axes"):
        net(fixed[0], moving[0])
    with pytest.raises(InputError, match="channels"):
        net(fixed.repeat(1, 2, 1, 1), moving.repeat(1, 2, 1, 1))
    with pytest.raises(InputError, match="regularisation"):
        net(fixed, moving, reg_weight=0.1)


# ---------------------------------------------------------------- identity at initialisation

@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name", ["unet", "coupled", "lapirn", "cascade", "pyramid_corr"])
def test_untrained_nets_are_near_identity(name, ndim):
    torch.manual_seed(0)
    net = nets.create(name, ndim=ndim)
    fixed, moving = images(ndim, batch=1)
    with torch.no_grad():
        out = net(fixed, moving)
    assert out.displacement.abs().max() < 5e-3


@pytest.mark.parametrize("ndim", [2, 3])
def test_coupled_identity_is_exact(ndim):
    torch.manual_seed(0)
    net = nets.create("coupled", ndim=ndim)
    with torch.no_grad():
        for conv in (net.gradient_head, net.linear.conv):
            conv.weight.zero_()
            conv.bias.zero_()
    fixed, moving = images(ndim, batch=2)
    out = net(fixed, moving)
    assert torch.equal(out.extras["gradients"], torch.ones_like(out.extras["gradients"]))
    eye = torch.cat([torch.eye(ndim), torch.zeros(ndim, 1)], dim=1).expand(2, -1, -1)
    assert torch.equal(out.affine, eye)
    assert torch.equal(out.displacement, torch.zeros_like(out.displacement))
    assert float(out.penalty.detach()) == 0.0


def test_gradients_to_grid_identity_and_axes():
    phi = torch.ones(1, 3, 5, 6, 7)
    torch.testing.assert_close(gradients_to_grid(phi), identity_grid((5, 6, 7)), rtol=0, atol=0)
    # doubling Φ_x stretches x only (component x runs along the last array axis)
    phi[:, 0] = 2.0
    grid = gradients_to_grid(phi)
    assert torch.equal(grid[:, 0], 2 * identity_grid((5, 6, 7))[:, 0])
    assert torch.equal(grid[:, 1:], identity_grid((5, 6, 7))[:, 1:])


# ---------------------------------------------------------------- coupled: monotone grid

def _jacobian_det(points: torch.Tensor) -> torch.Tensor:
    """Forward-difference Jacobian determinant of a point map ``(N, D, *spatial)``."""
    d = points.shape[1]
    cols = [points.diff(dim=2 + d - 1 - c) for c in range(d)]  # ∂/∂x, ∂/∂y, ∂/∂z
    common = [n - 1 for n in points.shape[2:]]
    cols = [c[(slice(None), slice(None)) + tuple(slice(0, n) for n in common)] for c in cols]
    jac = torch.stack(cols, dim=-1).movedim(1, -2)  # (N, *common, comp, deriv)
    return torch.linalg.det(jac)


@pytest.mark.parametrize("ndim", [2, 3])
def test_coupled_grid_is_strictly_increasing_along_every_axis(ndim):
    shape = SHAPES[ndim]
    for seed in range(4):
        torch.manual_seed(seed)
        net = nets.create("coupled", ndim=ndim, features=8, decoder_features=(8,))
        with torch.no_grad():  # far from identity: Φ spans almost all of (0, 2)
            torch.nn.init.normal_(net.gradient_head.weight, std=1.0)
            torch.nn.init.normal_(net.gradient_head.bias, std=0.5)
            torch.nn.init.normal_(net.linear.conv.weight, std=0.05)
            out = net(*images(ndim, batch=2, seed=seed))
        phi, grid = out.extras["gradients"], out.extras["grid"]
        assert phi.min() < 0.1 and phi.max() > 1.9
        for c in range(ndim):
            steps = grid[:, c].diff(dim=1 + ndim - 1 - c)
            assert (steps > 0).all(), f"seed {seed}: grid component {c} not increasing"
        # displacement = A(grid(p)) − p, with A the voxel-index affine
        d = ndim
        mapped = (out.affine[:, :, :d] @ grid.flatten(2) + out.affine[:, :, d:]).view_as(grid)
        torch.testing.assert_close(out.displacement, mapped - identity_grid(shape),
                                   atol=1e-4, rtol=1e-5)
        # the affine acts after the grid: J = A · J_grid, so with det A > 0 the sign of the full
        # map's Jacobian determinant is the grid's everywhere
        det_a = torch.linalg.det(out.affine[:, :, :d])
        assert (det_a > 0).all()
        full = _jacobian_det(out.displacement + identity_grid(shape))
        own = _jacobian_det(grid)
        view = (-1,) + (1,) * d
        torch.testing.assert_close(full, det_a.view(view) * own, atol=1e-2, rtol=1e-3)


def test_coupled_smooth_gradients_give_positive_jacobian():
    """With Φ smooth across rows (a trained regime) the full map has det J > 0 everywhere."""
    shape = SHAPES[3]
    torch.manual_seed(3)
    logits = gaussian_smooth(torch.randn(1, 3, *shape), 4.0, [1.0] * 3)
    logits = 0.5 * logits / logits.abs().max()
    phi = 2 * torch.sigmoid(logits)
    grid = gradients_to_grid(phi)
    rot = torch.tensor([[0.95, -0.2, 0.05], [0.2, 0.97, 0.0], [0.0, 0.05, 1.05]])
    mapped = torch.einsum("ij,njzyx->nizyx", rot, grid)
    assert torch.linalg.det(rot) > 0
    assert (_jacobian_det(mapped) > 0).all()


def test_coupled_flags_and_penalty():
    with pytest.raises(InputError, match="exclude"):
        nets.create("coupled", ndim=2, deformable_only=True, linear_only=True)
    fixed, moving = images(2)
    torch.manual_seed(0)
    lin = nets.create("coupled", ndim=2, linear_only=True)
    perturb(lin, 0.05)
    out = lin(fixed, moving)
    torch.testing.assert_close(out.displacement, affine_to_displacement(out.affine, SHAPES[2]),
                               atol=1e-4, rtol=1e-5)
    defo = nets.create("coupled", ndim=2, deformable_only=True, beta=0.5)
    perturb(defo, 0.05)
    out = defo(fixed, moving)
    assert out.affine is None
    phi = out.extras["gradients"]
    expected = 0.5 * (phi - 1).abs().flatten(1).sum(1).mean()
    torch.testing.assert_close(out.penalty, expected)


def test_normalised_affine_matches_affine_grid():
    """The voxel-index affine of a normalised residual warps like ``F.affine_grid``."""
    torch.manual_seed(0)
    for shape in [(37, 29), (9, 11, 13)]:
        d = len(shape)
        residual = 0.1 * torch.randn(2, d, d + 1)
        theta = torch.cat([torch.eye(d), torch.zeros(d, 1)], dim=1) + residual
        image = torch.rand(2, 1, *shape)
        ref = F.grid_sample(image, F.affine_grid(theta, [2, 1, *shape], align_corners=True),
                            align_corners=True, padding_mode="border")
        disp = affine_to_displacement(normalised_to_voxel_affine(residual, shape), shape)
        torch.testing.assert_close(warp_voxel(image, disp), ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- unet options

@pytest.mark.parametrize("half", [False, True])
def test_unet_integration_gives_an_inverse(half):
    """With a smooth velocity, exp(v) ∘ exp(−v) ≈ identity (the inverse output is right)."""
    torch.manual_seed(0)
    net = nets.create("unet", ndim=2, features=(8, 16, 16), decoder_features=(16, 16, 8),
                      integrate_steps=6, half_resolution=half)
    velocity = {}

    def smooth_velocity(module, inputs, output):
        g = torch.Generator().manual_seed(5)
        v = gaussian_smooth(torch.randn(output.shape, generator=g), 4.0, [1.0, 1.0])
        v = v * (3.0 / v.abs().max()) * (0.5 if half else 1.0)  # up to 3 voxels at full size
        velocity["v"] = v
        return v + 0 * output

    net.head.register_forward_hook(smooth_velocity)
    fixed, moving = images(2, batch=1)
    out = net(fixed, moving)
    assert out.velocity is not None and out.inverse is not None
    assert out.displacement.abs().max() > 1.0
    err = compose_voxel(out.displacement, out.inverse)[..., 4:-4, 4:-4]
    assert err.abs().max() < 0.05
    err_back = compose_voxel(out.inverse, out.displacement)[..., 4:-4, 4:-4]
    assert err_back.abs().max() < 0.05
    if not half:
        torch.testing.assert_close(out.velocity, velocity["v"][..., :37, :29])
        # integrated on the padded grid: equal to integrating the cropped velocity away from the
        # far edges (where the flow may reach into the padding)
        inner = (Ellipsis, slice(0, -6), slice(0, -6))
        torch.testing.assert_close(out.displacement[inner],
                                   integrate_velocity(out.velocity, 6)[inner], atol=1e-3, rtol=1e-3)


def test_conditional_unet_depends_on_reg_weight():
    torch.manual_seed(0)
    net = nets.create("unet", ndim=2, features=(8, 16), decoder_features=(8, 8), conditional=True,
                      default_reg_weight=0.3)
    assert net.supports_regularisation
    with torch.no_grad():
        torch.nn.init.normal_(net.head.weight, std=1e-2)
    fixed, moving = images(2, batch=2)
    a = net(fixed, moving, reg_weight=0.01).displacement
    b = net(fixed, moving, reg_weight=10.0).displacement
    assert (a - b).abs().max() > 1e-3 * a.abs().max()
    # per-pair weights, and the stored default
    mixed = net(fixed, moving, reg_weight=torch.tensor([0.01, 10.0])).displacement
    torch.testing.assert_close(mixed[0], a[0])
    torch.testing.assert_close(mixed[1], b[1])
    torch.testing.assert_close(net(fixed, moving).displacement,
                               net(fixed, moving, reg_weight=0.3).displacement)
    assert torch.isfinite(net(fixed, moving, reg_weight=0.0).displacement).all()
    with pytest.raises(InputError, match="≥ 0"):
        net(fixed, moving, reg_weight=-1.0)
    with pytest.raises(InputError, match="batch"):
        net(fixed, moving, reg_weight=torch.tensor([0.1, 0.2, 0.3]))
    plain = nets.create("unet", ndim=2)
    with pytest.raises(InputError):
        plain(fixed, moving, reg_weight=0.5)


def test_unet_overfits_a_translated_blob_image():
    """60 Adam steps lower the image MSE a lot: the output head learns (is not dead)."""
    torch.manual_seed(0)
    shape = (37, 29)
    blobs = [(1.0, (12, 10)), (0.7, (24, 18)), (0.5, (16, 21)), (0.8, (27, 8))]
    fixed = blob_image(shape, blobs)
    moving = blob_image(shape, [(a, (c[0] + 2.0, c[1] - 1.5)) for a, c in blobs])
    net = nets.create("unet", ndim=2, features=(8, 16, 16), decoder_features=(16, 16, 8))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def mse() -> torch.Tensor:
        return F.mse_loss(warp_voxel(moving, net(fixed, moving).displacement), fixed)

    with torch.no_grad():
        before = float(mse())
    for _ in range(60):
        opt.zero_grad()
        loss = mse()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(mse())
        disp = net(fixed, moving).displacement
    assert after < 0.3 * before, (before, after)
    # at the main blob the recovered displacement is the shift (x −1.5, y +2 voxels)
    torch.testing.assert_close(disp[0, :, 12, 10], torch.tensor([-1.5, 2.0]), atol=0.5, rtol=0)


# ---------------------------------------------------------------- pyramids and cascade

@pytest.mark.parametrize("ndim", [2, 3])
def test_lapirn_levels(ndim):
    torch.manual_seed(0)
    net = nets.create("lapirn", ndim=ndim, levels=3, features=(8, 8), decoder_features=(8,))
    perturb(net)
    fixed, moving = images(ndim, batch=1)
    out = net(fixed, moving)
    assert [lv.extras["scale"] for lv in out.levels] == [4, 2]
    for lv in out.levels:
        lshape = level_shape(SHAPES[ndim], lv.extras["scale"])
        assert lv.displacement.shape == (1, ndim, *lshape)
        assert lv.extras["fixed"].shape == (1, 1, *lshape)
        assert lv.extras["moving"].shape == (1, 1, *lshape)
    assert out.extras["scale"] == 1


def test_level_shape():
    assert level_shape((37, 29), 1) == (37, 29)
    assert level_shape((37, 29), 2) == (19, 15)
    assert level_shape((37, 29), 4) == (10, 8)
    assert level_shape((3, 2), 8) == (2, 2)


def test_cascade_freeze_and_levels():
    torch.manual_seed(0)
    opts = dict(stages=2, affine_features=(8, 8), features=(8, 8), decoder_features=(8, 8))
    net = nets.create("cascade", ndim=2, **opts)
    perturb(net)
    net.freeze_stages(1)
    assert net.config()["trainable_stages"] == [1, 2]
    fixed, moving = images(2)
    out = net(fixed, moving)
    loss = F.mse_loss(warp_voxel(moving, out.displacement), fixed) + out.displacement.mean()
    loss.backward()
    for n, p in net.named_parameters():
        if n.startswith("affine_stage."):
            assert not p.requires_grad and p.grad is None, n
        else:
            assert p.requires_grad and p.grad is not None and (p.grad != 0).any(), n
    # levels: the affine stage's displacement, then the cumulative field after stage 1
    assert [lv.extras["stage"] for lv in out.levels] == [0, 1]
    torch.testing.assert_close(out.levels[0].displacement,
                               affine_to_displacement(out.affine, SHAPES[2]))
    # freezing survives a rebuild from config
    rebuilt = nets.create(**net.config())
    assert not any(p.requires_grad for p in rebuilt.affine_stage.parameters())
    assert all(p.requires_grad for p in rebuilt.deformable.parameters())
    net.freeze_stages(0)
    assert net.config()["trainable_stages"] is None
    assert all(p.requires_grad for p in net.parameters())
    with pytest.raises(InputError):
        net.freeze_stages(4)


def test_local_correlation_finds_a_known_shift():
    torch.manual_seed(0)
    for shape, shift in [((21, 19), (2, -1)), ((11, 12, 13), (-1, 1, 2))]:
        d = len(shape)
        r = 2
        fixed = torch.randn(1, 64, *shape)
        # moving(p + shift) = fixed(p)
        moving = torch.roll(fixed, shifts=shift, dims=tuple(range(2, 2 + d)))
        corr = local_correlation(fixed, moving, r)
        assert corr.shape == (1, (2 * r + 1) ** d, *shape)
        best = corr[(0, slice(None)) + tuple(slice(r, n - r) for n in shape)].argmax(dim=0)
        offsets = list(itertools.product(range(-r, r + 1), repeat=d))
        assert (best == offsets.index(tuple(shift))).all()
        # the value at the true offset is the channel mean of fixed²
        centre = (0, offsets.index(tuple(shift))) + tuple(slice(r, n - r) for n in shape)
        inner = (0, slice(None)) + tuple(slice(r, n - r) for n in shape)
        torch.testing.assert_close(corr[centre], (fixed[inner] ** 2).mean(0))


def _naive_correlation(fixed: torch.Tensor, moving: torch.Tensor, r: int) -> torch.Tensor:
    """Reference cost volume by plain autograd ops (``torch.roll`` + zero mask)."""
    d = fixed.dim() - 2
    shape = fixed.shape[2:]
    out = []
    for off in itertools.product(range(-r, r + 1), repeat=d):
        shifted = torch.roll(moving, shifts=[-o for o in off], dims=tuple(range(2, 2 + d)))
        axes = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
        inside = torch.ones(shape, dtype=torch.bool)
        for a, o, n in zip(axes, off, shape):
            inside &= (a + o >= 0) & (a + o < n)
        out.append((fixed * shifted).mean(1) * inside)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("shape,r", [((6, 7), 2), ((3, 4, 5), 1)])
def test_local_correlation_values_and_gradients(shape, r):
    torch.manual_seed(0)
    fixed = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    moving = torch.randn(2, 3, *shape, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(local_correlation(fixed, moving, r),
                               _naive_correlation(fixed, moving, r))
    assert torch.autograd.gradcheck(lambda a, b: local_correlation(a, b, r), (fixed, moving),
                                    fast_mode=True)
    with pytest.raises(InputError):
        local_correlation(fixed, moving[..., :-1], r)


def test_pyramid_corr_levels_and_default_radius():
    assert nets.create("pyramid_corr", ndim=2).search_radius == 3
    assert nets.create("pyramid_corr", ndim=3).search_radius == 2
    assert nets.create("pyramid_corr", ndim=3).finest_level == 1
    torch.manual_seed(0)
    net = nets.create("pyramid_corr", ndim=2, features=(8, 8, 8), decoder_features=(8,))
    perturb(net)
    out = net(*images(2, batch=1))
    assert [lv.extras["scale"] for lv in out.levels] == [4, 2]
    for lv in out.levels:
        assert lv.displacement.shape == (1, 2, *level_shape(SHAPES[2], lv.extras["scale"]))
    # stopping at half resolution: the finest estimate is resized up
    net = nets.create("pyramid_corr", ndim=3, features=(8, 8, 8), decoder_features=(8,),
                      finest_level=1)
    perturb(net)
    out = net(*images(3, batch=1))
    assert [lv.extras["scale"] for lv in out.levels] == [4, 2]
    torch.testing.assert_close(out.displacement,
                               resize_field(out.levels[-1].displacement, SHAPES[3]))
    with pytest.raises(InputError, match="finest_level"):
        nets.create("pyramid_corr", ndim=2, features=(8, 8), finest_level=2)
