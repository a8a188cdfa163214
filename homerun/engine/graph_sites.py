"""Decode graphs across devices (issue 13): the step's path embedding -> layers -> head cut into runs of consecutive
sites on one device, each run replayed as a graph captured on that device (homerun.engine.graphs' runner), the
residual streams copied between runs.

A site is a placement device name ("cuda:1", "standin:1"), not a torch device: CUDA stand-ins all compute on the CPU
yet are distinct devices of the plan, so the runner cuts the step where CUDA would have to and the stand-in tests
see the same segments, graphs and hops. `ShardedStaticKV` is the whole-step attention state of such a step: one
StaticDecodeKV per run, over that run's layers, with its buffers (and its copy of the compressed RoPE frequencies)
on the run's device, behind StaticDecodeKV's interface with global layer positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Sequence

import torch

from homerun.kernels.device_guard import on_device  # noqa: F401 - re-exported: a run's section guard
from homerun.models.deepseek_v4.static_decode import StaticDecodeKV


@dataclass(frozen=True)
class Run:
    """Consecutive parts of the step on one site: the embedding (first run only), layer positions lo..hi-1, the
    head (last run only)."""

    site: str
    device: torch.device
    embed: bool
    layers: range
    head: bool


def step_runs(net, sites: Sequence[str] | None = None) -> list[Run]:
    """The step's runs. sites: the placement's device names for [embedding, layer 0.., head] (None: the torch
    devices' names, which cannot tell stand-ins apart)."""
    devs = [net.device] + [lay.device or net.device for lay in net.layers] + [net.head_device or net.device]
    names = list(sites) if sites is not None else [str(d) for d in devs]
    if len(names) != len(devs):
        raise ValueError(f"{len(names)} sites for an embedding, {len(net.layers)} layers and a head")
    n = len(net.layers)
    runs: list[Run] = []
    start = 0
    for k in range(1, len(names) + 1):
        if k == len(names) or names[k] != names[start]:
            lo, hi = max(start - 1, 0), min(k - 1, n)  # items 1..n are the layers
            runs.append(Run(names[start], devs[start], start == 0, range(lo, max(lo, hi)), k == len(names)))
            start = k
    return runs


def placement_sites(placement) -> list[str]:
    """The sites of a placement's step (homerun.engine.placement.Placement): [embedding, layers.., head]."""
    return [placement.embed_device, *(lp.device for lp in placement.layers), placement.head_device]


class _Arenas:
    """The shards' arenas as one (the runner's capture reset snapshots and restores every buffer)."""

    def __init__(self, shards: Sequence[StaticDecodeKV]) -> None:
        self.bufs = {(j, dt): t for j, kv in enumerate(shards) for dt, t in kv.arena.bufs.items()}

    def snapshot(self) -> dict:
        return {k: t.clone() for k, t in self.bufs.items()}


class ShardedStaticKV:
    """StaticDecodeKV's interface over several devices: one shard per run that holds layers (global layer positions
    in, each shard sees its own)."""

    def __init__(self, net, runs: Sequence[Run], ctx_tokens: int, accounts: Sequence[Any],
                 like: Sequence[Any] | None = None) -> None:
        self.ctx_tokens = ctx_tokens
        self.runs = [r for r in runs if len(r.layers)]
        self.shards: list[StaticDecodeKV] = []
        self.where: dict[int, tuple[int, int]] = {}  # layer position -> (shard, its position there)
        freqs: dict[torch.device, torch.Tensor] = {}
        for r in self.runs:
            f = freqs.setdefault(r.device, net.freqs_compress.to(r.device))
            part = SimpleNamespace(args=net.args, layers=[net.layers[i] for i in r.layers],
                                   compute_dtype=net.compute_dtype, device=r.device, freqs_compress=f)
            with on_device(r.device, r.site):
                self.shards.append(StaticDecodeKV(part, ctx_tokens, [accounts[i] for i in r.layers],
                                                  [like[i] for i in r.layers] if like is not None else None))
            for local, i in enumerate(r.layers):
                self.where[i] = (len(self.shards) - 1, local)
        self.arena = _Arenas(self.shards)

    @property
    def layers(self) -> list:
        return [lay for kv in self.shards for lay in kv.layers]

    def shard_of_run(self, run: Run) -> StaticDecodeKV:
        return self.shards[self.runs.index(run)]

    def load(self, states, pos: int, layers: Sequence[int] | None = None) -> None:
        layers = range(len(self.where)) if layers is None else layers
        for j, (r, kv) in enumerate(zip(self.runs, self.shards)):
            mine = [self.where[i][1] for i in layers if self.where[i][0] == j]
            if mine:
                kv.load([states[i] for i in r.layers], pos, mine)

    def states(self, pos: int) -> list:
        return [st for kv in self.shards for st in kv.states(pos)]

    def core(self, i: int, pa, k) -> torch.Tensor:
        j, local = self.where[i]
        return self.shards[j].core(local, pa, k)
