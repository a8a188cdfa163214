"""Host syncs and device launches per decode token through the generation loop (`Model.generate`: Session.decode +
device sampling) on an all-VRAM CUDA stand-in with whole-step graphs (issue 13), greedy and sampled.

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/decode_loop_syncs.py [--tokens 5] [--preset mixed]

Steps 0-2 (prefill, the whole-step captures) are not counted. Prints one JSON line per sampling mode.
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
from homerun.formats.loader import open_checkpoint  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402

MODES = {"greedy": dict(greedy=True), "sampled": dict(temperature=0.8, top_k=40, top_p=0.9, seed=7)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=5)
    ap.add_argument("--preset", default="mixed")
    opts = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        path = write_checkpoint(os.path.join(root, opts.preset), {**tiny_config(opts.preset), "sliding_window": 8})
        args = ModelArgs.from_hf_config(open_checkpoint(path).config)
        pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
        model = load(path, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs="on")
        for mode, kw in MODES.items():
            gen = model.generate([3, 1, 4, 1, 5], max_new_tokens=3 + opts.tokens, stop_ids=[], **kw)
            syncs = launches = 0
            names: dict[str, int] = {}
            for i in range(3 + opts.tokens):
                with count_device_work() as cw:
                    next(gen)
                if i >= 3:
                    syncs, launches = syncs + cw.c.syncs, launches + cw.c.device_launches
                    for k, v in cw.c.sync_names.items():
                        names[k] = names.get(k, 0) + v
            print(json.dumps({"preset": opts.preset, "mode": mode, "host_syncs_per_token": syncs / opts.tokens,
                              "launches_per_token": launches / opts.tokens, "sync_names": names}), flush=True)


if __name__ == "__main__":
    main()
