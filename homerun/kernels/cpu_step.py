"""Thread settings for one forward step on the CPU.

A decode step on a CPU is ~40 memory-bound native GEMVs separated by a few hundred tiny torch ops (norms, RoPE, the
attention over a short window). Two settings that suit prefill cost a decode step time:
- torch's second OpenMP thread: waking it for an op of a few microseconds costs more than the op (measured 176 vs
  277 us for the same op mix with 1 vs 2 threads on the 2-vCPU dev VM);
- the kernel pool's default short spin: its workers fall asleep in every gap between two GEMVs and each call then
  pays a futex wake-up.
So a short decode step runs torch's ops on the calling thread while the pool's workers spin through the gaps (they
have the other cores to themselves). The one-query attention itself runs on the pool (homerun.kernels.cpu_dense.attend_one)
at any context; long contexts keep torch's threads for the indexer, whose scores over every compressed entry grow
into matmuls big enough to split.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

DECODE_MAX_TOKENS = 4  # steps of at most this many new tokens count as decode steps
# Above this context the indexer's scores in a decode step (per CSA layer 64 heads x 128 dims per 4 context tokens,
# ~16M multiply-adds at 8K) grow long enough for torch's threads to pay. Measured on 2 vCPUs (3-layer model, decode
# step medians with / without this policy): 50.2 / 52.7 ms at 3.5K context, 46.1 / 50.7 ms at 8K.
ONE_THREAD_MAX_CTX_TOKENS = 8192
DECODE_SPIN_US = 2000  # longer than the longest gap between two kernels in a decode step (~1 ms of attention ops)


def decode_settings(n_new: int, n_ctx: int, on_cpu: bool) -> tuple[int, int] | None:
    """(torch threads, kernel-pool spin in us) for a step of n_new tokens after n_ctx, or None to keep the defaults."""
    if not on_cpu or n_new > DECODE_MAX_TOKENS or n_ctx + n_new > ONE_THREAD_MAX_CTX_TOKENS:
        return None
    return 1, DECODE_SPIN_US


@contextmanager
def cpu_step(n_new: int, n_ctx: int, on_cpu: bool) -> Iterator[None]:
    """Apply decode_settings for the duration of one step, then restore what was there; a CPU prefill step runs
    under the prefill heap policy (homerun.kernels.cpu_heap)."""
    settings = decode_settings(n_new, n_ctx, on_cpu)
    if settings is None:
        if on_cpu and n_new > DECODE_MAX_TOKENS:
            from homerun.kernels.cpu_heap import prefill_heap

            with prefill_heap():
                yield
            return
        yield
        return
    from homerun.kernels.cpu_experts import set_spin_us

    threads, spin_us = settings
    prev_threads = torch.get_num_threads()
    prev_spin = set_spin_us(spin_us)
    if threads != prev_threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads != prev_threads:
            torch.set_num_threads(prev_threads)
        if prev_spin is not None:
            set_spin_us(prev_spin)
