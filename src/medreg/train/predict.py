"""Inference with a trained network: ``medreg predict MODEL FIXED MOVING -o OUTDIR``.

The prediction is a fixed → moving world map (pull-back, as every medreg transform):

    T = T₀ ∘ (id + u)

where ``T₀`` is the initial alignment (``none``, ``geometry``, ``com``, ``moments``: centres /
principal axes; ``affine``: medreg's classical affine preset) and ``u`` the network's
displacement on its **network grid** (the fixed image's field of view at the model's size and
spacing, see :mod:`medreg.train.preprocess`), converted to world mm. ``T`` is valid at every
point of the fixed image's own grid, so outputs land on the fixed image's header exactly.
Optionally ``u`` is refined by a few Adam steps of instance optimisation on MIND features
(:func:`medreg.engine.refine_displacement`) at half the fixed image's resolution.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from medreg.core.errors import InputError
from medreg.core.image import Image
from medreg.engine import (DiscreteParams, RegistrationResult, initial_transform, load_preset,
                           refine_displacement, run_registration)
from medreg.transforms import Compose, DisplacementField, Identity, SpatialTransform, warp_image
from medreg.train.preprocess import PreprocessConfig, field_to_world, network_grid, prepare_image

INITIALISATIONS = ("none", "geometry", "com", "moments", "affine")


@dataclass
class PredictConfig:
    """What ran, stored in ``metrics.json`` (the counterpart of a preset for ``register``).

    Attributes:
        model: bundled name or checkpoint path.
        network: the network's config (``medreg.nets.create`` keywords).
        preprocess: the model's preprocessing (network grid size/spacing, normalisation).
        initialisation: the initial alignment ``T₀`` (see the module docstring).
        instance_steps: Adam steps of instance optimisation (0: the network's field as is).
        instance: settings of the instance optimisation (``DiscreteParams`` io_* fields).
        regularisation: the regulariser weight given to a conditional network (None: its default).
        similarity: the similarity reported before/after in ``metrics.json``.
    """

    model: str
    network: dict[str, Any]
    preprocess: dict[str, Any]
    initialisation: str = "geometry"
    instance_steps: int = 0
    instance: dict[str, Any] = field(default_factory=dict)
    regularisation: float | None = None
    similarity: dict[str, Any] = field(default_factory=lambda: {"name": "lncc"})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def initial_alignment(fixed: Image, moving: Image, method: str) -> SpatialTransform:
    """``T₀`` fixed → moving (world mm) by ``method`` (one of :data:`INITIALISATIONS`)."""
    if method not in INITIALISATIONS:
        raise InputError(f"unknown initialisation {method!r}; choose one of {', '.join(INITIALISATIONS)}")
    if method == "none":
        return Identity(fixed.ndim)
    if method == "affine":
        result = run_registration(fixed.to(torch.float32), moving.to(torch.float32), load_preset("affine"))
        return result.transform
    return initial_transform(fixed, moving, method).to(torch.float32)


def _instance_params(steps: int, fixed: Image, overrides: dict[str, Any]) -> DiscreteParams:
    """Instance-optimisation settings: half resolution for ~1 mm images, full for coarser ones."""
    fine = min(fixed.grid.spacing) < 1.5
    base = {"io_iterations": int(steps), "io_factor": 2 if fine else 1, "io_lr": 0.5,
            "io_diffusion": 0.2, "io_smooth": 2.0, "mind_radius": 1.0, "mind_dilation": 2.0,
            "feature_pool": 1}
    base.update(overrides)
    return DiscreteParams.from_dict(base, where="instance optimisation")


def predict_pair(net: torch.nn.Module, preprocess: Any, fixed: Image, moving: Image, *,
                 initialisation: str = "geometry", instance_steps: int = 0,
                 instance: dict[str, Any] | None = None, regularisation: float | None = None,
                 ) -> tuple[SpatialTransform, dict[str, float]]:
    """The fixed → moving transform predicted by ``net`` (see the module docstring).

    Args:
        net: a :class:`medreg.nets.RegistrationNet` in eval mode, on the images' device.
        preprocess: the model's :class:`~medreg.train.preprocess.PreprocessConfig`.
        fixed, moving: single-channel images of the network's dimension (any grids).
        initialisation: ``T₀`` (:data:`INITIALISATIONS`).
        instance_steps: Adam steps of instance optimisation (0: none).
        instance: overrides of the instance-optimisation settings (``DiscreteParams`` names).
        regularisation: regulariser weight for a conditional network.

    Returns:
        the transform and timings (s) of its parts.
    """
    if fixed.ndim != net.ndim or moving.ndim != net.ndim:
        raise InputError(f"the model is {net.ndim}D but {fixed.name} is {fixed.ndim}D and "
                         f"{moving.name} is {moving.ndim}D; use a {fixed.ndim}D model")
    net.check_regularisation(regularisation)
    if instance_steps < 0:
        raise InputError(f"--instance-steps must be >= 0, got {instance_steps}")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    init = initial_alignment(fixed, moving, initialisation)
    times["initialisation_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid = network_grid(fixed.grid, preprocess)
    param = next(net.parameters(), None)
    dev = param.device if param is not None else fixed.data.device
    f, _ = prepare_image(fixed, grid, preprocess)
    m, _ = prepare_image(moving, grid, preprocess, transform=init)
    with torch.no_grad():
        kwargs = {} if regularisation is None else {"reg_weight": float(regularisation)}
        out = net(f[None].to(dev), m[None].to(dev), **kwargs)
    disp = field_to_world(out.displacement[0].detach().float(), grid).unsqueeze(0)
    times["network_s"] = time.perf_counter() - t0
    if instance_steps > 0:
        t0 = time.perf_counter()
        params = _instance_params(instance_steps, fixed, instance or {})
        deform = refine_displacement(fixed.to(dev), moving.to(dev), disp.to(dev), grid,
                                     init.to(dev), params)
        times["instance_s"] = time.perf_counter() - t0
    else:
        deform = DisplacementField(disp, grid)
        if grid != fixed.grid:  # sampled once on the fixed grid: later warps and metrics are direct
            with torch.no_grad():
                deform = DisplacementField(deform.displacement(fixed.grid), fixed.grid)
    transform = deform if isinstance(init, Identity) else Compose(init.to(deform.field.device), deform)
    return transform, {k: round(v, 3) for k, v in times.items()}


def predict(loaded: Any, fixed: Image, moving: Image, *, model: str = "",
            initialisation: str | None = None, instance_steps: int = 0,
            instance: dict[str, Any] | None = None, regularisation: float | None = None,
            ) -> RegistrationResult:
    """Run a loaded model (:func:`medreg.train.checkpoint.load_checkpoint`) on one pair and
    return a :class:`RegistrationResult` (transform, warped image) like ``medreg.register``."""
    prep = loaded.preprocess or PreprocessConfig()
    init = initialisation or prep.initialisation
    cfg = PredictConfig(model=model or str(loaded.path), network=loaded.net.config(),
                        preprocess=asdict(prep), initialisation=init,
                        instance_steps=int(instance_steps), instance=dict(instance or {}),
                        regularisation=regularisation)
    t0 = time.perf_counter()
    transform, times = predict_pair(loaded.net, prep, fixed, moving, initialisation=init,
                                    instance_steps=instance_steps, instance=instance,
                                    regularisation=regularisation)
    runtime = time.perf_counter() - t0
    with torch.no_grad():
        warped = warp_image(moving.to(torch.float32), transform.to(moving.data.device), fixed.grid)
    result = RegistrationResult(transform=transform, warped=warped, fixed=fixed, moving=moving,
                                config=cfg, runtime_s=runtime)
    result.history = [{"stage": "predict", **times}]
    return result
