"""Shared fixtures: small synthetic grids and the optional real data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDREG_DATA", REPO.parent / "shared" / "data"))

torch.set_num_threads(1)  # tests run in 2 processes (pytest-xdist), one thread each


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` (or ``$MEDREG_DATA``); skips the test clearly when it is absent."""
    if not DATA.is_dir():
        pytest.skip(f"real data folder not found at {DATA} (set MEDREG_DATA to run this test)")
    return DATA


def oblique_direction(ndim: int, degrees: float = 20.0) -> np.ndarray:
    """A rotation of ``degrees`` about a non-axis vector (3D) or in the plane (2D)."""
    a = np.deg2rad(degrees)
    if ndim == 2:
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    axis = np.array([1.0, 2.0, 3.0])
    axis /= np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * (k @ k)


@pytest.fixture
def oblique_grid3d():
    from medreg.core import Grid

    return Grid((23, 31, 17), (0.9, 1.3, 2.5), (12.5, -30.0, 7.25), oblique_direction(3))


@pytest.fixture
def oblique_grid2d():
    from medreg.core import Grid

    return Grid((29, 37), (0.9, 1.3), (12.5, -30.0), oblique_direction(2))
