r"""Similarity metrics, regularisers and supervision losses, in physical units.

Two levels, as elsewhere in medreg:

* :mod:`medreg.losses.functional` (import it as ``L``): stateless functions, e.g.
  ``L.lncc(fixed, warped, mask, window=9)``, ``L.bending(disp, grid)``; the shared mask and
  reduction helper :func:`~medreg.losses.functional.masked_mean` lives there too.
* ``nn.Module`` wrappers that store options, with one calling convention per family:

  - similarity (:class:`SSD`, :class:`NCC`, :class:`LNCC`, :class:`MI`, :class:`NMI`,
    :class:`MIND`, :class:`NGF`): ``loss(fixed, warped, fixed_mask=None, moving_mask=None)``;
  - regularisers (:class:`Diffusion`, :class:`Bending`, :class:`Elastic`,
    :class:`TotalVariation`, :class:`JacobianPenalty`): ``reg(displacement_or_transform,
    grid_or_spacing)``;
  - supervision: :class:`Dice` ``(fixed_labels, warped_labels)``, :class:`TRE`
    ``(points, target_points)``, :class:`EPE` ``(displacement, target_displacement)``.

* :func:`create` (``create("lncc", window=9)``) and :func:`from_config` (a
  :class:`WeightedSum` of terms from ``{label: {"name"?, "weight"?, **params}}``).

Every loss is lower-is-better; conventions (shapes, units, masks, ranges) are in the
:mod:`~medreg.losses.functional` module docstring.
"""

from medreg.losses import functional
from medreg.losses.registry import LOSSES, LossValue, WeightedSum, available, create, from_config
from medreg.losses.regularisers import (Bending, Diffusion, Elastic, JacobianPenalty, Regulariser,
                                        TotalVariation)
from medreg.losses.similarity import LNCC, MI, MIND, NCC, NGF, NMI, SSD, SimilarityLoss
from medreg.losses.supervision import EPE, TRE, Dice

__all__ = [
    "Bending", "Dice", "Diffusion", "EPE", "Elastic", "JacobianPenalty", "LNCC", "LOSSES",
    "LossValue", "MI", "MIND", "NCC", "NGF", "NMI", "Regulariser", "SSD", "SimilarityLoss", "TRE",
    "TotalVariation", "WeightedSum", "available", "create", "from_config", "functional",
]
