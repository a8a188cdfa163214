"""The decode path of `CachedExpertBackend` on a GPU-flavored device (CUDA, or a CUDA stand-in running the Triton
kernels under the interpreter): the fused FP4 MoE kernel computes every resident expert straight from the cache's
slots through the device slot table, and the host learns about misses without a host sync on the hit path.

Per layer: (1) copies still in flight for this layer land (`ExpertCache.commit`); (2) on the device, miss =
slot_table[layer][ids] < 0, and the routing ids plus that mask go to pinned host buffers, non-blocking, behind one
event; (3) `fp4_moe_decode` runs (pairs whose slot is -1 contribute zero); (4) the host waits for the event only (the
kernel keeps running) and reads the ids and the mask from pinned memory (no .item / .tolist / nonzero / unique on a
device tensor); hits are counted for the policy. (5) Only when the mask has a miss: the misses are split by the miss
policy; CPU misses take their activation rows to the host through a pinned buffer, are computed by the CPU backend
on its worker thread while streamed misses are copied into slots and computed by a second fused launch over a
table that names only them; both land in the output. Math: fp32 accumulation; the output is x's dtype.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from offload.cached_backend import CachedExpertBackend

# Tokens per call up to which decode takes the fused kernel (above it: prefill streaming, or the per-expert path).
FUSED_MAX_ROWS = 64


def fused_kernels():
    """homerun.kernels.triton's modules when triton runs here (compiled on CUDA, interpreted on CPU), else None."""
    try:
        from homerun.kernels import triton as hr_triton

        return hr_triton.load()
    except Exception:  # noqa: BLE001 - no triton: the per-expert torch path serves
        return None


class PinnedStaging:
    """Grow-only host buffers for device<->host crossings: page-locked when the device is CUDA (so the copies are
    asynchronous DMA), plain memory on stand-ins."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = torch.empty(max(n, 64), dtype=dtype, pin_memory=self.pin)
            self._bufs[(name, dtype)] = buf
        return buf[:n]


class FusedDecode:
    """The fused hit path over `backend.cache` (see the module docstring). Counters: calls, layers that had misses,
    event waits (one per call), CPU- and stream-served misses."""

    def __init__(self, backend: "CachedExpertBackend", mods) -> None:
        self.b = backend
        self.cache = backend.cache
        self.moe = mods.moe
        self.fewest = mods.common.interpreting()
        self.is_cuda = self.cache.device.is_cuda
        self.staging = PinnedStaging(self.is_cuda)
        self.views = self.cache.kernel_views()
        self.n_calls = 0
        self.n_miss_calls = 0
        self.n_event_waits = 0

    def _kernel(self, x, ids, w, table) -> torch.Tensor:
        return self.moe.fp4_moe_decode(x, ids, w, table, *self.views, self.b.swiglu_limit, out_dtype=torch.float32,
                                       fewest_programs=self.fewest)

    def _to_host(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Non-blocking copy of a device tensor into its pinned staging buffer (valid after the next event wait)."""
        buf = self.staging.get(name, t.numel(), t.dtype)
        buf.copy_(t.reshape(-1), non_blocking=self.is_cuda)
        return buf

    def _wait(self) -> None:
        self.n_event_waits += 1
        if self.is_cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.cache.device.torch_device))
            ev.synchronize()  # waits for the routing copies only; kernels already queued behind them keep running

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                expert_weights: torch.Tensor) -> torch.Tensor:
        self.n_calls += 1
        cache, dev = self.cache, self.b.device
        cache.commit(layer)
        table = cache.slot_table[layer]
        ids = expert_ids.to(dev)
        wts = expert_weights.to(dev)
        xd = x.to(dev)
        ids_h = self._to_host("ids", ids)
        miss_h = self._to_host("miss", table[ids] < 0)
        if self.is_cuda:  # the event goes right behind the two copies, before the kernel
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
        y = self._kernel(xd, ids, wts, table)  # (T, D) fp32, resident experts only
        self.n_event_waits += 1
        if self.is_cuda:
            ev.synchronize()
        ids_np, miss_np = ids_h.numpy(), miss_h.numpy()
        hit_keys = [(layer, int(e)) for e in np.unique(ids_np[~miss_np])]
        for key in hit_keys:
            cache.touch(key)
            cache.release(key)  # CUDA: an event after the kernel, so an overwrite of the slot waits for it
        self.b.prefetcher.observe(layer, [int(e) for e in np.unique(ids_np)])
        if miss_np.any():
            self.n_miss_calls += 1
            self._misses(layer, xd, ids, wts, ids_np, miss_np, y, expert_ids.shape[1])
        self.b._feed_link_meter()
        return y.to(x.dtype)

    def _misses(self, layer, xd, ids, wts, ids_np, miss_np, y, k: int) -> None:
        b, cache = self.b, self.cache
        missed, counts = np.unique(ids_np[miss_np], return_counts=True)
        plan = b._split({int(e): int(n) for e, n in zip(missed, counts)})
        cpu_future = self._start_cpu(layer, xd, wts, ids_np, plan.cpu, k) if plan.cpu else None
        stream = list(plan.stream)
        window = max(1, cache.capacity(layer))
        for i in range(0, len(stream), window):  # at most the layer's evictable slots at once
            batch = [(layer, e) for e in stream[i:i + window]]
            for key in batch:
                cache.acquire(key, in_use=frozenset(batch))
            cache.commit(layer)
            only = torch.full((cache.slot_table.shape[1],), -1, dtype=torch.int32)
            for key in batch:
                only[key[1]] = cache.slot(key)
            y += self._kernel(xd, ids, wts, only.to(b.device, non_blocking=False))
            for key in batch:
                cache.release(key)
        if cpu_future is not None:
            y += cpu_future.result().to(b.device, non_blocking=self.is_cuda)
            if b.promote_cpu_misses:
                for e in plan.cpu:
                    cache.prefetch((layer, e), promotion=True)

    def _start_cpu(self, layer, xd, wts, ids_np, cpu_ids, k: int):
        """CPU misses: their (token, expert) pairs, one row each, cross to the host in pinned buffers."""
        b, cache = self.b, self.cache
        for e in cpu_ids:
            cache.record_miss((layer, e))
        pairs = np.flatnonzero(np.isin(ids_np, np.asarray(cpu_ids)))  # host numpy, no device sync
        idx = torch.from_numpy(pairs)
        rows = idx // k
        rows_d = rows.to(b.device)
        x_h = self._to_host("x", xd[rows_d].float())  # (n*D,) fp32: the CPU kernels' activations
        w_h = self._to_host("w", wts.reshape(-1)[idx.to(b.device)].float())
        self._wait()
        n, d = len(pairs), xd.shape[1]
        x_cpu = x_h.view(n, d).clone()
        w_cpu = w_h.view(n, 1).clone()
        ids_cpu = torch.from_numpy(ids_np[pairs].astype(np.int64)).view(n, 1)
        n_tok = xd.shape[0]

        def run() -> torch.Tensor:
            t0 = time.perf_counter()
            out = b.cpu_backend.forward(layer, x_cpu, ids_cpu, w_cpu).float()
            seconds = time.perf_counter() - t0
            b._cpu_experts += len(cpu_ids)
            b._cpu_s += seconds
            if b.miss_policy is not None:
                b.miss_policy.observe_cpu(len(cpu_ids), n, seconds)
            full = self.staging.get("y", n_tok * d, torch.float32).view(n_tok, d)
            full.zero_()
            return full.index_add_(0, rows, out)

        return b._cpu_pool.submit(run)

    def stats(self) -> dict:
        return {"calls": self.n_calls, "miss_calls": self.n_miss_calls, "event_waits": self.n_event_waits}
