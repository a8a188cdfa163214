"""Turning a stream of generated token ids into reasoning/content deltas, the final assistant message and the
turn's stats. Terminal-independent; used by `homerun.chat.session.ChatSession`.

`StreamSplitter` splits streamed text at `</think>`, EOS and the tool-call block without ever showing part of a
marker; `lenient_parse` parses the completion strictly and falls back to the raw text when it is not well-formed
(a random or interrupted model may never close `</think>`); `TurnRun` accumulates one generation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from homerun.chat.encoding import (
    EOS,
    THINK_END,
    TOOL_CALLS_START,
    CompletionFormatError,
    parse_message_from_completion_text,
)


@dataclass(frozen=True)
class Delta:
    kind: str  # "reasoning" | "content"
    text: str


@dataclass(frozen=True)
class TurnStats:
    n_prompt: int
    n_cached: int
    n_gen: int
    prefill_s: float
    decode_s: float
    wall_s: float
    finish_reason: str  # "eos" | "length" | "interrupted"

    @property
    def decode_tok_s(self) -> float | None:
        # decode_s covers steps 2..n: the first token comes out of the prefill
        return (self.n_gen - 1) / self.decode_s if self.decode_s > 0 and self.n_gen > 1 else None

    @property
    def prefill_tok_s(self) -> float | None:
        fed = self.n_prompt - self.n_cached
        return fed / self.prefill_s if self.prefill_s > 0 else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decode_tok_s": self.decode_tok_s, "prefill_tok_s": self.prefill_tok_s}


class StreamSplitter:
    """Splits streamed completion text into reasoning and content deltas, holding back any tail that might be the
    start of `</think>`, the EOS text or a tool-call block, so markers never leak to the screen."""

    def __init__(self, thinking: bool) -> None:
        self.state = "reasoning" if thinking else "content"
        self._buf = ""

    def _markers(self) -> list[str]:
        return [THINK_END, EOS] if self.state == "reasoning" else [EOS, TOOL_CALLS_START]

    def push(self, text: str) -> list[Delta]:
        self._buf += text
        out: list[Delta] = []
        while self.state in ("reasoning", "content") and self._buf:
            hits = [(self._buf.find(m), m) for m in self._markers() if m in self._buf]
            if not hits:
                keep = _partial_marker_len(self._buf, self._markers())
                emit, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                if emit:
                    out.append(Delta(self.state, emit))
                break
            pos, marker = min(hits)
            if pos:
                out.append(Delta(self.state, self._buf[:pos]))
            self._buf = self._buf[pos + len(marker):]
            self.state = {THINK_END: "content", EOS: "done", TOOL_CALLS_START: "tools"}[marker]
        return out

    def finish(self) -> list[Delta]:
        tail, self._buf = self._buf, ""
        return [Delta(self.state, tail)] if tail and self.state in ("reasoning", "content") else []


def _partial_marker_len(buf: str, markers: list[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of a marker."""
    best = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(buf)), best, -1):
            if buf.endswith(marker[:n]):
                best = n
                break
    return best


def lenient_parse(text: str, thinking_mode: str) -> tuple[dict[str, Any], bool]:
    """Strict parse when the completion is well-formed; otherwise keep the raw text (a random or interrupted model
    may never close </think>): reasoning up to </think> when present, the rest as content, trailing EOS removed."""
    try:
        return parse_message_from_completion_text(text, thinking_mode), True
    except CompletionFormatError:
        pass
    body = text[: -len(EOS)] if text.endswith(EOS) else text
    reasoning = ""
    if thinking_mode == "thinking" and THINK_END in body:
        reasoning, body = body.split(THINK_END, 1)
    return {"role": "assistant", "content": body, "reasoning_content": reasoning, "tool_calls": []}, False


@dataclass
class TurnRun:
    """Accumulates one generation: text pieces, what was shown as content, counts and timings."""

    n_prompt: int
    n_cached: int
    splitter: StreamSplitter
    pieces: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    shown: list[str] = field(default_factory=list)
    n_gen: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish: str | None = None
    t0: float = field(default_factory=time.perf_counter)

    def consume(self, gen: Iterator[Any], decoder: Any, stop_requested: Callable[[], bool]) -> Iterator[Delta]:
        for step in gen:
            self.n_gen += 1
            self.ids.append(int(step.token_id))
            if self.n_gen == 1:  # the first step's step_s includes the prefill
                self.prefill_s = getattr(step, "prefill_s", None) or getattr(step, "step_s", 0.0) or 0.0
                reused = getattr(step, "reused_tokens", None)
                self.n_cached = self.n_cached if reused is None else reused
            else:
                self.decode_s += getattr(step, "step_s", 0.0) or 0.0
            yield from self._text(decoder.push(step.token_id))
            self.finish = getattr(step, "finish_reason", None)
            if self.finish is not None or stop_requested():
                break
        if self.finish is None:
            self.finish = "interrupted" if stop_requested() else "length"
        flush = getattr(decoder, "flush", None)
        if callable(flush):  # an incomplete UTF-8 character held back at the end
            yield from self._text(flush())
        yield from self._track(self.splitter.finish())

    def _text(self, piece: str) -> list[Delta]:
        self.pieces.append(piece)
        return self._track(self.splitter.push(piece))

    def _track(self, deltas: list[Delta]) -> list[Delta]:
        self.shown.extend(d.text for d in deltas if d.kind == "content")
        return deltas

    def completion_text(self) -> str:
        text = "".join(self.pieces)
        # The decoder may not spell the EOS out; the parser expects it.
        return text + EOS if self.finish == "eos" and not text.endswith(EOS) else text

    def stats(self) -> TurnStats:
        return TurnStats(n_prompt=self.n_prompt, n_cached=self.n_cached, n_gen=self.n_gen, prefill_s=self.prefill_s,
                         decode_s=self.decode_s, wall_s=time.perf_counter() - self.t0, finish_reason=self.finish or "")
