"""A serving job and what flows from it: the events a job's sink receives (`Delta` pieces, then one `Done` or
`Failed`), usage, the queue's refusals, the stop-string filter, and the engine's counters.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

_IDS = itertools.count(1)


@dataclass(frozen=True)
class Delta:
    kind: str  # "reasoning" | "content" (chat) | "text" (raw completions)
    text: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" | "length" | "tool_calls"
    text: str  # raw completions: the text; chat: the content
    reasoning: str | None  # chat in thinking mode: the reasoning ("" when none); otherwise None
    tool_calls: list[dict[str, Any]]
    usage: Usage
    ttft_s: float
    decode_tok_s: float | None


@dataclass(frozen=True)
class Failed:
    status: int
    message: str
    type: str = "server_error"
    code: str | None = None


class QueueFull(Exception):
    pass


class NotReady(Exception):
    def __init__(self, state: str, message: str) -> None:
        super().__init__(message)
        self.state = state
        self.message = message


class _Cancelled(Exception):
    pass


# ---------------------------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """One generation. `thinking`: the prompt opened `<think>` (chat), so the output starts with reasoning.
    `chat`: split reasoning/content and parse tool calls; otherwise raw text. `stop`: strings that end the output
    (applied to content, or to the raw text)."""

    ids: list[int]
    max_tokens: int
    sink: Callable[[Any], None]
    chat: bool = True
    thinking: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    id: int = field(default_factory=lambda: next(_IDS))
    cancelled: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "client"
    state: str = "new"  # new | queued | running | done

    def send(self, event: Any) -> None:
        try:
            self.sink(event)
        except Exception:  # noqa: BLE001 - a consumer that went away must not stop the worker
            pass


class StopFilter:
    """Cuts a text stream at the first of `stops`, holding back any tail that could begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._buf = ""
        self.hit = False

    def push(self, text: str) -> str:
        if not self.stops:
            return text
        if self.hit:
            return ""
        self._buf += text
        found = [(self._buf.find(s), s) for s in self.stops if s in self._buf]
        if found:
            pos, _ = min(found)
            out, self._buf, self.hit = self._buf[:pos], "", True
            return out
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._buf)), keep, -1):
                if self._buf.endswith(s[:n]):
                    keep = n
                    break
        out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return out

    def flush(self) -> str:
        out, self._buf = ("" if self.hit else self._buf), ""
        return out


# ---------------------------------------------------------------------------------------------- metrics


@dataclass
class Counters:
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected_queue_full: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    ttft_sum_s: float = 0.0
    decode_s: float = 0.0
    last_decode_tok_s: float | None = None
    last_prefill_tok_s: float | None = None
