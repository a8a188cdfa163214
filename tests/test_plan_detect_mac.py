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


def _fake_cuda(monkeypatch, *props):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])


def test_integrated_cuda_gpu_is_one_pool(monkeypatch):
    """A DGX Spark (GB10: CUDA reports the host RAM as the device's memory, is_integrated set) is one pool counted
    once, planned like the shipped dgx-spark profile; the old detection made it a 119 GiB GPU beside 119 GiB of RAM."""
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(total=int(119 * GIB)))
    _fake_cuda(monkeypatch, SimpleNamespace(name="NVIDIA GB10", total_memory=119 * GIB, is_integrated=True))
    prof, det = hardware.detect(measure=False)
    assert prof.memory.unified and prof.memory.gpu_limit_gib is None
    assert [(g.vram_gib, g.h2d_gbps, g.mem_bw_gbps) for g in prof.gpu_list] == [(0, 0, 273.0)]
    assert prof.policy.reserve_vram_gib == 0 and prof.policy.pinned_staging_gib == 0
    assert any("integrated" in a for a in det.assumed) and not any("host-to-device" in a for a in det.assumed)
    spec, inv = resolve_model("openai/gpt-oss-120b")
    p = plan(spec, inv, prof, PlanOptions())
    assert p.fits and p.mode == "unified"
    assert sum(d.capacity_bytes for d in p.devices) == int(119 * GIB)  # the RAM once, not RAM + "VRAM"


def test_integrated_gpu_beside_a_discrete_one_is_left_out(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    _fake_cuda(monkeypatch, SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=24 * GIB),
               SimpleNamespace(name="AMD Radeon Graphics", total_memory=64 * GIB, is_integrated=True))
    prof, det = hardware.detect(measure=False)
    assert not prof.memory.unified and [g.name for g in prof.gpu_list] == ["NVIDIA GeForce RTX 4090"]
    assert any("integrated GPU left out" in a for a in det.assumed)
