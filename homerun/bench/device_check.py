"""The GPU engine's device check (issue 13), one step per call, each merging its record into a JSON file so a
timeout or crash in a later step keeps what came before. `scripts/device-check.sh` runs the steps on the lent H200;
`--tiny` runs the same code on this machine (CPU tensors, Triton's interpreter, toy shapes) so it stays importable
and tested.

  python -m homerun.bench.device_check STEP --out FILE [--tiny]
  STEP: env | kernels | equivalence | counts | vram | graphs | graphs_hybrid | mixed_spec | capped | offload

Steps (13a): env (GPU, torch, triton); kernels (fp8_linear / fp4_moe_decode / fp4_grouped_gemm GB/s at V4-Flash
shapes against a measured HBM copy, and the host cost of one ATen launch); equivalence (a tiny model on the GPU
path against the fp32 CPU reference);
counts (ATen ops, Triton launches and host syncs per decode token); vram (peak allocated bytes against the plan's
bytes for the device); graphs, graphs_hybrid, mixed_spec (the decode runners: homerun.bench.graph_check); capped
(synthetic V4-Flash layers under a VRAM cap against the plan: homerun.bench.capped_check); offload (issue 13b:
homerun.bench.offload_check). The cost model reads the merged JSON afterwards (homerun.bench.cost_model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from homerun.bench.graph_check import tiny_checkpoint

# V4-Flash shapes: hidden 4096, expert width 2048, top-6; a 64-slot cache per layer for the MoE bench.
FLASH = dict(H=4096, I=2048, E=64, TOPK=6, N=4096, K=4096)
TINY = dict(H=256, I=128, E=8, TOPK=2, N=256, K=512)


def _device(tiny: bool) -> str:
    return "cpu" if tiny else "cuda"


def _time_us(fns: list[Callable[[], Any]], tiny: bool) -> float:
    """Mean microseconds per call, cycling through `fns` (the same kernel over different weights, so that the
    weights a call reads are not in L2 from the call before: H100/H200 hold 50-60 MB there): CUDA-graph captured
    on the GPU (launch overhead out), one plain call when tiny."""
    if tiny:
        t = time.perf_counter()
        fns[0]()
        return (time.perf_counter() - t) * 1e6
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    calls = 2 * len(fns) if len(fns) > 1 else 10
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    g.replay()  # warm: the first replay uploads the graph
    ev[0].record()
    for _ in range(5):
        g.replay()
    ev[1].record()
    torch.cuda.synchronize()
    return ev[0].elapsed_time(ev[1]) * 1e3 / (5 * calls)


def step_env(tiny: bool) -> dict:
    from homerun.kernels import triton as hr_triton

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "triton_available": hr_triton.available(), "triton_reason": hr_triton.unavailable_reason(),
           "interpreting": hr_triton.interpreting()}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, vram_bytes=p.total_memory, sms=p.multi_processor_count,
                   capability=list(torch.cuda.get_device_capability(0)))
    return out


def hbm_copy_gbps(tiny: bool) -> float | None:
    if tiny:
        return None
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dst.copy_(src)
    best = 0.0
    for _ in range(3):  # the best of three: clocks ramp on the first
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        best = max(best, 2 * src.numel() / (s.elapsed_time(e) / 1e3) / 1e9)  # read + write
    del src, dst
    torch.cuda.empty_cache()
    return best


def launch_us(tiny: bool, n: int = 2000) -> float:
    """Host microseconds per eager ATen launch (a 1-element add issued back to back, the GPU never the bound): the
    cost model's fallback when the graphs step is missing."""
    dev = _device(tiny)
    a, b = torch.zeros(1, device=dev), torch.zeros(1, device=dev)
    n = 50 if tiny else n
    for _ in range(10):
        torch.add(a, 1, out=b)
    if not tiny:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        torch.add(a, 1, out=b)
    host = time.perf_counter() - t
    if not tiny:
        torch.cuda.synchronize()
    return host / n * 1e6


def step_kernels(tiny: bool) -> dict:
    """GB/s of the weight bytes each kernel must read, against the HBM copy bandwidth."""
    from homerun.kernels import triton as hr_triton

    mods = hr_triton.load()
    sh, dev = (TINY if tiny else FLASH), _device(tiny)
    hbm = hbm_copy_gbps(tiny)
    rows = []

    def rec(name: str, us: float, nbytes: int, **kw: Any) -> None:
        gbps = nbytes / us / 1e3
        rows.append({"kernel": name, "us": us, "weight_bytes": nbytes, "gbps": gbps,
                     "fraction_of_hbm": gbps / hbm if hbm else None, **kw})

    torch.manual_seed(0)
    n, k = sh["N"], sh["K"]
    copies = 1 if tiny else 16  # 16 x 16.8 MB: well past L2
    ws = [torch.randint(0, 0x7E, (n, k), dtype=torch.uint8, device=dev).view(torch.float8_e4m3fn)
          for _ in range(copies)]
    s = torch.randint(120, 130, (n // 128, k // 128), dtype=torch.uint8, device=dev).view(torch.float8_e8m0fnu)
    for m in ((1, 4) if tiny else (1, 4, 16, 512)):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        fns = [(lambda w=w: mods.fp8.fp8_linear(x, w, s)) for w in ws]
        rec("fp8_linear", _time_us(fns, tiny), n * k + n * k // 16384, M=m, N=n, K=k)
    del ws
    H, I, E, TOPK = sh["H"], sh["I"], sh["E"], sh["TOPK"]
    w13c = torch.randint(-128, 128, (E, 2 * I, H // 2), dtype=torch.int8, device=dev)
    w13s = torch.randint(120, 128, (E, 2 * I, H // 32), dtype=torch.uint8, device=dev)
    w2c = torch.randint(-128, 128, (E, H, I // 2), dtype=torch.int8, device=dev)
    w2s = torch.randint(120, 128, (E, H, I // 32), dtype=torch.uint8, device=dev)
    table = torch.arange(E, dtype=torch.int32, device=dev)
    per_expert = 3 * I * H // 2 + 3 * I * H // 32
    for t in ((1,) if tiny else (1, 4)):
        x = torch.randn(t, H, device=dev, dtype=torch.bfloat16)
        if t == 1:  # disjoint expert sets, call after call (10 x 6 of the 64 slots)
            sets = list(torch.randperm(E, device=dev)[:(E // TOPK) * TOPK].view(-1, 1, TOPK))
        else:
            sets = [torch.stack([torch.randperm(E, device=dev)[:TOPK] for _ in range(t)]) for _ in range(10)]
        wts = torch.rand(t, TOPK, device=dev)
        distinct = sum(len(torch.unique(ids)) for ids in sets) / len(sets)
        fns = [(lambda ids=ids: mods.moe.fp4_moe_decode(x, ids, wts, table, w13c, w13s, w2c, w2s, 10.0))
               for ids in sets]
        us = _time_us(fns, tiny)
        rec("fp4_moe_decode", us, int(distinct * per_expert), T=t, topk=TOPK, distinct=distinct)
    m = 64 if tiny else 4096
    xs = torch.randn(m, H, device=dev, dtype=torch.bfloat16)
    cuts = torch.sort(torch.randint(0, m, (E - 1,), device=dev)).values
    offs = torch.cat([torch.zeros(1, device=dev, dtype=torch.int64), cuts,
                      torch.full((1,), m, device=dev, dtype=torch.int64)]).to(torch.int32)
    us = _time_us([lambda: mods.moe.fp4_grouped_gemm(xs, offs, w13c, w13s, swiglu_limit=10.0)], tiny)
    rec("fp4_grouped_gemm_w13_swiglu", us, E * (2 * I * H // 2), M=m, tflops=2 * m * H * 2 * I / us / 1e6)
    moe1 = next(r for r in rows if r["kernel"] == "fp4_moe_decode")
    return {"hbm_copy_gbps": hbm, "rows": rows, "aten_launch_us": launch_us(tiny),
            "goals": {"fp4_moe_decode >= 0.6 of HBM": (moe1["fraction_of_hbm"] or 0) >= 0.6 if hbm else None}}


def _gpu_placement(n_layers: int, tiny: bool):
    from homerun.engine.placement import single_device

    if tiny:
        return single_device(n_layers, "standin:0", gpu_path=True, experts="device")
    return single_device(n_layers, "cuda:0", experts="device")


def _resident_model(path: Path, dtype: str, tiny: bool):
    from homerun.engine.runtime import load
    from homerun.formats.loader import open_checkpoint
    from homerun.models.deepseek_v4 import ModelArgs

    args = ModelArgs.from_hf_config(open_checkpoint(path).config)
    # experts="device": the runtime's ResidentExpertBackend, the fused FP4 kernels on a GPU-flavored device
    return load(path, dtype=dtype, placement=_gpu_placement(args.n_layers, tiny)), args


def step_equivalence(tiny: bool) -> dict:
    """The GPU path (Triton FP8 linears, fused MoE) against the fp32 CPU reference on a tiny model."""
    from homerun.engine.runtime import load

    path = tiny_checkpoint()
    prompt = torch.randint(0, 512, (16,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = load(path, experts="reference")
    out: dict[str, Any] = {}
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 1e-2)):
        model, _ = _resident_model(path, dtype, tiny)
        a, b = ref.session(), model.session()
        la, lb = a.feed(prompt), b.feed(prompt).float().cpu()
        rels, agree = [], []
        for _ in range(4):
            rels.append(((lb - la).norm() / la.norm()).item())
            agree.append(int(la.argmax()) == int(lb.argmax()))
            tok = int(la.argmax())
            la, lb = a.feed([tok]), b.feed([tok]).float().cpu()
        out[dtype] = {"max_rel": max(rels), "argmax_agree": all(agree), "pass": max(rels) <= tol and all(agree)}
    return out


def step_counts(tiny: bool) -> dict:
    """ATen ops (a launch proxy), Triton launches and host syncs in one decode token's forward, bf16, all experts
    resident (the all-VRAM plan)."""
    from homerun.bench.gpu_path import count_device_work

    model, args = _resident_model(tiny_checkpoint(), "bfloat16", tiny)
    s = model.session()
    prompt = list(range(1, 17))
    s.feed(prompt)
    ids = torch.tensor([int(s.last_logits.argmax())], device=model.device)
    with count_device_work() as cw:
        hidden, _ = model.net.forward(ids, len(prompt), s._states)
        model.net.logits(hidden)
    c = cw.c
    per_layer = (c.ops + c.launches) / args.n_layers
    return {"n_layers": args.n_layers, "aten_ops": c.ops, "triton_launches": c.launches, "host_syncs": c.syncs,
            "sync_names": c.sync_names, "launches_per_layer": per_layer,
            "top_ops": sorted(c.op_names.items(), key=lambda kv: -kv[1])[:12],
            "goals": {"<= 40 launches per layer": per_layer <= 40, "0 host syncs (all-VRAM)": c.syncs == 0}}


def step_vram(tiny: bool) -> dict:
    """An all-VRAM plan of the tiny model on the device: peak accounted and allocated bytes against the plan's."""
    from homerun.engine.placement import placement_from_plan
    from homerun.engine.runtime import load
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import PlanOptions, plan
    from profiles import load_profile

    path = tiny_checkpoint()
    spec, inv = resolve_model(str(path))
    p = plan(spec, inv, load_profile("rtx5090-192gb"), PlanOptions(context_tokens=4096, kv_dtype="bf16"))
    pl = placement_from_plan(p, standin="cuda" if tiny else False)
    if not tiny:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    model = load(path, experts="reference", placement=pl, kv_dtype="bf16", page_tokens=1024)
    s = model.session()
    s.feed(list(range(1, 17)))
    s.feed([3])
    planned = sum(r["bytes"] for r in p.to_dict()["placement"] if r["device"] != "host")
    usage = model.device_usage()[0]
    out = {"planned_bytes": planned, "peak_accounted_bytes": usage["peak_bytes"],
           "accounted_ratio": usage["peak_bytes"] / planned}
    if not tiny:
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated() - base
        out["allocated_ratio"] = out["peak_allocated_bytes"] / planned
    out["goals"] = {"peak <= plan + 5%": usage["peak_bytes"] <= 1.05 * planned}
    return out


def step_graphs(tiny: bool) -> dict:
    from homerun.bench.graph_check import step_graphs as run

    return run(tiny)


def step_graphs_hybrid(tiny: bool) -> dict:
    from homerun.bench.graph_check import step_graphs_hybrid as run

    return run(tiny)


def step_mixed_spec(tiny: bool) -> dict:
    from homerun.bench.graph_check import step_mixed_spec as run

    return run(tiny)


def step_capped(tiny: bool) -> dict:
    from homerun.bench.capped_check import step_capped as run

    return run(tiny)


def step_offload(tiny: bool) -> dict:
    """Issue 13b, the offload side (homerun.bench.offload_check): the host arena's pinning, pinned H2D peak and the
    fraction streaming reaches, the fused decode hit path (launches, syncs, event waits, ms per layer) and streamed
    prefill through the stage, at V4-Flash expert shapes. Not here yet: a real-shaped synthetic model's offloaded
    decode under a VRAM cap against the plan, and whole-model prefill at 2K/8K prompts."""
    from homerun.bench.offload_check import step_offload as run

    return run(tiny)


STEPS: dict[str, Callable[[bool], dict]] = {"env": step_env, "kernels": step_kernels, "equivalence": step_equivalence,
                                            "counts": step_counts, "vram": step_vram, "graphs": step_graphs,
                                            "graphs_hybrid": step_graphs_hybrid, "mixed_spec": step_mixed_spec,
                                            "capped": step_capped,
                                            "offload": step_offload}


def run_step(name: str, out: Path, tiny: bool) -> dict:
    """Run one step and merge {name: record} into the JSON file `out` (created if missing)."""
    t = time.perf_counter()
    try:
        rec = STEPS[name](tiny)
        rec["ok"] = True
    except Exception as exc:  # noqa: BLE001 - a failed step is recorded; the next step still runs
        rec = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    rec["seconds"] = time.perf_counter() - t
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc.setdefault("steps", {})[name] = rec
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    os.replace(tmp, out)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=sorted(STEPS))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="CPU tensors, Triton interpreter, toy shapes")
    a = ap.parse_args(argv)
    if a.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    rec = run_step(a.step, a.out, a.tiny)  # the script shows the record from the file (library code never prints)
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
