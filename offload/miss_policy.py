"""Where to serve each cache miss: compute it on the CPU from the host buffer, or stream it to the device.

Per missed expert with n tokens routed to it:
  t_cpu(n)    = expert_bytes / cpu_gbps + n * flops / cpu_flops + n * act_bytes / link_gbps   (read weights in DRAM)
  t_stream(n) = expert_bytes / link_gbps + n * flops / device_flops                          (ship weights over PCIe)
The two paths run concurrently but both read host DRAM (the CPU's loads and the link's DMA), so the split minimizes
the makespan max(sum t_cpu, sum t_stream, all bytes read / host_dram_gbps). At batch 1 this sends most misses to
the CPU, at prefill (many tokens per expert) nearly all to the device, and in between both at once.
`link_gbps` and `cpu_gbps` start from priors (the plan's profile) and then follow measured values (exponential
moving average). A path only gets measured when it gets work, so one slow call could starve it for good: every
split that gives a path nothing pulls its estimate a step back toward the prior (`recover`), and after
`probe_every` such splits with misses, one miss is sent to the starved CPU path as a probe, whose measurement
then decides. This module only decides; it moves and computes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from homerun.errors import UsageError

MODES = ("auto", "cpu", "stream")


@dataclass(frozen=True)
class MissCosts:
    expert_bytes: int
    flops_per_token: float  # 2 * 3 * D * I for one SwiGLU expert
    act_bytes_per_token: int  # x to the CPU and y back
    link_gbps: float = 25.0  # PCIe 4.0 x16 pinned, measured-typical (NVIDIA/nvbandwidth #15: 23.9-26.4)
    cpu_gbps: float = 40.0  # DRAM bytes/s the CPU expert kernel achieves
    host_dram_gbps: float = 60.0  # what CPU loads and link DMA share (dual-channel DDR5: reddit 1lwnj5x)
    cpu_gflops: float = 500.0
    device_gflops: float = 50_000.0

    def cpu_s(self, n_tokens: int) -> float:
        return (self.expert_bytes / (self.cpu_gbps * 1e9) + n_tokens * self.flops_per_token / (self.cpu_gflops * 1e9)
                + n_tokens * self.act_bytes_per_token / (self.link_gbps * 1e9))

    def stream_s(self, n_tokens: int) -> float:
        return self.expert_bytes / (self.link_gbps * 1e9) + n_tokens * self.flops_per_token / (self.device_gflops * 1e9)

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass(frozen=True)
class MissSplit:
    cpu: tuple[int, ...]  # expert ids computed on the CPU
    stream: tuple[int, ...]  # expert ids streamed to the device
    predicted_s: float  # makespan the model predicts for the misses


class MissPolicy:
    MIN_GAIN = 0.05  # streaming must beat the all-CPU plan by 5% of its predicted time

    def __init__(self, costs: MissCosts, *, mode: str = "auto", ewma: float = 0.2, recover: float = 0.02,
                 probe_every: int = 32) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown miss mode {mode!r}", hint=f"choose one of {', '.join(MODES)}")
        self.costs, self.mode, self.ewma = costs, mode, ewma
        self.prior = costs
        self.recover, self.probe_every = recover, max(1, int(probe_every))
        self.n_cpu = 0
        self.n_stream = 0
        self.n_probes = 0
        self._cpu_idle = 0  # splits with misses since the CPU path last got work
        self._link_idle = 0
        self._cpu_memo: dict[tuple, bool] = {}  # (costs, max misses) -> cpu_possible for one token

    def split(self, misses: dict[int, int], *, cpu_available: bool = True) -> MissSplit:
        """misses: expert id -> tokens routed to it. Returns which ids go to which path."""
        ids = list(misses)
        if not ids:
            return MissSplit((), (), 0.0)
        c = self.costs
        if self.mode == "stream" or not cpu_available:
            plan = MissSplit((), tuple(ids), sum(c.stream_s(misses[e]) for e in ids))
        elif self.mode == "cpu":
            plan = MissSplit(tuple(ids), (), sum(c.cpu_s(misses[e]) for e in ids))
        else:
            plan = self._best_split(misses)
            if not plan.cpu and self._probe_due() and plan.stream:
                probe = min(plan.stream, key=lambda e: c.cpu_s(misses[e]) / c.stream_s(misses[e]))
                plan = MissSplit((probe,), tuple(e for e in plan.stream if e != probe), plan.predicted_s)
                self.n_probes += 1
        self._starve(plan)
        self.n_cpu += len(plan.cpu)
        self.n_stream += len(plan.stream)
        return plan

    def _probe_due(self) -> bool:
        degraded = self.costs.cpu_gbps < 0.9 * self.prior.cpu_gbps  # only a lowered estimate needs a probe
        return degraded and self._cpu_idle + 1 >= self.probe_every

    def cpu_possible(self, n_tokens: int, max_misses: int, *, cpu_available: bool = True) -> bool:
        """Whether the next `split` of a call's misses may give the CPU one, at the current estimates (it reads them
        only). Exact for a one-token call (each missed expert has one token: the split depends only on how many
        missed, at most `max_misses`); for more tokens, True unless the mode rules the CPU out."""
        if not cpu_available or self.mode == "stream":
            return False
        if self.mode == "cpu" or n_tokens != 1 or self._probe_due():
            return True
        # The costs change only when a split or a measurement replaces them (a call that missed or moved experts), so
        # this is worked out once per such call: up to ~46 us when 8 misses all stream, 0.4 us memoized.
        key = (self.costs, max_misses)
        if key not in self._cpu_memo:
            if len(self._cpu_memo) > 64:
                self._cpu_memo.clear()
            self._cpu_memo[key] = any(self._best_split(dict.fromkeys(range(m), 1)).cpu
                                      for m in range(max_misses, 0, -1))  # the CPU's share grows with m
        return self._cpu_memo[key]

    def _starve(self, plan: MissSplit) -> None:
        """A path left idle drifts back toward its prior (its last measurement may have been one slow call)."""
        self._cpu_idle = 0 if plan.cpu else self._cpu_idle + 1
        self._link_idle = 0 if plan.stream else self._link_idle + 1
        c, p, r = self.costs, self.prior, self.recover
        if not plan.cpu:
            c = replace(c, cpu_gbps=c.cpu_gbps + r * (p.cpu_gbps - c.cpu_gbps))
        if not plan.stream:
            c = replace(c, link_gbps=c.link_gbps + r * (p.link_gbps - c.link_gbps))
        self.costs = c

    def _best_split(self, misses: dict[int, int]) -> MissSplit:
        # Experts that are relatively cheapest to stream go first; try every prefix as the streamed set.
        c = self.costs
        order = sorted(misses, key=lambda e: c.stream_s(misses[e]) / c.cpu_s(misses[e]))
        t_stream = [c.stream_s(misses[e]) for e in order]
        t_cpu = [c.cpu_s(misses[e]) for e in order]
        # Every miss reads its weights from host DRAM once, whichever path takes it.
        dram_s = len(order) * c.expert_bytes / (c.host_dram_gbps * 1e9)
        best_k, best_s = 0, max(sum(t_cpu), dram_s)
        s_stream, s_cpu, all_cpu_s = 0.0, sum(t_cpu), best_s
        for k in range(1, len(order) + 1):
            s_stream += t_stream[k - 1]
            s_cpu -= t_cpu[k - 1]
            if max(s_stream, s_cpu, dram_s) < best_s:
                best_k, best_s = k, max(s_stream, s_cpu, dram_s)
        if best_s > (1 - self.MIN_GAIN) * all_cpu_s:  # a marginal modeled gain is not worth evicting cached experts
            best_k, best_s = 0, all_cpu_s
        return MissSplit(tuple(order[best_k:]), tuple(order[:best_k]), best_s)

    def observe_link(self, nbytes: int, seconds: float) -> None:
        """A measured copy (or a batch of them) over the host link."""
        if nbytes > 0 and seconds > 0:
            self.costs = replace(self.costs, link_gbps=self._blend(self.costs.link_gbps, nbytes / seconds / 1e9))

    def observe_cpu(self, n_experts: int, n_tokens: int, seconds: float) -> None:
        """A measured CPU expert computation: attribute the time beyond the modeled FLOPs to weight reads."""
        if n_experts <= 0 or seconds <= 0:
            return
        flop_s = n_tokens * self.costs.flops_per_token / (self.costs.cpu_gflops * 1e9)
        read_s = max(seconds - flop_s, seconds * 0.1)
        gbps = n_experts * self.costs.expert_bytes / read_s / 1e9
        self.costs = replace(self.costs, cpu_gbps=self._blend(self.costs.cpu_gbps, gbps))

    def _blend(self, old: float, new: float) -> float:
        return (1 - self.ewma) * old + self.ewma * new

    def to_dict(self) -> dict:
        return {"mode": self.mode, "n_cpu": self.n_cpu, "n_stream": self.n_stream, "n_probes": self.n_probes,
                "costs": self.costs.to_dict()}


def costs_for_expert(expert_bytes: int, hidden: int, intermediate: int, **measured) -> MissCosts:
    """Cost model for SwiGLU experts of width `intermediate` on `hidden`; `measured` overrides the priors."""
    return MissCosts(expert_bytes=expert_bytes, flops_per_token=6.0 * hidden * intermediate,
                     act_bytes_per_token=2 * 4 * hidden, **measured)
