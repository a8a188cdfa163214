"""The all-VRAM plan's experts for the GPU-path tests and the device check: every routed expert resident in one slot
cache per layer, computed by the fused FP4 MoE kernel. Device work is counted by `homerun.kernels.counting`
(re-exported here)."""

from __future__ import annotations

import torch

from homerun.kernels.counting import Counts, count_device_work  # noqa: F401 - re-exported
from offload.base import ExpertBackend


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
