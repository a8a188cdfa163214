"""Chat session logic, independent of the terminal: history, thinking modes, slash commands, and atomic save/load
of the history file. The streaming split of reasoning/content is `homerun.chat.stream`; rendering (help text,
/stats, JSONL events) is the commands' job.

`ChatSession.turn(text)` encodes the whole conversation with `homerun.chat.encoding`, runs the model (reusing the KV
session when its tokens are a prefix of the new prompt) and yields `Delta` events, then one `TurnDone`. It never
prints and never reads input; `homerun/cli/chat_view.py` (for `chat`) and `homerun/cli/commands/run.py` render it.
It does not execute tool calls: parsed calls are shown and kept in the history, nothing more.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from homerun.chat.stream import Delta, StreamSplitter, TurnRun, TurnStats, lenient_parse  # noqa: F401 (re-export)
from homerun.chat.encoding import encode_messages
from homerun.engine.sampling import SamplingParams
from homerun.errors import ConfigError, HomerunError
from homerun.plan.records import THINK_MAX_MIN_TOKENS as THINK_MAX_MIN_CONTEXT_TOKENS  # DeepSeek: >= 384K for Think Max
from homerun.engine.tokens import common_prefix_len

THINK_MODES = ("off", "high", "max")
HISTORY_FORMAT = "homerun-chat"
HISTORY_VERSION = 1

def homerun_home() -> Path:
    return Path(os.environ.get("HOMERUN_HOME") or Path.home() / ".homerun")


def encoding_mode(think: str) -> tuple[str, str | None]:
    """homerun's think mode -> (thinking_mode, reasoning_effort) for `encode_messages`."""
    if think not in THINK_MODES:
        raise ConfigError(f"unknown thinking mode {think!r}", hint="use one of: off, high, max")
    return {"off": ("chat", None), "high": ("thinking", None), "max": ("thinking", "max")}[think]


def check_think_max(capacity_tokens: int | None) -> tuple[bool, str | None]:
    """(allowed, reason to tell the user). Unknown capacity is allowed with a warning; a known short one refused."""
    need = f"Think Max needs a context of at least {THINK_MAX_MIN_CONTEXT_TOKENS:,} tokens (384K)"
    if capacity_tokens is None:
        return True, f"context capacity is unknown; {need}"
    if capacity_tokens < THINK_MAX_MIN_CONTEXT_TOKENS:
        return False, f"context capacity is {capacity_tokens:,} tokens; {need}"
    return True, None


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    max_new_tokens: int = 4096
    greedy: bool = False

    @classmethod
    def from_generation_config(cls, config: dict[str, Any] | None, **overrides: Any) -> "SamplingSettings":
        """Defaults from the model's generation_config.json, resolved as `SamplingParams.resolve` does; `overrides`
        that are not None win (temperature 0 means greedy, as in most CLIs)."""
        chosen = {k: v for k, v in overrides.items() if v is not None}
        p = SamplingParams.resolve(config, temperature=chosen.pop("temperature", None), top_p=chosen.pop("top_p", None),
                                   top_k=chosen.pop("top_k", None), greedy=chosen.pop("greedy", False))
        return cls(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, greedy=p.greedy or p.temperature == 0,
                   **chosen)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TurnDone:
    message: dict[str, Any]
    stats: TurnStats
    parsed: bool  # False: the completion was not well-formed and was kept raw
    warning: str | None = None  # e.g. the history could not be saved (said once per session; the chat goes on)


@dataclass(frozen=True)
class CommandResult:
    kind: str  # "info" | "error" | "warn" | "exit" | "help" | "stats" (data holds them) | "reasoning"
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)



class ChatSession:
    """One conversation with one loaded model. Not thread-safe; `request_stop()` may be called from a signal
    handler to end the current generation after the step in flight."""

    def __init__(self, model: Any, *, think: str = "off", system: str | None = None,
                 sampling: SamplingSettings | None = None, model_name: str = "",
                 history_path: Path | None = None, stream_decoder: Callable[[Any], Any] | None = None,
                 autosave: bool = True, context_limit_tokens: int | None = None) -> None:
        encoding_mode(think)
        self.model = model
        self.think = think
        self.system = system or None
        self.sampling = sampling or SamplingSettings.from_generation_config(getattr(model, "generation_config", None))
        self.model_name = model_name
        self.messages: list[dict[str, Any]] = []
        self.history_path = history_path or self._new_history_path()
        self.last_stats: TurnStats | None = None
        self.total_gen = 0
        self._stream_decoder = stream_decoder
        self.autosave = autosave
        self.context_limit_tokens = context_limit_tokens  # from the plan, when one was made
        self._kv = model.session()
        self._seen: tuple[list[int], str] = ([], "")  # ids and text of the last prompt + completion
        self._stop = False
        self._autosave_warned = False
        self.kv_save = True  # /save also writes a KV snapshot (homerun.chat.kv_files); --no-kv-save turns it off
        self.kv_save_max_bytes: int | None = None  # None: kv_files.KV_SAVE_MAX_BYTES

    # ------------------------------------------------------------ conversation state

    def _new_history_path(self) -> Path:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return homerun_home() / "chats" / f"{stamp}-{uuid.uuid4().hex[:6]}.json"

    def conversation(self) -> list[dict[str, Any]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def prompt_text(self) -> str:
        mode, effort = encoding_mode(self.think)
        return encode_messages(self.conversation(), mode, reasoning_effort=effort)

    def prompt_ids(self, text: str | None = None) -> list[int]:
        """Token ids of the prompt. When the prompt extends the text the model has already seen (the last prompt plus
        its completion), those exact ids are kept and only the new text is tokenized: re-tokenizing generated text
        may split it differently, which would defeat the KV prefix reuse."""
        text = self.prompt_text() if text is None else text
        seen_ids, seen_text = self._seen
        if seen_text and text.startswith(seen_text):
            return seen_ids + list(self.model.tokenizer.encode(text[len(seen_text):]))
        return list(self.model.tokenizer.encode(text))

    def capacity_tokens(self) -> int | None:
        """The most context this run can reach: `model.max_context_tokens()` when the runtime has it, else the
        plan's context limit, else None (unknown). The session's `capacity_tokens` is only what is allocated now."""
        probe = getattr(self.model, "max_context_tokens", None)
        value = probe() if callable(probe) else None
        value = value or self.context_limit_tokens
        return int(value) if value else None

    def request_stop(self) -> None:
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    def reset(self) -> None:
        self.messages = []
        self.last_stats = None
        self._kv.reset()
        self._seen = ([], "")
        self.history_path = self._new_history_path()

    # ------------------------------------------------------------ a turn

    def turn(self, user_text: str) -> Iterator[Delta | TurnDone]:
        """Add a user message, generate the answer, yield deltas then TurnDone; the history is saved before TurnDone.
        A failure before anything was generated removes the user message again."""
        self.messages.append({"role": "user", "content": user_text})
        try:
            yield from self._generate()
        except BaseException:
            if self.messages and self.messages[-1].get("role") == "user":
                self.messages.pop()
            raise

    def _generate(self) -> Iterator[Delta | TurnDone]:
        mode, _ = encoding_mode(self.think)
        prompt = self.prompt_text()
        ids = self.prompt_ids(prompt)
        cached = common_prefix_len(list(self._kv.tokens), ids)
        if cached < len(self._kv.tokens):
            self._kv.reset()  # history was rewritten (dropped reasoning, /system, /load): re-prefill from scratch
            cached = 0
        s, self._stop = self.sampling, False
        gen = self.model.generate(ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                                  top_k=s.top_k, seed=s.seed, greedy=s.greedy, session=self._kv,
                                  stop_ids=[self.model.tokenizer.eos_id])
        run = TurnRun(n_prompt=len(ids), n_cached=cached, splitter=StreamSplitter(mode == "thinking"))
        try:
            yield from run.consume(gen, self._make_decoder(), lambda: self._stop)
        finally:
            gen.close()
        message, parsed = lenient_parse(run.completion_text(), mode)
        shown = "".join(run.shown)
        if message["content"] != shown and message["content"].startswith(shown):
            # A raw (unparsed) answer streamed as reasoning: send the rest so content deltas add up to the answer.
            yield Delta("content", message["content"][len(shown):])
        message = {**message, "think": self.think, "finish_reason": run.finish}
        self.messages.append(message)
        self._seen = (ids + run.ids, prompt + run.completion_text())
        self.last_stats = run.stats()
        self.total_gen += run.n_gen
        warning = self._autosave() if self.autosave else None  # after every turn, before anyone sees it as done
        yield TurnDone(message=message, stats=self.last_stats, parsed=parsed, warning=warning)

    def _make_decoder(self) -> Any:
        if self._stream_decoder is not None:
            return self._stream_decoder(self.model.tokenizer)
        from homerun.formats.tokenizer import StreamDecoder

        return StreamDecoder(self.model.tokenizer)

    # ------------------------------------------------------------ slash commands

    def handle_command(self, line: str) -> CommandResult:
        """Run one slash command (the line starts with '/')."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        handler = {
            "/think": self._cmd_think, "/system": self._cmd_system, "/reset": lambda a: self._cmd_reset(),
            "/save": self._cmd_save, "/save!": lambda a: self._cmd_save(a, force=True), "/load": self._cmd_load, "/stats": lambda a: self._cmd_stats(),
            "/set": self._cmd_set,
            "/reasoning": lambda a: self._cmd_reasoning(), "/help": lambda a: CommandResult("help"),
            "/exit": lambda a: CommandResult("exit"), "/quit": lambda a: CommandResult("exit"),
        }.get(name.lower())
        if handler is None:
            return CommandResult("error", f"Unknown command {name}; /help lists them")
        try:
            return handler(arg)
        except HomerunError as exc:
            return CommandResult("error", exc.message + (f" ({exc.hint})" if exc.hint else ""))

    def set_think(self, mode: str) -> CommandResult:
        if mode not in THINK_MODES:
            return CommandResult("error", f"Unknown thinking mode {mode!r}; use /think off|high|max")
        if mode == "max":
            allowed, reason = check_think_max(self.capacity_tokens())
            probe = getattr(self.model, "think_max_available", None)
            if allowed and callable(probe):  # the runtime also knows the KV budget and the live free memory
                allowed, why = probe()
                reason = reason if allowed else why
            if not allowed:
                return CommandResult("error", f"Think Max refused: {reason}. Thinking stays {self.think}.")
            self.think = mode
            return CommandResult("warn" if reason else "info", "Thinking: max" + (f" ({reason})" if reason else ""))
        self.think = mode
        return CommandResult("info", f"Thinking: {mode}")

    def _cmd_think(self, arg: str) -> CommandResult:
        if not arg:
            return CommandResult("info", f"Thinking: {self.think}")
        return self.set_think(arg.lower())

    def _cmd_system(self, arg: str) -> CommandResult:
        self.system = arg or None
        return CommandResult("info", "System prompt set" if arg else "System prompt cleared")

    def _cmd_reset(self) -> CommandResult:
        self.reset()
        return CommandResult("info", "Conversation reset")

    def _cmd_save(self, arg: str, force: bool = False) -> CommandResult:
        path = Path(arg).expanduser() if arg else self.history_path
        self.save_to(path, force=force or not arg)  # the default file is this session's own history
        from homerun.chat.kv_files import save_chat_kv

        kv = save_chat_kv(self, path, max_bytes=self.kv_save_max_bytes)
        return CommandResult("info", f"Saved {len(self.messages)} messages to {path}" + (f"; {kv}" if kv else ""),
                             {"path": str(path), "kv": kv})

    def _cmd_load(self, arg: str) -> CommandResult:
        if not arg:
            return CommandResult("error", "Usage: /load FILE")
        path = Path(arg).expanduser()
        self.load(path)
        from homerun.chat.kv_files import resume_chat_kv

        kv = resume_chat_kv(self, path)  # restore the KV snapshot next to it, else re-prefill the history
        return CommandResult("info", f"Loaded {len(self.messages)} messages from {path} (thinking: {self.think})"
                             + (f"; {kv}" if kv else ""), {"path": str(path), "kv": kv})

    def _cmd_set(self, arg: str) -> CommandResult:
        name, _, value = arg.partition(" ")
        key = name.strip().lower().replace("-", "_")
        kinds = {"temperature": float, "top_p": float, "top_k": int, "seed": int, "max_new_tokens": int}
        if key not in kinds or not value.strip():
            return CommandResult("error", "Usage: /set temperature|top-p|top-k|seed|max-new-tokens VALUE")
        raw = value.strip()
        if raw.lower() == "none" and key != "max_new_tokens":
            parsed = None
        else:
            try:
                parsed = kinds[key](raw)
            except ValueError:
                return CommandResult("error", f"/set {name}: {raw!r} is not a {kinds[key].__name__}")
            from homerun.engine.sampling import check_sampling  # lazily: it imports torch

            check_sampling(**{key: parsed})  # a bad value fails here, not in every later turn
        changes: dict[str, Any] = {key: parsed}
        if key == "temperature":
            changes["greedy"] = parsed == 0
        self.sampling = replace(self.sampling, **changes)
        return CommandResult("info", f"{key} = {parsed}")

    def _cmd_reasoning(self) -> CommandResult:
        for msg in reversed(self.messages):
            if msg.get("role") == "assistant":
                return CommandResult("reasoning", msg.get("reasoning_content") or "(no reasoning in the last answer)")
        return CommandResult("info", "No answer yet")

    def _cmd_stats(self) -> CommandResult:
        return CommandResult("stats", data=self.stats())

    def stats(self) -> dict[str, Any]:
        last = self.last_stats.to_dict() if self.last_stats else None
        model_stats = call_stats(self.model)
        return {
            "last_turn": last,
            "total_generated_tokens": self.total_gen,
            "expert_cache_hit_rate": expert_hit_rate(model_stats),
            "context_used_tokens": int(getattr(self._kv, "n_tokens", len(self._kv.tokens))),
            "context_allocated_tokens": getattr(self._kv, "capacity_tokens", None),
            "context_capacity_tokens": self.capacity_tokens(),
            "model_stats": model_stats,
        }

    # ------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": HISTORY_FORMAT, "version": HISTORY_VERSION, "model": self.model_name, "think": self.think,
            "system": self.system, "sampling": self.sampling.to_dict(), "messages": self.messages,
            "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def save(self, path: Path) -> None:
        """Write the history to `path` (directories are created: this is for the autosave location)."""
        save_history(path, self.to_dict())

    def save_to(self, path: Path, *, force: bool = False) -> None:
        """`/save FILE`: never creates directories, never replaces anything but a regular file, and replaces a file
        that is not a homerun chat history only when `force` (`/save! FILE`). Failures are HomerunErrors naming the
        file; the session is untouched either way."""
        path = Path(path)
        if path != self.history_path:
            check_save_target(path, force=force)
        try:
            save_history(path, self.to_dict(), make_dirs=path == self.history_path)
        except OSError as exc:
            raise HomerunError(f"{path}: cannot save the history ({exc.strerror or exc})",
                               hint="pick a writable place, e.g. /save ~/chat.json") from None

    def _autosave(self) -> str | None:
        """Save to the history file after a turn. A failure never ends the chat: the first one returns a warning,
        later ones are silent (each turn tries again)."""
        try:
            save_history(self.history_path, self.to_dict())
        except OSError as exc:
            if self._autosave_warned:
                return None
            self._autosave_warned = True
            return (f"history not saved to {self.history_path} ({exc.strerror or exc}); the chat goes on. "
                    "Check HOMERUN_HOME, or /save FILE to keep it elsewhere")
        return None

    def load(self, path: Path) -> None:
        data = load_history(path)
        self.messages = data["messages"]
        self.system = data.get("system") or None
        if data.get("think") in THINK_MODES:
            self.think = data["think"]
        self._kv.reset()
        self._seen = ([], "")
        self.last_stats = None


def call_stats(model: Any) -> dict[str, Any]:
    """The runtime's stats() dict (homerun.engine.runtime.Model), or {} for an engine without stats (test doubles,
    the bare generator API) or when the call fails: stats are informational and never end a chat."""
    probe = getattr(model, "stats", None)
    if not callable(probe):
        return {}
    try:
        return dict(probe() or {})
    except Exception:  # noqa: BLE001 - a failing stats call must not end the chat
        return {}


def expert_hit_rate(stats: dict[str, Any]) -> float | None:
    """Find the expert-cache hit rate in a runtime's stats dict (flat or nested, rate or hits/misses)."""
    for key in ("expert_cache_hit_rate", "hit_rate"):
        if isinstance(stats.get(key), (int, float)):
            return float(stats[key])
    hits, misses = stats.get("hits", stats.get("expert_hits")), stats.get("misses", stats.get("expert_misses"))
    if isinstance(hits, (int, float)) and isinstance(misses, (int, float)) and hits + misses > 0:
        return hits / (hits + misses)
    for value in stats.values():
        if isinstance(value, dict):
            found = expert_hit_rate(value)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------- history files


# A file bigger than this is not read to see whether it is a history (it is treated as foreign).
_HISTORY_SNIFF_MAX_BYTES = 256 << 20


def is_history_file(path: Path) -> bool:
    """True when `path` is a homerun chat history (a JSON object with format "homerun-chat")."""
    try:
        if Path(path).stat().st_size > _HISTORY_SNIFF_MAX_BYTES:
            return False
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == HISTORY_FORMAT


def check_save_target(path: Path, *, force: bool) -> None:
    """Raise ConfigError when an explicit save may not write `path`: a directory, a missing parent directory, a
    special file (/dev/null), or (unless forced) an existing file that is not a homerun chat history."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory", hint="give a file name, e.g. /save chat.json")
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: no such directory {path.parent}",
                          hint="/save does not create folders: create it first, or pick an existing one")
    if not (path.exists() or path.is_symlink()):
        return
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file; not overwritten", hint="pick another file name")
    if not force and not is_history_file(path):
        raise ConfigError(f"{path}: exists and is not a homerun chat history; not overwritten",
                          hint=f"/save! {path} replaces it, or pick another name")


def save_history(path: Path, data: dict[str, Any], *, make_dirs: bool = True) -> None:
    """Write atomically: temp file in the same directory, fsync, os.replace, fsync the directory. A crash leaves
    either the old file or the new one, never a truncated one. A replaced file keeps its permission bits; a new one
    is private (0600). `make_dirs=False` leaves a missing directory an error."""
    path = Path(path)
    if make_dirs:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, ensure_ascii=False, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_history(path: Path) -> dict[str, Any]:
    path = Path(path)
    hint = "pass a file written by /save or found under HOMERUN_HOME/chats"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such history file", hint=hint) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON history file ({exc})", hint=hint) from None
    if not isinstance(data, dict) or data.get("format") != HISTORY_FORMAT:
        raise ConfigError(f"{path}: field 'format' is not {HISTORY_FORMAT!r}", hint=hint)
    messages = data.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ConfigError(f"{path}: field 'messages' must be a list of messages with a 'role'", hint=hint)
    return data
