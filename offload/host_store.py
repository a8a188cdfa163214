"""Host expert store: ONE arena in host RAM holds every routed expert, each a contiguous buffer (codes + scales).

One buffer per expert means moving an expert to a device is one copy, and views into the buffer (host or device)
rebuild an `ExpertWeights` without copying. The arena is the only host copy: it is filled from the checkpoint (an
mmap) once, and afterwards both the CPU expert kernels (`store(layer, e)` views) and the DMA engine
(`store.buffer(key)`) read it. Its first bytes (the hottest experts, by the caller's priority order) are page-locked
in chunks with `cudaHostRegister` within the pinned budget (offload/pinning.py: no power-of-two rounding; a refusal
leaves the rest pageable with one warning). What does not fit the RAM budget goes to an optional disk-mmap tier,
which is slow and `notes()` says so. Tiers per expert: "pinned", "ram" (pageable part of the arena), "disk".
Buffer layout: w1 and w3 adjacent (w13 = cat([w1, w3]) rows), their scales adjacent, then w2 and its scale, so a
device slot holding the buffer is what the fused Triton MoE kernel reads (`ExpertLayout.kernel_views`).
This module does not choose which experts are hot and never touches a GPU beyond registering host pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from homerun.errors import CheckpointError, DoesNotFitError, UsageError
from offload.base import ExpertSource, ExpertWeights
from offload.pinning import DEFAULT_CHUNK_BYTES, PinnedArena, PinStatus, default_pin_budget, page_aligned_empty

ExpertKey = tuple[int, int]  # (layer, expert)
ALIGN_BYTES = 256  # every part starts on a 256 B boundary so device kernels can read it with wide loads
PARTS = ("w1", "w3", "w1_scale", "w3_scale", "w2", "w2_scale")
_UNALIGNED = ("w3", "w3_scale")  # follow w1 / w1_scale directly, so w13 and its scales are one [2I, ...] block each
TIERS = ("pinned", "ram", "disk")  # what `tier(key)` says
# What the disk tier delivers is the drive's random-read speed, far under RAM; used only to say how slow.
DISK_NOTE_GBPS = 3.0


@dataclass(frozen=True)
class PartSpec:
    name: str
    offset_bytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class ExpertLayout:
    """Where each tensor of an expert sits inside its buffer; identical for every expert of a model."""

    parts: tuple[PartSpec, ...]
    fmt: str
    stride_bytes: int  # buffer size, a multiple of ALIGN_BYTES

    @classmethod
    def from_expert(cls, w: ExpertWeights) -> "ExpertLayout":
        parts, off = [], 0
        for name in PARTS:
            t = getattr(w, name)
            off = off if name in _UNALIGNED else _align(off)
            parts.append(PartSpec(name, off, tuple(t.shape), t.dtype))
            off += t.numel() * t.element_size()
        return cls(tuple(parts), w.fmt, _align(off))

    def part(self, name: str) -> PartSpec:
        return next(p for p in self.parts if p.name == name)

    def kernel_views(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 slots [n, stride_bytes] (FP4 experts) -> the fused MoE kernels' operands, views with the slot
        stride: w13 codes [n, 2I, H/2] int8, w13 scales [n, 2I, H/32] uint8, w2 codes [n, H, I/2] int8, w2 scales
        [n, H, I/32] uint8 (homerun.kernels.triton.moe)."""
        if self.fmt != "fp4":
            raise UsageError("kernel_views: the fused MoE kernels read FP4 experts", hint="use the torch path")
        n, stride = slots.shape[0], slots.stride(0)

        def view(first: str, rows_mult: int) -> torch.Tensor:
            p = self.part(first)
            rows, cols = p.shape[0] * rows_mult, p.shape[1]
            return slots.as_strided((n, rows, cols), (stride, cols, 1), slots.storage_offset() + p.offset_bytes)

        return (view("w1", 2).view(torch.int8), view("w1_scale", 2), view("w2", 1).view(torch.int8),
                view("w2_scale", 1))

    @property
    def payload_bytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def views(self, buf: torch.Tensor) -> ExpertWeights:
        """uint8 [stride_bytes] buffer on any device -> ExpertWeights whose tensors are views into it."""
        t = {p.name: buf[p.offset_bytes:p.offset_bytes + p.nbytes].view(p.dtype).view(p.shape) for p in self.parts}
        return ExpertWeights(fmt=self.fmt, **t)

    def pack(self, w: ExpertWeights, out: torch.Tensor) -> None:
        """Write an expert's tensors into `out` (uint8 [stride_bytes]) at this layout's offsets."""
        for p in self.parts:
            t = getattr(w, p.name)
            if tuple(t.shape) != p.shape or t.dtype != p.dtype:
                raise CheckpointError(
                    f"expert tensor {p.name}: shape {tuple(t.shape)} {t.dtype} differs from the first expert's "
                    f"{p.shape} {p.dtype}", hint="all routed experts of a model must share shapes and dtypes")
            out[p.offset_bytes:p.offset_bytes + p.nbytes].copy_(t.contiguous().view(-1).view(torch.uint8))


@dataclass(frozen=True)
class StoreStats:
    n_experts: int
    expert_bytes: int  # one buffer, alignment included
    pinned_experts: int
    ram_experts: int
    disk_experts: int
    arena_bytes: int = 0  # the host-RAM arena (pinned + pageable parts)
    pinned_bytes: int = 0  # page-locked bytes of the arena (whole pages)
    pin_state: str = "off"  # offload.pinning.PinStatus.state
    pin_reason: str = ""

    def to_dict(self) -> dict:
        return {"n_experts": self.n_experts, "expert_bytes": self.expert_bytes, "pinned_experts": self.pinned_experts,
                "ram_experts": self.ram_experts, "disk_experts": self.disk_experts,
                "total_bytes": self.n_experts * self.expert_bytes, "arena_bytes": self.arena_bytes,
                "pinned_bytes": self.pinned_bytes, "pin_state": self.pin_state, "pin_reason": self.pin_reason}


class HostExpertStore:
    """All routed experts of a model in one host arena (plus an optional disk tier). Callable as an `ExpertSource`."""

    def __init__(
        self,
        source: ExpertSource,
        keys: Iterable[ExpertKey],
        *,
        pin: bool | None = None,
        pinned_budget_bytes: int | None = None,
        ram_budget_bytes: int | None = None,
        disk_dir: str | Path | None = None,
        pin_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        registrar: tuple | None = None,
    ) -> None:
        """`keys` in priority order (hottest first): earlier keys get the faster tiers. `pin=None` pins iff CUDA
        exists (`pin=True` without CUDA falls back to pageable with a warning). `pinned_budget_bytes` None: the
        default pin budget (physical RAM less a reserve); `ram_budget_bytes` None: unbounded. `registrar`: a
        (register, unregister, reason) triple replacing cudaHostRegister (tests)."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            raise UsageError("host expert store: no experts given", hint="pass the (layer, expert) keys to store")
        self.layout = ExpertLayout.from_expert(source(*keys[0]))
        want_pin = torch.cuda.is_available() if pin is None else bool(pin)
        stride = self.layout.stride_bytes
        n_arena = _count_within(len(keys), stride, ram_budget_bytes)
        n_disk = len(keys) - n_arena
        if n_disk and disk_dir is None:
            raise DoesNotFitError(
                f"host expert store: {n_disk} of {len(keys)} experts ({n_disk * stride} B) exceed the RAM budget",
                hint="raise the RAM budget or pass disk_dir for the (slow) disk-mmap tier")
        self._backing, arena = page_aligned_empty(n_arena * stride) if n_arena else (None, None)
        self._arenas = {"ram": arena, "disk": _disk_arena(Path(disk_dir), n_disk * stride) if n_disk else None}
        self._where: dict[ExpertKey, tuple[str, int]] = {}
        for i, key in enumerate(keys):
            self._where[key] = ("ram", i) if i < n_arena else ("disk", i - n_arena)
            self.layout.pack(source(*key), self.buffer(key))  # the one read of the checkpoint
        # Pin after filling: the hottest experts sit at the arena's start, so the pinned prefix is the hot set.
        self._pin = None
        if want_pin and n_arena:
            budget = default_pin_budget() if pinned_budget_bytes is None else pinned_budget_bytes
            self._pin = PinnedArena(arena, budget, chunk_bytes=pin_chunk_bytes, registrar=registrar)
        pin_status = self._pin.status if self._pin is not None else PinStatus()
        self.pinned = pin_status.pinned_bytes > 0
        self._n_pinned = min(n_arena, pin_status.pinned_bytes // stride)
        self._stats = StoreStats(len(keys), stride, self._n_pinned, n_arena - self._n_pinned, n_disk,
                                 n_arena * stride, pin_status.pinned_bytes, pin_status.state, pin_status.reason)

    @property
    def expert_bytes(self) -> int:
        return self.layout.stride_bytes

    @property
    def arena(self) -> torch.Tensor | None:
        """The host-RAM arena, uint8 [n_ram_experts * expert_bytes] (None when everything is on disk)."""
        return self._arenas["ram"]

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._where

    def keys(self) -> list[ExpertKey]:
        return list(self._where)

    def tier(self, key: ExpertKey) -> str:
        tier, i = self._where[key]
        return "pinned" if tier == "ram" and i < self._n_pinned else tier

    def offset(self, key: ExpertKey) -> tuple[str, int]:
        """(arena "ram" | "disk", byte offset of the key's buffer in it): adjacent keys can be copied as one run."""
        tier, i = self._where[key]
        return tier, i * self.layout.stride_bytes

    def buffer(self, key: ExpertKey) -> torch.Tensor:
        """The expert's contiguous uint8 buffer (in the arena, pinned or pageable, or mmap'd from disk)."""
        try:
            tier, i = self._where[key]
        except KeyError:
            raise UsageError(f"host expert store: no expert {key}", hint="keys are (layer, expert)") from None
        stride = self.layout.stride_bytes
        return self._arenas[tier][i * stride:(i + 1) * stride]

    def run(self, key: ExpertKey, n: int) -> torch.Tensor:
        """n consecutive buffers starting at key's (as `offset` says they are adjacent): one copy's source."""
        tier, i = self._where[key]
        stride = self.layout.stride_bytes
        return self._arenas[tier][i * stride:(i + n) * stride]

    def __call__(self, layer: int, expert: int) -> ExpertWeights:
        return self.layout.views(self.buffer((layer, expert)))

    def stats(self) -> StoreStats:
        return self._stats

    def notes(self) -> list[str]:
        """Human-readable warnings for the CLI to render (library code never prints)."""
        s, out = self._stats, []
        if s.disk_experts:
            gb = s.disk_experts * s.expert_bytes / 1e9
            out.append(f"{s.disk_experts} experts ({gb:.1f} GB) live in the disk-mmap tier: a miss on one reads "
                       f"from disk (~{DISK_NOTE_GBPS:g} GB/s or less), far slower than RAM")
        if s.pin_state in ("partial", "pageable"):
            out.append(f"{s.ram_experts} experts are in pageable RAM ({s.pin_reason or 'pinned budget exhausted'}): "
                       "their host-to-device copies are staged and slower")
        elif torch.cuda.is_available() and s.ram_experts:
            out.append(f"{s.ram_experts} experts are in pageable RAM (pinned budget exhausted): their H2D copies "
                       "are staged and slower")
        return out

    def close(self) -> None:
        """Unpin the arena (the memory itself goes with the last reference)."""
        if self._pin is not None:
            self._pin.close()


def _align(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


def _count_within(n: int, stride: int, budget_bytes: int | None) -> int:
    return n if budget_bytes is None else min(n, max(0, budget_bytes) // stride)


def _disk_arena(disk_dir: Path, nbytes: int) -> torch.Tensor:
    disk_dir.mkdir(parents=True, exist_ok=True)
    path = disk_dir / "experts.bin"
    with open(path, "wb") as f:
        f.truncate(nbytes)
    # shared=True maps the file itself: writes land in the file, reads page in from it on demand.
    return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)


def random_packed_expert(hidden: int, intermediate: int, generator: torch.Generator, *, fmt: str = "fp4",
                         quantize: bool = True) -> ExpertWeights:
    """A synthetic routed expert in the checkpoint's packed format, for tests and benchmarks. `quantize=True`
    quantizes Gaussian weights (realistic values); False fills codes with random bytes and scales near 2^-4 (fast
    enough for real-shaped multi-GB benchmarks)."""
    from homerun.formats.quant import float_to_e8m0, quant_fp4, quant_fp8

    shapes = {"w1": (intermediate, hidden), "w3": (intermediate, hidden), "w2": (hidden, intermediate)}
    parts = {}
    for name, (out_f, in_f) in shapes.items():
        if quantize:
            w = torch.randn(out_f, in_f, generator=generator) * in_f ** -0.5
            q, s = (quant_fp4 if fmt == "fp4" else quant_fp8)(w)
        elif fmt == "fp4":
            q = torch.randint(-128, 128, (out_f, in_f // 2), dtype=torch.int8, generator=generator)
            s = float_to_e8m0(torch.randint(-6, -2, (out_f, in_f // 32), generator=generator))
        else:
            q = (torch.randn(out_f, in_f, generator=generator) * 0.1).to(torch.float8_e4m3fn)
            s = float_to_e8m0(torch.zeros(-(-out_f // 128), -(-in_f // 128)))
        parts[name], parts[f"{name}_scale"] = q, s
    return ExpertWeights(fmt=fmt, **parts)
