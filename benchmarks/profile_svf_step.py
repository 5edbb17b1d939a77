"""Profile one optimiser step of an SVF stage on the vxm pair (issues 4 and 5).

By default the stage of ``benchmarks/configs/svf_fast.yaml``, the ``fast`` preset until it moved
to the greedy stage (2026-12-04).

One step = scaling and squaring of the velocity, the warp of the moving level image, the
preset's similarity and regularisers, forward and backward — what ``engine.driver`` runs per
iteration. Prints the median time of each part, the machine's copy bandwidth (for the traffic
estimate) and torch's operator table for one full step.

    .venv/bin/python benchmarks/profile_svf_step.py --factor 2 --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from medreg.engine.driver import build_regularisers, build_similarity
from medreg.engine.pyramid import pyramid_level
from medreg.io import read_image
from medreg.transforms import DisplacementField, warp_image
from medreg.transforms.functional import scaling_and_squaring

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _profile import DATA, first_stage  # noqa: E402
from bench_warp import copy_bandwidth, timed  # noqa: E402

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--factor", type=int, default=2, help="pyramid shrink factor of the level")
    ap.add_argument("--preset", default=str(Path(__file__).resolve().parent / "configs" / "svf_fast.yaml"),
                    help="preset name or YAML config whose first svf stage is profiled")
    ap.add_argument("--steps", type=int, default=None, help="scaling-and-squaring steps (default: the preset's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    stage = first_stage(a.preset, "svf")
    steps = a.steps if a.steps is not None else stage.steps
    fixed = pyramid_level(read_image(a.data / "fixed.nii.gz"), a.factor, None)
    moving = pyramid_level(read_image(a.data / "moving.nii.gz"), a.factor, None)
    grid = fixed.grid
    velocity = torch.zeros(1, grid.ndim, *grid.shape, requires_grad=True)
    sim = build_similarity(stage.similarity)
    regs = build_regularisers(stage.regularisation)
    fdata, mdata = fixed.batch(), moving.batch()

    def warp(u):
        return warp_image(mdata, DisplacementField(u, grid, check_finite=False), grid, moving.grid,
                          padding="border", precise=False)

    def step() -> None:
        velocity.grad = None
        loss = sim(fdata, warp(scaling_and_squaring(velocity, grid, steps)))
        for w, reg, _ in regs:
            loss = loss + w * reg(velocity, grid)
        loss.backward()

    def ms(fn) -> str:
        return f"{timed(fn, a.repeats) * 1e3:.0f} ms"

    print(f"grid {tuple(grid.shape)} ({grid.numel / 1e6:.2f} M voxels), {a.threads} threads")
    with torch.no_grad():
        u = scaling_and_squaring(velocity, grid, steps)
        print(f"scaling and squaring ({steps}), forward: {ms(lambda: scaling_and_squaring(velocity, grid, steps))}")
        print(f"image warp, forward: {ms(lambda: warp(u))}")
        w = warp(u)
        print(f"{stage.similarity['name']}, forward: {ms(lambda: sim(fdata, w))}")
    print(f"full step, forward + backward: {ms(step)}")
    from torch.profiler import profile
    with profile() as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    print(f"copy bandwidth (numpy, read + write): {copy_bandwidth():.1f} GB/s")


if __name__ == "__main__":
    main()
