"""Helpers for the GPU-path tests on CUDA stand-ins: an all-resident expert backend over the fused FP4 MoE kernel,
and a counter of device work (ATen ops as a proxy for kernel launches, Triton launches, host syncs) per forward."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from offload.base import ExpertBackend

# ATen ops that launch no kernel on a GPU: views and metadata, allocation without a fill.
_NO_LAUNCH = {"empty", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias",
              "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "_reshape_alias",
              "set_", "resize_", "_unsafe_view", "view", "as_strided", "expand", "permute", "transpose", "t",
              "select", "slice", "diagonal", "unsqueeze", "squeeze", "unbind", "split", "split_with_sizes",
              "chunk", "reshape", "flatten", "unflatten", "view_as_real", "view_as_complex", "_to_copy_noop"}
# ATen ops whose result size or value the host must wait for (a device-to-host sync on CUDA).
_SYNC = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "_unique", "_unique2",
         "unique_dim", "unique_consecutive", "unique_dim_consecutive", "item", "equal", "is_nonzero",
         "repeat_interleave"}


@dataclass
class Counts:
    ops: int = 0
    launches: int = 0  # Triton launches
    syncs: int = 0
    op_names: dict[str, int] = field(default_factory=dict)
    sync_names: dict[str, int] = field(default_factory=dict)


class DeviceWorkCounter(TorchDispatchMode):
    """Counts ATen ops that would launch a kernel, Triton launches (homerun.kernels.triton.common.launch) and
    host syncs (_local_scalar_dense / nonzero / unique ..., plus Tensor.item and Tensor.tolist)."""

    def __init__(self):
        super().__init__()
        self.c = Counts()
        self._paused = 0

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused:
            name = func.overloadpacket.__name__
            if name in _SYNC:
                self.c.syncs += 1
                self.c.sync_names[name] = self.c.sync_names.get(name, 0) + 1
            is_view = getattr(func, "is_view", False)
            if name not in _NO_LAUNCH and not is_view and name not in ("_local_scalar_dense",):
                self.c.ops += 1
                self.c.op_names[name] = self.c.op_names.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_device_work():
    """with count_device_work() as counter: ... -> counter.c (Counts)."""
    from homerun.kernels.triton import common

    mode = DeviceWorkCounter()
    real_item, real_tolist = torch.Tensor.item, torch.Tensor.tolist
    n0 = common.LaunchCounter.n

    def item(t):
        if not mode._paused:
            mode.c.syncs += 1
            mode.c.sync_names["item"] = mode.c.sync_names.get("item", 0) + 1
        with mode.paused():
            return real_item(t)

    def tolist(t):
        if not mode._paused:
            mode.c.syncs += 1
            mode.c.sync_names["tolist"] = mode.c.sync_names.get("tolist", 0) + 1
        with mode.paused():
            return real_tolist(t)

    common.LaunchCounter.around = mode.paused
    torch.Tensor.item, torch.Tensor.tolist = item, tolist
    try:
        with mode:
            yield mode
    finally:
        torch.Tensor.item, torch.Tensor.tolist = real_item, real_tolist
        common.LaunchCounter.around = None
        mode.c.launches = common.LaunchCounter.n - n0


class ResidentTritonExperts(ExpertBackend):
    """Every routed expert of every layer resident in one slot cache per layer (the all-VRAM plan), computed by the
    fused FP4 MoE kernel (two launches per layer, no host sync): slot_table is the identity."""

    def __init__(self, ckpt, n_layers: int, n_experts: int, swiglu_limit: float, device="cpu"):
        from homerun.kernels.triton import load

        self._moe = load().moe
        self._interp = load().common.interpreting()
        self.limit = float(swiglu_limit)
        self.layers = {}
        for layer in range(n_layers):
            ex = [ckpt.expert(layer, e) for e in range(n_experts)]
            if any(x is None for x in ex):
                continue
            w13c = torch.stack([torch.cat([x.w1, x.w3]) for x in ex]).to(device)
            w13s = torch.stack([torch.cat([x.w1_scale.view(torch.uint8), x.w3_scale.view(torch.uint8)])
                                for x in ex]).to(device)
            w2c = torch.stack([x.w2 for x in ex]).to(device)
            w2s = torch.stack([x.w2_scale.view(torch.uint8) for x in ex]).to(device)
            self.layers[layer] = (w13c, w13s, w2c, w2s)
        self.table = torch.arange(n_experts, dtype=torch.int32, device=device)

    def forward(self, layer, x, expert_ids, expert_weights):
        w13c, w13s, w2c, w2s = self.layers[layer]
        return self._moe.fp4_moe_decode(x, expert_ids, expert_weights, self.table, w13c, w13s, w2c, w2s, self.limit,
                                        out_dtype=x.dtype, fewest_programs=self._interp)
