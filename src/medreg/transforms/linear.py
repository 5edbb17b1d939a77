"""Linear transforms: translation, rigid, similarity and affine, each with a centre.

Convention:
    ``T(x) = A (x − c) + c + t`` in world mm (LPS), fixed → moving, exactly ITK's
    ``MatrixOffsetTransformBase`` (``A`` = Matrix, ``c`` = Center, ``t`` = Translation).
    3D Euler angles follow ITK's ``Euler3DTransform`` default: ``A = Rz · Rx · Ry`` (angles in
    radians); 2D rigid is a single angle (counter-clockwise in the x–y plane).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from medreg.core.enums import _ArgEnum
from medreg.core.errors import GeometryError, InputError
from medreg.core.grid import Grid
from medreg.transforms.base import SpatialTransform


def _tensor(value, shape: tuple[int, ...], dtype, default=None) -> Tensor:
    if value is None:
        t = torch.zeros(shape, dtype=dtype) if default is None else torch.as_tensor(default, dtype=dtype)
    else:
        t = value.to(dtype) if isinstance(value, Tensor) else torch.as_tensor(value, dtype=dtype)
    if tuple(t.shape) != shape:
        raise InputError(f"expected a parameter of shape {shape}, got {tuple(t.shape)}")
    return t


class Rotation(_ArgEnum):
    """Rotation parameterisations of :class:`RigidTransform` and :class:`SimilarityTransform`."""

    EULER = "euler"  #: ITK Euler angles (3D: ZXY composition), radians
    ROTVEC = "rotvec"  #: rotation vector (axis × angle, radians); 2D: the angle
    QUATERNION = "quaternion"  #: unit quaternion (w, x, y, z), normalised on use; 2D: angle

    @classmethod
    def _aliases(cls) -> dict[str, str]:
        return {"axis-angle": "rotvec", "versor": "quaternion", "quat": "quaternion"}


def _rx(a: Tensor, one: Tensor, zero: Tensor) -> Tensor:
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([one, zero, zero]), torch.stack([zero, c, -s]),
                        torch.stack([zero, s, c])])


def _ry(a: Tensor, one: Tensor, zero: Tensor) -> Tensor:
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, zero, s]), torch.stack([zero, one, zero]),
                        torch.stack([-s, zero, c])])


def _rz(a: Tensor, one: Tensor, zero: Tensor) -> Tensor:
    c, s = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([c, -s, zero]), torch.stack([s, c, zero]),
                        torch.stack([zero, zero, one])])


def rotation_matrix(params: Tensor, ndim: int, kind: Rotation | str = Rotation.EULER) -> Tensor:
    """``D×D`` rotation matrix from parameters (differentiable).

    Args:
        params: 2D: ``(1,)`` angle. 3D: ``(3,)`` Euler angles ``(ax, ay, az)`` or rotation
            vector, or ``(4,)`` quaternion ``(w, x, y, z)``.
        ndim: 2 or 3.
        kind: parameterisation (:class:`Rotation`).
    """
    kind = Rotation.from_arg(kind)
    if ndim == 2:
        a = params.reshape(-1)[0]
        c, s = torch.cos(a), torch.sin(a)
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    one = torch.ones((), dtype=params.dtype, device=params.device)
    zero = torch.zeros((), dtype=params.dtype, device=params.device)
    if kind is Rotation.EULER:
        return _rz(params[2], one, zero) @ _rx(params[0], one, zero) @ _ry(params[1], one, zero)
    if kind is Rotation.ROTVEC:
        x, y, z = params[0], params[1], params[2]
        k = torch.stack([torch.stack([zero, -z, y]), torch.stack([z, zero, -x]),
                         torch.stack([-y, x, zero])])
        return torch.linalg.matrix_exp(k)
    q = params / params.norm()
    w, x, y, z = q[0], q[1], q[2], q[3]
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)]),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)]),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]),
    ])


class LinearTransform(SpatialTransform):
    """Base of linear transforms: subclasses define :meth:`linear_matrix` (``A``).

    Args:
        ndim: 2 or 3.
        translation: ``t`` in mm, ``(D,)``; default 0.
        center: ``c`` in world mm, ``(D,)``; default 0. A buffer (not optimised).
        trainable: whether parameters are ``nn.Parameter`` with gradients.
        dtype: parameter dtype (float32 by default; float64 for gradcheck).
    """

    def __init__(self, ndim: int, translation=None, center=None, trainable: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(ndim)
        self._set_tensor("translation", _tensor(translation, (ndim,), dtype), trainable)
        c = torch.zeros(ndim, dtype=dtype) if center is None else torch.as_tensor(center, dtype=dtype)
        if tuple(c.shape) != (ndim,):
            raise InputError(f"center must have {ndim} values, got {tuple(c.shape)}")
        self.register_buffer("center", c.clone())

    def linear_matrix(self) -> Tensor:
        """``A``, ``(D, D)``."""
        return torch.eye(self.ndim, dtype=self.translation.dtype, device=self.translation.device)

    def matrix(self) -> Tensor:
        """Homogeneous ``(D+1, D+1)`` matrix ``moving_from_fixed`` in world mm."""
        a = self.linear_matrix()
        offset = self.center + self.translation - a @ self.center
        d = self.ndim
        bottom = torch.zeros(1, d + 1, dtype=a.dtype, device=a.device)
        bottom[0, d] = 1
        return torch.cat([torch.cat([a, offset[:, None]], dim=1), bottom], dim=0)

    def forward(self, points: Tensor) -> Tensor:
        self.check_points(points)
        m = self.matrix().to(points.dtype)
        d = self.ndim
        return points @ m[:d, :d].T + m[:d, d]

    def source_norm_points(self, target: Grid, source: Grid, dtype: torch.dtype | None = None) -> Tensor:
        from medreg.transforms.functional import affine_field_points

        self.check_grid(target)
        dtype = dtype or self.translation.dtype
        dev = self.translation.device
        m = (source.matrix("world", "norm", dtype=dtype, device=dev) @ self.matrix().to(dtype)
             @ target.matrix("index", "world", dtype=dtype, device=dev))
        return affine_field_points(m, m[: self.ndim, : self.ndim], None, target.shape)

    def inverse(self) -> "AffineTransform":
        """Exact inverse, as an :class:`AffineTransform` with the same centre."""
        m = torch.linalg.inv(self.matrix().detach().double())
        return AffineTransform.from_matrix(m, center=self.center.detach().double(), trainable=False,
                                           dtype=self.translation.dtype)


class TranslationTransform(LinearTransform):
    """``T(x) = x + t``."""


class RigidTransform(LinearTransform):
    """Rotation about ``center`` plus translation.

    Args:
        rotation: parameters of :func:`rotation_matrix` (default: identity).
        parameterization: ``euler`` (default), ``rotvec`` or ``quaternion``.
    """

    def __init__(self, ndim: int, rotation=None, translation=None, center=None,
                 parameterization: Rotation | str = Rotation.EULER, trainable: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(ndim, translation, center, trainable, dtype)
        self.parameterization = Rotation.from_arg(parameterization)
        n = 1 if ndim == 2 else (4 if self.parameterization is Rotation.QUATERNION else 3)
        default = [1.0, 0.0, 0.0, 0.0] if n == 4 else None
        self._set_tensor("rotation", _tensor(rotation, (n,), dtype, default), trainable)

    def linear_matrix(self) -> Tensor:
        return rotation_matrix(self.rotation, self.ndim, self.parameterization)


class SimilarityTransform(RigidTransform):
    """Rigid transform with an isotropic scale ``s``: ``A = s R``."""

    def __init__(self, ndim: int, scale: float = 1.0, rotation=None, translation=None,
                 center=None, parameterization: Rotation | str = Rotation.EULER,
                 trainable: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(ndim, rotation, translation, center, parameterization, trainable, dtype)
        self._set_tensor("scale", _tensor(scale, (1,), dtype).reshape(1) if isinstance(scale, Tensor)
                         else _tensor([float(scale)], (1,), dtype), trainable)

    def linear_matrix(self) -> Tensor:
        return self.scale[0] * super().linear_matrix()


class AffineTransform(LinearTransform):
    """General affine: ``A`` is a free ``D×D`` matrix (default identity)."""

    def __init__(self, ndim: int, matrix=None, translation=None, center=None,
                 trainable: bool = True, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(ndim, translation, center, trainable, dtype)
        self._set_tensor("linear", _tensor(matrix, (ndim, ndim), dtype, torch.eye(ndim)), trainable)
        if torch.linalg.det(self.linear.detach().double()).abs() < 1e-12:
            raise GeometryError("affine matrix is singular (not invertible)")

    def linear_matrix(self) -> Tensor:
        return self.linear

    @classmethod
    def from_matrix(cls, homogeneous: Tensor | Sequence, center=None, trainable: bool = True,
                    dtype: torch.dtype = torch.float32) -> "AffineTransform":
        """From a homogeneous ``moving_from_fixed`` matrix, re-expressed about ``center``."""
        m = torch.as_tensor(homogeneous, dtype=torch.float64)
        d = m.shape[0] - 1
        a, offset = m[:d, :d], m[:d, d]
        c = torch.zeros(d, dtype=torch.float64) if center is None else torch.as_tensor(
            center, dtype=torch.float64)
        t = offset - c + a @ c
        return cls(d, a.to(dtype), t.to(dtype), c.to(dtype), trainable=trainable, dtype=dtype)


def collapse_linear(transforms: Sequence[LinearTransform]) -> AffineTransform:
    """One :class:`AffineTransform` equal to ``Compose(*transforms)`` (all linear)."""
    m = None
    for t in transforms:
        mt = t.matrix().detach().double()
        m = mt if m is None else m @ mt
    return AffineTransform.from_matrix(m, center=transforms[-1].center.detach())
