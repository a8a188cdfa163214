"""Checks of a command's inputs that run before any slow work (planning, measuring, loading), so that a bad path, a
checkpoint without its tokenizer or an out-of-range flag fails at once, with the file or flag named and a hint that
fits the case (a missing local folder is not a Hub question)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from homerun.errors import CheckpointError, ConfigError, UsageError

CHECKPOINT_HINT = "pass a checkpoint directory (config.json, *.safetensors, tokenizer.json)"


def looks_local(model: str) -> bool:
    """True when `model` can only mean a path on this machine: it exists, or starts like a path ('.', '/', '~',
    a drive letter), or ends in a file extension. A bare `org/name` may be a Hub repo id or a card."""
    if Path(model).expanduser().exists():
        return True
    if model.startswith((".", "/", "~", os.sep)) or (len(model) > 1 and model[1] == ":"):
        return True
    return model.count("/") > 1 or Path(model).suffix in (".json", ".toml", ".safetensors")


def read_config_object(path: Path) -> dict[str, Any]:
    """A config.json as a dict, or a ConfigError naming the file."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})",
                          hint="restore config.json from the model's repository") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}",
                          hint="restore config.json from the model's repository")
    return data


def check_checkpoint_dir(model: str, *, need_tokenizer: bool) -> Path | None:
    """For a local checkpoint: the directory, after checking it exists and holds a valid config.json (and
    tokenizer.json when the command encodes text). None for a name the runtime resolves (a cached Hub repo id)."""
    path = Path(model).expanduser()
    if not path.exists():
        if looks_local(model):
            raise UsageError(f"{model}: no such directory", hint=CHECKPOINT_HINT)
        return None
    if not path.is_dir():
        raise UsageError(f"{model}: not a directory", hint=CHECKPOINT_HINT)
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{path}: no config.json in this directory", hint=CHECKPOINT_HINT)
    read_config_object(config)
    if need_tokenizer and not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path / 'tokenizer.json'}: missing, and chat and run need the tokenizer",
                              hint="copy tokenizer.json (and tokenizer_config.json) from the model's repository, "
                                   "or `homerun download REPO` fetches them")
    return path


def check_plan_model(model: str, *, hub: bool) -> str:
    """The model argument of `plan`, checked before resolving: a local-looking path that is missing is exit 2 without
    Hub talk; with --hub, an alias becomes its card's repo id and an offline or unreachable Hub is said plainly."""
    if not Path(model).expanduser().exists() and looks_local(model):
        raise UsageError(f"{model}: no such file or directory",
                         hint="pass a checkpoint folder, a config.json, or a shipped card such as "
                              "deepseek-ai/DeepSeek-V4-Flash")
    if not hub or Path(model).expanduser().exists():
        return model
    from homerun.plan.inventory import _hub_reachable
    from homerun.plan.specs import find_card

    card = find_card(model)
    repo = card[0] if card else model
    fallback = "drop --hub to plan from the shipped card" if card else "pass a local directory holding config.json"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UsageError(f"{model}: --hub reads the Hub, and HF_HUB_OFFLINE=1 forbids it", hint=fallback)
    if not _hub_reachable():
        raise UsageError(f"{model}: --hub reads the Hub ({repo}), and the Hub is unreachable from here",
                         hint=f"check the network, or {fallback}")
    return repo


def check_depth(depth: int, context: int | None, model_max_tokens: int) -> None:
    """A decode prediction at a depth past the context would plan a position no run can reach."""
    limit = min(context or model_max_tokens, model_max_tokens)
    if depth > limit:
        what = "--context" if context and context < model_max_tokens else "the model's maximum context"
        raise UsageError(f"--depth {depth:,} is beyond {what} of {limit:,} tokens",
                         hint=f"--depth is the context already filled when decoding; use at most {limit:,}")
