"""Registration pairs of the benchmark datasets (``bench_register.py --dataset NAME``).

Every pair names files that every method reads unchanged (the same inputs for ANTs, elastix and
medreg). Files that the tools cannot all read (FreeSurfer ``.mgz``) are converted once, with
nibabel, into NIfTI in ``<workdir>/inputs`` (voxels and affine kept; labels to int16).

The convention of the whole harness: ``fixed`` is the reference grid, the transform maps fixed
points to the moving image (pull-back), the moving labels are resampled onto the fixed grid and
compared with the fixed labels. Landmark TRE is ``‖T(fixed_k) − moving_k‖``.

Datasets (see ``/work/shared/data/*/SOURCE.md``):

``vxm``          ``vxm-brain-t1-aseg/nifti``: the one pair, both directions (2 pairs), 30 labels.
``vxm-lia``      the same pair with its true orientation in the header: the ``.npz`` files store
                 no geometry and ``nifti/`` labels the axes R, A, S "nominally"; the volumes are
                 FreeSurfer-conformed (L, I, A: affine NCC to MNI152 0.94 with that header, 0.84
                 with RAS). Copies with the LIA direction (same voxels, same spacing and origin)
                 go to ``<workdir>/inputs/vxm-lia``. Dice is unchanged for methods that ignore
                 anatomy; it matters for learned models, which see images the right way up.
``vxm2d``        axial slices of the vxm pair (2D, 1 mm, rows anterior, columns left, as the
                 ``brain2d`` model's training slices): 5 levels × both directions = 10 pairs, the
                 30 labels (those present in a slice).
``freesurfer``   ``freesurfer-brains``: 4 subjects in native space, 12 ordered pairs
                 (``brainmask.mgz`` → ``aseg.mgz``), the same 30 labels.
``hippocampus``  ``msd-hippocampus``: random ordered pairs of different subjects (default 20,
                 seeded), labels 1 and 2.
``colin-mni``    ``antspy-brain-data/nifti/colin27_to_mni152``: Colin27 (moving, AAL) → MNI152
                 (fixed, AAL-like), the 116 labels of ``eval_labels.txt``.
``lung``         ``elastix-lung-ct-masks-landmarks``: baseline lung mask (fixed) → follow-up lung
                 mask (moving), Dice of label 1, TRE of the 51 "corrected" landmark pairs (and the
                 full 100-pair set).
``head2d``       ``itkelastix-2d-brain-mri-pair``: 2D T1-like fixed, PD/T2-like moving; no labels,
                 so the head masks are warped and scored (label 1).
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

DATASETS = ("vxm", "vxm-lia", "vxm2d", "freesurfer", "hippocampus", "colin-mni", "lung", "head2d")

#: Default number of pairs when ``--pairs`` is not given (``None``: all).
DEFAULT_PAIRS = {"hippocampus": 20}

#: medreg preset used for a dataset whatever ``--preset`` says (the issue names them).
DATASET_PRESET = {"lung": "lung", "head2d": "multimodal"}

VXM_LABELS = [2, 3, 4, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 24, 28, 31, 41, 42, 43, 46,
              47, 49, 50, 51, 52, 53, 54, 60, 63]


@dataclass
class Pair:
    """One registration problem: moving → fixed, with what it is scored on."""

    dataset: str
    name: str
    fixed: str
    moving: str
    fixed_labels: str | None = None
    moving_labels: str | None = None
    labels: list[int] = field(default_factory=list)
    #: {set name: (fixed landmark file, moving landmark file)}
    landmarks: dict[str, tuple[str, str]] = field(default_factory=dict)
    fixed_mask: str | None = None
    moving_mask: str | None = None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def default_data_root() -> Path:
    """``$MEDREG_DATA`` or ``<repo>/../shared/data``."""
    env = os.environ.get("MEDREG_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _read_label_list(path: Path) -> list[int]:
    text = path.read_text().replace(",", " ").split()
    return [int(t) for t in text]


def _mgz_to_nifti(src: Path, dst: Path, label: bool) -> str:
    """Lossless mgz → NIfTI with nibabel (same voxels, same affine; qform = sform, code 1)."""
    import nibabel as nib
    import numpy as np

    if dst.exists():
        return str(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    img = nib.load(str(src))
    arr = np.asarray(img.dataobj)
    if label:
        if arr.max() > np.iinfo(np.int16).max or arr.min() < np.iinfo(np.int16).min:
            raise ValueError(f"{src}: label ids do not fit int16")
        arr = arr.astype(np.int16)
    else:
        arr = arr.astype(np.float32)
    out = nib.Nifti1Image(arr, img.affine)
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}.nii.gz")
    nib.save(out, str(tmp))
    os.replace(tmp, dst)
    return str(dst)


def _vxm(root: Path, work: Path, n: int | None, seed: int) -> list[Pair]:
    d = root / "vxm-brain-t1-aseg" / "nifti"
    labels = _read_label_list(d / "eval_labels.txt")
    a = ("fixed.nii.gz", "fixed_labels.nii.gz")
    b = ("moving.nii.gz", "moving_labels.nii.gz")
    pairs = [Pair("vxm", "moving_to_fixed", str(d / a[0]), str(d / b[0]), str(d / a[1]),
                  str(d / b[1]), labels),
             Pair("vxm", "fixed_to_moving", str(d / b[0]), str(d / a[0]), str(d / b[1]),
                  str(d / a[1]), labels)]
    return pairs[:n] if n else pairs


def _vxm_lia(root: Path, work: Path, n: int | None, seed: int) -> list[Pair]:
    import nibabel as nib
    import numpy as np

    d = root / "vxm-brain-t1-aseg" / "nifti"
    conv = work / "inputs" / "vxm-lia"
    conv.mkdir(parents=True, exist_ok=True)
    # LIA in RAS terms: index x → -R (left), y → -S (inferior), z → +A (anterior)
    lia = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1.0]])
    for name in ("fixed.nii.gz", "fixed_labels.nii.gz", "moving.nii.gz", "moving_labels.nii.gz"):
        dst = conv / name
        if not dst.exists():
            img = nib.load(str(d / name))
            affine = lia.copy()
            affine[:3, 3] = img.affine[:3, 3]
            out = nib.Nifti1Image(np.asarray(img.dataobj), affine, img.header)
            out.set_qform(affine, code=1)
            out.set_sform(affine, code=1)
            nib.save(out, str(dst))
    pairs = _vxm(root, work, n, seed)
    for p in pairs:
        p.dataset = "vxm-lia"
        for attr in ("fixed", "moving", "fixed_labels", "moving_labels"):
            setattr(p, attr, str(conv / Path(getattr(p, attr)).name))
    return pairs


VXM2D_LEVELS = (70, 80, 90, 100, 110)  # index along the inferior axis of the conformed volume


def _vxm2d(root: Path, work: Path, n: int | None, seed: int) -> list[Pair]:
    import nibabel as nib
    import numpy as np

    d = root / "vxm-brain-t1-aseg" / "nifti"
    conv = work / "inputs" / "vxm2d"
    conv.mkdir(parents=True, exist_ok=True)
    labels = _read_label_list(d / "eval_labels.txt")
    pairs = []
    for k in VXM2D_LEVELS:
        files = {}
        for name in ("fixed", "fixed_labels", "moving", "moving_labels"):
            dst = conv / f"{name}_y{k}.nii.gz"
            if not dst.exists():
                arr = np.asarray(nib.load(str(d / f"{name}.nii.gz")).dataobj)  # (x=L, y=I, z=A)
                sl = np.ascontiguousarray(arr[:, k, :])  # (x=L, A): NIfTI axis 0 = columns
                # LPS index x → +L, y → -P (anterior): in RAS terms x → -R, y → +A
                aff = np.diag([-1.0, 1.0, 1.0, 1.0])
                nib.save(nib.Nifti1Image(sl, aff), str(dst))
            files[name] = str(dst)
        for f, m in (("fixed", "moving"), ("moving", "fixed")):
            pairs.append(Pair("vxm2d", f"y{k}_{m}_to_{f}", files[f], files[m], files[f"{f}_labels"],
                              files[f"{m}_labels"], labels))
    return pairs[:n] if n else pairs


def _freesurfer(root: Path, work: Path, n: int | None, seed: int) -> list[Pair]:
    d = root / "freesurfer-brains"
    subs = sorted(p.name for p in d.glob("sub-*") if (p / "mri" / "brainmask.mgz").exists())
    labels = _read_label_list(root / "vxm-brain-t1-aseg" / "nifti" / "eval_labels.txt")
    conv = work / "inputs" / "freesurfer-brains"
    files = {}
    for s in subs:
        files[s] = (_mgz_to_nifti(d / s / "mri" / "brainmask.mgz", conv / f"{s}_brainmask.nii.gz",
                                  label=False),
                    _mgz_to_nifti(d / s / "mri" / "aseg.mgz", conv / f"{s}_aseg.nii.gz",
                                  label=True))
    ordered = list(itertools.permutations(subs, 2))  # (fixed, moving)
    if n and n < len(ordered):
        # a seeded subset; --pairs 4 with the default seed gives 4 pairs of distinct order
        ordered = random.Random(seed).sample(ordered, n)
    return [Pair("freesurfer", f"{m}_to_{f}", files[f][0], files[m][0], files[f][1], files[m][1],
                 labels) for f, m in ordered]


def _hippocampus(root: Path, work: Path, n: int | None, seed: int) -> list[Pair]:
    d = root / "msd-hippocampus"
    cases = sorted(p.name for p in (d / "images").glob("hippocampus_*.nii.gz")
                   if (d / "labels" / p.name).exists())
    rng = random.Random(seed)
    n = n or 20
    all_pairs = list(itertools.permutations(range(len(cases)), 2))
    chosen = rng.sample(all_pairs, n)
    out = []
    for fi, mi in chosen:
        f, m = cases[fi], cases[mi]
        tag = f"{m.split('_')[1].split('.')[0]}_to_{f.split('_')[1].split('.')[0]}"
        out.append(Pair("hippocampus", tag, str(d / "images" / f), str(d / "images" / m),
                        str(d / "labels" / f), str(d / "labels" / m), [1, 2]))
    return out


def _colin_mni(root: Path, work: Path, n: int | None, seed: int) -> list[Pair]:
    d = root / "antspy-brain-data" / "nifti" / "colin27_to_mni152"
    labels = _read_label_list(d / "eval_labels.txt")
    return [Pair("colin-mni", "colin27_to_mni152", str(d / "fixed.nii.gz"),
                 str(d / "moving.nii.gz"), str(d / "fixed_labels.nii.gz"),
                 str(d / "moving_labels.nii.gz"), labels)]


def _lung(root: Path, work: Path, n: int | None, seed: int) -> list[Pair]:
    d = root / "elastix-lung-ct-masks-landmarks"
    fm, mm = str(d / "3DCT_lung_baseline_mask.mha"), str(d / "3DCT_lung_followup_mask.mha")
    lm = {
        "corrected51": (str(d / "itkelastix_CT_3D_lung_fixed_point_set_corrected.txt"),
                        str(d / "itkelastix_CT_3D_lung_moving_point_set_corrected.txt")),
        "all100": (str(d / "itkelastix_CT_3D_lung_fixed_point_set.txt"),
                   str(d / "itkelastix_CT_3D_lung_moving_point_set.txt")),
    }
    # the masks are both the images and the labels (shape-driven registration)
    return [Pair("lung", "baseline_to_followup_masks", fm, mm, fm, mm, [1], lm)]


def _head2d(root: Path, work: Path, n: int | None, seed: int) -> list[Pair]:
    d = root / "itkelastix-2d-brain-mri-pair"
    fmask, mmask = str(d / "CT_2D_head_fixed_mask.mha"), str(d / "CT_2D_head_moving_mask.mha")
    return [Pair("head2d", "t1_fixed_pd_moving", str(d / "CT_2D_head_fixed.mha"),
                 str(d / "CT_2D_head_moving.mha"), fmask, mmask, [1],
                 fixed_mask=fmask, moving_mask=mmask)]


_BUILDERS = {"vxm": _vxm, "vxm-lia": _vxm_lia, "vxm2d": _vxm2d, "freesurfer": _freesurfer, "hippocampus": _hippocampus,
             "colin-mni": _colin_mni, "lung": _lung, "head2d": _head2d}


def build_pairs(dataset: str, root: Path, work: Path, n: int | None = None, seed: int = 0
                ) -> list[Pair]:
    """The pairs of ``dataset`` (``n`` of them at most; ``None``: the dataset's default)."""
    if dataset not in _BUILDERS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    if n is None:
        n = DEFAULT_PAIRS.get(dataset)
    return _BUILDERS[dataset](Path(root), Path(work), n, seed)
