"""medreg.nets: registration networks behind one contract and a name → class registry.

``create(name, **params)`` builds a network, ``available()`` lists the names, and every network
is a :class:`RegistrationNet` returning a :class:`NetOutput` (voxel-unit displacement of the
input grid, components ``x, y, z``, fixed → moving pull-back; see :mod:`medreg.nets.base`).

Networks: ``unet`` (VoxelMorph / diffeomorphic / HyperMorph-like conditional), ``coupled``
(linear + fold-free deformable, Christodoulidis et al. 2018), ``lapirn`` (Laplacian pyramid,
Mok & Chung 2020), ``cascade`` (affine + deformable stages, de Vos et al. 2019) and
``pyramid_corr`` (feature pyramid + cost volume, PWC-Net / Dual-PRNet style).
"""
from medreg.nets.base import NetOutput, RegistrationNet, available, create, register_net
# importing the modules fills the registry
from medreg.nets import cascade, coupled, lapirn, pyramid_corr, unet  # noqa: F401
from medreg.nets.cascade import CascadeNet
from medreg.nets.coupled import CoupledNet
from medreg.nets.lapirn import LapIRN
from medreg.nets.pyramid_corr import PyramidCorrNet
from medreg.nets.unet import UNet

__all__ = [
    "CascadeNet",
    "CoupledNet",
    "LapIRN",
    "NetOutput",
    "PyramidCorrNet",
    "RegistrationNet",
    "UNet",
    "available",
    "create",
    "register_net",
]
