"""Inference with a trained network: ``medreg predict MODEL FIXED MOVING -o OUTDIR``.

The prediction is a fixed → moving world map (pull-back, as every medreg transform):

    T = T₀ ∘ (id + u)

where ``T₀`` is the initial alignment (``none``, ``geometry``, ``com``, ``moments``: centres /
principal axes; ``affine``: medreg's classical affine preset) and ``u`` the network's
displacement on its **network grid** (the fixed image's field of view at the model's size and
spacing, see :mod:`medreg.train.preprocess`), converted to world mm. ``T`` is valid at every
point of the fixed image's own grid, so outputs land on the fixed image's header exactly.
Optionally ``u`` is refined on the pair by instance optimisation on the network grid: greedy
compositional LNCC updates (default) or Adam steps on the model's own training loss.
"""
from __future__ import annotations

import numbers
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from medreg.core.errors import InputError
from medreg.core.image import Image
from medreg.engine import RegistrationResult, initial_transform, load_preset, run_registration
from medreg.engine.adam import Adam
from medreg.engine.greedy import DEFAULT_LR
from medreg.nets.base import NetOutput
from medreg.nets.functional import integrate_velocity
from medreg.transforms import Compose, DisplacementField, Identity, SpatialTransform, warp_image
from medreg.transforms.functional import compose_displacements
from medreg.train.preprocess import PreprocessConfig, network_grid, prediction_transform, prepare_image

INITIALISATIONS = ("none", "geometry", "com", "moments", "affine")


@dataclass
class PredictConfig:
    """What ran, stored in ``metrics.json`` (the counterpart of a preset for ``register``).

    Attributes:
        model: bundled name or checkpoint path.
        network: the network's config (``medreg.nets.create`` keywords).
        preprocess: the model's preprocessing (network grid size/spacing, normalisation).
        initialisation: the initial alignment ``T₀`` (see the module docstring).
        passes: network passes (recursive application: each pass registers the moving image
            warped by the fields so far, and the fields compose; 1: one forward pass).
        symmetric: each pass averages the velocities of both directions (see :func:`predict_pair`).
        instance_steps: Adam steps of instance optimisation (0: the network's field as is).
        instance: overrides of the instance-optimisation settings (``INSTANCE_DEFAULTS``).
        regularisation: the regulariser weight given to a conditional network (None: its default).
        similarity: the similarity reported before/after in ``metrics.json``.
    """

    model: str
    network: dict[str, Any]
    preprocess: dict[str, Any]
    initialisation: str = "geometry"
    passes: int = 1
    symmetric: bool = False
    instance_steps: int = 0
    instance: dict[str, Any] = field(default_factory=dict)
    regularisation: float | None = None
    similarity: dict[str, Any] = field(default_factory=lambda: {"name": "ncc"})

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


#: defaults of instance optimisation (``instance`` overrides them). ``method``: ``greedy`` (the
#: ``fast`` preset's compositional updates on the network grid: on the bundled models' benchmark
#: pairs it beat 50 Adam steps, e.g. the first brain3d 0.716 vs 0.687 in 7 s vs 22 s) or ``adam`` (steps on
#: the model's own training similarity and regularisers, its velocity for diffeomorphic models).
#: Greedy settings left ``None`` (``similarity``, ``greedy_lr``, ``gradient_sigma``,
#: ``field_smoothing``, ``log_jacobian``) take the values of the ``fast`` preset's greedy stage (its
#: finest level's ``log_jacobian``); greedy regularises by smoothing and the volume step only, so
#: ``regularisation`` is for ``adam``.
INSTANCE_DEFAULTS = {"method": "greedy", "lr": 0.2, "similarity": None, "regularisation": None,
                     "integrate_steps": 4, "greedy_lr": None, "gradient_sigma": None,
                     "field_smoothing": None, "log_jacobian": None}
INSTANCE_METHODS = ("adam", "greedy")


#: what a checkpoint's ``inference`` dict may set (defaults of :func:`predict` for that model).
INFERENCE_DEFAULT_KEYS = {"symmetric"}


#: Similarity of the greedy instance optimisation: LNCC as ``fast``'s window, with LNCC's default
#: ``eps`` (1e-8), with which the bundled models' refinement was measured; ``fast``'s smaller
#: ``eps`` (3e-10, tuned on pyramids from identity) has not been measured on a network's field.
INSTANCE_GREEDY_SIMILARITY = {"name": "lncc", "window": 9}


def greedy_settings(opts: dict[str, Any]) -> dict[str, Any]:
    """``opts``' greedy settings, each ``None`` replaced by the ``fast`` preset's greedy stage value
    (the similarity: :data:`INSTANCE_GREEDY_SIMILARITY`)."""
    if opts.get("regularisation"):
        raise InputError("greedy instance optimisation regularises by smoothing and a volume step: "
                         "set gradient_sigma (update), field_smoothing (total field) and "
                         "log_jacobian, or use method: adam for regularisation")
    stage = next(s for s in load_preset("fast").stages if s.type == "greedy")
    preset = {"similarity": dict(INSTANCE_GREEDY_SIMILARITY),
              "greedy_lr": stage.lr if stage.lr is not None else DEFAULT_LR,
              "gradient_sigma": stage.gradient_sigma, "field_smoothing": stage.field_smoothing,
              "log_jacobian": stage.log_jacobian[-1]}
    return {k: preset[k] if opts.get(k) is None else opts[k] for k in preset}


def instance_greedy(fixed: torch.Tensor, moving: torch.Tensor, init: torch.Tensor, grid: Any,
                    similarity: dict[str, Any], steps: int, lr: float = 0.25,
                    gradient_sigma: float = 1.7, field_smoothing: float = 0.35,
                    log_jacobian: float = 0.0) -> torch.Tensor:
    """Refine a network's displacement by ``steps`` greedy compositional updates
    (:mod:`medreg.engine.greedy`, as the ``fast`` preset's deformable stage) on ``similarity``.

    Args:
        fixed, moving: ``(1, C, *grid.shape)`` prepared images on the network grid.
        init: ``(1, D, *grid.shape)`` displacement in voxel units of ``grid``.
        similarity: ``{name: ..., **params}`` (the regularisation is the smoothing).
        lr: longest update per step, voxels; gradient_sigma, field_smoothing: σ in voxels.
        log_jacobian: step of the volume-change regulariser (:meth:`GreedyStep.volume_step`).

    Returns:
        the refined ``(1, D, *grid.shape)`` displacement (voxel units).
    """
    from medreg.engine.driver import build_similarity
    from medreg.engine.greedy import GreedyStep, greedy_level

    sim = build_similarity(similarity)
    step = GreedyStep(grid, lr, gradient_sigma, field_smoothing, device=fixed.device,
                      log_jacobian=log_jacobian)
    u = grid.transform_vectors(init.detach().float(), "index", "world", channel_dim=1)
    u, *_ = greedy_level(u, step, Identity(grid.ndim), fixed.float(), moving.float(), grid,
                         lambda f, w, t: sim(f, w), int(steps), lambda it, value: False)
    return grid.transform_vectors(u, "world", "index", channel_dim=1)


def instance_loss(train_config: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """The loss instance optimisation minimises: the model's own training similarity and
    regularisers (labels, ground truth and landmarks are not available at inference), or
    ``overrides['similarity']`` / ``overrides['regularisation']``; LNCC + diffusion when the
    model was trained without a similarity (e.g. Dice or supervised only)."""
    from medreg.train.config import LossConfig
    from medreg.train.losses import TrainingLoss

    loss = dict(train_config.get("loss") or {})
    sim = overrides.get("similarity") or loss.get("similarity") or {"name": "lncc", "window": 7}
    reg = overrides.get("regularisation") or loss.get("regularisation") or {"diffusion": 1.0}
    return TrainingLoss(LossConfig(similarity=dict(sim), regularisation=dict(reg)))


def instance_optimise(fixed: torch.Tensor, moving: torch.Tensor, init: torch.Tensor,
                      grid: Any, loss: Any, steps: int, lr: float = 0.1,
                      integrate_steps: int = 0, reg_weight: float | None = None) -> torch.Tensor:
    """Refine a network's field on one pair by ``steps`` Adam steps on ``loss``.

    Args:
        fixed, moving: ``(1, C, *grid.shape)`` prepared images on the network grid.
        init: ``(1, D, *grid.shape)`` voxel units of ``grid``: the network's displacement, or
            its stationary velocity when ``integrate_steps > 0`` (diffeomorphic models stay
            diffeomorphic: the velocity is optimised and integrated by scaling and squaring).
        grid: the network grid (for the regularisers' mm units).
        loss: a :class:`~medreg.train.losses.TrainingLoss` (see :func:`instance_loss`).
        lr: Adam step size, voxels.
        reg_weight: λ of a conditional model: multiplies the regularisers, as in training.

    Returns:
        the refined ``(1, D, *grid.shape)`` displacement (voxel units, detached).
    """
    from medreg.nets.base import NetOutput
    from medreg.nets.functional import integrate_velocity
    from medreg.train.batch import PairBatch

    p = torch.nn.Parameter(init.detach().clone().float())
    field = (lambda v: integrate_velocity(v, integrate_steps)) if integrate_steps > 0 else (lambda u: u)
    batch = PairBatch(fixed=fixed.float(), moving=moving.float(), grids=[grid])
    opt = Adam([p], lr=float(lr))
    with torch.enable_grad():
        for _ in range(int(steps)):
            opt.zero_grad(set_to_none=True)
            loss(NetOutput(displacement=field(p)), batch, reg_weight=reg_weight).total.backward()
            opt.step()
    with torch.no_grad():
        return field(p).detach()


def _forward(net: torch.nn.Module, f: torch.Tensor, m: torch.Tensor, kwargs: dict[str, Any],
             symmetric: bool) -> Any:
    """``net(f, m)``; with ``symmetric`` the velocity ``(v(f, m) − v(m, f)) / 2`` (the networks'
    full-resolution velocities, voxel units) integrated by the network's number of squarings at
    full resolution: the two directions' estimates averaged, so a bias that does not
    depend on which image is which cancels and the result is inverse-consistent by construction."""
    out = net(f, m, **kwargs)
    if not symmetric:
        return out
    steps = int(getattr(net, "integrate_steps", 0) or 0)
    if out.velocity is None or steps <= 0:
        raise InputError("--symmetric needs a model that predicts a stationary velocity "
                         "(integrate_steps > 0); this one predicts a displacement")
    v = 0.5 * (out.velocity - net(m, f, **kwargs).velocity)
    return NetOutput(displacement=integrate_velocity(v, steps), velocity=v)


def _another_pass(net: torch.nn.Module, kwargs: dict[str, Any], f: torch.Tensor, moving: Image,
                  init: SpatialTransform, u: torch.Tensor, grid: Any, preprocess: Any,
                  symmetric: bool = False) -> torch.Tensor:
    """One more network pass (see :func:`predict_pair`): ``u`` and the result in voxel units."""
    u_mm = grid.transform_vectors(u, "index", "world", channel_dim=1)
    so_far = DisplacementField(u_mm[0], grid, check_finite=False)
    mk, _ = prepare_image(moving, grid, preprocess,
                          transform=so_far if isinstance(init, Identity) else Compose(init, so_far))
    r = _forward(net, f, mk[None].to(f.device), kwargs, symmetric).displacement.detach().float()
    r_mm = grid.transform_vectors(r, "index", "world", channel_dim=1)
    total = compose_displacements(u_mm, r_mm, grid)
    return grid.transform_vectors(total, "world", "index", channel_dim=1)


#: a fixed field of view more than this many times the network grid's along an axis is a warning
FOV_RATIO_WARN = 2.0


def _warn_field_of_view(fixed: Image, grid: Any) -> None:
    """Warn when the model's grid sees only a small part of the fixed image (a crop model given
    a whole brain, or spacing in the wrong unit): the field outside it is the border's."""
    import numpy as np

    seen = [n * s for n, s in zip(grid.size, grid.spacing)]
    # the fixed image's extent along the model grid's axes (they may be another orientation)
    edges = np.asarray(fixed.grid.direction) * (np.asarray(fixed.grid.size) * np.asarray(fixed.grid.spacing))
    have = (np.abs(np.asarray(grid.direction).T @ edges).sum(1)).tolist()
    if max(h / max(v, 1e-9) for h, v in zip(have, seen)) > FOV_RATIO_WARN:
        mm = lambda e: "×".join(f"{x:.0f}" for x in e)  # noqa: E731
        warnings.warn(f"{fixed.name}: the model sees {mm(seen)} mm around the image centre, but "
                      f"the image spans {mm(have)} mm: it was made for images of about its own "
                      "size (check the model and the image spacing); most of the image gets "
                      "no deformation of its own", stacklevel=3)


def predict_pair(net: torch.nn.Module, preprocess: Any, fixed: Image, moving: Image, *,
                 initialisation: str = "geometry", instance_steps: int = 0,
                 instance: dict[str, Any] | None = None, regularisation: float | None = None,
                 train_config: dict[str, Any] | None = None, passes: int = 1,
                 symmetric: bool = False) -> tuple[SpatialTransform, dict[str, float]]:
    """The fixed → moving transform predicted by ``net`` (see the module docstring).

    Args:
        net: a :class:`medreg.nets.RegistrationNet` in eval mode, on the images' device.
        preprocess: the model's :class:`~medreg.train.preprocess.PreprocessConfig`.
        fixed, moving: single-channel images of the network's dimension (any grids).
        initialisation: ``T₀`` (:data:`INITIALISATIONS`).
        instance_steps: Adam steps of instance optimisation (0: none).
        instance: overrides of :data:`INSTANCE_DEFAULTS` (``lr``, ``similarity``,
            ``regularisation``).
        regularisation: regulariser weight for a conditional network (it also scales the
            regularisers of ``adam`` instance optimisation; ``greedy`` smooths instead).
        train_config: the model's training config (its loss drives instance optimisation).
        passes: network passes (>= 1). Pass ``k > 1`` resamples the original moving image
            through ``T₀`` and the fields so far (one interpolation, no blur build-up), predicts
            a residual field ``r`` and composes ``u ← r + u ∘ (id + r)`` (network-only: no
            optimisation on the pair; a composition of diffeomorphic fields stays invertible, but
            ``adam`` instance optimisation then refines the displacement, not a velocity).
        symmetric: in every pass, also run the network with the images swapped and use half
            the difference of the two velocities (diffeomorphic models only; twice the network
            time).

    Returns:
        the transform and timings (s) of its parts.
    """
    if fixed.ndim != net.ndim or moving.ndim != net.ndim:
        raise InputError(f"the model is {net.ndim}D but {fixed.name} is {fixed.ndim}D and "
                         f"{moving.name} is {moving.ndim}D; use a {fixed.ndim}D model")
    net.check_regularisation(regularisation)
    for name, value, least in (("instance steps (--instance-steps)", instance_steps, 0),
                               ("passes (--passes)", passes, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise InputError(f"{name} must be a whole number >= {least}, got {value!r}")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    init = initial_alignment(fixed, moving, initialisation)
    times["initialisation_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid = network_grid(fixed.grid, preprocess)
    _warn_field_of_view(fixed, grid)
    param = next(net.parameters(), None)
    dev = param.device if param is not None else fixed.data.device
    f, info = prepare_image(fixed, grid, preprocess)
    m, _ = prepare_image(moving, grid, preprocess, transform=init)
    f, m = f[None].to(dev), m[None].to(dev)
    with torch.no_grad():
        kwargs = {} if regularisation is None else {"reg_weight": float(regularisation)}
        out = _forward(net, f, m, kwargs, symmetric)
    u = out.displacement.detach().float()
    for _ in range(int(passes) - 1):
        with torch.no_grad():
            u = _another_pass(net, kwargs, f, moving, init, u, grid, preprocess, symmetric)
    times["network_s"] = time.perf_counter() - t0
    if instance_steps > 0:
        t0 = time.perf_counter()
        opts = {**INSTANCE_DEFAULTS, **(instance or {})}
        unknown = sorted(set(opts) - set(INSTANCE_DEFAULTS))
        if unknown:
            raise InputError(f"instance optimisation has no option(s) {', '.join(unknown)}; "
                             f"it takes: {', '.join(INSTANCE_DEFAULTS)}")
        if opts["method"] not in INSTANCE_METHODS:
            raise InputError(f"unknown instance-optimisation method {opts['method']!r}; choose one "
                             f"of {', '.join(INSTANCE_METHODS)}")
        if opts["method"] == "greedy":
            g = greedy_settings(opts)
            u = instance_greedy(f, m, u, grid, g["similarity"], instance_steps, g["greedy_lr"],
                                g["gradient_sigma"], g["field_smoothing"], g["log_jacobian"])
        else:
            loss = instance_loss(train_config or {}, opts).to(dev)
            # after several passes the field is a composition, not exp of one velocity: refine u
            diffeo = out.velocity is not None and int(passes) == 1
            steps = int(getattr(net, "integrate_steps", 0) or 0) if diffeo else 0
            steps = min(steps, int(opts["integrate_steps"]))
            start = out.velocity.detach().float() if steps else u
            u = instance_optimise(f, m, start, grid, loss, instance_steps, opts["lr"],
                                  integrate_steps=steps, reg_weight=regularisation)
        times["instance_s"] = time.perf_counter() - t0
    with torch.no_grad():  # sampled once on the fixed grid: later warps and metrics are direct
        deform = prediction_transform(u[0], info)
    transform = deform if isinstance(init, Identity) else Compose(init.to(deform.field.device), deform)
    return transform, {k: round(v, 3) for k, v in times.items()}


def predict(loaded: Any, fixed: Image, moving: Image, *, model: str = "",
            initialisation: str | None = None, instance_steps: int = 0,
            instance: dict[str, Any] | None = None, regularisation: float | None = None,
            passes: int = 1, symmetric: bool | None = None) -> RegistrationResult:
    """Run a loaded model (:func:`medreg.train.checkpoint.load_checkpoint`) on one pair and
    return a :class:`RegistrationResult` (transform, warped image) like ``medreg.register``.
    ``symmetric=None`` takes the model's own default (``loaded.inference``; off if unset)."""
    unknown = sorted(set(loaded.inference) - INFERENCE_DEFAULT_KEYS)
    if unknown:
        raise InputError(f"{loaded.path}: unknown inference default(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(INFERENCE_DEFAULT_KEYS))}")
    if symmetric is None:
        symmetric = bool(loaded.inference.get("symmetric", False))
    prep = loaded.preprocess or PreprocessConfig()
    init = initialisation or prep.initialisation
    cfg = PredictConfig(model=model or str(loaded.path), network=loaded.net.config(),
                        preprocess=asdict(prep), initialisation=init, passes=int(passes),
                        symmetric=bool(symmetric),
                        instance_steps=int(instance_steps), instance=dict(instance or {}),
                        regularisation=regularisation)
    t0 = time.perf_counter()
    transform, times = predict_pair(loaded.net, prep, fixed, moving, initialisation=init,
                                    instance_steps=instance_steps, instance=instance,
                                    regularisation=regularisation, train_config=loaded.train_config,
                                    passes=passes, symmetric=symmetric)
    runtime = time.perf_counter() - t0
    with torch.no_grad():
        warped = warp_image(moving.to(torch.float32), transform.to(moving.data.device), fixed.grid)
    result = RegistrationResult(transform=transform, warped=warped, fixed=fixed, moving=moving,
                                config=cfg, runtime_s=runtime)
    result.history = [{"stage": "predict", **times}]
    return result

