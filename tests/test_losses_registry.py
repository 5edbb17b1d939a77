"""The loss registry, module wrappers and weighted sums from a config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import medreg.losses as ml
from medreg.core import Grid
from medreg.losses import functional as L

D64 = torch.float64
SHAPE = (2, 1, 9, 10, 11)


def _inputs():
    g = torch.Generator().manual_seed(0)
    fixed = torch.rand(SHAPE, generator=g, dtype=D64)
    warped = (0.5 * fixed + torch.rand(SHAPE, generator=g, dtype=D64)).requires_grad_()
    disp = (0.3 * torch.randn(2, 3, *SHAPE[2:], generator=g, dtype=D64)).requires_grad_()
    labels = torch.randint(0, 3, SHAPE, generator=g)
    onehot = L.one_hot(labels, 3, dtype=D64)
    warped_onehot = torch.softmax(onehot * 3 + torch.rand(onehot.shape, generator=g, dtype=D64), 1)
    points = torch.rand(5, 3, generator=g, dtype=D64) * 10
    return dict(fixed=fixed, warped=warped, disp=disp, onehot=onehot,
                warped_onehot=warped_onehot.requires_grad_(), points=points.requires_grad_())


def _evaluate(module: nn.Module, x: dict, grid: Grid) -> torch.Tensor:
    kind = module.kind
    if kind == "similarity":
        return module(x["fixed"], x["warped"], spacing=grid)
    if kind == "regulariser":
        return module(x["disp"], grid)
    if kind == "labels":
        return module(x["onehot"], x["warped_onehot"])
    if kind == "points":
        return module(x["points"], x["points"].detach() + 1.0)
    return module(x["disp"], torch.zeros_like(x["disp"]))


REQUIRED = ["ssd", "ncc", "lncc", "mi", "nmi", "mind", "ngf", "diffusion", "bending", "elastic",
            "tv", "jacobian", "dice", "tre", "epe"]


def test_required_names_are_registered():
    assert set(REQUIRED) <= set(ml.available())
    assert ml.available() == sorted(ml.LOSSES)


@pytest.mark.parametrize("name", ml.available())
def test_each_registry_name_is_created_and_evaluated(name):
    module = ml.create(name)
    assert isinstance(module, nn.Module)
    x = _inputs()
    grid = Grid.from_shape(SHAPE[2:], spacing=(1.0, 1.5, 2.0))
    value = _evaluate(module, x, grid)
    assert value.shape == () and value.dtype == D64 and torch.isfinite(value)
    leaves = [t for t in x.values() if t.requires_grad]
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    assert any(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert repr(module)


def test_unknown_names_and_bad_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="unknown loss 'lnc'; choose one of: .*lncc"):
        ml.create("lnc")
    with pytest.raises(ValueError, match="no parameter.*'windows'.*valid parameters: window"):
        ml.create("lncc", windows=9)
    with pytest.raises(ValueError, match="box, gaussian"):
        ml.create("lncc", kernel="triangle")
    with pytest.raises(ValueError, match="voxel, mm"):
        ml.create("lncc", window_unit="cm")
    with pytest.raises(ValueError, match="odd"):
        ml.create("lncc", window=8)
    with pytest.raises(ValueError, match="bins"):
        ml.create("mi", bins=3)
    with pytest.raises(ValueError, match="bspline, gaussian"):
        ml.create("nmi", parzen="box")
    with pytest.raises(ValueError, match="hinge, log2"):
        ml.create("jacobian", mode="log")
    with pytest.raises(ValueError, match="isotropic, l1"):
        ml.create("tv", mode="l2")
    with pytest.raises(ValueError, match="mu"):
        ml.create("elastic", mu=-1)
    with pytest.raises(ValueError, match="eps"):
        ml.create("ngf", eps=0)
    with pytest.raises(ValueError, match="mean, sum, none"):
        ml.create("ssd", reduction="avg")
    assert isinstance(ml.create("LNCC", window=5), ml.LNCC)
    assert isinstance(ml.create("mse"), ml.SSD)


def test_similarity_modules_combine_masks_and_spacing():
    x = _inputs()
    f, w = x["fixed"], x["warped"].detach()
    fm = (torch.rand(SHAPE, dtype=D64) > 0.3).to(D64)
    mm = (torch.rand(SHAPE, dtype=D64) > 0.3)
    lncc = ml.LNCC(window=3)
    assert lncc(f, w, fm, mm).item() == pytest.approx(L.lncc(f, w, fm * mm, window=3).item(), rel=1e-12)
    assert lncc(f, w, fm).item() == pytest.approx(L.lncc(f, w, fm, window=3).item(), rel=1e-12)
    # spacing: given at call time or at construction (the call wins)
    mm_lncc = ml.LNCC(window=3.0, window_unit="mm", spacing=(1.0, 1.0, 3.0))
    assert mm_lncc(f, w).item() == pytest.approx(L.lncc(f, w, window=(3, 3, 1)).item(), rel=1e-12)
    assert mm_lncc(f, w, spacing=(1.0, 1.0, 1.0)).item() == pytest.approx(L.lncc(f, w, window=3).item(), rel=1e-12)
    grid = Grid.from_shape(SHAPE[2:], spacing=(1.0, 1.0, 3.0))
    assert mm_lncc(f, w, spacing=grid).item() == pytest.approx(L.lncc(f, w, window=(3, 3, 1)).item(), rel=1e-12)
    with pytest.raises(ValueError, match="spacing"):
        ml.MIND(unit="mm")(f, w)
    assert ml.MIND(radius=2.0, dilation=2.0, unit="mm")(f, w, spacing=(1.0, 1.0, 1.0)).item() == pytest.approx(
        ml.MIND()(f, w).item(), rel=1e-12)
    assert ml.NMI()(f, w).item() == pytest.approx(L.mutual_information(f, w, normalised=True).item())


class _FakeTransform(nn.Module):
    """Duck-typed transform with a learnable translation."""

    def __init__(self):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=D64))
        self.calls = 0

    def displacement(self, grid):
        self.calls += 1
        pts = grid.points(dtype=D64)
        return (0.01 * pts ** 2 + self.shift).movedim(-1, 0).unsqueeze(0)


def test_weighted_sum_from_config():
    x = _inputs()
    grid = Grid.from_shape(SHAPE[2:], spacing=(1.0, 1.5, 2.0))
    config = {
        "lncc": {"weight": 1.0, "window": 5},
        "fine": {"name": "lncc", "weight": 0.5, "window": 3},
        "diffusion": {"weight": 0.1},
        "bending": {"weight": 2.0},
        "dice": {"weight": 0.3, "labels": [1, 2]},
        "tre": None,
    }
    losses = ml.from_config(config)
    out = losses(fixed=x["fixed"], warped=x["warped"], displacement=x["disp"], grid=grid,
                 fixed_labels=x["onehot"], warped_labels=x["warped_onehot"],
                 points=x["points"], target_points=x["points"].detach() + 1)
    assert isinstance(out, ml.LossValue)
    assert set(out.terms) == set(config) and out.weights["tre"] == 1.0
    expected = (L.lncc(x["fixed"], x["warped"], window=5) + 0.5 * L.lncc(x["fixed"], x["warped"], window=3)
                + 0.1 * L.diffusion(x["disp"], grid) + 2.0 * L.bending(x["disp"], grid)
                + 0.3 * L.soft_dice(x["onehot"], x["warped_onehot"], [1, 2])
                + L.tre(x["points"], x["points"].detach() + 1))
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-12)
    out.total.backward()
    assert x["warped"].grad is not None and x["disp"].grad is not None
    # a transform is sampled once and shared by all regularisers
    t = _FakeTransform()
    reg = ml.WeightedSum.from_config({"diffusion": {"weight": 1}, "elastic": {"weight": 1},
                                      "jacobian": {"mode": "log2"}})
    out = reg(displacement=t, grid=grid)
    assert t.calls == 1
    out.total.backward()
    assert t.shift.grad is not None


def test_weighted_sum_errors():
    with pytest.raises(ValueError, match="non-empty mapping"):
        ml.from_config({})
    with pytest.raises(ValueError, match="non-empty mapping"):
        ml.from_config([{"name": "lncc"}])
    with pytest.raises(ValueError, match="loss term 'a': unknown loss 'foo'"):
        ml.from_config({"a": {"name": "foo"}})
    with pytest.raises(ValueError, match="loss term 'lncc': .*no parameter"):
        ml.from_config({"lncc": {"weight": 1, "size": 3}})
    with pytest.raises(ValueError, match="weight of loss term 'ssd'"):
        ml.from_config({"ssd": {"weight": "heavy"}})
    with pytest.raises(ValueError, match="must be a mapping"):
        ml.from_config({"ssd": 3})
    losses = ml.from_config({"ssd": {}, "bending": {"weight": 0.1}})
    x = _inputs()
    with pytest.raises(ValueError, match="'bending' .* needs displacement"):
        losses(fixed=x["fixed"], warped=x["warped"])
    with pytest.raises(ValueError, match="no known kind"):
        ml.WeightedSum({"x": (1.0, nn.Linear(2, 2))})
