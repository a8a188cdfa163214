"""Token generation over a `homerun.engine.runtime.Session`: prefill (with prefix reuse) then decode, one `Step` per token.

The generator feeds a sampled token only when the consumer asks for the next one, so closing it early
(Ctrl-C in chat) leaves the session holding prompt + every yielded token except the last; feeding is
all-or-nothing per chunk, so the session is always consistent. Text decoding is the caller's job.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from homerun.errors import UsageError
from homerun.engine.sampling import SamplingParams, make_generator, read_token, sample_tensor, sampling_draw

if TYPE_CHECKING:
    from homerun.engine.runtime import Model, Session

FINISH_EOS = "eos"
FINISH_LENGTH = "length"


@dataclass(frozen=True)
class Step:
    """One generated token. index counts generated tokens from 0. prefill_s / prefill_tokens are set on the first
    step only (tokens actually fed: a reused prefix is not counted). step_s is the wall time to produce this token
    (first step: prefill + sampling; later: one decode forward + sampling). tokens_per_s is the mean decode rate
    over steps 1..index (None on the first step). finish_reason is "eos", "length" or None."""

    token_id: int
    index: int
    step_s: float
    tokens_per_s: float | None = None
    prefill_s: float | None = None
    prefill_tokens: int | None = None
    reused_tokens: int | None = None
    finish_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prefix_len(have: Sequence[int], want: Sequence[int]) -> int | None:
    """len(have) if `have` is a prefix of `want`, else None."""
    if len(have) > len(want):
        return None
    return len(have) if list(want[: len(have)]) == list(have) else None


def generate(
    model: "Model",
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    greedy: bool = False,
    session: "Session | None" = None,
    stop_ids: Iterable[int] | None = None,
) -> Iterator[Step]:
    """Yield up to max_new_tokens Steps. Sampling defaults come from generation_config.json.

    With `session`, a session whose tokens are a prefix of prompt_ids only gets the remainder (prefix reuse across
    chat turns); any other session is reset first. Stops after a token in stop_ids (default: the EOS ids)."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise UsageError("generate() needs a non-empty prompt", hint="V4 prompts start with the BOS token")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    params = SamplingParams.resolve(
        model.generation_config, temperature=temperature, top_p=top_p, top_k=top_k, greedy=greedy
    )
    stops = set(int(s) for s in stop_ids) if stop_ids is not None else set(model.eos_ids)
    return _run(model, prompt, max_new_tokens, params, seed, session, stops)


def _run(model, prompt, max_new_tokens, params, seed, session, stops) -> Iterator[Step]:
    if max_new_tokens == 0:
        return
    sess = session if session is not None else model.session()
    reused = _prefix_len(sess.tokens, prompt) if session is not None else None
    if reused is None or (reused == len(prompt) and not sess.has_logits):
        sess.reset()
        reused = 0
    t0 = time.perf_counter()
    # Logits stay on the model's device and the sampled id is fed back as a device tensor: the id read back for
    # the Step is the one host sync per decode token (a GPU drains its queue at each), and a speculated step's
    # end-of-token check reads what that sync brought back.
    logits = sess.feed(prompt[reused:], on_device=True)
    prefill_s = time.perf_counter() - t0
    # Where the logits are, so a GPU draws each token's V random values itself (no host draw, no copy up); a seed
    # thus picks other tokens on a GPU than on the CPU (make_generator).
    generator = make_generator(seed, logits.device)
    decode_s = 0.0
    token, token_t = -1, None
    for i in range(max_new_tokens):
        ts = time.perf_counter()
        if i > 0:
            logits = sess.decode(token_t, token, defer=True)
        # The step's random draw is kept (a tensor, nothing copied): a redo chooses from it again, which is what
        # the non-speculating run draws, without saving the generator's state for every speculated token.
        draw = sampling_draw(logits, params, generator)
        token_t = sample_tensor(logits, params, draw=draw)
        token = int(token_t)  # the one host wait; a speculated step's end check rides it (Session.settle)
        redone = sess.settle(synced=True)
        if redone is not None:  # the step missed a layer's experts: its exact logits, sampled from the same draw
            token_t = sample_tensor(redone, params, draw=draw)
            token = int(token_t)
        token = read_token(token, f"generated token {i} (after {sess.n_tokens} context tokens)")
        step_s = time.perf_counter() - ts + (prefill_s if i == 0 else 0.0)
        if i > 0:
            decode_s += step_s
        finish = FINISH_EOS if token in stops else FINISH_LENGTH if i == max_new_tokens - 1 else None
        yield Step(
            token_id=token,
            index=i,
            step_s=step_s,
            tokens_per_s=(i / decode_s) if i > 0 and decode_s > 0 else None,
            prefill_s=prefill_s if i == 0 else None,
            prefill_tokens=len(prompt) - reused if i == 0 else None,
            reused_tokens=reused if i == 0 else None,
            finish_reason=finish,
        )
        if finish is not None:
            return
