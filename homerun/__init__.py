"""homerun: run DeepSeek-V4-class mixture-of-experts models on a home rig."""

from homerun.errors import (  # noqa: F401
    CheckpointError,
    ConfigError,
    ContextFullError,
    DoesNotFitError,
    HomerunError,
    ProfileError,
    UnknownModelError,
)

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import homerun` (and the CLI's startup) does not import torch.
    if name == "load":
        from homerun.runtime import load

        return load
    raise AttributeError(f"module 'homerun' has no attribute {name!r}")
