"""Models: one pure-math module per HF `model_type` (`model_module(model_type)` finds it), the linear layers over
weights kept as stored, and the paged KV rows as a data structure.

May import: homerun.errors, homerun.formats, homerun.kernels.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from homerun.errors import ConfigError

# model_type (config.json) -> module name under homerun.models
ARCHITECTURES = {"deepseek_v4": "deepseek_v4"}


def model_module(model_type: str) -> ModuleType:
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"config.json: model_type {model_type!r} is not supported",
            hint=f"supported: {', '.join(sorted(ARCHITECTURES))}",
        )
    return importlib.import_module(f"homerun.models.{ARCHITECTURES[model_type]}")
