"""medreg: medical image registration in PyTorch.

Layers (dependencies one way): ``core`` → ``io`` → ``transforms`` → ``losses`` →
``engine`` / ``nets`` → ``train`` → ``cli``. See ``docs/architecture.md``.
"""

from medreg.core import Frame, Grid, Image, Interpolation, MedregError, Padding

__version__ = "0.1.0"


def predict(*args, **kwargs):
    """Register with a trained network; see :func:`medreg.api.predict`."""
    from medreg.api import predict as _predict

    return _predict(*args, **kwargs)


def register(*args, **kwargs):
    """Register a moving image to a fixed image; see :func:`medreg.api.register`."""
    from medreg.api import register as _register

    return _register(*args, **kwargs)

__all__ = ["Frame", "Grid", "Image", "Interpolation", "MedregError", "Padding", "__version__", "predict", "register"]
