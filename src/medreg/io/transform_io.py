"""Reading and writing transforms: ITK/ANTs files, NIfTI displacement fields, Learn2Reg fields.

Formats (by file name ending):

* ``.tfm``, ``.txt``: ITK text transform files (linear transforms only).
* ``.mat``: ITK/ANTs MATLAB-format linear transform (what ``antsRegistration`` writes).
* ``.h5``, ``.hdf5``: ITK HDF5 transform, any transform; medreg writes a ``CompositeTransform``
  (ITK order: the last listed is applied first), as ANTs' ``*Composite.h5``.
* ``.nii``, ``.nii.gz``, ``.mha``, ``.nrrd``: displacement field in ITK's convention — a vector
  image on the field's grid whose vectors are LPS mm, ``T(x) = x + u(x)`` (fixed → moving), as
  written by ANTs and read by ``antsApplyTransforms`` and ``SimpleITK.DisplacementFieldTransform``.

ITK's transforms map fixed-space points to moving-space points, as medreg's do, so nothing is
inverted on the way in or out. SimpleITK does the file work; this module converts.

Learn2Reg displacements (:func:`read_l2r_displacement`, :func:`write_l2r_displacement`) are
voxel offsets on the fixed grid in array-axis order ``(i, j, k)`` (scipy's ``map_coordinates``):
``moving_index = fixed_index + d``; stored as ``(X, Y, Z, 3)`` NIfTI arrays (or ``.npz``/``.npy``).
"""

from __future__ import annotations

import os
from pathlib import Path
import numpy as np
import SimpleITK as sitk
import torch

from medreg.core.errors import GeometryError, InputError
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.io.images import _reason, grid_from_sitk, nifti_affine_from_grid, set_sitk_geometry, write_image
from medreg.io.paths import check_output_path, file_suffix, quiet_c_stderr
from medreg.transforms import (AffineTransform, BSplineTransform, Compose, DisplacementField,
                               LinearTransform, SpatialTransform, StationaryVelocityField,
                               collapse_linear)

__all__ = [
    "from_sitk",
    "l2r_from_transform",
    "read_displacement",
    "read_l2r_displacement",
    "read_transform",
    "to_sitk",
    "transform_from_l2r",
    "write_displacement",
    "write_l2r_displacement",
    "write_transform",
]

LINEAR_SUFFIXES = (".tfm", ".txt", ".mat")
H5_SUFFIXES = (".h5", ".hdf5")
FIELD_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")


# ------------------------------------------------------------------ medreg -> SimpleITK
def _field_to_sitk_image(field: torch.Tensor, grid: Grid) -> sitk.Image:
    """``(1, D, *shape)`` world-mm field → float64 vector image with ``grid``'s geometry."""
    if field.shape[0] != 1:
        raise InputError("only a single (unbatched) displacement field can be exported")
    # (z, y, x, D), converted and laid out in one copy
    arr = field.detach()[0].movedim(0, -1).to("cpu", torch.float64,
                                               memory_format=torch.contiguous_format).numpy()
    img = sitk.GetImageFromArray(arr, isVector=True)
    return set_sitk_geometry(img, grid)


def _linear_to_sitk(t: LinearTransform) -> sitk.Transform:
    m = t.matrix().detach().cpu().double()
    d = t.ndim
    out = sitk.AffineTransform(d)
    c = t.center.detach().cpu().double()
    a = m[:d, :d]
    out.SetMatrix(a.reshape(-1).tolist())
    out.SetCenter(c.tolist())
    # offset = c + t - A c  =>  t = offset - c + A c
    out.SetTranslation((m[:d, d] - c + a @ c).tolist())
    return out


def to_sitk(transform: SpatialTransform, grid: Grid | None = None) -> sitk.Transform:
    """The equivalent SimpleITK transform (same fixed → moving map).

    Linear transforms become ``AffineTransform``; B-splines ``BSplineTransform`` (exact);
    displacement fields and SVFs ``DisplacementFieldTransform`` on their own grid; a
    :class:`Compose` a ``CompositeTransform`` in the same order. Other transforms are sampled as
    a displacement field on ``grid``.
    """
    if isinstance(transform, Compose):
        return sitk.CompositeTransform([to_sitk(t, grid) for t in transform.transforms])
    if isinstance(transform, LinearTransform):
        return _linear_to_sitk(transform)
    if isinstance(transform, BSplineTransform):
        ctrl = transform.control
        coeff = transform.coefficients.detach().cpu().double()[0]
        images = [set_sitk_geometry(sitk.GetImageFromArray(coeff[i].numpy()), ctrl)
                  for i in range(transform.ndim)]
        return sitk.BSplineTransform(images, 3)
    if isinstance(transform, DisplacementField):
        field, fgrid = transform.field, transform.grid
    elif isinstance(transform, StationaryVelocityField):
        field, fgrid = transform.field(), transform.grid
    else:
        if grid is None:
            raise InputError(f"{type(transform).__name__} needs a grid to be exported as a field")
        field, fgrid = transform.displacement(grid), grid
    return sitk.DisplacementFieldTransform(_field_to_sitk_image(field, fgrid))


# ------------------------------------------------------------------ SimpleITK -> medreg
def _linear_from_sitk(tx: sitk.Transform, dtype: torch.dtype) -> AffineTransform:
    d = tx.GetDimension()
    origin = np.zeros(d)
    t0 = np.asarray(tx.TransformPoint(tuple(origin)))
    cols = [np.asarray(tx.TransformPoint(tuple(np.eye(d)[j]))) - t0 for j in range(d)]
    m = np.eye(d + 1)
    m[:d, :d] = np.stack(cols, axis=1)
    m[:d, d] = t0
    fixed = np.asarray(tx.GetFixedParameters(), dtype=np.float64)
    center = fixed if fixed.size == d else None
    return AffineTransform.from_matrix(torch.from_numpy(m), center=center, trainable=False,
                                       dtype=dtype)


def from_sitk(tx: sitk.Transform, dtype: torch.dtype = torch.float32) -> SpatialTransform:
    """The medreg transform equal to a SimpleITK transform (any linear, B-spline of order 3,
    displacement field, or a composite of these)."""
    tx = tx.Downcast() if hasattr(tx, "Downcast") else tx
    name = tx.GetName()
    d = tx.GetDimension()
    if d not in (2, 3):
        raise InputError(f"only 2D and 3D transforms are supported, got {d}D ({name})")
    if name == "CompositeTransform":
        parts = [from_sitk(tx.GetNthTransform(i), dtype) for i in range(tx.GetNumberOfTransforms())]
        if not parts:
            raise InputError("the composite transform is empty")
        return parts[0] if len(parts) == 1 else Compose(*parts)
    if name == "DisplacementFieldTransform":
        img = tx.GetDisplacementField()
        return _field_from_sitk_image(img, dtype, "displacement field transform")
    if name == "BSplineTransform":
        if tx.GetOrder() != 3:
            raise InputError(f"only cubic B-spline transforms are supported (order {tx.GetOrder()})")
        images = tx.GetCoefficientImages()
        ctrl = grid_from_sitk(images[0], "B-spline coefficient grid")
        coeff = np.stack([sitk.GetArrayFromImage(im) for im in images])[None]
        return BSplineTransform(ctrl, torch.from_numpy(coeff).to(dtype), trainable=False, dtype=dtype)
    if tx.IsLinear():
        return _linear_from_sitk(tx, dtype)
    raise InputError(f"ITK transform type {name} is not supported; supported: linear "
                     "(affine, rigid, similarity, translation, ...), BSplineTransform, "
                     "DisplacementFieldTransform and composites of them")


def _field_from_sitk_image(img: sitk.Image, dtype: torch.dtype, name: str) -> DisplacementField:
    d = img.GetDimension()
    if img.GetNumberOfComponentsPerPixel() != d:
        raise InputError(f"{name}: a {d}D displacement field needs {d} components per voxel, "
                         f"found {img.GetNumberOfComponentsPerPixel()}")
    grid = grid_from_sitk(img, name)
    arr = sitk.GetArrayFromImage(img).astype(np.float64)  # (z, y, x, D)
    field = torch.from_numpy(np.moveaxis(arr, -1, 0)[None].copy()).to(dtype)
    if not torch.isfinite(field).all():
        raise InputError(f"{name}: the displacement field contains NaN or infinite values")
    return DisplacementField(field, grid)


# ------------------------------------------------------------------ files
def _collapse_for_linear_file(transform: SpatialTransform, path: Path) -> LinearTransform:
    parts = transform.transforms if isinstance(transform, Compose) else [transform]
    if not all(isinstance(t, LinearTransform) for t in parts):
        raise InputError(f"{path}: {file_suffix(path)} files hold linear transforms only; this transform "
                         "is not linear: write it as .h5 or as a displacement field .nii.gz")
    return parts[0] if len(parts) == 1 else collapse_linear(parts)


def write_transform(transform: SpatialTransform, path: str | os.PathLike, *,
                    grid: Grid | None = None, overwrite: bool = True) -> None:
    """Write ``transform`` in the format given by the file name ending (see module docstring).

    Args:
        grid: needed only for transforms without their own grid written as a displacement field.
        overwrite: replace an existing file (otherwise :class:`InputError`).
    """
    p = Path(path)
    if not isinstance(transform, SpatialTransform):
        raise InputError(f"{p}: write_transform takes a medreg transform, got "
                         f"{type(transform).__name__}; for a homogeneous matrix use "
                         "AffineTransform.from_matrix(matrix)")
    suffix = file_suffix(p)
    check_output_path(p, overwrite)
    if suffix in LINEAR_SUFFIXES:
        tx = to_sitk(_collapse_for_linear_file(transform, p))
    elif suffix in H5_SUFFIXES:
        inner = to_sitk(transform, grid)
        tx = inner if inner.GetName() == "CompositeTransform" else sitk.CompositeTransform([inner])
    elif suffix in FIELD_SUFFIXES:
        write_displacement(transform, p, grid=grid, overwrite=overwrite)
        return
    else:
        raise InputError(f"{p}: unknown transform file type {suffix!r}; use .tfm, .txt, .mat, .h5 "
                         "or a displacement field .nii.gz/.nii/.mha/.nrrd")
    sitk.WriteTransform(tx, str(p))


def read_transform(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> SpatialTransform:
    """Read an ITK/ANTs transform file or a displacement-field image (see module docstring)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: transform file not found")
    if p.is_dir():
        raise InputError(f"{p}: is a folder; give a transform file")
    suffix = file_suffix(p)
    if suffix in FIELD_SUFFIXES:
        return read_displacement(p, dtype)
    _refuse_foreign_transform(p, suffix)
    try:
        with quiet_c_stderr(suffix in H5_SUFFIXES):  # HDF5 prints its error stack itself
            tx = sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        raise InputError(f"{p}: cannot read as an ITK transform ({_itk_reason(exc)}); expected "
                         ".tfm, .txt, .mat, .h5 or a displacement field image") from None
    return from_sitk(tx, dtype)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _refuse_foreign_transform(p: Path, suffix: str) -> None:
    """Clear errors for files ITK would misread or report cryptically: a corrupt/empty HDF5,
    an elastix parameter file, a plain 4×4 matrix (FSL FLIRT and the like)."""
    with open(p, "rb") as fh:
        head = fh.read(4096)
        if suffix in H5_SUFFIXES:
            # the HDF5 signature sits at 0 or after a user block of 512, 1024, 2048, ... bytes
            size = p.stat().st_size
            for off in [0] + [512 << k for k in range(20) if (512 << k) < size]:
                fh.seek(off)
                if fh.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                    return
            raise InputError(f"{p}: not an HDF5 file ({'empty' if not head else 'corrupt or another format'}); "
                             "an ITK .h5 transform starts with the HDF5 signature")
    if b"(Transform " in head or b"(TransformParameters " in head:
        raise InputError(f"{p}: an elastix parameter file is not supported; export the transform "
                         "with transformix (-def all) as a displacement field and give that")
    try:
        rows = [[float(v) for v in line.split()] for line in head.decode().splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError):
        return
    if len(rows) in (3, 4) and all(len(r) == len(rows) for r in rows):
        raise InputError(f"{p}: a plain {len(rows)}×{len(rows)} matrix (e.g. FSL FLIRT) is not "
                         "supported: its coordinate convention is not in the file; convert it to "
                         "ITK (e.g. c3d_affine_tool -ref F -src M FILE -fsl2ras -oitk out.txt)")


def _itk_reason(exc: BaseException) -> str:
    """The first line of ITK's error text after ``ITK ERROR: Class(0x...):`` (else
    :func:`medreg.io.images._reason`'s last line)."""
    for line in str(exc).splitlines():
        if "ITK ERROR:" in line:
            text = line.split("ITK ERROR:", 1)[1].strip()
            return text.split("): ", 1)[1] if "): " in text else text
    return _reason(exc)


def read_displacement(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> DisplacementField:
    """Read a displacement field image in ITK's convention (LPS mm vectors, fixed → moving)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: displacement field not found")
    try:
        img = sitk.ReadImage(str(p))
    except RuntimeError:
        raise InputError(f"{p}: cannot read the displacement field image") from None
    if img.GetNumberOfComponentsPerPixel() == 1 and img.GetDimension() == 4:
        raise InputError(f"{p}: 4D scalar image; a displacement field must be a vector image "
                         "(NIfTI intent vector, 5D with one time point)")
    return _field_from_sitk_image(img, dtype, str(p))


def write_displacement(transform: SpatialTransform, path: str | os.PathLike, *,
                       grid: Grid | None = None, overwrite: bool = True,
                       meta: dict | None = None) -> None:
    """Write the dense displacement of ``transform`` (float32 LPS mm vectors, ITK convention).

    Args:
        grid: where to sample; default the transform's own grid (fields, SVFs).
        meta: :attr:`Image.meta` of the image whose grid it is (a NIfTI keeps its space codes).
    """
    p = Path(path)
    check_output_path(p, overwrite)
    if grid is None:
        grid = getattr(transform, "grid", None)
        if grid is None:
            raise InputError(f"{p}: a reference grid is needed to write this transform as a field")
    with torch.no_grad():
        field = transform.displacement(grid)
    if file_suffix(p) in (".nii", ".nii.gz"):
        # the vector NIfTI SimpleITK would write (intent vector, (X, Y, Z, 1, D), LPS mm
        # components), written by nibabel with the compression on all threads
        write_image(Image(field[0].detach().to("cpu", torch.float32), grid, meta=dict(meta or {})), p)
        return
    img = sitk.Cast(_field_to_sitk_image(field, grid), sitk.sitkVectorFloat32)
    sitk.WriteImage(img, str(p))


# ------------------------------------------------------------------ Learn2Reg
def l2r_from_transform(transform: SpatialTransform, fixed: Grid, moving: Grid | None = None) -> np.ndarray:
    """Learn2Reg displacement of ``transform``: ``(X, Y, Z, D)`` voxel offsets on ``fixed``.

    ``d[i, j, k] = index_moving(T(x_fixed(i, j, k))) − (i, j, k)`` (array-axis order, as
    ``scipy.ndimage.map_coordinates`` samples the moving array). ``moving`` defaults to ``fixed``
    (Learn2Reg pairs share one grid).
    """
    moving = fixed if moving is None else moving
    with torch.no_grad():
        mapped = transform.mapped_points(fixed, torch.float64)[0]  # (*shape, D) world
        idx_m = moving.transform_points(mapped.double(), "world", "index")
    d = idx_m - fixed.points("index", dtype=torch.float64, device=idx_m.device)
    spatial = list(range(fixed.ndim))
    return d.permute(*reversed(spatial), fixed.ndim).cpu().numpy()


def transform_from_l2r(disp: np.ndarray | torch.Tensor, fixed: Grid, moving: Grid | None = None,
                       dtype: torch.dtype = torch.float64) -> DisplacementField:
    """World-mm :class:`DisplacementField` on ``fixed`` from a Learn2Reg ``(X, Y, Z, D)`` array."""
    moving = fixed if moving is None else moving
    arr = torch.as_tensor(np.asarray(disp), dtype=torch.float64)
    expected = (*fixed.size, fixed.ndim)
    if tuple(arr.shape) != expected:
        raise GeometryError(f"Learn2Reg displacement has shape {tuple(arr.shape)}; the fixed grid "
                            f"needs {expected} (X, Y, Z, components)")
    spatial = list(range(fixed.ndim))
    d = arr.permute(*reversed(spatial), fixed.ndim)  # (z, y, x, D)
    idx = fixed.points("index", dtype=torch.float64) + d
    world_m = moving.transform_points(idx, "index", "world")
    u = world_m - fixed.points("world", dtype=torch.float64)
    return DisplacementField(u.movedim(-1, 0)[None].to(dtype), fixed)


def read_l2r_displacement(path: str | os.PathLike, fixed: Grid, moving: Grid | None = None,
                          dtype: torch.dtype = torch.float32) -> DisplacementField:
    """Read a Learn2Reg displacement (``.nii.gz``/``.nii`` via nibabel, ``.npz``/``.npy``)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: Learn2Reg displacement not found")
    suffix = file_suffix(p)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        arr = np.asanyarray(nib.load(str(p)).dataobj).astype(np.float64)
    elif suffix == ".npz":
        with np.load(p) as z:
            arr = z[z.files[0]].astype(np.float64)
    elif suffix == ".npy":
        arr = np.load(p).astype(np.float64)
    else:
        raise InputError(f"{p}: Learn2Reg displacements are .nii.gz, .nii, .npz or .npy")
    # Learn2Reg submissions sometimes store (3, X, Y, Z); accept it explicitly
    if arr.ndim == fixed.ndim + 1 and arr.shape[0] == fixed.ndim and arr.shape[-1] != fixed.ndim:
        arr = np.moveaxis(arr, 0, -1)
    try:
        return transform_from_l2r(arr, fixed, moving, dtype)
    except GeometryError as exc:
        raise GeometryError(f"{p}: {exc}") from None


def write_l2r_displacement(transform: SpatialTransform, path: str | os.PathLike, fixed: Grid,
                           moving: Grid | None = None, *, overwrite: bool = True) -> None:
    """Write a Learn2Reg displacement (``.nii.gz`` with the fixed grid's affine, or ``.npz``)."""
    p = Path(path)
    check_output_path(p, overwrite)
    arr = l2r_from_transform(transform, fixed, moving).astype(np.float32)
    suffix = file_suffix(p)
    if suffix in (".nii", ".nii.gz"):
        import nibabel as nib

        img = nib.Nifti1Image(arr, nifti_affine_from_grid(fixed))
        nib.save(img, str(p))
    elif suffix == ".npz":
        np.savez_compressed(p, disp=arr)
    else:
        raise InputError(f"{p}: Learn2Reg displacements are written as .nii.gz, .nii or .npz")
