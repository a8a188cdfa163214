"""Per-token time of a sampled token on the host at V4's vocabulary (129280): top-p through the full argsort as it
was (`old`: torch.sort's default, unstable order), through the stable full sort a device runs now (`before`,
`sampling._top_p_sorted`), and through the host path (`after`, `sampling._top_p_on_host`), alternated round by
round in one process, median per setting. Logits are bf16 (what the model's head returns) with a peaked
head; the same row for both.

    flock /tmp/hr-bench.lock env PYTHONPATH=$PWD python benchmarks/sampling_top_p.py [--rounds 15] [--threads 1]

Prints one JSON line per setting, for `filter_logits` alone and for the whole `sample_tensor` (whose seeded
exponential draw over the vocabulary, ~2 ms, stays): wall and process-CPU ms per token (median over rounds, each the
mean of --per-round tokens), and before / after of the CPU figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import homerun  # noqa: F401  before torch: its OMP_WAIT_POLICY=PASSIVE applies only then
import torch

from homerun.engine import sampling
from homerun.engine.sampling import SamplingParams, make_generator, sample_tensor

V4_VOCAB = 129280


def _top_p_unstable(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p before h13i, verbatim: torch.sort's default (unstable) order."""
    sorted_x, order = torch.sort(x, descending=True)
    drop = sampling._top_p_drop(sorted_x, top_p)
    return x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
SETTINGS = [dict(temperature=t, top_p=0.95, top_k=k) for t in (0.6, 1.0) for k in (None, 50)]


def _timed(fn, n: int) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    return (time.perf_counter() - w0) / n * 1e3, (time.process_time() - c0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(V4_VOCAB, generator=g) * 2.5
    logits[torch.randint(0, V4_VOCAB, (20,), generator=g)] += 12
    logits = logits.bfloat16().float()
    host_path, sorted_path = sampling._top_p_on_host, sampling._top_p_sorted
    for kw in SETTINGS:
        params = SamplingParams(**kw)
        gen = make_generator(1)
        fns = {"filter": lambda: sampling.filter_logits(logits, params),
               "sample_tensor": lambda: sample_tensor(logits, params, gen)}
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(a.rounds + 1):
            for fn_name, fn in fns.items():
                for name in ("old", "before", "after") if r % 2 else ("after", "before", "old"):
                    sampling._top_p_on_host = host_path if name == "after" else (lambda x, p: None)
                    sampling._top_p_sorted = _top_p_unstable if name == "old" else sorted_path
                    try:
                        t = _timed(fn, a.per_round)
                    finally:
                        sampling._top_p_on_host, sampling._top_p_sorted = host_path, sorted_path
                    if r:  # round 0 warms up
                        times.setdefault((fn_name, name), []).append(t)
        out = {**kw, "vocab": V4_VOCAB, "threads": a.threads}
        for (fn_name, name), ts in times.items():
            out[f"{fn_name}_{name}_ms"] = round(statistics.median(w for w, _ in ts), 3)
            out[f"{fn_name}_{name}_cpu_ms"] = round(statistics.median(c for _, c in ts), 3)
        for fn_name in fns:
            for base in ("old", "before"):
                out[f"{fn_name}_{base}_over_after_cpu"] = round(
                    out[f"{fn_name}_{base}_cpu_ms"] / out[f"{fn_name}_after_cpu_ms"], 1)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
