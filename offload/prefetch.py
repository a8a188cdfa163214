"""Expert prefetch ahead of the layer that needs them, with measured precision and recall.

Hash layers (V4 layers 0-2): the experts are `tid2eid[token_ids]`, known exactly before the layer runs.
Other layers: speculate with the NEXT layer's router applied to the current hidden state (mixtral-offloading's
trick); the model computes that routing with its own router and scoring and passes the expert ids
(`prefetch_speculative(l + 1, ids)`) before layer l's experts run. A prediction is scored when the backend later reports what the layer actually used:
precision = predicted-and-used / predicted, recall = predicted-and-used / used.
This module issues cache prefetches only; it never blocks on them. Reading the ids is no host sync of its own: hash
layers read a host copy of tid2eid at host token ids, and on the fused decode path the router's guess reaches the host
behind the layer's one event wait (offload/gpu_decode.py), then `speculated` issues it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _Score:
    predicted: int = 0
    used: int = 0
    correct: int = 0


@dataclass(frozen=True)
class PrefetchStats:
    kind: str  # "hash" | "speculative"
    predicted: int
    used: int
    correct: int
    issued: int  # prefetch copies actually started (the rest were resident already or the link was busy)

    @property
    def precision(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.correct / self.used if self.used else 0.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "predicted": self.predicted, "used": self.used, "correct": self.correct,
                "issued": self.issued, "precision": self.precision, "recall": self.recall}


def hash_layer_experts(tid2eid: torch.Tensor, token_ids: torch.Tensor) -> list[int]:
    """tid2eid [V, k] int64, token_ids [T] -> the sorted distinct experts the hash layer will use."""
    return torch.unique(tid2eid[token_ids.to(tid2eid.device)]).tolist()


class HostTid2Eid:
    """A hash layer's experts (`hash_layer_experts`) read on the host: a host copy of each layer's tid2eid, taken
    once, indexed at host token ids, so no device sync (a device unique + tolist is one per hash layer per
    forward). Device token ids, or `host_reads` False (the reference in tests), take the device path. Shared by the
    decode Prefetcher and the PrefillStreamer."""

    def __init__(self, host_reads: bool = True) -> None:
        self.host_reads = host_reads
        self._held: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # layer -> (its tid2eid, a host copy)

    def on_host(self, token_ids: torch.Tensor) -> bool:
        """Whether `experts` reads these ids on the host (no device sync)."""
        return self.host_reads and token_ids.device.type == "cpu"

    def experts(self, layer: int, tid2eid: torch.Tensor, token_ids: torch.Tensor) -> list[int]:
        """The sorted distinct experts of tid2eid[token_ids]."""
        if not self.on_host(token_ids):
            return hash_layer_experts(tid2eid, token_ids)
        return np.unique(self._host(layer, tid2eid)[token_ids.numpy()]).tolist()

    def _host(self, layer: int, tid2eid: torch.Tensor) -> np.ndarray:
        """tid2eid on the host, copied once per layer (a [V, k] table of a few MB at most)."""
        held = self._held.get(layer)
        if held is None or held[0] is not tid2eid:
            held = (tid2eid, tid2eid.cpu().numpy())
            self._held[layer] = held
        return held[1]


class Prefetcher:
    def __init__(self, cache) -> None:
        self.cache = cache
        self._pending: dict[int, tuple[str, set[int]]] = {}
        self._scores = {"hash": _Score(), "speculative": _Score()}
        self._issued = {"hash": 0, "speculative": 0}
        self.tid2eid = HostTid2Eid()

    def hash_layer(self, layer: int, tid2eid: torch.Tensor, token_ids: torch.Tensor) -> list[int]:
        ids = self.tid2eid.experts(layer, tid2eid, token_ids)
        self._predict("hash", layer, ids)
        return ids

    def speculate(self, layer: int, expert_ids: torch.Tensor) -> list[int]:
        """expert_ids [T, k]: the model's guess at the layer's routing (its own router, its own scoring)."""
        return self.speculated(layer, torch.unique(expert_ids).tolist())

    def speculated(self, layer: int, ids: list[int]) -> list[int]:
        """`speculate` for a guess already read on the host: `ids` sorted and distinct."""
        self._predict("speculative", layer, ids)
        return ids

    def _predict(self, kind: str, layer: int, ids: list[int]) -> None:
        self._pending[layer] = (kind, set(ids))
        # Hash-layer ids are certain, so they may wait for link room; speculation never delays the token.
        block = kind == "hash"
        for e in ids[: self.cache.capacity(layer)]:
            self._issued[kind] += self.cache.prefetch((layer, e), block=block)

    def observe(self, layer: int, used: list[int]) -> None:
        """Called by the backend with the experts layer `layer` actually used; scores the pending prediction."""
        pending = self._pending.pop(layer, None)
        if pending is None:
            return
        kind, predicted = pending
        s, used_set = self._scores[kind], set(used)
        s.predicted += len(predicted)
        s.used += len(used_set)
        s.correct += len(predicted & used_set)

    def stats(self) -> tuple[PrefetchStats, ...]:
        return tuple(PrefetchStats(k, s.predicted, s.used, s.correct, self._issued[k]) for k, s in self._scores.items())
