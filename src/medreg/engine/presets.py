"""Named registration presets: YAML files shipped in ``medreg/presets`` (like elastix parameter
files). ``medreg presets`` lists them; ``medreg presets NAME`` prints one."""

from __future__ import annotations

from importlib import resources

from medreg.core.errors import InputError
from medreg.engine.config import RegistrationConfig, config_from_dict


def _folder():
    return resources.files("medreg") / "presets"


def list_presets() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str:
    """The YAML text of preset ``name``."""
    names = list_presets()
    if name not in names:
        raise InputError(f"unknown preset {name!r}; choose one of: {', '.join(names)}")
    return (_folder() / f"{name}.yaml").read_text()


def load_preset(name: str) -> RegistrationConfig:
    """The :class:`RegistrationConfig` of preset ``name``."""
    import yaml

    from medreg.io.paths import config_loader

    return config_from_dict(yaml.load(preset_text(name), Loader=config_loader()), f"preset {name}")
