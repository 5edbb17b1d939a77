"""Seconds per `fast` registration of the first hippocampus pairs, in one process after a
warm-up: run it as is, with `OMP_WAIT_POLICY=PASSIVE`, and beside a busy process to see what
OpenMP's wait policy does on a shared machine (benchmarks/RESULTS.md, "Session 15")::

    .venv/bin/python benchmarks/bench_shared_machine.py
    python3 -c "while True: pass" & .venv/bin/python benchmarks/bench_shared_machine.py; kill %1
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/bench_shared_machine.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pairs import build_pairs, default_data_root  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="bench_work", help="folder for the pair lists")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import medreg
    from medreg.io import read_image

    pairs = build_pairs("hippocampus", default_data_root(), Path(a.work), 20, 0)[:a.pairs]
    images = [(read_image(p.fixed), read_image(p.moving)) for p in pairs]
    medreg.register(*images[0], "fast")  # warm-up
    t0 = time.perf_counter()
    for f, m in images:
        medreg.register(f, m, "fast")
    print(f"{(time.perf_counter() - t0) / len(images):.3f} s per pair ({a.pairs} pairs, {a.threads} threads)")


if __name__ == "__main__":
    main()
