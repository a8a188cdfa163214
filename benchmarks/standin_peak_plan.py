"""Peak device bytes against the plan on CUDA stand-ins (issue 13, "VRAM as planned"), tiny "mixed" model, 64-token
pages, bf16 compute; no timings.

    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/standin_peak_plan.py devices [--ctx 127] [--cases ...]
    TRITON_INTERPRET=1 PYTHONPATH=$PWD python benchmarks/standin_peak_plan.py growth [--prompt 250] [--page 64]

`devices`: per case (1gpu: the rtx5090-192gb plan; 2gpu: the 2xh100 plan, all in VRAM; 2gpu-hybrid: two stand-ins by
hand, experts in host RAM with a 4-slot cache each, decode eager), KV fp8 and bf16, graphs on and off: a prompt of
ctx - 2 tokens, two decode steps (the last at position ctx - 1), each device's peak past its weights and expert
cache against the plan's KV + static-state rows for it (hybrid: its KV rows and eager-step row,
graph_memory.stage_kv_bytes + eager_stage_bytes), and against the eager plan (KV with its small state + eager step)
for every case. `watch` false: the stand-in's eager-step watch off (the accounting before h13r). One JSON line each.
`growth`: graphed steps across the 256 -> 512 bucket change, each step's peak of KV + static state against the plan's
charge at that context (GraphKvLayout.bytes_for) and its `moving` part.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
from dataclasses import replace

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))  # tiny, profiles

import homerun  # noqa: E402,F401  before torch
import torch  # noqa: E402

from homerun.engine.placement import placement_from_plan, single_device, split_layers  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.models.decode_bytes import static_bytes  # noqa: E402
from homerun.models.deepseek_v4.static_decode import static_shape  # noqa: E402
from homerun.plan.graph_memory import PLAN_PAGE_TOKENS, eager_stage_bytes, stage_kv_bytes, with_decode_graphs  # noqa
from homerun.plan.inventory import resolve_model  # noqa: E402
from homerun.plan.planner import PlanOptions, plan  # noqa: E402
from homerun.plan.specs import kv_layout  # noqa: E402
from profiles import load_profile  # noqa: E402
from tiny import make_checkpoint  # noqa: E402

PAGE = 64


def _prompt(n: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(7)).tolist()


def _held(u: dict) -> int:  # a device's peak less its constant parts
    c = u["bytes_by_class"]
    return u["peak_bytes"] - c.get("weights", 0) - c.get("expert_cache", 0) - c.get("other", 0)


def _planned_rows(spec, p, i: int, shape, ctx: int, kv_dtype: str, page_tokens: int) -> int:
    """Stage i's KV + static-state rows, its pages and moving store in the model's pages (not the plan's default)."""
    st = p.layout.stages[i]
    out = st.kv_bytes + st.graph_bytes
    out -= (static_bytes(shape, ctx, kv_dtype, 2, page_tokens=PLAN_PAGE_TOKENS).total
            - static_bytes(shape, ctx, kv_dtype, 2, page_tokens=page_tokens).total)
    kv, mine = kv_layout(spec, kv_dtype), replace(kv_layout(spec, kv_dtype), page_tokens=page_tokens)
    if len(p.layout.stages) > 1:
        return out - stage_kv_bytes(kv, 0, shape, ctx, True) + stage_kv_bytes(mine, 0, shape, ctx, True)
    return out - kv.bytes_for(ctx) + mine.bytes_for(ctx)


def devices(path, spec, inv, ctx: int, cases: list[str]) -> None:
    for kv_dtype in ("fp8", "bf16"):
        for case in cases:
            p = None
            if case == "2gpu-hybrid":
                pl, modes = split_layers(3, ["standin:0", "standin:1"], kind="cuda-standin", experts="host",
                                         expert_cache_slots=[4, 4]), ("auto",)
            else:
                p = plan(spec, inv, load_profile("rtx5090-192gb" if case == "1gpu" else "2xh100"),
                         PlanOptions(context_tokens=ctx, kv_dtype=kv_dtype))
                pl, modes = placement_from_plan(p, standin="cuda"), ("on", "off")
            for graphs in modes:
                for watch in (False, True):
                    m = load(path, dtype="bfloat16", experts="reference", placement=pl, kv_dtype=kv_dtype,
                             page_tokens=PAGE, cuda_graphs=graphs)
                    if not watch:
                        m._step_bytes.devices = {}
                    s = m.session()
                    s.feed(_prompt(ctx - 2))
                    for d in m.devices.values():
                        d._peak_bytes = d.used_bytes
                    s.feed([3])
                    s.feed([4])
                    usage = m.device_usage()
                    kv = replace(kv_layout(spec, kv_dtype), page_tokens=m.page_tokens)
                    eager = eager_stage_bytes(spec, kv, [len(u["layers"]) for u in usage], ctx)
                    for i, u in enumerate(usage):
                        shape = static_shape(m.net.args, u["layers"])
                        eager_plan = stage_kv_bytes(kv, 0, shape, ctx, False) + eager[i]
                        planned = eager_plan if p is None else _planned_rows(spec, p, i, shape, ctx, kv_dtype,
                                                                             m.page_tokens)
                        held = _held(u)
                        print(json.dumps(dict(kv=kv_dtype, case=case, graphs=graphs, watch=watch, device=u["name"],
                                              held=held, planned=planned, ratio=round(held / planned, 4),
                                              eager_plan=eager_plan, eager_ratio=round(held / eager_plan, 4))),
                              flush=True)


def growth(path, spec, prompt: int, steps: int, page: int) -> None:
    for kv_dtype in ("fp8", "bf16"):
        pl = single_device(3, "standin:0", gpu_path=True, experts="device")
        m = load(path, dtype="bfloat16", experts="reference", placement=pl, kv_dtype=kv_dtype, cuda_graphs="on",
                 page_tokens=page)
        dev = m.devices["standin:0"]
        g = with_decode_graphs(replace(kv_layout(spec, kv_dtype), page_tokens=m.page_tokens), spec)
        s = m.session()
        s.feed(_prompt(prompt))
        other = dev.used_bytes - sum(dev.bytes_by_class().get(c, 0) for c in ("kv", "graph"))
        for t in range(steps):
            dev._peak_bytes = dev.used_bytes
            s.feed([3 + t])
            n = s.n_tokens
            held, planned = dev.usage().peak_bytes - other, g.bytes_for(n)
            print(json.dumps(dict(kv=kv_dtype, page=page, tokens=n, bucket=m.decode_graphs.static.ctx_tokens,
                                  held=held, planned=planned, ratio=round(held / planned, 4),
                                  moving=g.graph(n).moving)), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["devices", "growth"])
    ap.add_argument("--ctx", type=int, default=127)
    ap.add_argument("--cases", nargs="+", default=["1gpu", "2gpu", "2gpu-hybrid"])
    ap.add_argument("--prompt", type=int, default=250)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--page", type=int, default=PAGE)
    a = ap.parse_args()
    torch.set_num_threads(1)
    path = make_checkpoint(pathlib.Path(tempfile.mkdtemp()), "mixed")
    spec, inv = resolve_model(str(path))
    if a.what == "devices":
        devices(path, spec, inv, a.ctx, a.cases)
    else:
        growth(path, spec, a.prompt, a.steps, a.page)


if __name__ == "__main__":
    main()
