"""What a bench run records: the tests (pp/tg at a depth), timed samples, the machine's measured limits, each link's
achieved bytes per second against them, and one llama-bench-style record per test and cache state. Data and the
arithmetic that fills it; the timing loop is in `homerun.bench.model_bench`.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any, Sequence

# Fields llama-bench emits; our records reuse these names where they exist.
LLAMA_BENCH_FIELDS = (
    "build_commit", "cpu_info", "gpu_info", "backends", "model_type", "model_size", "model_n_params", "n_threads",
    "n_prompt", "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns",
    "samples_ts",
)


@dataclass(frozen=True)
class BenchTest:
    n_prompt: int
    n_gen: int
    n_depth: int = 0

    @property
    def name(self) -> str:
        base = f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"
        return f"{base} @ d{self.n_depth}" if self.n_depth else base

    @property
    def n_tokens(self) -> int:
        return self.n_prompt or self.n_gen


@dataclass(frozen=True)
class Sample:
    seconds: float
    expert_bytes: int
    hits: int
    misses: int
    moved_bytes: int
    forward_passes: int  # chunks of the timed feeds: each reads every resident weight once


@dataclass(frozen=True)
class Limits:
    """The machine's measured limits in GB/s (None where not measured) and how they were obtained."""

    dram_read_gbps: float | None = None
    h2d_gbps: float | None = None
    vram_gbps: float | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LinkUse:
    bytes: float
    gbps: float
    limit_gbps: float | None
    ratio: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BenchRecord:
    """One row: llama-bench's fields where they exist, then homerun's physics, prediction and gate."""

    model: str
    test: str
    cache: str  # "warm" (after a warm-up), "cold" (first pass after a fresh cache) or "extrapolated"
    n_prompt: int
    n_gen: int
    n_depth: int
    samples_ns: list[int]
    samples_ts: list[float]
    avg_ns: int
    stddev_ns: int
    avg_ts: float
    stddev_ts: float
    test_time: str
    model_type: str
    model_size: int
    model_n_params: int
    n_layers: int
    backend: str
    backends: str
    profile: str
    gpu_experts: int
    expert_cache_slots: int | None
    hit_rate: float | None
    links: dict[str, LinkUse]
    predicted_ts: float | None
    prediction_ratio: float | None
    extrapolated: bool
    extrapolation: str
    correctness: dict[str, Any]
    build_commit: str
    homerun_version: str
    torch_version: str
    cpu_info: str
    gpu_info: str
    n_threads: int
    kernel_path: str
    limits: Limits
    ms_per_token: float = 0.0
    ms_per_layer: float = 0.0  # ms_per_token / n_layers: includes each layer's share of embedding and head
    notes: tuple[str, ...] = ()
    synthetic: dict[str, Any] | None = None  # --synthetic: the written model (card, layers, bytes, write time)
    # The GPU path's costs (on CUDA, or with --hw PROFILE --standin on CUDA stand-ins; None elsewhere): device work of
    # one decode token (homerun.kernels.counting: ATen ops + Triton launches, host syncs), and per device the peak
    # accounted bytes against the plan's bytes for it.
    launches_per_token: float | None = None
    host_syncs_per_token: float | None = None
    graph_replays_per_token: float | None = None  # captured graphs replayed (each counted as one launch above)
    decode_runner: str | None = None  # "graphs (<why>)" or "eager (<why>)": how one-token decode ran
    devices: tuple[dict[str, Any], ...] = ()
    # pp tests: achieved GFLOP/s of the model's linear layers (2 x multiply-adds of every dense matrix a prompt token
    # meets plus its top-k routed experts; attention scores not counted), next to the measured unit peaks (GOP/s) of
    # the CPU's int8 / bf16 / fp32 units (homerun.kernels.cpu_gemm.unit_peak; None where absent).
    gflops: float | None = None
    peak_gops: dict[str, float | None] | None = None
    # the units the prompt's linears ran on ({"dense": ..., "experts": ...}; None off the CPU), the GFLOP/s they would
    # reach at those units' peaks (flops over the sum of each part's time at its peak), and gflops / that
    units: dict[str, str] | None = None
    peak_gflops: float | None = None
    peak_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["links"] = {k: v.to_dict() for k, v in self.links.items()}
        d["limits"] = self.limits.to_dict()
        d["notes"] = list(self.notes)
        d["devices"] = [dict(x) for x in self.devices]
        return d


@dataclass(frozen=True)
class RunInfo:
    """What is benchmarked and where: the fields every record of one model/backend shares."""

    model: str
    model_type: str
    model_size: int
    model_n_params: int
    n_layers: int
    backend: str
    profile: str
    gpu_experts: int
    expert_cache_slots: int | None
    limits: Limits
    correctness: dict[str, Any]
    notes: tuple[str, ...] = ()
    planned_device_bytes: tuple[int, ...] = ()  # the plan's bytes per GPU, in placement order (with a placement)


def _link(nbytes: float, seconds: float, limit: float | None) -> LinkUse:
    gbps = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    return LinkUse(bytes=float(nbytes), gbps=gbps, limit_gbps=limit, ratio=(gbps / limit) if limit else None)


def links_for(samples: Sequence[Sample], *, resident_bytes: int, on_gpu: bool, has_cache: bool, bytes_per_expert: int,
              limits: Limits) -> tuple[dict[str, LinkUse], float | None]:
    """Bytes per second over each link for these samples, and the expert-cache hit rate (None without a cache).

    Resident (non-expert) weights are read once per forward pass from the model's memory; cache hits from the
    cache's device; misses are streamed (bytes the cache copied) or computed on the CPU from DRAM (the rest)."""
    seconds = sum(s.seconds for s in samples)
    resident = resident_bytes * sum(s.forward_passes for s in samples)
    experts = sum(s.expert_bytes for s in samples)
    hits, misses = sum(s.hits for s in samples), sum(s.misses for s in samples)
    moved = sum(s.moved_bytes for s in samples)
    hit_bytes = hits * bytes_per_expert if has_cache else 0
    cpu_expert_bytes = max(experts - hit_bytes - moved, 0) if has_cache else experts
    links = {"dram": _link((0 if on_gpu else resident) + cpu_expert_bytes, seconds, limits.dram_read_gbps)}
    if on_gpu or has_cache:
        vram_limit = limits.vram_gbps if on_gpu else limits.dram_read_gbps  # a CPU stand-in "GPU" is host RAM
        links["vram"] = _link((resident if on_gpu else 0) + hit_bytes, seconds, vram_limit)
    if has_cache:
        links["pcie"] = _link(moved, seconds, limits.h2d_gbps if on_gpu else limits.dram_read_gbps)
    hit_rate = hits / (hits + misses) if has_cache and hits + misses else None
    return links, hit_rate


def with_dram_limit(rec: "BenchRecord", dram_gbps: float, predicted_ts: float | None, source: str) -> "BenchRecord":
    """The record against a better DRAM read measurement: every link whose limit was the old DRAM figure (the
    CPU's reads, and a CPU stand-in's "VRAM"/"PCIe") gets the new one, and the prediction its new value."""
    old = rec.limits.dram_read_gbps
    links = {k: (replace(v, limit_gbps=dram_gbps, ratio=v.gbps / dram_gbps) if v.limit_gbps == old and old else v)
             for k, v in rec.links.items()}
    limits = replace(rec.limits, dram_read_gbps=dram_gbps, source=source)
    return replace(rec, links=links, limits=limits, predicted_ts=predicted_ts,
                   prediction_ratio=(rec.avg_ts / predicted_ts) if predicted_ts else None)


def make_record(info: RunInfo, test: BenchTest, cache: str, samples: Sequence[Sample], links: dict[str, LinkUse],
                hit_rate: float | None, predicted_ts: float | None, host: dict[str, Any]) -> BenchRecord:
    ns = [int(s.seconds * 1e9) for s in samples]
    ts = [test.n_tokens / s.seconds for s in samples]
    avg_ts = statistics.fmean(ts)
    return BenchRecord(
        model=info.model, test=test.name, cache=cache, n_prompt=test.n_prompt, n_gen=test.n_gen, n_depth=test.n_depth,
        samples_ns=ns, samples_ts=ts, avg_ns=int(statistics.fmean(ns)),
        stddev_ns=int(statistics.stdev(ns)) if len(ns) > 1 else 0,
        avg_ts=avg_ts, stddev_ts=statistics.stdev(ts) if len(ts) > 1 else 0.0,
        test_time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model_type=info.model_type, model_size=info.model_size, model_n_params=info.model_n_params,
        n_layers=info.n_layers, backend=info.backend, profile=info.profile, gpu_experts=info.gpu_experts,
        expert_cache_slots=info.expert_cache_slots, hit_rate=hit_rate, links=links, predicted_ts=predicted_ts,
        prediction_ratio=(avg_ts / predicted_ts) if predicted_ts else None, extrapolated=False, extrapolation="",
        correctness=info.correctness, limits=info.limits, notes=info.notes, **host,
        ms_per_token=statistics.fmean(ns) / 1e6 / test.n_tokens,
        ms_per_layer=statistics.fmean(ns) / 1e6 / test.n_tokens / info.n_layers,
    )
