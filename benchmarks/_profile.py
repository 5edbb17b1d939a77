"""Shared bits of the profiling scripts (``profile_*.py``): the vxm pair and a preset's stage."""

from __future__ import annotations

import sys
from pathlib import Path

from medreg.engine.config import StageConfig, load_config
from medreg.engine.presets import load_preset

#: The vxm brain pair (``fixed.nii.gz``, ``moving.nii.gz``) in the shared data.
DATA = Path(__file__).resolve().parents[1].parent / "shared/data/vxm-brain-t1-aseg/nifti"


def first_stage(preset: str, kind: str) -> StageConfig:
    """The first stage of type ``kind`` of a preset name or YAML config; exits when there is none."""
    cfg = load_config(preset) if preset.endswith((".yaml", ".yml")) else load_preset(preset)
    stage = next((st for st in cfg.stages if st.type == kind), None)
    if stage is None:
        sys.exit(f"{preset} has no {kind} stage to profile")
    return stage
