"""Spatial transforms (fixed → moving world points) and their application to data.

See :mod:`medreg.transforms.base` for the conventions. All transforms are ``nn.Module``s,
dimension-generic (2D/3D), differentiable and follow the device of their parameters.
"""

from medreg.transforms.base import Compose, Identity, SpatialTransform, jacobian_det
from medreg.transforms.dense import (BSplineTransform, DisplacementField,
                                     StationaryVelocityField, displace_points)
from medreg.transforms.functional import (compose_displacements, invert_displacement, sample,
                                          scaling_and_squaring)
from medreg.transforms.linear import (AffineTransform, LinearTransform, RigidTransform, Rotation,
                                      SimilarityTransform, TranslationTransform, collapse_linear,
                                      rotation_matrix)
from medreg.transforms.warp import warp_image, warp_labels, warp_points

__all__ = [
    "AffineTransform", "BSplineTransform", "Compose", "DisplacementField", "Identity",
    "LinearTransform", "RigidTransform", "Rotation", "SimilarityTransform", "SpatialTransform",
    "StationaryVelocityField", "TranslationTransform", "collapse_linear", "compose_displacements",
    "displace_points", "invert_displacement", "jacobian_det", "rotation_matrix", "sample",
    "scaling_and_squaring", "warp_image", "warp_labels", "warp_points",
]
