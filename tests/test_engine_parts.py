"""Engine parts: pyramid, progress reporting, presets, initialisation, the Python API."""

import io

import numpy as np
import pytest
import torch

from medreg.api import resolve_config
from medreg.core import Grid, Image, InputError
from medreg.engine.initialise import centre_of_mass, initial_transform, principal_axes
from medreg.engine.presets import list_presets, load_preset, preset_text
from medreg.engine.progress import Progress
from medreg.engine.pyramid import pyramid_level, resample_field
from medreg.transforms import RigidTransform, warp_image


def test_pyramid_level_keeps_world_box_and_mean():
    g = Grid((40, 30, 20), (1.0, 1.5, 2.0), (5.0, -3.0, 1.0))
    img = Image(torch.rand(*g.shape) + 1.0, g)
    coarse = pyramid_level(img, 2)
    assert coarse.grid.size == (20, 15, 10)
    assert np.allclose(coarse.grid.center(), g.center())
    assert abs(float(coarse.data.mean()) - float(img.data.mean())) < 0.02
    assert torch.equal(pyramid_level(img, 1, 0.0).data, img.data.float())


def test_resample_field_preserves_constant_vectors():
    a = Grid((10, 8), (2.0, 2.0))
    b = Grid((20, 16), (1.0, 1.0), (-0.5, -0.5))
    f = torch.zeros(1, 2, *a.shape)
    f[:, 0], f[:, 1] = 1.5, -2.0
    out = resample_field(f, a, b)
    assert out.shape == (1, 2, *b.shape) and torch.allclose(out[:, 0], torch.full_like(out[:, 0], 1.5))


def test_progress_prints_one_line_per_level_without_terminal_and_nothing_when_quiet():
    buf = io.StringIO()
    p = Progress(stream=buf)
    p.start(0, 2, "affine", 0, 2, 4, 10)
    for i in range(3):
        p.update(i + 1, -0.5)
    p.end(-0.5)
    lines = buf.getvalue().strip().splitlines()
    assert len(lines) == 1 and "stage 1/2" in lines[0] and "level 1/2" in lines[0] and "3 iterations" in lines[0]
    quiet = io.StringIO()
    q = Progress(quiet=True, stream=quiet)
    q.start(0, 1, "svf", 0, 1, 2, 5)
    q.end(0.0)
    assert quiet.getvalue() == ""


def test_presets_are_listed_and_parse():
    names = list_presets()
    assert {"rigid", "affine", "fast", "accurate", "multimodal", "lung"} <= set(names)
    assert "stages:" in preset_text("fast")
    assert resolve_config("rigid").stages[0].type == "rigid"
    with pytest.raises(InputError, match="unknown preset"):
        load_preset("nope")


def test_moments_initialisation_recovers_rotation():
    g = Grid((64, 48), (1.0, 1.0))
    y, x = torch.meshgrid(torch.arange(48.0), torch.arange(64.0), indexing="ij")
    blob = torch.exp(-(((x - 32) / 14) ** 2 + ((y - 24) / 5) ** 2))  # elongated: clear principal axes
    fixed = Image(blob, g)
    truth = RigidTransform(2, rotation=[0.4], center=list(g.center()), trainable=False, dtype=torch.float64)
    moving = warp_image(fixed, truth.inverse(), g)
    t = initial_transform(fixed, moving, "moments")
    assert np.allclose(t.linear_matrix().numpy(), truth.linear_matrix().numpy(), atol=0.05)
    assert torch.allclose(centre_of_mass(fixed), torch.tensor([32.0, 24.0], dtype=torch.float64), atol=0.1)
    c, axes = principal_axes(fixed)
    assert abs(float(axes[0, 1])) > 0.99  # largest spread along x
