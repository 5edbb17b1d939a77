"""Displacement regularity: analytic fields, Learn2Reg's SDlogJ recipe and LUMIR's NDV."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from medreg.core import Grid, InputError
from medreg.core.functional import jacobian_det
from medreg.metrics import (displacement_metrics, folding, jacobian_determinant,
                            non_diffeomorphic_volume, sdlogj, sdlogj_l2r)
from medreg.metrics import jacobian as J


def _world_from_voxel_field(v: np.ndarray, grid: Grid) -> torch.Tensor:
    """Learn2Reg layout ``(X, Y, Z, D)`` voxel displacement → ``(1, D, z, y, x)`` world mm."""
    d = grid.ndim
    a = torch.as_tensor(grid.direction * np.asarray(grid.spacing)[None, :])  # world_from_index
    t = torch.as_tensor(v).permute(*reversed(range(d)), d)  # (z, y, x, D) index units
    return (t @ a.T).movedim(-1, 0)[None]


def _smooth_voxel_field(shape_xyz, amplitude, seed, sigma=2.0):
    rng = np.random.default_rng(seed)
    return np.stack([ndimage.gaussian_filter(rng.standard_normal(shape_xyz), sigma) * amplitude
                     for _ in shape_xyz], axis=-1)


# ------------------------------------------------------------------------------- analytic
def test_identity_field(oblique_grid3d):
    m = displacement_metrics(torch.zeros(1, 3, *oblique_grid3d.shape), oblique_grid3d)
    assert m["sdlogj"] == 0.0 and m["sdlogj_l2r"] == 0.0
    assert m["folding_count"] == 0 and m["folding_percent"] == 0.0
    assert m["ndv_percent"] == 0.0 and m["ndv_mm3"] == 0.0
    assert m["det_j_min"] == m["det_j_max"] == 1.0
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize("fixture", ["oblique_grid3d", "oblique_grid2d"])
def test_uniform_scaling_det_is_scale_product(fixture, request):
    grid = request.getfixturevalue(fixture)
    s = torch.tensor([1.2, 0.7, 1.1][: grid.ndim], dtype=torch.float64)
    pts = grid.points("world", dtype=torch.float64)
    c = torch.tensor(grid.center(), dtype=torch.float64)
    u = ((pts - c) * (s - 1)).movedim(-1, 0)[None]  # x ↦ c + S (x − c), world axes
    det = jacobian_determinant(u, grid)
    assert torch.allclose(det, torch.full_like(det, float(s.prod())), atol=1e-10)
    m = displacement_metrics(u, grid)
    assert m["sdlogj"] == pytest.approx(0.0, abs=1e-12)
    assert m["folding_count"] == 0 and m["ndv_percent"] == 0.0
    assert m["det_j_mean"] == pytest.approx(float(s.prod()))


def test_known_fold_counted_exactly(oblique_grid3d):
    grid = oblique_grid3d
    nz, ny, nx = grid.shape
    x0 = 7
    # displacement along index axis x: -3 voxels on the column x0+1 only. Central differences:
    # det = 1 + (u[x+1] - u[x-1]) / 2 = -0.5 at x0, 2.5 at x0+2, 1 elsewhere.
    amp = torch.zeros(grid.shape, dtype=torch.float64)
    amp[:, :, x0 + 1] = -3.0 * grid.spacing[0]
    axis_x = torch.tensor(np.array(grid.direction[:, 0]))
    u = (amp[..., None] * axis_x).movedim(-1, 0)[None]
    det = jacobian_determinant(u, grid)
    assert torch.allclose(det[:, :, x0], torch.full((nz, ny), -0.5, dtype=torch.float64))
    assert torch.allclose(det[:, :, x0 + 2], torch.full((nz, ny), 2.5, dtype=torch.float64))
    f = folding(u, grid)
    assert f["folding_count"] == ny * nz
    assert f["folding_percent"] == pytest.approx(100.0 / nx)
    m = displacement_metrics(u, grid)
    assert m["folding_count"] == ny * nz and m["sdlogj_excluded_voxels"] == ny * nz
    assert m["ndv_percent"] > 0
    # a mask that excludes the folded column removes the folds
    mask = torch.ones(grid.shape, dtype=torch.bool)
    mask[:, :, x0] = False
    assert folding(u, grid, mask)["folding_count"] == 0


def test_chunked_determinant_matches_core(oblique_grid3d, monkeypatch):
    v = _smooth_voxel_field(oblique_grid3d.size, 3.0, 0)
    u = _world_from_voxel_field(v, oblique_grid3d)
    ref = jacobian_det(u, oblique_grid3d)[0]
    monkeypatch.setattr(J, "CHUNK_VOXELS", 100)  # a few rows per slab
    assert torch.allclose(jacobian_determinant(u, oblique_grid3d), ref, atol=1e-12)
    full = non_diffeomorphic_volume(u, oblique_grid3d)
    monkeypatch.setattr(J, "CHUNK_VOXELS", 1 << 30)
    assert non_diffeomorphic_volume(u, oblique_grid3d) == pytest.approx(full)


# ------------------------------------------------------------------------------- Learn2Reg
def _l2r_sdlogj_reference(v: np.ndarray) -> float:
    """Learn2Reg's LogJacDetStd recipe written out on a voxel field ``(X, Y, Z, 3)``."""
    jac = np.empty(v.shape[:3] + (3, 3))
    for c in range(3):
        for a in range(3):
            jac[..., c, a] = np.gradient(v[..., c], axis=a) + (c == a)
    det = np.linalg.det(jac)[2:-2, 2:-2, 2:-2]
    return float(np.log(np.clip(det + 3, 1e-9, 1e9)).std())


def test_sdlogj_l2r_matches_learn2reg_recipe(oblique_grid3d):
    # the recipe works on voxel units; det J is frame-independent so an oblique, anisotropic
    # grid must give the same number
    v = _smooth_voxel_field(oblique_grid3d.size, 4.0, 3)
    u = _world_from_voxel_field(v, oblique_grid3d)
    ref = _l2r_sdlogj_reference(v)
    assert sdlogj_l2r(u, oblique_grid3d) == pytest.approx(ref, rel=1e-9)
    # the textbook value differs (no +3, whole field)
    assert sdlogj(u, oblique_grid3d) > ref


def test_masked_sdlogj_l2r(oblique_grid3d):
    v = _smooth_voxel_field(oblique_grid3d.size, 2.0, 4)
    u = _world_from_voxel_field(v, oblique_grid3d)
    mask = np.zeros(oblique_grid3d.shape, bool)
    mask[3:10, 5:20, 4:15] = True
    det = jacobian_det(u, oblique_grid3d)[0].numpy()
    vals = np.log(np.clip(det + 3, 1e-9, 1e9))[2:-2, 2:-2, 2:-2][mask[2:-2, 2:-2, 2:-2]]
    assert sdlogj_l2r(u, oblique_grid3d, torch.from_numpy(mask)) == pytest.approx(vals.std())


# ------------------------------------------------------------------------------- NDV (LUMIR)
def _tet_volume(vertices: list[np.ndarray], ref: list[np.ndarray]) -> float:
    """Signed volume (orientation of ``ref`` positive) of a tetrahedron / triangle."""
    e = np.stack([v - vertices[0] for v in vertices[1:]], axis=1)
    e0 = np.stack([v - ref[0] for v in ref[1:]], axis=1)
    fact = 6.0 if len(vertices) == 4 else 2.0
    return float(np.linalg.det(e) * np.sign(np.linalg.det(e0)) / fact)


def _ndv_brute_force(v: np.ndarray) -> float:
    """Non-diffeomorphic volume % from explicit tetrahedra on a voxel field ``(X, Y[, Z], D)``."""
    d = v.shape[-1]
    shape = v.shape[:-1]
    phi = v + np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    if d == 3:
        shapes = [[(0, 0, 0), (sx, 0, 0), (0, sy, 0), (0, 0, sz)]
                  for sx, sy, sz in itertools.product((1, -1), repeat=3)]
        shapes += [[(0, 0, 0), (-1, -1, 0), (-1, 0, -1), (0, -1, -1)],
                    [(0, 0, 0), (1, 1, 0), (0, 1, 1), (1, 0, 1)]]
    else:
        shapes = [[(0, 0), (sx, 0), (0, sy)] for sx, sy in itertools.product((1, -1), repeat=2)]
    total, count = 0.0, 0
    for p in itertools.product(*[range(1, n - 1) for n in shape]):
        count += 1
        for offs in shapes:
            verts = [phi[tuple(np.add(p, o))] for o in offs]
            ref = [np.asarray(o, float) for o in offs]
            total += max(-_tet_volume(verts, ref), 0.0) / 2.0
    return 100.0 * total / count


@pytest.mark.parametrize("ndim", [2, 3])
def test_ndv_matches_explicit_tetrahedra(ndim):
    shape_xyz = (7, 6, 5)[:ndim]
    grid = Grid(shape_xyz, (1.0, 1.4, 0.8)[:ndim])
    v = _smooth_voxel_field(shape_xyz, 6.0, 11, sigma=0.8)  # rough: many folds
    u = _world_from_voxel_field(v, grid)
    ndv = non_diffeomorphic_volume(u, grid)
    ref = _ndv_brute_force(v)
    assert ref > 0
    assert ndv["ndv_percent"] == pytest.approx(ref, rel=1e-9)
    inner = int(np.prod([n - 2 for n in shape_xyz]))
    assert ndv["ndv_mm3"] == pytest.approx(ref / 100 * inner * np.prod(grid.spacing))


def test_ndv_frame_independent(oblique_grid3d):
    v = _smooth_voxel_field(oblique_grid3d.size, 5.0, 12, sigma=1.0)
    unit = Grid(oblique_grid3d.size)
    a = non_diffeomorphic_volume(_world_from_voxel_field(v, unit), unit)["ndv_percent"]
    b = non_diffeomorphic_volume(_world_from_voxel_field(v, oblique_grid3d),
                                 oblique_grid3d)["ndv_percent"]
    assert a > 0 and a == pytest.approx(b, rel=1e-9)


# ------------------------------------------------------------------------------- errors
def test_bad_fields_raise_input_error(oblique_grid3d):
    g = oblique_grid3d
    u = torch.zeros(1, 3, *g.shape)
    u[0, 1, 2, 3, 4] = float("nan")
    with pytest.raises(InputError, match="disp.nii.gz.*NaN"):
        displacement_metrics(u, g, name="disp.nii.gz")
    with pytest.raises(InputError, match="shape"):
        displacement_metrics(torch.zeros(1, 3, 4, 5, 6), g)
    with pytest.raises(InputError, match="one displacement field"):
        displacement_metrics(torch.zeros(2, 3, *g.shape), g)
    with pytest.raises(InputError, match="mask shape"):
        displacement_metrics(torch.zeros(3, *g.shape), g, mask=torch.ones(3, 3, 3))
