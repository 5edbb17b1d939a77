r"""Reading and writing images: NIfTI/MGH through nibabel, ITK formats and DICOM through SimpleITK.

Everything returned follows medreg's conventions (see :mod:`medreg.core`):

* the :class:`~medreg.core.grid.Grid` is in **LPS millimetres** with ``size``, ``spacing`` and
  ``origin`` in ITK order ``(x, y, z)``;
* the voxel tensor is ``(C, z, y, x)`` (``(C, y, x)`` in 2D), channels first.

NIfTI's RAS world frame is converted here and nowhere else:
``world_lps = diag(-1, -1, 1) @ world_ras``.

Which NIfTI header transform is used (nibabel's ``get_best_affine`` semantics):

1. the **sform** when ``sform_code > 0``;
2. else the **qform** when ``qform_code > 0``;
3. else (no orientation at all, NIfTI "method 1") what ITK does: spacing ``pixdim``, origin 0,
   identity direction in LPS; a warning says so.

ITK 5.4 (SimpleITK, ANTs) uses the qform when the sform's code is not 1 (scanner): for files
whose sform and qform disagree the two libraries then differ, and :func:`read_image` warns.
Spatial units ``meter`` and ``micron`` are converted to mm, as ITK does.

Dimensions:

* a NIfTI whose header says ``dim[0] == 2`` is 2D; a 3D volume of shape ``(X, Y, 1)`` stays 3D;
* 4D ``(X, Y, Z, T)`` with ``T == 1`` is 3D; ``T > 1`` volumes become channels only with
  ``allow_channels=True``;
* 5D ``(X, Y, Z, 1, C)`` (ITK's vector images, e.g. displacement fields) has ``C`` channels, and is
  2D when ``Z == 1``, exactly as ITK reads it;
* ITK multi-component pixels (vector/RGB images) and SimpleITK 4D images become channels only with
  ``allow_channels=True``.

Data types: integer data stays integer (label maps); NIfTI ``scl_slope``/``scl_inter`` scaling
turns it into float32. Types torch lacks or handles poorly are widened: ``uint16 → int32``,
``uint32/uint64 → int64``, ``bool → uint8``, ``float16 → float32``, ``longdouble → float64``; a
``uint16`` image is written back as ``uint16`` while its values fit (:attr:`Image.meta`).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from nibabel.filebasedimages import ImageFileError

from medreg.core.errors import GeometryError, InputError
from medreg.core.enums import Frame
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.io._gzip import ParallelGzipWriter
from medreg.io.paths import check_output_path, file_suffix, quiet_c_stderr

__all__ = [
    "read_image",
    "read_reference",
    "output_meta",
    "write_image",
    "image_info",
    "grid_from_sitk",
    "set_sitk_geometry",
    "grid_from_nifti_affine",
    "nifti_affine_from_grid",
    "NIBABEL_SUFFIXES",
]

#: File name endings read and written with nibabel (everything else goes to SimpleITK).
NIBABEL_SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh")

#: diag(-1, -1, 1, 1): converts homogeneous RAS coordinates to LPS and back (its own inverse).
_RAS_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: NIfTI spatial units → factor to mm (ITK converts the same ones).
_UNIT_TO_MM = {"meter": 1000.0, "micron": 1e-3}

#: Largest distance (mm, or direction-cosine difference) at which sform and qform "agree".
_FORM_TOLERANCE = 1e-3

#: numpy dtypes torch lacks or handles poorly → the smallest type that holds every value.
_WIDEN = {
    np.dtype(np.bool_): np.dtype(np.uint8),
    np.dtype(np.uint16): np.dtype(np.int32),
    np.dtype(np.uint32): np.dtype(np.int64),
    np.dtype(np.uint64): np.dtype(np.int64),
    np.dtype(np.float16): np.dtype(np.float32),
    np.dtype(np.longdouble): np.dtype(np.float64),
}

_SUPPORTED = (".nii, .nii.gz, .mgz, .mgh (nibabel); .mha, .mhd, .nrrd, .nhdr and other ITK "
              "formats, DICOM files or series folders (SimpleITK)")


# ---------------------------------------------------------------------------------- geometry
def grid_from_nifti_affine(affine: np.ndarray, size: tuple[int, ...] | list[int],
                           name: str = "<nifti>") -> Grid:
    """Grid from a NIfTI voxel-to-world matrix (RAS mm).

    Args:
        affine: ``4×4`` matrix mapping voxel index ``(i, j, k, 1)`` to RAS mm (an sform, qform or
            nibabel ``img.affine``).
        size: voxels per axis ``(x, y)`` or ``(x, y, z)``; a 2D grid uses the first two columns
            (the in-plane axes) of ``affine``.
        name: file name used in error messages.

    Returns:
        The grid in LPS mm; spacing is the norm of each column, direction the normalised columns.

    Raises:
        GeometryError: for a singular, sheared or (2D) out-of-plane affine.
    """
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise GeometryError(f"{name}: the voxel-to-world matrix must be a finite 4x4 matrix")
    ndim = len(size)
    lps = _RAS_LPS @ aff
    cols = lps[:3, :ndim]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 0):
        raise GeometryError(f"{name}: the voxel-to-world matrix is singular (an axis has zero "
                            "length); fix the header (sform/qform) before using the image")
    direction = (cols / spacing)[:ndim, :]
    try:
        return Grid(tuple(size), spacing.tolist(), lps[:ndim, 3].tolist(), direction)
    except GeometryError as exc:
        if ndim == 2 and np.any(np.abs(cols[2]) > 1e-3 * spacing):  # not sheared: out of plane
            raise GeometryError(f"{name}: this 2D slice does not lie in the x-y plane of the world "
                                "(a coronal, sagittal or tilted slice); medreg's 2D images are "
                                "axial: save the slice as a 3D image one voxel thick instead"
                                ) from None
        raise GeometryError(f"{name}: {exc}") from None


def nifti_affine_from_grid(grid: Grid) -> np.ndarray:
    """The NIfTI voxel-to-RAS ``4×4`` matrix of a grid (2D grids get a 1 mm, axial third axis).

    Inverse of :func:`grid_from_nifti_affine`.
    """
    lps = np.eye(4)
    d = grid.ndim
    world_from_index = grid.matrix_np(Frame.INDEX, Frame.WORLD)
    lps[:d, :d] = world_from_index[:d, :d]
    lps[:d, 3] = world_from_index[:d, d]
    return _RAS_LPS @ lps


def grid_from_sitk(img: sitk.Image, name: str = "<sitk image>") -> Grid:
    """Grid of a 2D or 3D SimpleITK image (ITK's geometry is LPS already: copied as is).

    Raises:
        GeometryError: for other dimensions or an invalid direction.
    """
    dim = img.GetDimension()
    if dim not in (2, 3):
        raise GeometryError(f"{name}: a {dim}D image has no 2D/3D grid")
    try:
        return Grid(img.GetSize(), img.GetSpacing(), img.GetOrigin(),
                    np.asarray(img.GetDirection()).reshape(dim, dim))
    except GeometryError as exc:
        raise GeometryError(f"{name}: {exc}") from None


def set_sitk_geometry(img: sitk.Image, grid: Grid) -> sitk.Image:
    """Set spacing, origin and direction of ``img`` from ``grid`` (in place); returns ``img``.

    Raises:
        GeometryError: if the image's size differs from the grid's.
    """
    if tuple(img.GetSize()) != grid.size:
        raise GeometryError(f"SimpleITK image of size {img.GetSize()} does not match {grid}")
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(tuple(float(v) for v in grid.direction.ravel()))
    return img


# ---------------------------------------------------------------------------------- helpers
def _reason(exc: BaseException) -> str:
    """Last meaningful line of a library error (SimpleITK's messages span several lines)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[-1] if lines else type(exc).__name__
    for prefix in ("sitk::ERROR:", "ITK ERROR:"):
        text = text.replace(prefix, "").strip()
    return text


def _channels_error(name: str, count: int, what: str) -> InputError:
    return InputError(
        f"{name}: {what} ({count} of them); medreg takes single 2D/3D images: split the "
        "file into single volumes (e.g. fslsplit, or SimpleITK) and give one (from Python, "
        "read_image(..., allow_channels=True) reads them as channels)"
    )


def _torch_ready(arr: np.ndarray, name: str) -> np.ndarray:
    """Native byte order and a dtype torch holds, without losing values."""
    if np.iscomplexobj(arr):
        raise InputError(f"{name}: complex-valued data is not supported; save the magnitude "
                         "(or real/imaginary parts as separate images) instead")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name}: voxel type {arr.dtype} is not a number type")
    native = arr.dtype.newbyteorder("=")
    target = _WIDEN.get(native, native)
    if native == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise InputError(f"{name}: uint64 values above 2**63-1 do not fit any torch type")
    return np.ascontiguousarray(arr, dtype=target)


def _check_integral(data: torch.Tensor, name: str, why: str) -> None:
    """Raise unless every value of a float tensor is a (finite) integer."""
    bad = int((data != torch.round(data)).sum()) + int((~torch.isfinite(data)).sum())
    if bad:
        raise InputError(f"{name}: {why}, but {bad} of {data.numel()} voxels are not whole "
                         "numbers; is this really a label map?")


def _label_dtype(data: torch.Tensor) -> torch.dtype:
    """int32 when every value fits, else int64."""
    info = torch.iinfo(torch.int32)
    if data.numel() == 0 or (data.min() >= info.min and data.max() <= info.max):
        return torch.int32
    return torch.int64


def _finish(arr: np.ndarray, grid: Grid, name: str, *, dtype: torch.dtype | None, label: bool,
            allow_nan: bool) -> Image:
    """``(C, *grid.shape)`` numpy voxels → Image, with the checks shared by every format."""
    data = torch.from_numpy(_torch_ready(arr, name))
    if data.is_floating_point():
        nonfinite = int((~torch.isfinite(data)).sum())
        if nonfinite and not allow_nan:
            raise InputError(f"{name}: {nonfinite} of {data.numel()} voxels are NaN or infinite; "
                             "fix the image (e.g. set them to 0; from Python, "
                             "read_image(..., allow_nan=True) keeps them)")
    if label:
        if data.is_floating_point():
            _check_integral(data, name, "read as a label map or mask")
            data = data.to(_label_dtype(data))
        if dtype is not None and (dtype.is_floating_point or dtype.is_complex):
            raise InputError(f"{name}: label=True contradicts dtype={dtype}")
    if dtype is not None and dtype != data.dtype:
        if data.is_floating_point() and not (dtype.is_floating_point or dtype.is_complex):
            _check_integral(data, name, f"dtype={dtype} asks for integers")
        data = data.to(dtype)
    return Image(data, grid, name)


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied")


# ---------------------------------------------------------------------------------- nibabel
def _nifti_affine(img: Any, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The RAS voxel-to-world matrix of a nibabel image, in mm (see the module docstring), and
    what a NIfTI writer keeps of the header (:attr:`Image.meta`): the space codes. A qform whose
    matrix is not the sform's (SPM: aligned sform, scanner qform) keeps no code of its own:
    outputs carry the sform's matrix in both forms, in the sform's space."""
    hdr = img.header
    if not hasattr(hdr, "get_sform"):  # MGH and other nibabel formats: one affine, in mm
        return np.asarray(img.affine, dtype=np.float64), {}
    sform, scode = hdr.get_sform(coded=True)
    qform, qcode = hdr.get_qform(coded=True)
    meta = {"nifti_codes": (int(scode), int(qcode))}
    if scode > 0:
        aff = sform
        if qcode > 0 and not np.allclose(sform, qform, atol=_FORM_TOLERANCE):
            meta["nifti_codes"] = (int(scode), int(scode))
            diff = np.abs(sform - qform).max()
            warnings.warn(f"{name}: sform and qform differ (up to {diff:.3g}); medreg uses the "
                          "sform (as nibabel, FSL); ITK-based tools may use the qform",
                          stacklevel=4)
    elif qcode > 0:
        aff = qform
    else:
        zooms = [float(z) if z > 0 else 1.0 for z in hdr.get_zooms()[:3]]
        zooms += [1.0] * (3 - len(zooms))
        aff = _RAS_LPS @ np.diag(zooms + [1.0])
        warnings.warn(f"{name}: the NIfTI header has no orientation (sform and qform codes 0); "
                      "assuming identity LPS direction and origin 0, as ITK does", stacklevel=4)
    aff = np.array(aff, dtype=np.float64)
    unit = hdr.get_xyzt_units()[0]
    if unit in _UNIT_TO_MM:
        aff[:3, :] *= _UNIT_TO_MM[unit]
    return aff, meta


def _read_nibabel(path: Path, allow_channels: bool) -> tuple[np.ndarray, Grid, dict[str, Any]]:
    name = str(path)
    try:
        img = nib.load(name, mmap=False)  # a memory map would tie the tensor to the file
        shape = tuple(int(s) for s in img.shape)
        affine, meta = _nifti_affine(img, name)
        arr = np.asanyarray(img.dataobj)
        if arr.dtype == np.float64 and img.get_data_dtype() != np.float64:
            # integers with scl_slope/scl_inter come back scaled in float64: float32 holds them
            # (as SimpleITK reads them) at half the memory
            arr = arr.astype(np.float32)
    except (InputError, MemoryError):
        raise
    except Exception as exc:  # nibabel raises many types for damaged or foreign files
        raise InputError(f"{name}: cannot read the image ({_reason(exc)}); is it a valid "
                         f"{file_suffix(path)} file? Supported: {_SUPPORTED}") from None
    what = "vector components"
    if arr.dtype.names:  # RGB(A) NIfTI: structured voxels → ITK's vector layout (X, Y, Z, 1, C)
        if len(shape) > 3:
            raise InputError(f"{name}: {len(shape)}D RGB data is not supported")
        arr = np.stack([arr[f] for f in arr.dtype.names], axis=-1)
        arr = arr.reshape(shape + (1,) * (3 - len(shape)) + (1, arr.shape[-1]))
        shape, what = arr.shape, "RGB components"

    if len(shape) < 2:
        raise InputError(f"{name}: {len(shape)}D data; medreg needs 2D or 3D images")
    if len(shape) in (2, 3):  # dim[0] == 2 is 2D; (X, Y, 1) stays 3D
        arr = arr[..., None]
        spatial = len(shape)
    elif len(shape) == 4:  # (X, Y, Z, T)
        if shape[3] > 1 and not allow_channels:
            raise _channels_error(name, shape[3], "the file is 4D with several volumes")
        spatial = 3
    elif len(shape) == 5:  # (X, Y, Z, T, C): ITK's vector images
        if shape[3] != 1:
            raise InputError(f"{name}: 5D data with {shape[3]} time points of {shape[4]}-vectors "
                             "is not supported; split the time series first")
        if shape[4] > 1 and not allow_channels:
            raise _channels_error(name, shape[4], f"the voxels have several {what}")
        spatial = 2 if shape[2] == 1 else 3
        arr = arr.reshape(shape[:spatial] + (shape[4],))
    else:
        raise InputError(f"{name}: {len(shape)}D data is not supported; medreg needs 2D or 3D")
    grid = grid_from_nifti_affine(affine, arr.shape[:spatial], name)
    # (x, y[, z], C) → (C, [z,] y, x)
    if spatial == 2:  # the slice's place along the third axis, which a 2D grid does not hold
        meta["nifti_affine"] = affine
    return np.transpose(arr, tuple(range(spatial, -1, -1))), grid, meta


# ---------------------------------------------------------------------------------- SimpleITK
def _read_sitk_image(path: Path, series_id: str | None) -> sitk.Image:
    name = str(path)
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            with quiet_c_stderr():  # ITK warns "No Series were found" on its own
                ids = reader.GetGDCMSeriesIDs(name)
            if not ids:
                raise InputError(f"{name}: a folder, but no DICOM series was found in it; give "
                                 "an image file or a folder of DICOM slices")
            if series_id is None:
                if len(ids) > 1:
                    raise InputError(f"{name}: the folder holds {len(ids)} DICOM series "
                                     f"({', '.join(ids)}); put each series in its own folder (`medreg info "
                                     "FOLDER --series UID` shows one; from Python: read_image(..., "
                                     "series_id=UID))")
                series_id = ids[0]
            elif series_id not in ids:
                raise InputError(f"{name}: no DICOM series {series_id!r}; the folder holds "
                                 f"{', '.join(ids)}")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(name, series_id))
            return reader.Execute()
        return sitk.ReadImage(name)
    except RuntimeError as exc:
        raise InputError(f"{name}: cannot read the image ({_reason(exc)}); supported: "
                         f"{_SUPPORTED}") from None


def _read_sitk(path: Path, allow_channels: bool, series_id: str | None
               ) -> tuple[np.ndarray, Grid]:
    name = str(path)
    img = _read_sitk_image(path, series_id)
    dim = img.GetDimension()
    comps = img.GetNumberOfComponentsPerPixel()
    if comps in (3, 4) and not allow_channels and img.GetPixelID() == sitk.sitkVectorUInt8:
        raise InputError(f"{name}: a colour ({'RGBA' if comps == 4 else 'RGB'}) image; medreg "
                         "registers greyscale images: convert it to greyscale or keep one channel "
                         "(e.g. SimpleITK: sitk.VectorIndexSelectionCast(image, 0))")
    if comps > 1 and not allow_channels:
        raise _channels_error(name, comps, "the voxels have several components")
    arr = sitk.GetArrayViewFromImage(img)  # (z, y, x[, C]) or (t, z, y, x[, C])
    arr = np.moveaxis(arr, -1, 0) if comps > 1 else arr[None]
    if dim == 4:
        size, spacing, origin = img.GetSize(), img.GetSpacing(), img.GetOrigin()
        d4 = np.asarray(img.GetDirection()).reshape(4, 4)
        if np.abs(d4[:3, 3]).max() > 1e-6 or np.abs(d4[3, :3]).max() > 1e-6:
            raise GeometryError(f"{name}: the 4th axis of this 4D image is not separate from "
                                "space; cannot read it as a 3D image")
        if size[3] > 1 and comps > 1:
            raise InputError(f"{name}: 4D images of multi-component voxels are not supported")
        if size[3] > 1 and not allow_channels:
            raise _channels_error(name, size[3], "the file is 4D with several volumes")
        arr = arr.reshape((-1,) + tuple(arr.shape[2:]))  # (t, z, y, x)
        try:
            grid = Grid(size[:3], spacing[:3], origin[:3], d4[:3, :3])
        except GeometryError as exc:
            raise GeometryError(f"{name}: {exc}") from None
    elif dim in (2, 3):
        grid = grid_from_sitk(img, name)
    else:
        raise InputError(f"{name}: {dim}D data; medreg needs 2D or 3D images")
    return np.array(arr), grid  # own the memory (the view dies with img)


# ---------------------------------------------------------------------------------- public API
def read_image(path: str | os.PathLike, *, dtype: torch.dtype | None = None, label: bool = False,
               allow_channels: bool = False, allow_nan: bool = False,
               series_id: str | None = None) -> Image:
    """Read an image file (or a DICOM series folder) into an :class:`Image` in LPS mm.

    NIfTI (``.nii``, ``.nii.gz``) and FreeSurfer MGH (``.mgz``, ``.mgh``) are read with nibabel;
    MetaImage, NRRD, DICOM (a ``.dcm`` file or a folder of one series) and the other ITK formats
    with SimpleITK. See the module docstring for the header, dimension and dtype rules.

    Args:
        path: the file, or a folder of DICOM slices.
        dtype: cast the voxels to this torch dtype (a float → integer cast requires whole numbers).
        label: the image is a label map: float voxels must be whole numbers and become ``int32``
            (``int64`` if needed); integer voxels keep their type.
        allow_channels: read 4D volumes and multi-component (vector, RGB) voxels as channels.
        allow_nan: accept NaN/infinite voxels (otherwise an error gives their count).
        series_id: the DICOM series to read when a folder holds several.

    Returns:
        ``Image`` with data ``(C, z, y, x)`` (``(C, y, x)`` in 2D) and its grid in LPS mm.

    Raises:
        InputError: missing or unreadable file, unknown format, unsupported dimension, complex
            data, several volumes or components without ``allow_channels``, NaN/Inf voxels
            without ``allow_nan``, non-integral labels. The message names the file.
        GeometryError: sheared or singular orientation in the header.
    """
    path = Path(path)
    _check_readable(path)
    name = str(path)
    meta: dict[str, Any] = {}
    if path.is_file() and file_suffix(path) in NIBABEL_SUFFIXES:
        arr, grid, meta = _read_nibabel(path, allow_channels)
    else:
        arr, grid = _read_sitk(path, allow_channels, series_id)
    stored = arr.dtype.newbyteorder("=")
    image = _finish(arr, grid, name, dtype=dtype, label=label, allow_nan=allow_nan)
    image.meta.update(meta)
    if stored == np.uint16 and dtype is None and image.data.dtype == torch.int32:
        image.meta["stored_dtype"] = "uint16"  # widened for torch; written back as uint16
    return image


def output_meta(space_of: Image, values_of: Image | None = None) -> dict[str, Any]:
    """:attr:`Image.meta` for an output on ``space_of``'s grid whose voxels come from
    ``values_of`` (a warped image or label map): the space (NIfTI codes) of the one and the
    stored voxel type (e.g. ``uint16``, widened when read) of the other."""
    out = {k: v for k, v in space_of.meta.items() if k in ("nifti_codes", "nifti_affine")}
    if values_of is not None and "stored_dtype" in values_of.meta:
        out["stored_dtype"] = values_of.meta["stored_dtype"]
    return out


def read_reference(path: str | os.PathLike) -> Image:
    """Read an image only for its grid and header: the reference grid that outputs are
    resampled onto (``medreg apply -r``). Its voxels are not used, so NaN voxels and several
    volumes or components (an fMRI run, a vector image) are accepted, as
    ``antsApplyTransforms -r`` accepts them."""
    return read_image(path, allow_channels=True, allow_nan=True)


def _numpy_for_writing(image: Image, path: Path) -> np.ndarray:
    """``(C, *shape)`` voxels as numpy, in a type every reader accepts."""
    data = image.data.detach().cpu()
    if data.is_complex():
        raise InputError(f"{path}: cannot write complex-valued data")
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    elif data.dtype in (torch.float16, torch.bfloat16):
        data = data.to(torch.float32)
    elif data.dtype == torch.int64:
        info = torch.iinfo(torch.int32)
        if data.numel() == 0 or (data.min() >= info.min and data.max() <= info.max):
            data = data.to(torch.int32)  # int64 NIfTI/ITK files are poorly supported elsewhere
    if image.meta.get("stored_dtype") == "uint16" and data.dtype == torch.int32:
        # read from uint16 (and widened): written back so while the values fit
        if data.numel() == 0 or (int(data.min()) >= 0 and int(data.max()) <= 65535):
            return data.numpy().astype(np.uint16)
    return data.numpy()


def _nifti_codes(meta: dict[str, Any]) -> tuple[int, int]:
    """sform and qform codes to write: the source's (``meta["nifti_codes"]``), a form the source
    left unset taking the other's code, 1 (scanner) when neither was set. Both forms hold the
    grid's matrix, so the codes only say which space it is in (MNI 4, aligned 2, ...)."""
    scode, qcode = meta.get("nifti_codes", (0, 0))
    scode, qcode = int(scode), int(qcode)
    return scode or qcode or 1, qcode or scode or 1


def _slice_affine(grid: Grid, meta: dict[str, Any]) -> np.ndarray:
    """The NIfTI matrix of a 2D grid, with the third axis (slice position and thickness) of the
    file it was read from (``meta["nifti_affine"]``) when that file's in-plane part is this
    grid's: a registered slice lands where its fixed slice is, not at z = 0. (ITK reads 2D
    NIfTI without the third axis either way.)"""
    affine = nifti_affine_from_grid(grid)
    src = meta.get("nifti_affine")
    if grid.ndim == 2 and src is not None:
        src = np.asarray(src, dtype=np.float64)
        inplane = [0, 1, 3]
        if (np.allclose(src[:2][:, inplane], affine[:2][:, inplane], atol=1e-4)
                and np.allclose(src[2, :2], 0.0, atol=1e-6) and np.allclose(src[:2, 2], 0.0, atol=1e-6)):
            affine[2, 3] = src[2, 3]
            if abs(src[2, 2]) > 1e-6:  # (a zero slice axis, allowed in an sform, keeps 1 mm)
                affine[2, 2] = src[2, 2]
    return affine


def _write_nibabel(arr: np.ndarray, grid: Grid, path: Path, suffix: str,
                   meta: dict[str, Any] | None = None) -> None:
    channels, d = arr.shape[0], grid.ndim
    # (C, [z,] y, x) → (x, y[, z], C)
    xyz = np.transpose(arr, tuple(range(d, -1, -1)))
    affine = _slice_affine(grid, meta or {})
    if suffix in (".mgz", ".mgh"):
        if d != 3:
            raise InputError(f"{path}: MGH files hold 3D images; use .nii.gz for 2D")
        mgh_types = {np.dtype(np.int8): np.int16, np.dtype(np.uint16): np.int32,
                     np.dtype(np.float64): np.float32}
        xyz = xyz.astype(mgh_types.get(xyz.dtype, xyz.dtype), copy=False)
        if xyz.dtype not in (np.uint8, np.int16, np.int32, np.float32):
            raise InputError(f"{path}: MGH cannot store {xyz.dtype} voxels; use .nii.gz")
        out = nib.MGHImage(xyz if channels > 1 else xyz[..., 0], affine)
    else:
        if channels > 1:  # ITK's vector layout: (X, Y, Z, 1, C), Z = 1 in 2D
            vec = xyz.reshape(xyz.shape[:d] + (1,) * (3 - d) + (1, channels))
            out = nib.Nifti1Image(vec, affine, dtype=vec.dtype)
            out.header.set_intent("vector")
        else:
            out = nib.Nifti1Image(xyz[..., 0], affine, dtype=xyz.dtype)
        scode, qcode = _nifti_codes(meta or {})
        out.set_sform(affine, code=scode)
        out.set_qform(affine, code=qcode)
        out.header.set_xyzt_units("mm")
        if suffix == ".nii.gz":  # nibabel writes, the blocks are compressed on all threads
            with ParallelGzipWriter(path) as f:
                holder = nib.FileHolder(fileobj=f)
                out.to_file_map({"header": holder, "image": holder})
            return
    nib.save(out, str(path))


def _write_sitk(arr: np.ndarray, grid: Grid, path: Path) -> None:
    channels = arr.shape[0]
    if channels > 1:
        img = sitk.GetImageFromArray(np.moveaxis(arr, 0, -1), isVector=True)
    else:
        img = sitk.GetImageFromArray(arr[0])
    set_sitk_geometry(img, grid)
    sitk.WriteImage(img, str(path), useCompression=True)


def write_image(image: Image, path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Write an image; the format follows the file ending.

    ``.nii``/``.nii.gz`` are written with nibabel, sform and qform both set to the grid's
    voxel-to-RAS matrix, with the space codes of ``image.meta["nifti_codes"]`` (those of the
    file the image, or the reference it was resampled onto, was read from; else 1, scanner),
    units mm; a 2D grid keeps the slice position of ``image.meta["nifti_affine"]``; ``.nii.gz``
    is compressed in blocks on all threads (one gzip member per block, :mod:`medreg.io._gzip`).
    Single-channel images are 2D/3D files; multi-channel images are ITK vector images (NIfTI 5D
    ``(X, Y, Z, 1, C)``, intent "vector"; a 2D image has ``Z = 1``). ``.mgz``/``.mgh`` go through
    nibabel (3D only; float64 becomes float32), every other ending (``.mha``, ``.mhd``,
    ``.nrrd``, ...) through SimpleITK with compression. ``int64`` voxels are stored as ``int32``
    when they fit, ``bool`` as ``uint8``, half floats as ``float32``; an image read from
    ``uint16`` is written as ``uint16`` again while its values fit.

    Args:
        image: the image (any device; gradients are ignored).
        path: output file; its folder must exist.
        overwrite: replace an existing file (``False``: raise instead).

    Raises:
        InputError: missing folder, existing file with ``overwrite=False``, a format that cannot
            store the image, or a failed write.
    """
    path = check_output_path(path, overwrite)
    arr = _numpy_for_writing(image, path)
    suffix = file_suffix(path)
    existed = path.exists()
    try:
        if suffix in NIBABEL_SUFFIXES:
            _write_nibabel(arr, image.grid, path, suffix, image.meta)
        else:
            _write_sitk(arr, image.grid, path)
    except (RuntimeError, OSError, ValueError, ImageFileError) as exc:
        if not existed:  # no empty or partial file left behind to block the next try
            path.unlink(missing_ok=True)
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: cannot write the image ({_reason(exc)}); use one of .nii.gz, "
                         ".nii, .mha, .nrrd") from None


def image_info(image: Image) -> dict[str, Any]:
    """Summary of an image (JSON-serialisable), as printed by ``medreg info``.

    Returns:
        ``name``, ``ndim``, ``size``/``spacing``/``origin`` (``x, y, z``; mm, LPS), ``direction``
        (rows of the matrix whose columns are the index axes in LPS), ``orientation`` (axis codes
        as nibabel's ``aff2axcodes``), ``dtype``, ``channels``, ``min``/``max`` over finite
        voxels (``None`` if there are none) and ``nonfinite`` (count of NaN/infinite voxels).
    """
    data = image.data
    grid = image.grid
    if data.is_floating_point():
        finite = torch.isfinite(data)
        nonfinite = int(data.numel() - finite.sum())
        values = data[finite] if nonfinite else data
    else:
        nonfinite, values = 0, data
    if values.numel():
        lo, hi = values.min().item(), values.max().item()
        if isinstance(lo, float):
            lo, hi = (v if math.isfinite(v) else None for v in (lo, hi))
    else:
        lo = hi = None
    return {
        "name": image.name,
        "ndim": grid.ndim,
        "size": list(grid.size),
        "spacing": list(grid.spacing),
        "origin": list(grid.origin),
        "direction": grid.direction.tolist(),
        "orientation": grid.orientation(),
        "dtype": str(data.dtype).replace("torch.", ""),
        "channels": image.channels,
        "min": lo,
        "max": hi,
        "nonfinite": nonfinite,
    }
