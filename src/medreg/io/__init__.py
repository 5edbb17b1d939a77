"""Reading and writing images, transforms and landmarks.

This is the only layer that knows about file formats and about NIfTI's RAS frame: everything it
returns is in medreg's conventions (LPS mm, tensors in ``(z, y, x)`` order, vectors ``x, y, z``).
"""

from medreg.io.images import *  # noqa: F401,F403
from medreg.io.landmarks import *  # noqa: F401,F403
from medreg.io.transform_io import *  # noqa: F401,F403
