"""Routing traces: which experts each token used at each layer, as JSONL, plus seeded synthetic generators.

File format: one header line `{"model", "n_layers", "n_experts", "top_k"}`, then one line per token per layer
`{"token": t, "layer": l, "experts": [...]}`. `TracingBackend` records a trace during generation by wrapping any
`ExpertBackend`. The two generators reproduce the two published routing patterns (peers.md §1.2):
- `skewed_trace`: strong static popularity, "10% of experts take 80% of hits", tokens independent;
- `reuse_trace`: weak static skew (top-32 of 512 experts ~10% of hits) but strong token-to-token reuse
  ("LRU-64 ~67%, LRU-128 ~81% hit with 512 experts"), modeled by LRU stack distances.
This module does not simulate caches (offload/simulate.py does).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import torch

from homerun.errors import ConfigError, UsageError

ExpertKey = tuple[int, int]


@dataclass(frozen=True)
class TraceHeader:
    model: str
    n_layers: int
    n_experts: int
    top_k: int

    def to_dict(self) -> dict:
        return {"model": self.model, "n_layers": self.n_layers, "n_experts": self.n_experts, "top_k": self.top_k}


@dataclass(frozen=True)
class TraceRecord:
    token: int
    layer: int
    experts: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"token": self.token, "layer": self.layer, "experts": list(self.experts)}


@dataclass(frozen=True)
class RoutingTrace:
    header: TraceHeader
    records: tuple[TraceRecord, ...]

    def keys(self) -> list[ExpertKey]:
        """The access sequence a global cache keyed by (layer, expert) sees, in execution order."""
        return [(r.layer, e) for r in self.records for e in r.experts]

    @property
    def n_tokens(self) -> int:
        return len({r.token for r in self.records})

    def save(self, path: str | Path) -> None:
        with TraceRecorder(path, self.header) as rec:
            for r in self.records:
                rec.record(r.token, r.layer, r.experts)


class TraceRecorder:
    """Appends routing records to a JSONL file; use as a context manager or call close()."""

    def __init__(self, path: str | Path, header: TraceHeader) -> None:
        self.path = Path(path)
        self._f: IO[str] = open(self.path, "w", buffering=1)  # line-buffered: a killed run keeps its trace
        self._f.write(json.dumps(header.to_dict()) + "\n")

    def record(self, token: int, layer: int, experts) -> None:
        rec = {"token": int(token), "layer": int(layer), "experts": [int(e) for e in experts]}
        self._f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "TraceRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TracingBackend:
    """An ExpertBackend that records every routing decision, then delegates. Token t is the t-th row a layer has
    seen, so prefill rows and decode steps number consistently across layers."""

    def __init__(self, inner, recorder: TraceRecorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self._next_token: dict[int, int] = {}

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor):
        t0 = self._next_token.get(layer, 0)
        for i, row in enumerate(expert_ids.tolist()):
            self.recorder.record(t0 + i, layer, row)
        self._next_token[layer] = t0 + len(expert_ids)
        return self.inner.forward(layer, x, expert_ids, expert_weights)

    def __getattr__(self, name):  # stats(), prefetch hooks etc. of the wrapped backend stay reachable
        return getattr(self.inner, name)


def read_trace(path: str | Path) -> RoutingTrace:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read trace {path}: {exc.strerror}", hint="pass a JSONL routing trace") from None
    if not lines:
        raise ConfigError(f"trace {path} is empty", hint="the first line must be the header")
    header = _parse_header(path, lines[0])
    records = [_parse_record(path, i + 2, line, header) for i, line in enumerate(lines[1:]) if line.strip()]
    return RoutingTrace(header, tuple(records))


def _parse_header(path: Path, line: str) -> TraceHeader:
    try:
        d = json.loads(line)
        return TraceHeader(str(d["model"]), int(d["n_layers"]), int(d["n_experts"]), int(d["top_k"]))
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"trace {path} line 1: header must have model, n_layers, n_experts, top_k",
                          hint='e.g. {"model": "x", "n_layers": 43, "n_experts": 256, "top_k": 6}') from None


def _parse_record(path: Path, lineno: int, line: str, h: TraceHeader) -> TraceRecord:
    try:
        d = json.loads(line)
        rec = TraceRecord(int(d["token"]), int(d["layer"]), tuple(int(e) for e in d["experts"]))
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"trace {path} line {lineno}: expected {{token, layer, experts}}",
                          hint="one JSON object per token per layer") from None
    if not (0 <= rec.layer < h.n_layers) or any(not (0 <= e < h.n_experts) for e in rec.experts):
        raise ConfigError(f"trace {path} line {lineno}: layer or expert id out of the header's range",
                          hint=f"layers < {h.n_layers}, experts < {h.n_experts}")
    return rec


def _zipf_exponent_for(n_experts: int, hot_fraction: float, hot_share: float) -> float:
    # Bisection on s: the top hot_fraction of p_i ∝ (i+1)^-s holds hot_share of the mass.
    n_hot = max(1, round(n_experts * hot_fraction))
    lo, hi = 0.0, 8.0
    for _ in range(60):
        s = (lo + hi) / 2
        w = [(i + 1) ** -s for i in range(n_experts)]
        share = sum(w[:n_hot]) / sum(w)
        lo, hi = (s, hi) if share < hot_share else (lo, s)
    return (lo + hi) / 2


def skewed_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, *, hot_fraction: float = 0.1,
                 hot_share: float = 0.8, seed: int = 0, model: str = "synthetic-skewed") -> RoutingTrace:
    """Independent tokens over a per-layer Zipf popularity whose top `hot_fraction` of experts receive about
    `hot_share` of the hits. Popular experts differ per layer (a random permutation each)."""
    g = torch.Generator().manual_seed(seed)
    s = _zipf_exponent_for(n_experts, hot_fraction, hot_share)
    # top-k draws are without replacement, which flattens the realized share; a slightly steeper law compensates.
    w = (torch.arange(1, n_experts + 1, dtype=torch.float64) ** -(s * 1.15)).expand(n_tokens, n_experts)
    per_layer = []
    for _ in range(n_layers):
        perm = torch.randperm(n_experts, generator=g)
        per_layer.append(perm[torch.multinomial(w, top_k, replacement=False, generator=g)].tolist())
    records = [TraceRecord(t, l, tuple(per_layer[l][t])) for t in range(n_tokens) for l in range(n_layers)]
    return RoutingTrace(TraceHeader(model, n_layers, n_experts, top_k), tuple(records))


def reuse_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, *, reuse_prob: float = 0.95,
                stack_alpha: float = 1.2, seed: int = 0, model: str = "synthetic-reuse") -> RoutingTrace:
    """Weak static skew, strong reuse: with probability `reuse_prob` an expert is drawn from the layer's LRU stack
    at a distance d ~ (d+1)^-stack_alpha (recently used experts come back), otherwise from a mild popularity."""
    rng = random.Random(seed)
    dist_cum = list(itertools.accumulate((d + 1) ** -stack_alpha for d in range(n_experts)))
    pop_cum = list(itertools.accumulate((i + 1) ** -0.3 for i in range(n_experts)))  # weak static skew
    ids = range(n_experts)
    stacks = []
    for _ in range(n_layers):
        perm = list(range(n_experts))
        rng.shuffle(perm)
        stacks.append((perm, perm[:]))  # (popularity order, LRU stack most-recent-first)
    records = []
    for t in range(n_tokens):
        for l in range(n_layers):
            pop_order, stack = stacks[l]
            chosen: list[int] = []
            while len(chosen) < top_k:
                if rng.random() < reuse_prob:
                    e = stack[rng.choices(ids, cum_weights=dist_cum)[0]]
                else:
                    e = pop_order[rng.choices(ids, cum_weights=pop_cum)[0]]
                if e not in chosen:
                    chosen.append(e)
            for e in chosen:
                stack.remove(e)
                stack.insert(0, e)
            records.append(TraceRecord(t, l, tuple(chosen)))
    return RoutingTrace(TraceHeader(model, n_layers, n_experts, top_k), tuple(records))


def iter_keys(trace: RoutingTrace) -> Iterator[ExpertKey]:
    for r in trace.records:
        for e in r.experts:
            yield (r.layer, e)
