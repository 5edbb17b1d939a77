"""Engine parts: pyramid, progress reporting, presets, initialisation, the Python API."""

import io

import numpy as np
import pytest
import torch

from medreg.api import resolve_config
from medreg.core import Grid, Image, InputError
from medreg.engine.initialise import centre_of_mass, initial_transform, principal_axes
from medreg.engine.presets import list_presets, load_preset, preset_text
from medreg.engine.progress import Progress
from medreg.engine.pyramid import pyramid_level, resample_field
from medreg.transforms import RigidTransform, warp_image


def test_pyramid_level_keeps_world_box_and_mean():
    g = Grid((40, 30, 20), (1.0, 1.5, 2.0), (5.0, -3.0, 1.0))
    img = Image(torch.rand(*g.shape) + 1.0, g)
    coarse = pyramid_level(img, 2)
    assert coarse.grid.size == (20, 15, 10)
    assert np.allclose(coarse.grid.center(), g.center())
    assert abs(float(coarse.data.mean()) - float(img.data.mean())) < 0.02
    assert torch.equal(pyramid_level(img, 1, 0.0).data, img.data.float())


def test_resample_field_preserves_constant_vectors():
    a = Grid((10, 8), (2.0, 2.0))
    b = Grid((20, 16), (1.0, 1.0), (-0.5, -0.5))
    f = torch.zeros(1, 2, *a.shape)
    f[:, 0], f[:, 1] = 1.5, -2.0
    out = resample_field(f, a, b)
    assert out.shape == (1, 2, *b.shape) and torch.allclose(out[:, 0], torch.full_like(out[:, 0], 1.5))


def test_progress_prints_one_line_per_level_without_terminal_and_nothing_when_quiet():
    buf = io.StringIO()
    p = Progress(stream=buf)
    p.start(0, 2, "affine", 0, 2, 4, 10)
    for i in range(3):
        p.update(i + 1, -0.5)
    p.end(-0.5)
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 1 and "stage 1/2" in lines[0] and "level 1/2" in lines[0] and "3 iterations" in lines[0]
    quiet = io.StringIO()
    q = Progress(quiet=True, stream=quiet)
    q.start(0, 1, "svf", 0, 1, 2, 5)
    q.end(0.0)
    assert quiet.getvalue() == ""


def test_presets_are_listed_and_parse():
    names = list_presets()
    assert {"rigid", "affine", "fast", "accurate", "multimodal", "lung"} <= set(names)
    assert "stages:" in preset_text("fast")
    assert resolve_config("rigid").stages[0].type == "rigid"
    with pytest.raises(InputError, match="unknown preset"):
        load_preset("nope")


def test_moments_initialisation_recovers_rotation():
    g = Grid((64, 48), (1.0, 1.0))
    y, x = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    blob = torch.exp(-(((x - 32) / 14) ** 2 + ((y - 24) / 5) ** 2))  # elongated: clear principal axes
    fixed = Image(blob, g)
    truth = RigidTransform(2, rotation=[0.4], center=list(g.center()), trainable=False, dtype=torch.float64)
    moving = warp_image(fixed, truth.inverse(), g)
    t = initial_transform(fixed, moving, "moments")
    assert np.allclose(t.linear_matrix().numpy(), truth.linear_matrix().numpy(), atol=0.05)
    assert torch.allclose(centre_of_mass(fixed), torch.tensor([32.0, 24.0], dtype=torch.float64), atol=0.1)
    c, axes = principal_axes(fixed)
    assert abs(float(axes[0, 1])) > 0.99  # largest spread along x


# ------------------------------------------------------------------ greedy stage parts
def _oblique_grid3d() -> Grid:
    from scipy.spatial.transform import Rotation

    direction = Rotation.from_rotvec([0.3, -0.2, 0.5]).as_matrix()
    return Grid((14, 12, 10), (1.2, 0.8, 2.0), (3.0, -5.0, 7.0), direction)


def test_greedy_force_is_the_world_gradient_on_an_oblique_anisotropic_grid():
    from medreg.engine.greedy import GreedyStep

    g = _oblique_grid3d()
    a = torch.tensor([0.7, -1.3, 0.4])
    image = (g.points() @ a)[None, None]           # f(x) = a·x in world mm
    step = GreedyStep(g, lr=0.5, gradient_sigma=0.0, field_smoothing=0.0)
    f = step.force(image, -torch.ones_like(image))  # −∂loss/∂f = 1 → force = ∇f
    assert torch.allclose(f.movedim(1, -1), a.expand(*g.shape, 3), atol=1e-4)


def test_greedy_scale_sets_the_longest_step_in_voxels():
    from medreg.engine.greedy import GreedyStep

    g = _oblique_grid3d()
    step = GreedyStep(g, lr=0.4, gradient_sigma=0.0, field_smoothing=0.0)
    f = torch.randn(1, 3, *g.shape, generator=torch.Generator().manual_seed(0))
    v = step.scale(f)
    vox = g.transform_vectors(v, "world", "index", channel_dim=1)
    assert float(vox.norm(dim=1).max()) == pytest.approx(0.4, rel=1e-5)
    assert torch.equal(step.scale(torch.zeros_like(f)), torch.zeros_like(f))


def test_greedy_compose_matches_compose_displacements():
    from medreg.engine.greedy import GreedyStep
    from medreg.transforms import compose_displacements

    g = _oblique_grid3d()
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(1, 3, *g.shape, generator=gen)
    v = 0.3 * torch.randn(1, 3, *g.shape, generator=gen)
    step = GreedyStep(g, lr=0.5, gradient_sigma=0.0, field_smoothing=0.0)
    assert torch.allclose(step.compose(u, v), compose_displacements(u, v, g), atol=1e-5)


def test_greedy_stage_rejects_settings_it_would_ignore():
    from medreg.engine import config_from_dict

    base = {"type": "greedy", "levels": [2], "iterations": 5}
    for extra, match in (({"regularisation": {"diffusion": 1.0}}, "smoothing"),
                         ({"optimizer": "lbfgs"}, "optimizer"),
                         ({"lr": 0.0}, r"stage 1 \(greedy\): lr must be a number > 0"),
                         ({"field_smoothing": -1.0}, r"field_smoothing \(voxels\) must be a number >= 0")):
        with pytest.raises(InputError, match=match):
            config_from_dict({"stages": [{**base, **extra}]})


def test_det_small_equals_linalg_det_in_2d_and_3d():
    from medreg.core.functional import det_small

    gen = torch.Generator().manual_seed(4)
    for d in (2, 3):
        jac = torch.randn(2, d, d, 5, 4, 3, dtype=torch.float64, generator=gen)
        ref = torch.linalg.det(jac.movedim(1, -1).movedim(1, -1))
        assert torch.allclose(det_small(jac), ref, rtol=1e-12, atol=1e-12)


def test_greedy_volume_step_descends_the_log_jacobian_penalty():
    """The step is gradient descent on ½Σ(log det J)²: the penalty falls for a small step, the
    gradient is autograd's (gradcheck), identity and translations are fixed points, 0 disables."""
    from medreg.core.functional import det_small, jacobian_det, jacobian_matrix, smooth_voxels
    from medreg.engine.greedy import GreedyStep

    g = _oblique_grid3d()
    gen = torch.Generator().manual_seed(5)
    smooth_u = smooth_voxels(torch.randn(1, 3, *g.shape, generator=gen), 1.5)

    def penalty(x):
        return float(0.5 * torch.log(jacobian_det(x.double(), g)).square().sum())

    step = GreedyStep(g, lr=0.5, gradient_sigma=0.0, field_smoothing=0.0, log_jacobian=0.02)
    after = step.volume_step(smooth_u)
    assert penalty(after) < 0.97 * penalty(smooth_u)  # measured 6.63 vs 7.02
    shift = torch.tensor([1.5, -2.0, 0.5]).view(1, 3, 1, 1, 1).expand(1, 3, *g.shape)
    assert torch.allclose(step.volume_step(shift), shift, atol=1e-6)
    off = GreedyStep(g, lr=0.5, gradient_sigma=0.0, field_smoothing=0.0)
    assert off.volume_step(smooth_u) is smooth_u
    # the step equals −lr·h²·∂penalty/∂u with the derivative checked against finite differences
    small = Grid((5, 4, 3), (1.0, 1.3, 0.8))
    x = (0.05 * torch.randn(1, 3, 3, 4, 5, generator=gen, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda y: 0.5 * torch.log(det_small(jacobian_matrix(y, small))).square().sum(), (x,))
    # axis-aligned (a per-axis step) and oblique (a full matrix) grids take different paths
    tilted = Grid((5, 4, 3), (1.0, 1.3, 0.8), direction=_oblique_grid3d().direction)
    for grid in (small, tilted):
        step = GreedyStep(grid, lr=0.5, gradient_sigma=0.0, field_smoothing=0.0, log_jacobian=0.1,
                          dtype=torch.float64)
        (grad,) = torch.autograd.grad(0.5 * torch.log(det_small(jacobian_matrix(x, grid))).square().sum(), x)
        assert torch.allclose(step.volume_step(x.detach()), x.detach() - 0.1 * 0.8 ** 2 * grad, atol=1e-12)


def test_greedy_volume_step_is_capped_and_pulls_folds_back():
    """The step is scaled down as a whole so that no point moves more than lr voxels (uncapped,
    explicit steps fed on themselves and blew up to hundreds of voxels on a 10×11×8 hippocampus
    level), keeping its direction; below det J = VOLUME_FLOOR the penalty goes on along its
    tangent, so a folded voxel is pulled back (with no pull there, it stayed folded)."""
    from medreg.core.functional import jacobian_det
    from medreg.engine.greedy import VOLUME_FLOOR, GreedyStep

    g = Grid((9, 8, 7), (1.0, 1.3, 0.8))
    p = g.points("world", dtype=torch.float64)  # (*shape, 3)
    c = p - p.reshape(-1, 3).mean(0)

    def squeeze(a):  # compress towards the centre: collapses near a = 1.2, folds beyond
        return (-a * c * torch.exp(-c.square().sum(-1, keepdim=True) / 8.0)).movedim(-1, 0).unsqueeze(0)

    u = squeeze(0.95)
    assert float(jacobian_det(u, g).amin()) < 0.1  # a near-collapse at the centre
    step = GreedyStep(g, lr=0.3, gradient_sigma=0.0, field_smoothing=0.0, log_jacobian=2.0,
                      dtype=torch.float64)
    moved = step.volume_step(u) - u
    vox = torch.einsum("ij,nj...->ni...", step.index_from_world, moved).square().sum(1).sqrt()
    assert float(vox.amax()) == pytest.approx(0.3, rel=1e-9)
    uncapped = GreedyStep(g, lr=1e9, gradient_sigma=0.0, field_smoothing=0.0, log_jacobian=2.0,
                          dtype=torch.float64)
    free = uncapped.volume_step(u) - u
    assert float(free.abs().amax()) > 2 * float(moved.abs().amax())  # the cap was needed
    cos = (free * moved).sum() / (free.norm() * moved.norm())
    assert float(cos) == pytest.approx(1.0, abs=1e-12)
    # a fold (det < 0 at the centre) is opened up by a few small steps
    folded = squeeze(2.0)
    det0 = jacobian_det(folded, g)
    assert float(det0.amin()) < 0 < VOLUME_FLOOR
    small = GreedyStep(g, lr=0.3, gradient_sigma=0.0, field_smoothing=0.0, log_jacobian=0.2,
                       dtype=torch.float64)
    x = folded
    for _ in range(30):
        x = small.volume_step(x)
    assert int((det0 <= 0).sum()) == 18 and float(jacobian_det(x, g).amin()) > 0.5  # measured 0.88


def test_greedy_log_jacobian_setting_is_checked():
    from medreg.engine import config_from_dict

    ok = config_from_dict({"stages": [{"type": "greedy", "levels": [4, 2], "log_jacobian": [0.1, 0]}]})
    assert ok.stages[0].log_jacobian == [0.1, 0.0]
    assert config_from_dict({"stages": [{"type": "greedy", "levels": [4, 2],
                                         "log_jacobian": 0.05}]}).stages[0].log_jacobian == [0.05, 0.05]
    for bad in ([0.1], [-0.1, 0], "x", [float("nan"), 0]):
        with pytest.raises(InputError, match="log_jacobian"):
            config_from_dict({"stages": [{"type": "greedy", "levels": [4, 2], "log_jacobian": bad}]})
    with pytest.raises(InputError, match="greedy"):
        config_from_dict({"stages": [{"type": "svf", "levels": [2], "log_jacobian": 0.1}]})


def test_greedy_force_sums_over_channels():
    from medreg.engine.greedy import GreedyStep

    g = Grid((12, 10), (1.5, 0.7))
    gen = torch.Generator().manual_seed(2)
    image, dloss = torch.rand(1, 2, *g.shape, generator=gen), torch.randn(1, 2, *g.shape, generator=gen)
    step = GreedyStep(g, lr=0.5, gradient_sigma=0.0, field_smoothing=0.0)
    both = step.force(image, dloss)
    apart = step.force(image[:, :1], dloss[:, :1]) + step.force(image[:, 1:], dloss[:, 1:])
    assert torch.allclose(both, apart, atol=1e-6)
    # one channel takes a path without stacked copies: bit-identical to the general formula
    from medreg.core.functional import matvec_field, smooth_voxels
    from medreg.engine.greedy import index_gradient

    step = GreedyStep(g, lr=0.5, gradient_sigma=1.0, field_smoothing=0.0)
    general = -(dloss[:, :1].unsqueeze(2) * index_gradient(image[:, :1])).sum(1)
    general = smooth_voxels(matvec_field(step.grad_to_world, general, step.aligned), 1.0)
    assert torch.equal(step.force(image[:, :1], dloss[:, :1]), general)
    g3 = Grid((7, 6, 5), (1.2, 0.9, 2.0))
    im3, dl3 = torch.rand(1, 1, *g3.shape, generator=gen), torch.randn(1, 1, *g3.shape, generator=gen)
    step3 = GreedyStep(g3, lr=0.5, gradient_sigma=1.0, field_smoothing=0.0)
    general = -(dl3.unsqueeze(2) * index_gradient(im3)).sum(1)
    general = smooth_voxels(matvec_field(step3.grad_to_world, general, step3.aligned), 1.0)
    assert torch.equal(step3.force(im3, dl3), general)
    # with autograd both paths still differentiate (no in-place or out= writes on tracked values)
    im3.requires_grad_(True)
    step3.force(im3, dl3).sum().backward()
    assert im3.grad is not None and bool(torch.isfinite(im3.grad).all())
    u = (0.3 * torch.rand(1, 3, *g3.shape, generator=gen)).requires_grad_(True)
    step3._volume_gradient(u).square().sum().backward()
    assert u.grad is not None and bool(torch.isfinite(u.grad).all())


def test_engine_adam_equals_torch_adam_step_for_step():
    """medreg's Adam (kept to avoid torch.optim's first-import cost) is torch.optim.Adam's update."""
    from medreg.engine.adam import Adam

    torch.manual_seed(0)
    target = torch.randn(3, 4, dtype=torch.float64)
    a = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    ours, ref = Adam([a], lr=0.05), torch.optim.Adam([b], lr=0.05)
    for _ in range(25):
        for p, opt in ((a, ours), (b, ref)):
            def closure(p=p, opt=opt):
                opt.zero_grad(set_to_none=True)
                loss = ((p - target) ** 4).sum() + (p * target).sin().sum()
                loss.backward()
                return loss
            opt.step(closure)
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-14)
    assert not torch.equal(a.detach(), torch.zeros(3, 4, dtype=torch.float64))


def test_symmetric_displacement_is_b_after_the_inverse_of_a():
    """``symmetric_displacement(a, b)`` is the displacement of ``(id + b) ∘ (id + a)⁻¹``: with
    a = 0 it is b; with b = 0 it inverts a (a spatially varying field, so the order matters)."""
    from medreg.engine.greedy import symmetric_displacement
    from medreg.transforms.functional import compose_displacements

    g = Grid((40, 36), (1.5, 2.0), (3.0, -7.0))
    x = g.points(dtype=torch.float64)
    c = torch.tensor(g.center(), dtype=torch.float64)
    bump = torch.exp(-(x - c).square().sum(-1) / (2 * 12.0 ** 2))
    s = torch.stack([3.0 * bump, -2.0 * bump])[None]
    zero = torch.zeros_like(s)
    assert torch.allclose(symmetric_displacement(zero, s, g), s, atol=1e-6)
    inv = symmetric_displacement(s, zero, g)
    round_trip = compose_displacements(s, inv, g)          # (id + s) ∘ (id + s)⁻¹ = id
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4))
    assert float(round_trip[inner].abs().max()) < 1e-3
    assert float((inv + s)[inner].abs().max()) > 0.05    # not simply −s: a real inverse


def test_centre_of_mass_and_points_on_an_oblique_anisotropic_grid(oblique_grid3d):
    """The centre of mass from marginal sums equals the weighted mean of the world points, and
    ``Grid.points`` equals the index mesh mapped by the grid's matrix (to float64 rounding)."""
    g = oblique_grid3d
    data = torch.rand(g.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    zyx = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in g.shape], indexing="ij")
    index = torch.stack(list(reversed(zyx)), dim=-1)
    world = g.transform_points(index, "index", "world")
    torch.testing.assert_close(g.points("world", dtype=torch.float64), world, rtol=0, atol=1e-12)
    assert torch.equal(g.points("index", dtype=torch.float64), index)
    w = data - data.min()
    expected = (world * w[..., None]).sum((0, 1, 2)) / w.sum()
    torch.testing.assert_close(centre_of_mass(Image(data, g)), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(9, 14, 11), (20, 16)])
def test_separable_filter_in_slabs_is_bit_identical(shape, monkeypatch):
    """Large tensors are filtered slab by slab (cache blocking): the same numbers as one pass,
    for symmetric and asymmetric kernels, both paddings, 2D and 3D; autograd keeps one pass."""
    import medreg.core.functional as CF

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, *shape, generator=gen)
    kernels = [CF.gaussian_weights(1.7), None, [0.1, 0.5, 0.3]][: len(shape)]
    if len(shape) == 2:
        kernels = [CF.gaussian_weights(1.2), [0.2, 0.7, 0.1]]
    for padding in ("replicate", "constant"):
        whole = CF.separable_filter(x, kernels, padding)
        monkeypatch.setattr(CF, "FILTER_SLAB_BYTES", 64)  # slabs of one row/plane
        slabs = CF.separable_filter(x, kernels, padding)
        monkeypatch.setattr(CF, "FILTER_SLAB_BYTES", 2 * 2 ** 20)
        assert torch.equal(slabs, whole)
    # with autograd the pass is not split (gradient still flows)
    monkeypatch.setattr(CF, "FILTER_SLAB_BYTES", 64)
    xg = x.clone().requires_grad_(True)
    CF.separable_filter(xg, kernels).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("oblique", [False, True])
def test_greedy_volume_step_in_slabs_is_bit_identical(oblique, monkeypatch):
    """The volume step's gradient computed slab by slab (halo rows) equals the one-pass result
    exactly, folds included, on an axis-aligned and an oblique anisotropic grid."""
    import math

    import medreg.engine.greedy as G
    from medreg.core.functional import gaussian_smooth

    c, s = math.cos(0.3), math.sin(0.3)
    direction = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]] if oblique else None
    g = Grid((12, 10, 23), (1.0, 1.5, 2.0), (3.0, -2.0, 1.0), direction)
    gen = torch.Generator().manual_seed(5)
    u = gaussian_smooth(torch.randn(1, 3, *g.shape, generator=gen), 1.0, [1.0] * 3) * 4.0
    step = G.GreedyStep(g, 0.25, 1.0, 0.0, log_jacobian=0.2)
    whole = step._volume_gradient_whole(u)
    monkeypatch.setattr(G, "VOLUME_SLAB_BYTES", 1)  # slabs of 8 rows, 23 rows: 3 slabs
    slabs = step._volume_gradient(u)
    assert torch.equal(slabs, whole)
    assert float(whole.abs().max()) > 0
    # the field folds somewhere, so the floored branch is exercised too
    from medreg.core.functional import jacobian_det
    assert bool((jacobian_det(u, g) < G.VOLUME_FLOOR).any())
