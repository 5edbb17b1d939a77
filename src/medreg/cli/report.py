"""``medreg report OUTDIR``: a self-contained HTML report of a registration output folder."""

from __future__ import annotations

from pathlib import Path

import click

from medreg.cli import main
from medreg.core.errors import InputError

HELP = """Write OUTDIR/report.html: metrics, settings, versions and figures in one file.

\b
  medreg report OUTDIR [-o report.html] [--fixed F --moving M [--fixed-labels L --moving-labels L]]
                [--overwrite]

OUTDIR is a `medreg register`/`predict` output folder: metrics.json and every .png in it
(qc.png first) go into the page; figures are embedded, so the file opens offline. With
--fixed (and --moving) a qc.png is drawn first when OUTDIR has none (or with --redraw), from
OUTDIR's warped.nii.gz, warped_labels.nii.gz and displacement.nii.gz when present.
"""


def _draw_qc(outdir: Path, fixed: str, moving: str | None, fixed_labels: str | None,
             moving_labels: str | None) -> Path:
    import json

    from medreg.io import read_displacement, read_image
    from medreg.viz import save_qc

    warped_path = outdir / "warped.nii.gz"
    if not warped_path.is_file():
        raise InputError(f"{outdir}: no warped.nii.gz to draw qc.png from")
    fixed_img = read_image(fixed)
    kwargs = {}
    if fixed_labels is not None:
        kwargs["fixed_labels"] = read_image(fixed_labels, label=True)
        if moving_labels is not None:
            kwargs["moving_labels"] = read_image(moving_labels, label=True)
        if (outdir / "warped_labels.nii.gz").is_file():
            kwargs["warped_labels"] = read_image(outdir / "warped_labels.nii.gz", label=True)
    disp = outdir / "displacement.nii.gz"
    if disp.is_file():
        field = read_displacement(disp)
        if field.grid.allclose(fixed_img.grid, atol=1e-3):
            kwargs["displacement"] = field.field.detach()
    metrics = None
    if (outdir / "metrics.json").is_file():
        try:
            metrics = json.loads((outdir / "metrics.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            metrics = None
    return save_qc(outdir / "qc.png", fixed_img, read_image(warped_path),
                   read_image(moving) if moving else None, metrics=metrics,
                   title=f"medreg QC: {outdir.resolve().name}", **kwargs)


@main.command("report", help=HELP)
@click.argument("outdir", type=click.Path())
@click.option("-o", "--output", type=click.Path(), help="HTML file (default OUTDIR/report.html).")
@click.option("--fixed", type=click.Path(), help="Fixed image, to draw qc.png when missing.")
@click.option("--moving", type=click.Path(), help="Moving image (before panels of qc.png).")
@click.option("--fixed-labels", type=click.Path(), help="Fixed label map for qc.png contours.")
@click.option("--moving-labels", type=click.Path(), help="Moving label map for qc.png contours.")
@click.option("--redraw", is_flag=True, help="Draw qc.png even if OUTDIR has one.")
@click.option("--title", default=None, help="Page title.")
@click.option("--overwrite", is_flag=True, help="Replace an existing report file.")
def report_cmd(outdir: str, output: str | None, fixed: str | None, moving: str | None,
               fixed_labels: str | None, moving_labels: str | None, redraw: bool,
               title: str | None, overwrite: bool) -> None:
    from medreg.io.paths import check_output_path, file_suffix
    from medreg.viz import write_report

    d = Path(outdir)
    if not d.is_dir():
        raise InputError(f"{d}: output folder not found")
    if (moving or fixed_labels or moving_labels or redraw) and not fixed:
        raise InputError("--moving, --fixed-labels, --moving-labels and --redraw need --fixed")
    target = Path(output) if output else d / "report.html"
    check_output_path(target, overwrite, how="pass --overwrite")
    if file_suffix(target) not in (".html", ".htm"):
        raise InputError(f"{target}: the report is an HTML page; name it .html")
    if fixed and (redraw or not (d / "qc.png").is_file()):
        qc = _draw_qc(d, fixed, moving, fixed_labels, moving_labels)
        click.echo(f"wrote {qc}")
    path = write_report(d, target, title=title)
    click.echo(f"wrote {path}")
