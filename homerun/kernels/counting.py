"""Counting device work per forward: ATen ops that would launch a GPU kernel, Triton launches, and host syncs.

One helper for the counting tests (tests/gpu_path_util.py, tests/test_gpu_decode.py) and for `homerun bench`'s
launches_per_token / host_syncs_per_token. A `TorchDispatchMode` sees every ATen op (the proxy for a kernel launch:
views, metadata and bare allocations excluded); Triton launches are read from
`homerun.kernels.triton.common.LaunchCounter` (whose `around` hook pauses the mode while an interpreted kernel runs,
so the interpreter's own torch ops are not counted); host syncs are the ops whose result size or value the host
must wait for (`_local_scalar_dense`, nonzero, unique, ...), blocking device-to-host copies (`.cpu()` of a CUDA
tensor; invisible on a stand-in, whose tensors are on the host already) plus every `Tensor.item` / `Tensor.tolist`
call.
Works on CPU tensors (a CUDA stand-in) and on CUDA alike; it counts, it does not time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that launch no kernel on a GPU: views and metadata, allocation without a fill.
NO_LAUNCH = frozenset({
    "empty", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias", "sym_size",
    "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_reshape_alias", "set_", "resize_",
    "_unsafe_view", "view", "as_strided", "expand", "permute", "transpose", "t", "select", "slice", "diagonal",
    "unsqueeze", "squeeze", "unbind", "split", "split_with_sizes", "chunk", "reshape", "flatten", "unflatten",
    "view_as_real", "view_as_complex", "_to_copy_noop", "record_stream"})
# Composite ops that return their input when no copy is needed (dispatched as themselves under inference_mode).
MAYBE_VIEW = frozenset({"contiguous", "to", "reshape", "type_as", "expand_as", "view_as"})
# ATen ops whose result size or value the host must wait for (a device-to-host sync on CUDA).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2", "unique_dim",
    "unique_consecutive", "unique_dim_consecutive", "item", "equal", "is_nonzero", "repeat_interleave"})


def _storages(tree) -> set[int]:
    from torch.utils._pytree import tree_leaves

    return {t.untyped_storage().data_ptr() for t in tree_leaves(tree) if isinstance(t, torch.Tensor)}


def is_d2h_copy(name: str, args, kwargs, out) -> bool:
    """Whether an ATen op copied a device tensor to the host and made the host wait for it (not non_blocking)."""
    if name == "_to_copy":
        src, dst = (args[0] if args else None), out
    elif name == "copy_":
        dst, src = (args[0], args[1]) if len(args) > 1 else (None, None)
    else:
        return False
    if (kwargs or {}).get("non_blocking") or (name == "copy_" and len(args) > 2 and args[2]):
        return False
    return (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device.type not in ("cpu", "meta")
            and dst.device.type == "cpu")


def launches_kernel(func, args, kwargs, out) -> bool:
    """Whether an ATen op that ran would launch a kernel: not a view, metadata or bare allocation. A maybe-view
    (`contiguous`, `to`, `reshape`, which dispatch as themselves under inference_mode) counts when it copied:
    when its output's storage is none of its inputs'."""
    name = func.overloadpacket.__name__
    if name in NO_LAUNCH or name == "_local_scalar_dense":
        return False
    if getattr(func, "is_view", False) or name in MAYBE_VIEW:
        outs = _storages(out)
        return bool(outs) and not outs <= _storages((args, kwargs))
    return True


@dataclass
class Counts:
    ops: int = 0  # ATen ops that would launch a kernel
    launches: int = 0  # Triton launches
    syncs: int = 0  # host syncs
    graphs: int = 0  # captured graphs replayed (one launch each; their kernels are not counted again)
    graph_kernels: int = 0  # the kernels inside the replayed graphs (device work a replay still does)
    waits: int = 0  # event waits with no ATen op to show them (note_host_wait: a CUDA event's synchronize)
    op_names: dict[str, int] = field(default_factory=dict)
    sync_names: dict[str, int] = field(default_factory=dict)

    @property
    def device_launches(self) -> int:
        """ATen ops + Triton launches + graph replays: what a GPU would launch."""
        return self.ops + self.launches + self.graphs

    @property
    def host_waits(self) -> int:
        """Every time the host waited for the device: counted syncs plus event waits."""
        return self.syncs + self.waits

    def to_dict(self) -> dict:
        return {"ops": self.ops, "launches": self.launches, "syncs": self.syncs, "graphs": self.graphs,
                "graph_kernels": self.graph_kernels, "waits": self.waits, "host_waits": self.host_waits,
                "device_launches": self.device_launches, "sync_names": dict(self.sync_names)}


class DeviceWorkCounter(TorchDispatchMode):
    """The dispatch mode; `paused()` stops counting (an interpreted Triton kernel's own torch work)."""

    def __init__(self) -> None:
        super().__init__()
        self.c = Counts()
        self._paused = 0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def on_host_wait(self) -> None:  # note_host_wait: an event wait (no ATen op shows it)
        if not self._paused:
            self.c.waits += 1

    def _sync(self, name: str) -> None:
        self.c.syncs += 1
        self.c.sync_names[name] = self.c.sync_names.get(name, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._paused and name in SYNC_OPS:
            self._sync(name)
        out = func(*args, **(kwargs or {}))
        if not self._paused and is_d2h_copy(name, args, kwargs, out):
            self._sync("d2h_copy")
        if not self._paused and launches_kernel(func, args, kwargs, out):
            self.c.ops += 1
            self.c.op_names[name] = self.c.op_names.get(name, 0) + 1
        return out


def _triton_common():
    try:
        from homerun.kernels import triton as hr_triton

        mods = hr_triton.load()
        return mods.common if mods is not None else None
    except Exception:  # noqa: BLE001 - no triton: nothing launches through it
        return None


_active: list["DeviceWorkCounter"] = []


def note_graph_replay(kernels: int = 0) -> None:
    """A captured graph was replayed: one launch for every active counter (homerun.engine.graphs calls this), holding
    `kernels` kernels where the caller knows them (EmulatedGraphs)."""
    for mode in _active:
        mode.c.graphs += 1
        mode.c.graph_kernels += kernels


def note_host_wait() -> None:
    """The host is about to wait on the device with no ATen op to show it (a CUDA event's synchronize, or its no-op
    on a stand-in): dispatch modes that refuse host syncs (a graph capture) hear of it through `on_host_wait`."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    for mode in _get_current_dispatch_mode_stack():
        hook = getattr(mode, "on_host_wait", None)
        if hook is not None:
            hook()


@contextlib.contextmanager
def count_device_work() -> Iterator[DeviceWorkCounter]:
    """with count_device_work() as counter: ... -> counter.c (Counts). Not reentrant (patches Tensor.item/tolist)."""
    common = _triton_common()
    mode = DeviceWorkCounter()
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist
    n0 = common.LaunchCounter.n if common is not None else 0
    old_around = getattr(common.LaunchCounter, "around", None) if common is not None else None

    def item(t):
        if not mode._paused:
            mode._sync("item")
        with mode.paused():
            return real_item(t)

    def tolist(t):
        if not mode._paused:
            mode._sync("tolist")
        with mode.paused():
            return real_tolist(t)

    if common is not None:
        common.LaunchCounter.around = mode.paused
    torch.Tensor.item, torch.Tensor.tolist = item, tolist
    _active.append(mode)
    try:
        with mode:
            yield mode
    finally:
        _active.remove(mode)
        torch.Tensor.item, torch.Tensor.tolist = real_item, real_tolist
        if common is not None:
            common.LaunchCounter.around = old_around
            mode.c.launches = common.LaunchCounter.n - n0
