"""File-name helpers shared by every reader and writer (and the CLI's output checks), and the
one YAML reader of config files; :func:`quiet_c_stderr` keeps C libraries' own error printing
(HDF5, ITK's output window) off the terminal while a reader raises its own one-line error."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from medreg.core.errors import InputError


def file_suffix(path: str | os.PathLike) -> str:
    """Lower-case file ending, with ``.nii.gz`` as one ending."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(path).suffix.lower()


def check_output_path(path: str | os.PathLike, overwrite: bool, *,
                      how: str = "pass overwrite=True") -> Path:
    """The output file ``path``, checked before anything is computed or written.

    Raises:
        InputError: its folder is missing, it is a folder, or it exists and ``overwrite`` is
            false (``how`` says how to allow it, e.g. ``"pass --overwrite"``).
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{p}: the folder {parent} does not exist; create it first")
    if p.is_dir():
        raise InputError(f"{p}: is a folder; give a file name")
    if p.exists() and not overwrite:
        raise InputError(f"{p}: exists already; {how} to replace it")
    return p


def config_loader():
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-3`` is a number (YAML 1.1, which PyYAML
    follows, reads a float without a dot as text)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return Loader


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML config file as a mapping (empty file: ``{}``); a missing file or invalid YAML is
    an ``InputError`` naming the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{p}: not a YAML text file (binary content; an image given as the "
                         "config?)") from None
    try:
        data = yaml.load(text, Loader=config_loader())
    except yaml.YAMLError as exc:
        raise InputError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if data is not None and not isinstance(data, dict):
        raise InputError(f"{p}: a config file must hold a mapping (key: value), not {type(data).__name__}")
    return data or {}


@contextlib.contextmanager
def quiet_c_stderr(active: bool = True):
    """Silence what C libraries write to file descriptor 2 meanwhile (the HDF5 library prints a
    26-line error stack for a truncated file before ITK raises its own error)."""
    try:
        saved = os.dup(2) if active else None
    except OSError:  # no standard error to silence
        saved = None
    if saved is None:
        yield
        return
    try:
        sys.stderr.flush()  # what Python wrote before goes out; keep these blocks to C calls
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
