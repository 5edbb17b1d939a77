r"""QC figures and reports (matplotlib, Agg; pyplot is never imported).

* :func:`qc_figure` / :func:`save_qc` — ``qc.png``: fixed / moving / warped in three planes,
  checkerboards and differences before/after, label boundaries before/after, deformation grid
  and det J (:mod:`medreg.viz.qc`).
* :func:`deformation_figure` — grid and det J alone.
* :func:`write_report` — a self-contained ``report.html`` for an output folder
  (:mod:`medreg.viz.report`).
* :func:`plane_views` — radiological display planes of a grid (:mod:`medreg.viz.slices`).
"""

from medreg.viz.qc import deformation_figure, qc_figure, qc_size, save_figure, save_qc
from medreg.viz.report import render_report, software_versions, write_report
from medreg.viz.slices import PlaneView, plane_views, sample_on_view

__all__ = [
    "PlaneView", "deformation_figure", "plane_views", "qc_figure", "qc_size", "render_report",
    "sample_on_view", "save_figure", "save_qc", "software_versions", "write_report",
]
