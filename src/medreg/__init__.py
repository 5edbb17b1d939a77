"""medreg: medical image registration in PyTorch.

Layers (dependencies one way): ``core`` → ``io`` → ``transforms`` → ``losses`` →
``engine`` / ``nets`` → ``train`` → ``cli``. See ``docs/architecture.md``.
"""

from medreg.core import Frame, Grid, Image, Interpolation, MedregError, Padding

__version__ = "0.1.0"

__all__ = ["Frame", "Grid", "Image", "Interpolation", "MedregError", "Padding", "__version__"]
