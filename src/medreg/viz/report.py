r"""A self-contained HTML report of a registration output folder.

:func:`write_report` gathers what ``medreg register`` / ``medreg evaluate`` leave in a folder
(``metrics.json``, ``qc.png`` and any other ``*.png``) into one ``report.html``: figures
embedded as base64 ``data:`` URIs, inline CSS, no script and no external link, so it opens
offline and can be mailed or archived as a single file. Sections: headline numbers, figures,
per-label table, landmark errors, settings, software versions, all metrics.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medreg.core.errors import InputError
from medreg.metrics._common import to_jsonable

__all__ = ["write_report", "render_report", "software_versions"]

_PACKAGES = ("medreg", "torch", "numpy", "scipy", "SimpleITK", "nibabel", "matplotlib", "click")

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;
max-width:1800px}
h1{font-size:22px;margin-bottom:2px}h2{font-size:17px;border-bottom:1px solid #ddd;
padding-bottom:3px;margin-top:28px}
.sub{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.warn td{background:#fff3cd}
figure{margin:10px 0}figure img{max-width:100%;border:1px solid #ccc}
figcaption{font-size:12px;color:#555}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:120px}
.card .v{font-size:20px;font-weight:600}.card .k{font-size:12px;color:#666}
details{margin:8px 0}pre{background:#f7f7f7;padding:8px;font-size:12px;overflow-x:auto}
"""


def software_versions() -> dict[str, str]:
    """Versions of Python, the platform and medreg's main dependencies (now)."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) > 12:
            return ", ".join(_fmt(x) for x in v[:12]) + f", … ({len(v)} values)"
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            rows += _flatten(v, key + ".")
        elif isinstance(v, list) and v and isinstance(v[0], Mapping):
            rows.append((key, f"[{len(v)} entries]"))
        else:
            rows.append((key, v))
    return rows


def _table(rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None,
           warn: Sequence[bool] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for i, row in enumerate(rows):
        cls = ' class="warn"' if warn is not None and warn[i] else ""
        cells = []
        for v in row:
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            attr = ' class="num"' if num else ""
            cells.append(f"<td{attr}>{html.escape(_fmt(v))}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


#: Section names as ``medreg evaluate`` writes them, and their ``medreg register`` aliases.
_ALIASES = {"labels": ("labels", "labels_after"), "displacement": ("displacement", "jacobian")}


def _find(metrics: Mapping[str, Any], *path: str) -> Any:
    for first in _ALIASES.get(path[0], (path[0],)):
        cur: Any = metrics
        for p in (first,) + path[1:]:
            if not isinstance(cur, Mapping) or p not in cur:
                cur = None
                break
            cur = cur[p]
        if cur is not None:
            return cur
    return None


def _headline(metrics: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    cands = [
        (("labels", "mean_dice"), "mean Dice", ""),
        (("labels", "mean_hd95"), "mean HD95", "mm"),
        (("labels", "mean_assd"), "mean ASSD", "mm"),
        (("landmarks", "mean"), "TRE mean", "mm"),
        (("landmarks", "initial", "mean"), "TRE before", "mm"),
        (("displacement", "sdlogj"), "SD log|J|", ""),
        (("displacement", "sdlogj_l2r"), "SDlogJ (L2R)", ""),
        (("displacement", "folding_percent"), "folded voxels", "%"),
        (("displacement", "ndv_percent"), "NDV", "%"),
        (("dice_before",), "Dice before", ""),
        (("similarity_before",), "similarity before", ""),
        (("similarity_after",), "similarity after", ""),
        (("runtime_s",), "runtime", "s"),
    ]
    out = []
    for path, name, unit in cands:
        v = _find(metrics, *path)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((name, v, unit))
    return out


def _img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(path.name)}</figcaption></figure>")


def render_report(metrics: Mapping[str, Any] | None, figures: Sequence[Path], *,
                  title: str = "medreg registration report", source: str = "",
                  versions: Mapping[str, str] | None = None) -> str:
    """The report's HTML text (see :func:`write_report`)."""
    metrics = to_jsonable(dict(metrics or {}))
    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>", f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<div class="sub">{html.escape(source)} · generated {now}</div>',
    ]
    head = _headline(metrics)
    if head:
        parts.append("<h2>Summary</h2><div class='cards'>")
        for name, v, unit in head:
            parts.append(f"<div class='card'><div class='v'>{html.escape(_fmt(v))} "
                         f"{html.escape(unit)}</div><div class='k'>{html.escape(name)}</div></div>")
        parts.append("</div>")
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_img_tag(p) for p in figures]
    per_label = _find(metrics, "labels", "per_label")
    if isinstance(per_label, list) and per_label:
        parts.append("<h2>Labels</h2>")
        lab = _find(metrics, "labels")
        notes = []
        for key, text in (("absent_labels", "absent from both maps (not averaged)"),
                          ("missing_in_warped", "lost in the warped map (Dice 0)"),
                          ("missing_in_fixed", "only in the warped map (Dice 0)")):
            if lab.get(key):
                notes.append(f"{text}: {_fmt(lab[key])}")
        if notes:
            parts.append("<p>" + "<br>".join(html.escape(n) for n in notes) + "</p>")
        cols = ["label", "name", "status", "dice", "hd95", "assd", "voxels_fixed",
                "voxels_warped"]
        rows = [[r.get(c) for c in cols] for r in per_label]
        parts.append(_table(rows, ["label", "name", "status", "Dice", "HD95 mm", "ASSD mm",
                                   "voxels fixed", "voxels warped"],
                            warn=[r.get("status") != "ok" for r in per_label]))
    lms = _find(metrics, "landmarks")
    if isinstance(lms, Mapping) and "per_landmark" in lms:
        parts.append("<h2>Landmarks (TRE, mm)</h2>")
        stats = [(k, lms.get(k), (lms.get("initial") or {}).get(k))
                 for k in ("mean", "std", "median", "p90", "max")]
        parts.append(_table(stats, ["statistic", "after", "before"]))
    settings = {k: metrics[k] for k in ("settings", "preset", "preset_config", "config", "inputs",
                                        "fixed", "moving") if k in metrics}
    if settings:
        parts.append("<h2>Settings</h2>")
        parts.append(_table(_flatten(settings), ["setting", "value"]))
    vers = dict(metrics.get("versions") or {})
    now_vers = dict(versions or software_versions())
    parts.append("<h2>Software</h2>")
    keys = list(dict.fromkeys(list(vers) + list(now_vers)))
    parts.append(_table([(k, vers.get(k, ""), now_vers.get(k, "")) for k in keys],
                        ["package", "at registration", "at report"]))
    if metrics:
        rest = {k: v for k, v in metrics.items() if k not in ("versions",)}
        parts.append("<h2>All metrics</h2><details><summary>table</summary>")
        parts.append(_table(_flatten(rest), ["metric", "value"]))
        parts.append("</details><details><summary>JSON</summary><pre>")
        parts.append(html.escape(json.dumps(metrics, indent=2)))
        parts.append("</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(outdir: str | os.PathLike, path: str | os.PathLike | None = None, *,
                 metrics: Mapping[str, Any] | None = None,
                 figures: Sequence[str | os.PathLike] | None = None,
                 title: str | None = None) -> Path:
    """Write ``report.html`` for a registration output folder.

    Args:
        outdir: the folder (``metrics.json``, ``qc.png``, other ``*.png``).
        path: output file; default ``outdir/report.html``.
        metrics: metrics to show; default ``outdir/metrics.json`` when it exists.
        figures: PNG files to embed; default every ``*.png`` in ``outdir`` (``qc.png`` first).
        title: page title.

    Returns:
        The path written.

    Raises:
        InputError: ``outdir`` is not a folder, ``metrics.json`` is not valid JSON, or there
            is nothing to report (no metrics and no figure).
    """
    d = Path(outdir)
    if not d.is_dir():
        raise InputError(f"{d}: not a folder")
    if metrics is None:
        mpath = d / "metrics.json"
        if mpath.is_file():
            try:
                metrics = json.loads(mpath.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise InputError(f"{mpath}: invalid JSON ({exc.msg}, line {exc.lineno})") \
                    from None
            if not isinstance(metrics, dict):
                raise InputError(f"{mpath}: expected a JSON object")
    if figures is None:
        pngs = sorted(d.glob("*.png"), key=lambda p: (p.name != "qc.png", p.name))
    else:
        pngs = [Path(f) for f in figures]
        for p in pngs:
            if not p.is_file():
                raise InputError(f"{p}: figure not found")
    if not metrics and not pngs:
        raise InputError(f"{d}: nothing to report (no metrics.json and no .png figure)")
    text = render_report(metrics, pngs, title=title or f"medreg report: {d.resolve().name}",
                         source=str(d.resolve()))
    out = Path(path) if path is not None else d / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
