"""Routing traces: which experts each token used at each layer, as JSONL, plus seeded synthetic generators.

File format: one header line `{"model", "n_layers", "n_experts", "top_k"}`, then one line per token per layer
`{"token": t, "layer": l, "experts": [...]}`. `TracingBackend` records a trace during generation by wrapping any
`ExpertBackend`. The two seeded generators reproduce the two published routing patterns (peers.md §1.2, §4):
- `skewed_trace`: strong static popularity ("10% of experts take 80-81% of hits, 30% take 95-96%"), tokens
  independent;
- `reuse_trace`: weak static skew (a learned top-32 of 512 experts covers ~10% of held-out hits) but strong
  token-to-token reuse ("a per-layer LRU-64 hits ~67%, LRU-128 ~81%, 512 experts, 10 per token"), modeled by
  LRU stack distances.
Both emit one record per (token, layer) with `top_k` distinct experts, in execution order (all layers of token t,
then token t+1), which is the sequence a global cache keyed by (layer, expert) sees.
This module does not simulate caches (offload/simulate.py does).
"""

from __future__ import annotations

import functools
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

import torch

from homerun.errors import ConfigError, UsageError
from offload.base import WrappingBackend

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


class TracingBackend(WrappingBackend):
    """An ExpertBackend that records every routing decision, then delegates. Token t is the t-th row a layer has
    seen, so prefill rows and decode steps number consistently across layers (every row, routes_every_row)."""

    routes_every_row = True

    def __init__(self, inner, recorder: TraceRecorder) -> None:
        super().__init__(inner)
        self.recorder = recorder
        self._next_token: dict[int, int] = {}

    def begin_token(self, n_tokens: int, speculate: bool = True) -> bool:
        return False  # no speculation under a trace: a redo would record its layers' routing twice

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor):
        t0 = self._next_token.get(layer, 0)
        for i, row in enumerate(expert_ids.tolist()):
            self.recorder.record(t0 + i, layer, row)
        self._next_token[layer] = t0 + len(expert_ids)
        return self.inner.forward(layer, x, expert_ids, expert_weights)


def read_trace(path: str | Path) -> RoutingTrace:
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read trace {path}: {exc.strerror}", hint="pass a JSONL routing trace") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"trace {path}: not a UTF-8 text file (byte {exc.start}: {exc.reason})",
                          hint="pass a JSONL routing trace (written by --trace)") from None
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


def _check_shape(n_layers: int, n_experts: int, top_k: int) -> None:
    if n_layers < 1 or not 1 <= top_k <= n_experts:
        raise UsageError(f"synthetic trace needs n_layers >= 1 and 1 <= top_k <= n_experts, got n_layers={n_layers}, "
                         f"n_experts={n_experts}, top_k={top_k}", hint="e.g. 4 layers, 256 experts, top_k 6")


def _inclusion_probs(w: torch.Tensor, top_k: int) -> torch.Tensor:
    # Rosen's approximation for drawing top_k without replacement proportionally to w (what torch.multinomial
    # does): P(i chosen) = 1 - exp(-lam * w_i), with lam set so the probabilities sum to top_k.
    if top_k >= len(w):
        return torch.ones_like(w)
    lo, hi = 0.0, 1.0 / float(w.max())
    while float((1 - torch.exp(-hi * w)).sum()) < top_k:
        hi *= 2
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((1 - torch.exp(-mid * w)).sum()) < top_k else (lo, mid)
    return 1 - torch.exp(-(lo + hi) / 2 * w)


def _popularity_law(n_experts: int, exponent: float, cutoff: float) -> torch.Tensor:
    i = torch.arange(n_experts, dtype=torch.float64)
    return torch.exp(-exponent * torch.log1p(i) - cutoff * i / n_experts)  # Zipf with an exponential cutoff


@functools.lru_cache(maxsize=32)
def _fit_popularity(n_experts: int, top_k: int, points: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """(exponent, cutoff) of the popularity law whose realized hit shares (top-k draws without replacement) match
    `points` = ((fraction of experts, share of hits), ...): the first point fixes the exponent, the second the
    cutoff. Nested bisection: the head share rises with the exponent, the second share with the cutoff."""
    def share(exponent: float, cutoff: float, frac: float) -> float:
        p = _inclusion_probs(_popularity_law(n_experts, exponent, cutoff), top_k)
        return float(p[:max(1, round(frac * n_experts))].sum() / p.sum())

    def exponent_for(cutoff: float) -> float:
        (frac, target), lo, hi = points[0], 0.0, 10.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if share(mid, cutoff, frac) < target else (lo, mid)
        return (lo + hi) / 2

    if len(points) < 2:
        return exponent_for(0.0), 0.0
    (frac2, target2), lo, hi = points[1], 0.0, 100.0
    if share(exponent_for(0.0), 0.0, frac2) >= target2:  # pure Zipf already reaches the second share
        return exponent_for(0.0), 0.0
    for _ in range(25):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(exponent_for(mid), mid, frac2) < target2 else (lo, mid)
    cutoff = (lo + hi) / 2
    return exponent_for(cutoff), cutoff


def skewed_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, *, hot_fraction: float = 0.1,
                 hot_share: float = 0.805, warm_fraction: float = 0.3, warm_share: float = 0.955, seed: int = 0,
                 model: str = "synthetic-skewed") -> RoutingTrace:
    """Strong static skew (llama.cpp #24524: "10% of experts take 80-81% of hits, the top 30% take 95-96%").

    Model: tokens are independent; each (token, layer) draws `top_k` distinct experts without replacement from a
    fixed per-layer popularity p_i ∝ (i+1)^-s · exp(-c·i/n), whose (s, c) are fitted so that the top
    `hot_fraction` of experts receive `hot_share` of the hits and the top `warm_fraction` receive `warm_share`.
    Popular experts differ per layer (a random permutation each). No temporal locality beyond the skew, so a
    frequency ranking (LFU) is close to the best online policy here (`skewed_online_bound`)."""
    _check_shape(n_layers, n_experts, top_k)
    g = torch.Generator().manual_seed(seed)
    exponent, cutoff = _fit_popularity(n_experts, top_k, ((hot_fraction, hot_share), (warm_fraction, warm_share)))
    w = _popularity_law(n_experts, exponent, cutoff).expand(n_tokens, n_experts)
    per_layer = []
    for _ in range(n_layers):
        perm = torch.randperm(n_experts, generator=g)
        per_layer.append(perm[torch.multinomial(w, top_k, replacement=False, generator=g)].tolist())
    records = [TraceRecord(t, l, tuple(per_layer[l][t])) for t in range(n_tokens) for l in range(n_layers)]
    return RoutingTrace(TraceHeader(model, n_layers, n_experts, top_k), tuple(records))


def skewed_online_bound(n_layers: int, n_experts: int, top_k: int, cache_slots: Sequence[int], *,
                        hot_fraction: float = 0.1, hot_share: float = 0.805, warm_fraction: float = 0.3,
                        warm_share: float = 0.955) -> dict[int, float]:
    """Upper bound on the expected hit rate of ANY online policy with a global cache of N slots on `skewed_trace`
    with the same popularity arguments; {N: bound}. Tokens are independent, so a token's hits are at most the N
    largest P((layer, expert) used by this token) (the argument of `reuse_online_bound`); the same every token.
    Inclusion probabilities by Rosen's approximation (within ~1% of Monte Carlo)."""
    exponent, cutoff = _fit_popularity(n_experts, top_k, ((hot_fraction, hot_share), (warm_fraction, warm_share)))
    incl = _inclusion_probs(_popularity_law(n_experts, exponent, cutoff), top_k)
    ranked = torch.sort(incl.repeat(n_layers), descending=True).values.cumsum(0)
    return {int(n): float(ranked[min(int(n), len(ranked)) - 1]) / (n_layers * top_k) for n in cache_slots}


def reuse_trace(n_tokens: int, n_layers: int, n_experts: int, top_k: int, *, reuse_prob: float = 0.93,
                stack_alpha: float = 2.0, stack_offset_tokens: float = 3.0, pop_exponent: float = 0.65,
                seed: int = 0, model: str = "synthetic-reuse") -> RoutingTrace:
    """Weak static skew, strong token-to-token reuse (llama.cpp #27861, 512 experts, 10 routed per token: a per-layer
    LRU-64 hits ~67%, LRU-128 ~81%; a top-32 list learned on one half of the trace covers ~10% of the other half).

    Model (an LRU stack-distance model): each layer keeps its experts in recency order. Each of a token's `top_k`
    distinct experts is, with probability `reuse_prob`, the expert at stack depth d with P(d) ∝ (d + d0)^-alpha,
    d0 = `stack_offset_tokens`·top_k (reuse reaches back a few tokens, not just the last one); otherwise it is
    drawn from a mild static popularity p_i ∝ (i+1)^-`pop_exponent`. After the token, its experts move to the top.
    The defaults reproduce the three #27861 figures at 512 experts / top-10 (tests/test_simulate.py checks them).
    Because P(d) falls with depth, LRU is close to the best online policy here (`reuse_online_bound`)."""
    _check_shape(n_layers, n_experts, top_k)
    steps = _reuse_process(n_tokens, n_layers, n_experts, top_k, reuse_prob, stack_alpha, stack_offset_tokens,
                           pop_exponent, seed, want_probs=False)
    records = tuple(TraceRecord(t, l, tuple(chosen)) for t, l, chosen, _ in steps)
    return RoutingTrace(TraceHeader(model, n_layers, n_experts, top_k), records)


def reuse_online_bound(n_tokens: int, n_layers: int, n_experts: int, top_k: int, cache_slots: Sequence[int], *,
                       reuse_prob: float = 0.93, stack_alpha: float = 2.0, stack_offset_tokens: float = 3.0,
                       pop_exponent: float = 0.65, seed: int = 0) -> dict[int, float]:
    """Upper bound on the expected hit rate of ANY online policy (no future knowledge) with a global cache of N
    slots, on the `reuse_trace` of the same arguments; {N: bound}.

    Why it bounds: a (token, layer) group's experts are distinct, so its hits are at most |G ∩ S|, S = that layer's
    keys resident when the group starts, and S depends only on the past: E[hits] <= sum over S of P(e in G | past).
    At the start of each token every layer's S is resident at once, so sum |S_l| <= N, and the token's hits are at
    most the N largest P(e in G | past) over all (layer, expert). Summed over tokens, divided by the accesses.
    P(e in G) uses Rosen's approximation of without-replacement inclusion (within ~1% of Monte Carlo)."""
    _check_shape(n_layers, n_experts, top_k)
    totals = {int(n): 0.0 for n in cache_slots}
    per_token: list[torch.Tensor] = []
    for _, l, _, incl in _reuse_process(n_tokens, n_layers, n_experts, top_k, reuse_prob, stack_alpha,
                                        stack_offset_tokens, pop_exponent, seed, want_probs=True):
        per_token.append(incl)
        if l == n_layers - 1:
            ranked = torch.sort(torch.cat(per_token), descending=True).values.cumsum(0)
            for n in totals:
                totals[n] += float(ranked[min(n, len(ranked)) - 1])
            per_token = []
    n_accesses = n_tokens * n_layers * top_k
    return {n: v / n_accesses for n, v in totals.items()}


def _reuse_process(n_tokens, n_layers, n_experts, top_k, reuse_prob, stack_alpha, stack_offset_tokens, pop_exponent,
                   seed, *, want_probs: bool) -> Iterator[tuple[int, int, list[int], torch.Tensor | None]]:
    """The reuse model's steps: (token, layer, chosen experts, each expert's inclusion probability for this group
    given the past, or None). One RNG path for both uses, so the bound describes exactly the generated trace."""
    rng = random.Random(seed)
    d0 = stack_offset_tokens * top_k
    dist_w = [(d + d0) ** -stack_alpha for d in range(n_experts)]
    pop_w = [(i + 1) ** -pop_exponent for i in range(n_experts)]
    dist_cum, pop_cum = list(itertools.accumulate(dist_w)), list(itertools.accumulate(pop_w))
    ids = range(n_experts)
    stacks = []
    for _ in range(n_layers):
        perm = list(range(n_experts))
        rng.shuffle(perm)
        stacks.append((perm, perm[:]))  # (popularity order, LRU stack most-recent-first)
    if want_probs:
        dist_p = torch.tensor(dist_w, dtype=torch.float64) / sum(dist_w) * reuse_prob
        pop_by_expert = []
        for perm, _ in stacks:
            v = torch.zeros(n_experts, dtype=torch.float64)
            v[torch.tensor(perm)] = torch.tensor(pop_w, dtype=torch.float64) / sum(pop_w) * (1 - reuse_prob)
            pop_by_expert.append(v)
    for t in range(n_tokens):
        for l in range(n_layers):
            pop_order, stack = stacks[l]
            incl = None
            if want_probs:
                q = pop_by_expert[l].clone()
                q[torch.tensor(stack)] += dist_p
                incl = _inclusion_probs(q, top_k)
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
            yield t, l, chosen, incl
