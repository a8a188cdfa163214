"""`CachedExpertBackend`: the ExpertBackend that serves routed experts from a device cache over a host store.

Per call: experts resident in the cache (hits) are computed on the cache's device from the packed slot buffers;
misses go, per the miss policy, to a CPU backend (ReferenceExpertBackend, or the native CpuExpertBackend) running
on a worker thread, or are streamed into a slot and computed on the device, both paths at once. Streamed experts
are pipelined: copies for the next experts are in flight while the current one computes, never more than the
layer's evictable slots, so a 1-slot cache still works (one expert at a time). CPU-served misses are promoted into
the cache in the background when the link has room, so the cache learns at batch 1 too.
The math is exactly the reference's (same dequantization, same clamped SwiGLU, fp32 by default); only the
summation order over experts differs.
On a GPU-flavored device (CUDA, or a CUDA stand-in: `Device.kernel_flavor == "gpu"`) with FP4 experts and triton
importable, decode-sized calls take the fused kernel over the device slot table instead (offload/gpu_decode.py: no
host sync on the hit path), and prefill-sized calls stream the layer's experts through a double-buffered staging
area (offload/prefill_stream.py), so prefill leaves the decode cache's hot set alone.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping

import torch

from homerun.errors import UsageError
from homerun.formats.quant import FP4_BLOCK, FP4_LUT, e8m0_to_float
from homerun.plan.staging import STAGE_BUFFERS, STAGE_MAX_BYTES, prefill_stage_experts
from offload.base import BackendStats, ExpertBackend, ExpertWeights, swiglu_expert
from offload.cache import ExpertCache
from offload.gpu_decode import FUSED_MAX_ROWS, SPECULATE_MODES

# Bytes per prefill stage at most (two stages): a V4-Flash layer's 256 experts are ~3.4 GB, so a 32 GB card stages a
# layer in groups (40 experts of 13.4 MB); the plan reserves the same two stages (homerun.plan.staging, one size rule).
DEFAULT_STAGE_BYTES = STAGE_MAX_BYTES
from offload.miss_policy import MODES, MissPolicy, MissSplit
from offload.prefetch import Prefetcher

_PAIR_LUTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _pair_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: packed byte -> (low-nibble value, high-nibble value). E2M1 values and e8m0 scales are exact in
    fp32 and bf16, so dequantizing in `dtype` gives the same numbers as homerun.formats.quant does in fp32."""
    key = (device, dtype)
    if key not in _PAIR_LUTS:
        b = torch.arange(256)
        _PAIR_LUTS[key] = torch.stack((FP4_LUT[b & 0x0F], FP4_LUT[b >> 4]), -1).to(device, dtype)
    return _PAIR_LUTS[key]


def dequant_on_device(w: ExpertWeights, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ExpertWeights.dequant on the weights' own device: one byte-pair gather and a broadcast scale multiply
    (homerun.formats.quant keeps its table on the CPU and materializes the repeated scales)."""
    if w.fmt != "fp4":
        return w.dequant(dtype)
    lut = _pair_lut(w.w1.device, dtype)

    def deq(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out_f, half = codes.shape
        vals = lut[codes.view(torch.uint8).int()].view(out_f, half * 2 // FP4_BLOCK, FP4_BLOCK)  # (out, in/32, 32)
        return (vals * e8m0_to_float(scale).to(dtype).unsqueeze(-1)).view(out_f, half * 2)

    return deq(w.w1, w.w1_scale), deq(w.w3, w.w3_scale), deq(w.w2, w.w2_scale)


class CachedExpertBackend(ExpertBackend):
    """ExpertBackend over an ExpertCache: hits on the cache's device, misses on `cpu_backend` and/or streamed,
    as `miss_policy` splits them (no policy: stream all). Hooks for the runtime: prefetch_hash_layer,
    prefetch_speculative, stats."""

    def __init__(self, cache: ExpertCache, *, swiglu_limit: float, cpu_backend: ExpertBackend | None = None,
                 miss_policy: MissPolicy | None = None, compute_dtype: torch.dtype = torch.float32,
                 promote_cpu_misses: bool = True, pipeline_depth: int = 2, speculate: str = "auto") -> None:
        self.cache = cache
        self.swiglu_limit = swiglu_limit
        self.cpu_backend = cpu_backend
        self.miss_policy = miss_policy
        self.compute_dtype = compute_dtype
        self.promote_cpu_misses = promote_cpu_misses
        self.pipeline_depth = max(1, pipeline_depth)
        self.prefetcher = Prefetcher(cache)
        self._cpu_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="homerun-cpu-experts")
        self._cpu_experts = 0
        self._cpu_s = 0.0
        self._link_seen = (0, 0.0)
        self.fused = None  # offload.gpu_decode.FusedDecode on GPU-flavored devices
        self.prefill = None  # offload.prefill_stream.PrefillStreamer, when one is attached
        if cache.device.kernel_flavor == "gpu" and cache.store.layout.fmt == "fp4":
            from offload.gpu_decode import FusedDecode, fused_kernels

            mods = fused_kernels()
            if mods is not None:
                self.fused = FusedDecode(self, mods, speculate)

    @property
    def device(self) -> torch.device:
        return self.cache.device.torch_device

    @property
    def _speculating(self) -> bool:
        return self.fused is not None and self.fused.speculating

    @property
    def wants_speculation(self) -> bool:  # type: ignore[override]
        # a speculated token prefetches nothing: the guess would only be read on the host, a wait per layer
        return not self._speculating

    def guesses_layer(self, layer: int) -> bool:
        return True  # any exact token prefetches from a guess (wants_speculation is False only while speculating)

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                expert_weights: torch.Tensor) -> torch.Tensor:
        if self.prefill is not None and x.shape[0] > self.prefill.min_rows:
            return self.prefill.forward(layer, x, expert_ids, expert_weights)
        if self.fused is not None and x.shape[0] <= FUSED_MAX_ROWS:
            return self.fused.forward(layer, x, expert_ids, expert_weights)
        k = expert_ids.shape[1]
        flat = expert_ids.reshape(-1)  # (T*k,)
        uniq, counts = torch.unique(flat, return_counts=True)
        experts, counts_l = uniq.tolist(), counts.tolist()  # the one host sync: routing decides what to move
        # Entries grouped by expert with a stable sort, so each group's rows stay in token order (as the reference).
        groups = dict(zip(experts, torch.split(torch.argsort(flat, stable=True), counts_l)))
        self.prefetcher.observe(layer, experts)
        hits = [e for e in experts if (layer, e) in self.cache]
        plan = self._split({e: n for e, n in zip(experts, counts_l) if (layer, e) not in self.cache})
        cpu_future = self._start_cpu(layer, x, expert_weights, groups, k, plan.cpu) if plan.cpu else None
        out = torch.zeros(x.shape, dtype=self.compute_dtype, device=self.device)  # (T, D)
        self._device_part(layer, x, expert_weights, groups, k, hits + list(plan.stream), out)
        if cpu_future is not None:
            out += cpu_future.result().to(self.device)
            if self.promote_cpu_misses:
                for e in plan.cpu:
                    self.cache.prefetch((layer, e), promotion=True)
        self._feed_link_meter()
        return out.to(x.dtype)

    def _split(self, misses: dict[int, int]) -> MissSplit:
        if self.miss_policy is None:  # no cost model: every miss streams
            return MissSplit((), tuple(misses), 0.0)
        return self.miss_policy.split(misses, cpu_available=self.cpu_backend is not None)

    def _device_part(self, layer, x, expert_weights, groups, k: int, order: list[int], out: torch.Tensor) -> None:
        """Compute `order` on the device; keep up to `window` experts acquired (copies in flight) ahead."""
        if not order:
            return
        xd = x.to(self.device, self.compute_dtype)
        wts_d = expert_weights.to(self.device, self.compute_dtype).reshape(-1)  # (T*k,)
        window = max(1, min(self.cache.capacity(layer), self.pipeline_depth))
        queue: list[tuple[int, int]] = []
        nxt = 0
        while queue or nxt < len(order):
            while nxt < len(order) and len(queue) < window:
                key = (layer, order[nxt])
                self.cache.acquire(key, in_use=frozenset(queue))
                queue.append(key)
                nxt += 1
            key = queue.pop(0)
            w1, w3, w2 = dequant_on_device(self.cache.weights(key), self.compute_dtype)
            idx = groups[key[1]].to(self.device)
            rows = idx // k
            y = swiglu_expert(xd[rows], w1, w3, w2, self.swiglu_limit)  # (n, D)
            out.index_add_(0, rows, y * wts_d[idx].unsqueeze(-1))
            self.cache.release(key)

    def _start_cpu(self, layer, x, expert_weights, groups, k: int, cpu_ids: tuple[int, ...]):
        for e in cpu_ids:
            self.cache.record_miss((layer, e))
        idx = torch.cat([groups[e] for e in cpu_ids]).cpu()
        rows_cpu = idx // k
        # One (token, expert) pair per row with k=1, so the CPU backend computes exactly the CPU-assigned pairs.
        x_cpu = x.to("cpu", torch.float32)[rows_cpu]  # (n, D); CPU kernels take fp32 activations
        ids_cpu = torch.repeat_interleave(torch.tensor(cpu_ids), torch.tensor([len(groups[e]) for e in cpu_ids]))
        ids_cpu = ids_cpu.unsqueeze(-1)  # (n, 1)
        w_cpu = expert_weights.to("cpu", torch.float32).reshape(-1)[idx].unsqueeze(-1)  # (n, 1)
        n_tok = x.shape[0]

        def run() -> torch.Tensor:
            t0 = time.perf_counter()
            y = self.cpu_backend.forward(layer, x_cpu, ids_cpu, w_cpu).to(self.compute_dtype)
            seconds = time.perf_counter() - t0
            self._cpu_experts += len(cpu_ids)
            self._cpu_s += seconds
            if self.miss_policy is not None:
                self.miss_policy.observe_cpu(len(cpu_ids), len(rows_cpu), seconds)
            return torch.zeros(n_tok, x_cpu.shape[1], dtype=self.compute_dtype).index_add_(0, rows_cpu, y)  # (T, D)

        return self._cpu_pool.submit(run)

    def _feed_link_meter(self) -> None:
        if self.miss_policy is None:
            return
        s = self.cache.engine.stats()
        nbytes, secs = s.bytes_moved - self._link_seen[0], s.busy_s - self._link_seen[1]
        if nbytes > 0:
            self.miss_policy.observe_link(nbytes, secs)
            self._link_seen = (s.bytes_moved, s.busy_s)

    # --- hooks for the runtime -----------------------------------------------------------------------------
    token_stateful = True  # hits, misses and prefetches are counted per call

    def begin_token(self, n_tokens: int, speculate: bool = True) -> bool:
        """Speculate decode tokens on the fused path while its policy says so (offload/gpu_decode.py)."""
        if self.fused is None:
            return False
        prefill = self.prefill is not None and n_tokens > self.prefill.min_rows
        return self.fused.begin_token(decode=n_tokens <= FUSED_MAX_ROWS and not prefill, allowed=speculate)

    def end_token(self, redo_from: int | None = None) -> int | None:
        return self.fused.end_token(redo_from) if self.fused is not None else None

    def first_miss(self) -> int | None:
        return self.fused.first_miss() if self.fused is not None else None

    def host_synced(self) -> None:
        if self.fused is not None:
            self.fused.host_synced()

    def prefetch_hash_layer(self, layer: int, tid2eid: torch.Tensor, token_ids: torch.Tensor) -> list[int]:
        # Issued while speculating too when the ids are read on the host (no sync): a resident expert costs nothing, and
        # a missing one lands before its layer's mask (commit) instead of forcing a redo whose rerun would miss it.
        if self._speculating and not self.prefetcher.tid2eid.on_host(token_ids):
            return []  # device ids: reading them would be a host sync inside the speculated token
        if self.prefill is not None and token_ids.shape[0] > self.prefill.min_rows:
            return self.prefill.hash_layer(layer, tid2eid, token_ids)  # prefill: the decode cache stays as it is
        return self.prefetcher.hash_layer(layer, tid2eid, token_ids)

    def prefetch_speculative(self, layer: int, expert_ids: torch.Tensor) -> list[int]:
        if self._speculating:
            return []
        if self.prefill is not None and expert_ids.shape[0] > self.prefill.min_rows:
            return self.prefill.speculate(layer, expert_ids)  # prefill: stage the next layer, not the cache
        if self.fused is not None and expert_ids.shape[0] <= FUSED_MAX_ROWS:
            return self.fused.guess(layer, expert_ids)  # read behind the current layer's one wait (gpu_decode)
        return self.prefetcher.speculate(layer, expert_ids)

    def stats(self) -> BackendStats:
        mp = self.miss_policy.to_dict() if self.miss_policy is not None else {}
        gpu = {}
        if self.fused is not None:
            gpu["decode"] = self.fused.stats()
        if self.prefill is not None:
            gpu["prefill"] = self.prefill.stats()
        return BackendStats(type(self).__name__, cache=self.cache.stats(), prefetch=self.prefetcher.stats(),
                            miss_policy=mp, cpu_experts=self._cpu_experts, cpu_s=self._cpu_s,
                            store=self.cache.store.stats().to_dict(), gpu=gpu)

    def close(self) -> None:
        self._cpu_pool.shutdown(wait=True)
        if self.prefill is not None:
            self.prefill.close()
        self.cache.close()


@dataclass(frozen=True)
class CacheOptions:
    """The device expert cache: `slots` for all its layers (None: as many as the device's free budget holds) or
    `slots_per_layer`; the replacement `policy` (offload.policies; None: the default); `pinned_keys` never evicted;
    at most `max_in_flight` copies in flight."""

    slots: int | None = None
    slots_per_layer: Mapping[int, int] | None = None
    policy: str | None = None
    pinned_keys: tuple = ()
    max_in_flight: int = 4

    def __post_init__(self) -> None:
        if self.slots is not None and self.slots_per_layer is not None:
            raise UsageError("CacheOptions: slots and slots_per_layer both given", hint="give one of them")
        if self.slots is not None and self.slots < 1:
            raise UsageError(f"CacheOptions.slots must be >= 1, got {self.slots}", hint="or None to fill the budget")
        object.__setattr__(self, "pinned_keys", tuple(self.pinned_keys))


@dataclass(frozen=True)
class MissOptions:
    """How misses are served: `mode` (offload.miss_policy MODES: "auto" splits them between the CPU backend and
    streaming by cost, "cpu", "stream"); measured link and CPU bandwidths (None: the cost model's priors); how many
    streamed experts are pipelined ahead; whether decode tokens are speculated all-hit (one host wait per token
    instead of one per layer; "auto": while the measured all-hit rate pays for the redos, "always", "never")."""

    mode: str = "auto"
    link_gbps: float | None = None
    cpu_gbps: float | None = None
    pipeline_depth: int = 2
    speculate: str = "auto"  # decode tokens speculated all-hit on the fused GPU path (gpu_decode.SpeculationPolicy)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"MissOptions.mode: unknown miss mode {self.mode!r}", hint=f"use one of {', '.join(MODES)}")
        if self.speculate not in SPECULATE_MODES:
            raise UsageError(f"MissOptions.speculate: unknown mode {self.speculate!r}",
                             hint=f"use one of {', '.join(SPECULATE_MODES)}")


@dataclass(frozen=True)
class PrefillOptions:
    """Prefill streaming on a GPU-flavored device with FP4 experts: `stream` (None: on there), two stages of
    `stage_experts` experts each (None: the plan's rule, homerun.plan.staging.prefill_stage_experts: min(512 MiB, a
    layer's experts, a quarter of the device's budget), capped by what the cache leaves); calls with more than
    `min_rows` tokens take it."""

    stream: bool | None = None
    stage_experts: int | None = None
    min_rows: int = FUSED_MAX_ROWS


@dataclass(frozen=True)
class StoreOptions:
    """The host expert store built when none is passed (offload.host_store.HostExpertStore budgets)."""

    pinned_budget_bytes: int | None = None
    ram_budget_bytes: int | None = None
    disk_dir: str | None = None


def build_cached_backend(
    source,
    layers,
    n_experts: int,
    *,
    swiglu_limit: float,
    device=None,
    compute_dtype: torch.dtype = torch.float32,
    cpu_backend: ExpertBackend | None = None,
    host_store=None,
    cache: CacheOptions = CacheOptions(),
    misses: MissOptions = MissOptions(),
    prefill: PrefillOptions = PrefillOptions(),
    store_options: StoreOptions = StoreOptions(),
) -> CachedExpertBackend:
    """Everything the runtime needs in one call. `source` is the checkpoint's ExpertSource; `layers` the MoE layers
    whose routed experts are offloaded; `host_store` the one host copy (built from `source` per `store_options`
    when not given). `device` defaults to cuda:0, or a CPU stand-in without CUDA. Misses the miss policy sends to
    the CPU run on `cpu_backend` (default: ReferenceExpertBackend over the host store; pass a CpuExpertBackend for
    the native kernels). On a GPU-flavored device with FP4 experts (the fused decode path) a PrefillStreamer is
    attached per `prefill`."""
    from offload.base import ReferenceExpertBackend
    from offload.devices import default_device
    from offload.host_store import HostExpertStore
    from offload.miss_policy import costs_for_expert
    from offload.policies import DEFAULT_POLICY

    layers = list(layers)
    so = store_options
    store = host_store or HostExpertStore(source, [(l, e) for l in layers for e in range(n_experts)],
                                          pinned_budget_bytes=so.pinned_budget_bytes,
                                          ram_budget_bytes=so.ram_budget_bytes, disk_dir=so.disk_dir)
    device = device or default_device()
    gpu_path = device.kernel_flavor == "gpu" and store.layout.fmt == "fp4"
    stream = gpu_path if prefill.stream is None else bool(prefill.stream) and gpu_path
    per_stage = prefill.stage_experts or prefill_stage_experts(store.expert_bytes, n_experts, device.budget_bytes)
    stage = min(per_stage, n_experts) if stream else 0
    slots = cache.slots
    if slots is None and cache.slots_per_layer is None:
        # the cache's slot table and the stages' expert tables (int32, GPU path) come out of the same budget
        tables = 4 * n_experts * ((max(layers, default=-1) + 1 if gpu_path else 0) + (STAGE_BUFFERS if stage else 0))
        fit = (device.free_bytes - STAGE_BUFFERS * stage * store.expert_bytes - tables) // store.expert_bytes \
            - len(tuple(cache.pinned_keys))
        slots = max(1, min(fit, len(store.keys())))
    expert_cache = ExpertCache(store, device, n_slots=slots if cache.slots_per_layer is None else None,
                               slots_per_layer=cache.slots_per_layer, policy=cache.policy or DEFAULT_POLICY,
                               pinned_keys=cache.pinned_keys, max_in_flight=cache.max_in_flight)
    if cpu_backend is None:
        cpu_backend = ReferenceExpertBackend(store, swiglu_limit=swiglu_limit, compute_dtype=compute_dtype)
    w1 = store.layout.parts[0]
    hidden = w1.shape[1] * (2 if store.layout.fmt == "fp4" else 1)
    measured = {k: v for k, v in (("link_gbps", misses.link_gbps), ("cpu_gbps", misses.cpu_gbps)) if v is not None}
    miss = MissPolicy(costs_for_expert(store.expert_bytes, hidden, w1.shape[0], **measured), mode=misses.mode)
    backend = CachedExpertBackend(expert_cache, swiglu_limit=swiglu_limit, cpu_backend=cpu_backend, miss_policy=miss,
                                  compute_dtype=compute_dtype, pipeline_depth=misses.pipeline_depth,
                                  speculate=misses.speculate)
    if stream and backend.fused is not None:
        from offload.gpu_decode import fused_kernels
        from offload.prefill_stream import PrefillStreamer

        # The stages take what the cache left them, up to the rule's size: a plan's cache slots already leave room
        # for them (it charges the same rule), as does the fit above.
        room = (device.free_bytes - STAGE_BUFFERS * 4 * n_experts) // (STAGE_BUFFERS * store.expert_bytes)
        if min(stage, room) >= 1:
            backend.prefill = PrefillStreamer(store, device, fused_kernels(), n_experts=n_experts,
                                              swiglu_limit=swiglu_limit, capacity=min(stage, room),
                                              min_rows=prefill.min_rows)
    return backend
