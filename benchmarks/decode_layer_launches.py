"""Device launches per layer per decode token on a CUDA stand-in, by layer kind (issue 13): the eager GPU path (no
graphs), each layer's `_block` counted apart (ATen ops that would launch + Triton launches), averaged over decode
steps; where a step closes a CSA window (one token in four) its compressor's write shows in the average.

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/decode_layer_launches.py [--preset mixed] [--tokens 8] \
        [--prompt 130] [--kv-dtype auto,fp8] [--dtype bfloat16]

Each run prefills --prompt tokens (130: every compressed store holds entries, HCA's first at 128), then counts
--tokens greedy decode steps (Session.feed). Prints one JSON line per (kv_dtype, layer): its kind, launches per
token, and the ops that launched most (name -> count per token; "triton": Triton launches).
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

from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.formats.checkpoint import tiny_config, write_checkpoint  # noqa: E402
from homerun.kernels import counting  # noqa: E402
from homerun.kernels.triton import load as triton_modules  # noqa: E402


def per_layer(path: str, kv_dtype: str, tokens: int, prompt: int, dtype: str = "bfloat16") -> list[dict]:
    from homerun.formats.loader import open_checkpoint
    from homerun.models.deepseek_v4 import ModelArgs

    args = ModelArgs.from_hf_config(open_checkpoint(path).config)
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    model = load(path, dtype=dtype, experts="reference", placement=pl, kv_dtype=kv_dtype, cuda_graphs="off")
    common = triton_modules().common
    net, counter = model.net, {}
    real_block = net._block
    rows = [{"launches": 0, "names": {}} for _ in net.layers]

    def block(layer, *a, **kw):  # the layer's share of the active counter: its ops and Triton launches
        c = counter.get("c")
        if c is None:
            return real_block(layer, *a, **kw)
        ops0, n0, names0 = c.ops, common.LaunchCounter.n, dict(c.op_names)
        out = real_block(layer, *a, **kw)
        row = rows[net.layers.index(layer)]
        row["launches"] += c.ops - ops0 + common.LaunchCounter.n - n0
        for k, v in c.op_names.items():
            if v != names0.get(k, 0):
                row["names"][k] = row["names"].get(k, 0) + v - names0.get(k, 0)
        row["names"]["triton"] = row["names"].get("triton", 0) + common.LaunchCounter.n - n0
        return out

    net._block = block
    s = model.session()
    logits = s.feed(torch.randint(0, 512, (prompt,), generator=torch.Generator().manual_seed(0)).tolist())
    for _ in range(tokens):
        tok = int(logits.argmax())
        with torch.inference_mode(), counting.count_device_work() as cw:
            counter["c"] = cw.c
            logits = s.feed([tok])
        counter.pop("c")
    out = []
    for layer, row in zip(net.layers, rows):
        top = sorted(row["names"].items(), key=lambda kv: -kv[1])
        out.append({"dtype": dtype, "kv_dtype": kv_dtype, "layer": layer.index, "kind": layer.kind,
                    "launches_per_token": row["launches"] / tokens,
                    "top_per_token": {k: v / tokens for k, v in top[:8]}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mixed")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=130, help="prompt tokens: 128+ give an HCA layer its first entry")
    ap.add_argument("--kv-dtype", default="auto,fp8", help="comma-separated: auto, bf16, fp8")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="the compute dtype")
    opts = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        path = write_checkpoint(os.path.join(root, opts.preset), tiny_config(opts.preset))
        for kv in opts.kv_dtype.split(","):
            for row in per_layer(path, kv, opts.tokens, opts.prompt, opts.dtype):
                print(json.dumps({"preset": opts.preset, **row}), flush=True)


if __name__ == "__main__":
    main()
