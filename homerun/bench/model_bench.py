"""llama-bench-style model benchmarks: pp/tg tests at a context depth, avg ± sd over repetitions after a warm-up,
cold and warm expert-cache numbers reported separately, and the physics in every record (bytes per second over
each link against the machine's measured limits, expert hit rate, the plan's prediction as a ratio), plus the
correctness gate (the benchmarked path's logits against the plain fp32 reference path on a fixed prompt).

Timings exclude tokenization and sampling (as llama-bench's do): tests feed deterministic synthetic token ids
straight into a session; filling the context to the test's depth is not timed. This module does no printing;
`homerun.bench.run.bench_model` runs them over a checkpoint; `homerun.cli.commands.bench` renders the records. Timing never decides pass/fail; only the correctness gate does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from homerun.bench.records import BenchRecord, BenchTest, RunInfo, Sample, links_for, make_record
from offload.base import WrappingBackend

GATE_PROMPT_TOKENS = 16
GATE_SEED = 1234
# Relative max-abs logit error allowed against the fp32 reference: fp32 paths differ only in summation order;
# bf16/fp16 compute rounds activations (the style guide's bf16 tolerance is 3e-2).
GATE_TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
# int8 expert activations (the kernels' default mode) round each expert input to 1/127 of its 32-block's max: about
# 5e-3 per matmul, 5e-3 to 1e-2 on logits; a wrong build (bad scales, swapped nibbles) is off by far more.
GATE_TOL_INT8 = 3e-2
# The reference dequantizes non-expert FP8 weights to fp32 at load only when that stays small.
REFERENCE_FP32_MAX_BYTES = 512 * 2**20


# ------------------------------------------------------------------------------------------------------- tests


def build_tests(prompts: Sequence[int], gens: Sequence[int], depths: Sequence[int]) -> list[BenchTest]:
    """The product llama-bench runs: every pp and every tg test at every depth (0 means none)."""
    tests = []
    for d in depths or [0]:
        tests += [BenchTest(p, 0, d) for p in prompts if p > 0]
        tests += [BenchTest(0, g, d) for g in gens if g > 0]
    return tests


def synthetic_ids(n: int, vocab: int, seed: int) -> list[int]:
    """Deterministic token ids, avoiding the low ids where special tokens live, so A/B runs route identically."""
    g = torch.Generator().manual_seed(seed)
    lo = min(256, vocab // 4)
    return torch.randint(lo, vocab, (n,), generator=g).tolist()


# ---------------------------------------------------------------------------------------------- instrumentation


class CountingBackend(WrappingBackend):
    """Wraps an ExpertBackend and counts what each call touches: unique experts per layer call and their packed
    bytes (the bytes a call must read), by composition, without changing the wrapped backend."""

    def __init__(self, inner: Any, bytes_per_expert: int):
        super().__init__(inner)
        self.bytes_per_expert = bytes_per_expert
        self.calls = 0
        self._loads = 0
        self._pending: list[torch.Tensor] = []  # ids of calls not counted yet: counted when read, off the timed path

    @property
    def expert_loads(self) -> int:
        """Unique experts summed over the calls so far."""
        if self._pending:
            self._loads += sum(int(torch.unique(ids).numel()) for ids in self._pending)
            self._pending.clear()
        return self._loads

    @property
    def expert_bytes(self) -> int:
        return self.expert_loads * self.bytes_per_expert

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self._pending.append(expert_ids)  # a torch.unique per call (~65 us) would be timed with the decode step
        return self.inner.forward(layer, x, expert_ids, expert_weights)


def cache_counters(backend: Any) -> tuple[int, int, int]:
    """(hits, misses, bytes moved into the cache) from an expert backend's stats; zeros when it has no cache."""
    try:
        return backend.stats().cache_totals()
    except Exception:  # noqa: BLE001 - a backend's stats must never break a benchmark
        return 0, 0, 0


def _test_tokens(model: Any, test: BenchTest, seed: int) -> tuple[Any, list[int]]:
    """A fresh session filled to the test's depth (untimed), and the ids of the test's timed part: the same in every
    repetition, so every repetition routes alike."""
    vocab = model.args.vocab_size
    sess = model.session()
    if test.n_depth:
        sess.feed(synthetic_ids(test.n_depth, vocab, seed + 1))
    return sess, synthetic_ids(test.n_tokens, vocab, seed + 2)


def _feed_test(sess: Any, test: BenchTest, ids: list[int]) -> None:
    """pp: one feed of the prompt; tg: one feed per token."""
    if test.n_prompt:
        sess.feed(ids)
    else:
        for t in ids:
            sess.feed([t])


def time_test(model: Any, backend: Any, test: BenchTest, seed: int) -> Sample:
    """One repetition: fill the context to the test's depth (untimed), then time pp (one feed of n_prompt tokens)
    or tg (n_gen feeds of one token each), through the model's own expert backend (no wrapper: decode replays the
    graphs captured for that backend, as in use). Expert bytes are left 0: `count_expert_loads` fills them."""
    sess, ids = _test_tokens(model, test, seed)
    h0, m0, b0 = cache_counters(backend)
    t0, c0 = time.perf_counter(), time.process_time()
    _feed_test(sess, test, ids)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    h1, m1, b1 = cache_counters(backend)
    passes = math.ceil(len(ids) / model.max_chunk_tokens) if test.n_prompt else len(ids)
    return Sample(seconds, 0, h1 - h0, m1 - m0, b1 - b0, passes, cpu_seconds)


def count_expert_loads(model: Any, backend: Any, bytes_per_expert: int, test: BenchTest, seed: int) -> int:
    """Unique experts summed over the layer calls of one repetition's timed part, from an untimed pass of the same
    tokens through a CountingBackend around `backend` (the same in every repetition). The timed passes carry no
    wrapper: the decode graphs serve only the backend they were captured for, so a wrapper runs decode eagerly."""
    counter = CountingBackend(backend, bytes_per_expert)
    with model.experts_wrapped(counter):
        sess, ids = _test_tokens(model, test, seed)
        loads0 = counter.expert_loads
        _feed_test(sess, test, ids)
        return counter.expert_loads - loads0


# ------------------------------------------------------------------------------------------------------ records


def gpu_path(model: Any) -> bool:
    """Whether the model runs the GPU code path somewhere (a CUDA device, or a CUDA stand-in)."""
    kinds = {d.kind for d in (model.devices or {}).values()}
    return model.device.type == "cuda" or bool(kinds & {"cuda", "cuda-standin"})


def event_waits(model: Any) -> int:
    """Host waits on device events so far, summed over every `event_waits` counter in the expert backend's stats (one
    per GPU stage)."""

    def walk(node: Any) -> int:
        if isinstance(node, dict):
            return sum(int(v) if k == "event_waits" and isinstance(v, (int, float)) else walk(v)
                       for k, v in node.items())
        if isinstance(node, (list, tuple)):
            return sum(walk(v) for v in node)
        return 0

    return walk(model.stats().get("experts", {}))


def gpu_costs(model: Any, seed: int, planned: Sequence[int] = ()) -> dict[str, Any]:
    """The device work of one steady decode token (after a short untimed prefix and one untimed decode step, which
    captures the decode graphs where they are used), how decode ran, and each placed device's peak bytes vs the
    plan."""
    from homerun.kernels.counting import count_device_work

    sess = model.session()
    vocab = model.args.vocab_size
    sess.feed(synthetic_ids(4, vocab, seed + 3))
    sess.feed(synthetic_ids(1, vocab, seed + 5))
    tok = synthetic_ids(1, vocab, seed + 4)
    waits_before = event_waits(model)
    with count_device_work() as counter:
        sess.feed(tok)
    # On CUDA an event wait blocks the host like .item(): the fused hybrid path's waits count as host syncs.
    waits = event_waits(model) - waits_before
    devices = []
    gpus = [u for u in model.device_usage() if u["kind"] in ("cuda", "cuda-standin")] if model.devices else []
    for i, u in enumerate(gpus):
        devices.append({"name": u["name"], "kind": u["kind"], "peak_device_bytes": u["peak_bytes"],
                        "planned_device_bytes": planned[i] if i < len(planned) else None})
    return {"launches_per_token": float(counter.c.device_launches),
            "host_syncs_per_token": float(counter.c.syncs + waits),
            "graph_replays_per_token": float(counter.c.graphs),
            "decode_runner": decode_runner(model),
            "devices": tuple(devices)}


def decode_runner(model: Any) -> str:
    """How one-token decode runs: "graphs (<why>)" when replayed from captured graphs, else "eager (<why>)"."""
    dg = model.decode_graphs
    if dg is not None and dg.captured:
        return f"graphs ({model.decode_graphs_reason})"
    return f"eager ({model.decode_graphs_reason})"


# ----------------------------------------------------------------------------------------------------- running


@dataclass
class BenchTarget:
    """A loaded model plus how to give it a fresh expert backend (a cold cache) and what that backend is."""

    model: Any
    make_backend: Callable[[], Any]
    bytes_per_expert: int
    has_cache: bool
    backend: Any = None  # the expert backend the model serves from (no wrapper)
    act: str = "fp32"  # the expert activation mode that runs (int8/bf16 widen the correctness gate's tolerance)

    def fresh_backend(self) -> Any:
        old = self.backend
        self.backend = self.make_backend()
        self.model.set_expert_backend(self.backend)
        if old is not None and old is not self.backend:
            old.close()
        return self.backend


def run_test(target: BenchTarget, test: BenchTest, *, repetitions: int, seed: int, info: RunInfo,
             predicted_ts: float | None, host: dict[str, Any],
             on_sample: Callable[[str, str, int], None] | None = None) -> list[BenchRecord]:
    """With a cache: a cold record (first pass after a fresh cache), then the warm record (after a warm-up);
    without one, only the warm record."""
    model = target.model
    resident = model.net.resident_bytes() - model.net.embed.numel() * model.net.embed.element_size()
    on_gpu = model.device.type == "cuda"
    phases = [("cold", 1), ("warm", repetitions)] if target.has_cache else [("warm", repetitions)]
    runs: list[tuple[str, list[Sample]]] = []
    loads = None
    for cache, reps in phases:
        if cache == "cold":
            target.fresh_backend()
        else:
            time_test(model, target.backend, test, seed)  # warm-up: caches, page cache, allocator, graph capture
            loads = count_expert_loads(model, target.backend, target.bytes_per_expert, test, seed)
        samples = []
        for r in range(reps):
            samples.append(time_test(model, target.backend, test, seed))
            if on_sample is not None:
                on_sample(test.name, cache, r)
        runs.append((cache, samples))
    records = []
    for cache, samples in runs:  # the cold pass ran before the counting pass: every sample gets its count now
        samples = [replace(s, expert_bytes=loads * target.bytes_per_expert) for s in samples]
        links, hit = links_for(samples, resident_bytes=resident, on_gpu=on_gpu, has_cache=target.has_cache,
                               bytes_per_expert=target.bytes_per_expert, limits=info.limits)
        records.append(make_record(info, test, cache, samples, links, hit, predicted_ts, host))
    if test.n_prompt:
        dense_fl, expert_fl = linear_flops_split(model.net)
        peaks = unit_peaks()
        units = prefill_units(model, target.act)
        peak = combined_peak(dense_fl, expert_fl, units, peaks)
        records = [replace(r, gflops=(dense_fl + expert_fl) * r.avg_ts / 1e9, peak_gops=peaks, units=units,
                           peak_gflops=peak, peak_ratio=None if not peak else (dense_fl + expert_fl) * r.avg_ts / 1e9 / peak)
                   for r in records]
    if gpu_path(model):
        costs = gpu_costs(model, seed, info.planned_device_bytes)
        records = [replace(r, **costs) for r in records]
    return records


def linear_flops_per_token(net: Any) -> float:
    """2 x the multiply-adds of one prompt token through the model's linear layers: every dense matrix of every
    layer (attention, compressors, indexer, router, shared expert) plus its top-k routed experts (the lm head runs for
    the last token only and is left out)."""
    return sum(linear_flops_split(net))


def linear_flops_split(net: Any) -> tuple[float, float]:
    """linear_flops_per_token as (dense matrices, routed experts): they run on different units."""
    from homerun.models.layers import QLinear

    seen: set[int] = set()
    macs = 0

    def walk(obj: Any) -> None:
        nonlocal macs
        if isinstance(obj, QLinear):
            if id(obj) not in seen:
                seen.add(id(obj))
                macs += obj.out_features * obj.in_features
        elif hasattr(obj, "__dataclass_fields__") and not isinstance(obj, torch.Tensor):
            for v in vars(obj).values():
                walk(v)

    for layer in net.layers:
        walk(layer.attn)
        walk(layer.moe)
    a = net.args
    return 2.0 * macs, 2.0 * len(net.layers) * a.n_activated_experts * 3 * a.dim * a.moe_inter_dim


def prefill_units(model: Any, act: str) -> dict[str, str] | None:
    """The CPU units a prompt's linears run on: {"dense": "fp32" | "bf16", "experts": "int8" | "bf16" | "fp32"}
    (homerun.kernels.dispatch: bf16 dense GEMMs only in a fast expert mode on a CPU with bf16 units, or with a bf16
    compute dtype); None off the CPU."""
    if model.device.type != "cpu":
        return None
    from homerun.kernels import cpu_gemm
    from homerun.kernels.dispatch import FAST_ACTS

    fast = act in FAST_ACTS and cpu_gemm.available() and cpu_gemm.bf16_units()
    dense = "bf16" if fast or getattr(model, "dtype", torch.float32) == torch.bfloat16 else "fp32"
    return {"dense": dense, "experts": act if act in ("int8", "bf16") else "fp32"}


def combined_peak(dense_flops: float, expert_flops: float, units: dict[str, str] | None,
                  peaks: dict[str, float | None]) -> float | None:
    """GFLOP/s a prompt token would reach with every linear at its unit's measured peak: the flops over the sum of
    each part's time at its peak (None where a unit's peak is not measured)."""
    if units is None:
        return None
    pd, pe = peaks.get(units["dense"]), peaks.get(units["experts"])
    if not pd or not pe:
        return None
    return (dense_flops + expert_flops) / (dense_flops / pd + expert_flops / pe)


_PEAKS: dict[str, float | None] = {}


def unit_peaks() -> dict[str, float | None]:
    """The CPU's measured int8 / bf16 / fp32 unit peaks in GOP/s over every kernel thread (best of 3 short runs),
    measured once per process."""
    if not _PEAKS:
        from homerun.kernels.prefill_bench import unit_peaks as measure

        _PEAKS.update(measure(reps=3))
    return dict(_PEAKS)


# ---------------------------------------------------------------------------------------------- correctness gate


def correctness_gate(model: Any, reference: Any, *, n_tokens: int = GATE_PROMPT_TOKENS, tol: float | None = None,
                     reference_label: str = "", act: str = "fp32") -> dict[str, Any]:
    """Logits of the benchmarked path vs the plain fp32 reference path (`reference`: a loaded Model, or a
    callable ids -> logits) on a fixed prompt. `ok: false` must be flagged loudly by the caller."""
    ids = synthetic_ids(n_tokens, model.args.vocab_size, seed=GATE_SEED)
    got = model.logits(ids).float()
    ref = (reference.logits(ids) if hasattr(reference, "logits") else reference(ids)).float()
    if tol is None:
        quantized = act in ("int8", "bf16") and model.dtype == torch.float32
        tol = GATE_TOL_INT8 if quantized else GATE_TOL.get(model.dtype, 5e-2)
    finite = bool(torch.isfinite(got).all())
    scale = float(ref.abs().max()) or 1.0
    err = float((got - ref).abs().max()) / scale if finite else math.inf
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"ok": bool(finite and err <= tol), "max_rel_err": err, "tol": tol, "argmax_agreement": agree,
            "prompt_tokens": n_tokens, "reference": reference_label or "plain fp32 path"}


# --------------------------------------------------------------------------------------------------- one bench run


@dataclass(frozen=True)
class BenchOptions:
    tests: tuple[BenchTest, ...]
    repetitions: int = 5
    seed: int = 0
    kind: str = "native"  # expert backend: native | reference
    act: str = "auto"  # native kernels' activation mode: auto (the kernels' default) | fp32 | int8 | bf16
    cache_slots: tuple[int | None, ...] = (None,)  # one run per value; None = no expert cache
    dtype: str = "float32"
    gate: bool = True
    standin: bool = False  # run the profile's plan placement on CUDA stand-ins (the GPU code path on this CPU)
    cuda_graphs: str = "auto"  # decode replayed from captured graphs: auto | on | off (homerun.engine.graphs)


def load_reference(path: str | Path, *, resident_bytes: int) -> tuple[Any, str]:
    """The plain fp32 path, independent of the runtime's defaults: ReferenceExpertBackend (dequantize each selected
    expert, multiply in fp32), fp32 compute, FP8 weights dequantized once at load when small (else the same FP8
    weights dequantized per matmul). Returns (model, label)."""
    from homerun.engine.runtime import load
    from homerun.formats.loader import open_checkpoint
    from homerun.models.deepseek_v4 import ModelArgs
    from offload.base import ReferenceExpertBackend  # noqa: F811

    ckpt = open_checkpoint(Path(path))
    args = ModelArgs.from_hf_config(ckpt.config)
    backend = ReferenceExpertBackend(ckpt.expert, swiglu_limit=args.swiglu_limit, compute_dtype=torch.float32)
    wd = "fp32" if resident_bytes * 4 <= REFERENCE_FP32_MAX_BYTES else "fp8"
    ref = load(path, dtype="float32", weights_dtype=wd, device="cpu", expert_backend=backend)
    label = ("plain fp32 path: ReferenceExpertBackend, fp32 compute, FP8 weights dequantized to fp32 at load"
             if wd == "fp32" else "plain fp32 path: ReferenceExpertBackend, fp32 compute on the same FP8 weights")
    return ref, label


def reference_logits(path: str | Path, vocab_size: int, *, resident_bytes: int) -> tuple[torch.Tensor, str]:
    """Logits of the plain fp32 path on the gate's fixed prompt. The reference model is dropped before returning,
    so it never sits in RAM next to the benchmarked one."""
    ref, label = load_reference(path, resident_bytes=resident_bytes)
    logits = ref.logits(synthetic_ids(GATE_PROMPT_TOKENS, vocab_size, seed=GATE_SEED))
    del ref
    return logits, label
