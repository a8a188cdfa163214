"""homerun: run DeepSeek-V4-class mixture-of-experts models on a home rig."""

import os as _os
import sys as _sys

# torch's OpenMP workers spin after every op and steal the cores the native kernels' pool needs during decode
# (measured on 2 cores: 93 -> 68 ms per token). libgomp reads this once, so it only applies before torch loads.
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from homerun.errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    ContextFullError,
    DoesNotFitError,
    HomerunError,
    ProfileError,
    SnapshotError,
    UnknownModelError,
)

from homerun.version import __version__  # noqa: F401, E402


def __getattr__(name: str):
    # Lazy, so `import homerun` (and the CLI's startup) does not import torch. The public facade: the one import
    # that reaches up the layers (tests/test_layers.py exempts it).
    if name == "load":
        from homerun.engine.runtime import load

        return load
    if name == "LoadOptions":  # torch-free
        from homerun.engine.options import LoadOptions

        return LoadOptions
    raise AttributeError(f"module 'homerun' has no attribute {name!r}")
