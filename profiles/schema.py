"""The HardwareProfile record and its validation from a TOML-shaped dict.

A profile holds numbers and enum strings only. Validation rejects unknown keys and wrong types with a
`ProfileError` (exit 2) that names the key, e.g. `gpus[0].vram_gb`. Loading files lives in `profiles/__init__.py`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from homerun.errors import ProfileError

GIB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    name: str
    vram_gib: float
    mem_bw_gbps: float  # device-memory bandwidth
    h2d_gbps: float  # pinned host-to-device copy bandwidth (measured where cited); 0 for unified memory
    count: int = 1
    tflops_bf16: float | None = None  # dense BF16 tensor throughput; prefill compute bound
    fp8: bool = False
    fp4: bool = False


@dataclass(frozen=True)
class CpuSpec:
    name: str
    cores: int
    ram_gib: float
    mem_bw_gbps: float  # sustained read bandwidth to expect (not the theoretical channel figure)
    mem_bw_theoretical_gbps: float | None = None
    flags: tuple[str, ...] = ()  # avx2, avx512f, amx, neon ...
    numa_nodes: int = 1  # NUMA nodes (sockets, or NPS/SNC domains) sharing mem_bw_gbps; > 1 lowers the CPU-expert
    #   estimate to mem_bw_gbps / numa_nodes for a NUMA-unaware runtime (the bound keeps the full figure)
    clock_ghz: float | None = None  # all-core clock under sustained vector load; with cores and flags it gives the
    #   CPU's compute peaks (homerun.plan.compute.cpu_unit_peaks); None: no CPU prefill estimate
    fp32_flops_per_cycle: float | None = None  # per core, when the core differs from its SIMD path's usual figure
    #   (Zen 4 runs AVX-512 on 256-bit units: 32, not 64)


@dataclass(frozen=True)
class MemorySpec:
    unified: bool = False  # CPU and GPU share one pool (Apple, Strix Halo, DGX Spark)
    gpu_limit_gib: float | None = None  # unified: how much of the pool the GPU may use (Mac wired limit, GTT)


@dataclass(frozen=True)
class DiskSpec:
    read_gbps: float = 3.0  # sequential read of the disk an mmap tier would page from


@dataclass(frozen=True)
class PolicySpec:
    reserve_vram_gib: float = 3.0  # per GPU, never allocated (driver, fragmentation, other apps)
    host_reserve_gib: float = 8.0  # host RAM left to the OS and other processes
    pinned_staging_gib: float = 2.0  # pinned host buffers for H2D expert copies
    runtime_overhead_gib: float = 1.0  # per GPU: CUDA context, allocator slack, kernels


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    description: str
    cpu: CpuSpec
    gpus: tuple[GpuSpec, ...] = ()
    memory: MemorySpec = field(default_factory=MemorySpec)
    disk: DiskSpec = field(default_factory=DiskSpec)
    policy: PolicySpec = field(default_factory=PolicySpec)
    source: str = ""  # "builtin:<file>", a path, or "auto"
    schema_version: int = 1

    @property
    def gpu_list(self) -> tuple[GpuSpec, ...]:
        """One entry per physical GPU (`count` expanded)."""
        return tuple(g for g in self.gpus for _ in range(g.count))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_TABLES = {"cpu": CpuSpec, "memory": MemorySpec, "disk": DiskSpec, "policy": PolicySpec}


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check one TOML value against a field type (ints are accepted for floats, never bools for numbers)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ProfileError:
                pass
        raise _wrong_type(key, tp, value, source)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise _wrong_type(key, tp, value, source)
        return tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise _wrong_type(key, tp, value, source)


def _wrong_type(key: str, tp: Any, value: Any, source: str) -> ProfileError:
    if typing.get_origin(tp) is tuple:
        want = "list of strings"
    else:
        want = _type_name(tp)
    return ProfileError(f"{source}: key '{key}' must be a {want}, got {value!r}",
                        hint="see `homerun profiles <name>` for a valid profile")


def _build(cls: type, data: Any, prefix: str, source: str) -> Any:
    if not isinstance(data, Mapping):
        raise ProfileError(f"{source}: '{prefix}' must be a table", hint="see `homerun profiles <name>`")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ProfileError(f"{source}: unknown key '{prefix}.{key}'",
                               hint=f"known keys in [{prefix.split('[')[0]}]: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{prefix}.{name}", source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise ProfileError(f"{source}: required key '{prefix}.{name}' is missing", hint="see `homerun profiles <name>`")
    return cls(**kwargs)


def profile_from_dict(data: Mapping[str, Any], source: str) -> HardwareProfile:
    """Validate a parsed TOML document into a HardwareProfile; errors name the offending key."""
    allowed = {"schema_version", "name", "description", "gpus", *_TABLES}
    for key in data:
        if key not in allowed:
            raise ProfileError(f"{source}: unknown key '{key}'", hint=f"top-level keys: {', '.join(sorted(allowed))}")
    for key in ("name", "cpu"):
        if key not in data:
            raise ProfileError(f"{source}: required key '{key}' is missing", hint="see `homerun profiles <name>`")
    name = _coerce(data["name"], str, "name", source)
    desc = _coerce(data.get("description", ""), str, "description", source)
    version = _coerce(data.get("schema_version", 1), int, "schema_version", source)
    if version != 1:
        raise ProfileError(f"{source}: schema_version {version} is not supported (expected 1)", hint="upgrade homerun")
    gpus_raw = data.get("gpus", [])
    if not isinstance(gpus_raw, list):
        raise ProfileError(f"{source}: 'gpus' must be an array of tables ([[gpus]])", hint="see `homerun profiles <name>`")
    gpus = tuple(_build(GpuSpec, g, f"gpus[{i}]", source) for i, g in enumerate(gpus_raw))
    tables = {k: _build(cls, data[k], k, source) for k, cls in _TABLES.items() if k in data}
    profile = HardwareProfile(name=name, description=desc, gpus=gpus, source=source, schema_version=version, **tables)
    _check_values(profile, source)
    return profile


def _check_values(p: HardwareProfile, source: str) -> None:
    def positive(key: str, v: float | None) -> None:
        if v is not None and v <= 0:
            raise ProfileError(f"{source}: key '{key}' must be > 0, got {v}", hint="use the measured or spec figure")

    positive("cpu.ram_gib", p.cpu.ram_gib)
    positive("cpu.mem_bw_gbps", p.cpu.mem_bw_gbps)
    positive("cpu.cores", p.cpu.cores)
    positive("cpu.numa_nodes", p.cpu.numa_nodes)
    positive("cpu.clock_ghz", p.cpu.clock_ghz)
    positive("cpu.fp32_flops_per_cycle", p.cpu.fp32_flops_per_cycle)
    for i, g in enumerate(p.gpus):
        positive(f"gpus[{i}].mem_bw_gbps", g.mem_bw_gbps)
        positive(f"gpus[{i}].count", g.count)
        if not p.memory.unified:
            positive(f"gpus[{i}].vram_gib", g.vram_gib)
            positive(f"gpus[{i}].h2d_gbps", g.h2d_gbps)
    if p.memory.unified and p.memory.gpu_limit_gib is not None and p.memory.gpu_limit_gib > p.cpu.ram_gib:
        raise ProfileError(f"{source}: key 'memory.gpu_limit_gib' exceeds cpu.ram_gib", hint="the GPU limit is part of RAM")
