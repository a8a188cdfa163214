"""Layer-by-layer streamed prefill: a double-buffered staging area on the device, separate from the decode cache.

A prefill chunk routes hundreds of tokens per layer to most of the layer's experts. Serving that through the decode
cache would evict the hot set on every chunk and copy experts one at a time. Instead each layer's needed experts
go up in bulk (adjacent arena buffers as one copy) into stage[layer % 2], and the layer runs as two
`fp4_grouped_gemm` launches (gate/up with the clamped SwiGLU, then down with the routing weights) over the pairs
sorted by expert, whose group offsets stay on the device. The next layer's experts go into the other stage while
this layer computes: its exact set when known ahead (hash layers, from the token ids) or the model's guess
(`speculate`: the next router applied to this layer's input), completed at its forward with whatever the guess
missed. A hash layer's set is read on the host (`offload.prefetch.HostTid2Eid`: the host token ids into a host copy
of tid2eid), and its forward takes that set as its needed experts, so neither makes a device sync; a routed layer's
needed set and a guess are read from the device (a unique + tolist each). The decode cache is not touched: its
slots, table, policy and counters are the same after a prefill.
Counters per layer: experts staged, bytes staged (used and speculative), copies, copy and stall time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable

import torch

from offload.devices import Device
from offload.host_store import HostExpertStore
from offload.prefetch import HostTid2Eid
from offload.transfer import make_transfer_engine


@dataclass
class _LayerCounters:
    experts: int = 0  # distinct experts the layer's pairs used
    staged_experts: int = 0  # experts copied into a stage for the layer (used + wasted guesses)
    staged_bytes: int = 0
    wasted_bytes: int = 0  # staged on a guess, not used
    n_copies: int = 0
    copy_s: float = 0.0
    stall_s: float = 0.0

    def to_dict(self) -> dict:
        return dict(vars(self))


class _Stage:
    def __init__(self, buf: torch.Tensor, table: torch.Tensor) -> None:
        self.buf = buf  # uint8 [capacity, stride]
        self.table = table  # int32 [n_experts] on the device: expert -> position (0 for absent, never read)
        self.layer: int | None = None
        self.pos: dict[int, int] = {}  # expert -> position
        self.pending: list = []  # transfers not yet waited for
        self.last_use = None  # CUDA: event after the last GEMM that read this stage


class PrefillStreamer:
    """Streams each layer's experts through two staging buffers of `capacity` experts each and computes the layer
    with the grouped FP4 GEMM. `min_rows`: calls with more tokens than this are prefill."""

    def __init__(self, store: HostExpertStore, device: Device, mods, *, n_experts: int, swiglu_limit: float,
                 capacity: int | None = None, min_rows: int = 64, max_in_flight: int = 8,
                 link_gbps: float | None = None) -> None:
        self.store, self.device, self.moe = store, device, mods.moe
        # Under the interpreter (a CUDA stand-in) fewer, wider programs; compiled, the kernel's own defaults.
        self.blocks = {"fewest_programs": mods.common.interpreting()}
        self.n_experts = n_experts
        self.swiglu_limit = float(swiglu_limit)
        self.capacity = max(1, min(capacity or n_experts, n_experts))
        self.min_rows = int(min_rows)
        stride = store.expert_bytes
        self.stages = []
        for i in (0, 1):
            buf = device.empty(("expert_cache", id(self), "stage", i), (self.capacity, stride), torch.uint8)
            table = device.empty(("expert_cache", id(self), "stage_table", i), (n_experts,), torch.int32)
            table.zero_()
            self.stages.append(_Stage(buf, table))
        self.views = [store.layout.kernel_views(s.buf) for s in self.stages]
        self.engine = make_transfer_engine(device, max_in_flight=max_in_flight, link_gbps=link_gbps, sink=self)
        self.known: dict[int, list[int]] = {}  # layer -> exact experts known ahead (hash layers)
        self.tid2eid = HostTid2Eid()
        self.layers: dict[int, _LayerCounters] = defaultdict(_LayerCounters)

    # --- transfer sink ------------------------------------------------------------------------------------
    def on_copy(self, tag: Hashable, nbytes: int, seconds: float) -> None:
        c = self.layers[tag]
        c.n_copies += 1
        c.copy_s += seconds

    def on_stall(self, tag: Hashable, seconds: float) -> None:
        self.layers[tag].stall_s += seconds

    # --- staging ------------------------------------------------------------------------------------------
    def _stage_for(self, layer: int) -> _Stage:
        st = self.stages[layer % 2]
        if st.layer != layer:  # a new layer takes this buffer: its old contents are dropped
            st.layer, st.pos = layer, {}
        return st

    def _upload(self, layer: int, experts) -> list[int]:
        """Copy the experts of `experts` not yet staged for `layer` into its stage (adjacent arena buffers into
        adjacent positions as one copy); returns those copied. Stops at the stage's capacity."""
        st = self._stage_for(layer)
        new = [e for e in sorted(set(int(e) for e in experts)) if e not in st.pos][:self.capacity - len(st.pos)]
        if not new:
            return []
        stride = self.store.expert_bytes
        runs: list[list[int]] = []
        for e in new:
            if runs and self._adjacent(layer, runs[-1][-1], e):
                runs[-1].append(e)
            else:
                runs.append([e])
        after = st.last_use
        for run in runs:
            p0 = len(st.pos)
            for j, e in enumerate(run):
                st.pos[e] = p0 + j
            dst = st.buf[p0:p0 + len(run)].view(-1)
            st.pending.append(self.engine.copy(dst, self.store.run((layer, run[0]), len(run)), tag=layer, after=after))
        table = torch.zeros(self.n_experts, dtype=torch.int32)
        for e, p in st.pos.items():
            table[e] = p
        st.table.copy_(table)
        c = self.layers[layer]
        c.staged_experts += len(new)
        c.staged_bytes += len(new) * stride
        return new

    def _adjacent(self, layer: int, a: int, b: int) -> bool:
        if b != a + 1:
            return False
        (ta, oa), (tb, ob) = self.store.offset((layer, a)), self.store.offset((layer, b))
        return ta == tb and ob == oa + self.store.expert_bytes

    def hash_layer(self, layer: int, tid2eid: torch.Tensor, token_ids: torch.Tensor) -> list[int]:
        """A hash layer's experts follow from the token ids: remembered, staged when the layer before it runs."""
        experts = self.tid2eid.experts(layer, tid2eid, token_ids)
        self.known[layer] = experts
        if layer == 0 or self.stages[layer % 2].layer is None:
            self._upload(layer, experts)
        return experts

    def speculate(self, layer: int, expert_ids: torch.Tensor) -> list[int]:
        """The model's guess at `layer`'s routing: staged now, so the copies overlap the current layer's GEMMs."""
        return self._upload(layer, torch.unique(expert_ids).tolist())

    # --- compute ------------------------------------------------------------------------------------------
    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                expert_weights: torch.Tensor) -> torch.Tensor:
        dev = self.device.torch_device
        xd, ids, wts = x.to(dev), expert_ids.to(dev), expert_weights.to(dev)
        # A hash layer's routing is tid2eid at this forward's token ids, whose experts hash_layer read on the host:
        # no sync. Any other layer's are read from the device, a sync (prefill may: one per layer).
        needed = self.known.get(layer) if self.tid2eid.host_reads else None
        if needed is None:
            needed = torch.unique(ids).tolist()
        st = self._stage_for(layer)
        c = self.layers[layer]
        c.experts += len(needed)
        out = torch.zeros(xd.shape, dtype=torch.float32, device=dev)
        nxt = layer + 1
        if len(needed) - len([e for e in needed if e in st.pos]) + len(st.pos) <= self.capacity:
            self._upload(layer, needed)
            if nxt in self.known:  # the next layer's exact set goes up while this layer computes
                self._upload(nxt, self.known[nxt])
            self._compute(st, layer, xd, ids, wts, out)
        else:  # more experts than a stage holds: groups of `capacity`, each staged then computed
            for g0 in range(0, len(needed), self.capacity):
                group = needed[g0:g0 + self.capacity]
                st.pos = {}
                self._upload(layer, group)
                sel = torch.isin(ids, torch.tensor(group, device=dev))
                self._compute(st, layer, xd, torch.where(sel, ids, -1), wts, out)
        self.known.pop(layer, None)
        used = set(needed)
        c.wasted_bytes += sum(1 for e in st.pos if e not in used) * self.store.expert_bytes
        return out.to(x.dtype)

    def _compute(self, st: _Stage, layer: int, xd, ids, wts, out) -> None:
        for t in st.pending:
            self.engine.wait(t)
        st.pending = []
        v13c, v13s, v2c, v2s = self.views[self.stages.index(st)]
        self.moe.fp4_moe_grouped(xd, ids, wts, self.n_experts, v13c, v13s, v2c, v2s, self.swiglu_limit, out,
                                 group_ids=st.table, **self.blocks)
        if self.device.is_cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device.torch_device))
            st.last_use = ev

    def stats(self) -> dict:
        tot = {k: 0.0 for k in _LayerCounters().to_dict()}
        for c in self.layers.values():
            for k, v in c.to_dict().items():
                tot[k] += v
        return {"capacity": self.capacity, "stage_bytes": 2 * self.capacity * self.store.expert_bytes,
                **{k: (int(v) if k not in ("copy_s", "stall_s") else v) for k, v in tot.items()},
                "layers": {l: c.to_dict() for l, c in sorted(self.layers.items())}}

    def close(self) -> None:
        self.engine.close()
        self.device.free_all([("expert_cache", id(self), n, i) for n in ("stage", "stage_table") for i in (0, 1)])
