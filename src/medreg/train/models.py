"""Model cards of the bundled models: ``src/medreg/models/<name>.json`` next to ``<name>.pt``.

A card says what a model is for, what it was trained on (data, licence, steps, time), the
training config, and the numbers measured with it (with the command that produced them).
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

from medreg.core.errors import InputError


def models_dir():
    """The package folder holding the bundled models (a ``Traversable``)."""
    return resources.files("medreg") / "models"


def model_card(name: str) -> dict[str, Any]:
    """The card of bundled model ``name`` (an ``InputError`` when there is none)."""
    path = models_dir() / f"{name}.json"
    if not path.is_file():
        from medreg.train.checkpoint import bundled_models

        raise InputError(f"no bundled model named {name!r}; bundled: {', '.join(bundled_models()) or 'none'}")
    return json.loads(path.read_text())
