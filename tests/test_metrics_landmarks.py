"""TRE: the mapping direction, statistics, transforms of every kind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medreg.core import Grid, InputError
from medreg.metrics import field_transform, tre


def _landmarks(n=12, seed=0, ndim=3):
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(-20, 20, size=(n, ndim)))


@pytest.mark.parametrize("ndim", [2, 3])
def test_tre_direction_with_known_translation(ndim, oblique_grid3d, oblique_grid2d):
    grid = oblique_grid3d if ndim == 3 else oblique_grid2d
    t = torch.tensor([3.0, -4.0, 12.0][:ndim], dtype=torch.float64)
    fixed = torch.tensor(grid.center(), dtype=torch.float64) + _landmarks(ndim=ndim) / 4
    moving = fixed + t  # the anatomy sits at +t in the moving image
    # the registration result: T(x) = x + t maps fixed to moving; as a dense field on a grid
    u = t.view(1, ndim, *([1] * ndim)).expand(1, ndim, *grid.shape).clone()
    T = field_transform(u, grid)
    right = tre(fixed, moving, T, grid=grid)
    assert right.mean == pytest.approx(0.0, abs=1e-9) and right.max == pytest.approx(0, abs=1e-9)
    assert right.initial["mean"] == pytest.approx(float(t.norm()))
    assert right.outside_grid == 0
    # the wrong direction (moving landmarks through T, or fixed through T^-1): twice the shift
    wrong = tre(moving, fixed, T)
    assert wrong.mean == pytest.approx(2 * float(t.norm()))
    inverse = field_transform(-u, grid)
    assert tre(fixed, moving, inverse).mean == pytest.approx(2 * float(t.norm()))


def test_tre_statistics_and_json():
    f = torch.zeros(4, 3, dtype=torch.float64)
    m = torch.tensor([[0, 0, 1.0], [0, 2.0, 0], [3.0, 0, 0], [0, 0, 4.0]])
    r = tre(f, m)  # identity
    assert r.per_landmark == [1.0, 2.0, 3.0, 4.0]
    assert (r.mean, r.median, r.max, r.min) == (2.5, 2.5, 4.0, 1.0)
    assert r.std == pytest.approx(np.std([1, 2, 3, 4]))
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["n"] == 4 and d["outside_grid"] is None


def test_tre_accepts_modules_of_another_dtype():
    from medreg.transforms import TranslationTransform

    T = TranslationTransform(3, translation=[1.0, 2.0, 2.0], trainable=False)  # float32
    f = _landmarks(5)
    r = tre(f, f + torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64), T)
    assert r.mean == pytest.approx(0.0, abs=1e-5)


def test_tre_counts_landmarks_outside_the_grid():
    grid = Grid((10, 10, 10))
    pts = torch.tensor([[1.0, 1, 1], [50.0, 1, 1]], dtype=torch.float64)
    assert tre(pts, pts, grid=grid).outside_grid == 1


def test_tre_errors():
    a = _landmarks(5)
    with pytest.raises(InputError, match="A.csv.*B.csv"):
        tre(a, _landmarks(6), names=("A.csv", "B.csv"))
    bad = a.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        tre(a, bad)
    with pytest.raises(InputError, match="no landmarks"):
        tre(torch.zeros(0, 3), torch.zeros(0, 3))
