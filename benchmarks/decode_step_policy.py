"""A/B of the decode-step thread policy (homerun/kernels/cpu_step.py) at a given context, in one process.

Prefill a random prompt of --context tokens, then decode one token per step, switching the policy on and off
every step, so both arms see the same context and the same drift of a shared machine's bandwidth. The policy:
torch's ops on one thread, kernel-pool workers spinning between kernels. Reports the median and minimum step time
of each arm. Both arms force their setting, whatever the policy's context limit says.

    python benchmarks/decode_step_policy.py --checkpoint CKPT --context 8000 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="an official-format V4 checkpoint (e.g. a synthetic one)")
    ap.add_argument("--context", type=int, default=4000, help="prompt tokens before the timed decode steps")
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps (alternating arms)")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    a = ap.parse_args()

    import homerun  # noqa: F401 - before torch, as the CLI does
    import torch

    import homerun.kernels.cpu_step as cs
    from homerun.bench.setup import open_target

    target, _, _ = open_target(a.checkpoint, kind="native", dtype="float32", device="cpu")
    model = target.model
    ids = torch.randint(256, model.args.vocab_size, (a.context,), generator=torch.Generator().manual_seed(7))
    sess = model.session()
    t0 = time.perf_counter()
    logits = sess.feed(ids.tolist())
    prefill_tok_s = a.context / (time.perf_counter() - t0)
    on_settings = (1, cs.DECODE_SPIN_US)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(a.steps + 2):
        on = i % 2 == 0
        cs.decode_settings = (lambda *_: on_settings) if on else (lambda *_: None)
        t0 = time.perf_counter()
        logits = sess.feed([int(torch.argmax(logits))])
        if i >= 2:  # the first two steps warm up
            times[on].append(time.perf_counter() - t0)
    doc = {"context": a.context, "prefill_tok_s": prefill_tok_s,
           **{f"{'policy' if on else 'default'}_ms_{k}": f(times[on]) * 1e3
              for on in (True, False) for k, f in (("median", statistics.median), ("min", min))}}
    if a.json:
        print(json.dumps(doc))
    else:
        print(f"context {a.context} (prefill {prefill_tok_s:.1f} tok/s): decode step median / min, policy "
              f"{doc['policy_ms_median']:.1f} / {doc['policy_ms_min']:.1f} ms, default {doc['default_ms_median']:.1f}"
              f" / {doc['default_ms_min']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
