"""Per-token overheads of the hybrid decode (issue 13) through the generation loop (`Model.generate`: Session.decode +
device sampling + the id read back) on one CUDA stand-in: device launches, graph replays, host waits (counted syncs +
event waits) and router guesses, for an all-cached and a 1-resident + 2-cached tiny model (the mixed preset, 3
layers, 8 experts, a cache holding every expert, so every call hits and decode tokens are speculated), eager and
graphed; speculated (auto: every token all-hit) and exact (never). guesses: router passes for a guess made
eagerly; graph_kernels: the kernels inside the replayed graphs (a captured guess is among them).

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/hybrid_token_waits.py [--tokens 4] [--plans cached,mixed]

Steps 0-2 (prefill, the captures) are not counted. Prints one JSON line per (plan, runner).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import homerun  # noqa: E402,F401  before torch: its OMP_WAIT_POLICY=PASSIVE applies only then
import torch  # noqa: E402

from homerun.bench.graph_check import hybrid_placement, warm_every_expert  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.formats.checkpoint import tiny_config, write_checkpoint  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402

N_LAYERS, N_EXPERTS, RESIDENT = 3, 8, 1


def _placement(mixed: bool):
    return hybrid_placement(N_LAYERS, N_EXPERTS, resident=RESIDENT if mixed else None)


def measure(path, plan: str, runner: str, tokens: int, speculate: str = "auto") -> dict:
    mixed = plan == "mixed"
    model = load(path, dtype="bfloat16", experts="reference", placement=_placement(mixed),
                 cuda_graphs="on" if runner == "graphed" else "off")
    be = model.net.experts
    cached = be.backends_by_layer[0] if mixed else be
    cached.miss_policy.mode = "cpu"
    cached.fused.policy.mode = speculate
    warm_every_expert(cached, N_LAYERS, N_EXPERTS, RESIDENT if mixed else None)
    guesses = [0]
    real = model.net._next_layer_guess

    def spy(layer, h, ids):  # a router pass for a guess (inside a capture: once, then replayed with the graph)
        out = real(layer, h, ids)
        guesses[0] += out is not None
        return out

    model.net._next_layer_guess = spy
    gen = model.generate([1, 2, 3, 4], max_new_tokens=3 + tokens, stop_ids=[], greedy=True)
    tot = {"launches": 0, "graphs": 0, "graph_kernels": 0, "syncs": 0, "waits": 0, "guesses": 0}
    d0 = cached.fused.stats()
    for i in range(3 + tokens):
        if i == 3:
            d0 = cached.fused.stats()
        g0 = guesses[0]
        with count_device_work() as cw:
            next(gen)
        if i >= 3:
            for k, v in (("launches", cw.c.device_launches), ("graphs", cw.c.graphs),
                         ("graph_kernels", cw.c.graph_kernels), ("syncs", cw.c.syncs),
                         ("waits", cw.c.waits), ("guesses", guesses[0] - g0)):
                tot[k] += v
    d1 = cached.fused.stats()
    model.net.experts.close()
    out = {"plan": "all cached" if not mixed else "1 resident + 2 cached", "runner": runner, "speculate": speculate}
    out.update({f"{k}_per_token": v / tokens for k, v in tot.items()})
    out["host_waits_per_token"] = (tot["syncs"] + tot["waits"]) / tokens
    out["speculated_tokens"] = d1["speculative_tokens"] - d0["speculative_tokens"]
    out["redos"] = d1["redos"] - d0["redos"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--plans", default="cached,mixed")
    ap.add_argument("--runners", default="eager,graphed")
    ap.add_argument("--speculate", default="auto,never", help="the speculation policies to run (auto, never)")
    opts = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        path = write_checkpoint(os.path.join(root, "mixed"), {**tiny_config("mixed"), "sliding_window": 8})
        for plan in opts.plans.split(","):
            for runner in opts.runners.split(","):
                for spec in opts.speculate.split(","):
                    print(json.dumps(measure(path, plan, runner, opts.tokens, spec)), flush=True)


if __name__ == "__main__":
    main()
