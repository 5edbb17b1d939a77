"""``medreg info IMAGE``: print an image's geometry (LPS mm, ITK order) and voxel summary."""

from __future__ import annotations

import json
from typing import Any

import click

from medreg.cli import main
from medreg.core.errors import GeometryError
from medreg.io.images import image_info, read_image

_WIDTH = 12  # label column


def _raw_nifti_header(path: str) -> str | None:
    """The geometry fields of a NIfTI/MGH header as stored (RAS, nibabel), or None when nibabel
    cannot read the file."""
    try:
        import nibabel as nib

        img = nib.load(path)
    except Exception:  # not a nibabel format: nothing more to show
        return None
    hdr = img.header
    rows = [("file", path), ("shape", " x ".join(map(str, img.shape))),
            ("zooms", ", ".join(_num(float(z)) for z in hdr.get_zooms()))]
    if hasattr(hdr, "get_sform"):
        for kind in ("qform", "sform"):
            matrix, code = getattr(hdr, f"get_{kind}")(coded=True)
            text = "none" if matrix is None else "; ".join(
                " ".join(_num(float(v)) for v in row) for row in matrix[:3])
            rows.append((kind, f"code {int(code)}: {text}"))
    else:
        rows.append(("affine", "; ".join(" ".join(_num(float(v)) for v in row) for row in img.affine[:3])))
    head = "raw header (RAS, as stored; medreg cannot use it, see the error below)"
    return "\n".join([head] + [f"{label:<{_WIDTH}} {value}" for label, value in rows])


def _num(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def format_info(info: dict[str, Any]) -> str:
    """The human-readable block printed by ``medreg info`` (one ``label  value`` per line)."""
    axes = ", ".join("xyz"[: info["ndim"]])
    rows = [
        ("file", info["name"]),
        ("size", " x ".join(str(s) for s in info["size"]) + f"  ({axes})"),
        ("spacing", " x ".join(_num(s) for s in info["spacing"]) + " mm"),
        ("origin", ", ".join(_num(o) for o in info["origin"]) + " mm (LPS)"),
    ]
    direction = [" ".join(f"{v:+.4f}" for v in row) for row in info["direction"]]
    rows.append(("direction", f"[{direction[0]}]  (columns: index axes in LPS)"))
    rows += [("", f"[{r}]") for r in direction[1:]]
    rows += [
        ("orientation", info["orientation"]),
        ("dtype", info["dtype"]),
        ("channels", str(info["channels"])),
        ("range", "no finite voxels" if info["min"] is None
         else f"{_num(info['min'])} .. {_num(info['max'])}"),
    ]
    if info["nonfinite"]:
        rows.append(("non-finite", f"{info['nonfinite']} voxels are NaN or infinite"))
    return "\n".join(f"{label:<{_WIDTH}} {value}".rstrip() for label, value in rows)


@main.command("info")
@click.argument("image", metavar="IMAGE")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of text.")
@click.option("--series", "series_id", metavar="UID", default=None,
              help="DICOM series to read when the IMAGE folder holds several.")
def info(image: str, as_json: bool, series_id: str | None) -> None:
    """Show the size, spacing, origin, direction, orientation and values of IMAGE.

    IMAGE is any file medreg reads (.nii, .nii.gz, .mgz, .mha, .nrrd, DICOM file or series
    folder). Geometry is in LPS mm, sizes in ITK order (x, y, z); the orientation code names the
    direction each index axis points to (as nibabel: an identity-affine NIfTI is RAS).
    4D volumes and vector voxels are shown as channels; NaN voxels are counted, not refused.
    """
    try:
        img = read_image(image, allow_channels=True, allow_nan=True, series_id=series_id)
    except GeometryError as exc:
        raw = _raw_nifti_header(image)
        if raw is None:
            raise
        # a header medreg cannot use is still worth seeing: that is how one diagnoses it
        click.echo(raw)
        raise GeometryError(str(exc)) from None
    summary = image_info(img)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_info(summary))
