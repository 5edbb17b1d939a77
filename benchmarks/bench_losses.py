"""Benchmark medreg.losses against MONAI: forward + backward time, peak memory and values.

Every case runs in a fresh subprocess (so that its peak RSS is its own) with
``torch.set_num_threads(THREADS)``; the time is the median of ``--runs`` forward + backward
passes after one warm-up pass, with the gradient taken w.r.t. the warped image (the
displacement for bending), as in a registration step.

The image pair is synthetic: a smooth random texture in an ellipsoid with a zero background
margin of at least 9 voxels, the moving image shifted by 3 voxels, intensity-remapped and
noisier, both in [0, 1]. MONAI's LNCC zero-pads and divides by the full window volume while
medreg truncates the window at the border; on this pair every window that crosses the border
is all zeros in both images, so the two definitions agree everywhere.

Usage::

    python benchmarks/bench_losses.py                 # full size, all cases, 5 runs
    python benchmarks/bench_losses.py --size 48 56 64 --runs 2   # smoke test
    python benchmarks/bench_losses.py --markdown      # also print a RESULTS.md section

MONAI is a bench extra (``pip install --no-deps monai``); its cases are skipped without it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2
DEFAULT_SIZE = (160, 192, 224)  # tensor order (z, y, x)

# case name → (library, description)
CASES = {
    "medreg_lncc": ("medreg", "LNCC, box 9³"),
    "monai_lncc": ("monai", "LNCC, rectangular 9³"),
    "medreg_mi_gauss": ("medreg", "MI, 32 bins, Gaussian Parzen (σ = ½ bin), range [0, 1]"),
    "monai_mi": ("monai", "MI, 32 bins, Gaussian (sigma_ratio ½)"),
    "medreg_mi": ("medreg", "MI, 32 bins, cubic B-spline Parzen (default)"),
    "medreg_lncc_gauss": ("medreg", "LNCC, Gaussian window 9 (σ = 9/√12)"),
    "medreg_mind": ("medreg", "MIND-SSC (r = 2, d = 2) + SSD"),
    "medreg_ngf": ("medreg", "NGF (eps = 0.01)"),
    "medreg_bending": ("medreg", "bending energy, 3-component field"),
    "monai_bending": ("monai", "BendingEnergyLoss"),
}
PAIRS = [("LNCC (9³ box)", "medreg_lncc", "monai_lncc"),
         ("MI (32 bins, Gaussian)", "medreg_mi_gauss", "monai_mi"),
         ("MI (32 bins, B-spline vs MONAI Gaussian)", "medreg_mi", "monai_mi"),
         ("Bending energy", "medreg_bending", "monai_bending")]


# --------------------------------------------------------------------------- data
def make_data(size: tuple[int, int, int], path: Path) -> None:
    """Write ``fixed``, ``moving`` ``(1, 1, *size)`` and ``disp`` ``(1, 3, *size)`` to ``path``."""
    import torch

    from medreg.core.functional import gaussian_smooth

    torch.set_num_threads(THREADS)
    g = torch.Generator().manual_seed(0)
    shape = (1, 1) + tuple(size)
    texture = gaussian_smooth(torch.rand(shape, generator=g), 3.0, (1.0, 1.0, 1.0))
    texture = (texture - texture.min()) / (texture.max() - texture.min())
    axes = [torch.linspace(-1, 1, n) for n in size]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    margin = [1 - 2 * 12 / n for n in size]  # ≥ 12 voxels of background at each end
    inside = ((zz / margin[0]) ** 2 + (yy / margin[1]) ** 2 + (xx / margin[2]) ** 2) <= 1
    inside = inside.reshape(shape).float()
    fixed = (0.2 + 0.8 * texture + 0.02 * torch.rand(shape, generator=g)) * inside
    moving = torch.roll(fixed, shifts=(3, -2, 2), dims=(2, 3, 4))
    moving = (moving.sqrt() * 0.9 + 0.05 * torch.rand(shape, generator=g)) * (moving > 0)
    disp = gaussian_smooth(torch.randn((1, 3) + tuple(size), generator=g), 4.0, (1.0, 1.0, 1.0))
    disp = 20.0 * disp  # a few voxels
    torch.save({"fixed": fixed.clamp(0, 1), "moving": moving.clamp(0, 1), "disp": disp}, path)


# --------------------------------------------------------------------------- one case
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0) so that it measures the loss alone."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _quadratic_field(shape, dtype):
    """``u_k = ½ xᵀ H_k x`` in voxel units; exact bending energy ``Σ_k |H_k|²_F``."""
    import torch

    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(3, 3, generator=g, dtype=torch.float64) * 1e-3 for _ in range(3)]
    hs = [h + h.T for h in hs]
    axes = [torch.arange(n, dtype=torch.float64) for n in shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    pts = torch.stack([xx, yy, zz], -1)
    u = torch.stack([0.5 * ((pts @ h) * pts).sum(-1) for h in hs], 0)
    return u.unsqueeze(0).to(dtype), float(sum((h ** 2).sum() for h in hs))


def run_case(name: str, data: Path, runs: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    d = torch.load(data)
    fixed, moving, disp = d["fixed"], d["moving"].requires_grad_(), d["disp"].requires_grad_()
    leaf = moving
    if name.startswith("medreg"):
        from medreg.losses import functional as L

        fns = {
            "medreg_lncc": lambda: L.lncc(fixed, moving, window=9),
            "medreg_lncc_gauss": lambda: L.lncc(fixed, moving, window=9, kernel="gaussian"),
            "medreg_mi": lambda: L.mutual_information(fixed, moving, bins=32),
            "medreg_mi_gauss": lambda: L.mutual_information(fixed, moving, bins=32,
                                                            parzen="gaussian", sigma=0.5,
                                                            value_range=(0.0, 1.0)),
            "medreg_mind": lambda: L.mind_loss(fixed, moving, radius=2, dilation=2),
            "medreg_ngf": lambda: L.ngf(fixed, moving, eps=0.01),
            "medreg_bending": lambda: L.bending(disp, (1.0, 1.0, 1.0)),
        }
        fn = fns[name]
    else:
        import warnings

        warnings.filterwarnings("ignore")
        from monai.losses import (BendingEnergyLoss, GlobalMutualInformationLoss,
                                  LocalNormalizedCrossCorrelationLoss)

        if name == "monai_lncc":
            loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9,
                                                       kernel_type="rectangular")
            fn = lambda: loss(moving, fixed)  # noqa: E731
        elif name == "monai_mi":
            loss = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=32)
            fn = lambda: loss(moving, fixed)  # noqa: E731
        else:
            loss = BendingEnergyLoss()
            fn = lambda: loss(disp)  # noqa: E731
    if name.endswith("bending"):
        leaf = disp
    base = _status_mb("VmRSS")
    exact_peak = _reset_peak()
    times = []
    value = float("nan")
    for i in range(runs + 1):
        leaf.grad = None
        t0 = time.perf_counter()
        v = fn()
        v.backward()
        dt = time.perf_counter() - t0
        value = float(v.detach())
        if i > 0:  # the first pass is a warm-up
            times.append(dt)
    peak = (_status_mb("VmHWM") if exact_peak
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    out = {"case": name, "value": value, "times": times, "median_s": statistics.median(times),
           "peak_rss_mb": peak, "base_rss_mb": base, "peak_extra_mb": peak - base}
    # value checks after the measurements (not timed)
    leaf.grad = None
    with torch.no_grad():
        if name == "monai_mi":  # MONAI's 1e-7 smoothing inside the log removed
            exact = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=32,
                                                smooth_nr=1e-20, smooth_dr=1e-20)
            out["value_unsmoothed"] = float(exact(moving, fixed))
        if name.endswith("bending"):  # a quadratic field, where both stencils are exact
            q, expected = _quadratic_field(tuple(fixed.shape[2:]), torch.float64)
            out["quadratic"] = float(loss(q) if name.startswith("monai")
                                     else L.bending(q, (1.0, 1.0, 1.0)))
            out["quadratic_expected"] = expected
    return out


# --------------------------------------------------------------------------- driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, nargs=3, default=DEFAULT_SIZE, metavar=("Z", "Y", "X"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--markdown", action="store_true", help="print a RESULTS.md section")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case
    ap.add_argument("--data", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.data), args.runs)))
        return

    try:
        import monai
        monai_version = monai.__version__
    except ImportError:
        monai_version = None
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pair.pt"
        t0 = time.perf_counter()
        make_data(tuple(args.size), data)
        print(f"data {tuple(args.size)} made in {time.perf_counter() - t0:.1f} s", flush=True)
        results: dict[str, dict] = {}
        for name in args.cases:
            lib = CASES[name][0]
            if lib == "monai" and monai_version is None:
                print(f"{name:20s} skipped (MONAI not installed)")
                continue
            env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
            proc = subprocess.run([sys.executable, __file__, "--case", name, "--data", str(data),
                                   "--runs", str(args.runs)], capture_output=True, text=True,
                                  env=env)
            if proc.returncode != 0:
                print(f"{name:20s} FAILED\n{proc.stderr[-2000:]}")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name] = r
            print(f"{name:20s} median {r['median_s']:7.3f} s  runs "
                  f"[{', '.join(f'{t:.2f}' for t in r['times'])}]  peak RSS "
                  f"{r['peak_rss_mb']:7.0f} MB (+{r['peak_extra_mb']:.0f} over inputs)  "
                  f"value {r['value']:.6f}", flush=True)

    print("\nside by side (medreg / MONAI):")
    rows = []
    for label, ours, theirs in PAIRS:
        if ours in results and theirs in results:
            a, b = results[ours], results[theirs]
            row = (label, a["median_s"], b["median_s"], a["median_s"] / b["median_s"],
                   a["peak_rss_mb"], b["peak_rss_mb"], a["peak_extra_mb"], b["peak_extra_mb"],
                   a["value"], b["value"], abs(a["value"] - b["value"]))
            rows.append(row)
            print(f"  {label:42s} time {row[1]:.3f} / {row[2]:.3f} s = {row[3]:.2f}x   "
                  f"peak RSS {row[4]:.0f} / {row[5]:.0f} MB   values {row[8]:.6f} / "
                  f"{row[9]:.6f} (|diff| {row[10]:.1e})")
    notes = []
    if "monai_mi" in results and "value_unsmoothed" in results["monai_mi"]:
        u = results["monai_mi"]["value_unsmoothed"]
        for ours in ("medreg_mi_gauss",):
            if ours in results:
                notes.append(f"MI: MONAI without its 1e-7 smoothing inside the log gives {u:.6f}; "
                             f"{ours} {results[ours]['value']:.6f} (|diff| "
                             f"{abs(u - results[ours]['value']):.1e})")
    for name in ("medreg_bending", "monai_bending"):
        if name in results and "quadratic" in results[name]:
            r = results[name]
            scale = 3.0 if name.startswith("monai") else 1.0
            notes.append(f"{name} on a quadratic field: {r['quadratic']:.9g}"
                         + (" × 3 components" if scale != 1 else "")
                         + f" = {scale * r['quadratic']:.9g}; closed form "
                         f"{r['quadratic_expected']:.9g}")
    for line in notes:
        print("  " + line)
    if args.markdown:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as fh:
                cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
        except (OSError, StopIteration):
            pass
        print(f"\nMachine: {cpu}, {THREADS} threads; torch {torch.__version__}, MONAI "
              f"{monai_version}; input {' × '.join(map(str, args.size))} (z × y × x), "
              f"median of {args.runs} runs after a warm-up.\n")
        print("| case | median fwd+bwd (s) | peak RSS (MB) | peak over inputs (MB) | value |")
        print("|---|---:|---:|---:|---:|")
        for name, r in results.items():
            print(f"| {name} — {CASES[name][1]} | {r['median_s']:.3f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['peak_extra_mb']:.0f} | {r['value']:.6f} |")
        print("\n| pair | medreg / MONAI time | ratio | medreg / MONAI peak RSS (MB) | "
              "values | abs. diff |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in rows:
            print(f"| {row[0]} | {row[1]:.3f} / {row[2]:.3f} s | {row[3]:.2f} | {row[4]:.0f} / "
                  f"{row[5]:.0f} | {row[8]:.6f} / {row[9]:.6f} | {row[10]:.1e} |")
        if notes:
            print()
            for line in notes:
                print(f"- {line}")


if __name__ == "__main__":
    main()
