"""The expert-cache hit-rate prior under a host link that cannot carry every miss into the cache
(homerun.plan.priors.hit_rate_prior's `admit`, homerun.plan.speed.link_admission).

A miss enters the GPU cache only over the link (streamed, or promoted after the CPU computed it), so on a PCIe 4.0 rig
whose CPU computes most misses the cache cannot follow the recency law that assumes every miss is cached (FreeToken
#174 saw the same on V4-Flash: only the fetched share of misses enters its cache). Checked here by independent
arithmetic from the plan's own figures, not by the planner's helpers."""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import replace

import pytest

from homerun.plan.inventory import resolve_model
from homerun.plan.planner import plan
from homerun.plan.priors import hit_rate_prior
from homerun.plan.records import REUSE_PROB, STACK_ALPHA, STACK_OFFSET_TOKENS
from homerun.plan.validate import load_table, row_inventory, row_options, row_profile
from offload.trace import reuse_trace

ROWS = {r["id"]: r for r in load_table()}
ROME = "freetoken444-v4flash-5090-epyc-rome"


def _law_cdf(depth: float, n: int, k: int) -> float:
    """P(stack depth < depth) under P(d) ~ (d + STACK_OFFSET_TOKENS k)^-STACK_ALPHA, written out again here."""
    w = [(d + STACK_OFFSET_TOKENS * k) ** -STACK_ALPHA for d in range(n)]
    if depth >= n:
        return 1.0
    whole = int(depth)
    return (sum(w[:whole]) + (depth - whole) * w[whole]) / sum(w)


def _hand_hit(spec, cache: int, a: float) -> float:
    """Fixed point of h = [hashed x frac + routed x (R q cdf(S/q) + (1 - R) frac)] / layers, q = h + (1 - h) a."""
    layers, n, k = spec.moe_layers, spec.n_routed_experts, spec.experts_per_tok
    frac = cache / (layers * n)
    hashed = int(spec.config.get("num_hash_layers", 0) or 0)
    h = 0.5
    for _ in range(500):  # plain iteration: a contraction here (the slope in h is well under 1)
        q = h + (1 - h) * a
        routed = REUSE_PROB * q * _law_cdf(frac * n / q, n, k) + (1 - REUSE_PROB) * frac
        h = (hashed * frac + (layers - hashed) * routed) / layers
    return h


def _cache_experts(p) -> int:
    return next(int(d["choice"].split()[0]) for d in p.to_dict()["decisions"] if d["what"] == "expert cache")


def _rome_plan(**kw):
    r = ROWS[ROME]
    spec, inv = resolve_model(r["homerun_model"])
    return spec, inv, plan(spec, row_inventory(r, inv), row_profile(r), replace(row_options(r), **kw))


def test_admission_limits_of_the_prior():
    flash, _ = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    cache = 847
    full = hit_rate_prior(flash, cache)[0]
    assert hit_rate_prior(flash, cache, admit=lambda h: 1.0)[0] == full  # every miss admitted: the law as calibrated
    # nothing admitted: a static cache, hit at its share of the experts
    assert hit_rate_prior(flash, cache, admit=lambda h: 0.0)[0] == pytest.approx(cache / flash.routed_experts_total,
                                                                                abs=1e-6)
    by_a = [hit_rate_prior(flash, cache, admit=lambda h, a=a: a)[0] for a in (0.1, 0.3, 0.6, 0.9)]
    assert by_a == sorted(by_a) and by_a[-1] < full
    for a, h in zip((0.1, 0.3, 0.6, 0.9), by_a):
        assert h == pytest.approx(_hand_hit(flash, cache, a), abs=1e-6)
    h, src = hit_rate_prior(flash, cache, admit=lambda h: 0.3)
    assert "admits only 30%" in src


def test_rome_plan_hit_rate_is_what_its_link_can_admit():
    """EPYC Rome + RTX 5090 on PCIe 4.0 (26.1 GB/s gather): the plan's hit rate is the fixed point of the prior with
    the share of misses its own link carries per token at its own estimated speed."""
    spec, inv, p = _rome_plan()
    pred = p.predicted
    h = pred["expert_cache_hit_rate"]
    cache = _cache_experts(p)
    expert_bytes = spec.active_experts_per_token * inv.bytes_per_expert
    link_bytes = ROWS[ROME]["profile"]["gpus"][0]["h2d_gbps"] * 1e9 * pred["efficiency"]["pcie"] / pred["decode_tok_s"]
    a = link_bytes / ((1 - h) * expert_bytes)
    assert 0.2 < a < 0.5  # the link carries about a third of the misses at ~31 tok/s
    assert h == pytest.approx(_hand_hit(spec, cache, a), abs=2e-3)
    assert h < hit_rate_prior(spec, cache)[0] - 0.1  # 0.36 against 0.50 with every miss admitted
    assert "admits only" in pred["hit_rate_source"]


def test_streaming_runtime_admits_every_miss():
    """A runtime that streams every miss (cpu_experts=False) puts each one into the cache: the full prior."""
    spec, inv, p = _rome_plan(cpu_experts=False)
    assert p.predicted["expert_cache_hit_rate"] == hit_rate_prior(spec, _cache_experts(p))[0]
    assert "admits only" not in p.predicted["hit_rate_source"]


def test_measured_or_requested_hit_rate_is_not_adjusted():
    _, _, p = _rome_plan(hit_rate=0.42)
    assert p.predicted["expert_cache_hit_rate"] == 0.42


def _lru_with_admission(trace, slots: int, admit: float, warm_tokens: int, seed: int = 0) -> float:
    """Per-layer LRU of `slots` experts that takes a miss in with probability `admit` (a hit is always refreshed):
    the hit rate after `warm_tokens` tokens."""
    rng = random.Random(seed)
    caches: dict[int, OrderedDict] = {}
    hits = accesses = 0
    for r in trace.records:
        c = caches.setdefault(r.layer, OrderedDict())
        resident = [e for e in r.experts if e in c]
        if r.token >= warm_tokens:
            hits, accesses = hits + len(resident), accesses + len(r.experts)
        for e in resident:
            c.move_to_end(e)
        for e in r.experts:
            if e not in c and rng.random() < admit:
                c[e] = True
                if len(c) > slots:  # evict the least recent key that this token does not use
                    del c[next(k for k in c if k not in r.experts)]
    return hits / accesses


def test_admission_model_matches_a_simulated_cache():
    """The prior's admission model against a simulated per-layer LRU that admits each miss with probability a, on the
    routing model's own trace (offload/trace.py reuse_trace) at V4-Flash's shape (256 experts, top-6, no hash layers):
    within 0.03 everywhere (measured: 0.01-0.02; the trace's fresh draws have a mild popularity skew the prior
    ignores), and the fall from a = 1 matches within 0.02."""
    flash, _ = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    spec = replace(flash, config={**flash.config, "num_hash_layers": 0})
    trace = reuse_trace(4000, 2, spec.n_routed_experts, spec.experts_per_tok, seed=1)
    for slots in (10, 20, 40):
        sim_full = _lru_with_admission(trace, slots, 1.0, 500)
        prior_full = hit_rate_prior(spec, slots * spec.moe_layers)[0]
        for a in (0.6, 0.35, 0.2):
            sim = _lru_with_admission(trace, slots, a, 500)
            prior = hit_rate_prior(spec, slots * spec.moe_layers, admit=lambda h, a=a: a)[0]
            assert prior == pytest.approx(sim, abs=0.03), (slots, a)
            assert prior_full - prior == pytest.approx(sim_full - sim, abs=0.02), (slots, a)
