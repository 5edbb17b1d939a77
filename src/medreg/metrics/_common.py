"""Helpers shared by the metric modules: JSON conversion, label-map checks, timing."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, is_dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.grid import Grid
from medreg.core.image import Image


def to_jsonable(obj: Any) -> Any:
    """Plain-Python copy of ``obj`` that :func:`json.dumps` writes as strict JSON.

    Dataclasses become dicts, tensors and numpy values become lists or numbers, and non-finite
    floats (NaN, ±inf: an undefined metric) become ``None`` (JSON ``null``).
    """
    if is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_dict"):
            return to_jsonable(obj.to_dict())
        return to_jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return to_jsonable(obj.detach().cpu().tolist() if obj.dim() else obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def check_same_grid(a: Image, b: Image, what: str = "label maps") -> None:
    """Raise :class:`InputError` naming both files unless ``a`` and ``b`` share one grid."""
    for x in (a, b):
        if not hasattr(x, "grid"):
            raise InputError(f"{what}: expected medreg Images (with their grids), got "
                             f"{type(x).__name__}; wrap an array as medreg.core.Image(data, grid)")
    if a.grid.ndim != b.grid.ndim:
        raise InputError(f"{what} differ in dimension: {a.name} is {a.grid.ndim}D, "
                         f"{b.name} is {b.grid.ndim}D")
    if a.grid.shape != b.grid.shape:
        raise InputError(
            f"{what} have different shapes: {a.name} {a.grid.size} vs {b.name} {b.grid.size} "
            "(x, y, z); resample one onto the other's grid first")
    if not a.grid.allclose(b.grid, atol=1e-3):
        raise InputError(
            f"{what} have different geometry (spacing/origin/direction): {a.name} {a.grid!r} vs "
            f"{b.name} {b.grid!r}; resample one onto the other's grid first")


def label_array(image: Image) -> np.ndarray:
    """The single channel of a label map as an integer numpy array in tensor order ``(z, y, x)``.

    Raises:
        InputError: several channels, NaN/inf voxels or non-integral values (naming the file).
    """
    if image.channels != 1:
        raise InputError(f"{image.name}: a label map must have one channel, got {image.channels}")
    data = image.data[0].detach().cpu()
    if data.is_floating_point():
        if not bool(torch.isfinite(data).all()):
            bad = int((~torch.isfinite(data)).sum())
            raise InputError(f"{image.name}: label map contains {bad} NaN or infinite voxels")
        if not torch.equal(data, data.round()):
            raise InputError(f"{image.name}: label map has non-integer values; is it an "
                             "intensity image?")
        data = data.to(torch.int64)
    elif data.dtype == torch.bool:
        data = data.to(torch.uint8)
    return data.numpy()


def spacing_zyx(grid: Grid) -> tuple[float, ...]:
    """Voxel spacing in mm in tensor axis order (``(z, y, x)``), as scipy's ``sampling=`` wants."""
    return tuple(reversed(grid.spacing))


class Timer:
    """Wall-clock timer (seconds) usable as a context manager.

    Synchronises CUDA (when it is in use) on entry and exit so that GPU work is counted.

    Example::

        with Timer() as t:
            run_registration()
        metrics["runtime_s"] = t.seconds
    """

    def __init__(self) -> None:
        self.start: float | None = None
        self.seconds: float = float("nan")

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    def __enter__(self) -> "Timer":
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.seconds = time.perf_counter() - (self.start or 0.0)
