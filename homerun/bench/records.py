"""What a bench run records: the tests (pp/tg at a depth), timed samples, the machine's measured limits, each link's
achieved bytes per second against them, and one llama-bench-style record per test and cache state. Data and the
arithmetic that fills it; the timing loop is in `homerun.bench.model_bench`.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, replace
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
    cpu_seconds: float = 0.0  # process CPU time of the timed part, all threads (0: not measured)


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
    # CPU time (process CPU-seconds over every thread, per repetition): on a shared host the steady figure, where wall
    # tok/s follows the neighbours' load. cpu_ts = tokens per CPU-second x n_threads: the tok/s with each thread on a
    # core of its own; cpu_cores_used = CPU-s / wall-s (how many of the cores the run got); prediction_ratio_cpu =
    # cpu_ts / predicted_ts. None where not measured.
    samples_cpu_s: list[float] = field(default_factory=list)
    cpu_s: float | None = None
    tokens_per_cpu_s: float | None = None
    cpu_ts: float | None = None
    cpu_cores_used: float | None = None
    prediction_ratio_cpu: float | None = None

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
    return with_prediction(replace(rec, links=links, limits=limits), predicted_ts)


def with_prediction(rec: "BenchRecord", predicted_ts: float | None) -> "BenchRecord":
    """The record against the plan's figure `predicted_ts`: measured / predicted on wall time and on CPU time."""
    return replace(rec, predicted_ts=predicted_ts, prediction_ratio=_ratio(rec.avg_ts, predicted_ts),
                   prediction_ratio_cpu=_ratio(rec.cpu_ts, predicted_ts))


def _ratio(measured: float | None, predicted: float | None) -> float | None:
    return measured / predicted if measured and predicted else None


def cpu_time_fields(samples: Sequence[Sample], n_tokens: int, n_threads: int) -> dict[str, Any]:
    """BenchRecord's CPU-time fields from the samples (None where a sample has no CPU time)."""
    cpu = [s.cpu_seconds for s in samples]
    if not cpu or min(cpu) <= 0:
        return {"samples_cpu_s": cpu, "cpu_s": None, "tokens_per_cpu_s": None, "cpu_ts": None, "cpu_cores_used": None}
    per_cpu_s = n_tokens * len(cpu) / sum(cpu)
    wall = sum(s.seconds for s in samples)
    return {"samples_cpu_s": cpu, "cpu_s": statistics.fmean(cpu), "tokens_per_cpu_s": per_cpu_s,
            "cpu_ts": per_cpu_s * max(n_threads, 1), "cpu_cores_used": sum(cpu) / wall if wall > 0 else None}


def make_record(info: RunInfo, test: BenchTest, cache: str, samples: Sequence[Sample], links: dict[str, LinkUse],
                hit_rate: float | None, predicted_ts: float | None, host: dict[str, Any]) -> BenchRecord:
    ns = [int(s.seconds * 1e9) for s in samples]
    ts = [test.n_tokens / s.seconds for s in samples]
    avg_ts = statistics.fmean(ts)
    cpu = cpu_time_fields(samples, test.n_tokens, int(host.get("n_threads") or 1))
    return BenchRecord(
        model=info.model, test=test.name, cache=cache, n_prompt=test.n_prompt, n_gen=test.n_gen, n_depth=test.n_depth,
        samples_ns=ns, samples_ts=ts, avg_ns=int(statistics.fmean(ns)),
        stddev_ns=int(statistics.stdev(ns)) if len(ns) > 1 else 0,
        avg_ts=avg_ts, stddev_ts=statistics.stdev(ts) if len(ts) > 1 else 0.0,
        test_time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model_type=info.model_type, model_size=info.model_size, model_n_params=info.model_n_params,
        n_layers=info.n_layers, backend=info.backend, profile=info.profile, gpu_experts=info.gpu_experts,
        expert_cache_slots=info.expert_cache_slots, hit_rate=hit_rate, links=links, predicted_ts=predicted_ts,
        prediction_ratio=_ratio(avg_ts, predicted_ts), extrapolated=False, extrapolation="",
        correctness=info.correctness, limits=info.limits, notes=info.notes, **host,
        ms_per_token=statistics.fmean(ns) / 1e6 / test.n_tokens,
        ms_per_layer=statistics.fmean(ns) / 1e6 / test.n_tokens / info.n_layers,
        **cpu, prediction_ratio_cpu=_ratio(cpu["cpu_ts"], predicted_ts),
    )
