"""A small fake model that follows the runtime contract (homerun.load's model), for chat logic tests.

It uses the real tiny tokenizer and "generates" scripted completion texts token by token, keeping its session's
tokens exactly as a real runtime must (prompt + generated so far, also when the generator is closed early).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FakeStep:
    token_id: int
    index: int
    finish_reason: str | None
    prefill_s: float | None
    step_s: float


class FakeSession:
    def __init__(self, capacity_tokens=None):
        self.tokens: list[int] = []
        self.resets = 0
        if capacity_tokens is not None:
            self.capacity_tokens = capacity_tokens

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def reset(self) -> None:
        self.tokens = []
        self.resets += 1


class FakeModel:
    def __init__(self, tokenizer, scripts, *, capacity=None, session_capacity=None, stats=None):
        self.tokenizer = tokenizer
        self.generation_config = {"temperature": 0.7, "top_p": 0.9, "do_sample": True}
        self.scripts = list(scripts)  # completion texts (EOS included where the model "stops") or id lists
        self.calls: list[dict[str, Any]] = []
        self.closed = 0
        self._stats = stats if stats is not None else {"expert_cache": {"hits": 3, "misses": 1}}
        self._session_capacity = session_capacity
        if capacity is not None:
            self.max_context_tokens = lambda: capacity

    def session(self):
        return FakeSession(self._session_capacity)

    def stats(self):
        return dict(self._stats)

    def generate(self, prompt_ids, *, max_new_tokens, temperature=None, top_p=None, top_k=None, seed=None,
                 greedy=False, session=None, stop_ids=None):
        session = session if session is not None else FakeSession()
        prefix = session.tokens
        assert prompt_ids[: len(prefix)] == prefix, "caller must reset the session when it is not a prefix"
        self.calls.append({"prompt_ids": list(prompt_ids), "fed": len(prompt_ids) - len(prefix),
                           "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                           "top_k": top_k, "seed": seed, "greedy": greedy, "stop_ids": stop_ids})
        script = self.scripts.pop(0)  # text, or the exact ids to "generate"
        ids = list(script) if isinstance(script, list) else self.tokenizer.encode(script)
        session.tokens = list(prompt_ids)
        try:
            for i, tid in enumerate(ids[:max_new_tokens]):
                if i:  # like the runtime: a token is fed only when the consumer asks for the next one
                    session.tokens.append(ids[i - 1])
                stop = stop_ids and tid in stop_ids
                finish = "eos" if stop else ("length" if i + 1 == max_new_tokens else None)
                # First step: step_s includes the prefill, as in homerun.engine.generate.Step.
                yield FakeStep(tid, i, finish, 0.5 if i == 0 else None, 0.51 if i == 0 else 0.01)
                if finish:
                    return
        finally:
            self.closed += 1
