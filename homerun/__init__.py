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
