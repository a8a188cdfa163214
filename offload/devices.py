"""Devices with a memory budget and exact byte accounting: CPU stand-ins and thin CUDA wrappers.

A `Device` hands out named allocations and refuses any that would push its accounted bytes past its budget, so a
multi-device plan (several GPUs, a capped VRAM) can be exercised on one CPU: each `StandInDevice` is "a GPU" whose
memory is ordinary host RAM. `CudaDevice` has the same interface and only adds the torch device string; every
other piece of offload logic is device-agnostic. This module does not decide what goes where (the plan does) and
does not track memory it did not allocate (the CUDA caching allocator, activations), except that a CUDA
stand-in's peak can be raised by what an eager step holds (`note_live`, homerun.engine.standin_bytes).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Hashable

import torch

from homerun.errors import DoesNotFitError, UsageError

GIB = 1 << 30
# Depth of Device.empty calls on this thread: what they allocate is charged under a tag, so a watcher of the
# tensors a step makes (homerun.engine.standin_bytes) must not count it again (`allocating`).
_local = threading.local()


def allocating() -> bool:
    """Whether this thread is inside a device's own allocation (Device.empty)."""
    return getattr(_local, "depth", 0) > 0


@dataclass(frozen=True)
class DeviceUsage:
    name: str
    kind: str  # "standin" | "cuda-standin" | "cuda" | "host"
    budget_bytes: int
    used_bytes: int
    peak_bytes: int
    n_allocations: int

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "budget_bytes": self.budget_bytes,
            "used_bytes": self.used_bytes,
            "peak_bytes": self.peak_bytes,
            "free_bytes": self.free_bytes,
            "n_allocations": self.n_allocations,
        }


class Device:
    """A memory budget plus the torch device that backs it. Allocations are keyed by a tag the caller chooses
    (an ExpertKey, "expert_slots", "layers.3.attn.wq"), so freeing never depends on tensor identity."""

    kind = "abstract"

    def __init__(self, name: str, budget_bytes: int, torch_device: torch.device) -> None:
        if budget_bytes < 0:
            raise UsageError(f"device {name}: negative memory budget {budget_bytes}", hint="pass budget_bytes >= 0")
        self.name = name
        self.budget_bytes = int(budget_bytes)
        self.torch_device = torch_device
        self._sizes: dict[Hashable, int] = {}
        self._used_bytes = 0
        self._peak_bytes = 0
        self._live_bytes = 0  # held outside the accounting now (note_live), counted into the peak
        self._lock = threading.Lock()

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"

    @property
    def kernel_flavor(self) -> str:
        """The kernels a model runs here (homerun.kernels.dispatch.FLAVORS): "gpu" on CUDA and on CUDA stand-ins,
        "auto" (by the tensors' device) elsewhere."""
        return "gpu" if self.is_cuda else "auto"

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self._used_bytes

    def _reserve(self, tag: Hashable, nbytes: int) -> None:
        with self._lock:
            if tag in self._sizes:
                raise UsageError(f"device {self.name}: allocation {tag!r} already exists", hint="free it first")
            if self._used_bytes + nbytes > self.budget_bytes:
                raise DoesNotFitError(
                    f"device {self.name}: {tag!r} needs {nbytes} B but only {self.free_bytes} B of "
                    f"{self.budget_bytes} B remain",
                    hint="lower --expert-cache-slots or raise this device's budget in the plan",
                )
            self._sizes[tag] = nbytes
            self._used_bytes += nbytes
            self._peak_bytes = max(self._peak_bytes, self._used_bytes + self._live_bytes)

    def empty(self, tag: Hashable, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Allocate an uninitialized tensor on this device, charged to its budget under `tag`."""
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        self._reserve(tag, nbytes)
        _local.depth = getattr(_local, "depth", 0) + 1
        try:
            return torch.empty(shape, dtype=dtype, device=self.torch_device)
        except RuntimeError:
            self.free(tag)
            raise
        finally:
            _local.depth -= 1

    def reserve(self, tag: Hashable, nbytes: int) -> None:
        """Charge nbytes under `tag` that are not allocated here: memory the caller's work takes on this device
        outside `empty` (a decode graph's transients in its private pool, copies made by a step); `free` returns it."""
        self._reserve(tag, int(nbytes))

    def place(self, tag: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """Copy a tensor onto this device, charged under `tag` (the placement executor's one verb)."""
        out = self.empty(tag, tuple(tensor.shape), tensor.dtype)
        out.copy_(tensor)
        return out

    def adopt(self, tag: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """Charge a tensor that already lives in this device's memory (an mmap'd checkpoint view on the host)
        under `tag` without copying it."""
        if tensor.device != self.torch_device:
            raise UsageError(f"device {self.name}: cannot adopt a tensor on {tensor.device}", hint="use place()")
        self._reserve(tag, tensor.numel() * tensor.element_size())
        return tensor

    def note_live(self, nbytes: int) -> None:
        """nbytes are held now outside the accounting (until the next note; 0 when the holder stops watching): on a
        CUDA stand-in, the tensors an eager step makes and the small state it holds (homerun.engine.standin_bytes),
        which CUDA's allocator would count. The peak counts them with the accounted bytes, now and at each
        allocation until then."""
        with self._lock:
            self._live_bytes = int(nbytes)
            self._peak_bytes = max(self._peak_bytes, self._used_bytes + self._live_bytes)

    def free_all(self, tags) -> None:
        """Free every tag of `tags` that is still allocated (a finalizer's verb: never raises for a missing one)."""
        with self._lock:
            for tag in tags:
                self._used_bytes -= self._sizes.pop(tag, 0)

    def bytes_by_class(self) -> dict[str, int]:
        """Accounted bytes per allocation class: the first element of tuple tags ("weights", "kv",
        "expert_cache"), "other" for the rest."""
        out: dict[str, int] = {}
        with self._lock:
            for tag, n in self._sizes.items():
                cls = tag[0] if isinstance(tag, tuple) and tag and isinstance(tag[0], str) else "other"
                out[cls] = out.get(cls, 0) + n
        return out

    def bytes_of(self, tags) -> int:
        """The bytes charged under those of `tags` still allocated (each tag once)."""
        with self._lock:
            return sum(self._sizes.get(tag, 0) for tag in set(tags))

    def free(self, tag: Hashable) -> None:
        with self._lock:
            self._used_bytes -= self._sizes.pop(tag)

    def usage(self) -> DeviceUsage:
        return DeviceUsage(self.name, self.kind, self.budget_bytes, self._used_bytes, self._peak_bytes,
                           len(self._sizes))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, budget_bytes={self.budget_bytes}, used_bytes={self._used_bytes})"


class StandInDevice(Device):
    """A pretend accelerator backed by host RAM: the same accounting and refusal as a GPU, no CUDA calls."""

    kind = "standin"

    def __init__(self, name: str, budget_bytes: int) -> None:
        super().__init__(name, budget_bytes, torch.device("cpu"))


class CudaStandInDevice(StandInDevice):
    """A stand-in that runs the GPU code path on the CPU: the model's GPU kernel set (the Triton kernels under the
    interpreter, on CPU tensors), and the dtypes CUDA would hold (bf16 matrices stay bf16), so its byte accounting
    is what the GPU would hold."""

    kind = "cuda-standin"

    @property
    def kernel_flavor(self) -> str:
        return "gpu"


class HostDevice(Device):
    """Host RAM as a placement device (unified-memory and CPU-only plans): tensors already in RAM are adopted
    (charged, not copied), so mmap'd checkpoint weights stay zero-copy."""

    kind = "host"

    def __init__(self, budget_bytes: int = 1 << 62, name: str = "cpu") -> None:
        super().__init__(name, budget_bytes, torch.device("cpu"))


class CudaDevice(Device):
    """A real CUDA device with a budget (e.g. VRAM capped at 24 GiB to force offload on a bigger card)."""

    kind = "cuda"

    def __init__(self, index: int = 0, budget_bytes: int | None = None) -> None:
        if not torch.cuda.is_available():
            raise UsageError("CUDA device requested but torch.cuda.is_available() is False",
                             hint="use a StandInDevice on CPU-only machines")
        total = torch.cuda.get_device_properties(index).total_memory
        super().__init__(f"cuda:{index}", total if budget_bytes is None else budget_bytes, torch.device("cuda", index))


def build_standin_devices(budgets_bytes: list[int], prefix: str = "standin") -> list[StandInDevice]:
    """Several pretend GPUs on one CPU, e.g. the 2x/3x H100 profiles scaled down for tests."""
    return [StandInDevice(f"{prefix}:{i}", b) for i, b in enumerate(budgets_bytes)]


def build_devices(specs) -> dict[str, Device]:
    """Devices for a placement's device records (anything with name, kind, budget_bytes), by name: "cuda" ->
    CudaDevice (its ordinal from "cuda:N"), "standin" -> StandInDevice, "cuda-standin" -> CudaStandInDevice,
    "host" -> HostDevice."""
    out: dict[str, Device] = {}
    for s in specs:
        if s.kind == "cuda":
            out[s.name] = CudaDevice(int(s.name.split(":")[1]) if ":" in s.name else 0, s.budget_bytes)
        elif s.kind == "standin":
            out[s.name] = StandInDevice(s.name, s.budget_bytes)
        elif s.kind == "cuda-standin":
            out[s.name] = CudaStandInDevice(s.name, s.budget_bytes)
        elif s.kind == "host":
            out[s.name] = HostDevice(s.budget_bytes, s.name)
        else:
            raise UsageError(f"device {s.name}: unknown kind {s.kind!r}",
                             hint="use cuda, standin, cuda-standin or host")
    return out


def default_device(budget_bytes: int | None = None) -> Device:
    """cuda:0 when there is one, else a stand-in with the given budget (unbounded if None)."""
    if torch.cuda.is_available():
        return CudaDevice(0, budget_bytes)
    return StandInDevice("standin:0", budget_bytes if budget_bytes is not None else 1 << 62)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
