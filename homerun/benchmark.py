"""llama-bench-style model benchmarks: pp/tg tests at a context depth, avg ± sd over repetitions after a warm-up,
cold and warm expert-cache numbers reported separately, and the physics in every record (bytes per second over
each link against the machine's measured limits, expert hit rate, the plan's prediction as a ratio).

Timings exclude tokenization and sampling (as llama-bench's do): tests feed deterministic synthetic token ids
straight into a session. This module does no printing; `homerun.commands.bench` renders the records.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import torch

# Fields llama-bench emits, in its order; our records reuse these names where they exist.
LLAMA_BENCH_FIELDS = (
    "build_commit", "cpu_info", "gpu_info", "backends", "model_type", "model_size", "model_n_params",
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


def build_tests(prompts: Sequence[int], gens: Sequence[int], depths: Sequence[int]) -> list[BenchTest]:
    """The Cartesian product llama-bench runs: every pp and every tg test at every depth (0 means none)."""
    tests = []
    for d in depths or [0]:
        tests += [BenchTest(p, 0, d) for p in prompts if p > 0]
        tests += [BenchTest(0, g, d) for g in gens if g > 0]
    return tests


class CountingBackend:
    """Wraps an ExpertBackend and counts what each call touches: unique experts per layer call and their packed
    bytes (the bytes a decode step must read), by composition, without changing the wrapped backend."""

    def __init__(self, inner: Any, bytes_per_expert: int):
        self.inner = inner
        self.bytes_per_expert = bytes_per_expert
        self.reset_counts()

    def reset_counts(self) -> None:
        self.calls = 0
        self.expert_loads = 0
        self.expert_bytes = 0

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        n_unique = int(torch.unique(expert_ids).numel())
        self.calls += 1
        self.expert_loads += n_unique
        self.expert_bytes += n_unique * self.bytes_per_expert
        return self.inner.forward(layer, x, expert_ids, expert_weights)

    def stats(self) -> Any:
        return self.inner.stats() if hasattr(self.inner, "stats") else None

    def __getattr__(self, name: str) -> Any:  # cache controls (reset, policy) pass through
        return getattr(self.inner, name)


@dataclass
class LinkUse:
    bytes: float
    gbps: float
    limit_gbps: float | None
    ratio: float | None


@dataclass
class BenchRecord:
    test: str
    cache: str  # "cold" (first pass after a cache reset) or "warm" (after the warm-up)
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
    profile: str
    gpu_experts: int
    hit_rate: float | None
    links: dict[str, LinkUse]
    predicted_ts: float | None = None
    prediction_ratio: float | None = None
    extrapolated: bool = False
    extrapolated_from_layers: int | None = None
    correctness: dict[str, Any] = field(default_factory=dict)
    build_commit: str = ""
    cpu_info: str = ""
    gpu_info: str = ""
    backends: str = ""
    kernel_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} threads)"


def gpu_info() -> str:
    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "none"


def synthetic_ids(n: int, vocab: int, seed: int) -> list[int]:
    """Deterministic token ids, avoiding the low ids where special tokens live, so A/B runs route identically."""
    g = torch.Generator().manual_seed(seed)
    lo = min(256, vocab // 4)
    return torch.randint(lo, vocab, (n,), generator=g).tolist()


def _time_test(model: Any, test: BenchTest, seed: int) -> float:
    """One repetition: fill the context to the test's depth (untimed), then time pp (one feed of n_prompt tokens)
    or tg (n_gen feeds of one token). Returns seconds."""
    vocab = model.args.vocab_size
    sess = model.session()
    if test.n_depth:
        sess.feed(synthetic_ids(test.n_depth, vocab, seed + 1))
    ids = synthetic_ids(test.n_tokens, vocab, seed + 2)
    t0 = time.perf_counter()
    if test.n_prompt:
        sess.feed(ids)
    else:
        for t in ids:
            sess.feed([t])
    return time.perf_counter() - t0


def _backend_counters(model: Any) -> tuple[int, int, int]:
    """(hits, misses, bytes moved over PCIe/streaming) from the expert backend, zeros if it keeps none."""
    backend = model.net.experts
    stats = backend.stats() if hasattr(backend, "stats") else None
    if stats is None:
        return 0, 0, 0
    d = stats.to_dict() if hasattr(stats, "to_dict") else dict(stats)
    tot = d.get("total", d)
    return int(tot.get("hits", 0)), int(tot.get("misses", 0)), int(tot.get("bytes_moved", 0))


def _reset_cache(model: Any) -> bool:
    backend = model.net.experts
    for name in ("reset_cache", "reset"):
        fn = getattr(backend, name, None) if not isinstance(backend, CountingBackend) else getattr(backend.inner, name, None)
        if callable(fn):
            fn()
            return True
    return False


@dataclass(frozen=True)
class Limits:
    """The machine's measured limits in GB/s (None where not measured)."""

    dram_read_gbps: float | None = None
    h2d_gbps: float | None = None
    vram_gbps: float | None = None


def run_test(
    model: Any, counter: CountingBackend, test: BenchTest, *, repetitions: int, seed: int, limits: Limits,
    common: dict[str, Any], on_sample: Callable[[str, int], None] | None = None,
) -> list[BenchRecord]:
    """Cold record (first pass after a cache reset, when the backend has a cache) then the warm record."""
    records = []
    phases = [("cold", 1, False), ("warm", repetitions, True)] if _reset_cache(model) else [("warm", repetitions, True)]
    for cache, reps, warmup in phases:
        if cache == "cold":
            _reset_cache(model)
        elif warmup:
            _time_test(model, test, seed)
        counter.reset_counts()
        h0, m0, b0 = _backend_counters(model)
        samples = []
        for r in range(reps):
            samples.append(_time_test(model, test, seed))
            if on_sample:
                on_sample(test.name, r)
        h1, m1, b1 = _backend_counters(model)
        records.append(_record(model, counter, test, cache, samples, limits, common, (h1 - h0, m1 - m0, b1 - b0)))
    return records


def _record(model, counter, test, cache, samples, limits, common, deltas) -> BenchRecord:
    hits, misses, moved = deltas
    n = test.n_tokens
    ns = [int(s * 1e9) for s in samples]
    ts = [n / s for s in samples]
    total_s = sum(samples)
    # Bytes each token reads: all non-expert weights except the embedding table (one row), plus the experts the
    # routers picked (counted by the wrapper, deduplicated per layer call as a batched kernel would read them).
    resident = model.net.resident_bytes() - model.net.embed.numel() * model.net.embed.element_size()
    n_calls_fed = len(samples) * (1 if test.n_prompt else n)
    on_gpu = model.device.type == "cuda"
    expert_bytes = counter.expert_bytes
    hit_frac = hits / (hits + misses) if hits + misses else (1.0 if on_gpu else 0.0)
    # Hits are read from VRAM; misses are either streamed over PCIe (counted by the backend) or computed on the
    # CPU from DRAM; everything else (non-expert weights) lives where the model's device is.
    miss_bytes = expert_bytes * (1 - hit_frac)
    cpu_expert_bytes = max(miss_bytes - moved, 0.0)
    links = {"dram": _link((0 if on_gpu else resident * n_calls_fed) + (cpu_expert_bytes if on_gpu else expert_bytes),
                           total_s, limits.dram_read_gbps)}
    if on_gpu:
        links["vram"] = _link(resident * n_calls_fed + expert_bytes * hit_frac, total_s, limits.vram_gbps)
        links["pcie"] = _link(moved, total_s, limits.h2d_gbps)
    return BenchRecord(
        test=test.name, cache=cache, n_prompt=test.n_prompt, n_gen=test.n_gen, n_depth=test.n_depth,
        samples_ns=ns, samples_ts=ts, avg_ns=int(statistics.fmean(ns)),
        stddev_ns=int(statistics.stdev(ns)) if len(ns) > 1 else 0,
        avg_ts=statistics.fmean(ts), stddev_ts=statistics.stdev(ts) if len(ts) > 1 else 0.0,
        test_time=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        hit_rate=(hits / (hits + misses)) if hits + misses else None, links=links, **common,
    )


def _link(nbytes: float, seconds: float, limit: float | None) -> LinkUse:
    gbps = nbytes / seconds / 1e9 if seconds > 0 else 0.0
    return LinkUse(bytes=nbytes, gbps=gbps, limit_gbps=limit, ratio=(gbps / limit) if limit else None)


def correctness_gate(model: Any, reference_logits: Callable[[list[int]], torch.Tensor], *, n_tokens: int = 24,
                     tol: float = 1e-3) -> dict[str, Any]:
    """Run a fixed prompt through the benchmarked path and through the plain fp32 reference path; compare logits.
    A fast wrong build must not pass as a fast build: the caller flags `ok: false` loudly."""
    ids = synthetic_ids(n_tokens, model.args.vocab_size, seed=1234)
    got = model.logits(ids)
    ref = reference_logits(ids)
    scale = float(ref.abs().max()) or 1.0
    err = float((got - ref).abs().max()) / scale
    same_argmax = bool(torch.equal(got.argmax(-1), ref.argmax(-1)))
    return {"ok": bool(err <= tol), "max_rel_err": err, "tol": tol, "argmax_equal": same_argmax,
            "prompt_tokens": n_tokens}
