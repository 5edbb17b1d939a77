r"""Geometry core of medreg: the conventions every other layer relies on.

Conventions (tested in ``tests/test_core_grid.py``):

* **World frame**: LPS millimetres, as ITK, ANTs, elastix and Slicer's files. NIfTI's RAS is
  converted in :mod:`medreg.io` and nowhere else.
* **Index order**: a :class:`Grid`'s ``size``, ``spacing`` and ``origin`` are in ITK order
  ``(x, y, z)``; its ``shape`` is the tensor order ``(z, y, x)``.
* **Tensors**: images are ``(N, C, *shape)``; vector fields are ``(N, D, *shape)`` with
  components in ``x, y, z`` order; point sets are ``(..., D)`` in ``x, y, z`` order.
* **Frames**: ``Frame.INDEX`` (continuous voxel index, ``x, y, z``), ``Frame.NORM``
  (``grid_sample`` coordinates with ``align_corners=True``: -1 and +1 are the centres of the
  first and last voxels) and ``Frame.WORLD``. Matrices are named ``<to>_from_<from>`` and only
  :meth:`Grid.matrix` builds them.
* **Mapping direction**: a transform maps points of the fixed image's space to the moving
  image's space (pull back): ``warped(x) = moving(T(x))``.
* **Device and dtype follow the input**; there is no global device.
"""

from medreg.core.errors import MedregError, GeometryError, InputError
from medreg.core.enums import Frame, Interpolation, Padding
from medreg.core.grid import Grid
from medreg.core.image import Image

__all__ = [
    "Frame",
    "GeometryError",
    "Grid",
    "Image",
    "InputError",
    "Interpolation",
    "MedregError",
    "Padding",
]
