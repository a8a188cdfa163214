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
    monkeypatch.setattr(hardware, "_gpu_specs", lambda h2d, assumed, dram: ())  # no CUDA on a Mac
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
    (gpu,) = REAL_GPU_SPECS(None, assumed, 50.0)
    assert gpu.h2d_gbps == hardware.H2D_ASSUMED_GBPS and any("host-to-device" in a for a in assumed)
    assumed = []
    (gpu,) = REAL_GPU_SPECS(25.0, assumed, 50.0)
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


def test_unknown_integrated_gpu_reads_at_the_dram_figure(monkeypatch):
    """An integrated GPU not in KNOWN_GPUS (a Strix Halo APU) reads the host RAM: its bandwidth is the DRAM figure, as
    a Mac's GPU gets, with no "assumed 500 GB/s" note (the old detection kept 500 and said so)."""
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    _fake_cuda(monkeypatch, SimpleNamespace(name="AMD Radeon 8060S", total_memory=96 * GIB, is_integrated=True))
    measured = hardware.Measured(path="measured.json", bandwidth_gbps={"dram_read": 212.0})
    prof, det = hardware.detect(measure=False, measured=measured)
    assert prof.memory.unified and [(g.vram_gib, g.mem_bw_gbps) for g in prof.gpu_list] == [(0, 212.0)]
    assert not any("bandwidth unknown" in a for a in det.assumed)
    assumed: list[str] = []  # a discrete GPU not in the table still gets the guess, said as such
    _fake_cuda(monkeypatch, SimpleNamespace(name="NVIDIA Future GPU", total_memory=48 * GIB))
    (gpu,) = REAL_GPU_SPECS(25.0, assumed, 212.0)
    assert gpu.mem_bw_gbps == 500.0 and any("bandwidth unknown, assumed 500 GB/s" in a for a in assumed)


def test_integrated_gpu_beside_a_discrete_one_is_left_out(monkeypatch):
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    _fake_cuda(monkeypatch, SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=24 * GIB),
               SimpleNamespace(name="AMD Radeon Graphics", total_memory=64 * GIB, is_integrated=True))
    prof, det = hardware.detect(measure=False)
    assert not prof.memory.unified and [g.name for g in prof.gpu_list] == ["NVIDIA GeForce RTX 4090"]
    assert any("integrated GPU left out" in a for a in det.assumed)


def _fake_copies(monkeypatch) -> list:
    """torch.empty / synchronize that record the device asked for and copy on the CPU (no CUDA here)."""
    import torch

    real = torch.empty
    where: list = []

    def empty(*size, dtype=None, device=None, pin_memory=False):
        where.append(device)
        return real(*size, dtype=dtype)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: where.append(("sync", device)))
    return where


IGPU_FIRST = (SimpleNamespace(name="AMD Radeon Graphics", total_memory=64 * GIB, is_integrated=True),
              SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=24 * GIB))


def test_h2d_is_measured_on_the_discrete_gpu(monkeypatch):
    """An integrated GPU at CUDA ordinal 0 beside a discrete one at 1: the link measured is the discrete GPU's (the
    old measurement copied to "cuda", device 0, and recorded the integrated GPU's copy speed as the link)."""
    import torch

    _fake_cuda(monkeypatch, *IGPU_FIRST)
    where = _fake_copies(monkeypatch)
    assert hardware.measure_h2d_gbps(seconds=0.01, size_bytes=4096) > 0
    assert where[1] == torch.device("cuda", 1) and ("sync", torch.device("cuda", 1)) in where
    _fake_cuda(monkeypatch, IGPU_FIRST[0])  # an integrated GPU alone has no host link to measure
    where.clear()
    assert hardware.measure_h2d_gbps(seconds=0.01, size_bytes=4096) is None and not where


def test_detection_names_the_cuda_ordinal_the_plan_gpu_is(monkeypatch):
    """Detected with measuring (DRAM and CPU peaks faked): the discrete GPU gets the link measured on it, and since a
    placed run puts the plan's GPU 0 on cuda:0 (the integrated one here) the detection says how to make them agree."""
    import torch
    from homerun.kernels import kernel_bench

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(kernel_bench, "measure_dram_read_gbps", lambda reps=3: 60.0)
    monkeypatch.setattr(hardware, "measure_cpu_peaks", lambda: None)
    _fake_cuda(monkeypatch, *IGPU_FIRST)
    where = _fake_copies(monkeypatch)
    prof, det = hardware.detect(measure=True)
    assert [g.name for g in prof.gpu_list] == ["NVIDIA GeForce RTX 4090"]
    assert prof.gpu_list[0].h2d_gbps == det.h2d_gbps > 0 and torch.device("cuda", 1) in where
    assert any("CUDA_VISIBLE_DEVICES=1" in a for a in det.assumed)
    _fake_cuda(monkeypatch, *IGPU_FIRST[::-1])  # discrete at 0: GPU 0 is cuda:0 already, nothing to say
    _, det = hardware.detect(measure=False)
    assert not any("CUDA_VISIBLE_DEVICES" in a for a in det.assumed)
