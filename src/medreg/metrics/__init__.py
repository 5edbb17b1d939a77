r"""Evaluation of registrations: label overlap, surface distances, TRE and field regularity.

Every number is in physical units (mm, mm³, %) and every metric states the definition it
follows (Learn2Reg, LUMIR, textbook) in its module docstring. Results are dataclasses with a
``to_dict()`` or plain dicts, JSON-ready (undefined values are ``None``).

* :func:`label_metrics` — Dice, HD95, Hausdorff, ASSD per label and their means
  (:mod:`medreg.metrics.overlap`, :mod:`medreg.metrics.surface`).
* :func:`displacement_metrics` — SD log-Jacobian (textbook ``sdlogj`` and Learn2Reg's
  ``sdlogj_l2r``), folding, LUMIR's non-diffeomorphic volume (:mod:`medreg.metrics.jacobian`).
* :func:`tre` — target registration error of landmark pairs, ``‖T(fixed) − moving‖``
  (:mod:`medreg.metrics.landmarks`).
* :func:`summarize_cohort` — mean ± std and Learn2Reg's worst-30 % robustness over pairs
  (:mod:`medreg.metrics.cohort`); :class:`L2RTask` and :func:`evaluate_l2r_pair` for Learn2Reg
  tasks (:mod:`medreg.metrics.l2r`).
* :func:`read_label_names`, :func:`read_label_table`, :func:`parse_label_list` — label names
  from ITK-SNAP / FreeSurfer LUTs or JSON (:mod:`medreg.metrics.lut`).
"""

from medreg.metrics._common import Timer, to_jsonable
from medreg.metrics.cohort import format_summary, higher_is_better, summarize_cohort
from medreg.metrics.jacobian import (DISPLACEMENT_DEFINITIONS, displacement_metrics, folding,
                                     jacobian_determinant, non_diffeomorphic_volume, sdlogj,
                                     sdlogj_l2r)
from medreg.metrics.l2r import L2RPair, L2RTask, evaluate_l2r_pair, l2r_points_to_world
from medreg.metrics.landmarks import TREResult, distance_stats, field_transform, tre
from medreg.metrics.lut import (LabelInfo, parse_label_list, read_label_list, read_label_names,
                                read_label_table)
from medreg.metrics.overlap import LabelMetrics, LabelScore, dice, label_metrics
from medreg.metrics.surface import (assd, hausdorff, hd95, surface, surface_distances,
                                    surface_metrics)

__all__ = [
    "DISPLACEMENT_DEFINITIONS", "L2RPair", "L2RTask", "LabelInfo", "LabelMetrics", "LabelScore",
    "TREResult", "Timer", "assd", "dice", "displacement_metrics", "distance_stats",
    "evaluate_l2r_pair", "field_transform", "folding", "format_summary", "hausdorff", "hd95",
    "higher_is_better", "jacobian_determinant", "l2r_points_to_world", "label_metrics",
    "non_diffeomorphic_volume", "parse_label_list", "read_label_list", "read_label_names",
    "read_label_table", "sdlogj", "sdlogj_l2r", "summarize_cohort", "surface",
    "surface_distances", "surface_metrics", "to_jsonable", "tre",
]
