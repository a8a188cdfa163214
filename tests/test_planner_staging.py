"""The layer-wise prefill's staging reserve (issue 13 items 5/6): the planner charges 2 x min(512 MiB, one layer's
experts, 1/4 of the VRAM budget) to each hybrid GPU, in whole experts, out of the expert cache; the runtime sizes its
stages by the same rule."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the runtime test builds the GPU path on a CUDA stand-in

import pytest  # noqa: E402

from homerun.plan.inventory import resolve_model  # noqa: E402
from homerun.plan.planner import PlanOptions, plan  # noqa: E402
from homerun.plan.speed import activation_bytes  # noqa: E402
from homerun.plan.staging import STAGE_MAX_BYTES, prefill_stage_experts, prefill_staging_bytes  # noqa: E402
from profiles import GIB, load_profile  # noqa: E402

MIB = 1 << 20
FLASH_BPE = 13_369_344  # V4-Flash: one FP4 routed expert (deepseek-v4-flash card)


def test_rule_each_bound_binds_in_turn():
    # 512 MiB binds: 536,870,912 // 13,369,344 = 40 (40.16) experts per buffer
    assert STAGE_MAX_BYTES == 536_870_912
    assert prefill_stage_experts(FLASH_BPE, 256, int(26.8 * GIB)) == 40
    assert prefill_staging_bytes(FLASH_BPE, 256, int(26.8 * GIB)) == 2 * 40 * 13_369_344 == 1_069_547_520
    # one layer's experts bind: 64 x 1 MiB = 64 MiB < 512 MiB and < 32 GiB / 4
    assert prefill_stage_experts(MIB, 64, 32 * GIB) == 64
    # a quarter of the budget binds: 1 GiB / 4 = 256 MiB -> 256 // 12.75 MiB = 20 (20.08) experts
    assert prefill_stage_experts(FLASH_BPE, 256, GIB) == 20
    # an expert larger than 512 MiB: one slot when a quarter of the budget holds it, none otherwise
    assert prefill_stage_experts(600 * MIB, 8, 4 * GIB) == 1
    assert prefill_stage_experts(600 * MIB, 8, 2 * GIB) == 0
    assert prefill_staging_bytes(600 * MIB, 8, 2 * GIB) == 0
    assert prefill_stage_experts(FLASH_BPE, 256, 0) == 0


def test_flash_on_rtx5090_charges_two_40_expert_stages_and_shrinks_the_cache():
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    prof = load_profile("rtx5090-192gb")
    p = plan(spec, inv, prof, PlanOptions())
    assert p.mode == "hybrid" and inv.bytes_per_expert == FLASH_BPE
    rows = {r.what: r for r in p.placement}
    stage = rows["prefill staging (2 x 40 experts)"]
    assert stage.device == "gpu0" and stage.bytes == 1_069_547_520 and "512 MiB" in stage.reason
    # by hand: usable = 32 GiB - 3 GiB reserve - 1 GiB runtime - activations; the cache gets what the non-expert
    # set, 1M tokens of KV and the decode graphs' static state (one GPU), the two stages and the int32 tables (slot
    # table 43 x 256, two stage tables of 256) leave, in whole experts
    usable = 32 * GIB - 3 * GIB - 1 * GIB - activation_bytes(spec, 2048)
    assert usable == 28_772_408_320 and inv.non_expert_bytes == 8_845_959_388
    # bf16 KV: 21 CSA x (entry 1,024 + key 256) / 4 + 20 HCA x 1,024 / 128 = 6,880 B a token (whole pages at 1M);
    # the small state (windows, open windows) is the static state's arena and snapshots under decode graphs: below
    kv = 6_880 * 1_048_576
    assert kv == 7_214_202_880 == next(r.bytes for r in p.placement if r.what.startswith("KV cache"))
    # the static state beside the KV its buffers hold (homerun/models/decode_bytes.py; the 1M bucket equals the
    # context): the dump rows 21 x 1,280 + 20 x 1,024; one CSA store moving into its buffer, 262,144 rows in whole
    # 1,024-row pages (the runtime's 4,096-token pages) and the last buffer's dump row, x 1,024 B; the small state
    # (11,631,616 B: tests/test_decode_graph_bytes.py FLASH_ARENA) and its two copies; row numbers
    # (262,144 + 8,192) x 8; the step's largest transient, the indexer's scores, 262,144 x 9
    graph = 21 * 1_280 + 20 * 1_024 + 262_145 * 1_024 + 3 * 11_631_616 + (262_144 + 8_192) * 8 + 262_144 * 9
    assert graph == 307_900_672 == next(r.bytes for r in p.placement if r.what.startswith("decode graphs'"))
    kv += graph
    tables = 4 * 43 * 256 + 2 * 4 * 256
    assert tables == 46_080
    assert rows["expert slot table (43 x 256 int32)"].bytes == 44_032
    assert rows["prefill staging tables (2 x 256 int32)"].bytes == 2_048
    # (28,772,408,320 - 8,845,959,388 - 7,522,103,552 - 1,069,547,520 - 46,080) / 13,369,344 = 847.8
    cache_experts = int((usable - inv.non_expert_bytes - kv - 1_069_547_520 - tables) // FLASH_BPE)
    assert cache_experts == 847  # 927 before the reserve: 80 experts (2 x 40) went to the stages
    assert int((usable - inv.non_expert_bytes - kv) // FLASH_BPE) == 927
    assert rows["GPU expert cache (847 experts)"].bytes == 847 * FLASH_BPE
    assert p.layout.stages[0].expert_cache_slots == 847
    gpu = p.devices[0]
    assert gpu.used_bytes == int(inv.non_expert_bytes + kv + 1_069_547_520 + tables + 847 * FLASH_BPE
                                 + sum(gpu.margins.values()))
    assert gpu.used_bytes <= gpu.capacity_bytes
    assert any(d["what"] == "prefill staging" for d in p.decisions)
    # the decode estimate sees the smaller cache: a lower hit rate than a 927-expert cache would give
    assert "cache 847/11008" in p.predicted["hit_rate_source"]


def test_runtime_arithmetic_on_the_plan_rebuilds_the_planned_stage():
    """What offload/cached_backend.py does with the plan's stage (budget, cache slots) gives the planned 40 experts."""
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    p = plan(spec, inv, load_profile("rtx5090-192gb"), PlanOptions())
    assert _runtime_stage_experts(p.layout.stages[0], inv.non_expert_bytes) == 40


def _runtime_stage_experts(st, non_expert_bytes: int) -> int:
    """offload/cached_backend.py on a device of the stage's budget: non-expert weights and KV, then the cache's slots
    and its int32 slot table [stop_layer, 256]; the stages get (free - 2 stage tables) // (2 x expert), up to the rule
    (-1: the slot table itself would not fit)."""
    free = (st.budget_bytes - non_expert_bytes - st.kv_bytes - st.graph_bytes - st.expert_cache_slots * FLASH_BPE
            - 4 * st.stop_layer * 256)
    if free < 0:
        return -1
    return min(prefill_stage_experts(FLASH_BPE, 256, st.budget_bytes), (free - 2 * 4 * 256) // (2 * FLASH_BPE))


@pytest.mark.parametrize("slack", [0, -1])
def test_a_gpu_the_plan_fills_exactly_still_holds_the_runtime_s_tables_and_40_expert_stages(slack):
    """The plan charges the cache's slot table (43 x 256 int32 = 44,032 B) and the two stage tables (2,048 B): on a GPU
    whose budget is the non-expert set + KV + 2 x 40 staged experts + 100 cache experts + 46,080 B exactly, the plan
    keeps 100 cache slots and the runtime's arithmetic gets its 40-expert stages; one byte less and the plan gives up a
    slot. Without the tables charged, that byte-short GPU would keep 100 slots and the runtime could stage only 39."""
    from dataclasses import replace

    from homerun.plan.graph_memory import with_decode_graphs
    from homerun.plan.specs import kv_layout
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    base = load_profile("rtx5090-192gb")
    margins = 3 * GIB + 1 * GIB + activation_bytes(spec, 2048)
    kv = with_decode_graphs(kv_layout(spec, "bf16"), spec).kv_bytes_for(4096)  # the pages (the small state: graph)
    graph = with_decode_graphs(kv_layout(spec, "bf16"), spec).graph_bytes(4096)  # one GPU: decode graphs' state
    budget = inv.non_expert_bytes + kv + graph + 46_080 + 80 * FLASH_BPE + 100 * FLASH_BPE + slack
    prof = replace(base, gpus=(replace(base.gpus[0], vram_gib=(budget + margins) / GIB),))
    p = plan(spec, inv, prof, PlanOptions(context_tokens=4096))
    st = p.layout.stages[0]
    assert st.budget_bytes == budget and (st.kv_bytes, st.graph_bytes) == (kv, graph) and st.stop_layer == 43
    rows = {r.what: r.bytes for r in p.placement}
    assert rows["prefill staging (2 x 40 experts)"] == 80 * FLASH_BPE
    assert rows["expert slot table (43 x 256 int32)"] == 44_032
    assert rows["prefill staging tables (2 x 256 int32)"] == 2_048
    assert st.expert_cache_slots == (100 if slack == 0 else 99)
    assert _runtime_stage_experts(st, inv.non_expert_bytes) == 40
    gpu = p.devices[0]
    assert gpu.used_bytes <= gpu.capacity_bytes
    if slack == 0:
        assert gpu.used_bytes == gpu.capacity_bytes  # filled to the byte
    else:  # the old charge (no tables) would have kept 100 slots, and the tables would eat into the stages
        assert (budget - inv.non_expert_bytes - kv - graph - 80 * FLASH_BPE) // FLASH_BPE == 100
        assert _runtime_stage_experts(replace(st, expert_cache_slots=100), inv.non_expert_bytes) == 39


def test_all_vram_and_unified_plans_charge_no_staging():
    for model, hw in (("Qwen/Qwen3-30B-A3B", "2xh100"), ("openai/gpt-oss-120b", "dgx-spark")):
        spec, inv = resolve_model(model)
        p = plan(spec, inv, load_profile(hw), PlanOptions())
        assert p.mode in ("all-vram", "unified")
        assert not [r for r in p.placement if r.what.startswith("prefill staging")]


def test_staging_capped_by_the_vram_left_after_kv():
    """A GPU with room for only 30.5 experts after the non-expert set and KV: the stages take 2 x 15 (whole pairs),
    the cache the half expert left (none); never a negative cache."""
    from dataclasses import replace

    from homerun.plan.graph_memory import with_decode_graphs
    from homerun.plan.specs import kv_layout
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    base = load_profile("rtx5090-192gb")
    act = activation_bytes(spec, 2048)
    kv = with_decode_graphs(kv_layout(spec, "bf16"), spec).bytes_for(4096)  # with the decode graphs' state
    room = 30 * FLASH_BPE + FLASH_BPE // 2
    vram = (3 * GIB + 1 * GIB + act + inv.non_expert_bytes + kv + room) / GIB
    prof = replace(base, gpus=(replace(base.gpus[0], vram_gib=vram),))
    p = plan(spec, inv, prof, PlanOptions(context_tokens=4096))
    assert p.mode == "hybrid"
    assert sum(r.bytes for r in p.placement if r.what.startswith(("KV cache", "decode graphs'"))) == kv
    stage = [r for r in p.placement if r.what.startswith("prefill staging")]
    assert [r.what for r in stage] == ["prefill staging (2 x 15 experts)", "prefill staging tables (2 x 256 int32)"]
    assert stage[0].bytes == 30 * FLASH_BPE
    assert not [r for r in p.placement if r.what.startswith("GPU expert cache")]
    assert p.devices[0].used_bytes <= p.devices[0].capacity_bytes


def test_runtime_stage_follows_the_rule_on_a_stand_in():
    """build_cached_backend with the cache sized from the device: the stages hold the rule's count, not a quarter of
    it (the old 'quarter of what is left' check, applied after the cache had taken its share, cut them to 1/4)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from homerun.kernels import triton as hr_triton
    if not hr_triton.available():  # pragma: no cover
        pytest.skip(f"triton kernels unavailable: {hr_triton.unavailable_reason()}")
    from offload.cached_backend import CacheOptions, MissOptions, PrefillOptions, build_cached_backend
    from offload.devices import CudaStandInDevice
    from offload.host_store import random_packed_expert

    d, i, e, layers = 64, 32, 64, 2
    g = torch.Generator().manual_seed(0)
    experts = {(l, x): random_packed_expert(d, i, g) for l in range(layers) for x in range(e)}
    probe = build_cached_backend(lambda l, x: experts[(l, x)], range(layers), e, swiglu_limit=10.0,
                                 cache=CacheOptions(1), misses=MissOptions("stream"),
                                 prefill=PrefillOptions(stream=False),
                                 device=CudaStandInDevice("cuda-standin:0", 1 << 30))
    bpe = probe.cache.store.expert_bytes
    probe.close()
    budget = 40 * bpe * 4 + bpe  # a quarter of the budget holds 40 experts: the quarter binds (40 < 64 per layer)
    be = build_cached_backend(lambda l, x: experts[(l, x)], range(layers), e, swiglu_limit=10.0, misses=MissOptions("stream"),
                              device=CudaStandInDevice("cuda-standin:1", budget), prefill=PrefillOptions(min_rows=4))
    assert prefill_stage_experts(bpe, e, budget) == 40
    assert be.prefill is not None and be.prefill.capacity == 40
    assert be.prefill.stats()["stage_bytes"] == 2 * 40 * bpe
    be.close()
