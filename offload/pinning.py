"""Page-locking an already-filled host arena in chunks, without the caching host allocator's power-of-two rounding.

`torch.empty(n, pin_memory=True)` goes through torch's caching host allocator, which rounds each request up to a
power of two (137 GiB of V4-Flash experts would ask for 256 GiB). Instead the arena is ordinary pageable memory,
filled once, and its first `budget` bytes are registered with `cudaHostRegister` in chunks (page-aligned, the last
one shorter: the pinned bytes are exactly what was asked, rounded to a page). Registration can fail (no CUDA, a
memlock limit, a refusal from the driver): the chunks pinned so far stay pinned, the rest stays pageable, and the
status says why in one warning. Never an exception, never an out-of-memory.
"""

from __future__ import annotations

import mmap
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

PAGE_BYTES = mmap.PAGESIZE
DEFAULT_CHUNK_BYTES = 1 << 30  # 1 GiB per cudaHostRegister call: long enough to be cheap, short enough to stop early
# Registrar: (address, nbytes) -> None (success) or a reason string; unregistrar: (address) -> None.
Registrar = Callable[[int, int], "str | None"]


@dataclass
class PinStatus:
    """What happened when the arena was pinned: `state` "pinned" (the whole requested range), "partial" (a prefix of
    it), "pageable" (nothing: pinning unavailable or refused) or "off" (not asked)."""

    state: str = "off"
    requested_bytes: int = 0
    pinned_bytes: int = 0
    chunks: int = 0
    reason: str = ""
    ranges: list = field(default_factory=list)  # (address, nbytes) registered

    def to_dict(self) -> dict:
        return {"state": self.state, "requested_bytes": self.requested_bytes, "pinned_bytes": self.pinned_bytes,
                "chunks": self.chunks, "reason": self.reason}


def chunk_ranges(nbytes: int, budget_bytes: int | None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 page_bytes: int = PAGE_BYTES) -> list[tuple[int, int]]:
    """(offset, length) chunks covering the first min(nbytes, budget) bytes of a page-aligned arena: every chunk
    starts on a page boundary, every chunk but the last is `chunk_bytes` (rounded down to pages, at least a page),
    the total is the covered bytes rounded UP to a page only when that still fits the budget (else down)."""
    if nbytes <= 0:
        return []
    want = nbytes if budget_bytes is None else min(nbytes, max(0, int(budget_bytes)))
    total = -(-want // page_bytes) * page_bytes
    if budget_bytes is not None and total > budget_bytes:
        total = (want // page_bytes) * page_bytes
    step = max(page_bytes, (int(chunk_bytes) // page_bytes) * page_bytes)
    return [(off, min(step, total - off)) for off in range(0, total, step)]


def page_aligned_empty(nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(backing, arena): an uninitialized pageable uint8 arena of `nbytes` whose first byte is page-aligned (a view into
    `backing`, which is one page longer)."""
    backing = torch.empty(nbytes + PAGE_BYTES, dtype=torch.uint8)
    skip = (-backing.data_ptr()) % PAGE_BYTES
    return backing, backing[skip:skip + nbytes]


def cuda_registrar() -> tuple[Registrar | None, Callable[[int], None] | None, str]:
    """cudaHostRegister / cudaHostUnregister through torch's cudart binding, or (None, None, why not)."""
    if not torch.cuda.is_available():
        return None, None, "no CUDA device: pinning is unavailable"
    try:
        rt = torch.cuda.cudart()
    except Exception as exc:  # noqa: BLE001 - any failure means the same: pageable memory
        return None, None, f"cudart unavailable ({type(exc).__name__}: {exc})"

    def register(addr: int, n: int) -> str | None:
        rc = rt.cudaHostRegister(addr, n, 0)
        code = int(getattr(rc, "value", rc))
        return None if code == 0 else f"cudaHostRegister returned error {code}"

    def unregister(addr: int) -> None:
        rt.cudaHostUnregister(addr)

    return register, unregister, ""


class PinnedArena:
    """Pins the first `budget_bytes` of `arena` (page-aligned, uint8) in chunks; unpins them on `close()` or when
    garbage-collected. `registrar` defaults to CUDA's (tests pass fakes to exercise refusals)."""

    def __init__(self, arena: torch.Tensor, budget_bytes: int | None, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 registrar: tuple | None = None, warn: bool = True) -> None:
        register, unregister, why = registrar if registrar is not None else cuda_registrar()
        ranges = chunk_ranges(arena.numel(), budget_bytes, chunk_bytes)
        self.status = PinStatus(requested_bytes=sum(n for _, n in ranges))
        if not ranges:
            return
        base = arena.data_ptr()
        if register is None:
            self.status.state, self.status.reason = "pageable", why
        else:
            for off, n in ranges:
                try:
                    err = register(base + off, n)
                except Exception as exc:  # noqa: BLE001 - a refusal of any kind leaves the rest pageable
                    err = f"{type(exc).__name__}: {exc}"
                if err:
                    self.status.reason = err
                    break
                self.status.ranges.append((base + off, n))
                self.status.pinned_bytes += n
                self.status.chunks += 1
            full = self.status.pinned_bytes == self.status.requested_bytes
            self.status.state = "pinned" if full else "partial" if self.status.pinned_bytes else "pageable"
        if self.status.state != "pinned" and warn:
            warnings.warn(
                f"expert arena: {self.status.pinned_bytes} of {self.status.requested_bytes} B pinned "
                f"({self.status.reason}); the rest stays in pageable memory, whose host-to-device copies are staged "
                "and slower", RuntimeWarning, stacklevel=3)
        # Unregister before the memory goes: the finalizer holds the ranges and the arena, not `self`.
        self._finalizer = weakref.finalize(self, _unregister_all, unregister, list(self.status.ranges), arena)

    def pinned_prefix(self) -> int:
        """Bytes from the arena's start that are page-locked."""
        return self.status.pinned_bytes

    def close(self) -> None:
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        self.status.ranges = []


def _unregister_all(unregister, ranges, _arena) -> None:
    if unregister is None:
        return
    for addr, _ in ranges:
        try:
            unregister(addr)
        except Exception:  # noqa: BLE001 - shutdown path: nothing to do about a failed unregister
            pass


def default_pin_budget() -> int:
    """Without a plan's host budget: at most the physical RAM less max(8 GiB, 10%) (the OS and the rest of the
    process keep that much pageable)."""
    try:
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
    return max(0, total - max(8 << 30, total // 10))
