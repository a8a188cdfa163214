"""The planner's decode and prefill estimates (`homerun.plan.speed`) on a toy context with round numbers, against
values worked out by hand in the comments: every byte count, bandwidth, efficiency, the miss split (at an endpoint, at
the PCIe/DRAM crossing and at the VRAM/DRAM crossing), tensor parallelism, the disk tier, the handoff and the
all-reduce terms show in an output. Written for the speed survivors in benchmarks/mutation.md; companion of the
per-profile hand computations in tests/test_planner.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from homerun.plan.records import Efficiency, PlanOptions, _Ctx
from homerun.plan.speed import decode_speed, prefill_speed

EXACT = 1e-13  # the references are exact up to float rounding: a 1e-12 change of a constant (1e12 -> 1e12 + 1) shows

# efficiencies away from the defaults and from each other, so a swapped one shows
EFF = Efficiency(vram=0.5, dram=0.8, pcie=0.4, gpu_compute=0.25, per_layer_overhead_s=1e-3, source="test")


def ctx(*, cpu_experts: bool = True, bytes_per_expert: float = 1e8, kv_bytes_per_token: float = 250.0,
        eff: Efficiency = EFF, prompt_tokens: int | None = 8000) -> _Ctx:
    """A toy model: 4 layers, 3 of them MoE, 10 active experts per token (over all layers) of bytes_per_expert
    each, 5e9 active parameters, a KV cache of kv_bytes_per_token; decode depth 4000 tokens, prefill chunks of
    1000 tokens."""
    spec = SimpleNamespace(arch="toy", name="toy", active_experts_per_token=10, num_layers=4, moe_layers=3,
                           n_routed_experts=0, experts_per_tok=0)  # per-layer routing: unused, the chunk is explicit
    inv = SimpleNamespace(bytes_per_expert=bytes_per_expert, active_params_per_token=5e9)
    kv = SimpleNamespace(bytes_for=lambda tokens: kv_bytes_per_token * tokens)
    opts = PlanOptions(decode_depth_tokens=4000, prefill_chunk_tokens=1000, prefill_prompt_tokens=prompt_tokens,
                       cpu_experts=cpu_experts, efficiency=eff)
    return _Ctx(spec, inv, None, opts, kv)


def links(out: dict, key: str = "links") -> list[tuple[str, float, float]]:
    for x in out[key]:  # each link's time is its bytes over its bandwidth
        want = x["bytes_per_token"] / (x["gbps"] * 1e9) if x["bytes_per_token"] else 0.0
        assert x["seconds_per_token"] == pytest.approx(want, rel=EXACT)
    return [(x["name"], x["bytes_per_token"], x["gbps"]) for x in out[key]]


def same_links(got: list[tuple[str, float, float]], want: list[tuple[str, float, float]]) -> bool:
    return [g[0] for g in got] == [w[0] for w in want] and all(
        g[1] == pytest.approx(w[1], rel=EXACT, abs=1e-3) and g[2] == pytest.approx(w[2], rel=EXACT)
        for g, w in zip(got, want))


# ---- decode ----------------------------------------------------------------------------------------------------------
# Common figures: experts 10 x 1e8 = 1e9 B per token; KV read at depth 4000: 250 x 4000 = 1e6 B; resident weights
# 2.999e9 B, so the fixed reads are 3e9 B. Hit rate 0.6: hits 6e8 B, misses m = 4e8 B.


def test_decode_hybrid_split_at_the_pcie_dram_crossing():
    out = decode_speed(ctx(), resident_bytes=2.999e9, hit_rate=0.6, local_gbps=1000, local_name="vram",
                       pcie_gbps=50, dram_gbps=100)
    # bound, per token: vram 3.6e-3 + f*4e-4 s, pcie f*8e-3, dram (1-f)*4e-3. Candidates: f=0 -> 4e-3; f=1 -> 8e-3;
    # pcie=dram at f=50/150=1/3 -> 3.7333e-3 (vram); vram=dram at f=(4e-3-3.6e-3)/(4.4e-3)=1/11 -> 3.63636e-3 = 0.04/11
    assert out["miss_pcie_fraction"] == pytest.approx(1 / 11, rel=EXACT)
    assert out["decode_tok_s_upper_bound"] == pytest.approx(275.0, rel=EXACT)  # 11 / 0.04
    assert same_links(links(out), [("vram", 3.6e9 + 4e8 / 11, 1000), ("dram", 4e8 * 10 / 11, 100),
                                   ("pcie", 4e8 / 11, 50)])
    assert out["bottleneck"] in ("vram", "dram")  # tied at the crossing
    # estimate: vram 1000 x 0.5 = 500 GB/s, pcie 50 x 0.4 = 20, dram 100 x 0.8 = 80. Expert phase: vram
    # 1.2e-3 + f*8e-4, pcie f*2e-2, dram (1-f)*5e-3: pcie=dram at f=20/100=0.2 -> 4e-3 (vram 1.36e-3); the vram=dram
    # crossing f=3.8/5.8 costs 1.31e-2 on pcie; f=0 -> 5e-3.
    assert out["estimate_miss_pcie_fraction"] == pytest.approx(0.2, rel=EXACT)
    assert same_links(links(out, "estimate_links"), [("vram", 3e9 + 6e8 + 0.2 * 4e8, 500), ("dram", 0.8 * 4e8, 80),
                                                     ("pcie", 0.2 * 4e8, 20)])
    # fixed reads 3e9 / 5e11 = 6e-3, phase 4e-3, 4 layers x 1e-3 overhead; no handoff, no all-reduce
    parts = out["estimate_seconds_per_token"]
    assert parts == pytest.approx({"fixed_reads": 6e-3, "expert_phase": 4e-3, "per_layer_overhead": 4e-3,
                                   "handoff": 0.0, "tensor_parallel_comm": 0.0}, rel=EXACT)
    assert out["decode_tok_s"] == pytest.approx(1 / 14e-3, rel=EXACT)
    assert out["bytes_per_token"] == {"resident": 2.999e9, "experts": 1e9, "kv_read": 1e6}
    assert out["decode_depth_tokens"] == 4000 and out["expert_cache_hit_rate"] == 0.6
    assert out["hit_rate_source"] == "" and out["tensor_parallel"] == 1  # the defaults
    assert out["disk_fraction_of_host_reads"] == 0.0 and "disk" not in [x["name"] for x in out["links"]]
    assert out["efficiency"] == EFF.to_dict()
    # the method the plan prints: its start and end, and each join of its pieces (case kept: CPU, PCIe, MoE)
    method = out["method"]
    assert method.startswith("upper bound = 1 / max over links") and method.endswith("tensor-parallel all-reduces")
    for part in ("run concurrently, misses split between CPU compute and PCIe streaming at the best ratio",
                 "bandwidth x efficiency with a token's fixed GPU reads", "overhead, the hybrid handoff per MoE layer"):
        assert part in method, part


def test_decode_hybrid_split_at_the_vram_dram_crossing():
    out = decode_speed(ctx(), resident_bytes=2.999e9, hit_rate=0.6, local_gbps=1000, local_name="vram",
                       pcie_gbps=400, dram_gbps=100)
    # bound: vram 3.6e-3 + f*4e-4, pcie f*1e-3, dram (1-f)*4e-3: f=0 -> 4e-3, f=1 -> 4e-3, f=400/500 -> 3.92e-3,
    # vram=dram at f=1/11 -> 0.04/11 (the fixed reads decide the split)
    assert out["miss_pcie_fraction"] == pytest.approx(1 / 11, rel=EXACT)
    assert out["decode_tok_s_upper_bound"] == pytest.approx(275.0, rel=EXACT)
    # estimate (pcie 160 GB/s): vram 1.2e-3 + f*8e-4 (the hits alone: fixed reads come before the phase), pcie
    # f*2.5e-3, dram (1-f)*5e-3: f=1 -> 2.5e-3, f=2/3 -> 1.7333e-3, vram=dram at f=3.8/5.8=19/29 -> 0.05/29
    assert out["estimate_miss_pcie_fraction"] == pytest.approx(19 / 29, rel=EXACT)
    assert out["estimate_seconds_per_token"]["expert_phase"] == pytest.approx(0.05 / 29, rel=EXACT)
    assert same_links(links(out, "estimate_links"), [("vram", 3.6e9 + 4e8 * 19 / 29, 500),
                                                     ("dram", 4e8 * 10 / 29, 80), ("pcie", 4e8 * 19 / 29, 160)])
    assert out["decode_tok_s"] == pytest.approx(29 / 0.34, rel=EXACT)  # 1 / (6e-3 + 0.05/29 + 4e-3)


def test_decode_tensor_parallel_disk_handoff_and_all_reduce():
    out = decode_speed(ctx(), resident_bytes=2.999e9, hit_rate=0.6, local_gbps=1000, local_name="vram",
                       pcie_gbps=50, dram_gbps=100, disk_fraction=0.25, disk_gbps=4, hit_rate_source="measured",
                       parallel=2, comm_s=5e-4, handoff_s=2e-4, estimate_dram_gbps=50)
    # 2 GPUs each read half the fixed reads (1.5e9) and half the hits (3e8); the misses (4e8) are not split.
    # bound: vram 1.8e-3 + f*4e-4, pcie f*8e-3, dram (1-f)*4e-3: f=1/3 -> 2.6667e-3; vram=dram at f=0.5 -> 4e-3 on
    # pcie. The disk serves 0.25 x 4e8 = 1e8 B at 4 GB/s: 0.025 s, the bottleneck.
    assert out["miss_pcie_fraction"] == pytest.approx(1 / 3, rel=EXACT)
    assert same_links(links(out), [("vram", 1.8e9 + 4e8 / 3, 1000), ("dram", 4e8 * 2 / 3, 100),
                                   ("pcie", 4e8 / 3, 50), ("disk", 1e8, 4)])
    assert out["bottleneck"] == "disk" and out["decode_tok_s_upper_bound"] == pytest.approx(40.0, rel=EXACT)
    # estimate: dram from estimate_dram_gbps, 50 x 0.8 = 40 GB/s; phase: vram 6e-4 + f*8e-4, pcie f*2e-2,
    # dram (1-f)*1e-2: pcie=dram at f=20/60=1/3 -> 6.667e-3; the disk (at its raw 4 GB/s) 0.025 s decides the phase
    assert out["estimate_miss_pcie_fraction"] == pytest.approx(1 / 3, rel=EXACT)
    assert same_links(links(out, "estimate_links"), [("vram", 1.8e9 + 4e8 / 3, 500), ("dram", 4e8 * 2 / 3, 40),
                                                     ("pcie", 4e8 / 3, 20), ("disk", 1e8, 4)])
    # fixed 1.5e9 / 5e11 = 3e-3; handoff 3 MoE layers x 2e-4 = 6e-4; all-reduces 5e-4
    assert out["estimate_seconds_per_token"] == pytest.approx(
        {"fixed_reads": 3e-3, "expert_phase": 0.025, "per_layer_overhead": 4e-3, "handoff": 6e-4,
         "tensor_parallel_comm": 5e-4}, rel=EXACT)
    assert out["decode_tok_s"] == pytest.approx(1 / 0.0331, rel=EXACT)
    assert out["tensor_parallel"] == 2 and out["hit_rate_source"] == "measured"
    assert out["disk_fraction_of_host_reads"] == 0.25


def test_decode_the_disk_slows_the_expert_phase_it_belongs_to():
    # as the hybrid case at the pcie/dram crossing (phase 4e-3), plus a disk serving 0.1 x 4e8 = 4e7 B at 8 GB/s:
    # 5e-3 > 4e-3 in the phase, and 5e-3 > 0.04/11 in the bound
    out = decode_speed(ctx(), resident_bytes=2.999e9, hit_rate=0.6, local_gbps=1000, local_name="vram",
                       pcie_gbps=50, dram_gbps=100, disk_fraction=0.1, disk_gbps=8)
    assert out["estimate_seconds_per_token"]["expert_phase"] == pytest.approx(5e-3, rel=EXACT)
    assert out["decode_tok_s"] == pytest.approx(1 / 15e-3, rel=EXACT)
    assert out["decode_tok_s_upper_bound"] == pytest.approx(200.0, rel=EXACT) and out["bottleneck"] == "disk"


def test_decode_without_cpu_experts_streams_every_miss():
    out = decode_speed(ctx(cpu_experts=False), resident_bytes=2.999e9, hit_rate=0.6, local_gbps=1000,
                       local_name="vram", pcie_gbps=50, dram_gbps=100)
    # f = 1: vram (3.6e9 + 4e8) / 1e12 = 4e-3, pcie 4e8 / 5e10 = 8e-3, dram 0
    assert out["miss_pcie_fraction"] == 1.0 and out["estimate_miss_pcie_fraction"] == 1.0
    assert same_links(links(out), [("vram", 4e9, 1000), ("dram", 0.0, 100), ("pcie", 4e8, 50)])
    assert out["bottleneck"] == "pcie" and out["decode_tok_s_upper_bound"] == pytest.approx(125.0, rel=EXACT)
    # estimate: fixed 6e-3; phase: vram (6e8 + 4e8) / 5e11 = 2e-3, pcie 4e8 / 2e10 = 2e-2; + 4e-3 overhead
    assert out["decode_tok_s"] == pytest.approx(1 / 0.03, rel=EXACT)
    # no PCIe link at all (cpu_experts=False cannot stream): the CPU computes every miss
    out = decode_speed(ctx(cpu_experts=False), resident_bytes=2.999e9, hit_rate=0.6, local_gbps=1000,
                       local_name="unified", pcie_gbps=0.0, dram_gbps=100)
    assert out["miss_pcie_fraction"] == 0.0 and out["estimate_miss_pcie_fraction"] == 0.0
    assert same_links(links(out), [("unified", 3.6e9, 1000), ("dram", 4e8, 100)])
    assert same_links(links(out, "estimate_links"), [("unified", 3.6e9, 500), ("dram", 4e8, 80)])
    # bound: dram 4e-3 > unified 3.6e-3; estimate: 6e-3 + max(1.2e-3, 4e8 / 8e10 = 5e-3) + 4e-3
    assert out["bottleneck"] == "dram" and out["decode_tok_s_upper_bound"] == pytest.approx(250.0, rel=EXACT)
    assert out["decode_tok_s"] == pytest.approx(1 / 0.015, rel=EXACT)


def test_decode_streaming_every_miss_over_a_fast_link_waits_on_vram():
    out = decode_speed(ctx(cpu_experts=False), resident_bytes=2.999e9, hit_rate=0.6, local_gbps=1000,
                       local_name="vram", pcie_gbps=1000, dram_gbps=100)
    # f = 1. bound: vram (3.6e9 + 4e8) / 1e12 = 4e-3, pcie 4e8 / 1e12 = 4e-4
    assert out["bottleneck"] == "vram" and out["decode_tok_s_upper_bound"] == pytest.approx(250.0, rel=EXACT)
    # expert phase: vram (6e8 hits + 4e8 streamed) / 5e11 = 2e-3 over pcie 4e8 / 4e11 = 1e-3
    assert out["estimate_seconds_per_token"]["expert_phase"] == pytest.approx(2e-3, rel=EXACT)
    assert out["decode_tok_s"] == pytest.approx(1 / 0.012, rel=EXACT)  # 6e-3 + 2e-3 + 4e-3


def test_decode_on_a_link_slower_than_one_gbps():
    # cpu_experts=False over a 1 GB/s link (a slow USB4 / TB enclosure, or a very slow bus): every miss still streams
    out = decode_speed(ctx(cpu_experts=False), resident_bytes=2.999e9, hit_rate=0.6, local_gbps=1000,
                       local_name="vram", pcie_gbps=1.0, dram_gbps=100)
    assert out["miss_pcie_fraction"] == 1.0 and out["estimate_miss_pcie_fraction"] == 1.0
    # bound: pcie 4e8 / 1e9 = 0.4 s; estimate: 6e-3 + 4e8 / (1e9 x 0.4) + 4e-3 = 1.01 s
    assert same_links(links(out), [("vram", 4e9, 1000), ("dram", 0.0, 100), ("pcie", 4e8, 1.0)])
    assert same_links(links(out, "estimate_links"), [("vram", 4e9, 500), ("dram", 0.0, 80), ("pcie", 4e8, 0.4)])
    assert out["decode_tok_s_upper_bound"] == pytest.approx(2.5, rel=EXACT)
    assert out["decode_tok_s"] == pytest.approx(1 / 1.01, rel=EXACT)


def test_decode_all_hits_reads_only_the_local_memory_and_pays_no_handoff():
    out = decode_speed(ctx(), resident_bytes=2.999e9, hit_rate=1.0, local_gbps=1000, local_name="unified",
                       pcie_gbps=50, dram_gbps=100, disk_fraction=0.5, disk_gbps=2, handoff_s=1e-2)
    # every expert read is a hit: (3e9 + 1e9) / 1e12 = 4e-3 bound; estimate 6e-3 + 1e9 / 5e11 + 4e-3 = 1.2e-2
    assert out["miss_pcie_fraction"] == 0.0 and out["estimate_miss_pcie_fraction"] == 0.0
    assert same_links(links(out), [("unified", 4e9, 1000)])
    assert same_links(links(out, "estimate_links"), [("unified", 4e9, 500)])
    assert out["bottleneck"] == "unified" and out["decode_tok_s_upper_bound"] == pytest.approx(250.0, rel=EXACT)
    assert out["estimate_seconds_per_token"]["handoff"] == 0.0
    assert out["decode_tok_s"] == pytest.approx(1 / 0.012, rel=EXACT)


def test_decode_with_nothing_to_read_has_no_speed():
    c = ctx(bytes_per_expert=0.0, kv_bytes_per_token=0.0, eff=Efficiency(per_layer_overhead_s=0.0))
    out = decode_speed(c, resident_bytes=0.0, hit_rate=1.0, local_gbps=1000, local_name="vram", pcie_gbps=50,
                       dram_gbps=100)
    assert out["decode_tok_s"] is None and out["decode_tok_s_upper_bound"] is None
    # the smallest time there is: one byte on a fast link
    out = decode_speed(c, resident_bytes=1.0, hit_rate=1.0, local_gbps=1000, local_name="vram", pcie_gbps=50,
                       dram_gbps=100)
    assert out["decode_tok_s_upper_bound"] == pytest.approx(1e12, rel=EXACT)
    assert out["decode_tok_s"] == pytest.approx(1000 * 1e9 * 0.75, rel=EXACT)  # the default vram efficiency


# ---- prefill ---------------------------------------------------------------------------------------------------------
# compute per 1000-token chunk: 2 x 5e9 x 1000 = 1e13 FLOPs at 100 TFLOPS x 0.25 = 0.4 s; weights 4e10 B at
# 1000 GB/s x 0.5 = 0.08 s; streaming 2e11 B per pass at 50 GB/s x 0.4 = 10 s per pass over the prompt.


def test_prefill_streaming_bound_is_charged_per_chunk_of_the_prompt():
    out = prefill_speed(ctx(), tflops=100, weight_bytes_per_chunk=4e10, weight_gbps=1000,
                        stream_bytes_per_pass=2e11, stream_gbps=50, stream_link="pcie")
    # an 8000-token prompt: 10 s x 1000 / 8000 = 1.25 s per chunk -> 800 tok/s
    assert out["prefill_seconds_per_chunk"] == pytest.approx({"compute": 0.4, "weights": 0.08, "pcie": 1.25},
                                                             rel=EXACT)
    assert out["prefill_bottleneck"] == "pcie" and out["prefill_tok_s"] == pytest.approx(800.0, rel=EXACT)
    assert out["prefill_chunk_tokens"] == 1000 and out["prefill_prompt_tokens"] == 8000
    # the reason the plan prints: its start and end, and each join of its pieces (case kept: FLOPs)
    reason = out["prefill_reason"]
    assert reason.startswith("per chunk: 2 x active params") and reason.endswith("is not modeled")
    for part in ("tokens FLOPs at tflops_bf16 x gpu_compute efficiency, against reading resident weights",
                 "non-cached experts once per layer-wise pass over the 8000-token prompt;"):
        assert part in reason, part
    # no prompt size given: the decode depth, 4000 tokens -> 2.5 s per chunk
    out = prefill_speed(ctx(prompt_tokens=None), tflops=100, weight_bytes_per_chunk=4e10, weight_gbps=1000,
                        stream_bytes_per_pass=2e11, stream_gbps=50, stream_link="disk")
    assert out["prefill_prompt_tokens"] == 4000 and out["prefill_bottleneck"] == "disk"
    assert out["prefill_tok_s"] == pytest.approx(400.0, rel=EXACT)
    # a prompt shorter than a chunk is one chunk: the whole pass, 10 s
    out = prefill_speed(ctx(prompt_tokens=500), tflops=100, weight_bytes_per_chunk=4e10, weight_gbps=1000,
                        stream_bytes_per_pass=2e11, stream_gbps=50, stream_link="pcie")
    assert out["prefill_prompt_tokens"] == 1000 and out["prefill_tok_s"] == pytest.approx(100.0, rel=EXACT)


def test_prefill_compute_and_weight_bounds_and_tensor_parallel():
    out = prefill_speed(ctx(), tflops=100, weight_bytes_per_chunk=4e10, weight_gbps=1000,
                        stream_bytes_per_pass=0.0, stream_gbps=50, stream_link="pcie")
    assert out["prefill_seconds_per_chunk"] == pytest.approx({"compute": 0.4, "weights": 0.08, "pcie": 0.0},
                                                             rel=EXACT)
    assert out["prefill_bottleneck"] == "compute" and out["prefill_tok_s"] == pytest.approx(2500.0, rel=EXACT)
    # two GPUs share both the FLOPs and the weight reads
    out = prefill_speed(ctx(), tflops=100, weight_bytes_per_chunk=4e10, weight_gbps=1000,
                        stream_bytes_per_pass=0.0, stream_gbps=50, stream_link="pcie", parallel=2)
    assert out["prefill_seconds_per_chunk"] == pytest.approx({"compute": 0.2, "weights": 0.04, "pcie": 0.0},
                                                             rel=EXACT)
    assert out["prefill_tok_s"] == pytest.approx(5000.0, rel=EXACT)
    # weight-bound: 4e11 B -> 0.8 s
    out = prefill_speed(ctx(), tflops=100, weight_bytes_per_chunk=4e11, weight_gbps=1000,
                        stream_bytes_per_pass=2e11, stream_gbps=0.0, stream_link="pcie")
    assert out["prefill_seconds_per_chunk"]["pcie"] == 0.0  # no streaming link: nothing charged
    assert out["prefill_bottleneck"] == "weights" and out["prefill_tok_s"] == pytest.approx(1250.0, rel=EXACT)


@pytest.mark.parametrize("tflops", [None, 0.0])
def test_prefill_without_a_flops_figure_says_why(tflops):
    out = prefill_speed(ctx(), tflops=tflops, weight_bytes_per_chunk=4e10, weight_gbps=1000,
                        stream_bytes_per_pass=2e11, stream_gbps=50, stream_link="pcie")
    assert out == {"prefill_tok_s": None, "prefill_chunk_tokens": 1000,
                   "prefill_reason": "the profile gives no tflops_bf16 figure, so prefill compute cannot be estimated"}
