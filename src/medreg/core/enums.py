"""Option enums, each validated and translated in one place (``from_arg``)."""

from __future__ import annotations

from enum import Enum

from medreg.core.errors import InputError


class _ArgEnum(str, Enum):
    """A string enum with aliases, parsed by :meth:`from_arg` with a clear error."""

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {}

    @classmethod
    def from_arg(cls, value: "str | _ArgEnum") -> "_ArgEnum":
        if isinstance(value, cls):
            return value
        key = str(value).strip().lower()
        key = cls._aliases().get(key, key)
        for member in cls:
            if member.value == key:
                return member
        choices = ", ".join(m.value for m in cls)
        raise InputError(f"unknown {cls.__name__.lower()} {value!r}; choose one of: {choices}")


class Frame(_ArgEnum):
    """Coordinate frames of a :class:`~medreg.core.grid.Grid`."""

    INDEX = "index"  #: continuous voxel index, x, y, z order
    NORM = "norm"  #: grid_sample coordinates, align_corners=True
    WORLD = "world"  #: LPS millimetres

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"voxel": "index", "grid": "index", "normalised": "norm", "normalized": "norm",
                "cube": "norm", "mm": "world", "physical": "world"}


class Interpolation(_ArgEnum):
    """Image interpolation."""

    NEAREST = "nearest"
    LINEAR = "linear"
    BSPLINE = "bspline"  #: cubic B-spline (with prefilter, as ITK's BSplineInterpolateImageFunction)

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"nn": "nearest", "trilinear": "linear", "bilinear": "linear",
                "cubic": "bspline", "bspline3": "bspline"}


class Padding(_ArgEnum):
    """Value used where a sample falls outside the moving image."""

    ZEROS = "zeros"  #: constant 0 (use ``fill`` for another constant)
    BORDER = "border"  #: nearest edge voxel
    REFLECTION = "reflection"  #: mirrored

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"zero": "zeros", "constant": "zeros", "edge": "border", "nearest": "border",
                "mirror": "reflection"}
