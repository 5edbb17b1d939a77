"""Benchmark: trilinear warp of a 160×192×224 float32 volume by a smooth dense field.

Compares, in one run and on the same threads: medreg's ``warp_image`` (the default path: float32
on the image's dyadic lattice, exact at integer indices; ``precise=True``: float64; and
``precise=False``: plain float32), raw ``torch.nn.functional.grid_sample`` on a precomputed grid,
``scipy.ndimage.map_coordinates`` (order 1) and ``SimpleITK.Resample`` with a
``DisplacementFieldTransform``. Prints medians of ``--repeats`` runs, ratios to SimpleITK and
the achieved bandwidth (image read + field read + output write) against a measured copy rate.

    python benchmarks/bench_warp.py --threads 2 --repeats 7

The machine may be shared: compare the ratios of one run, and read the load average printed
before and after the timings.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from medreg.core import Grid
from medreg.core.functional import gaussian_smooth
from medreg.io import set_sitk_geometry, to_sitk
from medreg.transforms import DisplacementField, warp_image


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 512 * 2**20) -> float:
    """GB/s of a large numpy copy (read + write counted)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    b = np.empty_like(a)
    t = timed(lambda: np.copyto(b, a), 5)
    return 2 * nbytes / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--size", type=int, nargs=3, default=[160, 192, 224], help="x y z voxels")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    grid = Grid(tuple(args.size), (1.0, 1.0, 1.0), (-80.0, -96.0, -112.0))
    gen = torch.Generator().manual_seed(0)
    img = gaussian_smooth(torch.rand(1, 1, *grid.shape, generator=gen), 2.0, grid.spacing)
    u = gaussian_smooth(torch.randn(1, 3, *grid.shape, generator=gen), 8.0, grid.spacing)
    u = u * (4.0 / u.abs().max())  # up to 4 mm
    field = DisplacementField(u, grid)
    n = grid.numel

    load_before = os.getloadavg()[0]
    results = {}
    with torch.no_grad():
        results["medreg warp_image (default: exact lattice, float32)"] = timed(
            lambda: warp_image(img, field, grid, grid), args.repeats)
        results["medreg warp_image (precise=True, float64)"] = timed(
            lambda: warp_image(img, field, grid, grid, precise=True), args.repeats)
        results["medreg warp_image (precise=False, float32)"] = timed(
            lambda: warp_image(img, field, grid, grid, precise=False), args.repeats)
        norm = grid.transform_points(field.mapped_points(grid), "world", "norm").float()
        results["torch grid_sample (precomputed grid)"] = timed(
            lambda: F.grid_sample(img, norm, mode="bilinear", padding_mode="zeros", align_corners=True),
            args.repeats)
    vol = img[0, 0].numpy()
    coords = np.stack([grid.shape[i] * 0 + (np.indices(grid.shape, dtype=np.float32)[i]) for i in range(3)])
    coords = coords + np.moveaxis(u[0].numpy()[::-1], 0, 0)  # unit spacing, identity direction
    from scipy.ndimage import map_coordinates

    results["scipy map_coordinates (order 1)"] = timed(
        lambda: map_coordinates(vol, coords, order=1, mode="constant"), args.repeats)
    sim = set_sitk_geometry(sitk.GetImageFromArray(vol), grid)
    tx = to_sitk(field)
    results["SimpleITK Resample (displacement field)"] = timed(
        lambda: sitk.Resample(sim, sim, tx, sitk.sitkLinear, 0.0), args.repeats)

    load_after = os.getloadavg()[0]

    # agreement check (interior), so the timings compare equal work
    ref = sitk.GetArrayFromImage(sitk.Resample(sim, sim, tx, sitk.sitkLinear, 0.0))
    agree = {}
    for name, kw in (("default", {}), ("precise=True", {"precise": True}),
                     ("precise=False", {"precise": False})):
        ours = warp_image(img, field, grid, grid, **kw)[0, 0].numpy()
        agree[name] = float(np.abs(ours - ref)[4:-4, 4:-4, 4:-4].max())

    bw = copy_bandwidth()
    moved = (1 + 3 + 1) * 4 * n  # image, field, output in float32
    ref_t = results["SimpleITK Resample (displacement field)"]
    print(f"volume {tuple(args.size)} ({n / 1e6:.1f} M voxels), threads {args.threads}, "
          f"median of {args.repeats}; copy bandwidth {bw:.1f} GB/s; "
          f"load average {load_before:.2f} before, {load_after:.2f} after the timings")
    print("max |medreg − SimpleITK| over the interior (image values in [0, 1]): "
          + ", ".join(f"{k} {v:.1e}" for k, v in agree.items()))
    print(f"{'method':52s} {'median s':>9s} {'vs SimpleITK':>12s} {'GB/s':>7s}")
    for k, t in results.items():
        print(f"{k:52s} {t:9.3f} {t / ref_t:11.2f}x {moved / t / 1e9:7.2f}")


if __name__ == "__main__":
    main()
