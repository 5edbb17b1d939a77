"""Benchmarks of learned registration (issue 8).

``compare``: the five architectures of ``medreg.nets`` on one 2D synthetic task — axial slices
of the bundled Colin27 (2 mm) with their AAL labels, each pair a slice and a copy deformed by a
random diffeomorphism (``SyntheticPairDataset``, kind ``deformed``) with independent intensity
perturbations on both sides. Every network is trained with the same loss (LNCC + diffusion
in mm, + its own penalty), steps, batch, learning rate and seed; validation pairs come from
slices never used for training. Reported: mean Dice of the AAL labels (nearest-neighbour warp),
Dice before registration, SD of log det J, % folded voxels, parameters, training seconds per
step and inference milliseconds per pair (batch 1).

``models``: a bundled model (or checkpoint) on a benchmark dataset through the harness of
``bench_register.py`` (``--method predict``), with and without instance optimisation, and
optionally ``medreg register --preset fast`` and ANTs SyN side by side in the same run.

    python benchmarks/bench_learned.py compare --steps 300 --threads 2 --out compare.json
    python benchmarks/bench_learned.py models --model brain3d --dataset vxm-lia \\
        --instance-steps 0 --instance-steps 50 --baselines --out vxm_learned.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "src" / "medreg" / "data"
NETS = ("unet", "coupled", "lapirn", "cascade", "pyramid_corr")
TRAIN_SLICES = range(28, 60, 4)  # axial levels (2 mm) used for training
VAL_SLICES = (34, 42, 50)        # levels never used for training (between the training ones)


def _write_slices(work: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    from medreg.core import Grid, Image
    from medreg.io import read_image, write_image

    vol = read_image(BUNDLED / "colin27_t1_2mm.nii.gz")
    lab = read_image(BUNDLED / "colin27_aal_2mm.nii.gz", label=True)
    out: dict[str, list[str]] = {"ti": [], "tl": [], "vi": [], "vl": []}
    for keys, levels in ((("ti", "tl"), TRAIN_SLICES), (("vi", "vl"), VAL_SLICES)):
        for k in levels:
            grid = Grid((vol.data.shape[3], vol.data.shape[2]), vol.grid.spacing[:2])
            for key, img, name in ((keys[0], vol, "t1"), (keys[1], lab, "aal")):
                path = work / f"colin_{name}_z{k}.nii.gz"
                write_image(Image(img.data[:, k], grid, path.name), path)
                out[key].append(str(path))
    return out["ti"], out["tl"], out["vi"], out["vl"]


def _config(net: str, steps: int, images, labels, val_images, val_labels, out_dir: Path,
            threads: int) -> dict:
    synth = {"magnitude_mm": 4.0, "smoothness_mm": 16.0}
    return {
        "seed": 0,
        "model": {"name": net, "ndim": 2},
        "data": {
            "train": {"synthetic": {"images": images, "labels": labels, "kind": "deformed",
                                    "length": 100000, "synth": synth}},
            "val": {"synthetic": {"images": val_images, "labels": val_labels, "kind": "deformed",
                                  "length": 48, "synth": synth}},
            "preprocess": {"size": [96, 112], "spacing": [2.0, 2.0], "normalise": "percentile"},
        },
        "loss": {"similarity": {"name": "lncc", "weight": 1.0, "window": 9},
                 "regularisation": {"diffusion": 1.0}},
        "train": {"steps": steps, "batch_size": 4, "lr": 1e-3, "schedule": "cosine",
                  "val_every": steps, "val_pairs": 48, "checkpoint_every": steps,
                  "out_dir": str(out_dir), "threads": threads, "log_every": max(1, steps // 5)},
    }


def _inference_ms(net: torch.nn.Module, ndim: int, repeats: int = 10) -> float:
    x = torch.rand(1, 1, 112, 96) if ndim == 2 else torch.rand(1, 1, 80, 96, 80)
    net.eval()
    times = []
    with torch.no_grad():
        net(x, x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x, x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def compare(a: argparse.Namespace) -> int:
    from medreg.train import config_from_dict, load_checkpoint, train

    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ti, tl, vi, vl = _write_slices(work)
        for net in a.nets or NETS:
            cfg = config_from_dict(_config(net, a.steps, ti, tl, vi, vl, work / net, a.threads))
            t0 = time.perf_counter()
            result = train(cfg, quiet=True)
            seconds = time.perf_counter() - t0
            loaded = load_checkpoint(result.last_checkpoint)
            params = sum(p.numel() for p in loaded.net.parameters())
            m = result.metrics
            row = {"net": net, "params": params, "steps": a.steps,
                   "train_s_per_step": seconds / a.steps,
                   "infer_ms": _inference_ms(loaded.net, 2),
                   "dice_before": m.get("val_dice_initial"), "dice": m.get("val_dice"),
                   "sdlogj": m.get("val_sdlogj"), "folding_percent": m.get("val_folding_percent")}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"argv": sys.argv, "threads": a.threads, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    if a.out:
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n| network | params | Dice (before → after) | SDlogJ | fold % | train s/step | inference ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['net']} | {r['params'] / 1e3:.0f} k | {r['dice_before']:.3f} → {r['dice']:.3f} | "
              f"{r['sdlogj']:.3f} | {r['folding_percent']:.3f} | {r['train_s_per_step']:.2f} | "
              f"{r['infer_ms']:.0f} |")
    return 0


def models(a: argparse.Namespace) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_register

    base = ["--threads", str(a.threads), "--seed", "0", "--out", a.out, "--resume",
            "--pairs", str(a.pairs)] if a.pairs else ["--threads", str(a.threads), "--seed", "0",
                                                     "--out", a.out, "--resume"]
    for ds in a.dataset:
        base += ["--dataset", ds]
    if a.initialisation:
        base += ["--initialisation", a.initialisation]
    for steps in a.instance_steps or [0]:
        rc = bench_register.main(base + ["--method", "predict", "--model", a.model,
                                         "--instance-steps", str(steps)])
        if rc:
            return rc
    if a.baselines:
        return bench_register.main(base + ["--method", "identity", "--method", "medreg",
                                           "--preset", "fast", "--method", "ants"])
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="the five architectures on one 2D synthetic task")
    c.add_argument("--steps", type=int, default=300)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--net", dest="nets", action="append", choices=NETS)
    c.add_argument("--out", default=None)
    m = sub.add_parser("models", help="a model on benchmark pairs (bench_register harness)")
    m.add_argument("--model", required=True)
    m.add_argument("--dataset", action="append", required=True)
    m.add_argument("--instance-steps", type=int, action="append")
    m.add_argument("--initialisation", default=None)
    m.add_argument("--pairs", type=int, default=None)
    m.add_argument("--baselines", action="store_true", help="also medreg fast, ANTs SyN, identity")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    return compare(a) if a.cmd == "compare" else models(a)


if __name__ == "__main__":
    sys.exit(main())
