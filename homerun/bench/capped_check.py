"""The device check's capped hybrid step (issue 13 item 9): a synthetic V4-Flash with the card's real per-layer
shapes (homerun.bench.synthetic), N layers, planned for this machine with its VRAM capped to what a 32 GB card
(`rtx5090-192gb`) has per layer, run with the plan's own placement (hybrid: experts in the host store behind the
plan's GPU cache), and measured against that plan: decode tok/s, prefill tok/s at 2K and 8K prompts, peak VRAM.
`tiny` runs it on a CPU stand-in at toy shapes (the rtx5090-192gb profile standing in for this machine).
Library code: no printing.

The cap (`capped_plan`): V4-Flash planned on the 32 GB card caches a share of its routed experts' bytes in VRAM
(`cache_share`: 327 of 11,008 experts, 3.0%); this machine's VRAM is cut (bisection over the planner, pure) to the
least at which the N-layer model's plan caches at least that share, with this machine's own margins, non-expert
bytes, KV and prefill staging charged as the planner charges them.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import torch

TARGET = "rtx5090-192gb"
CARD = "deepseek-ai/DeepSeek-V4-Flash"
TINY_SHAPES = {"vocab_size": 512, "hidden_size": 256, "num_attention_heads": 4, "head_dim": 128, "q_lora_rank": 128,
               "o_lora_rank": 128, "o_groups": 2, "moe_intermediate_size": 128, "index_n_heads": 16,
               "index_head_dim": 128, "n_routed_experts": 8, "num_experts_per_tok": 2, "index_topk": 16}


def cache_share(plan: dict) -> float:
    """The share of the routed experts' bytes a plan keeps in its GPU expert cache (0 when all-VRAM or none)."""
    cache = sum(r["bytes"] for r in plan["placement"] if r["what"].startswith("GPU expert cache"))
    routed = sum(r["bytes"] for r in plan["placement"] if r["what"].startswith("routed experts") and
                 r["device"] == "host")
    return cache / routed if routed else 0.0


def capped_plan(plan_fn, profile, share: float, iters: int = 40) -> tuple[Any, float]:
    """(plan, vram GiB): the smallest VRAM (bisection over `profile`'s first GPU) at which `plan_fn(profile)` fits
    as hybrid with at least `share` of the routed experts cached, the other plan inputs unchanged; where an
    all-VRAM plan comes first, the largest VRAM that still plans hybrid."""
    from homerun.errors import DoesNotFitError

    def at(gib: float):
        gpu = dataclasses.replace(profile.gpu_list[0], vram_gib=gib)
        try:
            return plan_fn(dataclasses.replace(profile, gpus=(gpu,) + tuple(profile.gpu_list[1:])))
        except DoesNotFitError:
            return None

    lo, hi = 0.5, float(profile.gpu_list[0].vram_gib)
    best = at(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        p = at(mid)
        if p is not None and p.fits and (p.mode == "all-vram" or cache_share(p.to_dict()) >= share):
            hi, best = mid, p
        else:
            lo = mid
    if best is not None and best.mode == "all-vram":  # no hybrid caches that share (toy shapes: whole experts,
        lo, top = 0.5, hi                              # staging): the hybrid that caches the most, just below
        for _ in range(iters):
            mid = (lo + top) / 2
            p = at(mid)
            if p is not None and p.fits and p.mode != "all-vram":
                lo, best, hi = mid, p, mid
            elif p is not None and p.fits:
                top = mid
            else:
                lo = mid
    return best, hi


def _host_profile(tiny: bool):
    from homerun.plan.hardware import detect
    from profiles import load_profile

    if tiny:  # no GPU here: the target profile stands in for "this machine"
        return load_profile(TARGET), f"{TARGET} (stand-in for this machine)"
    prof, _ = detect(measure=True)
    return prof, "detected (homerun.plan.hardware.detect)"


def _timed_feed(model, tokens: list[int], sync) -> float:
    s = model.session()
    sync()
    t = time.perf_counter()
    s.feed(tokens)
    sync()
    return time.perf_counter() - t


def step_capped(tiny: bool) -> dict:
    from homerun.bench.synthetic import build_synthetic
    from homerun.engine.placement import placement_from_plan
    from homerun.engine.runtime import load
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import PlanOptions, plan
    from profiles import load_profile

    n_layers = int(os.environ.get("HR_CAPPED_LAYERS", "2"))
    overrides = dict(TINY_SHAPES) if tiny else {}
    if os.environ.get("HR_CAPPED_EXPERTS"):  # fewer experts per layer, when writing 256 real-shaped ones is too slow
        overrides["n_routed_experts"] = int(os.environ["HR_CAPPED_EXPERTS"])
    prompts = (64, 128) if tiny else (2048, 8192)
    gen = 4 if tiny else 16
    target_plan = plan(*resolve_model(CARD), load_profile(TARGET), PlanOptions())
    share = cache_share(target_plan.to_dict())
    t0 = time.perf_counter()
    syn = build_synthetic(CARD, n_layers=n_layers, root=tempfile.mkdtemp(prefix="hr-capped-"),
                          overrides=overrides or None)
    out: dict[str, Any] = {"synthetic": {"n_layers": syn.n_layers, "card_layers": syn.card_layers,
                                         "overrides": overrides,
                                         "layer_bytes": syn.layer_bytes, "fixed_bytes": syn.fixed_bytes,
                                         "write_s": time.perf_counter() - t0},
                           "cache_share_of_target": share}
    prof, source = _host_profile(tiny)
    spec, inv = resolve_model(str(syn.path))
    # room for every session below at once (a warm-up, two prefills, the decode), whatever frees its pages when
    opts = PlanOptions(context_tokens=max(4096, 4 * prompts[-1]), kv_dtype="bf16")
    p, cap_gib = capped_plan(lambda pr: plan(spec, inv, pr, opts), prof, share)
    capped_profile = dataclasses.replace(prof, gpus=(dataclasses.replace(prof.gpu_list[0], vram_gib=cap_gib),)
                                         + tuple(prof.gpu_list[1:]))
    d = p.to_dict()
    planned_dev = sum(r["bytes"] for r in d["placement"] if r["device"] != "host")
    out["plan"] = {"profile": source, "vram_cap_gib": cap_gib, "mode": d["mode"], "fits": d["fits"],
                   "cache_share": cache_share(d),
                   "decode_tok_s": d["predicted"]["decode_tok_s"], "prefill_tok_s": d["predicted"]["prefill_tok_s"],
                   "prefill_prompt_tokens": d["predicted"].get("prefill_prompt_tokens"),
                   "hit_rate": d["predicted"]["expert_cache_hit_rate"], "planned_device_bytes": planned_dev}
    pl = placement_from_plan(p, standin="cuda" if tiny else False)
    sync = (lambda: None) if tiny else torch.cuda.synchronize
    if not tiny:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    model = load(syn.path, dtype="bfloat16", placement=pl, kv_dtype="bf16", page_tokens=1024)
    g = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    _timed_feed(model, torch.randint(1, vocab, (prompts[0],), generator=g).tolist(), sync)  # warm-up: compiles
    prefill = {}
    for n in prompts:
        toks = torch.randint(1, vocab, (n,), generator=g).tolist()
        secs = _timed_feed(model, toks, sync)
        prefill[str(n)] = {"tokens": n, "s": secs, "tok_s": n / secs}
    s = model.session()
    s.feed(torch.randint(1, vocab, (prompts[0],), generator=g).tolist())
    steps = []
    tok = int(s.last_logits.argmax())
    for _ in range(gen):
        sync()
        t = time.perf_counter()
        tok = int(s.feed([tok]).argmax())
        steps.append(time.perf_counter() - t)
    steps = sorted(steps[1:]) or steps  # the first step captures the graphs
    decode_tok_s = 1.0 / steps[len(steps) // 2]
    stats = model.net.experts.stats().to_dict() if hasattr(model.net.experts, "stats") else {}
    out["measured"] = {"decode_tok_s": decode_tok_s, "decode_tokens": gen, "prefill": prefill,
                       "runner": model.decode_graphs_reason, "experts": {k: stats.get(k) for k in ("cache", "gpu")}}
    for n, r in prefill.items():  # the plan's prefill estimate for that prompt, same capped machine and placement
        pp = plan(spec, inv, capped_profile, dataclasses.replace(opts, prefill_prompt_tokens=int(n)))
        r["plan_tok_s"] = pp.to_dict()["predicted"]["prefill_tok_s"]
    out["ratios"] = {"decode_to_plan": decode_tok_s / out["plan"]["decode_tok_s"],
                     **{f"prefill_{n}_to_plan": r["tok_s"] / r["plan_tok_s"] for n, r in prefill.items()
                        if r.get("plan_tok_s")}}
    if not tiny:
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated() - base
        out["peak_to_plan"] = out["peak_allocated_bytes"] / planned_dev
    out["goals"] = {"offloaded decode >= 0.6 of the plan (capped)": out["ratios"]["decode_to_plan"] >= 0.6
                    if not tiny else None,
                    "peak VRAM <= plan + 5% (capped)": out["peak_to_plan"] <= 1.05 if not tiny else None}
    return out
