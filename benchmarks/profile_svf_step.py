"""Profile one optimiser step of the ``fast`` preset's SVF stage on the vxm pair (issues 4 and 5).

One step = scaling and squaring of the velocity, the warp of the moving level image, LNCC
(window 5) and the diffusion energy, forward and backward — what ``engine.driver`` runs per
iteration. Prints the best-of-N time of each part and torch's operator table for one full step.

    .venv/bin/python benchmarks/profile_svf_step.py --factor 2 --steps 6 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from medreg.engine.driver import build_regularisers, build_similarity
from medreg.engine.pyramid import pyramid_level
from medreg.io import read_image
from medreg.transforms import DisplacementField, warp_image
from medreg.transforms.functional import scaling_and_squaring

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/vxm-brain-t1-aseg/nifti"


def best_of(fn, n: int = 3) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--factor", type=int, default=2, help="pyramid shrink factor of the level")
    ap.add_argument("--steps", type=int, default=6, help="scaling-and-squaring steps")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    fixed = pyramid_level(read_image(a.data / "fixed.nii.gz"), a.factor, None)
    moving = pyramid_level(read_image(a.data / "moving.nii.gz"), a.factor, None)
    grid = fixed.grid
    velocity = torch.zeros(1, grid.ndim, *grid.shape, requires_grad=True)
    sim = build_similarity({"name": "lncc", "window": 5})
    regs = build_regularisers({"diffusion": 0.5})
    fdata, mdata = fixed.batch(), moving.batch()

    def warp(u):
        return warp_image(mdata, DisplacementField(u, grid, check_finite=False), grid, moving.grid,
                          padding="border", precise=False)

    def step() -> None:
        velocity.grad = None
        loss = sim(fdata, warp(scaling_and_squaring(velocity, grid, a.steps)))
        for w, reg, _ in regs:
            loss = loss + w * reg(velocity, grid)
        loss.backward()

    print(f"grid {tuple(grid.shape)} ({grid.numel / 1e6:.2f} M voxels), {a.threads} threads")
    with torch.no_grad():
        u = scaling_and_squaring(velocity, grid, a.steps)
        print(f"scaling and squaring ({a.steps}), forward: {best_of(lambda: scaling_and_squaring(velocity, grid, a.steps)) * 1e3:.0f} ms")
        print(f"image warp, forward: {best_of(lambda: warp(u)) * 1e3:.0f} ms")
        w = warp(u)
        print(f"LNCC, forward: {best_of(lambda: sim(fdata, w)) * 1e3:.0f} ms")
    print(f"full step, forward + backward: {best_of(step) * 1e3:.0f} ms")
    from torch.profiler import profile
    with profile() as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
