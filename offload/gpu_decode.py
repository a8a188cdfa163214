"""The decode path of `CachedExpertBackend` on a GPU-flavored device (CUDA, or a CUDA stand-in running the Triton
kernels under the interpreter): the fused FP4 MoE kernel computes every resident expert straight from the cache's
slots through the device slot table, and the host learns about misses without a host sync on the hit path.

Per layer: (1) copies still in flight for this layer land (`ExpertCache.commit`); (2) on the device, miss =
slot_table[layer][ids] < 0, and the routing ids plus that mask go to pinned host buffers, non-blocking, behind one
event; (3) `fp4_moe_decode` runs (pairs whose slot is -1 contribute zero); (4) the host waits for the event only (the
kernel keeps running) and reads the ids and the mask from pinned memory (no .item / .tolist / nonzero / unique on a
device tensor); hits are counted for the policy. (5) Only when the mask has a miss: the misses are split by the miss
policy; CPU misses are computed by the CPU backend on its worker thread while streamed misses are copied into slots
and computed by a second fused launch over a table that names only them; both land in the output. Math: fp32
accumulation; the output is x's dtype. The CPU misses' activation rows (fp32) and routing weights were copied to
pinned buffers in (2), before the event (`early_cpu_rows`), so (4)'s one wait covers them: a layer with CPU misses
waits once, not twice. That copy runs on all-hit layers too (two launches), so it is made only when the miss policy
may send a miss of this call to the CPU (`MissPolicy.cpu_possible`: in "auto" its estimates may stream every miss)
and its bytes cross the link in under a wait (`early_rows_max_bytes`); otherwise the rows cross after the mask,
behind a second wait.
Prefetch guesses ride the same wait: `prefetch_speculative(l + 1, guess)`, called before layer l's call, only copies
the device guess (non-blocking) into a pinned buffer (`guess`; a decode graph's static buffer may be rewritten
afterwards); layer l's event in (2) is recorded behind that copy, and after (4) the host reads the guess, issues its
prefetches (`Prefetcher.speculated`) before the misses of (5), as the old order did (prefetch, then the layer).
One difference from issuing them before the layer: the layer's miss mask and hits are taken before the guess's
copies start, so with one replacement pool shared by all layers, a guessed expert of layer l + 1 can no longer evict
an expert that layer l is about to use (with per-layer pools the two orders make the same choices).

Speculative decode tokens (`begin_token` / `end_token`, the backend contract's token hooks): step (4) costs one host
wait per layer. While recent tokens were all-hit often enough (`SpeculationPolicy`), a decode token is speculated:
each layer runs (1)-(3) only, its ids and miss mask going to its own pinned slot, and the host never waits inside the
token. At the token's end one wait covers every layer, or none when the caller's own readback of the token's
output came first (`host_synced`: a decode loop's sampled id, homerun.models.speculation); the masks are read, the
hits of the layers before the first miss are counted (touch, release, prefetch scoring) exactly as step (4) would
have, and if a layer missed, the model recomputes that layer and every later one on the exact path above (which
counts their hits and serves their misses), so nothing is counted twice and the logits are the exact path's bit
for bit (the same kernels on the same inputs).
While speculating the backend issues no guessed prefetches (the experts are expected resident; a guess reaches the
host only behind a wait per layer); a hash layer's prefetch is issued when its ids are read on the host (no wait),
so its misses land before the layer instead of forcing a redo. Behind a LayerSplitBackend every part speculates a
token or none does, and all parts read their masks (`first_miss`) before any counts hits, so a redo starts at the
earliest miss of all and the parts count only the layers before it (`end_token(redo_from)`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from homerun.kernels.counting import note_host_wait

if TYPE_CHECKING:  # pragma: no cover
    from offload.cached_backend import CachedExpertBackend

# Tokens per call up to which decode takes the fused kernel (above it: prefill streaming, or the per-expert path).
FUSED_MAX_ROWS = 64
SPECULATE_MODES = ("auto", "always", "never")


class SpeculationPolicy:
    """Whether to speculate the next decode token all-hit: one host wait at its end instead of one per layer.

    A speculated all-hit token saves (n - 1) waits of `wait_s` (n: the layers this backend serves); a token with a
    miss is redone from its first missed layer on, about `REDO_FRACTION` of the token's `token_s` plus the redone
    layers' waits. With p the all-hit rate of recent decode tokens (an EWMA over every decode token, speculated or
    not), speculating pays when  wait_s + (1 - p) (REDO_FRACTION token_s + n wait_s / 2) < n wait_s,  i.e.
        p > threshold = 1 - (n - 1) wait_s / (REDO_FRACTION token_s + n wait_s / 2),
    clamped to [MIN_THRESHOLD, MAX_THRESHOLD]: a few tokens with misses stop speculation, and it resumes once the
    measured rate climbs back (about 45 all-hit tokens at the upper clamp). token_s is measured (EWMA of each
    decode token's host time, its end wait included); wait_s is a prior: a CUDA event sync plus the launch bubble
    it leaves behind (~20 us; a stand-in's waits cost nothing, but speculation is what its tests exercise).
    "always" / "never" pin the choice (tests, A/B runs)."""

    REDO_FRACTION = 0.5  # the first miss falls anywhere in the token: half of it is redone on average
    MIN_THRESHOLD, MAX_THRESHOLD = 0.5, 0.999

    def __init__(self, mode: str = "auto", *, wait_s: float = 20e-6, ewma: float = 0.1) -> None:
        if mode not in SPECULATE_MODES:
            from homerun.errors import UsageError

            raise UsageError(f"unknown speculation mode {mode!r}", hint=f"choose one of {', '.join(SPECULATE_MODES)}")
        self.mode = mode
        self.wait_s = wait_s
        self.alpha = ewma
        self.all_hit_rate = 1.0  # optimistic start: the first decode tokens after a warm prefill mostly hit
        self.token_s: float | None = None
        self.n_layers = 1

    def threshold(self) -> float:
        if self.token_s is None:
            return self.MIN_THRESHOLD
        n, w = self.n_layers, self.wait_s
        t = 1.0 - (n - 1) * w / (self.REDO_FRACTION * self.token_s + n * w / 2)
        return min(self.MAX_THRESHOLD, max(self.MIN_THRESHOLD, t))

    def speculate(self) -> bool:
        if self.mode != "auto":
            return self.mode == "always"
        return self.all_hit_rate > self.threshold()

    def observe(self, all_hit: bool, n_layers: int, seconds: float) -> None:
        """One decode token finished: whether every layer hit, the layers it called, its host time."""
        a = self.alpha
        self.all_hit_rate += a * (float(all_hit) - self.all_hit_rate)
        self.n_layers = max(1, n_layers)
        self.token_s = seconds if self.token_s is None else self.token_s + a * (seconds - self.token_s)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "all_hit_rate": self.all_hit_rate, "threshold": self.threshold(),
                "token_s": self.token_s, "wait_s": self.wait_s}


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
            with torch.inference_mode(False):  # a plain tensor: written in and out of inference mode alike
                buf = torch.empty(max(n, 64), dtype=dtype, pin_memory=self.pin)
            self._bufs[(name, dtype)] = buf
        return buf[:n]


class FusedDecode:
    """The fused hit path over `backend.cache` (see the module docstring). Counters: calls, layers that had misses,
    event waits (host syncs: one per exact call, one per speculated token), decode tokens, speculated tokens and
    redos."""

    def __init__(self, backend: "CachedExpertBackend", mods, speculate: str = "auto") -> None:
        self.b = backend
        self.cache = backend.cache
        self.moe = mods.moe
        self.fewest = mods.common.interpreting()
        self.is_cuda = self.cache.device.is_cuda
        self.staging = PinnedStaging(self.is_cuda)
        self.views = self.cache.kernel_views()
        self.policy = SpeculationPolicy(speculate)
        self.n_calls = 0
        self.n_miss_calls = 0
        self.n_event_waits = 0
        self.n_tokens = 0
        self.n_spec_tokens = 0
        self.n_redos = 0
        self.redo_from: dict[int, int] = {}  # layer -> redos that started there
        self.speculating = False
        self._token: dict | None = None  # the decode token in progress: start time, calls, whether one missed
        self._spec: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # per speculated call: layer, ids, miss mask
        self._first: tuple[int | None] | None = None  # (first missed layer,) once a speculated token's wait was made
        self._synced = False  # the caller waited for the speculated token's work already (host_synced)
        self.defer_guesses = True  # False: read each guess at once (a host sync each), the reference for tests
        self._guess: tuple[int, torch.Tensor] | None = None  # (layer it guesses, its pinned copy), read after a wait
        self.early_cpu_rows = True  # False: the rows of CPU misses cross after the mask, a second wait (tests, A/B)
        self.n_early_rows = 0  # exact calls that copied their rows early (a CPU miss was possible)

    # --- tokens ----------------------------------------------------------------------------------------------
    def begin_token(self, decode: bool, allowed: bool = True) -> bool:
        """A forward starts; `decode`: its calls take this fused path (they are tokens for the policy). True:
        speculate it (never when not `allowed`)."""
        self.speculating = False
        self._spec = []
        self._first = None
        self._synced = False
        self._token = None
        self._guess = None  # a guess whose layer never ran here (an aborted forward): dropped
        if not decode:
            return False
        self._token = {"t0": time.perf_counter(), "calls": 0, "missed": False}
        self.speculating = allowed and self.policy.speculate()
        return self.speculating

    def first_miss(self) -> int | None:
        """Speculated: the token's one wait (made once), then the first layer whose mask has a miss."""
        if not self.speculating:
            return None
        if self._first is None:
            if not self._synced:
                self._wait()  # the token's one host sync: every layer's kernel and mask copy is behind it
            self._first = (next((layer for layer, _, miss_h in self._spec if miss_h.numpy().any()), None),)
        return self._first[0]

    def host_synced(self) -> None:
        """The caller's own host wait (the sampled id read back) came after every mask copy of this speculated
        token: `first_miss` reads them without a wait of its own."""
        self._synced = self.speculating

    def end_token(self, redo_from: int | None = None) -> int | None:
        """The forward's layers are queued. Speculated: one wait, then the masks decide (module docstring); the
        hits of layers from `redo_from` on (another backend's miss, LayerSplitBackend) are left to their reruns."""
        tok, self._token = self._token, None
        redo = None
        if self.speculating:
            redo = self.first_miss()
            stop = min((m for m in (redo, redo_from) if m is not None), default=None)
            self.speculating = False
            self._first = None
            self._synced = False
            self.n_spec_tokens += 1
            for layer, ids_h, miss_h in self._spec:
                if stop is not None and layer >= stop:
                    break
                self._account(layer, ids_h.numpy(), miss_h.numpy())
            self._spec = []
            if redo is not None:
                self.n_redos += 1
                self.redo_from[redo] = self.redo_from.get(redo, 0) + 1
                tok["missed"] = True
        if tok is not None and tok["calls"]:
            self.n_tokens += 1
            self.policy.observe(not tok["missed"], tok["calls"], time.perf_counter() - tok["t0"])
        return redo

    # --- prefetch guesses --------------------------------------------------------------------------------------
    def guess(self, layer: int, expert_ids: torch.Tensor) -> list[int]:
        """The router's guess at `layer`'s experts, made before the current layer's call: copied now (the caller may
        rewrite its buffer), issued after that call's wait. Returns [] (the ids are not on the host yet)."""
        if not self.defer_guesses:
            return self.b.prefetcher.speculate(layer, expert_ids)
        if self._guess is not None:  # one no call read (made at another backend's layer): issued now, its own wait
            self._wait()
            self._issue(self._guess)
        self._guess = (layer, self._to_host("guess", expert_ids.to(self.b.device)))
        return []

    def _take_guess(self, layer: int) -> tuple[int, torch.Tensor] | None:
        """The pending guess, for after `layer`'s wait. One that names `layer` itself (the layer before ran on another
        backend; a LayerSplitBackend asks for none such, offload.base) is issued now, behind a wait of its own."""
        g, self._guess = self._guess, None
        if g is not None and g[0] == layer:
            self._wait()
            self._issue(g)
            return None
        return g

    def _issue(self, g: tuple[int, torch.Tensor]) -> None:
        layer, guess_h = g
        self.b.prefetcher.speculated(layer, np.unique(guess_h.numpy()).tolist())

    def _forward_speculative(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                             expert_weights: torch.Tensor) -> torch.Tensor:
        """Steps (1)-(3) only; the ids and the miss mask go to this call's own pinned slots, read at end_token."""
        cache, dev = self.cache, self.b.device
        cache.commit(layer)
        table = cache.slot_table[layer]
        ids = expert_ids.to(dev)
        i = len(self._spec)
        ids_h = self._to_host(f"spec_ids{i}", ids)
        miss_h = self._to_host(f"spec_miss{i}", table[ids] < 0)
        self._spec.append((layer, ids_h, miss_h))
        y = self._kernel(x.to(dev), ids, expert_weights.to(dev), table)  # missed pairs contribute zero
        return y.to(x.dtype)

    def _account(self, layer: int, ids_np: np.ndarray, miss_np: np.ndarray) -> None:
        """Step (4)'s bookkeeping for the hits of one call: the policy's hit, the slot's last use, prefetch scores."""
        cache = self.cache
        for e in np.unique(ids_np[~miss_np]):
            key = (layer, int(e))
            cache.touch(key)
            cache.release(key)  # CUDA: an event after the kernel, so an overwrite of the slot waits for it
        self.b.prefetcher.observe(layer, [int(e) for e in np.unique(ids_np)])

    def _kernel(self, x, ids, w, table) -> torch.Tensor:
        return self.moe.fp4_moe_decode(x, ids, w, table, *self.views, self.b.swiglu_limit, out_dtype=torch.float32,
                                       fewest_programs=self.fewest)

    def _to_host(self, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Non-blocking copy of a device tensor into its pinned staging buffer (valid after the next event wait),
        converted to `dtype` by the copy itself (one launch)."""
        buf = self.staging.get(name, t.numel(), dtype or t.dtype)
        buf.copy_(t.reshape(-1), non_blocking=self.is_cuda)
        return buf

    def _wait(self) -> None:
        self.n_event_waits += 1
        note_host_wait()  # a graph capture refuses it, on stand-ins too
        if self.is_cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.cache.device.torch_device))
            ev.synchronize()  # waits for the routing copies only; kernels already queued behind them keep running

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                expert_weights: torch.Tensor) -> torch.Tensor:
        self.n_calls += 1
        if self._token is not None:
            self._token["calls"] += 1
        if self.speculating:
            return self._forward_speculative(layer, x, expert_ids, expert_weights)
        cache, dev = self.cache, self.b.device
        guess = self._take_guess(layer)
        cache.commit(layer)
        table = cache.slot_table[layer]
        ids = expert_ids.to(dev)
        wts = expert_weights.to(dev)
        xd = x.to(dev)
        ids_h = self._to_host("ids", ids)
        miss_h = self._to_host("miss", table[ids] < 0)
        early = self._early_rows(xd, ids, wts)
        if self.is_cuda:  # the event goes right behind the copies, before the kernel
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(dev))
        y = self._kernel(xd, ids, wts, table)  # (T, D) fp32, resident experts only
        self.n_event_waits += 1
        note_host_wait()
        if self.is_cuda:
            ev.synchronize()
        ids_np, miss_np = ids_h.numpy(), miss_h.numpy()
        self._account(layer, ids_np, miss_np)  # first: its releases order a guessed copy's overwrite after the kernel
        if guess is not None:
            self._issue(guess)
        if miss_np.any():
            self.n_miss_calls += 1
            if self._token is not None:
                self._token["missed"] = True
            self._misses(layer, xd, ids, wts, ids_np, miss_np, y, expert_ids.shape[1], early)
        self.b._feed_link_meter()
        return y.to(x.dtype)

    def _early_rows_wanted(self, ids: torch.Tensor) -> bool:
        """Whether a miss of this call may go to the CPU: the miss policy answers from its current estimates (exact
        for one token; "auto" may stream every miss, and then the copy would buy nothing)."""
        b = self.b
        if not self.early_cpu_rows or b.cpu_backend is None or b.miss_policy is None:
            return False
        max_misses = min(ids.numel(), self.cache.slot_table.shape[1])
        return b.miss_policy.cpu_possible(ids.shape[0], max_misses)

    def early_rows_max_bytes(self) -> float:
        """Bytes the early copy may move: what the link carries in one saved wait (~20 us x 25 GB/s = 500 KB)."""
        return self.policy.wait_s * self.b.miss_policy.costs.link_gbps * 1e9

    def _early_rows(self, xd: torch.Tensor, ids: torch.Tensor,
                    wts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """x (fp32, the CPU kernels' activations) and the routing weights into pinned buffers, queued before the
        layer's event so a CPU miss finds them on the host after the one wait; None: not worth it (module docstring)."""
        if not self._early_rows_wanted(ids) or 4 * (xd.numel() + wts.numel()) > self.early_rows_max_bytes():
            return None
        self.n_early_rows += 1
        return self._to_host("x_rows", xd, torch.float32), self._to_host("w_rows", wts, torch.float32)

    def _misses(self, layer, xd, ids, wts, ids_np, miss_np, y, k: int, early=None) -> None:
        b, cache = self.b, self.cache
        missed, counts = np.unique(ids_np[miss_np], return_counts=True)
        plan = b._split({int(e): int(n) for e, n in zip(missed, counts)})
        cpu_future = self._start_cpu(layer, xd, wts, ids_np, plan.cpu, k, early) if plan.cpu else None
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

    def _start_cpu(self, layer, xd, wts, ids_np, cpu_ids, k: int, early=None):
        """CPU misses: their (token, expert) pairs, one row each, taken from the early pinned copies of x and the
        weights (`early`), or else copied to pinned buffers now, behind a wait of their own."""
        b, cache = self.b, self.cache
        for e in cpu_ids:
            cache.record_miss((layer, e))
        pairs = np.flatnonzero(np.isin(ids_np, np.asarray(cpu_ids)))  # host numpy, no device sync
        idx = torch.from_numpy(pairs)
        rows = idx // k
        n, d = len(pairs), xd.shape[1]
        if early is not None:  # already on the host behind this layer's one wait: gathered there (copies)
            x_cpu = early[0].view(-1, d)[rows]
            w_cpu = early[1][idx].view(n, 1)
        else:
            rows_d = rows.to(b.device)
            x_h = self._to_host("x", xd[rows_d].float())  # (n*D,) fp32: the CPU kernels' activations
            w_h = self._to_host("w", wts.reshape(-1)[idx.to(b.device)].float())
            self._wait()
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
        return {"calls": self.n_calls, "miss_calls": self.n_miss_calls, "event_waits": self.n_event_waits,
                "tokens": self.n_tokens, "speculative_tokens": self.n_spec_tokens, "redos": self.n_redos,
                "redo_from": dict(self.redo_from), "early_rows": self.n_early_rows,
                "speculation": self.policy.to_dict()}
