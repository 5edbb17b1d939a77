r"""Reading and writing landmark (point) files. Points are ``(K, D)`` float64 tensors in LPS mm.

Formats, chosen by the file ending:

``.csv``
    A header row naming the coordinate columns: ``x,y[,z]`` (LPS mm, medreg's own format),
    ``l,p,s`` (LPS) or ``r,a,s`` (RAS, converted), case-insensitive; a ``label``, ``name`` or
    ``id`` column holds the points' names, other columns are ignored. A file without a header
    must have exactly 2 or 3 numeric columns (taken as LPS). Written as ``x,y,z`` (``x,y`` in
    2D), with a first ``label`` column when the points have names.
``.fcsv``
    3D Slicer markups. The ``# CoordinateSystem =`` line says ``RAS``/``0`` (the default when
    absent), ``LPS``/``1`` or ``IJK``/``2`` (voxel index: needs ``grid=``); the ``# columns =``
    line locates ``x, y, z``. Written in RAS (``CoordinateSystem = RAS``), which every Slicer
    version reads.
``.json`` (``.mrk.json``)
    3D Slicer 5 markups JSON: the control points of every markup, in the file's
    ``coordinateSystem`` (``LPS`` or ``RAS``). Written in LPS.
``.txt``, ``.pts`` (and any other ending)
    Whitespace-separated text, one point per line, ``#`` comments allowed; or elastix point
    sets: a first line ``point`` (world mm, LPS as ITK) or ``index`` (voxel index: needs
    ``grid=``), a line with the count, then the points; or transformix's ``outputpoints.txt``
    (its ``OutputPoint = [ ... ]`` values are read). Written as elastix ``point`` sets, readable
    by elastix/transformix.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from medreg.core.enums import Frame
from medreg.core.errors import InputError
from medreg.core.grid import Grid
from medreg.io.paths import check_output_path

__all__ = ["read_landmarks", "read_named_landmarks", "write_landmarks"]

#: CSV header names of the column holding the points' names, in order of preference
_CSV_NAME_COLUMNS = ("label", "name", "id")

#: Multiplying an ``x, y, z`` point by this flips RAS ↔ LPS (its own inverse).
_FLIP = np.array([-1.0, -1.0, 1.0])

_CSV_AXES = {("x", "y", "z"): "LPS", ("l", "p", "s"): "LPS", ("r", "a", "s"): "RAS"}

_FCSV_SYSTEMS = {"0": "RAS", "ras": "RAS", "1": "LPS", "lps": "LPS", "2": "IJK", "ijk": "IJK"}

_FCSV_COLUMNS = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label",
                 "desc", "associatedNodeID"]

_OUTPUT_POINT = re.compile(r"OutputPoint\s*=\s*\[([^\]]*)\]")


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".fcsv"):
        return "fcsv"
    if name.endswith(".json"):
        return "json"
    return "text"


def _floats(values: Sequence[str], path: Path, where: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise InputError(f"{path}: {where}: expected numbers, got {list(values)!r}") from None


def _to_lps(points: np.ndarray, system: str, path: Path, grid: Grid | None) -> np.ndarray:
    """Points given in ``system`` (LPS, RAS or IJK voxel index) → LPS mm."""
    if system == "LPS":
        return points
    if system == "RAS":
        if points.shape[1] != 3:
            raise InputError(f"{path}: RAS points must be 3D, got {points.shape[1]} coordinates")
        return points * _FLIP
    if grid is None:
        raise InputError(f"{path}: the points are voxel indices; pass the image's grid "
                         "(read_landmarks(path, grid=image.grid)) to convert them to mm")
    if grid.ndim != points.shape[1]:
        raise InputError(f"{path}: {points.shape[1]}D voxel indices do not fit a {grid.ndim}D "
                         "grid")
    return grid.transform_points(torch.from_numpy(points), Frame.INDEX, Frame.WORLD).numpy()


# ---------------------------------------------------------------------------------- readers
def _read_csv(path: Path, text: str) -> tuple[np.ndarray, str, list[str] | None]:
    rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
    if not rows:
        return np.zeros((0, 3)), "LPS", None
    head = [c.strip().lower() for c in rows[0]]
    try:
        [float(c) for c in head]
        has_header = False
    except ValueError:
        has_header = True
    if not has_header:
        width = len(rows[0])
        if width not in (2, 3):
            raise InputError(f"{path}: a CSV without a header must have 2 or 3 columns "
                             f"(x,y[,z]); got {width}. Add a header row 'x,y,z'")
        cols, system, body, name_col = list(range(width)), "LPS", rows, None
    else:
        for axes, system in _CSV_AXES.items():
            if all(a in head for a in axes[:2]):
                names = [a for a in axes if a in head]
                cols = [head.index(a) for a in names]
                break
        else:
            raise InputError(f"{path}: the CSV header {rows[0]!r} names no coordinate columns; "
                             "expected x,y,z (LPS mm), l,p,s or r,a,s")
        body = rows[1:]
        name_col = next((head.index(c) for c in _CSV_NAME_COLUMNS if c in head), None)
    pts, names = [], []
    for n, row in enumerate(body, start=2 if has_header else 1):
        if len(row) <= max(cols):
            raise InputError(f"{path}: line {n} has {len(row)} columns, expected "
                             f"{max(cols) + 1} or more")
        pts.append(_floats([row[c] for c in cols], path, f"line {n}"))
        if name_col is not None:
            names.append(row[name_col].strip() if name_col < len(row) else "")
    return (np.asarray(pts, dtype=np.float64).reshape(-1, len(cols)), system,
            names if name_col is not None else None)


def _read_fcsv(path: Path, text: str) -> tuple[np.ndarray, str, list[str] | None]:
    system, cols, pts, names, label = "RAS", [1, 2, 3], [], [], _FCSV_COLUMNS.index("label")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                if value.lower() not in _FCSV_SYSTEMS:
                    raise InputError(f"{path}: unknown CoordinateSystem {value!r} "
                                     "(expected RAS, LPS, IJK or 0, 1, 2)")
                system = _FCSV_SYSTEMS[value.lower()]
            elif key == "columns":
                columns = [c.strip().lower() for c in value.split(",")]
                if not all(a in columns for a in "xyz"):
                    raise InputError(f"{path}: the columns line names no x, y, z columns")
                cols = [columns.index(a) for a in "xyz"]
                label = columns.index("label") if "label" in columns else None
            continue
        row = next(csv.reader([line]))
        if len(row) <= max(cols):
            raise InputError(f"{path}: line {n} has {len(row)} fields, expected "
                             f"{max(cols) + 1} or more")
        pts.append(_floats([row[c] for c in cols], path, f"line {n}"))
        names.append(row[label].strip() if label is not None and label < len(row) else "")
    return np.asarray(pts, dtype=np.float64).reshape(-1, 3), system, (names if label is not None else None)


def _read_json(path: Path, text: str) -> tuple[np.ndarray, str, list[str] | None]:
    try:
        doc = json.loads(text)
        markups = doc["markups"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{path}: not a Slicer markups JSON file (no 'markups' list)") from None
    systems, pts, names = set(), [], []
    for markup in markups:
        systems.add(str(markup.get("coordinateSystem", "LPS")).upper())
        for cp in markup.get("controlPoints", []):
            if "position" not in cp:
                raise InputError(f"{path}: a control point has no position")
            pts.append(_floats(cp["position"], path, "control point"))
            names.append(str(cp.get("label", "")))
    if len(systems) > 1 or not systems <= {"LPS", "RAS"}:
        raise InputError(f"{path}: unsupported coordinate systems {sorted(systems)}")
    return (np.asarray(pts, dtype=np.float64).reshape(-1, 3), (systems.pop() if systems else "LPS"),
            names)


def _read_text(path: Path, text: str) -> tuple[np.ndarray, str, None]:
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    numbered = [(n, ln) for n, ln in enumerate(lines, start=1) if ln]
    if any("OutputPoint" in ln for _, ln in numbered):  # transformix outputpoints.txt
        pts = [_floats(m.group(1).split(), path, f"line {n}")
               for n, ln in numbered for m in [_OUTPUT_POINT.search(ln)] if m]
        return np.asarray(pts, dtype=np.float64), "LPS", None
    system, count = "LPS", None
    if numbered and numbered[0][1].lower() in ("point", "index"):
        system = "LPS" if numbered[0][1].lower() == "point" else "IJK"
        if len(numbered) < 2:
            raise InputError(f"{path}: elastix point file without a point count")
        n, value = numbered[1]
        try:
            count = int(value)
        except ValueError:
            raise InputError(f"{path}: line {n}: expected the number of points, got "
                             f"{value!r}") from None
        numbered = numbered[2:]
    pts = [_floats(ln.replace(",", " ").split(), path, f"line {n}") for n, ln in numbered]
    widths = {len(p) for p in pts}
    if len(widths) > 1 or not widths <= {2, 3}:
        raise InputError(f"{path}: every line must hold 2 or 3 coordinates (x y [z]); found "
                         f"lines with {sorted(widths)} values")
    if count is not None and count != len(pts):
        raise InputError(f"{path}: the header announces {count} points but {len(pts)} follow")
    return np.asarray(pts, dtype=np.float64).reshape(-1, widths.pop() if widths else 3), system, None


_READERS = {"csv": _read_csv, "fcsv": _read_fcsv, "json": _read_json, "text": _read_text}


def read_landmarks(path: str | os.PathLike, *, grid: Grid | None = None) -> Tensor:
    """The points of a landmark file: :func:`read_named_landmarks` without the names."""
    return read_named_landmarks(path, grid=grid)[0]


def read_named_landmarks(path: str | os.PathLike, *, grid: Grid | None = None
                         ) -> tuple[Tensor, list[str] | None]:
    """Read a landmark file (see the module docstring for the formats) with its points' names.

    Args:
        path: the file.
        grid: the image grid, needed only for files that store voxel indices (elastix
            ``index`` files, Slicer ``IJK`` markups).

    Returns:
        ``(K, D)`` float64 tensor of points in LPS mm, ``x, y, z`` order (``D`` = 2 or 3), and
        the ``K`` names (CSV ``label``/``name``/``id`` column, Slicer labels; ``None`` when the
        file has none).

    Raises:
        InputError: missing or malformed file, or voxel-index points without ``grid``.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the landmark file ({exc})") from None
    points, system, names = _READERS[_kind(path)](path, text)
    points = _to_lps(points, system, path, grid)
    if not np.all(np.isfinite(points)):
        raise InputError(f"{path}: some landmark coordinates are NaN or infinite")
    return torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64)), names


# ---------------------------------------------------------------------------------- writers
def _fmt(v: float) -> str:
    return repr(float(v))  # shortest text that reads back to the same float64


def _write_csv(pts: np.ndarray, names: list[str] | None) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    axes = ["x", "y", "z"][:pts.shape[1]]
    w.writerow((["label"] if names is not None else []) + axes)
    for i, p in enumerate(pts):
        w.writerow(([names[i]] if names is not None else []) + [_fmt(v) for v in p])
    return out.getvalue()


def _write_fcsv(pts: np.ndarray, names: list[str] | None) -> str:
    lines = ["# Markups fiducial file version = 4.11", "# CoordinateSystem = RAS",
             "# columns = " + ",".join(_FCSV_COLUMNS)]
    for i, p in enumerate(pts * _FLIP):
        label = names[i].replace(",", " ") if names is not None else f"F-{i + 1}"  # (no quoting in .fcsv)
        lines.append(f"vtkMRMLMarkupsFiducialNode_{i}," + ",".join(_fmt(v) for v in p)
                     + f",0,0,0,1,1,1,0,{label},,")
    return "\n".join(lines) + "\n"


def _write_json(pts: np.ndarray, names: list[str] | None) -> str:
    doc = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
                   "Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [{
            "type": "Fiducial",
            "coordinateSystem": "LPS",
            "coordinateUnits": "mm",
            "controlPoints": [{"id": str(i + 1), "label": names[i] if names is not None else f"F-{i + 1}",
                               "position": [float(v) for v in p], "positionStatus": "defined"}
                              for i, p in enumerate(pts)],
        }],
    }
    return json.dumps(doc, indent=2) + "\n"


def _write_text(pts: np.ndarray, names: list[str] | None) -> str:  # (elastix point sets hold no names)
    return "\n".join(["point", str(len(pts))] + [" ".join(_fmt(v) for v in p) for p in pts]) + "\n"


_WRITERS = {"csv": _write_csv, "fcsv": _write_fcsv, "json": _write_json, "text": _write_text}


def write_landmarks(points: Tensor | np.ndarray | Sequence[Sequence[float]],
                    path: str | os.PathLike, *, overwrite: bool = True,
                    names: Sequence[str] | None = None) -> None:
    """Write ``(K, D)`` points given in LPS mm; the format follows the ending (module docstring).

    Values are written with full float64 precision, so reading them back is exact.

    Args:
        points: ``(K, 2)`` or ``(K, 3)`` points, LPS mm (any device; gradients are ignored).
        path: output file; its folder must exist.
        overwrite: replace an existing file (``False``: raise instead).
        names: one name per point (CSV ``label`` column, Slicer labels; elastix point sets
            cannot hold them, and in ``.fcsv``, which has no quoting, a comma becomes a space).

    Raises:
        InputError: bad shape, a name count that is not the point count, non-finite values, 2D points for a 3D-only format (Slicer),
            missing folder, or an existing file with ``overwrite=False``.
    """
    path = Path(path)
    if isinstance(points, Tensor):
        points = points.detach().cpu().numpy()
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] not in (2, 3):
        raise InputError(f"{path}: landmarks must be a (K, 2) or (K, 3) array, got shape "
                         f"{pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise InputError(f"{path}: some landmark coordinates are NaN or infinite")
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(pts):
            raise InputError(f"{path}: {len(names)} names for {len(pts)} landmarks")
    kind = _kind(path)
    if kind in ("fcsv", "json") and pts.shape[1] != 3:
        raise InputError(f"{path}: Slicer markups hold 3D points; use .csv or .txt for 2D")
    check_output_path(path, overwrite)
    try:
        path.write_text(_WRITERS[kind](pts, names), encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the landmark file ({exc})") from None
