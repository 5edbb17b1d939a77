"""``medreg predict`` and ``medreg models``."""

from __future__ import annotations

import json

import click

from medreg.cli import main


@main.command("predict")
@click.argument("model")
@click.argument("fixed", type=click.Path())
@click.argument("moving", type=click.Path())
@click.option("-o", "--outdir", required=True, type=click.Path(), help="Output folder.")
@click.option("--moving-labels", type=click.Path(), help="Moving label map: warped to warped_labels.nii.gz.")
@click.option("--fixed-labels", type=click.Path(), help="Fixed label map: with --moving-labels, Dice before/after.")
@click.option("--passes", type=int, default=1, show_default=True,
              help="Network passes: each further pass registers the moving image warped so far "
                   "and composes the fields (no optimisation on the pair).")
@click.option("--symmetric/--no-symmetric", default=None,
              help="Also predict with the images swapped and average the two velocities "
                   "(diffeomorphic models; inverse-consistent, twice the network time). "
                   "Default: the model's own (on for brain3d).")
@click.option("--instance-steps", type=int, default=0, show_default=True,
              help="Steps refining the predicted field on the image pair (instance optimisation).")
@click.option("--instance-method", type=click.Choice(["adam", "greedy"]), default=None,
              help="adam: gradient steps on the model's training loss; greedy: the fast preset's "
                   "compositional LNCC updates. Default: greedy.")
@click.option("--regularisation", type=float, default=None,
              help="Regulariser weight, for models trained with a regularisation input.")
@click.option("--initialisation", type=click.Choice(["none", "geometry", "com", "moments", "affine"]),
              default=None, help="Initial alignment before the network (default: the model's).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (torch.set_num_threads; at least 1).")
@click.option("--seed", type=int, default=None, help="Random seed.")
@click.option("--quiet", is_flag=True, help="No summary output.")
@click.option("--overwrite", is_flag=True, help="Replace outputs already in OUTDIR.")
def predict_cmd(model, fixed, moving, outdir, moving_labels, fixed_labels, passes, symmetric, instance_steps,
                instance_method, regularisation, initialisation, device, threads, seed, quiet,
                overwrite):
    """Register MOVING to FIXED with a trained network and write the same outputs as
    `medreg register` into OUTDIR. MODEL is a bundled model's name (see `medreg models`) or a
    checkpoint written by `medreg train`. No network access is needed."""
    from medreg.api import check_outdir, predict, save_result
    from medreg.cli.register import echo_summary

    out = check_outdir(outdir, overwrite)
    result = predict(model, fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels,
                     device=device, threads=threads, seed=seed, instance_steps=instance_steps,
                     regularisation=regularisation, initialisation=initialisation,
                     instance_method=instance_method, passes=passes, symmetric=symmetric)
    paths = save_result(result, out, overwrite=overwrite)
    echo_summary(result.metrics, out, paths, quiet)


@main.command("models")
@click.argument("name", required=False)
def models_cmd(name):
    """List the bundled models (name, dimension, training data, measured numbers), or print
    everything known about model NAME (its card: data, config, results)."""
    from medreg.train.checkpoint import bundled_models
    from medreg.train.models import model_card

    names = bundled_models()
    if name:
        click.echo(json.dumps(model_card(name), indent=2))
        return
    if not names:
        click.echo("no bundled models")
    for n in names:
        card = model_card(n)
        click.echo(f"{n:12s} {card.get('summary', '')}")
