"""Profile the discrete stage and the greedy refinement of the `discrete` preset on the vxm pair
(issue 5).

Times each hot spot of one registration (median of ``--repeats``) and sets it against the time
its unavoidable memory traffic would take at the machine's copy bandwidth (measured here with
numpy): the cost volume must be written once, the box filter and each softmin pass of the convex
optimisation must read (and the filter write) it once, a warp must read its field and write its
output. The ratio says how far each part is from the memory-bandwidth limit; where it is large
the part is bound by computation or per-operation overhead, not by memory.

The moving image is taken as is (identity prefix: the preset's affine stage changes what is
compared, not how much). Parameters are the preset's (``--preset`` for another YAML).

    .venv/bin/python benchmarks/profile_discrete.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from medreg.core.grid import Grid
from medreg.engine.discrete import (CACHE_BYTES, DiscreteParams, box_filter, convex_optimise,
                                    cost_volume, feature_maps, search_plan)
from medreg.engine.greedy import GreedyStep
from medreg.engine.pyramid import pyramid_level, resample_field
from medreg.io import read_image
from medreg.losses.functional import lncc
from medreg.transforms import DisplacementField, Identity, warp_image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _profile import DATA, first_stage  # noqa: E402
from bench_warp import copy_bandwidth, timed  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--preset", default="discrete", help="preset name or YAML with a discrete stage")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    stage = first_stage(a.preset, "discrete")
    p = DiscreteParams.from_dict(stage.discrete)
    fixed, moving = read_image(a.data / "fixed.nii.gz"), read_image(a.data / "moving.nii.gz")
    fdata, mdata = fixed.batch(torch.float32), moving.batch(torch.float32)
    coarse = fixed.grid.downsample(p.feature_factor)
    plan = search_plan(coarse, p.radius_mm, p.step_mm)
    ident = Identity(fixed.ndim)
    rows: list[tuple[str, float, float]] = []

    def part(name: str, fn, traffic: float) -> None:
        rows.append((name, timed(fn, a.repeats), traffic))

    f_search = feature_maps(fdata, fixed.grid, p, plan.search, ident)
    m_search = feature_maps(mdata, moving.grid, p, plan.search, ident)
    part("features (MIND, both images, on the search grid)",
         lambda: (feature_maps(fdata, fixed.grid, p, plan.search, ident),
                  feature_maps(mdata, moving.grid, p, plan.search, ident)),
         4.0 * (fdata.numel() + mdata.numel()) + 2 * f_search.numel() * 4.0)
    ff = plan.centre(f_search)
    cv = cost_volume(ff, m_search, plan.offsets, plan.stride)
    vol = float(cv.volume_bytes)
    feat = 4.0 * (ff.numel() + m_search.numel())
    part(f"cost volume ({plan.num_labels} candidates × {coarse.numel} voxels, chunks of {cv.chunk})",
         lambda: cost_volume(ff, m_search, plan.offsets, plan.stride), vol + feat)
    part("cost volume, all candidates in one chunk (before session 11)",
         lambda: cost_volume(ff, m_search, plan.offsets, plan.stride, chunk=plan.num_labels),
         vol + feat)
    cost = cv.cost
    per_label = cost[:, :1].numel() * cost.element_size()
    step = max(1, min(cv.chunk // 2, CACHE_BYTES // per_label))

    def filt(step: int) -> None:
        for l0 in range(0, cost.shape[1], step):
            box_filter(cost[:, l0:l0 + step].clone(), p.cost_radius)

    part(f"cost box filter (radius {p.cost_radius}, {step} candidates at a time)",
         lambda: filt(step), 2 * vol)
    part("cost box filter, 364 candidates at a time (before session 11)", lambda: filt(364), 2 * vol)
    passes = 1 + len(p.coupling)
    part(f"convex optimisation ({passes} softmin passes + smoothing)",
         lambda: convex_optimise(cost, plan.offsets_mm, coarse, p, plan.step_mm), passes * vol)
    u = convex_optimise(cost, plan.offsets_mm, coarse, p, plan.step_mm)
    part("field to the full grid (trilinear)", lambda: resample_field(u, coarse, fixed.grid),
         4.0 * (u.numel() + 3 * fixed.grid.numel))

    # one greedy refinement step at the 1/2 level (the preset's last level)
    lvl_f, lvl_m = pyramid_level(fixed, 2), pyramid_level(moving, 2)
    g: Grid = lvl_f.grid
    gs = GreedyStep(g, 0.25, 1.7, 0.0, log_jacobian=0.1)
    uu = resample_field(u, coarse, g)
    lf, lm = lvl_f.batch(), lvl_m.batch()
    t = DisplacementField(uu, g, check_finite=False)
    vox = 4.0 * g.numel
    with torch.no_grad():
        part(f"greedy 1/2 level {g.shape}: image warp", lambda: warp_image(
            lm, t, g, lvl_m.grid, padding="border", precise=False), vox * 5)
        warped = warp_image(lm, t, g, lvl_m.grid, padding="border", precise=False)

    def sim() -> torch.Tensor:
        w = warped.clone().requires_grad_(True)
        with torch.enable_grad():
            (d,) = torch.autograd.grad(lncc(lf, w, window=9), w)
        return d

    part("greedy: LNCC forward + backward (window 9)", sim, vox * 4)
    dl = sim()
    with torch.no_grad():
        part("greedy: force (gradient, smoothing)", lambda: gs.force(warped, dl), vox * 5)
        v = gs.scale(gs.force(warped, dl))
        part("greedy: compose + volume step", lambda: gs.compose(uu, v), vox * 12)

    # measured last: numpy's two 512 MB buffers, freed, leave later large torch allocations
    # slower to fault in (seen: the cost volume 0.38 → 1.05 s after it)
    bw = copy_bandwidth() * 1e9  # bytes/s, read + write counted
    print(f"{a.threads} threads; copy bandwidth (numpy, read + write) {bw / 1e9:.1f} GB/s\n")
    print("| part | median ms | unavoidable traffic MB | at copy bandwidth ms | × the limit |")
    print("|---|---|---|---|---|")
    for name, secs, traffic in rows:
        limit = traffic / bw
        print(f"| {name} | {secs * 1e3:.0f} | {traffic / 2 ** 20:.0f} | {limit * 1e3:.1f} | "
              f"{secs / limit:.0f} |")


if __name__ == "__main__":
    main()
