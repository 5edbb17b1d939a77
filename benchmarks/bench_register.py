"""Benchmark: ``medreg register`` side by side with ANTs SyN and elastix (issue 4).

Every registration runs in a fresh subprocess (in its own run folder) on the same inputs and
threads; a ~10 MB launcher measures its wall time, CPU time and peak RSS (``os.wait4`` rusage of
that one child), then the parent scores the outputs the same way for every method:

* Dice per label and its mean over the dataset's label list, HD95 (mm, Learn2Reg's robust
  Hausdorff in physical units) — :func:`medreg.metrics.label_metrics` on the moving labels that
  each tool warped itself (nearest neighbour) onto the fixed grid;
* SD of log det J (textbook: std over voxels with det J > 0), % folded voxels (det J ≤ 0), and
  LUMIR's non-diffeomorphic volume — :func:`medreg.metrics.displacement_metrics` on the total
  dense displacement (fixed grid, world LPS mm, ITK convention) each tool exported;
* TRE of landmark pairs (lung) — :func:`medreg.metrics.tre` through that displacement;
* ``consistency``: the fraction of foreground voxels where the moving labels warped through the
  exported displacement (SimpleITK, nearest) agree with the tool's own warped labels. Near 1
  means the displacement that was scored is the transform that produced the labels.

Methods: ``ants`` (antspyx ``ants.registration(type_of_transform="SyN")``, its defaults),
``elastix`` (itk-elastix, default rigid + affine + B-spline parameter maps), ``medreg``
(``medreg register FIXED MOVING -o OUT --preset P --threads T --seed S --quiet --overwrite
--moving-labels L --fixed-labels L``; skipped with a message if the command is missing) and
``identity`` (no registration: the moving labels resampled on the fixed grid in world space).

    nice -n 10 python benchmarks/bench_register.py --method ants --method elastix \\
        --dataset vxm --threads 2 --out results_vxm.json
    python benchmarks/bench_register.py --method medreg --preset fast --dataset vxm
    python benchmarks/bench_register.py --render results_vxm.json results_fs.json

Datasets and pairs: see ``benchmarks/_pairs.py``. ``--pairs N`` limits every dataset to N pairs
(hippocampus defaults to 20 random pairs; freesurfer subsets are a seeded sample of the 12).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _pairs import DATASET_PRESET, DATASETS, Pair, build_pairs, default_data_root  # noqa: E402

METHODS = ("identity", "ants", "elastix", "medreg", "predict")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "MEDREG_NUM_THREADS")


# =============================================================================== worker side
# (runs in the fresh subprocess; imports only what its method needs)

_MARKS: dict[str, float] = {}


def _mark_rss() -> None:
    """Peak RSS so far (imports + inputs read), just before the timed registration call."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                _MARKS["rss_before_reg_mb"] = int(line.split()[1]) / 1024.0
    except OSError:
        pass


def _worker_identity(a: argparse.Namespace, out: Path) -> float:
    import SimpleITK as sitk

    fixed = sitk.ReadImage(a.fixed)
    _mark_rss()
    t0 = time.perf_counter()
    if a.moving_labels:
        ml = sitk.ReadImage(a.moving_labels)
        w = sitk.Resample(ml, fixed, sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity),
                          sitk.sitkNearestNeighbor, 0, ml.GetPixelID())
        sitk.WriteImage(w, str(out / "warped_labels.nii.gz"))
    reg_s = time.perf_counter() - t0
    zero = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat32, fixed.GetDimension())
    zero.CopyInformation(fixed)
    sitk.WriteImage(zero, str(out / "displacement.nii.gz"))
    return reg_s


def _worker_ants(a: argparse.Namespace, out: Path) -> float:
    import ants

    ants.config._random_seed = a.seed  # passed as --random-seed to antsRegistration
    f = ants.image_read(a.fixed, pixeltype="float")
    m = ants.image_read(a.moving, pixeltype="float")
    _mark_rss()
    t0 = time.perf_counter()
    reg = ants.registration(f, m, type_of_transform="SyN", outprefix=str(out / "ants_"))
    reg_s = time.perf_counter() - t0
    # total displacement on the fixed grid (antsApplyTransforms -o [comp.nii.gz,1])
    comp = ants.apply_transforms(f, m, transformlist=reg["fwdtransforms"],
                                 compose=str(out / "ants_total_"))
    if not comp or not Path(comp).exists():
        raise RuntimeError("antsApplyTransforms did not write the composed displacement field")
    os.replace(comp, out / "displacement.nii.gz")
    if a.moving_labels:
        ml = ants.image_read(a.moving_labels, pixeltype="float")
        wl = ants.apply_transforms(f, ml, transformlist=reg["fwdtransforms"],
                                   interpolator="nearestNeighbor")
        ants.image_write(wl, str(out / "warped_labels.nii.gz"))
    return reg_s


def _worker_elastix(a: argparse.Namespace, out: Path) -> float:
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(a.threads)
    f = itk.imread(a.fixed, itk.F)
    m = itk.imread(a.moving, itk.F)
    po = itk.ParameterObject.New()
    for name in ("rigid", "affine", "bspline"):
        po.AddParameterMap(po.GetDefaultParameterMap(name))
    _mark_rss()
    t0 = time.perf_counter()
    # threads come from the ITK global default (set above and by the environment): passing
    # number_of_threads= segfaults itk-elastix 0.25.4 with rigid + affine + B-spline maps
    _, params = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False)
    reg_s = time.perf_counter() - t0
    field = itk.transformix_deformation_field(m, params)
    itk.imwrite(field, str(out / "displacement.nii.gz"))
    if a.moving_labels:
        ml = itk.imread(a.moving_labels, itk.F)
        for i in range(params.GetNumberOfParameterMaps()):
            params.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
            params.SetParameter(i, "ResampleInterpolator", "FinalNearestNeighborInterpolator")
        wl = itk.transformix_filter(ml, params)
        itk.imwrite(wl, str(out / "warped_labels.nii.gz"))
    maps = [{k: list(v) for k, v in params.GetParameterMap(i).items()
             if k != "TransformParameters"} for i in range(params.GetNumberOfParameterMaps())]
    (out / "elastix_maps.json").write_text(json.dumps(maps, indent=1))
    return reg_s


_WORKERS = {"identity": _worker_identity, "ants": _worker_ants, "elastix": _worker_elastix}


def worker_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_register.py --worker")
    ap.add_argument("method", choices=sorted(_WORKERS))
    ap.add_argument("--fixed", required=True)
    ap.add_argument("--moving", required=True)
    ap.add_argument("--moving-labels")
    ap.add_argument("--outdir", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.outdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    reg_s = _WORKERS[a.method](a, out)
    info = {"method": a.method, "reg_s": reg_s, "worker_s": time.perf_counter() - t0, **_MARKS}
    (out / "worker.json").write_text(json.dumps(info, indent=1))
    return 0


# =============================================================================== parent side

def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for k in THREAD_VARS:
        env[k] = str(threads)
    return env


#: Tiny launcher between the parent and each run. The kernel counts the RSS of the process that
#: fork()s into the child's peak RSS (the pre-exec copy), so the parent, which holds torch and
#: the evaluated volumes, must not be that process. This one (python -I -S) adds ~10 MB.
_LAUNCHER = r"""
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.posix_spawn(cmd[0], cmd, os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
code = os.waitstatus_to_exitcode(status)
with open(out, "w") as fh:
    json.dump({"wall_s": wall, "returncode": code, "peak_rss_mb": ru.ru_maxrss / 1024.0,
               "user_s": ru.ru_utime, "sys_s": ru.ru_stime}, fh)
sys.exit(code if code >= 0 else 128 - code)
"""


def _run_child(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> dict:
    """Run ``cmd`` (via the launcher) in ``log``'s folder: wall seconds, exit status, the run's
    peak RSS (MB). The run's folder is its working directory: transformix writes
    ``deformationField.nii`` into the current directory."""
    usage = log.with_name("rusage.json")
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(usage), *cmd],
                                env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(log.parent))
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session: only this run
            proc.wait()
            timed_out = True
        outer = time.perf_counter() - t0
    res = {"wall_s": outer, "returncode": proc.returncode, "peak_rss_mb": float("nan")}
    if usage.exists():
        res.update(json.loads(usage.read_text()))
    res["timed_out"] = timed_out
    return res


def rss_floor_mb() -> float:
    """Peak RSS the launcher reports for ``true``: the offset in every peak_rss_mb."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = _run_child([shutil.which("true") or "/bin/true"], dict(os.environ),
                       Path(d) / "run.log", 30)
    return r["peak_rss_mb"]


_MEDREG_OK: bool | None = None


def medreg_available() -> bool:
    global _MEDREG_OK
    if _MEDREG_OK is None:
        r = subprocess.run([sys.executable, "-m", "medreg", "register", "--help"],
                           capture_output=True, text=True)
        _MEDREG_OK = r.returncode == 0
        if not _MEDREG_OK:
            msg = (r.stderr or r.stdout).strip().splitlines()
            print(f"[bench] medreg register is not available yet ({msg[-1] if msg else 'no output'}); "
                  "skipping method medreg", file=sys.stderr)
    return _MEDREG_OK


def _tag(method: str, pair: Pair, a: argparse.Namespace) -> str | None:
    """The row's variant: the preset of ``medreg``, the model (+ instance steps) of ``predict``."""
    if method == "medreg":
        preset = a.preset_for.get(pair.dataset) or DATASET_PRESET.get(pair.dataset) or a.preset
        return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset
    if method == "predict":
        io = f"+{a.instance_method or 'io'}{a.instance_steps}" if a.instance_steps else ""
        passes = (f"x{a.passes}" if a.passes > 1 else "") + {None: "", True: "+sym", False: "+nosym"}[a.symmetric]
        return f"{Path(a.model).stem}{passes}{io}"
    return None


def _command(method: str, pair: Pair, out: Path, a: argparse.Namespace) -> list[str]:
    if method == "predict":
        cmd = [sys.executable, "-m", "medreg", "predict", a.model, pair.fixed, pair.moving, "-o",
               str(out), "--threads", str(a.threads), "--seed", str(a.seed), "--quiet", "--overwrite"]
        if a.passes > 1:
            cmd += ["--passes", str(a.passes)]
        if a.symmetric is not None:
            cmd += ["--symmetric" if a.symmetric else "--no-symmetric"]
        if a.instance_steps:
            cmd += ["--instance-steps", str(a.instance_steps)]
            if a.instance_method:
                cmd += ["--instance-method", a.instance_method]
        if a.initialisation:
            cmd += ["--initialisation", a.initialisation]
        if pair.moving_labels:
            cmd += ["--moving-labels", pair.moving_labels]
        if pair.fixed_labels:
            cmd += ["--fixed-labels", pair.fixed_labels]
        return cmd
    if method == "medreg":
        preset = a.preset_for.get(pair.dataset) or DATASET_PRESET.get(pair.dataset) or a.preset
        # a YAML path is a --config file (e.g. benchmarks/configs/*.yaml), tagged by its stem
        choice = (["--config", str(Path(preset).resolve())] if preset.endswith((".yaml", ".yml"))
                  else ["--preset", preset])
        cmd = [sys.executable, "-m", "medreg", "register", pair.fixed, pair.moving, "-o", str(out),
               *choice, "--threads", str(a.threads), "--seed", str(a.seed), "--quiet", "--overwrite"]
        if pair.moving_labels:
            cmd += ["--moving-labels", pair.moving_labels]
        if pair.fixed_labels:
            cmd += ["--fixed-labels", pair.fixed_labels]
        return cmd
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--fixed",
           pair.fixed, "--moving", pair.moving, "--outdir", str(out), "--threads",
           str(a.threads), "--seed", str(a.seed)]
    if pair.moving_labels:
        cmd += ["--moving-labels", pair.moving_labels]
    return cmd


def _consistency(pair: Pair, disp_path: Path, warped_path: Path) -> float | None:
    """Agreement of the tool's warped labels with the labels warped through its displacement."""
    import numpy as np
    import SimpleITK as sitk

    if not pair.moving_labels or not pair.fixed_labels:
        return None
    ref = sitk.ReadImage(pair.fixed_labels)
    ml = sitk.ReadImage(pair.moving_labels)
    ml = sitk.Cast(ml, sitk.sitkInt32)
    disp = sitk.ReadImage(str(disp_path), sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(disp)
    mine = sitk.GetArrayFromImage(
        sitk.Resample(ml, ref, tx, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32))
    theirs = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(warped_path)))).astype(np.int64)
    if mine.shape != theirs.shape:
        return None
    fg = (mine != 0) | (theirs != 0)
    return float((mine[fg] == theirs[fg]).mean()) if fg.any() else None


def evaluate(pair: Pair, out: Path, surface: bool = True) -> dict:
    """Scores of one finished run (see the module docstring)."""
    import torch

    from medreg.io import read_displacement, read_image, read_landmarks
    from medreg.metrics import displacement_metrics, field_transform, label_metrics, tre

    row: dict = {}
    wl_path, disp_path = out / "warped_labels.nii.gz", out / "displacement.nii.gz"
    fixed_grid = None
    if pair.fixed_labels and pair.labels:
        fl = read_image(pair.fixed_labels, label=True)
        fixed_grid = fl.grid
        if wl_path.exists():
            wl = read_image(wl_path, label=True)
            lm = label_metrics(fl, wl, pair.labels, surface=surface)
            row.update(dice=lm.mean_dice, hd95=lm.mean_hd95, assd=lm.mean_assd,
                       dice_per_label={s.label: s.dice for s in lm.per_label},
                       hd95_per_label={s.label: s.hd95 for s in lm.per_label},
                       labels_missing_in_warped=lm.missing_in_warped)
        else:
            row["error_labels"] = "no warped_labels.nii.gz"
    if disp_path.exists():
        df = read_displacement(disp_path, dtype=torch.float64)
        dm = displacement_metrics(df.field, df.grid, name=str(disp_path))
        for k in ("sdlogj", "sdlogj_l2r", "folding_percent", "folding_count", "ndv_percent",
                  "displacement_max_mm", "displacement_mean_mm"):
            row[k] = dm.get(k)
        if fixed_grid is not None:
            row["disp_on_fixed_grid"] = bool(df.grid.allclose(fixed_grid, atol=1e-3))
        for name, (ff, mf) in pair.landmarks.items():
            r = tre(read_landmarks(ff), read_landmarks(mf), field_transform(df.field, df.grid),
                    grid=df.grid)
            row[f"tre_{name}"] = r.mean
            row[f"tre_{name}_std"] = r.std
            row[f"tre_{name}_max"] = r.max
            row[f"tre_{name}_before"] = r.initial["mean"]
            row[f"tre_{name}_outside_grid"] = r.outside_grid
        del df
        if wl_path.exists():
            row["consistency"] = _consistency(pair, disp_path, wl_path)
    else:
        row["error_displacement"] = "no displacement.nii.gz"
    return row


def _medreg_extras(out: Path) -> dict:
    p = out / "metrics.json"
    if not p.exists():
        return {}
    try:
        m = json.loads(p.read_text())
    except ValueError:
        return {"medreg_metrics_error": "unreadable metrics.json"}
    extra = {"medreg_metrics": m}
    for k in ("runtime_s", "runtime", "registration_s", "time_s", "seconds"):
        v = m.get(k) if isinstance(m, dict) else None
        if isinstance(v, (int, float)):
            extra["reg_s"] = float(v)
            break
    return extra


def _cleanup(out: Path, keep: bool) -> None:
    if keep:
        return
    for p in out.rglob("*"):
        if p.is_file() and p.stat().st_size > 2 * 2**20:
            p.unlink()


def run_one(method: str, pair: Pair, a: argparse.Namespace) -> dict:
    tag = _tag(method, pair, a)
    out = Path(a.workdir) / "runs" / pair.dataset / pair.name / (f"{method}-{tag}" if tag else method)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    env = _env(a.threads)
    cmd = _command(method, pair, out, a)
    row = {"dataset": pair.dataset, "pair": pair.name, "method": method, "threads": a.threads,
           "seed": a.seed,
           "command": " ".join(f"{k}={a.threads}" for k in THREAD_VARS) + " " + shlex.join(cmd),
           "outdir": str(out)}
    if tag:
        row["preset"] = tag
    row["loadavg_before"] = os.getloadavg()[0]
    res = _run_child(cmd, env, out / "run.log", a.timeout)
    row.update(res)
    row["loadavg_after"] = os.getloadavg()[0]
    if "user_s" in res:
        row["cpu_s"] = res["user_s"] + res["sys_s"]
    if res["returncode"] != 0:
        tail = (out / "run.log").read_text(errors="replace").strip().splitlines()[-3:]
        row["status"] = "timeout" if res["timed_out"] else "failed"
        row["error"] = " | ".join(tail)
        _cleanup(out, a.keep)
        return row
    wj = out / "worker.json"
    if wj.exists():
        info = json.loads(wj.read_text())
        row["reg_s"] = info["reg_s"]
        if "rss_before_reg_mb" in info:
            row["rss_before_reg_mb"] = info["rss_before_reg_mb"]
    if method in ("medreg", "predict"):
        row.update(_medreg_extras(out))
    t0 = time.perf_counter()
    try:
        row.update(evaluate(pair, out, surface=not a.no_hd95))
        row["status"] = "ok"
    except Exception as exc:  # keep going: one broken output must not lose the others
        row["status"] = "eval_failed"
        row["error"] = f"{type(exc).__name__}: {exc}"
    row["eval_s"] = time.perf_counter() - t0
    _cleanup(out, a.keep)
    return row


def _versions() -> dict:
    from importlib import metadata

    v = {"python": platform.python_version(), "machine": platform.machine(),
         "cpus": os.cpu_count()}
    for pkg in ("medreg", "torch", "antspyx", "itk-elastix", "itk", "SimpleITK", "numpy", "scipy"):
        try:
            v[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            v[pkg] = None
    return v


# ------------------------------------------------------------------------------- reporting

SUMMARY_KEYS = ("dice", "hd95", "sdlogj", "folding_percent", "ndv_percent", "reg_s", "wall_s",
                "cpu_s", "peak_rss_mb", "consistency", "tre_corrected51", "tre_all100",
                "loadavg_before")


def summarize(rows: list[dict]) -> dict:
    from medreg.metrics import summarize_cohort

    out: dict = {}
    groups: dict = {}
    for r in rows:
        key = r["method"] + (f":{r['preset']}" if r.get("preset") else "")
        groups.setdefault(r["dataset"], {}).setdefault(key, []).append(r)
    for ds, by_method in groups.items():
        out[ds] = {}
        for m, rs in by_method.items():
            ok = [r for r in rs if r.get("status") == "ok"]
            flat = []
            for r in ok:
                f = {k: r.get(k) for k in SUMMARY_KEYS}
                if f["cpu_s"] is None and r.get("user_s") is not None:
                    f["cpu_s"] = r["user_s"] + r.get("sys_s", 0.0)
                flat.append(f)
            s = summarize_cohort(flat) if flat else {}
            out[ds][m] = {"n_ok": len(ok), "n_failed": len(rs) - len(ok), "metrics": s}
    return out


def _fmt(s: dict | None, key: str, digits: int) -> str:
    e = (s or {}).get(key)
    if not e or e.get("mean") is None:
        return "–"
    if e["n"] == 1:
        return f"{e['mean']:.{digits}f}"
    return f"{e['mean']:.{digits}f} ± {e['std']:.{digits}f}"


def markdown(summary: dict) -> str:
    lines = []
    for ds, by_method in summary.items():
        has_tre = any("tre_corrected51" in v["metrics"] for v in by_method.values())
        lines.append(f"\n#### {ds}\n")
        head = ["method", "pairs", "Dice", "HD95 mm", "SDlogJ", "fold %", "NDV %", "reg s",
                "wall s", "CPU s", "peak RSS MB", "consistency", "load"]
        if has_tre:
            head += ["TRE51 mm", "TRE100 mm"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for m, v in by_method.items():
            s = v["metrics"]
            n = f"{v['n_ok']}" + (f" (+{v['n_failed']} failed)" if v["n_failed"] else "")
            cells = [m, n, _fmt(s, "dice", 3), _fmt(s, "hd95", 2), _fmt(s, "sdlogj", 3),
                     _fmt(s, "folding_percent", 4), _fmt(s, "ndv_percent", 4),
                     _fmt(s, "reg_s", 1), _fmt(s, "wall_s", 1), _fmt(s, "cpu_s", 1),
                     _fmt(s, "peak_rss_mb", 0), _fmt(s, "consistency", 4),
                     _fmt(s, "loadavg_before", 1)]
            if has_tre:
                cells += [_fmt(s, "tre_corrected51", 2), _fmt(s, "tre_all100", 2)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _load_rows(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        rows += json.loads(Path(p).read_text())["rows"]
    return rows


# ------------------------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        return worker_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--method", action="append", choices=METHODS,
                    help="repeatable; default: identity ants elastix medreg")
    ap.add_argument("--dataset", action="append", choices=DATASETS,
                    help="repeatable; default: vxm")
    ap.add_argument("--pairs", type=int, default=None, help="at most N pairs per dataset")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--preset", default="fast", help="medreg preset or a YAML config file (lung/"
                    "head2d use lung/multimodal unless --preset-for says otherwise)")
    ap.add_argument("--preset-for", action="append", default=[], metavar="DATASET=PRESET")
    ap.add_argument("--model", default="brain3d", help="method predict: bundled model or checkpoint")
    ap.add_argument("--instance-steps", type=int, default=0, help="method predict: instance optimisation")
    ap.add_argument("--passes", type=int, default=1, help="method predict: network passes")
    ap.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                    help="method predict: average both directions (default: the model's)")
    ap.add_argument("--instance-method", default=None, choices=["adam", "greedy"],
                    help="method predict: instance optimisation method (default: medreg's)")
    ap.add_argument("--initialisation", default=None, help="method predict: initial alignment")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results.json")
    ap.add_argument("--data", default=str(default_data_root()))
    ap.add_argument("--workdir", default=f"/tmp/medreg_bench_{os.getuid()}")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per registration")
    ap.add_argument("--resume", action="store_true", help="keep rows already in --out")
    ap.add_argument("--keep", action="store_true", help="keep warped labels and fields")
    ap.add_argument("--no-hd95", action="store_true", help="skip surface distances")
    ap.add_argument("--render", nargs="+", metavar="JSON",
                    help="print the markdown tables of earlier --out files and exit")
    a = ap.parse_args(argv)

    if a.render:
        print(markdown(summarize(_load_rows(a.render))))
        return 0
    a.preset_for = dict(s.split("=", 1) for s in a.preset_for)
    a.workdir = str(Path(a.workdir).resolve())
    a.data = str(Path(a.data).resolve())
    methods = a.method or list(METHODS)
    datasets = a.dataset or ["vxm"]
    if not medreg_available():
        methods = [m for m in methods if m not in ("medreg", "predict")]
    os.environ.update(_env(a.threads))  # the parent's evaluation uses the same threads
    import torch

    torch.set_num_threads(a.threads)

    out_path = Path(a.out)
    rows: list[dict] = []
    if a.resume and out_path.exists():
        rows = [r for r in json.loads(out_path.read_text())["rows"] if r.get("status") == "ok"]
    done = {(r["dataset"], r["pair"], r["method"], r.get("preset")) for r in rows}
    meta = {"argv": [sys.executable, *sys.argv], "versions": _versions(), "threads": a.threads,
            "seed": a.seed, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "nice": os.nice(0), "rss_floor_mb": rss_floor_mb()}

    def save() -> None:
        payload = {"meta": meta, "rows": rows, "summary": summarize(rows)}
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, out_path)

    for ds in datasets:
        pairs = build_pairs(ds, Path(a.data), Path(a.workdir), a.pairs, a.seed)
        for pair in pairs:
            for method in methods:
                preset = _tag(method, pair, a)
                if (ds, pair.name, method, preset) in done:
                    continue
                row = run_one(method, pair, a)
                rows.append(row)
                save()
                msg = (f"[bench] {ds:11s} {pair.name:28s} {method + (':' + preset if preset else ''):14s}"
                       f" {row['status']:11s} wall {row['wall_s']:7.1f}s reg "
                       f"{row.get('reg_s', float('nan')):7.1f}s rss {row['peak_rss_mb']:7.0f}MB")
                if row.get("dice") is not None:
                    msg += f" dice {row['dice']:.3f} hd95 {row.get('hd95') or float('nan'):.2f}"
                if row.get("sdlogj") is not None:
                    msg += f" sdlogj {row['sdlogj']:.3f} fold {row['folding_percent']:.4f}%"
                if row.get("tre_corrected51") is not None:
                    msg += f" tre51 {row['tre_corrected51']:.2f}"
                if row.get("consistency") is not None:
                    msg += f" cons {row['consistency']:.4f}"
                if row.get("error"):
                    msg += f" ({row['error'][:200]})"
                print(msg, flush=True)
    save()
    print(markdown(summarize(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
