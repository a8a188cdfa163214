"""Host cost per sampled decode token of what h13b took off the generation loop (issue 13), at V4's vocabulary on
the CPU, old and new alternated in one process (medians of wall and CPU ms):

- speculated: a speculated sampled token that stands: `generator.get_state()` before the draw (old; the state was
  kept so a redo could draw again) against nothing (new: the step's draw tensor is kept);
- redo: the redo of a missed speculated sampled token: `set_state` + a second `sample_tensor` with its own
  vocabulary-sized draw (old) against `sample_tensor(draw=the step's draw)` (new); both choose the same id;
- nan_check: the greedy choice with its NaN check: argmax + isnan over the row + any + masked_fill (old) against
  max + isnan + masked_fill on its one value (new);
- parts (h13c): where a sampled token's host time goes on the CPU path (`sample_tensor` whole, and each of its
  parts: the Exp(1) draw, the same draw into a kept buffer, an allocation alone, filter_logits, softmax, the choice),
  all in one rotation per round.

    flock /tmp/hr-bench.lock env PYTHONPATH=$PWD python benchmarks/sampled_token_host_cost.py [--rounds 15]

Prints one JSON line per measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

os.environ.setdefault("OMP_NUM_THREADS", "1")

import homerun  # noqa: E402,F401  before torch: its OMP_WAIT_POLICY=PASSIVE applies only then
import torch  # noqa: E402

from homerun.engine.sampling import (  # noqa: E402
    NAN_TOKEN, SamplingParams, filter_logits, make_generator, sample_tensor, sampling_draw)
from sampling_top_p import _timed  # noqa: E402  the same timer (benchmarks/ is the script's folder)

V4_VOCAB = 129280
PARAMS = SamplingParams(temperature=0.6, top_p=0.95)  # V4's generation_config defaults


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(1)
    g0 = torch.Generator().manual_seed(0)
    logits = (torch.randn(V4_VOCAB, generator=g0) * 2.5).bfloat16().float()
    redone = (logits + torch.randn(V4_VOCAB, generator=g0) * 0.01).bfloat16().float()
    gen = make_generator(1)

    def redo_old():
        state = gen.get_state()
        sample_tensor(logits, PARAMS, gen)
        gen.set_state(state)
        return sample_tensor(redone, PARAMS, gen)

    def redo_new():
        draw = sampling_draw(logits, PARAMS, gen)
        sample_tensor(logits, PARAMS, draw=draw)
        return sample_tensor(redone, PARAMS, draw=draw)

    def nan_old():
        return torch.argmax(logits).masked_fill(torch.isnan(logits).any(), NAN_TOKEN)

    def nan_new():
        best, token = torch.max(logits, 0)
        return token.masked_fill(torch.isnan(best), NAN_TOKEN)

    s1, s2 = make_generator(5), make_generator(5)
    assert int(sample_tensor(redone, PARAMS, draw=sampling_draw(logits, PARAMS, s1))) == \
        int(sample_tensor(redone, PARAMS, s2)), "the redo's choice differs"
    measures = {
        # the redo's extra work over the first choice: both run the first choice, so old - new is what a redo saved
        "redo": {"old": redo_old, "new": redo_new},
        "speculated": {"old": gen.get_state, "new": lambda: None},
        "nan_check": {"old": nan_old, "new": nan_new},
    }
    for what, fns in measures.items():
        times: dict[str, list[tuple[float, float]]] = {}
        for r in range(a.rounds + 1):
            for name in ("old", "new") if r % 2 else ("new", "old"):
                t = _timed(fns[name], a.per_round)
                if r:  # round 0 warms up
                    times.setdefault(name, []).append(t)
        out = {"measure": what, "vocab": V4_VOCAB, "threads": 1}
        for name, ts in times.items():
            out[f"{name}_ms"] = round(statistics.median(w for w, _ in ts), 4)
            out[f"{name}_cpu_ms"] = round(statistics.median(c for _, c in ts), 4)
        out["saved_cpu_ms"] = round(out["old_cpu_ms"] - out["new_cpu_ms"], 4)
        print(json.dumps(out), flush=True)
    print(json.dumps(_parts(logits, gen, a.rounds, a.per_round)), flush=True)


def _parts(logits: torch.Tensor, gen: torch.Generator, rounds: int, per_round: int) -> dict:
    """Median CPU ms of a sampled token (`sample_tensor` with its own draw) and of each of its parts."""
    probs = torch.softmax(filter_logits(logits, PARAMS), dim=-1)
    q, kept = sampling_draw(logits, PARAMS, gen), torch.empty(logits.shape)

    def choose():
        best, token = torch.max(probs / q, 0)
        return token.masked_fill(torch.isnan(best), NAN_TOKEN)

    parts = {
        "whole": lambda: sample_tensor(logits, PARAMS, gen),
        "draw": lambda: sampling_draw(logits, PARAMS, gen),
        "draw_kept_buffer": lambda: kept.exponential_(1, generator=gen),
        "alloc": lambda: torch.empty(logits.shape),
        "filter": lambda: filter_logits(logits, PARAMS),
        "softmax": lambda: torch.softmax(logits, dim=-1),
        "choose": choose,
    }
    times: dict[str, list[float]] = {}
    for r in range(rounds + 1):
        for name, fn in (parts.items() if r % 2 else reversed(parts.items())):
            t = _timed(fn, per_round)[1]
            if r:
                times.setdefault(name, []).append(t)
    out = {"measure": "parts", "vocab": V4_VOCAB, "threads": 1, "params": PARAMS.to_dict()}
    out.update({f"{name}_cpu_ms": round(statistics.median(ts), 4) for name, ts in times.items()})
    return out


if __name__ == "__main__":
    main()
