"""Classical registration: configs and presets, pyramids, initialisation and the driver.

:func:`medreg.register` (in :mod:`medreg.api`) is the entry point for users.
"""

from medreg.engine.config import (RegistrationConfig, StageConfig, config_from_dict, load_config,
                                  merge_overrides)
from medreg.engine.discrete import DiscreteParams, discrete_registration, run_discrete
from medreg.engine.driver import RegistrationResult, run_registration
from medreg.engine.initialise import centre_of_mass, initial_transform, principal_axes
from medreg.engine.presets import list_presets, load_preset, preset_text
from medreg.engine.progress import Progress
from medreg.engine.pyramid import pyramid_level, resample_field

__all__ = [
    "DiscreteParams", "discrete_registration", "run_discrete", "Progress", "RegistrationConfig", "RegistrationResult", "StageConfig", "centre_of_mass",
    "config_from_dict", "initial_transform", "list_presets", "load_config", "load_preset",
    "merge_overrides", "preset_text", "principal_axes", "pyramid_level",
    "resample_field", "run_registration",
]
