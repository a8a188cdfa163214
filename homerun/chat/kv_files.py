"""KV snapshots for chats and one-shot runs (issue 18), on top of `homerun.engine.snapshot`.

- A history file `NAME.json` has its snapshot next to it as `NAME.kv.safetensors`. `/save` writes both (unless
  `--no-kv-save`, or when the snapshot would exceed `KV_SAVE_MAX_BYTES` or the free disk); the snapshot's header
  keeps the text the KV tokens encode (`seen_text`), so a restored chat reuses the exact token ids.
- `/load` and `homerun chat --resume` restore the snapshot when it belongs to the model and matches the history,
  and otherwise re-prefill the history (the session's on_prefill / on_progress hooks show an ETA and progress).
- `homerun run --prompt-cache FILE` keeps the state of the prompt before the user's message (the system prompt: put
  a long shared document there) in FILE and feeds only the rest on later runs.

Only ChatSessions over a runtime `Model` (one with `restore`) take part; others (test doubles) are left alone. This
module never prints: it returns messages.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from homerun.engine.snapshot import save_session, snapshot_nbytes
from homerun.engine.snapshot_read import check_snapshot, read_header, restore_session
from homerun.errors import ConfigError, SnapshotError

KV_SAVE_MAX_BYTES = 32 * 10**9  # above this a /save keeps the history only (opt in with a larger --kv-save-max-gb)
_SENTINEL = "\uE000homerun-user-message\uE001"


def snapshot_path(history_path: str | Path) -> Path:
    p = Path(history_path)
    return p.with_name((p.name[: -len(".json")] if p.name.endswith(".json") else p.name) + ".kv.safetensors")


def _runtime(chat: Any) -> bool:
    return callable(getattr(chat.model, "restore", None)) and callable(getattr(chat._kv, "save", None))


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def next_turn_prefix(chat: Any) -> str:
    """The prompt text every next turn starts with: the conversation encoded as if a new user message followed,
    cut where that message's text would begin."""
    chat.messages.append({"role": "user", "content": _SENTINEL})
    try:
        text = chat.prompt_text()
    finally:
        chat.messages.pop()
    cut = text.find(_SENTINEL)
    return text[:cut] if cut >= 0 else ""


def _swap(chat: Any, session: Any, seen: tuple[list[int], str]) -> None:
    """Put a restored session in place of the chat's, keeping the display hooks."""
    old = chat._kv
    for hook in ("on_capacity", "on_prefill", "on_progress"):
        setattr(session, hook, getattr(old, hook, None))
    chat._kv = session
    chat._seen = seen


# ------------------------------------------------------------------------------------------------ chats


def save_chat_kv(chat: Any, history_path: str | Path, *, max_bytes: int | None = None) -> str | None:
    """Write the chat's KV snapshot next to `history_path`; a message for the user, None when there is nothing to
    write (no runtime session, no tokens, or kv saving off)."""
    if not _runtime(chat) or not getattr(chat, "kv_save", True) or chat._kv.n_tokens == 0:
        return None
    path = snapshot_path(history_path)
    size = snapshot_nbytes(chat._kv)
    limit = KV_SAVE_MAX_BYTES if max_bytes is None else max_bytes
    if size > limit:
        return f"KV snapshot not written: {_gb(size)} is over the {_gb(limit)} limit (--kv-save-max-gb)"
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    if size > free - (1 << 30):
        return f"KV snapshot not written: {_gb(size)} needed, {_gb(free)} free on disk"
    seen_ids, seen_text = chat._seen
    tokens = chat._kv.tokens
    extra: dict[str, Any] = {"history": Path(history_path).name}
    if seen_text and seen_ids[: len(tokens)] == tokens:
        extra.update(seen_text=seen_text, seen_tail=seen_ids[len(tokens):])
    if path.exists() or path.is_symlink():  # replace only a regular file that is a snapshot already
        try:
            if not path.is_file() or path.is_symlink():
                raise SnapshotError(f"{path} is not a regular file")
            read_header(path)
        except SnapshotError:
            return f"KV snapshot not written: {path} exists and is not a KV snapshot"
    t0 = time.perf_counter()
    try:
        save_session(chat._kv, path, extra=extra)
    except OSError as exc:
        return f"KV snapshot not written: {path}: {exc.strerror or exc}"
    return f"KV snapshot: {chat._kv.n_tokens:,} tokens, {_gb(size)} in {time.perf_counter() - t0:.1f} s -> {path}"


def resume_chat_kv(chat: Any, history_path: str | Path, *, prefill: bool = True) -> str | None:
    """After a history was loaded: restore its snapshot when it belongs to the model and the history, else
    (prefill=True) re-prefill the history now. A message for the user; None without a runtime session."""
    if not _runtime(chat):
        return None
    prefix = next_turn_prefix(chat)
    path = snapshot_path(history_path)
    why = None
    if path.is_file():
        try:
            t0 = time.perf_counter()
            meta = check_snapshot(chat.model, path)
            extra = meta.get("extra") or {}
            seen_text = extra.get("seen_text")
            if not seen_text or not prefix.startswith(seen_text):
                why = "it does not match this history"
            else:
                session = restore_session(chat.model, path)
                _swap(chat, session, (session.tokens + list(extra.get("seen_tail") or []), seen_text))
                return (f"Restored {session.n_tokens:,} tokens of KV from {path.name} in "
                        f"{time.perf_counter() - t0:.1f} s")
        except SnapshotError as exc:
            why = exc.message
    if not prefill or not prefix:
        return f"KV snapshot not used ({why})" if why else None
    n = prefill_prefix(chat, prefix)
    return (f"KV snapshot not used ({why}); " if why else "") + f"re-prefilled {n:,} tokens of history"


def prefill_prefix(chat: Any, prefix: str) -> int:
    """Feed `prefix` (text every next prompt starts with) into a fresh session; the next turn feeds only the rest."""
    ids = list(chat.model.tokenizer.encode(prefix))
    chat._kv.reset()
    if ids:
        chat._kv.feed(ids)
    chat._seen = (ids, prefix)
    return len(ids)


def resolve_history(name: str | None, chats: Path) -> Path:
    """--resume NAME: a history file path, a name under `chats` (HOMERUN_HOME/chats; with or without .json), or
    None / "last" for the most recently written history there."""
    if name and name != "last":
        for cand in (Path(name).expanduser(), chats / name, chats / f"{name}.json"):
            if cand.is_file():
                return cand
        raise ConfigError(f"no chat history named {name!r}", hint=f"pass a file, or a name under {chats}")
    found = sorted(chats.glob("*.json"), key=lambda p: p.stat().st_mtime) if chats.is_dir() else []
    if not found:
        raise ConfigError(f"no chat history under {chats} to resume", hint="chat first; /save keeps a conversation")
    return found[-1]


# ------------------------------------------------------------------------------------------ prompt cache


def use_prompt_cache(chat: Any, cache: str | Path, user_text: str) -> str | None:
    """homerun run --prompt-cache FILE: restore FILE when it is a prefix of this prompt (only the rest is fed),
    else prefill the prompt up to the user's message and write FILE. Refusals other than a stale prefix (another
    model or kv_dtype, a damaged file, over budget) raise SnapshotError. A message for stderr."""
    if not _runtime(chat):
        return None
    cache = Path(cache).expanduser()
    chat.messages.append({"role": "user", "content": user_text})
    try:
        prompt = chat.prompt_text()
    finally:
        chat.messages.pop()
    prefix = next_turn_prefix(chat)
    stale = None
    if cache.is_file():
        meta = check_snapshot(chat.model, cache)
        seen_text = (meta.get("extra") or {}).get("seen_text")
        if seen_text and prompt.startswith(seen_text):
            t0 = time.perf_counter()
            session = restore_session(chat.model, cache)
            _swap(chat, session, (session.tokens, seen_text))
            return (f"Prompt cache: restored {session.n_tokens:,} tokens from {cache.name} in "
                    f"{time.perf_counter() - t0:.2f} s")
        stale = "its prefix differs from this prompt"
    t0 = time.perf_counter()
    n = prefill_prefix(chat, prefix)
    if n == 0:
        return None
    save_session(chat._kv, cache, extra={"seen_text": prefix})
    return (f"Prompt cache {'rebuilt (' + stale + ')' if stale else 'written'}: {n:,} tokens in "
            f"{time.perf_counter() - t0:.1f} s -> {cache}")


def describe(path: str | Path) -> dict[str, Any]:
    """The header metadata of a snapshot file (no data read)."""
    return read_header(path)[0]
