"""Device launches and graph replays per decode token on a CUDA stand-in (issue 13), per tiny preset and runner:
eager (no graphs), graphs with eager attention cores (`whole_step` off: n_layers + 1 segments, or 2 n_layers + 1
with --cached) and graphs with static attention cores (one graph a step; with --cached, one segment per stretch
between two routed calls, n_layers + 1, plus the router guesses that exact tokens replay).

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/decode_graph_launches.py [--tokens 8] [--cached] \
        [--kv-dtype auto|bf16|fp8] [--devices N] [--dtype bfloat16|float32]

--cached: every layer's experts behind a 6-slot device cache, misses computed on the CPU (a hybrid plan).
--devices: the layers split over N CUDA stand-ins (a pipeline split: embedding on the first, head on the last);
graphs across devices capture whole steps (one graph per device), a runner they can't serve runs eagerly and its
row says so ("runner_reason").
--kv-dtype: how the compressed entries are stored (fp8 quantizes them). --dtype: the compute dtype (bf16).
Each run prefills 4 tokens, decodes 2 untimed tokens (the capture), then counts `--tokens` decode steps (Session.feed,
logits included) with homerun.kernels.counting.count_device_work: launches = ATen ops + Triton launches + graph
replays, what the host would launch; a whole-step row also gives the kernels inside its one graph. Prints one JSON
line per (preset, runner).
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

from homerun.engine.placement import single_device, split_layers  # noqa: E402
from homerun.errors import UsageError  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.formats.checkpoint import TINY_PRESETS, tiny_config, write_checkpoint  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402


def measure(path, runner: str, tokens: int, cached: bool, kv_dtype: str = "auto", devices: int = 1,
            dtype: str = "bfloat16") -> dict:
    from homerun.formats.loader import open_checkpoint

    args = ModelArgs.from_hf_config(open_checkpoint(path).config)
    experts = "host" if cached else "device"
    if devices > 1:
        pl = split_layers(args.n_layers, [f"standin:{i}" for i in range(devices)], kind="cuda-standin",
                          experts=experts, expert_cache_slots=[6 if cached else 0] * devices)
    else:
        pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts=experts,
                           expert_cache_slots=6 if cached else None)
    try:
        model = load(path, dtype=dtype, experts="reference", placement=pl, kv_dtype=kv_dtype,
                     cuda_graphs="off" if runner == "eager" else "on")
    except UsageError:  # graphs impossible here: the eager forward serves (the row's runner_reason says why)
        model = load(path, dtype=dtype, experts="reference", placement=pl, kv_dtype=kv_dtype,
                     cuda_graphs="auto")
    if cached:
        for be in getattr(model.net.experts, "backends_by_layer", [model.net.experts]):
            if hasattr(be, "miss_policy"):
                be.miss_policy.mode = "cpu"
    if runner == "eager cores" and model.decode_graphs is not None:  # across devices: the eager forward
        model.decode_graphs.whole_step = False
    s = model.session()
    logits = s.feed([3, 1, 4, 1])
    for _ in range(2):
        logits = s.feed([int(logits.argmax())])
    launches = graphs = syncs = 0
    for _ in range(tokens):
        tok = int(logits.argmax())
        with torch.inference_mode(), count_device_work() as cw:
            logits = s.feed([tok])
        launches, graphs, syncs = launches + cw.c.device_launches, graphs + cw.c.graphs, syncs + cw.c.syncs
    out = {"layers": args.n_layers, "runner": runner, "launches_per_token": launches / tokens,
           "launches_per_layer_token": launches / tokens / args.n_layers,
           "graph_replays_per_token": graphs / tokens, "host_syncs_per_token": syncs / tokens,
           "runner_reason": model.decode_graphs_reason}
    segs = model.decode_graphs.segments if model.decode_graphs is not None else {}
    steps = [seg for key, seg in segs.items() if key[-1] == "step"]
    if steps and all(isinstance(seg, list) for seg in steps):  # EmulatedGraphs: the kernels in the whole-step
        out["kernels_in_step_graph"] = sum(len(seg) for seg in steps)  # graphs (what the GPUs run)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--presets", default=",".join(TINY_PRESETS))
    ap.add_argument("--cached", action="store_true", help="every layer's experts behind a device cache")
    ap.add_argument("--kv-dtype", default="auto", choices=("auto", "bf16", "fp8"), help="the entry stores' dtype")
    ap.add_argument("--devices", type=int, default=1, help="the layers split over this many CUDA stand-ins")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the compute dtype")
    opts = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        for kind in opts.presets.split(","):
            path = write_checkpoint(os.path.join(root, kind), tiny_config(kind))
            for runner in ("eager", "eager cores", "static cores"):
                row = {"preset": kind, "cached": opts.cached, "kv_dtype": opts.kv_dtype, "devices": opts.devices,
                       "dtype": opts.dtype,
                       **measure(path, runner, opts.tokens, opts.cached, opts.kv_dtype, opts.devices, opts.dtype)}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
