"""An imposed expert placement (issue 17, like-for-like validation): `PlanOptions.expert_placement` and
`homerun plan --n-cpu-moe N / --gpu-experts N` plan a peer runtime's own split of routed experts between VRAM and the
CPU instead of choosing one. Values checked by hand on two profiles."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from homerun.plan.inventory import resolve_model
from homerun.plan.graph_memory import with_decode_graphs
from homerun.plan.planner import ExpertPlacement, PlanOptions, plan
from homerun.plan.specs import kv_layout, kv_read_bytes_per_token
from homerun.plan.speed import activation_bytes
from profiles import GIB, load_profile

GPTOSS_BPE = 13_236_480  # gpt-oss-120b: one MXFP4 routed expert (card)
FLASH_BPE = 13_369_344  # V4-Flash: one FP4 routed expert (card)
HANDOFF_S = 2 * 20e-6 + 2 * 6e-6 + 10e-6  # priors.handoff_seconds_per_layer without the activation bytes


def _decisions(p) -> dict[str, dict[str, str]]:
    return {d["what"]: d for d in p.decisions}


def test_n_cpu_moe_30_gpt_oss_120b_on_rtx3090_by_hand():
    """36 layers x 128 experts; --n-cpu-moe 30 leaves layers 30-35 in VRAM: 6 x 128 = 768 experts (1/6 of 4608), and
    every token's 30 x 4 CPU-side experts are computed on the CPU at 38 GB/s (none streamed)."""
    spec, inv = resolve_model("openai/gpt-oss-120b")
    prof = load_profile("rtx3090-64gb")
    ep = ExpertPlacement(cpu_moe_layers=30)
    p = plan(spec, inv, prof, PlanOptions(expert_placement=ep, context_tokens=32768))
    assert p.fits and p.mode == "hybrid"
    rows = {r.what: r for r in p.placement}
    vram = rows["routed experts in VRAM, imposed (768 experts)"]
    assert vram.device == "gpu0" and vram.bytes == 768 * GPTOSS_BPE == 10_165_616_640
    host = [r for r in p.placement if r.device == "host" and r.what.startswith("routed experts")]
    assert [r.bytes for r in host] == [inv.routed_expert_bytes - 768 * GPTOSS_BPE] == [3840 * GPTOSS_BPE]
    assert "imposed" in _decisions(p)["expert placement"]["choice"]
    assert "--n-cpu-moe 30" in _decisions(p)["expert placement"]["reason"]
    assert p.layout.stages[0].expert_cache_slots == 768

    pred = p.predicted
    assert pred["expert_cache_hit_rate"] == pytest.approx(768 / 4608)
    assert pred["miss_pcie_fraction"] == 0.0 and pred["estimate_miss_pcie_fraction"] == 0.0
    miss = 30 * 4 * GPTOSS_BPE  # = 1,588,377,600 B per token on the CPU
    hit = 6 * 4 * GPTOSS_BPE
    fixed = inv.non_expert_bytes - inv.bytes_by_class["embed"] + kv_read_bytes_per_token(
        spec, kv_layout(spec, "bf16"), 4096)
    # bound: links concurrent, the slowest decides: DRAM 1.588 GB at 38 GB/s = 41.80 ms
    assert max(fixed + hit, 0) / 936.2e9 < miss / 38e9
    assert pred["decode_tok_s_upper_bound"] == pytest.approx(38e9 / miss)
    assert pred["decode_tok_s_upper_bound"] == pytest.approx(23.92, abs=0.01)
    # estimate: fixed GPU reads, then the expert phase (the CPU's share at 38 x 0.65 GB/s), overhead and handoff
    t_phase = miss / (38e9 * 0.65)
    assert pred["estimate_seconds_per_token"]["expert_phase"] == pytest.approx(t_phase)
    handoff = HANDOFF_S + 2 * 2880 * 2 / 23.9e9
    t = fixed / (936.2e9 * 0.75) + t_phase + 36 * 1e-4 + 36 * handoff
    assert pred["decode_tok_s"] == pytest.approx(1 / t, rel=1e-6)
    assert pred["decode_tok_s"] == pytest.approx(13.4, abs=0.1)


def test_gpu_experts_10_v4_flash_on_rtx5090_by_hand():
    """KTransformers' --kt-num-gpu-experts 10 on V4-Flash: 10 of 256 experts in each of 43 layers (430, hit 10/256);
    the static set comes first, KV gets what it leaves, and no expert cache is grown from the rest."""
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    prof = load_profile("rtx5090-192gb")
    p = plan(spec, inv, prof, PlanOptions(expert_placement=ExpertPlacement(gpu_experts_per_layer=10)))
    assert p.fits and p.mode == "hybrid"
    rows = {r.what: r for r in p.placement}
    assert rows["routed experts in VRAM, imposed (430 experts)"].bytes == 430 * FLASH_BPE == 5_748_817_920
    assert not [r for r in p.placement if r.what.startswith("GPU expert cache")]
    # VRAM: usable = 32 GiB - 3 - 1 - activations; the non-expert set, slot table (43 x 256 int32) and the 430
    # experts first; KV gets the rest (the model's 1M context if it fits: it does, with the decode graphs' state
    # beside it, which holds no second copy of the KV), then the two 40-expert prefill stages and their tables
    usable = 32 * GIB - 4 * GIB - activation_bytes(spec, 2048)
    left = usable - inv.non_expert_bytes - 44_032 - 430 * FLASH_BPE
    kv = with_decode_graphs(kv_layout(spec, "bf16"), spec)  # one GPU: the decode graphs' static state on top
    assert p.context["reserved_tokens"] == min(kv.tokens_for(left), spec.max_position_embeddings)
    gpu = p.devices[0]
    kv_bytes = kv.bytes_for(p.context["reserved_tokens"])
    assert p.context["reserved_tokens"] == spec.max_position_embeddings
    stages = sum(r.bytes for r in p.placement if r.what.startswith("prefill staging"))
    assert stages == 1_069_547_520 + 2_048
    assert gpu.used_bytes == int(inv.non_expert_bytes + 44_032 + 430 * FLASH_BPE + kv_bytes + stages
                                 + sum(gpu.margins.values()))
    pred = p.predicted
    assert pred["expert_cache_hit_rate"] == pytest.approx(10 / 256)
    miss = (1 - 10 / 256) * 43 * 6 * FLASH_BPE
    assert pred["estimate_links"][1]["name"] == "dram"
    assert pred["estimate_links"][1]["bytes_per_token"] == pytest.approx(miss)
    assert pred["estimate_seconds_per_token"]["expert_phase"] == pytest.approx(miss / (60e9 * 0.65))
    assert pred["decode_tok_s_upper_bound"] == pytest.approx(60e9 / miss)


def test_a_placement_that_keeps_every_expert_on_the_gpu():
    spec, inv = resolve_model("Qwen/Qwen3-30B-A3B")
    p = plan(spec, inv, load_profile("2xh100"), PlanOptions(expert_placement=ExpertPlacement(cpu_moe_layers=0)))
    assert p.fits and p.mode == "all-vram" and _decisions(p)["expert placement"]["choice"] == "imposed: all in VRAM"
    # gpt-oss-120b's 57 GiB of experts do not fit a 24 GiB GPU: the imposed placement does not fit, and says which flag
    spec, inv = resolve_model("openai/gpt-oss-120b")
    p = plan(spec, inv, load_profile("rtx3090-64gb"), PlanOptions(expert_placement=ExpertPlacement(cpu_moe_layers=0)))
    assert not p.fits and "raise --n-cpu-moe" in p.remedy and "4608 experts" in p.remedy
    p = plan(spec, inv, load_profile("rtx3090-64gb"),
             PlanOptions(expert_placement=ExpertPlacement(gpu_experts_per_layer=128)))
    assert not p.fits and "lower --gpu-experts" in p.remedy


def test_all_cpu_placement_and_one_pool_profiles():
    spec, inv = resolve_model("openai/gpt-oss-120b")
    # --cpu-moe (-ot exps=CPU): every expert computed on the CPU (63 GB/s on rtx4090-128gb), none in VRAM
    p = plan(spec, inv, load_profile("rtx4090-128gb"),
             PlanOptions(expert_placement=ExpertPlacement(cpu_moe_layers=36)))
    assert p.fits and p.predicted["expert_cache_hit_rate"] == 0.0
    assert not [r for r in p.placement if "imposed (" in r.what]
    assert p.predicted["decode_tok_s_upper_bound"] == pytest.approx(63e9 / (36 * 4 * GPTOSS_BPE))
    assert p.predicted["estimate_seconds_per_token"]["expert_phase"] == pytest.approx(
        36 * 4 * GPTOSS_BPE / (63e9 * 0.65))
    u = plan(spec, inv, load_profile("dgx-spark"), PlanOptions(expert_placement=ExpertPlacement(cpu_moe_layers=10)))
    assert u.mode == "unified" and _decisions(u)["expert placement"]["choice"] == "not applied"
    assert u.predicted == plan(spec, inv, load_profile("dgx-spark"), PlanOptions()).predicted


@pytest.mark.parametrize("ep, flag", [
    (ExpertPlacement(cpu_moe_layers=37), "--n-cpu-moe must be 0..36"),
    (ExpertPlacement(cpu_moe_layers=-1), "--n-cpu-moe must be 0..36"),
    (ExpertPlacement(gpu_experts_per_layer=129), "--gpu-experts must be 0..128"),
    (ExpertPlacement(), "exactly one"),
    (ExpertPlacement(cpu_moe_layers=1, gpu_experts_per_layer=1), "exactly one"),
])
def test_plan_rejects_a_bad_placement(ep, flag):
    spec, inv = resolve_model("openai/gpt-oss-120b")
    with pytest.raises(ValueError, match=flag):
        plan(spec, inv, load_profile("rtx3090-64gb"), PlanOptions(expert_placement=ep))


def test_the_planner_without_a_placement_is_unchanged_by_the_option_field():
    spec, inv = resolve_model("openai/gpt-oss-120b")
    prof = load_profile("rtx3090-64gb")
    a = plan(spec, inv, prof, PlanOptions())
    assert "expert placement" not in _decisions(a)
    b = plan(spec, inv, prof, replace(PlanOptions(), expert_placement=None))
    assert a == b


# ---- CLI -------------------------------------------------------------------------------------------------------------


def _cli(*args: str):
    from homerun.cli.app import app

    return CliRunner().invoke(app, ["plan", *args])


def test_cli_n_cpu_moe_reaches_the_plan():
    r = _cli("openai/gpt-oss-120b", "--hw", "rtx3090-64gb", "--n-cpu-moe", "30", "--context", "32768", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    d = {x["what"]: x for x in doc["decisions"]}
    assert d["expert placement"]["choice"] == "imposed: 768/4608 experts in VRAM"
    assert doc["predicted"]["expert_cache_hit_rate"] == pytest.approx(1 / 6)
    r = _cli("v4-flash", "--hw", "rtx5090-192gb", "--gpu-experts", "10", "--json")
    assert r.exit_code == 0, r.output
    assert any(x["what"] == "routed experts in VRAM, imposed (430 experts)" for x in json.loads(r.output)["placement"])


@pytest.mark.parametrize("args, message", [
    (("--n-cpu-moe", "37"), "--n-cpu-moe must be 0..36 (the model's layers), got 37"),
    (("--n-cpu-moe", "-1"), "--n-cpu-moe must be 0..36 (the model's layers), got -1"),
    (("--gpu-experts", "200"), "--gpu-experts must be 0..128 (routed experts per layer), got 200"),
    (("--gpu-experts", "-3"), "--gpu-experts must be 0..128"),
    (("--n-cpu-moe", "3", "--gpu-experts", "3"), "--n-cpu-moe and --gpu-experts both impose"),
])
def test_cli_bad_placement_values_exit_2_naming_the_flag(args, message):
    """Through the app's error mapping (test_bad_input's in-process runner): exit 2, one Error: line, a hint."""
    from test_bad_input import assert_clean_error, homerun

    err = assert_clean_error(homerun("plan", "openai/gpt-oss-120b", "--hw", "rtx3090-64gb", *args), 2, message)
    assert next(line for line in err.splitlines() if line.startswith("Error:")).count(message) == 1


def test_two_gpus_split_an_imposed_placement_by_bytes_not_by_layer_count():
    """llama.cpp --n-cpu-moe 20 on 2x RTX 3090 (the llmgarage rig's profile): layers 20-35 carry 16 x 128 experts
    (25.2 GiB); split by layer count ([18, 18]) they would all land on gpu1, over its 24 GiB. Split by bytes, each GPU
    takes 8 of those layers: [28, 8]."""
    from homerun.plan.validate import load_table, row_profile
    row = next(r for r in load_table() if r["id"] == "llmgarage-gptoss120b-2x3090-5800x-64gb")
    spec, inv = resolve_model("openai/gpt-oss-120b")
    assert 16 * 128 * GPTOSS_BPE / GIB > 24
    p = plan(spec, inv, row_profile(row),
             PlanOptions(context_tokens=38000, expert_placement=ExpertPlacement(cpu_moe_layers=20)))
    assert p.fits and p.layout.to_dict()["layer_counts"] == [28, 8]
    assert _decisions(p)["split"]["choice"] == "2 pipeline stages, layers [28, 8]"
    vram = {r.device: r for r in p.placement if r.what.startswith("routed experts in VRAM, imposed")}
    assert vram["gpu0"].what.endswith("(1024 experts)") and vram["gpu1"].what.endswith("(1024 experts)")
    assert all(d.used_bytes <= d.capacity_bytes for d in p.devices)
    assert p.predicted["expert_cache_hit_rate"] == pytest.approx(16 / 36)
