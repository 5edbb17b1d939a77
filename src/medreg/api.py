"""The Python API: ``medreg.register(fixed, moving, preset="fast", **overrides)``.

Takes paths or in-memory :class:`~medreg.core.Image`\\ s, checks them (one clear error per
problem), runs :func:`medreg.engine.run_registration`, computes metrics, and can write the
standard output folder (:func:`save_result`).
"""

from __future__ import annotations

import json
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from medreg.core.errors import InputError
from medreg.core.image import Image
from medreg.engine import (Progress, RegistrationConfig, RegistrationResult, config_from_dict,
                           load_config, load_preset, merge_overrides, run_registration)
from medreg.transforms import DisplacementField, warp_image, warp_labels

OUTPUT_FILES = ("warped.nii.gz", "warped_labels.nii.gz", "transform.h5", "displacement.nii.gz",
                "metrics.json", "qc.png")


def _load(x: Image | str | os.PathLike | None, what: str, label: bool = False) -> Image | None:
    from medreg.io import read_image

    if x is None:
        return None
    if isinstance(x, Image):
        return x.with_data(x.data.detach())
    if not isinstance(x, (str, os.PathLike)):
        raise InputError(f"the {what}: expected a path or a medreg Image, got {type(x).__name__}; "
                         "an array has no geometry: wrap it as medreg.core.Image(data, grid) "
                         "(e.g. with the grid of the image it belongs to)")
    try:
        return read_image(x, label=label)
    except InputError as exc:  # say which input it was (a mask given an intensity image, ...)
        raise InputError(f"{exc} (given as the {what})") from None


def _check_image(img: Image, what: str) -> None:
    if img.channels != 1:
        raise InputError(f"{img.name}: the {what} image has {img.channels} channels; "
                         "registration needs a single-channel image")
    thin = [f"{'xyz'[i]} ({n})" for i, n in enumerate(img.grid.size) if n < 3]
    if thin:
        raise InputError(f"{img.name}: the {what} image is {'×'.join(map(str, img.grid.size))} voxels, too "
                         f"thin along {', '.join(thin)}: registration needs at least 3 voxels along "
                         "each axis; store a single slice as a 2D image (e.g. SimpleITK "
                         "image[:, :, 0]) and register it in 2D")
    data = img.data
    if data.is_floating_point() and not torch.isfinite(data).all():
        raise InputError(f"{img.name}: the {what} image contains NaN or infinite voxels")
    if float(data.max()) == float(data.min()):
        raise InputError(f"{img.name}: the {what} image is constant; there is nothing to register")


def _check_companion(extra: Image | None, base: Image, what: str) -> None:
    if extra is None:
        return
    if not extra.grid.allclose(base.grid, atol=1e-3):
        raise InputError(f"{extra.name}: the {what} is not on the grid of {base.name} "
                         f"({extra.grid} vs {base.grid}); resample it onto its image first")
    if "mask" in what and extra.data.is_floating_point() and not bool(torch.isfinite(extra.data).all()):
        raise InputError(f"{extra.name}: the {what} has NaN or infinite voxels")
    if "mask" in what and not bool((extra.data != 0).any()):
        raise InputError(f"{extra.name}: the {what} is empty (no non-zero voxel)")


def resolve_config(preset: str | None = "fast", config: RegistrationConfig | dict | str | os.PathLike | None = None,
                   **overrides: Any) -> RegistrationConfig:
    """The config to run: ``config`` (object, mapping or YAML path) or else ``preset``, with
    ``overrides`` applied (see :func:`medreg.engine.merge_overrides`)."""
    if config is None:
        cfg = load_preset(preset or "fast")
    elif isinstance(config, RegistrationConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = config_from_dict(config)
    elif isinstance(config, (str, os.PathLike)):
        cfg = load_config(config)
    else:
        raise InputError(f"config must be a RegistrationConfig, a mapping or a YAML file path, got "
                         f"{type(config).__name__} (a list of stages goes under the key 'stages')")
    return merge_overrides(cfg, **overrides) if overrides else cfg


def register(fixed: Image | str | os.PathLike, moving: Image | str | os.PathLike, preset: str = "fast", *,
             config: RegistrationConfig | dict | str | os.PathLike | None = None,
             fixed_mask: Image | str | None = None, moving_mask: Image | str | None = None,
             fixed_labels: Image | str | None = None, moving_labels: Image | str | None = None,
             device: str | torch.device | None = None, threads: int | None = None,
             seed: int | None = None, quiet: bool = True, progress: Progress | None = None,
             **overrides: Any) -> RegistrationResult:
    """Register ``moving`` to ``fixed``.

    Args:
        fixed, moving: images or paths; they may differ in size, spacing and orientation.
        preset: name of a shipped preset (``medreg presets``); ignored when ``config`` is given.
        config: a :class:`RegistrationConfig`, a mapping or a YAML file (preset format).
        fixed_mask, moving_mask: restrict the similarity to non-zero voxels (binarised: a label
            map or a probability map counts wherever it is not 0).
        fixed_labels, moving_labels: label maps on their images' grids; with both, Dice before
            and after is reported (the labels are not used by the optimisation).
        device: ``cpu`` or ``cuda`` (default: cpu).
        threads: ``torch.set_num_threads`` for the run.
        seed: overrides the config's seed.
        overrides: config keys (``iterations=50``, ``stage2_lr=0.2``, ``initialisation="moments"``).

    Returns:
        :class:`RegistrationResult` whose ``transform`` maps fixed → moving points and whose
        ``metrics`` hold similarity before/after, Jacobian statistics, Dice (with labels) and
        runtime.
    """
    _set_threads(threads)
    if seed is not None:
        overrides["seed"] = int(seed)
    cfg = resolve_config(preset, config, **overrides)
    fixed_i, moving_i, fm, mm, fl, ml = _load_inputs(fixed, moving, fixed_mask, moving_mask,
                                                      fixed_labels, moving_labels)
    dev = _device(device)
    to = lambda im: None if im is None else im.to(dev)  # noqa: E731
    result = run_registration(to(fixed_i).to(torch.float32), to(moving_i).to(torch.float32), cfg,
                              fixed_mask=to(fm), moving_mask=to(mm),
                              progress=progress or Progress(quiet=quiet))
    return _finish(result, fixed_i, moving_i, fl, ml)


def _load_inputs(fixed, moving, fixed_mask=None, moving_mask=None, fixed_labels=None,
                 moving_labels=None) -> tuple[Image, Image, Image | None, Image | None,
                                              Image | None, Image | None]:
    """Read and check a pair with its optional masks and label maps (one clear error each)."""
    fixed_i, moving_i = _load(fixed, "fixed"), _load(moving, "moving")
    fm, mm = _load(fixed_mask, "fixed mask", True), _load(moving_mask, "moving mask", True)
    fl, ml = _load(fixed_labels, "fixed labels", True), _load(moving_labels, "moving labels", True)
    if fixed_i.ndim != moving_i.ndim:
        raise InputError(f"{moving_i.name} is {moving_i.ndim}D but {fixed_i.name} is {fixed_i.ndim}D; "
                         "both images must have the same dimension")
    _check_image(fixed_i, "fixed")
    _check_image(moving_i, "moving")
    _check_companion(fm, fixed_i, "fixed mask")
    _check_companion(mm, moving_i, "moving mask")
    _check_companion(fl, fixed_i, "fixed label map")
    _check_companion(ml, moving_i, "moving label map")
    return fixed_i, moving_i, _binary(fm), _binary(mm), fl, ml


def _binary(mask: Image | None) -> Image | None:
    """A mask as 0/1 (non-zero = use): a label map given as a mask must not weight voxels by
    their label value."""
    return None if mask is None else mask.with_data((mask.data != 0).to(torch.uint8))


def _set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` with a clear error for a count below 1 (None: leave as is)."""
    if threads is None:
        return
    if int(threads) < 1:
        raise InputError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(int(threads))


def _device(device: str | torch.device | None) -> torch.device:
    try:
        dev = torch.device(device) if device is not None else torch.device("cpu")
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but CUDA is not available on this machine")
    return dev


def _finish(result: RegistrationResult, fixed: Image, moving: Image, fixed_labels: Image | None,
            moving_labels: Image | None) -> RegistrationResult:
    """Attach the inputs and warped labels, and compute the metrics."""
    result.fixed, result.moving = fixed, moving
    result.fixed_labels, result.moving_labels = fixed_labels, moving_labels
    if moving_labels is not None:
        with torch.no_grad():
            result.warped_labels = warp_labels(moving_labels, result.transform.to("cpu"), fixed.grid)
    from medreg.io import output_meta

    # outputs on fixed's grid are written in its space, label maps in the moving map's type
    result.warped.meta.update(output_meta(fixed))
    if result.warped_labels is not None:
        result.warped_labels.meta.update(output_meta(fixed, moving_labels))
    result.metrics = compute_metrics(result)
    return result


def predict(model: str | os.PathLike, fixed: Image | str | os.PathLike, moving: Image | str | os.PathLike, *,
            fixed_labels: Image | str | None = None, moving_labels: Image | str | None = None,
            device: str | torch.device | None = None, threads: int | None = None,
            seed: int | None = None, instance_steps: int = 0, regularisation: float | None = None,
            initialisation: str | None = None, instance_method: str | None = None,
            passes: int = 1, symmetric: bool | None = None) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a trained network.

    Args:
        model: a bundled model's name (``medreg models``) or a checkpoint path.
        fixed, moving: images or paths (any grids; the model's dimension).
        fixed_labels, moving_labels: label maps for Dice before/after (not used by the model).
        device, threads, seed: as for :func:`register`.
        instance_steps: steps refining the predicted field on the pair (instance optimisation).
        instance_method: ``adam`` (gradient steps on the model's training loss) or ``greedy``
            (the ``fast`` preset's compositional LNCC updates); default
            :data:`medreg.train.predict.INSTANCE_DEFAULTS`.
        regularisation: regulariser weight for a model trained with a regularisation input.
        initialisation: initial alignment (``none``, ``geometry``, ``com``, ``moments``,
            ``affine``); default the model's.
        passes: network passes: each further pass registers the moving image warped so far and
            composes the fields (network-only, before any instance optimisation).
        symmetric: average the velocities predicted in both directions (diffeomorphic models;
            inverse-consistent, twice the network time); None: the model's default (on for
            ``brain3d``, see ``medreg models NAME``).

    Returns:
        :class:`RegistrationResult` as :func:`register` (transform fixed → moving, warped, metrics).
    """
    from medreg.train.checkpoint import load_checkpoint
    from medreg.train.predict import predict as run_predict

    _set_threads(threads)
    if seed is not None:
        torch.manual_seed(int(seed))
    fixed_i, moving_i, _, _, fl, ml = _load_inputs(fixed, moving, None, None, fixed_labels, moving_labels)
    dev = _device(device)
    loaded = load_checkpoint(model, device=dev)
    result = run_predict(loaded, fixed_i.to(dev), moving_i.to(dev), model=str(model),
                         initialisation=initialisation, instance_steps=instance_steps,
                         regularisation=regularisation, passes=passes, symmetric=symmetric,
                         instance=None if instance_method is None else {"method": instance_method})
    result.transform = result.transform.to("cpu")
    result.warped = result.warped.to("cpu")
    return _finish(result, fixed_i, moving_i, fl, ml)


def _similarity_value(cfg: Any, fixed: Image, warped: Image) -> dict[str, float]:
    from medreg.engine.driver import build_similarity

    # the last stage as it ran on this fixed image (a small image runs its small_image settings)
    spec = cfg.similarity if hasattr(cfg, "similarity") else \
        cfg.stages_for(fixed.grid.shape)[-1].similarity
    sim = build_similarity(spec).to(fixed.data.device)
    with torch.no_grad():
        return {"name": spec["name"], "value": float(sim(fixed.batch(torch.float32), warped.batch(torch.float32)))}


def compute_metrics(result: RegistrationResult) -> dict[str, Any]:
    """Similarity before/after, Jacobian statistics on the fixed grid, and with both label maps
    Dice before/after and per-label Dice/HD95 after (``result.warped_labels``)."""
    from medreg.metrics import displacement_metrics, label_metrics
    from medreg.transforms import Identity

    fixed, moving = result.fixed, result.moving
    with torch.no_grad():
        before = warp_image(moving.to(torch.float32), Identity(fixed.ndim), fixed.grid)
    disp = result.displacement()
    m: dict[str, Any] = {
        "similarity_before": _similarity_value(result.config, fixed, before),
        "similarity_after": _similarity_value(result.config, fixed, result.warped),
        # NDV (LUMIR) is left to `medreg evaluate`: it costs more than everything else here
        "displacement": displacement_metrics(disp.double(), fixed.grid, ndv=False),
        "runtime_s": round(result.runtime_s, 3),
        "history": result.history,
    }
    fixed_labels, moving_labels = result.fixed_labels, result.moving_labels
    if fixed_labels is not None and moving_labels is not None and result.warped_labels is not None:
        with torch.no_grad():
            w_before = warp_labels(moving_labels, Identity(fixed.ndim), fixed.grid)
        labels = sorted(set(torch.unique(fixed_labels.data).tolist()) - {0})
        b = label_metrics(fixed_labels, w_before, labels, surface=False).to_dict()
        a = label_metrics(fixed_labels, result.warped_labels, labels).to_dict()
        m["dice_before"] = b.get("mean_dice")
        m["dice_after"] = a.get("mean_dice")
        m["labels"] = a
    return m


def versions() -> dict[str, str]:
    import numpy
    import SimpleITK

    from medreg import __version__

    return {"medreg": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "SimpleITK": SimpleITK.Version_VersionString(), "python": platform.python_version()}


def check_outdir(outdir: str | os.PathLike, overwrite: bool) -> Path:
    """The output folder, checked before a registration runs: not a file, and without earlier
    registration outputs unless ``overwrite``."""
    from medreg.io.paths import file_suffix
    from medreg.io.transform_io import FIELD_SUFFIXES, H5_SUFFIXES

    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if not out.exists() and file_suffix(out) in (*FIELD_SUFFIXES, *H5_SUFFIXES):  # image/transform names
        raise InputError(f"{out}: looks like a file name, but OUTDIR is the folder that receives "
                         f"{', '.join(OUTPUT_FILES)}; give a folder name")
    if out.exists() and any((out / f).exists() for f in OUTPUT_FILES) and not overwrite:
        raise InputError(f"{out}: the output folder already holds registration outputs; "
                         "pass --overwrite to replace them")
    return out


def save_result(result: RegistrationResult, outdir: str | os.PathLike, *, overwrite: bool = False,
                qc: bool = True) -> dict[str, Path]:
    """Write the standard output folder (see ``docs/architecture.md``): ``warped.nii.gz``,
    ``warped_labels.nii.gz`` (with moving labels), ``transform.h5``, ``displacement.nii.gz``,
    ``metrics.json``, ``qc.png``. Existing files are an error unless ``overwrite``."""
    from medreg.io import output_meta, write_transform

    out = check_outdir(outdir, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in OUTPUT_FILES}
    # an earlier run's outputs that this one does not write (its warped labels, its QC picture)
    # would sit beside this run's transform as if they belonged to it: remove them all first
    for path in [*paths.values(), out / "report.html"]:  # (`medreg report`'s page of that run)
        path.unlink(missing_ok=True)
    fixed = result.fixed
    transform = result.transform.to("cpu")
    warped = result.warped.to("cpu")
    warped_labels = result.warped_labels
    if warped_labels is None:
        del paths["warped_labels.nii.gz"]
    disp = result.displacement()  # the dense field once, for metrics, the field file and QC
    # the NIfTI files (gzip, mostly outside the GIL) are written by a worker thread while this
    # one writes the transform, the metrics and the QC picture; errors surface below
    with ThreadPoolExecutor(max_workers=1) as pool:
        nifti = pool.submit(_write_niftis, warped, warped_labels,
                            DisplacementField(disp, fixed.grid), paths, output_meta(fixed))
        write_transform(transform, paths["transform.h5"], grid=fixed.grid)
        meta = {**result.metrics, "preset_config": result.config.to_dict(), "versions": versions(),
                "fixed": fixed.name, "moving": result.moving.name}
        from medreg.metrics import to_jsonable

        paths["metrics.json"].write_text(json.dumps(to_jsonable(meta), indent=2))
        if qc:
            from medreg.viz.qc import save_qc

            save_qc(paths["qc.png"], fixed, warped, result.moving,
                    fixed_labels=result.fixed_labels, moving_labels=result.moving_labels,
                    warped_labels=warped_labels, displacement=disp, metrics=result.metrics)
        else:
            del paths["qc.png"]
        nifti.result()
    return paths


def _write_niftis(warped: Image, warped_labels: Image | None, field: DisplacementField,
                  paths: dict[str, Path], meta: dict) -> None:
    from medreg.io import write_displacement, write_image

    write_image(warped, paths["warped.nii.gz"])
    if warped_labels is not None:
        write_image(warped_labels, paths["warped_labels.nii.gz"])
    write_displacement(field, paths["displacement.nii.gz"], meta=meta)
