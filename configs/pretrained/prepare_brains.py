"""Training data of the bundled `brain2d` and `brain3d` models (not shipped: written to --out).

Six real T1 brains, all affinely registered by medreg (`affine` preset) to the bundled MNI152
template at 2 mm, so every training pair starts affinely aligned as `medreg predict
--initialisation affine` (or an already aligned pair) provides at inference:

- MNI152 2009a and Colin27 (bundled in ``src/medreg/data``; their licences allow redistribution
  with attribution, see ``src/medreg/data/README.md``);
- the four FreeSurfer subjects of ``../shared/data/freesurfer-brains`` (``brainmask.mgz``,
  terms unknown: used for training only; neither images nor labels are shipped).

The vxm pair (``../shared/data/vxm-brain-t1-aseg``) is **not** used: it is the unseen
evaluation pair of ``benchmarks/bench_learned.py``.

Writes ``<out>/brain3d/<name>_t1.nii.gz`` (MNI 2 mm grid, LAS) and ``<out>/brain2d/<name>_zNN.nii.gz``
(axial slices: rows anterior, columns left: a 2D image with orientation "LA"), plus
``brain3d.csv`` and ``brain2d.csv`` listing them for ``medreg train``.

    python configs/pretrained/prepare_brains.py --out /work/train_data
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

import medreg
from medreg.core import Grid, Image
from medreg.io import read_image, write_image

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "src" / "medreg" / "data"
SHARED = ROOT.parent / "shared" / "data"
SLICES = range(30, 62, 4)  # axial slices (MNI 2 mm z index) through the basal ganglia and cortex


def aligned_brains(out: Path) -> dict[str, Path]:
    """Affinely align each brain to MNI152 2 mm; returns name → file on the MNI grid."""
    mni = BUNDLED / "mni152_t1_2mm.nii.gz"
    sources = {"mni": None, "colin": BUNDLED / "colin27_t1_2mm.nii.gz"}
    for s in ("sub-01", "sub-02", "sub-03", "sub-04"):
        sources[s] = SHARED / "freesurfer-brains" / s / "mri" / "brainmask.mgz"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    fixed = read_image(mni)
    for name, path in sources.items():
        dest = out / f"{name}_t1.nii.gz"
        if path is None:
            write_image(fixed, dest)
        elif not dest.exists():
            result = medreg.register(fixed, path, preset="affine", threads=2)
            write_image(result.warped, dest)
        files[name] = dest
    return files


def axial_slices(files: dict[str, Path], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, path in files.items():
        vol = read_image(path)  # MNI grid, LAS: tensor (1, z=S, y=A, x=L)
        assert vol.grid.orientation() == "LAS", vol.grid.orientation()
        for k in SLICES:
            data = vol.data[:, k].float()  # (1, A, L)
            grid = Grid((data.shape[2], data.shape[1]), vol.grid.spacing[:2],
                        direction=[[1.0, 0.0], [0.0, -1.0]])  # x → left, y → anterior ("LA")
            img = Image(data, grid, f"{name}_z{k}")
            dest = out / f"{name}_z{k:02d}.nii.gz"
            write_image(img, dest)
            written.append(dest)
    return written


def write_csv(paths: list[Path], dest: Path) -> None:
    with open(dest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "subject"])
        for p in paths:
            w.writerow([str(p), p.name.split("_")[0]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    files = aligned_brains(a.out / "brain3d")
    write_csv(list(files.values()), a.out / "brain3d.csv")
    write_csv(axial_slices(files, a.out / "brain2d"), a.out / "brain2d.csv")
    print(f"wrote {a.out}/brain3d.csv ({len(files)} volumes) and {a.out}/brain2d.csv")


if __name__ == "__main__":
    main()
