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
``brain3d.csv`` and ``brain2d.csv`` listing them for ``medreg train``. For the four FreeSurfer
subjects also ``<out>/brain3d/<name>_aseg.nii.gz``: their ``aseg.mgz`` through the same affine
transform (nearest neighbour), keeping only the 30 structures of ``ASEG_LABELS`` (the usual
VoxelMorph evaluation set; every other id set to 0), listed in ``brain3d_labelled.csv`` for the
weakly supervised fine-tuning of ``brain3d_finetune.yaml``.

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
from medreg.transforms import warp_labels

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "src" / "medreg" / "data"
SHARED = ROOT.parent / "shared" / "data"
SLICES = range(30, 62, 4)  # axial slices (MNI 2 mm z index) through the basal ganglia and cortex
#: FreeSurfer aseg structures kept in the label maps (cortex, white matter, ventricles, deep grey
#: matter, cerebellum, brain stem, choroid plexus; both hemispheres)
ASEG_LABELS = (2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43, 46, 47,
               49, 50, 51, 52, 53, 54, 60, 63)


def aligned_brains(out: Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Affinely align each brain to MNI152 2 mm; returns name → T1 file on the MNI grid, and
    name → aseg label file on the same grid (FreeSurfer subjects only)."""
    mni = BUNDLED / "mni152_t1_2mm.nii.gz"
    sources = {"mni": None, "colin": BUNDLED / "colin27_t1_2mm.nii.gz"}
    for s in ("sub-01", "sub-02", "sub-03", "sub-04"):
        sources[s] = SHARED / "freesurfer-brains" / s / "mri" / "brainmask.mgz"
    out.mkdir(parents=True, exist_ok=True)
    files, labels = {}, {}
    fixed = read_image(mni)
    for name, path in sources.items():
        dest = out / f"{name}_t1.nii.gz"
        aseg = path.parent / "aseg.mgz" if path is not None else None
        lab_dest = out / f"{name}_aseg.nii.gz"
        if path is None:
            write_image(fixed, dest)
        elif not dest.exists() or (aseg is not None and aseg.exists() and not lab_dest.exists()):
            result = medreg.register(fixed, path, preset="affine", threads=2)
            write_image(result.warped, dest)
            if aseg is not None and aseg.exists():
                lab = warp_labels(read_image(aseg, label=True), result.transform, fixed.grid)
                keep = torch.isin(lab.data, torch.tensor(ASEG_LABELS, dtype=lab.data.dtype))
                write_image(Image(torch.where(keep, lab.data, 0), lab.grid, lab.name), lab_dest)
        files[name] = dest
        if lab_dest.exists():
            labels[name] = lab_dest
    return files, labels


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


def write_csv(paths: list[Path], dest: Path, labels: dict[str, Path] | None = None) -> None:
    """``image, subject`` rows (``image, labels, subject`` with ``labels``: labelled ones only)."""
    with open(dest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "subject"] if labels is None else ["image", "labels", "subject"])
        for p in paths:
            subject = p.name.split("_")[0]
            if labels is None:
                w.writerow([str(p), subject])
            elif subject in labels:
                w.writerow([str(p), str(labels[subject]), subject])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(2)
    files, labels = aligned_brains(a.out / "brain3d")
    write_csv(list(files.values()), a.out / "brain3d.csv")
    write_csv(list(files.values()), a.out / "brain3d_labelled.csv", labels)
    write_csv(axial_slices(files, a.out / "brain2d"), a.out / "brain2d.csv")
    print(f"wrote {a.out}/brain3d.csv ({len(files)} volumes), {a.out}/brain3d_labelled.csv "
          f"({len(labels)} with labels) and {a.out}/brain2d.csv")


if __name__ == "__main__":
    main()
