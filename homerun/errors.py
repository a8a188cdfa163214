"""The HomerunError hierarchy and exit codes. Library code raises these; only the CLI turns them into exit codes."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    RUNTIME = 1  # load, I/O, device or numeric failure
    USAGE = 2  # bad arguments, bad profile, bad config or checkpoint file
    NO_FIT = 3  # the model does not fit the profile
    INTERRUPTED = 130


class HomerunError(Exception):
    """Base error: one-line message plus an optional hint."""

    exit_code: ExitCode = ExitCode.RUNTIME

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(HomerunError):
    exit_code = ExitCode.USAGE


class ConfigError(UsageError):
    """A config.json, profile or user file is malformed or has a wrong field."""


class ProfileError(ConfigError):
    """A hardware profile is unknown or invalid."""


class UnknownModelError(ConfigError):
    """The model is neither a shipped card, a local directory nor a reachable Hub repo."""


class CheckpointError(UsageError):
    """A checkpoint file is missing, truncated, or holds a tensor of the wrong name, shape or dtype."""


class DoesNotFitError(HomerunError):
    exit_code = ExitCode.NO_FIT


class ContextFullError(HomerunError):
    """The KV cache cannot grow to hold more tokens within its budget. Nothing fed so far is lost."""


class DownloadError(HomerunError):
    """A Hub download failed or a file did not match the index."""


class NumericError(HomerunError):
    """A computation produced numbers no valid model gives (NaN logits): a broken model, kernel or device. A bug, so
    exit 1, not a bad input."""


class KernelError(HomerunError):
    """The native CPU kernel failed or is unavailable where it was required."""


class SnapshotError(UsageError):
    """A KV snapshot was refused: `reason` is "model" (another model or revision), "kv_dtype" (another KV or compute
    dtype), "corrupt" (truncated, damaged, or not a snapshot), "budget" (more KV than the plan allows), "version" or
    "io". Nothing live changed."""

    def __init__(self, message: str, *, hint: str | None = None, reason: str = "corrupt") -> None:
        super().__init__(message, hint=hint)
        self.reason = reason
