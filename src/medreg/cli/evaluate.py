"""``medreg evaluate``: Dice/HD95 per label, TRE, Jacobian regularity; Learn2Reg cohorts."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np
import torch

from medreg.cli import main
from medreg.core.errors import InputError
from medreg.core.grid import Grid
from medreg.core.image import Image
from medreg.io.paths import check_output_path

HELP = """Evaluate a registration: label overlap, landmark error, deformation regularity.

\b
  medreg evaluate --fixed-labels F --warped-labels W [--labels 2,3,41 | --labels-file L]
                  [--displacement D | --transform T] [--fixed-landmarks A --moving-landmarks B]
                  [-o metrics.json] [--csv labels.csv]
  medreg evaluate --l2r TASK_dataset.json --predictions DIR [-o metrics.json] [--csv pairs.csv]

Labels: Dice per label and their mean, HD95 (max of the two directed 95th percentiles of
surface distances, mm, as Learn2Reg but in physical units), Hausdorff and ASSD. Labels absent
from both maps are listed, never averaged. Instead of --warped-labels, --moving-labels is
warped onto the fixed labels' grid with the --displacement/--transform (nearest neighbour).

Deformation (--displacement, or --transform sampled on -r/--reference or the fixed labels'
grid): SD of log det J (textbook, 'sdlogj', and Learn2Reg's evaluation value, 'sdlogj_l2r'),
% voxels with det J <= 0, LUMIR's non-diffeomorphic volume.

Landmarks: TRE = |T(fixed) - moving| in mm (T maps fixed points into moving space); without a
transform the error before registration.

Learn2Reg mode (--l2r): reads the task description (dataset JSON or evaluation config),
the disp_XXXX_YYYY.nii.gz fields in --predictions, computes the task's metrics per pair and
prints mean ± std and the worst 30 % (Learn2Reg's robustness score); --csv writes a row per pair.
"""


# ----------------------------------------------------------------------------- helpers
def _check_output(path: str | None, overwrite: bool) -> Path | None:
    if path is None:
        return None
    return check_output_path(path, overwrite, how="pass --overwrite")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _registration_runtime(*paths: str | None) -> float | None:
    """``runtime_s`` from a ``metrics.json`` next to the transform (``medreg register`` output)."""
    for p in paths:
        if not p:
            continue
        m = Path(p).parent / "metrics.json"
        if m.is_file():
            try:
                value = json.loads(m.read_text(encoding="utf-8")).get("runtime_s")
            except (json.JSONDecodeError, AttributeError, OSError):
                continue
            if isinstance(value, (int, float)):
                return float(value)
    return None


def _versions() -> dict[str, str]:
    from medreg.viz.report import software_versions

    return software_versions()


def format_label_table(labels: dict[str, Any]) -> str:
    """Readable per-label table of a ``LabelMetrics.to_dict()``."""
    rows = labels["per_label"]
    wname = max([len(r["name"] or "") for r in rows] + [4])
    out = [f"  {'label':>6}  {'name':<{wname}}  {'status':<17}  {'Dice':>7}  {'HD95 mm':>8}  "
           f"{'ASSD mm':>8}  {'voxels F/W':>15}"]
    for r in rows:
        vox = f"{r['voxels_fixed']}/{r['voxels_warped']}"
        out.append(f"  {r['label']:>6}  {r['name'] or '':<{wname}}  {r['status']:<17}  "
                   f"{_fmt(r['dice']):>7}  {_fmt(r['hd95']):>8}  {_fmt(r['assd']):>8}  "
                   f"{vox:>15}")
    n_dice, n_dist = len(labels["labels_evaluated"]), sum(r["status"] == "ok" for r in rows)
    out.append(f"  mean Dice {_fmt(labels['mean_dice'])} over {n_dice} labels; "
               f"mean HD95 {_fmt(labels['mean_hd95'])} mm, mean ASSD "
               f"{_fmt(labels['mean_assd'])} mm over {n_dist} labels present in both maps")
    for key, text in (("absent_labels", "absent from both maps (not averaged)"),
                      ("missing_in_warped", "missing in the warped map (Dice 0, no distance)"),
                      ("missing_in_fixed", "missing in the fixed map (Dice 0, no distance)")):
        if labels.get(key):
            out.append(f"  {text}: {', '.join(map(str, labels[key]))}")
    return "\n".join(out)


def _box(grid) -> torch.Tensor:
    """World-space bounding box ``(2, D)`` of the voxels of ``grid`` (edges, not centres)."""
    pts = grid.corners(edges=True)
    return torch.stack([pts.amin(0), pts.amax(0)])


def _check_field_grid(disp_path: str, field_grid, labels_path: str, labels_grid) -> None:
    """A registration's displacement lies on its fixed image's grid: a field of another dimension
    or covering another box than the fixed labels belongs to another pair. (A field at a coarser
    spacing over the same box, as Learn2Reg's half-resolution fields, is accepted.)"""
    if field_grid.ndim != labels_grid.ndim:
        raise InputError(f"{disp_path}: a {field_grid.ndim}D displacement field, but the fixed labels "
                         f"{labels_path} are {labels_grid.ndim}D; give the field of this pair's registration")
    tol = max(field_grid.spacing)
    if not torch.allclose(_box(field_grid), _box(labels_grid), atol=tol, rtol=0):
        raise InputError(f"{disp_path}: the displacement field covers another region than the fixed "
                         f"labels {labels_path} ({field_grid} vs {labels_grid}); a registration's field "
                         "lies on its fixed image's grid: give the field of this pair's registration")


def format_displacement(d: dict[str, Any]) -> str:
    """Readable block of a :func:`displacement_metrics` dict."""
    return "\n".join([
        f"  SD log det J {_fmt(d['sdlogj'])} (textbook; {d['sdlogj_excluded_voxels']} folded "
        f"voxels left out)    Learn2Reg SDlogJ {_fmt(d['sdlogj_l2r'])}",
        f"  folded voxels (det J <= 0) {d['folding_count']} ({_fmt(d['folding_percent'])} %)"
        f"    non-diffeomorphic volume {_fmt(d['ndv_percent'])} % ({_fmt(d['ndv_mm3'])} mm³)",
        f"  det J {_fmt(d['det_j_min'])} .. {_fmt(d['det_j_max'])} (mean {_fmt(d['det_j_mean'])})"
        f"    |u| mean {_fmt(d['displacement_mean_mm'])} mm, max "
        f"{_fmt(d['displacement_max_mm'])} mm over {d['n_voxels']} voxels"
        + (" (masked)" if d.get("masked") else ""),
    ])


def format_tre(t: dict[str, Any]) -> str:
    """Readable block of a ``TREResult.to_dict()``."""
    ini = t.get("initial") or {}
    line = (f"  TRE {_fmt(t['mean'])} ± {_fmt(t['std'])} mm (median {_fmt(t['median'])}, "
            f"90% {_fmt(t['p90'])}, max {_fmt(t['max'])}) over {t['n']} pairs")
    line += (f"\n  before registration {_fmt(ini.get('mean'))} ± {_fmt(ini.get('std'))} mm "
             f"(max {_fmt(ini.get('max'))})")
    if t.get("outside_grid"):
        line += f"\n  note: {t['outside_grid']} fixed landmarks lie outside the field's grid"
    return line


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from medreg.metrics import to_jsonable

    path.write_text(json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n",
                    encoding="utf-8")


def _write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    from medreg.metrics import to_jsonable

    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in rows:
            r = to_jsonable(r)
            w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])


LABEL_COLUMNS = ("label", "name", "status", "dice", "hd95", "hd", "assd", "voxels_fixed",
                 "voxels_warped", "volume_fixed_mm3", "volume_warped_mm3")


# ----------------------------------------------------------------------------- single pair
def _label_list(labels_text: str | None, labels_file: str | None, lut: str | None
                ) -> tuple[list[int] | None, dict[int, str]]:
    from medreg.metrics import parse_label_list, read_label_list, read_label_names

    if labels_text is not None and labels_file is not None:
        raise InputError("give --labels or --labels-file, not both")
    ids: list[int] | None = None
    names: dict[int, str] = {}
    if labels_text is not None:
        ids = parse_label_list(labels_text)
    elif labels_file is not None:
        ids, names = read_label_list(labels_file)
    if lut is not None:
        names.update(read_label_names(lut))
    return ids, names


def _evaluate_single(opts: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from medreg.io import read_displacement, read_image, read_landmarks, read_reference, read_transform
    from medreg.metrics import DISPLACEMENT_DEFINITIONS, displacement_metrics, label_metrics, tre
    from medreg.transforms import warp_labels

    fl, wl, ml = opts["fixed_labels"], opts["warped_labels"], opts["moving_labels"]
    disp_path, tx_path = opts["displacement"], opts["transform"]
    fa, mb = opts["fixed_landmarks"], opts["moving_landmarks"]
    if disp_path and tx_path:
        raise InputError("give --displacement or --transform, not both")
    if (fl is None) != (wl is None and ml is None):
        raise InputError("label evaluation needs --fixed-labels and --warped-labels "
                         "(or --moving-labels with a --displacement/--transform)")
    if wl is not None and ml is not None:
        raise InputError("give --warped-labels or --moving-labels, not both")
    if (fa is None) != (mb is None):
        raise InputError("TRE needs both --fixed-landmarks and --moving-landmarks")
    if fl is None and fa is None and not disp_path and not tx_path:
        raise InputError("nothing to evaluate: give label maps (--fixed-labels/--warped-labels), "
                         "landmarks (--fixed-landmarks/--moving-landmarks), a --displacement or "
                         "a --transform, or --l2r (see medreg evaluate --help)")
    if ml is not None and not (disp_path or tx_path):
        raise InputError("--moving-labels needs a --displacement or --transform to warp it")

    result: dict[str, Any] = {"inputs": {k: opts[k] for k in (
        "fixed_labels", "warped_labels", "moving_labels", "displacement", "transform",
        "reference", "mask", "fixed_landmarks", "moving_landmarks") if opts[k] is not None}}
    transform = None
    field_grid = None
    field = None
    if disp_path:
        transform = read_displacement(disp_path, dtype=torch.float64)
        field_grid = transform.grid
        with torch.no_grad():
            field = transform.displacement(field_grid)
    elif tx_path:
        transform = read_transform(tx_path, dtype=torch.float64)

    fixed_labels = read_image(fl, label=True) if fl is not None else None
    if disp_path and fixed_labels is not None:
        _check_field_grid(disp_path, field_grid, fl, fixed_labels.grid)
    if tx_path and transform is not None:
        grid_src = opts["reference"] or fl
        field_grid = getattr(transform, "grid", None)
        if grid_src is not None:
            field_grid = read_reference(grid_src).grid if grid_src != fl else fixed_labels.grid
        if field_grid is not None:
            with torch.no_grad():
                field = transform.displacement(field_grid)

    label_rows: list[dict[str, Any]] = []
    if fixed_labels is not None:
        ids, names = _label_list(opts["labels_text"], opts["labels_file"], opts["lut"])
        if wl is not None:
            warped = read_image(wl, label=True)
        else:
            moving = read_image(ml, label=True)
            with torch.no_grad():
                warped = warp_labels(moving, transform, fixed_labels.grid)
            warped.name = f"{ml} warped"
        lm = label_metrics(fixed_labels, warped, ids, names, surface=not opts["no_surface"])
        result["labels"] = lm.to_dict()
        label_rows = result["labels"]["per_label"]
    elif opts["labels_text"] or opts["labels_file"]:
        raise InputError("--labels/--labels-file need --fixed-labels and --warped-labels")

    if field is not None:
        mask = read_image(opts["mask"], label=True) if opts["mask"] else None
        if mask is not None and not mask.grid.allclose(field_grid, atol=1e-3):
            raise InputError(f"{opts['mask']}: the mask is not on the displacement's grid")
        result["displacement"] = displacement_metrics(
            field, field_grid, mask, name=str(disp_path or tx_path))
        result["displacement_definitions"] = DISPLACEMENT_DEFINITIONS
    elif tx_path:
        result["notes"] = ["deformation regularity skipped: give -r/--reference (or "
                           "--fixed-labels) to sample the transform on a grid"]

    if fa is not None:
        ref_grid = field_grid or (fixed_labels.grid if fixed_labels is not None else None)
        f_pts = read_landmarks(fa, grid=ref_grid)
        m_pts = read_landmarks(mb, grid=ref_grid)
        t = tre(f_pts, m_pts, transform, grid=field_grid, names=(str(fa), str(mb)))
        result["landmarks"] = t.to_dict()
        if transform is None:
            result.setdefault("notes", []).append(
                "no --displacement/--transform: TRE is the landmark distance before registration")

    runtime = _registration_runtime(disp_path, tx_path)
    if runtime is not None:
        result["runtime_s"] = runtime
    return result, label_rows


def _print_single(result: dict[str, Any]) -> None:
    if "labels" in result:
        inp = result["inputs"]
        other = inp.get("warped_labels") or f"{inp.get('moving_labels')} (warped here)"
        click.echo(f"labels  fixed: {inp['fixed_labels']}  warped: {other}")
        click.echo(format_label_table(result["labels"]))
    if "displacement" in result:
        src = result["inputs"].get("displacement") or result["inputs"].get("transform")
        click.echo(f"deformation  {src}")
        click.echo(format_displacement(result["displacement"]))
    if "landmarks" in result:
        inp = result["inputs"]
        click.echo(f"landmarks  {inp['fixed_landmarks']} -> {inp['moving_landmarks']}")
        click.echo(format_tre(result["landmarks"]))
    if "runtime_s" in result:
        click.echo(f"registration runtime {_fmt(result['runtime_s'])} s")
    for note in result.get("notes", []):
        click.echo(f"note: {note}")


# ----------------------------------------------------------------------------- Learn2Reg
def _read_grid(paths: Sequence[Path]) -> Grid:
    """The grid of the first existing file of ``paths`` (image, else its label map)."""
    from medreg.io import read_image

    for p in paths:
        if p.is_file():
            return read_image(p, allow_channels=True, allow_nan=True).grid
    raise InputError(f"cannot find {paths[0]} (nor {', '.join(str(p) for p in paths[1:])}) "
                     "to take the image grid from")


def _evaluate_l2r(opts: dict[str, Any], echo: Callable[[str], None]
                  ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from medreg.io import read_image, read_l2r_displacement
    from medreg.metrics import (L2RTask, evaluate_l2r_pair, format_summary, l2r_points_to_world,
                                summarize_cohort)
    from medreg.metrics.jacobian import DISPLACEMENT_DEFINITIONS
    from medreg.transforms import warp_labels

    if opts["predictions"] is None:
        raise InputError("--l2r needs --predictions DIR (the disp_XXXX_YYYY.nii.gz files)")
    single = [k for k in ("fixed_labels", "warped_labels", "moving_labels", "displacement",
                          "transform", "fixed_landmarks", "moving_landmarks") if opts[k]]
    if single:
        raise InputError(f"--l2r evaluates a whole task; drop --{single[0].replace('_', '-')}")
    pred_dir = Path(opts["predictions"])
    if not pred_dir.is_dir():
        raise InputError(f"{pred_dir}: predictions folder not found")
    task = L2RTask.from_json(opts["l2r"], opts["split"])
    ids, names = (None, {})
    if opts["labels_text"] or opts["labels_file"] or opts["lut"]:
        ids, names = _label_list(opts["labels_text"], opts["labels_file"], opts["lut"])
        task.label_names.update(names)
        if ids:
            for m in task.methods:
                if m.get("metric") in ("dice", "hd95"):
                    m["labels"] = ids
    missing = []
    for pair in task.pairs:
        try:
            task.find_displacement(pair, pred_dir)
        except InputError:
            missing.append(pair.displacement_names()[0])
    if missing:
        raise InputError(f"{pred_dir}: {len(missing)} of {len(task.pairs)} displacement fields "
                         f"are missing (first: {', '.join(missing[:3])})")
    kinds = task.metric_kinds()
    echo(f"Learn2Reg task {task.name}: {len(task.pairs)} pairs from '{task.split}', metrics "
         f"{', '.join(m.get('name', m.get('metric')) for m in task.methods)}")
    rows: list[dict[str, Any]] = []
    for i, pair in enumerate(task.pairs, 1):
        t0 = time.perf_counter()
        disp_path = task.find_displacement(pair, pred_dir)
        fixed_grid = _read_grid([task.path(pair.fixed), task.label_path(pair.fixed)])
        moving_grid = _read_grid([task.path(pair.moving), task.label_path(pair.moving)])
        transform = read_l2r_displacement(disp_path, fixed_grid, moving_grid, dtype=torch.float64)
        with torch.no_grad():
            field = transform.displacement(fixed_grid)
        fixed_labels = moving_labels = None
        if kinds & {"dice", "hd95"}:
            fixed_labels = read_image(task.label_path(pair.fixed), label=True)
            moving_labels = read_image(task.label_path(pair.moving), label=True)
        f_lm = m_lm = None
        dest = task.tre_dest()
        if dest is not None:
            fp, mp = task.landmark_path(pair.fixed, dest), task.landmark_path(pair.moving, dest)
            for p in (fp, mp):
                if not p.is_file():
                    raise InputError(f"{p}: landmark file not found (pair {pair.key})")
            try:
                f_lm = l2r_points_to_world(np.loadtxt(fp, delimiter=",", ndmin=2), fixed_grid)
                m_lm = l2r_points_to_world(np.loadtxt(mp, delimiter=",", ndmin=2), moving_grid)
            except ValueError as exc:
                raise InputError(f"{fp} / {mp}: cannot read Learn2Reg landmarks ({exc})") \
                    from None
        mask = None
        if task.masked and task.mask_path(pair.fixed).is_file():
            mask = read_image(task.mask_path(pair.fixed), label=True)

        def warp(img: Image, _t: Any = transform, _g: Grid = fixed_grid) -> Image:
            with torch.no_grad():
                return warp_labels(img, _t, _g)

        row = evaluate_l2r_pair(task, pair, displacement=field, grid=fixed_grid,
                                transform=transform, warp=warp, fixed_labels=fixed_labels,
                                moving_labels=moving_labels, fixed_landmarks=f_lm,
                                moving_landmarks=m_lm, mask=mask)
        row["file"] = disp_path.name
        row["eval_seconds"] = time.perf_counter() - t0
        rows.append(row)
        shown = "  ".join(f"{k} {_fmt(row[k], 3)}" for k in ("dice", "hd95", "tre", "sdlogj_l2r",
                                                             "folding_percent") if k in row)
        echo(f"[{i}/{len(task.pairs)}] {pair.key}  {shown}")
    flat = [{k: v for k, v in r.items() if k not in ("details", "eval_seconds")} for r in rows]
    summary = summarize_cohort(flat)
    order = [k for k in ("dice", "hd95", "tre", "tre_initial", "sdlogj_l2r", "sdlogj",
                         "folding_percent", "ndv_percent") if k in summary]
    echo("")
    echo(format_summary(summary, order))
    result = {
        "task": task.name, "source": str(task.source), "split": task.split,
        "predictions": str(pred_dir), "methods": task.methods, "n_pairs": len(rows),
        "summary": summary,
        "cases": {r["pair"]: r for r in rows},
        "definitions": {**DISPLACEMENT_DEFINITIONS,
                        "dice/hd95": "labels absent from the fixed or the moving map are "
                                     "skipped (Learn2Reg); HD95 in mm",
                        "worst30": "mean of the worst 30 % of pairs (Learn2Reg robustness)",
                        "q30_l2r": "numpy.quantile(values, 0.3), Learn2Reg evaluation.py '30'"},
    }
    return result, flat


# ----------------------------------------------------------------------------- command
@main.command("evaluate", help=HELP)
@click.option("--fixed-labels", type=click.Path(), help="Fixed image label map.")
@click.option("--warped-labels", type=click.Path(),
              help="Moving label map resampled on the fixed grid (warped_labels.nii.gz).")
@click.option("--moving-labels", type=click.Path(),
              help="Moving label map to warp here with --displacement/--transform (nearest).")
@click.option("--labels", "labels_text", metavar="IDS",
              help="Labels to evaluate: '2,3,41' or ranges '1-35' (default: all non-zero).")
@click.option("--labels-file", type=click.Path(),
              help="Labels to evaluate: a list of ids, or an ITK-SNAP/FreeSurfer LUT or JSON "
                   "(its ids and names).")
@click.option("--lut", type=click.Path(),
              help="Label names from an ITK-SNAP / FreeSurfer LUT or JSON.")
@click.option("--displacement", type=click.Path(),
              help="Displacement field (LPS mm, ITK convention, fixed -> moving).")
@click.option("--transform", type=click.Path(),
              help="Transform file (.h5/.tfm/.mat or field), fixed -> moving.")
@click.option("-r", "--reference", type=click.Path(),
              help="Image whose grid --transform is sampled on for det J "
                   "(default: the fixed labels').")
@click.option("--mask", type=click.Path(), help="Region for the deformation metrics.")
@click.option("--fixed-landmarks", type=click.Path(),
              help="Fixed landmarks (.csv LPS, .fcsv, .txt).")
@click.option("--moving-landmarks", type=click.Path(), help="Corresponding moving landmarks.")
@click.option("--no-surface", is_flag=True, help="Skip HD95/ASSD (Dice only; faster).")
@click.option("--l2r", type=click.Path(),
              help="Learn2Reg task JSON (dataset description or evaluation config).")
@click.option("--predictions", type=click.Path(),
              help="With --l2r: folder of disp_XXXX_YYYY.nii.gz.")
@click.option("--split", default=None,
              help="With --l2r: pair list (val, test, train or a JSON key; "
                   "default the first found).")
@click.option("-o", "--output", type=click.Path(), help="Write the metrics as JSON here.")
@click.option("--csv", "csv_path", type=click.Path(),
              help="Write a CSV: a row per label (a row per pair with --l2r).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def evaluate_cmd(**opts: Any) -> None:
    out_json = _check_output(opts["output"], opts["overwrite"])
    out_csv = _check_output(opts["csv_path"], opts["overwrite"])
    echo = (lambda s: None) if opts["quiet"] else click.echo
    t0 = time.perf_counter()
    if opts["l2r"]:
        result, rows = _evaluate_l2r(opts, echo)
        columns = ["pair"] + [k for k in ("dice", "hd95", "tre", "tre_initial", "sdlogj_l2r",
                                          "sdlogj", "folding_percent", "ndv_percent")
                              if any(k in r for r in rows)] + ["file"]
    else:
        result, rows = _evaluate_single(opts)
        columns = list(LABEL_COLUMNS)
        if out_csv is not None and not rows:
            raise InputError("--csv writes a row per label: give --fixed-labels and "
                             "--warped-labels (or use --l2r)")
        if not opts["quiet"]:
            _print_single(result)
    result["evaluation_seconds"] = time.perf_counter() - t0
    result["versions"] = _versions()
    if out_json is not None:
        _write_json(out_json, result)
        echo(f"wrote {out_json}")
    if out_csv is not None:
        _write_csv(out_csv, rows, columns)
        echo(f"wrote {out_csv}")
