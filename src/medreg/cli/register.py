"""``medreg register`` and ``medreg presets``."""

from __future__ import annotations

import sys

import click

from medreg.cli import main
from medreg.core.errors import InputError


@main.command("register")
@click.argument("fixed", type=click.Path())
@click.argument("moving", type=click.Path())
@click.option("-o", "--outdir", required=True, type=click.Path(), help="Output folder.")
@click.option("--preset", default="fast", show_default=True, help="Shipped preset (see `medreg presets`).")
@click.option("--config", "config_path", type=click.Path(), help="YAML config (preset format); replaces --preset.")
@click.option("--fixed-mask", type=click.Path(), help="Mask on the fixed grid (non-zero = use).")
@click.option("--moving-mask", type=click.Path(), help="Mask on the moving grid.")
@click.option("--moving-labels", type=click.Path(), help="Moving label map: warped to warped_labels.nii.gz.")
@click.option("--fixed-labels", type=click.Path(), help="Fixed label map: with --moving-labels, Dice before/after.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (torch.set_num_threads; at least 1).")
@click.option("--seed", type=int, default=None, help="Random seed (identical outputs on CPU for a seed and thread count).")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--overwrite", is_flag=True, help="Replace outputs already in OUTDIR.")
def register_cmd(fixed, moving, outdir, preset, config_path, fixed_mask, moving_mask, moving_labels,
                 fixed_labels, device, threads, seed, quiet, overwrite):
    """Register MOVING to FIXED and write into OUTDIR: warped.nii.gz, warped_labels.nii.gz (with
    --moving-labels), transform.h5 (ITK composite, fixed → moving points), displacement.nii.gz
    (LPS mm, ITK convention), metrics.json and qc.png.

    FIXED and MOVING may differ in size, spacing and orientation."""
    from medreg.api import check_outdir, register, save_result
    from medreg.engine import Progress

    if fixed_labels and not moving_labels:
        raise InputError("--fixed-labels needs --moving-labels: Dice compares the fixed labels with "
                         "the moving labels carried through the transform")
    out = check_outdir(outdir, overwrite)  # before the registration, not after it
    progress = Progress(quiet=quiet, stream=sys.stderr)
    result = register(fixed, moving, preset, config=config_path, fixed_mask=fixed_mask,
                      moving_mask=moving_mask, fixed_labels=fixed_labels, moving_labels=moving_labels,
                      device=device, threads=threads, seed=seed, progress=progress)
    paths = save_result(result, out, overwrite=overwrite)
    echo_summary(result.metrics, out, paths, quiet)


def echo_summary(m: dict, out, paths: dict, quiet: bool) -> None:
    """The lines `register` and `predict` print after writing OUTDIR."""
    if not quiet:
        sim_b, sim_a = m["similarity_before"], m["similarity_after"]
        click.echo(f"{sim_b['name']}: {sim_b['value']:.4f} → {sim_a['value']:.4f} (lower is better)")
        if "dice_after" in m:
            click.echo(f"Dice (mean over labels): {m['dice_before']:.3f} → {m['dice_after']:.3f}")
        jac = m["displacement"]
        click.echo(f"SD log det J {jac['sdlogj']:.3f}, folded voxels {jac['folding_percent']:.4f} %, "
                   f"{m['runtime_s']:.1f} s")
    click.echo(f"outputs in {out}/: " + ", ".join(p.name for p in paths.values()))


@main.command("presets")
@click.argument("name", required=False)
def presets_cmd(name):
    """List the shipped presets, or print preset NAME (YAML, the --config format)."""
    from medreg.engine import list_presets, load_preset, preset_text

    if name:
        click.echo(preset_text(name), nl=False)
        return
    for n in list_presets():
        click.echo(f"{n:12s} {load_preset(n).description}")
