"""Checkpoints of trained networks: plain types and tensors only, written atomically.

A checkpoint is a dict that ``torch.load(path, weights_only=True)`` reads (no pickled classes):

``format``          ``"medreg-checkpoint"`` and ``format_version`` (1)
``medreg_version``  the version that wrote it
``model``           ``net.config()``: the registry name and the keywords that rebuild the net
``state_dict``      the weights (on the CPU)
``preprocess``      the :class:`~medreg.train.preprocess.PreprocessConfig` as a dict (or None)
``train_config``    the training config as a dict (``TrainConfig.to_dict()``)
``step``            optimiser steps done
``metrics``         the latest validation metrics (floats)
``inference``       defaults of ``medreg predict`` for this model (e.g. ``{"symmetric": True}``;
                    optional, set when a model is bundled)
``optimizer``, ``scheduler``, ``rng``   resume state (optional)

:func:`load_checkpoint` takes a path or the bare name of a model shipped in ``medreg/models``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from medreg.core.errors import InputError

FORMAT = "medreg-checkpoint"
FORMAT_VERSION = 1

__all__ = ["LoadedModel", "bundled_models", "load_checkpoint", "read_checkpoint",
           "resolve_checkpoint", "save_checkpoint"]


def _plain(value: Any) -> Any:
    """Tuples → lists, numpy scalars/arrays → numbers/tensors, dataclasses → dicts (recursively)."""
    import numpy as np

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        # int keys stay ints (optimizer states are keyed by parameter index)
        return {(k if isinstance(k, (int, str)) else str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint: cannot store a {type(value).__name__} ({value!r}); "
                    "store plain types and tensors")


def _version() -> str:
    import medreg

    return str(getattr(medreg, "__version__", "unknown"))


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, preprocess: Any,
                    train_config: Mapping[str, Any] | None, step: int,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Mapping[str, Any] | Any | None = None,
                    rng: Mapping[str, Any] | None = None,
                    metrics: Mapping[str, Any] | None = None,
                    extra: Mapping[str, Any] | None = None,
                    inference: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint (see the module docstring) atomically; returns its path.

    Args:
        path: destination file (``.pt``); replaced atomically if it exists.
        model: the network (a ``DistributedDataParallel`` wrapper is unwrapped); it must have
            ``config()`` (:class:`~medreg.nets.base.RegistrationNet`).
        preprocess: a ``PreprocessConfig`` (or its dict, or None).
        train_config: the training config as a dict.
        step: optimiser steps done.
        optimizer: its state is stored for resuming.
        scheduler: a schedule with ``state_dict()`` or its state dict.
        rng: random generator states (plain types / tensors).
        metrics: latest metrics (numbers).
        extra: other resume state (plain types).
        inference: defaults of ``medreg predict`` for this model (plain types).
    """
    net = getattr(model, "module", model)
    if not hasattr(net, "config"):
        raise TypeError(f"save_checkpoint: {type(net).__name__} has no config(); "
                        "save a medreg RegistrationNet")
    state = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "medreg_version": _version(),
        "model": _plain(net.config()),
        "state_dict": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        "preprocess": _plain(preprocess),
        "train_config": _plain(train_config or {}),
        "step": int(step),
        "metrics": _plain(metrics or {}),
    }
    if inference:
        state["inference"] = _plain(inference)
    if optimizer is not None:
        state["optimizer"] = _plain(optimizer.state_dict())
    if scheduler is not None:
        state["scheduler"] = _plain(scheduler.state_dict() if hasattr(scheduler, "state_dict")
                                    else scheduler)
    if rng is not None:
        state["rng"] = _plain(rng)
    if extra is not None:
        state["extra"] = _plain(extra)
    return atomic_save(state, path)


def bundled_models() -> list[str]:
    """Names of the models shipped in the package (``medreg/models/<name>.pt``), sorted."""
    try:
        folder = resources.files("medreg") / "models"
        if not folder.is_dir():
            return []
        return sorted(p.name[:-3] for p in folder.iterdir() if p.name.endswith(".pt"))
    except (ModuleNotFoundError, FileNotFoundError):
        return []


def is_bare_name(path_or_name: str | os.PathLike) -> bool:
    """True for a bundled model's name form: no folder and no ``.pt`` suffix."""
    text = str(path_or_name)
    return os.sep not in text and "/" not in text and not text.endswith(".pt")


def resolve_checkpoint(path_or_name: str | os.PathLike) -> Path:
    """A checkpoint file: a path, or a bare name (no folder, no ``.pt``) of a bundled model."""
    text = str(path_or_name)
    if is_bare_name(text) and not Path(text).is_file():
        names = bundled_models()
        if text not in names:
            raise InputError(f"unknown model {text!r}; bundled models: {', '.join(names) or 'none'} "
                             "(or give the path of a .pt checkpoint)")
        with resources.as_file(resources.files("medreg") / "models" / f"{text}.pt") as p:
            return Path(p)
    p = Path(text)
    if not p.is_file():
        raise InputError(f"{p}: checkpoint not found")
    return p


def _what_to_give() -> str:
    return f"give a .pt file written by `medreg train` or a bundled model ({', '.join(bundled_models())})"


def read_checkpoint(path_or_name: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> tuple[dict[str, Any], Path]:
    """The raw checkpoint dict (``weights_only`` load) and its resolved path."""
    path = resolve_checkpoint(path_or_name)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is bad input
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text or "invalid load key" in text:
            # not a checkpoint (torch's own text suggests weights_only=False: unsafe advice for a
            # file of unknown origin)
            raise InputError(f"{path}: not a medreg checkpoint; {_what_to_give()}") from None
        raise InputError(f"{path}: cannot load the checkpoint ({type(exc).__name__}: "
                         f"{text.splitlines()[0] if text else ''})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InputError(f"{path}: not a medreg checkpoint (no '{FORMAT}' marker); {_what_to_give()}")
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(f"{path}: written by a newer medreg ({state.get('medreg_version')}); "
                         "upgrade medreg to read it")
    return state, path


@dataclass
class LoadedModel:
    """A network restored from a checkpoint.

    Attributes:
        net: the network in eval mode, on the requested device.
        preprocess: how inputs were prepared for it (``PreprocessConfig``), or None.
        train_config: the training config it was trained with (dict).
        metrics: its validation metrics when saved.
        step: optimiser steps it was trained for.
        path: the checkpoint file.
        inference: its defaults for ``medreg predict`` (e.g. ``symmetric``).
    """

    net: nn.Module
    preprocess: Any
    train_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    path: Path | None = None
    inference: dict[str, Any] = field(default_factory=dict)


def build_net(config: Mapping[str, Any]) -> nn.Module:
    """Rebuild a network from ``net.config()`` (registry name + keywords)."""
    import medreg.nets  # noqa: F401  (registers the shipped networks)
    from medreg.nets.base import create

    cfg = dict(config)
    name = cfg.pop("name", None)
    if name is None:
        raise InputError("checkpoint: the model config has no network name")
    return create(name, **cfg)


def load_checkpoint(path_or_name: str | os.PathLike, device: str | torch.device = "cpu"
                    ) -> LoadedModel:
    """Load a trained network (eval mode) from a checkpoint path or a bundled model name."""
    state, path = read_checkpoint(path_or_name, device)
    net = build_net(state["model"])
    try:
        net.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit network {state['model'].get('name')!r} "
                         f"({str(exc).splitlines()[0]})") from None
    net.to(device).eval()
    prep = state.get("preprocess")
    if prep is not None:
        from medreg.train.preprocess import PreprocessConfig

        prep = PreprocessConfig(**prep)
    return LoadedModel(net=net, preprocess=prep, train_config=dict(state.get("train_config") or {}),
                       metrics=dict(state.get("metrics") or {}), step=int(state.get("step", 0)),
                       path=path, inference=dict(state.get("inference") or {}))
