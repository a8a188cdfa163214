"""The device check's decode-runner steps (issue 13): the tiny model's decode under each graph layout, with launches,
replays, host syncs and event waits per token. CUDA on the device; `tiny` runs the same code on a CPU stand-in
(Triton's interpreter, emulated graphs) so it stays importable and tested. Each step returns one JSON record;
`homerun.bench.device_check` runs them. Library code: no printing.

- graphs: all-VRAM decode three ways (whole-step graph, piecewise segments, eager), logits bit-equal to eager;
- graphs_hybrid: experts behind an 8-slot device cache, misses on the CPU, routed calls eager between segments;
- mixed_spec: a mixed plan (layer 1 resident, 0 and 2 cached, every expert warm): event waits per token with
  speculation (LayerSplitBackend: one wait covers every part) against without, graphed.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

PROMPT = list(range(1, 17))


def tiny_checkpoint(kind: str = "mixed") -> Path:
    """A tiny preset (`formats.checkpoint.tiny_config`) written into a fresh temporary folder: the model every
    device-check step runs on (this module's and `homerun.bench.device_check`'s)."""
    from homerun.formats.checkpoint import tiny_config, write_checkpoint

    out = Path(tempfile.mkdtemp(prefix="hr-devcheck-")) / kind
    write_checkpoint(out, tiny_config(kind))
    return out


def _checkpoint(kind: str = "mixed") -> tuple[Path, Any]:
    """`tiny_checkpoint` and its model arguments."""
    from homerun.formats.loader import open_checkpoint
    from homerun.models.deepseek_v4 import ModelArgs

    out = tiny_checkpoint(kind)
    return out, ModelArgs.from_hf_config(open_checkpoint(out).config)


def hybrid_placement(n_layers: int, n_experts: int, *, resident: int | None = None, device: str = "standin:0",
                     gpu_path: bool = True, slots: int | None = None):
    """Every layer's experts behind one cache big enough for all of them (or `slots`), layer `resident`'s experts
    resident instead when given: the hybrid and mixed plans the counting checks and tests run."""
    from homerun.engine.placement import single_device

    n_cached = n_layers - (resident is not None)
    pl = single_device(n_layers, device, gpu_path=gpu_path, experts="host",
                       expert_cache_slots=slots or n_cached * n_experts)
    if resident is None:
        return pl
    return dataclasses.replace(pl, layers=tuple(
        dataclasses.replace(lp, experts="device", reason="resident by hand") if lp.layer == resident else lp
        for lp in pl.layers))


def warm_every_expert(cached, n_layers: int, n_experts: int, resident: int | None = None) -> None:
    """Load every cached layer's experts into `cached`'s cache, so every decode call hits."""
    for layer in (l for l in range(n_layers) if l != resident):
        for e in range(n_experts):
            cached.cache.prefetch((layer, e), block=True)
    cached.cache.commit()


def _sync(tiny: bool) -> Callable[[], None]:
    return (lambda: None) if tiny else torch.cuda.synchronize


def _decode(model, toks: list[int], tiny: bool, count_at: int, probe: Callable[[], Any] = lambda: None
            ) -> dict[str, Any]:
    """Feed PROMPT then `toks` one at a time: per-step logits and wall seconds, the device work of step `count_at`
    (after the capture steps; session.feed included): launches (ATen ops + Triton launches + graph replays), syncs,
    replays; then that of one more step's forward alone (model._forward + logits: what the graphs serve). `probe()`
    is read after the prompt ("before") and after the last step ("after")."""
    from homerun.kernels.counting import count_device_work

    sync = _sync(tiny)
    s = model.session()
    s.feed(PROMPT)
    before = probe()
    logits, secs, counted = [], [], None
    for i, tok in enumerate(toks):
        sync()
        t = time.perf_counter()
        if i == count_at:
            with count_device_work() as cw:
                out = s.feed([tok])
            counted = cw.c.to_dict()
        else:
            out = s.feed([tok])
        sync()
        secs.append(time.perf_counter() - t)
        logits.append(out.float().cpu())
    after = probe()
    ids = torch.tensor([int(logits[-1].argmax())])  # read before counting: a host read of the CPU copy
    with torch.inference_mode(), count_device_work() as cw:
        hidden = model._forward(ids, s.n_tokens, s._states)[0]
        model.net.logits(hidden)
    return {"logits": logits, "secs": secs, "counted": counted, "forward": cw.c.to_dict(), "before": before,
            "after": after}


def _tokens(n: int) -> list[int]:
    return [int(t) for t in torch.randint(1, 500, (n,), generator=torch.Generator().manual_seed(7))]


def step_graphs(tiny: bool) -> dict:
    """All-VRAM decode of the tiny model: whole-step graph (one replay a step), piecewise segments (n_layers + 1
    replays, attention cores eager) and eager, fed the same tokens. Per mode: median step ms (the capture steps
    left out), tok/s, launches / syncs / replays per token; graphed logits bit-equal to eager's."""
    from homerun.engine.placement import single_device
    from homerun.engine.runtime import load

    path, args = _checkpoint()
    n = 4 if tiny else 40
    toks = _tokens(n)
    pl = single_device(args.n_layers, "standin:0" if tiny else "cuda:0", gpu_path=tiny, experts="device")
    modes: dict[str, dict] = {}
    ref = None
    for mode in ("eager", "piecewise", "whole"):
        model = load(path, dtype="bfloat16", placement=pl, cuda_graphs="off" if mode == "eager" else "on")
        dg = model.decode_graphs
        if dg is not None:
            dg.whole_step = mode == "whole"
        r0 = dg.replays if dg is not None else 0
        run = _decode(model, toks, tiny, count_at=min(2, n - 1))
        ms = statistics.median(run["secs"][2:] or run["secs"]) * 1e3
        c = run["counted"] or {}
        rec = {"runner": model.decode_graphs_reason, "step_ms": ms, "tok_s": 1e3 / ms,
               "launches_per_token": c.get("device_launches"), "graph_replays_per_token": c.get("graphs"),
               "host_syncs_per_token": c.get("syncs"), "sync_names": c.get("sync_names"),
               "forward_host_syncs": run["forward"]["syncs"], "forward_launches": run["forward"]["device_launches"],
               "replayed_steps": (dg.replays - r0) if dg is not None else 0,
               "whole_step_captures": getattr(dg, "step_captures", None)}
        if ref is None:
            ref = run["logits"]
        else:
            rec["bit_equal_to_eager"] = all(torch.equal(a, b) for a, b in zip(ref, run["logits"]))
        modes[mode] = rec
    whole, piece, eager = modes["whole"], modes["piecewise"], modes["eager"]
    whole_ok = whole["whole_step_captures"] is not None and whole["whole_step_captures"] >= 1 and \
        whole["graph_replays_per_token"] == 1
    return {"n_layers": args.n_layers, "steps": n, "modes": modes,
            "speedup_whole_vs_eager": eager["step_ms"] / whole["step_ms"],
            "speedup_piecewise_vs_eager": eager["step_ms"] / piece["step_ms"],
            "goals": {"graphed decode bit-equal to eager": bool(whole.get("bit_equal_to_eager")
                                                                 and piece.get("bit_equal_to_eager")),
                      "all-VRAM decode under one CUDA graph a step": (not tiny and whole_ok) or None,
                      "0 host syncs in the all-VRAM forward (whole step)": whole["forward_host_syncs"] == 0}}


def step_graphs_hybrid(tiny: bool) -> dict:
    """The tiny model's routed experts in the host store behind an 8-slot device cache (misses on the CPU), decoded
    from graphs with the routed calls eager between the segments against an eager twin: per step bit-equal logits
    and the same cache traffic (both pin the miss split and never speculate, so timings decide nothing); step ms
    both ways, and launches, replays and event waits per token."""
    from homerun.engine.placement import single_device
    from homerun.engine.runtime import load

    path, args = _checkpoint()
    toks = [7, 7, 7, 300, 7, 7, 41] * (1 if tiny else 4)
    runs = {}
    for graphs in ("on", "off"):
        pl = single_device(args.n_layers, "standin:0" if tiny else "cuda:0", gpu_path=tiny, experts="host",
                           expert_cache_slots=8)
        model = load(path, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs=graphs)
        be = model.net.experts
        be.miss_policy.mode, be.fused.policy.mode, be.cache.engine.max_in_flight = "cpu", "never", 1 << 10
        run = _decode(model, toks, tiny, count_at=len(toks) - 1, probe=lambda: be.fused.stats()["event_waits"])
        c = be.stats().to_dict()["cache"]
        runs[graphs] = (model, run, (c["hits"], c["misses"], c["n_copies"]), (run["after"] - run["before"]) / len(toks))
    model, on, traffic_on, waits_on = runs["on"]
    _, off, traffic_off, waits_off = runs["off"]
    equal = all(torch.equal(a, b) for a, b in zip(on["logits"], off["logits"]))
    e, g = statistics.median(off["secs"][1:]), statistics.median(on["secs"][1:])
    dg, c = model.decode_graphs, on["counted"] or {}
    return {"graphs": model.decode_graphs_reason, "steps": len(toks), "bit_equal": equal,
            "same_cache_traffic": traffic_on == traffic_off, "misses": traffic_on[1], "eager_step_ms": e * 1e3,
            "graphed_step_ms": g * 1e3, "speedup": e / g, "n_layers": args.n_layers,
            "launches_per_token": c.get("device_launches"), "graph_replays_per_token": c.get("graphs"),
            "host_syncs_per_token": c.get("syncs"), "eager_launches_per_token": (off["counted"] or {}).get(
                "device_launches"), "event_waits_per_token": waits_on, "eager_event_waits_per_token": waits_off,
            "goals": {"hybrid graphed decode bit-equal to eager, same cache traffic":
                      equal and traffic_on == traffic_off,
                      "hybrid decode under CUDA graphs, experts eager": (not tiny and dg is not None and dg.split
                                                                        and dg.replays > 1) or None}}


def step_mixed_spec(tiny: bool) -> dict:
    """A mixed plan (layer 1's experts resident, layers 0 and 2 behind a cache holding all of theirs, every expert
    warm, so every call hits), graphed: event waits, syncs, launches and ms per token with speculation ("auto") and
    without ("never"); README: an all-hit token waits once with speculation, n_layers times without."""
    from homerun.engine.runtime import load

    path, args = _checkpoint()
    L, E, resident = args.n_layers, args.n_routed_experts, 1
    toks = [7, 7, 300, 7, 41] * (1 if tiny else 4)
    out: dict[str, Any] = {"n_layers": L, "resident_layers": [resident]}
    for speculate in ("auto", "never"):
        pl = hybrid_placement(L, E, resident=resident, device="standin:0" if tiny else "cuda:0", gpu_path=tiny)
        model = load(path, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs="on")
        be = model.net.experts
        cached = be.backends_by_layer[0]
        cached.miss_policy.mode, cached.fused.policy.mode = "cpu", speculate
        warm_every_expert(cached, L, E, resident)
        run = _decode(model, toks, tiny, count_at=len(toks) - 1,
                      probe=lambda: (cached.fused.stats(), cached.cache.stats().to_dict()["misses"]))
        (d0, m0), (d1, m1) = run["before"], run["after"]
        c = run["counted"] or {}
        out[speculate] = {"backend": type(be).__name__, "runner": model.decode_graphs_reason,
                          "event_waits_per_token": (d1["event_waits"] - d0["event_waits"]) / len(toks),
                          "speculative_tokens": d1["speculative_tokens"] - d0["speculative_tokens"],
                          "misses": m1 - m0,
                          "launches_per_token": c.get("device_launches"), "host_syncs_per_token": c.get("syncs"),
                          "graph_replays_per_token": c.get("graphs"),
                          "step_ms": statistics.median(run["secs"][1:]) * 1e3, "logits": run["logits"]}
    a, b = out["auto"].pop("logits"), out["never"].pop("logits")
    out["bit_equal_auto_vs_never"] = all(torch.equal(x, y) for x, y in zip(a, b))
    out["goals"] = {"an all-hit mixed token waits once with speculation":
                    out["auto"]["misses"] == 0 and out["auto"]["event_waits_per_token"] <= 1.0,
                    "speculated tokens equal the exact path": out["bit_equal_auto_vs_never"]}
    return out
