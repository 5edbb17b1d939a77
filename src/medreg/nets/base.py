"""The contract every registration network in medreg keeps.

Conventions (see ``medreg.core``): images are ``(N, C, *spatial)`` in array order (``Z, Y, X``);
vector fields are ``(N, D, *spatial)`` with components in ``x, y, z`` order (the *last* array
axis first). A network maps a fixed and a moving image that lie on the **same grid** (the
network grid, produced by ``medreg.train.preprocess``) to a displacement ``u`` in **voxel units
of that grid**, pulling back: ``warped(p) = moving(p + u(p))`` for voxel index ``p``.
World-mm conversion, header handling and write-back are the caller's job (``Grid``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from medreg.core.errors import InputError


@dataclass
class NetOutput:
    """What a registration network returns.

    Attributes:
        displacement: ``(N, D, *spatial)`` total displacement (affine part included), voxel
            units of the input grid, components ``x, y, z``, fixed → moving (pull-back).
        velocity: the stationary velocity (same layout) when the field is ``exp(velocity)``.
        inverse: displacement of the inverse map (moving → fixed) when the network provides one
            (diffeomorphic nets: ``exp(-velocity)``), used by bidirectional losses.
        affine: ``(N, D, D + 1)`` affine part in voxel index coordinates (``x, y, z``), maps
            fixed voxel index → moving voxel index, when the network has a linear branch.
        levels: outputs of coarser levels / earlier stages (coarse → fine), for losses at every
            level; each is a ``NetOutput`` whose fields live on its own (smaller) grid and whose
            ``extras['scale']`` holds the downsampling factor.
        penalty: a network-specific regularisation term, already weighted (e.g. the coupled
            network's ``α‖A − A_I‖₁ + β‖Φ − Φ_I‖₁``); the training loop adds it to the loss.
        extras: anything else a loss or a test may need (named tensors).
    """

    displacement: Tensor
    velocity: Tensor | None = None
    inverse: Tensor | None = None
    affine: Tensor | None = None
    levels: list["NetOutput"] = field(default_factory=list)
    penalty: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class RegistrationNet(nn.Module):
    """Base class: ``forward(fixed, moving, reg_weight=None) -> NetOutput``.

    Subclasses accept any spatial size (they pad internally to ``size_multiple`` and crop back),
    follow the input's device and dtype, and work in 2D and 3D (``ndim``). A network that sets
    ``supports_regularisation = True`` takes ``reg_weight`` (a float or an ``(N,)`` tensor) to
    trade smoothness at inference (conditioned training); others raise ``InputError`` when it is
    given.
    """

    name: str = "net"
    supports_regularisation: bool = False

    def __init__(self, ndim: int, in_channels: int = 1) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise InputError(f"{type(self).__name__}: ndim must be 2 or 3, got {ndim}")
        self.ndim = int(ndim)
        self.in_channels = int(in_channels)

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this network with :func:`create` (stored in checkpoints)."""
        params = {}
        for name in inspect.signature(type(self).__init__).parameters:
            if name != "self" and hasattr(self, name):
                params[name] = getattr(self, name)
        return {"name": self.name, **params}

    def check_regularisation(self, reg_weight: Any) -> None:
        if reg_weight is not None and not self.supports_regularisation:
            raise InputError(f"network {self.name!r} was not trained with a regularisation input; "
                             "drop --regularisation or use a model that supports it")


_REGISTRY: dict[str, type[RegistrationNet]] = {}


def register_net(name: str) -> Callable[[type[RegistrationNet]], type[RegistrationNet]]:
    """Class decorator: make a network available to :func:`create` under ``name``."""

    def wrap(cls: type[RegistrationNet]) -> type[RegistrationNet]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, **params: Any) -> RegistrationNet:
    """Build a registered network by name; unknown names or keywords are an ``InputError``."""
    if name not in _REGISTRY:
        raise InputError(f"unknown network {name!r}; available: {', '.join(available()) or 'none'}")
    cls = _REGISTRY[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise InputError(f"network {name!r} has no option(s) {', '.join(unknown)}; "
                         f"it takes: {', '.join(accepted)}")
    return cls(**params)
