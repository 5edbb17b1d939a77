r"""Summaries over many registered pairs (cohorts, Learn2Reg tasks).

:func:`summarize_cohort` takes one flat dict of numbers per pair and gives, per metric, the
mean ± std, median, min, max and two robustness numbers:

``worst30``
    Learn2Reg's robustness score: the mean of the worst 30 % of the pairs (at least one pair;
    ``ceil(0.3 n)``). "Worst" is the lowest values for metrics where higher is better (Dice)
    and the highest values otherwise (HD95, TRE, SDlogJ, folding, NDV).

``q30_l2r``
    The 30th percentile ``numpy.quantile(values, 0.3)``: the ``"30"`` aggregate that Learn2Reg's
    ``evaluation.py`` (github.com/MDL-UzL/L2R) writes for every metric, whatever its direction.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medreg.metrics._common import to_jsonable

__all__ = ["summarize_cohort", "higher_is_better"]

#: Substrings of metric names for which a higher value is better.
HIGHER_IS_BETTER_KEYS = ("dice", "dsc", "jaccard", "overlap", "ncc", "nmi")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (by name) is better: Dice-like metrics."""
    key = metric.lower()
    return any(k in key for k in HIGHER_IS_BETTER_KEYS)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return None


def summarize_cohort(rows: Sequence[Mapping[str, Any]], *,
                     higher_better: Mapping[str, bool] | None = None,
                     worst_fraction: float = 0.3) -> dict[str, dict[str, Any]]:
    """Per-metric summary of a list of per-pair metric dicts.

    Args:
        rows: one dict per pair; every top-level numeric value is a metric (``bool``, strings,
            nested dicts and lists are ignored; ``None``/NaN count as missing).
        higher_better: override the direction of some metrics (default :func:`higher_is_better`).
        worst_fraction: fraction of pairs in the robustness score (Learn2Reg: 0.3).

    Returns:
        ``{metric: {"mean", "std", "median", "min", "max", "worst30", "q30_l2r", "n",
        "n_missing", "higher_is_better"}}`` (std with ``ddof=0`` as Learn2Reg; JSON-ready).
    """
    higher_better = dict(higher_better or {})
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k not in keys and _number(v) is not None:
                keys.append(k)
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        raw = [_number(row.get(key)) for row in rows]
        vals = np.array([v for v in raw if v is not None and math.isfinite(v)], dtype=np.float64)
        hib = higher_better.get(key, higher_is_better(key))
        entry: dict[str, Any] = {"n": int(vals.size), "n_missing": len(rows) - int(vals.size),
                                 "higher_is_better": hib}
        if vals.size:
            k = max(1, math.ceil(worst_fraction * vals.size - 1e-9))
            ordered = np.sort(vals)
            worst = ordered[:k] if hib else ordered[-k:]
            entry.update(mean=float(vals.mean()), std=float(vals.std()),
                         median=float(np.median(vals)), min=float(vals.min()),
                         max=float(vals.max()), worst30=float(worst.mean()),
                         q30_l2r=float(np.quantile(vals, 0.3)))
        else:
            entry.update(mean=None, std=None, median=None, min=None, max=None, worst30=None,
                         q30_l2r=None)
        out[key] = entry
    return to_jsonable(out)


def format_summary(summary: Mapping[str, Mapping[str, Any]], keys: Iterable[str] | None = None
                   ) -> str:
    """Readable table of a :func:`summarize_cohort` result."""
    keys = list(summary) if keys is None else [k for k in keys if k in summary]
    width = max([len(k) for k in keys] + [6])
    lines = [f"{'metric':<{width}}  {'mean ± std':>22}  {'median':>10}  {'worst 30%':>10}  "
             f"{'n':>4}"]

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.4g}"

    for k in keys:
        s = summary[k]
        ms = f"{fmt(s['mean'])} ± {fmt(s['std'])}"
        lines.append(f"{k:<{width}}  {ms:>22}  {fmt(s['median']):>10}  {fmt(s['worst30']):>10}  "
                     f"{s['n']:>4}")
    return "\n".join(lines)
