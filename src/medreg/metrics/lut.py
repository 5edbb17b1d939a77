"""Label lists and label names: ITK-SNAP and FreeSurfer look-up tables, JSON, plain lists.

Formats read by :func:`read_label_table`:

* **ITK-SNAP label description** (``IDX R G B A VIS MSH "LABEL"``, ``#`` comments): the name is
  the quoted string, the colour the three numbers after the id.
* **FreeSurfer colour LUT** (``FreeSurferColorLUT.txt``: ``No. Label-Name R G B A``) and
  similar ``id name ...`` tables (AAL's ``aal.nii.txt``): the name is the second field; the
  colour is read when three integers follow it.
* **JSON**: ``{"1": "name", ...}``, ``{"labels": {"1": "name"}}`` (the Learn2Reg
  ``*_dataset.json`` style) or a list of ``{"id"|"label"|"value": 1, "name": "..."}``.

:func:`parse_label_list` reads the ``--labels`` option (``"2,3,41"``, ranges ``"1-35"``) and
:func:`read_label_list` a labels file: a plain list of ids (comma/space/line separated) or any
of the tables above (its ids, without 0 = background).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from medreg.core.errors import InputError


@dataclass(frozen=True)
class LabelInfo:
    """Name and display colour of one label.

    Attributes:
        name: human-readable name (``""`` when unknown).
        color: ``(r, g, b)`` in 0–255, or ``None``.
    """

    name: str
    color: tuple[int, int, int] | None = None


def _int_token(tok: str) -> int | None:
    try:
        return int(tok)
    except ValueError:
        try:
            f = float(tok)
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


def _parse_text_table(text: str, name: str) -> dict[int, LabelInfo]:
    table: dict[int, LabelInfo] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            toks = shlex.split(line, comments=False)
        except ValueError:  # unbalanced quotes: fall back to whitespace
            toks = line.split()
        if not toks:
            continue
        idx = _int_token(toks[0])
        if idx is None:
            raise InputError(f"{name}:{lineno}: expected a label id first, got {toks[0]!r}")
        quoted = '"' in line or "'" in line
        color: tuple[int, int, int] | None = None
        if quoted:  # ITK-SNAP: IDX R G B A VIS MSH "LABEL"
            label_name = toks[-1]
            nums = [_int_token(t) for t in toks[1:4]]
            if len(nums) == 3 and all(n is not None for n in nums):
                color = tuple(int(n) for n in nums)  # type: ignore[assignment]
        elif len(toks) >= 2:
            label_name = toks[1]
            nums = [_int_token(t) for t in toks[2:5]]
            if len(nums) == 3 and all(n is not None and 0 <= n <= 255 for n in nums):
                color = tuple(int(n) for n in nums)  # type: ignore[assignment]
        else:
            label_name = ""
        table[idx] = LabelInfo(label_name, color)
    return table


def _parse_json_table(obj: object, name: str) -> dict[int, LabelInfo]:
    if isinstance(obj, dict) and "labels" in obj and isinstance(obj["labels"], (dict, list)):
        obj = obj["labels"]
    table: dict[int, LabelInfo] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            idx = _int_token(str(key))
            if idx is None:
                raise InputError(f"{name}: JSON label key {key!r} is not an integer id")
            if isinstance(value, dict):
                color = value.get("color") or value.get("colour")
                table[idx] = LabelInfo(str(value.get("name", "")),
                                       tuple(int(c) for c in color[:3]) if color else None)
            else:
                table[idx] = LabelInfo(str(value))
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict):
                key = next((item[k] for k in ("id", "label", "value", "index") if k in item), None)
                idx = None if key is None else _int_token(str(key))
                if idx is None:
                    raise InputError(f"{name}: JSON label entry {item!r} has no integer id")
                color = item.get("color") or item.get("colour")
                table[idx] = LabelInfo(str(item.get("name", "")),
                                       tuple(int(c) for c in color[:3]) if color else None)
            else:
                idx = _int_token(str(item))
                if idx is None:
                    raise InputError(f"{name}: JSON label entry {item!r} is not an integer id")
                table[idx] = LabelInfo("")
    else:
        raise InputError(f"{name}: JSON labels must be an object or a list")
    return table


def read_label_table(path: str | os.PathLike) -> dict[int, LabelInfo]:
    """Read label ids, names and colours from an ITK-SNAP / FreeSurfer LUT or a JSON file.

    Args:
        path: the table (see the module docstring for the formats).

    Returns:
        ``{label id: LabelInfo}`` in file order.

    Raises:
        InputError: missing, unreadable or malformed file (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"label table not found: {p}")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"{p}: cannot read label table ({exc.strerror})") from None
    stripped = text.lstrip()
    if p.suffix.lower() == ".json" or stripped.startswith(("{", "[")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{p}: invalid JSON ({exc.msg}, line {exc.lineno})") from None
        return _parse_json_table(obj, str(p))
    return _parse_text_table(text, str(p))


def read_label_names(path: str | os.PathLike) -> dict[int, str]:
    """``{label id: name}`` from a LUT or JSON file (see :func:`read_label_table`)."""
    return {k: v.name for k, v in read_label_table(path).items()}


_RANGE = re.compile(r"^\s*(-?\d+)\s*(?:-|\.\.|:)\s*(-?\d+)\s*$")


def parse_label_list(text: str, name: str = "--labels") -> list[int]:
    """Parse ``"2,3,41"``, ``"2 3 41"`` or ranges ``"1-35"`` into a list of distinct label ids.

    Raises:
        InputError: an entry that is not an integer or range, or an empty list.
    """
    out: list[int] = []
    for tok in re.split(r"[,\s;]+", text.strip()):
        if not tok:
            continue
        m = _RANGE.match(tok) if not tok.lstrip("-").isdigit() else None
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise InputError(f"{name}: empty range {tok!r}")
            out.extend(range(a, b + 1))
            continue
        value = _int_token(tok)
        if value is None:
            raise InputError(f"{name}: {tok!r} is not an integer label id")
        out.append(value)
    if not out:
        raise InputError(f"{name}: the label list is empty")
    seen: set[int] = set()
    return [v for v in out if not (v in seen or seen.add(v))]


def read_label_list(path: str | os.PathLike) -> tuple[list[int], dict[int, str]]:
    """Label ids (and names when the file has them) from a labels file.

    A file of integers only (``1,2,3`` or one per line) is a plain list. Anything else is read
    as a table (:func:`read_label_table`); its ids other than 0 (background) are returned.

    Returns:
        ``(ids, names)``; ``names`` is empty for a plain list.

    Raises:
        InputError: missing or malformed file, or no labels in it.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"labels file not found: {p}")
    text = p.read_text(encoding="utf-8", errors="replace")
    body = "\n".join(ln for ln in text.splitlines() if not ln.strip().startswith("#"))
    if body.strip() and re.fullmatch(r"[\s,;0-9\-.]+", body):
        return parse_label_list(body, str(p)), {}
    table = read_label_table(p)
    ids = [k for k in table if k != 0]
    if not ids:
        raise InputError(f"{p}: no labels (other than background 0) in the file")
    return ids, {k: table[k].name for k in ids if table[k].name}
