"""Host expert store: every routed expert packed into ONE contiguous byte buffer (codes + scales of w1, w3, w2).

One buffer per expert means moving an expert to a device is one copy, and views into the buffer (host or device)
rebuild an `ExpertWeights` without copying. Buffers live in three tiers, filled in priority order:
pinned host RAM (only when CUDA exists, within the plan's pinned budget), pageable RAM (within the RAM budget),
and an optional disk-mmap file for what does not fit in RAM; the disk tier is slow and `notes()` says so.
This module does not choose which experts are hot (the caller passes `priority`) and never touches a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from homerun.errors import CheckpointError, DoesNotFitError, UsageError
from offload.base import ExpertSource, ExpertWeights

ExpertKey = tuple[int, int]  # (layer, expert)
ALIGN_BYTES = 256  # every part starts on a 256 B boundary so device kernels can read it with wide loads
PARTS = ("w1", "w1_scale", "w3", "w3_scale", "w2", "w2_scale")
TIERS = ("pinned", "ram", "disk")
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
            parts.append(PartSpec(name, off, tuple(t.shape), t.dtype))
            off += _align(t.numel() * t.element_size())
        return cls(tuple(parts), w.fmt, off)

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

    def to_dict(self) -> dict:
        return {"n_experts": self.n_experts, "expert_bytes": self.expert_bytes, "pinned_experts": self.pinned_experts,
                "ram_experts": self.ram_experts, "disk_experts": self.disk_experts,
                "total_bytes": self.n_experts * self.expert_bytes}


class HostExpertStore:
    """All routed experts of a model as contiguous host buffers. Callable as an `ExpertSource`."""

    def __init__(
        self,
        source: ExpertSource,
        keys: Iterable[ExpertKey],
        *,
        pin: bool | None = None,
        pinned_budget_bytes: int | None = None,
        ram_budget_bytes: int | None = None,
        disk_dir: str | Path | None = None,
    ) -> None:
        """`keys` in priority order (hottest first): earlier keys get the faster tiers. `pin=None` pins iff CUDA
        exists; budgets of None mean unbounded."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            raise UsageError("host expert store: no experts given", hint="pass the (layer, expert) keys to store")
        self.layout = ExpertLayout.from_expert(source(*keys[0]))
        self.pinned = torch.cuda.is_available() if pin is None else bool(pin)
        stride = self.layout.stride_bytes
        n_pin = _count_within(len(keys), stride, pinned_budget_bytes) if self.pinned else 0
        n_ram = min(len(keys) - n_pin, _count_within(len(keys), stride, ram_budget_bytes))
        n_disk = len(keys) - n_pin - n_ram
        if n_disk and disk_dir is None:
            raise DoesNotFitError(
                f"host expert store: {n_disk} of {len(keys)} experts ({n_disk * stride} B) exceed the RAM budget",
                hint="raise the RAM budget or pass disk_dir for the (slow) disk-mmap tier")
        self._arenas = {
            "pinned": _alloc(n_pin * stride, pinned=True) if n_pin else None,
            "ram": _alloc(n_ram * stride, pinned=False) if n_ram else None,
            "disk": _disk_arena(Path(disk_dir), n_disk * stride) if n_disk else None,
        }
        self._where: dict[ExpertKey, tuple[str, int]] = {}
        counts = {"pinned": n_pin, "ram": n_ram, "disk": n_disk}
        order = [t for t in TIERS for _ in range(counts[t])]
        index = {t: 0 for t in TIERS}
        for key, tier in zip(keys, order):
            self._where[key] = (tier, index[tier])
            index[tier] += 1
            self.layout.pack(source(*key), self.buffer(key))
        self._stats = StoreStats(len(keys), stride, n_pin, n_ram, n_disk)

    @property
    def expert_bytes(self) -> int:
        return self.layout.stride_bytes

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._where

    def keys(self) -> list[ExpertKey]:
        return list(self._where)

    def tier(self, key: ExpertKey) -> str:
        return self._where[key][0]

    def buffer(self, key: ExpertKey) -> torch.Tensor:
        """The expert's contiguous uint8 buffer (pinned, RAM or mmap'd from disk)."""
        try:
            tier, i = self._where[key]
        except KeyError:
            raise UsageError(f"host expert store: no expert {key}", hint="keys are (layer, expert)") from None
        stride = self.layout.stride_bytes
        return self._arenas[tier][i * stride:(i + 1) * stride]

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
        if torch.cuda.is_available() and s.ram_experts:
            out.append(f"{s.ram_experts} experts are in pageable RAM (pinned budget exhausted): their H2D copies "
                       "are staged and slower")
        return out


def _align(n: int) -> int:
    return -(-n // ALIGN_BYTES) * ALIGN_BYTES


def _count_within(n: int, stride: int, budget_bytes: int | None) -> int:
    return n if budget_bytes is None else min(n, max(0, budget_bytes) // stride)


def _alloc(nbytes: int, *, pinned: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


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
