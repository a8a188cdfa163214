"""The contract between the runtime's MoE layer and whatever computes routed experts.

The runtime routes (router, top-k, weights) and computes the shared expert itself; everything about where a
routed expert's bytes live and which device multiplies them is behind `ExpertBackend`. Backends: the plain fp32
reference below, the native CPU kernels (offload/cpu_backend.py over homerun/kernels), the device expert cache
(offload/cached_backend.py), every expert resident on one device (offload/resident_backend.py), and below,
`LayerSplitBackend`, which composes one backend per group of layers (a multi-GPU plan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from homerun.formats.experts import ExpertSource, ExpertWeights  # noqa: F401 - part of the contract
from homerun.kernels.reference import reference_moe, swiglu_expert  # noqa: F401 - the reference formula


@dataclass(frozen=True)
class BackendStats:
    """What an expert backend reports, one type for all of them; a backend fills what it has. `cache` is the
    device cache's CacheStats, `prefetch` its predictors' PrefetchStats, `resident` an all-in-VRAM backend's
    summary, `parts` the per-device backends of a layer split. Reads as a dict too (`stats()["cache"]`)."""

    kind: str
    cache: Any = None
    prefetch: tuple = ()
    miss_policy: dict = field(default_factory=dict)
    cpu_experts: int = 0
    cpu_s: float = 0.0
    resident: dict | None = None
    parts: tuple["BackendStats", ...] = ()
    store: dict = field(default_factory=dict)  # the host store's StoreStats (arena and pinned bytes)
    gpu: dict = field(default_factory=dict)  # the fused decode / streamed prefill counters, on GPU-flavored devices

    def to_dict(self) -> dict:
        if self.parts:
            return {"backends": [p.to_dict() for p in self.parts]}
        if self.resident is not None:
            return {"resident": dict(self.resident)}
        if self.cache is None:
            return {}
        out = {"cache": self.cache.to_dict(), "prefetch": [p.to_dict() for p in self.prefetch],
               "miss_policy": self.miss_policy, "cpu_experts": self.cpu_experts, "cpu_s": self.cpu_s}
        if self.store:
            out["store"] = dict(self.store)
        if self.gpu:
            out["gpu"] = dict(self.gpu)
        return out

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def cache_totals(self) -> tuple[int, int, int]:
        """(hits, misses, bytes moved into a cache) over this backend and its parts; zeros without a cache."""
        if self.parts:
            sums = [p.cache_totals() for p in self.parts]
            return tuple(sum(x) for x in zip(*sums)) if sums else (0, 0, 0)  # type: ignore[return-value]
        if self.cache is None:
            return 0, 0, 0
        c = self.cache.to_dict()
        return c["hits"], c["misses"], c["bytes_moved"]


class ExpertBackend:
    """The contract: `forward` computes the routed experts; the hooks are explicit no-ops a backend overrides.

    forward: x [T, D] (the MoE's normalized input); expert_ids [T, k] int64; expert_weights [T, k] fp32, already
    normalized and multiplied by routed_scaling_factor. Returns sum_k w_k * expert_k(x) as [T, D] in x.dtype. The
    shared expert is not included.
    """

    act: str | None = None  # the CPU kernels' activation mode, where a backend runs them
    wants_speculation: bool = False  # whether prefetch_speculative is worth a router pass for the next layer
    # True: forward makes no host sync, keeps no per-call host state, and every hook is a no-op, so its calls may be
    # captured with the rest of a one-token decode step and replayed (homerun.engine.graphs). False (a wrapper, the
    # hybrid cache): decode graphs run each call eagerly between two captured segments, the token hooks as well; the
    # tensors such a call gets are then the graphs' static buffers, rewritten at the next step (keep copies, not them).
    graph_safe: bool = False

    def graph_safe_layer(self, layer: int) -> bool:
        """`graph_safe` for this layer's calls alone: decode graphs capture a graph-safe layer's routed call with its
        segment and run only the other layers' calls eagerly (a backend composed per layer answers per layer)."""
        return bool(self.graph_safe)

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                expert_weights: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefetch_hash_layer(self, layer: int, tid2eid: torch.Tensor, token_ids: torch.Tensor) -> list[int]:
        """A hash layer's experts are known from the token ids (as the forward got them: host or device) before any
        layer runs; returns those prefetched."""
        return []

    def wants_speculation_for(self, layer: int) -> bool:
        """`wants_speculation` for a guess at `layer`'s routing alone: the model skips the router pass when that layer's
        calls would throw the guess away (a backend composed per layer answers per layer)."""
        return bool(self.wants_speculation)

    def guesses_layer(self, layer: int) -> bool:
        """Whether `wants_speculation_for(layer)` can ever be True: decode graphs capture a router guess at `layer`
        only then (a capture is fixed per layout; the wish may change from token to token)."""
        return bool(self.wants_speculation)

    def prefetch_speculative(self, layer: int, expert_ids: torch.Tensor) -> list[int]:
        """expert_ids [T, k]: the model's guess at `layer`'s routing (its router applied to an earlier layer's
        input); returns the experts prefetched."""
        return []

    # True: the calls keep per-token state (cache counts, prefetches, a trace), so rerunning an exact call (another
    # part's redo, LayerSplitBackend) would count it twice; False: a rerun only recomputes (resident experts).
    token_stateful: bool = False
    # True: each layer's calls must see every row of a forward (a routing trace numbers tokens by the rows a layer
    # saw), so the model runs its last layer's unused rows too (DeepseekV4.forward's out_rows).
    routes_every_row: bool = False

    def begin_token(self, n_tokens: int, speculate: bool = True) -> bool:
        """The model calls this once per forward, before any layer (and before the hash-layer prefetches). True: the
        backend speculates this forward (it expects every expert of every layer to be resident): its forward calls
        queue their work without waiting for the host to learn about misses, and `end_token` says whether the
        forward stands. False (the default): every forward call is exact. `speculate` False forbids it (a backend
        that can return True takes it; a second call before any layer restarts the token)."""
        return False

    def end_token(self, redo_from: int | None = None) -> int | None:
        """The model calls this after the last layer of every forward. None: the forward stands. Else (only after
        `begin_token` returned True) the index of the first layer whose speculative call missed: its output lacks
        the missed experts, so the model reruns that layer and every later one from their inputs and their states
        before this forward, and the backend serves those calls exactly (misses included). `redo_from` (a
        LayerSplitBackend's parts): layers from there on are rerun anyway, because another part missed there, so
        their speculative calls are dropped uncounted (the reruns count them)."""
        return None

    def first_miss(self) -> int | None:
        """After the forward's layers, before `end_token`: the first layer whose speculative call missed (None: none,
        or no speculation). Makes the token's one wait; `end_token` does not wait again. A LayerSplitBackend asks
        every part first, so that each part counts only the layers before the earliest miss of all."""
        return None

    def host_synced(self) -> None:
        """After the forward's layers, before `end_token`: the host has since waited for everything those layers
        queued (their output's id read back, homerun.models.speculation), so the token's check of its speculative
        calls reads what is already on the host and makes no wait of its own."""

    def stats(self) -> BackendStats:
        return BackendStats(type(self).__name__)

    def close(self) -> None:
        """Release threads, device memory and cached addresses."""


class WrappingBackend(ExpertBackend):
    """A backend that adds behaviour around another (tracing, counting, a host hop) and forwards every hook."""

    def __init__(self, inner: ExpertBackend):
        self.inner = inner

    @property
    def act(self) -> str | None:  # type: ignore[override]
        return self.inner.act

    @property
    def wants_speculation(self) -> bool:  # type: ignore[override]
        return self.inner.wants_speculation

    def wants_speculation_for(self, layer: int) -> bool:
        # a subclass that sets wants_speculation itself (a test's tracing double) decides for every layer
        if type(self).wants_speculation is not WrappingBackend.wants_speculation:
            return bool(self.wants_speculation)
        return self.inner.wants_speculation_for(layer)

    def guesses_layer(self, layer: int) -> bool:
        if type(self).wants_speculation is not WrappingBackend.wants_speculation:
            return bool(self.wants_speculation)
        return self.inner.guesses_layer(layer)

    def forward(self, layer, x, expert_ids, expert_weights):
        return self.inner.forward(layer, x, expert_ids, expert_weights)

    def prefetch_hash_layer(self, layer, tid2eid, token_ids):
        return self.inner.prefetch_hash_layer(layer, tid2eid, token_ids)

    def prefetch_speculative(self, layer, expert_ids):
        return self.inner.prefetch_speculative(layer, expert_ids)

    @property
    def token_stateful(self) -> bool:  # type: ignore[override]
        return self.inner.token_stateful

    @property
    def routes_every_row(self) -> bool:  # type: ignore[override]
        return self.inner.routes_every_row

    def begin_token(self, n_tokens, speculate=True):
        return self.inner.begin_token(n_tokens, speculate)

    def end_token(self, redo_from=None):
        return self.inner.end_token(redo_from)

    def first_miss(self):
        return self.inner.first_miss()

    def host_synced(self):
        self.inner.host_synced()

    def stats(self) -> BackendStats:
        return self.inner.stats()

    def close(self) -> None:
        self.inner.close()


class ReferenceExpertBackend(ExpertBackend):
    """The plain fp32 path: dequantize each selected expert when it is used, multiply in fp32. Slow, obviously
    correct; the numeric reference for every other backend."""

    def __init__(self, source: ExpertSource, *, swiglu_limit: float, compute_dtype: torch.dtype = torch.float32):
        self.source = source
        self.swiglu_limit = swiglu_limit
        self.compute_dtype = compute_dtype

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        return reference_moe(self.source, layer, x, expert_ids, expert_weights, swiglu_limit=self.swiglu_limit,
                             compute_dtype=self.compute_dtype)


class LayerSplitBackend(ExpertBackend):
    """Several backends, one per group of layers (a multi-GPU plan: each device caches the experts of the layers it
    runs, within its own budget). Dispatches by layer; the output lands on that layer's device, and the prefetch
    hooks go to the backend of the layer they name. The token hooks go to every distinct part once: a forward is
    speculated when any part speculates it, and at its end every part reads its masks (its one wait) before any
    part counts hits, so a redo starts at the earliest missed layer of all and no hit is counted twice."""

    def __init__(self, backends_by_layer: dict[int, ExpertBackend]) -> None:
        self.backends_by_layer = dict(backends_by_layer)
        self._parts = list({id(b): b for b in self.backends_by_layer.values()}.values())

    @property
    def wants_speculation(self) -> bool:  # type: ignore[override]
        # asked per call: a cached part stops wanting guesses while it speculates a token
        return any(b.wants_speculation for b in self._parts)

    def wants_speculation_for(self, layer: int) -> bool:
        return self._guesser(layer) is not None and self.backends_by_layer[layer].wants_speculation_for(layer)

    def guesses_layer(self, layer: int) -> bool:
        return self._guesser(layer) is not None and self.backends_by_layer[layer].guesses_layer(layer)

    def _guesser(self, layer: int) -> ExpertBackend | None:
        """The part that may read a guess at `layer`: the one that runs it (a resident part's layer costs no router
        pass), and only when it ran the layer before too. A guess made at another part's layer would reach the host
        behind a wait of its own (offload.gpu_decode: a guess rides the wait of the call it was made before), a wait
        that a 1-resident + 2-cached token paid on every exact token; that layer's misses are served at its call."""
        b = self.backends_by_layer.get(layer)
        return b if b is not None and self.backends_by_layer.get(layer - 1) is b else None

    @property
    def token_stateful(self) -> bool:  # type: ignore[override]
        return any(b.token_stateful for b in self._parts)

    @property
    def routes_every_row(self) -> bool:  # type: ignore[override]
        return any(b.routes_every_row for b in self._parts)

    def begin_token(self, n_tokens: int, speculate: bool = True) -> bool:
        votes = [b.begin_token(n_tokens, speculate) for b in self._parts]
        if any(votes) and any(b.token_stateful and not v for b, v in zip(self._parts, votes)):
            # a redo would rerun that part's exact calls and count them twice: no part speculates this forward
            for b, v in zip(self._parts, votes):
                if v:
                    b.begin_token(n_tokens, False)
            return False
        return any(votes)

    def first_miss(self) -> int | None:
        return min((m for m in [b.first_miss() for b in self._parts] if m is not None), default=None)

    def host_synced(self) -> None:
        # every part: the final hidden depends on each part's last call, and each part queued its masks before it
        for b in self._parts:
            b.host_synced()

    def end_token(self, redo_from: int | None = None) -> int | None:
        first = self.first_miss()  # every part's wait and masks before any part counts its hits
        redo = min((m for m in (first, redo_from) if m is not None), default=None)
        for b in self._parts:
            b.end_token(redo)
        return redo

    def graph_safe_layer(self, layer: int) -> bool:
        """The part that owns the layer decides (a resident part's layers are captured whole, a cached part's not)."""
        b = self.backends_by_layer.get(layer)
        return b is not None and b.graph_safe_layer(layer)

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                expert_weights: torch.Tensor) -> torch.Tensor:
        return self.backends_by_layer[layer].forward(layer, x, expert_ids, expert_weights)

    def prefetch_hash_layer(self, layer: int, tid2eid: torch.Tensor, token_ids: torch.Tensor) -> list[int]:
        b = self.backends_by_layer.get(layer)
        return b.prefetch_hash_layer(layer, tid2eid, token_ids) if b is not None else []

    def prefetch_speculative(self, layer: int, expert_ids: torch.Tensor) -> list[int]:
        b = self.backends_by_layer.get(layer)
        return b.prefetch_speculative(layer, expert_ids) if b is not None else []

    def stats(self) -> BackendStats:
        return BackendStats(type(self).__name__, parts=tuple(b.stats() for b in self._parts))

    def close(self) -> None:
        for b in self._parts:
            b.close()
