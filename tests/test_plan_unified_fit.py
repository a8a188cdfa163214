"""A one-pool plan (unified memory) fits in what runs it: the runtime puts every layer on the host CPU
(homerun.engine.placement.placement_from_plan; tests/test_plan_unified_executor.py), so the pool is RAM less the host
reserve, not the GPU's wired limit (macOS iogpu.wired_limit_mb, 75 % of RAM by default), which bounds only what a GPU
maps. Hand-computed from the model's bytes and the profile's figures: a Mac whose wired limit is below V4-Flash but
whose RAM holds it fits, at exactly the bytes RAM less the reserve leaves; a few MiB less does not, with the
more-memory remedy; V4-Pro does not fit a 512 GB Mac; the CLI exits 3 for does-not-fit."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from homerun.engine.placement import placement_from_plan
from homerun.plan.inventory import resolve_model
from homerun.plan.one_pool import pool_limit, pool_remedy
from homerun.plan.planner import MIN_CONTEXT_TOKENS, activation_bytes, plan
from homerun.plan.specs import kv_layout
from profiles import GIB, load_profile
from test_planner import run_cli

RESERVE_GIB, OVERHEAD_GIB = 16.0, 1.0  # m3-ultra-512gb's policy: host_reserve_gib, runtime_overhead_gib
CPU_CHUNK = 1024  # the runtime's CPU prefill chunk for V4-Flash (homerun.plan.records.prefill_chunk_tokens)


def _mac(ram_gib: float):
    """m3-ultra-512gb with another RAM size and the default 75 % wired limit."""
    base = load_profile("m3-ultra-512gb")
    assert (base.policy.host_reserve_gib, base.policy.runtime_overhead_gib) == (RESERVE_GIB, OVERHEAD_GIB)
    return replace(base, name=f"mac-{ram_gib:g}", cpu=replace(base.cpu, ram_gib=ram_gib),
                   memory=replace(base.memory, gpu_limit_gib=0.75 * ram_gib))


def _mac_toml(tmp_path, ram_gib: float) -> str:
    """profiles/m3-ultra-512gb.toml with another RAM size and the default 75 % wired limit."""
    text = (Path(__file__).parents[1] / "profiles" / "m3-ultra-512gb.toml").read_text()
    text = re.sub(r"(?m)^ram_gib = \S+", f"ram_gib = {ram_gib!r}", text)
    text = re.sub(r"(?m)^gpu_limit_gib = \S+", f"gpu_limit_gib = {0.75 * ram_gib!r}", text)
    text = re.sub(r'(?m)^name = "m3-ultra-512gb"', 'name = "mac-test"', text)
    path = tmp_path / "mac.toml"
    path.write_text(text)
    return str(path)


def _cpu_chunk(p) -> int:
    (d,) = [d for d in p.decisions if d["what"] == "prefill chunk"]
    return int(d["choice"].split()[0])


def _flash_need_bytes() -> tuple[int, int, int]:
    """(weights, the minimum KV, activations of the CPU chunk) for V4-Flash, bf16 KV, no MTP."""
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    kv = kv_layout(spec, "bf16")
    assert kv.bytes_per_token == 6880
    return inv.non_expert_bytes + inv.routed_expert_bytes, kv.bytes_for(MIN_CONTEXT_TOKENS), \
        activation_bytes(spec, CPU_CHUNK)


def test_a_192gb_mac_whose_wired_limit_is_below_flash_fits_it_in_ram():
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    weights, kv_min, act = _flash_need_bytes()
    prof = _mac(192)  # wired limit 144 GiB: below the 147 GiB Flash needs
    assert prof.memory.gpu_limit_gib * GIB < weights + kv_min + OVERHEAD_GIB * GIB + act
    p = plan(spec, inv, prof)
    assert p.fits and p.mode == "unified" and p.remedy is None
    (dev,) = p.devices
    assert dev.margins == {"host_reserve": 16 * GIB, "runtime_overhead": 1 * GIB, "activations": act}
    usable = (192 - 16 - 1) * GIB - act
    (stage,) = p.layout.stages
    assert stage.budget_bytes == usable
    assert p.context["max_tokens"] == min((usable - weights) // 6880, 1048576) == 1048576
    (limit,) = [d for d in p.decisions if d["what"] == "memory limit"]
    assert limit["choice"] == "176 GiB of 192 GiB"
    assert "host CPU runs every layer" in limit["reason"] and "144 GiB limit" in limit["reason"]
    # the premise: the runtime puts every layer on the host
    assert {lp.device for lp in placement_from_plan(p).layers} == {"cpu"}


@pytest.mark.parametrize("slack_bytes, fits", [(4096, True), (-(4 << 20), False)])
def test_flash_fits_exactly_in_ram_less_the_host_reserve(slack_bytes, fits):
    """RAM sized to the byte: the reserve, the runtime overhead, the CPU chunk's activations, the weights and the
    minimum KV; 4 KiB more fits with the minimum context, 4 MiB less does not and asks for memory, not a sysctl."""
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    weights, kv_min, act = _flash_need_bytes()
    need = weights + kv_min + OVERHEAD_GIB * GIB + act
    ram = need + RESERVE_GIB * GIB + slack_bytes
    p = plan(spec, inv, _mac(ram / GIB))
    assert p.fits is fits
    if fits:
        # the KV in whole pages (the runtime's): the 4 KiB buys no page, only the tokens up to the next CSA row
        kv, tokens = kv_layout(spec, "bf16"), p.context["max_tokens"]
        assert kv.bytes_for(tokens) == kv_min < kv.bytes_for(tokens + 1) and tokens == MIN_CONTEXT_TOKENS + 3
    else:
        r = ram / GIB
        assert p.remedy == (f"needs {need / GIB:.0f} GiB of memory for weights and KV, the profile has {r:.0f} GiB "
                            f"({r - 16:.0f} GiB after the 16 GiB host reserve)")
        assert "wired_limit" not in p.remedy and p.predicted["decode_tok_s"] is None


def test_pro_above_a_512gb_macs_ram_does_not_fit_and_asks_for_memory(capsys):
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Pro")
    p = plan(spec, inv, load_profile("m3-ultra-512gb"))
    need = (inv.non_expert_bytes + inv.routed_expert_bytes + kv_layout(spec, "bf16").bytes_for(MIN_CONTEXT_TOKENS)
            + GIB + activation_bytes(spec, _cpu_chunk(p)))
    assert not p.fits and p.mode == "none"
    assert p.remedy == (f"needs {need / GIB:.0f} GiB of memory for weights and KV, the profile has 512 GiB "
                        "(496 GiB after the 16 GiB host reserve)")
    code, _, err = run_cli(capsys, "plan", "deepseek-ai/DeepSeek-V4-Pro", "--hw", "m3-ultra-512gb")
    assert code == 3 and err.startswith(f"Error: {p.remedy}")


def test_the_cli_exits_0_when_ram_holds_flash_and_3_when_it_does_not(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "plan", "deepseek-ai/DeepSeek-V4-Flash", "--hw", _mac_toml(tmp_path, 192))
    assert code == 0 and out.startswith("FITS")
    code, _, err = run_cli(capsys, "plan", "deepseek-ai/DeepSeek-V4-Flash", "--hw", _mac_toml(tmp_path, 160))
    assert code == 3  # 160 - 16 = 144 GiB < 147 GiB
    assert err.startswith("Error: needs 147 GiB of memory for weights and KV, the profile has 160 GiB (144 GiB after")


def test_the_gpu_limit_bounds_a_pool_only_where_the_gpu_runs_the_layers():
    """pool_limit's two answers on the 192 GB Mac: the host runs the layers (what the runtime does) -> RAM less the
    reserve; a GPU would -> its 144 GiB wired limit, and the remedy would raise that limit while RAM would hold it."""
    prof = _mac(192)
    assert pool_limit(prof, gpu_runs=False)[:2] == (176 * GIB, False)
    assert pool_limit(prof, gpu_runs=True)[:2] == (144 * GIB, True)
    need = 150 * GIB
    assert pool_remedy(prof, need, gpu_bound=True) == (
        f"needs 150 GiB of GPU-usable memory, the limit is 144 GiB: raise it (macOS: sudo sysctl "
        f"iogpu.wired_limit_mb={150 * 1024})")
    assert pool_remedy(prof, 180 * GIB, gpu_bound=True).startswith("needs 180 GiB of memory for weights and KV")
    assert pool_remedy(prof, need, gpu_bound=False).startswith("needs 150 GiB of memory for weights and KV")
