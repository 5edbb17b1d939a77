"""Try one deformable stage (or a list of stages) on the vxm pair (after the `fast` preset's affine stage).

Prints, per direction, the mean Dice over the 30 evaluation labels, the registration time
(``RegistrationResult.runtime_s``), SD of log det J and folding; then the means. For quick
tuning of a stage's settings; the side-by-side numbers in RESULTS.md come from
``bench_register.py``.

    .venv/bin/python benchmarks/tune_deformable.py '{"type": "greedy", "levels": [4, 2], ...}' [mf,fm]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _pairs import default_data_root  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", help="the deformable stage as JSON (the preset format), or a JSON list of stages")
    ap.add_argument("directions", nargs="?", default="mf,fm", help="mf (moving→fixed), fm, or both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default=str(default_data_root()))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import medreg
    from medreg.engine import load_preset
    from medreg.io import read_image
    from medreg.transforms import warp_labels

    d = Path(a.data) / "vxm-brain-t1-aseg" / "nifti"
    labels = [int(t) for t in (d / "eval_labels.txt").read_text().replace(",", " ").split()]
    affine = load_preset("fast").to_dict()["stages"][0]
    extra = json.loads(a.stage)
    cfg = {"initialisation": "com", "seed": 0, "stages": [affine, *(extra if isinstance(extra, list) else [extra])]}
    rows = []
    for direction in a.directions.split(","):
        f, m = ("fixed", "moving") if direction == "mf" else ("moving", "fixed")
        res = medreg.register(d / f"{f}.nii.gz", d / f"{m}.nii.gz", config=cfg, quiet=True)
        fl = read_image(d / f"{f}_labels.nii.gz", label=True)
        wl = warp_labels(read_image(d / f"{m}_labels.nii.gz", label=True), res.transform, fl.grid)
        x, y = fl.data.numpy(), wl.data.numpy()
        dice = float(np.mean([2 * np.sum((x == k) & (y == k)) / max(1, np.sum(x == k) + np.sum(y == k))
                              for k in labels]))
        disp = res.metrics["displacement"]
        rows.append((dice, res.runtime_s, disp["sdlogj"], disp["folding_percent"]))
        print(f"{direction} dice {dice:.4f} reg {res.runtime_s:.1f} s sdlogj {disp['sdlogj']:.3f} "
              f"fold {disp['folding_percent']:.4f}% levels {[h['seconds'] for h in res.history]}",
              flush=True)
    mean = np.mean(rows, axis=0)
    print(f"mean dice {mean[0]:.4f} reg {mean[1]:.1f} s sdlogj {mean[2]:.3f} fold {mean[3]:.4f}%")


if __name__ == "__main__":
    main()
