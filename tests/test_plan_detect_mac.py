"""`--hw auto` on an Apple-silicon Mac (faked: platform, RAM), without measuring: the detected profile describes the
pool a one-pool plan fills (RAM less the host reserve, homerun.plan.one_pool), not a GPU wired limit that the plan
never applies (homerun runs unified plans on the CPU)."""

from __future__ import annotations

import platform
from types import SimpleNamespace

import psutil
import pytest

from homerun.plan import hardware
from homerun.plan.inventory import resolve_model
from homerun.plan.one_pool import pool_limit
from homerun.plan.planner import PlanOptions, plan
from profiles.schema import GIB

RAM_GIB = 128.0
REAL_GPU_SPECS = hardware._gpu_specs  # the fixture below replaces it


@pytest.fixture
def mac(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=int(RAM_GIB * GIB)))
    monkeypatch.setattr(hardware, "_gpu_specs", lambda h2d, assumed: ())  # no CUDA on a Mac
    prof, det = hardware.detect(measure=False)
    return prof, det


def test_detected_mac_profile_has_no_gpu_limit_the_plan_ignores(mac):
    prof, det = mac
    assert prof.memory.unified and prof.cpu.ram_gib == RAM_GIB
    assert prof.memory.gpu_limit_gib is None
    assert [g.name for g in prof.gpu_list] == ["Apple GPU"] and prof.policy.reserve_vram_gib == 0.0
    assert not any("75 %" in a for a in det.assumed)
    assert any("RAM less the host reserve" in a for a in det.assumed)
    limit, gpu_bound, why = pool_limit(prof, gpu_runs=False)
    assert limit == (RAM_GIB - prof.policy.host_reserve_gib) * GIB and not gpu_bound
    assert "limit" not in why.split(":", 1)[1]  # the reason names RAM and the reserve only


def test_plan_on_detected_mac_fills_ram_less_the_reserve(mac):
    prof, _ = mac
    spec, inv = resolve_model("openai/gpt-oss-120b")
    p = plan(spec, inv, prof, PlanOptions())
    assert p.fits and p.mode == "unified"
    limit = next(d for d in p.to_dict()["decisions"] if d["what"] == "memory limit")
    assert limit["choice"] == f"{RAM_GIB - prof.policy.host_reserve_gib:.0f} GiB of {RAM_GIB:.0f} GiB"
    assert "GPU's" not in limit["reason"]  # no GPU limit recorded, none mentioned
    pool = next(d for d in p.devices if d.kind == "unified")
    assert pool.margins["host_reserve"] == int(prof.policy.host_reserve_gib * GIB)


def test_detected_mac_cpu_flags(mac):
    assert mac[0].cpu.flags == ("neon",)  # ARMv8 always has Advanced SIMD; no /proc/cpuinfo on macOS


def test_unmeasured_cuda_link_is_named_as_assumed(monkeypatch):
    import torch

    props = SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=24 * GIB)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    assumed: list[str] = []
    (gpu,) = REAL_GPU_SPECS(None, assumed)
    assert gpu.h2d_gbps == hardware.H2D_ASSUMED_GBPS and any("host-to-device" in a for a in assumed)
    assumed = []
    (gpu,) = REAL_GPU_SPECS(25.0, assumed)
    assert gpu.h2d_gbps == 25.0 and not any("host-to-device" in a for a in assumed)
