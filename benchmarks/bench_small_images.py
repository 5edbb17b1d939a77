"""Real brain pairs downsampled until they are small images: ``fast`` with its ``small_image``
settings against the preset's own pyramid (``small_image_size: 0``), in-process.

    python benchmarks/bench_small_images.py vxm 3 2          # dataset, factor, pairs
    python benchmarks/bench_small_images.py freesurfer 5 4

Images are shrunk with :func:`medreg.engine.pyramid.pyramid_level` (Gaussian, then resampled),
label maps by nearest neighbour on the same grid; Dice over the dataset's labels
(``benchmarks/_pairs.py``), SD of log det J and folding from the run's metrics, registration time.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pairs import build_pairs, default_data_root  # noqa: E402

import medreg  # noqa: E402
from medreg.engine.pyramid import pyramid_level  # noqa: E402
from medreg.io import read_image  # noqa: E402
from medreg.metrics import label_metrics  # noqa: E402
from medreg.transforms import Identity, warp_labels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset")
    ap.add_argument("factor", type=int)
    ap.add_argument("pairs", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=f"/tmp/medreg_bench_{os.getuid()}")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    def down(path: str, label: bool = False):
        img = read_image(path, label=label)
        if label:
            return warp_labels(img, Identity(img.ndim), img.grid.downsample(a.factor))
        return pyramid_level(img, a.factor)

    rows: dict[str, list] = {}
    for p in build_pairs(a.dataset, default_data_root(), Path(a.workdir), a.pairs, 0):
        f, m = down(p.fixed), down(p.moving)
        fl, ml = down(p.fixed_labels, True), down(p.moving_labels, True)
        for name, kw in (("preset pyramid", {"small_image_size": 0}), ("small_image", {})):
            r = medreg.register(f, m, "fast", fixed_labels=fl, moving_labels=ml,
                                threads=a.threads, **kw)
            dice = label_metrics(r.fixed_labels, r.warped_labels, labels=p.labels,
                                 surface=False).mean_dice
            dm = r.metrics["displacement"]
            rows.setdefault(name, []).append((dice, dm["sdlogj"], dm["folding_percent"], r.runtime_s))
        print(f"{p.name}: {tuple(f.grid.shape)} voxels", flush=True)
    for name, vals in rows.items():
        mean = np.array(vals).mean(0)
        print(f"{a.dataset} /{a.factor} {name}: Dice {mean[0]:.3f} SDlogJ {mean[1]:.3f} "
              f"fold {mean[2]:.4f} % reg {mean[3]:.2f} s ({len(vals)} pairs)")


if __name__ == "__main__":
    main()
