"""`--hw auto`: detect this machine (psutil, torch.cuda, CPU flags), measure what a few seconds allow, and read
`$HOMERUN_HOME/measured.json`.

Detection returns a `HardwareProfile` like the shipped ones (source "auto") plus a `Detection` record saying what
was measured and what was assumed. It measures DRAM read bandwidth (~1 s) and, when a CUDA GPU exists, pinned
host-to-device bandwidth (~1 s). torch is imported only here, only when asked. It never changes system settings.

measured.json (written by `homerun bench`, read here; every key but schema_version is optional):
    {"schema_version": 1, "written_by": "homerun bench 0.1.0", "written_at": "2026-11-30T18:00:00Z",
     "host": "box", "bandwidth_gbps": {"dram_read": 58.1, "h2d_pinned": 52.3, "vram": 1500.0},
     "efficiency": {"vram": 0.8, "dram": 0.7, "pcie": 0.9, "gpu_compute": 0.45, "per_layer_overhead_s": 8e-05},
     "expert_cache_hit_rate": {"deepseek-ai/DeepSeek-V4-Flash": 0.55}}
Efficiencies replace the planner's defaults for every plan; bandwidths replace detected/assumed figures for
`--hw auto` only (they describe this machine); hit rates are per model name.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from homerun.errors import ConfigError
from homerun.plan.planner import Efficiency
from profiles.schema import CpuSpec, GpuSpec, HardwareProfile, MemorySpec, PolicySpec

GIB = 2**30

# Known GPUs, matched in order by substring of the CUDA device name: bandwidth (GB/s), BF16 dense TFLOPS, FP8, FP4,
# as in the shipped profiles, whose comments cite each figure's source; H100 SXM5 3.35 TB/s: hawkvelt.id.au H100 SKUs;
# H200 4.8 TB/s: saulelectric H200 page. Unknown GPUs get a guess, flagged as assumed.
KNOWN_GPUS = {
    "RTX 5090": (1792.0, 419.0, True, True),
    "RTX 4090": (1008.0, 165.0, True, False),
    "RTX 3090": (936.2, None, False, False),
    "H100 PCIe": (2000.0, 756.0, True, False),
    "H100": (3350.0, None, True, False),  # SXM5 (HBM3) parts report as "H100 80GB HBM3"
    "H200": (4800.0, None, True, False),
    "GB10": (273.0, None, True, True),
}
H2D_ASSUMED_GBPS = 20.0  # unmeasured pinned H2D: under PCIe 4.0 x16's nvbandwidth 23.9-26.4 GB/s (NVIDIA/nvbandwidth #15)
MEASURED_KEYS = {"schema_version", "written_by", "written_at", "host", "profile", "bandwidth_gbps", "efficiency",
                 "expert_cache_hit_rate"}
BANDWIDTH_KEYS = {"dram_read", "h2d_pinned", "vram"}
EFFICIENCY_KEYS = {"vram", "dram", "pcie", "gpu_compute", "per_layer_overhead_s"}


@dataclass(frozen=True)
class Measured:
    """Contents of measured.json (see module docstring)."""

    path: str
    bandwidth_gbps: dict[str, float] = field(default_factory=dict)
    efficiency: dict[str, float] = field(default_factory=dict)
    expert_cache_hit_rate: dict[str, float] = field(default_factory=dict)
    written_by: str = ""
    written_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Detection:
    dram_read_gbps: float | None
    h2d_gbps: float | None
    gpus: tuple[str, ...]
    cpu_flags: tuple[str, ...]
    assumed: tuple[str, ...]
    seconds: float
    cpu_peak_gops: dict[str, float | None] | None = None  # int8 / bf16 / fp32 over all kernel threads, best of 3

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def homerun_home() -> Path:
    return Path(os.environ.get("HOMERUN_HOME") or Path.home() / ".homerun")


def measured_path() -> Path:
    return homerun_home() / "measured.json"


def _numbers(table: Any, allowed: set[str], prefix: str, path: Path) -> dict[str, float]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: '{prefix}' must be an object", hint="see the measured.json schema in the README")
    out = {}
    for k, v in table.items():
        if k not in allowed:
            raise ConfigError(f"{path}: unknown key '{prefix}.{k}'", hint=f"known: {', '.join(sorted(allowed))}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"{path}: key '{prefix}.{k}' must be a positive number, got {v!r}", hint="re-run homerun bench")
        out[k] = float(v)
    return out


def load_measured(path: Path | None = None) -> Measured | None:
    """Read and validate measured.json; None when the file does not exist."""
    path = path or measured_path()
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg})", hint="delete it or re-run homerun bench") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})",
                          hint="delete it or re-run homerun bench") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})", hint="delete it or re-run homerun bench") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object", hint="delete it or re-run homerun bench")
    for k in data:
        if k not in MEASURED_KEYS:
            raise ConfigError(f"{path}: unknown key '{k}'", hint=f"known: {', '.join(sorted(MEASURED_KEYS))}")
    if data.get("schema_version") != 1:
        raise ConfigError(f"{path}: key 'schema_version' must be 1", hint="re-run homerun bench")
    rates = data.get("expert_cache_hit_rate", {})
    if not isinstance(rates, dict) or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in rates.values()):
        raise ConfigError(f"{path}: key 'expert_cache_hit_rate' must map model names to numbers in [0, 1]",
                          hint="re-run homerun bench")
    return Measured(
        path=str(path),
        bandwidth_gbps=_numbers(data.get("bandwidth_gbps", {}), BANDWIDTH_KEYS, "bandwidth_gbps", path),
        efficiency=_numbers(data.get("efficiency", {}), EFFICIENCY_KEYS, "efficiency", path),
        expert_cache_hit_rate={str(k): float(v) for k, v in rates.items()},
        written_by=str(data.get("written_by", "")),
        written_at=str(data.get("written_at", "")),
    )


def efficiency_from(measured: Measured | None) -> Efficiency:
    if measured is None or not measured.efficiency:
        return Efficiency()
    return replace(Efficiency(), **measured.efficiency, source=f"measured ({measured.path})")


# ---- detection ---------------------------------------------------------------------------------------------------


def cpu_flags() -> tuple[str, ...]:
    """SIMD flags that choose the CPU expert kernel (x86 /proc/cpuinfo; ARM64 always has NEON)."""
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return ("neon",)
    wanted = {"avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512vbmi", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return tuple(sorted(have & wanted))
    except OSError:
        pass
    return ()


def cpu_kernel_info() -> dict[str, Any]:
    """Which CPU expert-kernel path runs here: homerun.kernels.cpu_experts.backend_info() when that module exists."""
    try:
        from homerun.kernels.cpu_experts import backend_info  # written by another engineer; optional
    except ImportError:
        return {"path": "torch", "built": False, "reason": "torch (native kernels not built)", "source": "this machine"}
    info = dict(backend_info())
    info.setdefault("source", "this machine")
    return info


def measure_h2d_gbps(seconds: float = 1.0, size_bytes: int = 256 * 2**20) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    src = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, size_bytes / (time.perf_counter() - t) / 1e9)
    return best


def _gpu_specs(h2d: float | None, assumed: list[str]) -> tuple[GpuSpec, ...]:
    import torch

    if not torch.cuda.is_available():
        return ()
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        known = next((v for k, v in KNOWN_GPUS.items() if k.lower() in props.name.lower()), None)
        if known is None:
            assumed.append(f"gpu{i} {props.name}: bandwidth unknown, assumed 500 GB/s")
            known = (500.0, None, False, False)
        bw, tflops, fp8, fp4 = known
        if getattr(props, "is_integrated", False):  # GB10, APUs: its "total memory" is the host RAM, not VRAM
            out.append(GpuSpec(name=props.name, vram_gib=0, mem_bw_gbps=bw, h2d_gbps=0, tflops_bf16=tflops,
                               fp8=fp8, fp4=fp4))
            continue
        out.append(GpuSpec(name=props.name, vram_gib=props.total_memory / GIB, mem_bw_gbps=bw,
                           h2d_gbps=h2d or H2D_ASSUMED_GBPS, tflops_bf16=tflops, fp8=fp8, fp4=fp4))
    if any(g.vram_gib > 0 for g in out) and not h2d:
        assumed.append(f"host-to-device bandwidth not measured: assumed {H2D_ASSUMED_GBPS:g} GB/s (below PCIe 4.0 "
                       "x16's measured 23.9-26.4, hardware.md §3)")
    return tuple(out)


def detect(measure: bool = True, measured: Measured | None = None) -> tuple[HardwareProfile, Detection]:
    """This machine as a HardwareProfile (source "auto"), measuring bandwidths for about 2 s when asked."""
    import psutil

    t0 = time.perf_counter()
    assumed: list[str] = []
    flags = cpu_flags()
    dram = None
    if measure:
        from homerun.kernels.kernel_bench import measure_dram_read_gbps

        dram = measure_dram_read_gbps(reps=3)
    h2d = measure_h2d_gbps() if measure else None
    peaks = measure_cpu_peaks() if measure else None
    if peaks is None:
        assumed.append("CPU unit peaks not measured (native kernels not built, or --no-measure): no CPU prefill "
                       "estimate, the detected profile has no clock")
    bw = dict(measured.bandwidth_gbps) if measured else {}
    if "dram_read" in bw:
        dram = bw["dram_read"]
    if "h2d_pinned" in bw:
        h2d = bw["h2d_pinned"]
    if dram is None:
        dram = 50.0
        assumed.append("DRAM bandwidth not measured: assumed 50 GB/s")
    gpus = _gpu_specs(h2d, assumed)
    if gpus and "vram" in bw:
        gpus = tuple(replace(g, mem_bw_gbps=bw["vram"]) for g in gpus)
    mac = platform.system() == "Darwin" and platform.machine() == "arm64"
    ram_gib = psutil.virtual_memory().total / GIB
    # An integrated CUDA/HIP GPU (DGX Spark's GB10, an APU) shares the host RAM: one pool, counted once. Beside a
    # discrete GPU it is left out (the plan places layers on discrete GPUs and host RAM).
    integrated = bool(gpus) and all(g.vram_gib == 0 for g in gpus)
    if not integrated and any(g.vram_gib == 0 for g in gpus):
        assumed.append("integrated GPU left out beside the discrete one(s): "
                       + ", ".join(g.name for g in gpus if g.vram_gib == 0))
        gpus = tuple(g for g in gpus if g.vram_gib > 0)
    # No GPU limit on a one-pool machine: homerun runs its plans on the host CPU (homerun.plan.one_pool.pool_limit),
    # which fill RAM less the host reserve; a wired/GTT limit (iogpu.wired_limit_mb) bounds only what a GPU maps.
    memory = MemorySpec(unified=True) if mac or integrated else MemorySpec()
    if mac:
        assumed.append("Apple GPU not used: homerun runs unified-memory plans on the CPU, so they may fill RAM less "
                       "the host reserve and the GPU's wired limit (iogpu.wired_limit_mb) is neither read nor applied")
        gpus = (GpuSpec(name="Apple GPU", vram_gib=0, mem_bw_gbps=dram, h2d_gbps=0),)
    elif integrated:
        assumed.append(f"{gpus[0].name} is integrated: its memory is the host RAM (one pool, counted once); homerun "
                       "runs one-pool plans on the CPU, within RAM less the host reserve")
    one_pool = mac or integrated
    cpu = CpuSpec(name=platform.processor() or platform.machine(), cores=psutil.cpu_count(logical=False) or 1,
                  ram_gib=ram_gib, mem_bw_gbps=dram, flags=flags)
    policy = PolicySpec(reserve_vram_gib=3.0 if gpus and not one_pool else 0.0,
                        pinned_staging_gib=2.0 if gpus and not one_pool else 0.0)
    prof = HardwareProfile(name="auto", description=f"detected on {platform.node() or 'this machine'}", cpu=cpu,
                           gpus=gpus, memory=memory, policy=policy, source="auto")
    det = Detection(dram_read_gbps=dram, h2d_gbps=h2d, gpus=tuple(g.name for g in gpus), cpu_flags=flags,
                    assumed=tuple(assumed), seconds=time.perf_counter() - t0, cpu_peak_gops=peaks)
    return prof, det


PEAK_UNITS = ("int8", "bf16", "fp32")
PEAK_ROUNDS = 4  # measurements of every unit (each its best of 3 short runs), while within PEAK_BUDGET_S
PEAK_BUDGET_S = 0.6
PEAK_GAP_S = 0.05  # between rounds, so that one neighbour's burst does not cover them all


def best_peaks(*measured: dict[str, Any] | None) -> dict[str, Any] | None:
    """Each unit's largest peak over the measurements (a busy neighbour only ever lowers a peak; None ones are
    skipped); the first measurement itself when the others raised none, so that callers can tell nothing changed."""
    got = [m for m in measured if m]
    if not got:
        return None
    best = {u: max((v for v in (m.get(u) for m in got) if v), default=None) for u in PEAK_UNITS}
    if all(best[u] == got[0].get(u) for u in PEAK_UNITS):
        return got[0]
    return {**got[0], **best}


def measure_cpu_peaks(rounds: int = PEAK_ROUNDS, budget_s: float = PEAK_BUDGET_S,
                      gap_s: float = PEAK_GAP_S) -> dict[str, float | None] | None:
    """This CPU's int8 / bf16 / fp32 unit peaks in GOP/s over every kernel thread (homerun.kernels.cpu_gemm.unit_peak):
    each unit's best over up to `rounds` measurements (each the best of 3 runs of a few ms), a new round started
    only while less than `budget_s` has passed; None without the native kernels. A loaded host reads low: two threads
    sharing cores with a neighbour read about one core's worth, and the best of a few rounds catches a quieter one."""
    t0 = time.perf_counter()
    peaks = _measure_cpu_peaks_once()
    for _ in range(max(1, rounds) - 1):
        if peaks is None or time.perf_counter() - t0 + gap_s >= budget_s:
            break
        time.sleep(gap_s)
        peaks = best_peaks(peaks, _measure_cpu_peaks_once())
    return peaks


def _measure_cpu_peaks_once() -> dict[str, float | None] | None:
    from homerun.kernels import cpu_gemm

    if not cpu_gemm.available():
        return None
    from homerun.kernels.prefill_bench import unit_peaks

    peaks = unit_peaks(reps=3)
    return peaks if peaks.get("int8") or peaks.get("fp32") else None


MEASURED_PEAKS_SOURCE = (f"measured on this machine (cpu_gemm.unit_peak, all kernel threads, each unit's best of up "
                         f"to {PEAK_ROUNDS} rounds in {PEAK_BUDGET_S:g} s)")


def cpu_peaks_option(det: Detection | None) -> dict[str, Any] | None:
    """`PlanOptions.cpu_peaks` from a detection's measured unit peaks (None when none were measured)."""
    if det is None or not det.cpu_peak_gops:
        return None
    return {**det.cpu_peak_gops, "source": MEASURED_PEAKS_SOURCE}
