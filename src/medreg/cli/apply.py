"""``medreg apply``: resample an image or map points through one or more transforms."""

from __future__ import annotations


import click
import torch

from medreg.cli import main
from medreg.core.errors import GeometryError, InputError
from medreg.io.paths import check_output_path
from medreg.transforms import Compose, SpatialTransform, warp_image, warp_labels, warp_points

HELP = """Apply TRANSFORM(s) to INPUT (resampled on REFERENCE's grid) or to --points.

\b
  medreg apply TRANSFORM [TRANSFORM ...] INPUT -r REFERENCE -o OUTPUT
  medreg apply TRANSFORM [TRANSFORM ...] --points IN.csv -o OUT.csv

TRANSFORM is an ITK .tfm/.txt, an ANTs .mat, an ITK .h5 or a displacement field
(.nii.gz/.nii/.mha/.nrrd, LPS mm vectors, ITK's convention). Several transforms are applied
in ITK's order, the LAST LISTED FIRST, as antsApplyTransforms -t A -t B applies B first.
Transforms map fixed (REFERENCE) space to moving (INPUT) space, so images are pulled back
onto REFERENCE; --points maps fixed-space points into moving space (use --inverse for
moving-space points into fixed space). Interpolation is linear unless asked (as in ITK):
use nearest for label maps, or soft to propagate each label linearly (argmax); an integer
image with few values gets a note saying so. Integer images keep their type (rounded; a uint16
image is written back as uint16 while its values fit). The output is in REFERENCE's space
(its NIfTI sform/qform codes); REFERENCE is read only for its grid (NaN voxels and 4D are fine).
NaN voxels of INPUT (statistic maps) are carried through, as ITK does.
"""


def load_transforms(paths: list[str]) -> SpatialTransform:
    """Read and compose transform files in ITK order (last listed applied first)."""
    from medreg.io import read_transform

    if not paths:
        raise InputError("no TRANSFORM given")
    transforms = []
    for p in paths:
        try:
            transforms.append(read_transform(p, dtype=torch.float64))
        except InputError as exc:
            if "components per voxel, found 1" not in str(exc):
                raise
            raise InputError(f"{exc}: it looks like an image, given where a TRANSFORM goes; the "
                             "transforms come first and the image to resample last "
                             "(medreg apply TRANSFORM... INPUT -r REFERENCE -o OUTPUT)") from None
    ndims = {t.ndim for t in transforms}
    if len(ndims) > 1:
        raise GeometryError("transforms of different dimensions: " + ", ".join(
            f"{p} is {t.ndim}D" for p, t in zip(paths, transforms)))
    return transforms[0] if len(transforms) == 1 else Compose(*transforms)


@main.command("apply", help=HELP)
@click.argument("args", nargs=-1, required=True, metavar="TRANSFORM... [INPUT]")
@click.option("-r", "--reference", type=click.Path(), help="Image whose grid the output takes (fixed image).")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output image or points file.")
@click.option("--points", "points_path", type=click.Path(), help="Landmarks (.csv LPS mm, .fcsv, .txt) to map instead of an image.")
@click.option("--interpolation", "-n", type=click.Choice(["linear", "nearest", "bspline", "soft"]), default=None,
              help="linear (the default for every image, as in ITK), nearest (label maps), bspline (cubic), "
                   "soft (label maps: each label linearly, then argmax).")
@click.option("--inverse", is_flag=True, help="With --points: map through the inverse (moving → fixed space).")
@click.option("--fill", type=float, default=0.0, show_default=True, help="Value outside the input image.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUTPUT.")
def apply_cmd(args, reference, output, points_path, interpolation, inverse, fill, overwrite):
    from medreg.io import (output_meta, read_image, read_named_landmarks, read_reference, write_image,
                           write_landmarks)

    out = check_output_path(output, overwrite, how="pass --overwrite")
    if points_path is not None:
        transform = load_transforms(list(args))
        pts, names = read_named_landmarks(points_path)
        if pts.shape[0] == 0:
            raise InputError(f"{points_path}: no landmarks in the file")
        if pts.shape[-1] != transform.ndim:
            raise GeometryError(f"{points_path}: {pts.shape[-1]}D points cannot go through a "
                                f"{transform.ndim}D transform")
        if inverse:
            transform = transform.inverse()
        with torch.no_grad():
            mapped = warp_points(pts, transform.double())
        write_landmarks(mapped, out, overwrite=overwrite, names=names)
        click.echo(f"mapped {pts.shape[0]} points → {out}")
        return
    if len(args) < 2:
        raise InputError("give at least one TRANSFORM and the INPUT image (or --points)")
    if reference is None:
        raise InputError("-r/--reference is required: the image whose grid the output takes")
    if inverse:
        raise InputError("--inverse applies to --points only")
    *tpaths, input_path = args
    transform = load_transforms(tpaths)
    if interpolation == "soft":  # a label map, also one stored as float with whole values
        image = read_image(input_path, label=True)
    else:
        image = read_image(input_path, allow_nan=True)  # resampling carries NaN through, as ITK
    nonfinite = int((~torch.isfinite(image.data)).sum()) if image.data.is_floating_point() else 0
    if nonfinite:
        click.echo(f"note: {input_path} has {nonfinite} NaN/infinite voxels; they are carried "
                   "through (an output voxel whose interpolation touches one is NaN, as in ITK)",
                   err=True)
    ref = read_reference(reference)  # only its grid and header are used
    if transform.ndim != image.ndim or ref.ndim != image.ndim:
        raise GeometryError(
            f"dimension mismatch: transform {transform.ndim}D, {input_path} {image.ndim}D, "
            f"{reference} {ref.ndim}D")
    mode = interpolation or "linear"
    if mode in ("linear", "bspline") and image.is_label and torch.unique(image.data).numel() <= 256:
        click.echo(f"note: {input_path} is an integer image with few values; if it is a label map, "
                   "use --interpolation nearest or soft", err=True)
    with torch.no_grad():
        if mode == "soft":
            warped = warp_labels(image, transform, ref.grid, mode="soft")
        else:
            warped = warp_image(image, transform, ref.grid, interpolation=mode, fill=fill)
    warped.meta.update(output_meta(ref, image))  # in the reference's space, the input's voxel type
    write_image(warped, out, overwrite=overwrite)
    g = warped.grid
    click.echo(f"wrote {out}  (size {'x'.join(map(str, g.size))}, spacing "
               f"{', '.join(f'{s:g}' for s in g.spacing)} mm, {g.orientation()}, {mode} interpolation)")
