"""An image: a tensor of voxels and the :class:`~medreg.core.grid.Grid` it lives on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from medreg.core.errors import InputError
from medreg.core.grid import Grid


@dataclass
class Image:
    """Voxel data with geometry.

    Attributes:
        data: ``(C, *grid.shape)`` tensor (a ``(*grid.shape)`` tensor gets a channel axis).
            Integer dtypes mark label maps.
        grid: where the voxels are in world space (LPS mm).
        name: where it came from (a path), used in messages.
        meta: file-format details that a writer keeps when the image (or an output on its grid)
            is written again: ``nifti_codes``, the NIfTI ``(sform_code, qform_code)`` that say
            which space the world coordinates are in (scanner, aligned, MNI, ...);
            ``nifti_affine``, a 2D slice's 4×4 matrix (its place along the third axis);
            ``stored_dtype``, ``"uint16"`` for voxels widened to int32 when read.
    """

    data: Tensor
    grid: Grid
    name: str = "<image>"
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.data, Tensor):
            self.data = torch.as_tensor(self.data)
        if self.data.dim() == self.grid.ndim:
            self.data = self.data.unsqueeze(0)
        if tuple(self.data.shape[1:]) != self.grid.shape:
            raise InputError(
                f"{self.name}: data shape {tuple(self.data.shape)} does not match the grid "
                f"shape (C, {', '.join(map(str, self.grid.shape))})"
            )

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def is_label(self) -> bool:
        """True for integer (or boolean) data: label maps and masks."""
        return not (self.data.is_floating_point() or self.data.is_complex())

    def batch(self, dtype: torch.dtype | None = None) -> Tensor:
        """``(1, C, *shape)`` view, optionally cast (labels stay integer unless asked)."""
        x = self.data if dtype is None else self.data.to(dtype)
        return x.unsqueeze(0)

    def to(self, *args, **kwargs) -> "Image":
        return Image(self.data.to(*args, **kwargs), self.grid, self.name, dict(self.meta))

    def with_data(self, data: Tensor) -> "Image":
        """Same grid, name and meta, new voxels."""
        return Image(data, self.grid, self.name, dict(self.meta))
