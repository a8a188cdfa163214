"""Exact prefix reuse for one runtime `Session`.

A session's inference state is immutable per commit: `Session.feed` replaces its list of per-layer states (frozen
dataclasses; the KV pages are append-only and each state records how many rows it has committed), so holding on to
the list a session had after some feed is a restorable point. Restoring it gives exactly the state a fresh prefill
of those tokens reached, whatever was fed after it (rows past the point are never read, and are overwritten by the
next feed). Points past a restored one are dropped: their pages are about to be overwritten.

Where the V4 encoding drops the reasoning of earlier turns, the next prompt differs from the live state right
after the last `<｜Assistant｜>` (`<think>` then reasoning in the state, `</think>` then the answer in the new
prompt). The engine therefore marks a point before the last prompt token and one after the prompt, and a new
request restores the longest marked point that is a prefix of its tokens.

Points are the runtime's `Session.checkpoint()`, restored with `Session.rollback()`. A session of another kind (a test
double) still reuses a live state that is a prefix of the new prompt, and otherwise starts over.
"""

from __future__ import annotations

from typing import Any, Sequence

from homerun.engine.session import Checkpoint, Session
from homerun.engine.tokens import common_prefix_len  # noqa: F401 - also imported from here by tests



class PrefixCache:
    """Restorable points along the live lineage of one session (at most `max_points`, the newest kept)."""

    def __init__(self, session: Any, max_points: int = 8) -> None:
        self.session = session
        self.max_points = max_points
        self.rollback_supported = isinstance(session, Session)
        self._points: list[Checkpoint] = []  # ascending n_tokens

    @property
    def points(self) -> list[int]:
        return [p.n_tokens for p in self._points]

    def mark(self) -> Checkpoint | None:
        """Remember the session's current state as a point, and return it (None where rollback is unsupported). Its
        logits stay where the model computed them (no copy to the host)."""
        if not self.rollback_supported:
            return None
        cp = self.session.checkpoint()
        if cp.n_tokens == 0 or cp.last_logits is None:
            return cp
        self._points = [p for p in self._points if p.n_tokens != cp.n_tokens] + [cp]
        self._points.sort(key=lambda p: p.n_tokens)
        del self._points[: max(0, len(self._points) - self.max_points)]
        return cp

    def reset(self) -> None:
        self.session.reset()
        self._points.clear()

    def reuse(self, ids: Sequence[int]) -> int:
        """Bring the session to the longest known state that is a prefix of `ids` and return its token count
        (0: it was reset). The caller then feeds ids[returned:]."""
        have = list(self.session.tokens)
        lcp = common_prefix_len(have, ids)
        # has_logits, not last_logits: reading those would bring device logits to the host just to test presence.
        if lcp == len(have) and (lcp < len(ids) or getattr(self.session, "has_logits", True)):
            return lcp  # the live state itself is a prefix of the new prompt
        if self.rollback_supported:
            usable = [p for p in self._points if p.n_tokens <= lcp]
            if usable:
                cp = usable[-1]
                self.session.rollback(cp)
                self._points = [p for p in self._points if p.n_tokens <= cp.n_tokens]
                return cp.n_tokens
        self.reset()
        return 0
