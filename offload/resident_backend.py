"""`ResidentExpertBackend`: the all-in-VRAM plan's expert backend. Every routed expert of its layers sits on one
device for the whole run, so nothing is cached, offloaded or moved per token (the hybrid path is
offload.cached_backend's `CachedExpertBackend`)."""

from __future__ import annotations

import torch

from offload.base import BackendStats, ExpertBackend, ExpertWeights, swiglu_expert
from offload.cached_backend import dequant_on_device
from offload.gpu_decode import FUSED_MAX_ROWS


class ResidentExpertBackend(ExpertBackend):
    """Every routed expert of some layers resident on one device (an all-in-VRAM plan): nothing is offloaded, nothing
    moves per token. Each expert's packed bytes are placed once on `device`, charged to its budget as "weights".

    On a GPU-flavored device (CUDA or a CUDA stand-in) with FP4 experts and triton importable, a layer's experts are
    placed as one stacked slot cache ([E, 2I, D/2] gate+up codes, [E, D, I/2] down codes and their scales; the same
    bytes) and computed by the fused FP4 kernels over the identity slot table: decode-sized calls by
    `fp4_moe_decode` (two launches, no host sync), prefill-sized ones by two `fp4_grouped_gemm` launches over the
    tokens sorted by expert (no host sync either). Elsewhere the math is the reference's (dequantize the selected
    experts in the compute dtype, clamped SwiGLU, weighted sum in ascending expert order), run on the device."""

    def __init__(self, source, layers, n_experts: int, *, device, swiglu_limit: float,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        from offload.devices import HostDevice

        self.device = device
        self.swiglu_limit = swiglu_limit
        self.compute_dtype = compute_dtype
        self.layers = tuple(layers)
        self.n_experts = n_experts
        self.experts: dict[tuple[int, int], ExpertWeights] = {}
        self.stacked: dict[int, tuple[torch.Tensor, ...]] = {}
        self.nbytes = 0
        self._moe = self._fused_kernels(source) if device.kernel_flavor == "gpu" else None
        self.graph_safe = self._moe is not None
        if self._moe is not None:
            from homerun.kernels.triton.common import interpreting

            self._fewest = interpreting()
            self.table = device.empty(("weights", "experts.identity_slot_table"), (n_experts,), torch.int32)
            self.table.copy_(torch.arange(n_experts, dtype=torch.int32))
            self.nbytes += n_experts * 4
            for layer in self.layers:
                self.stacked[layer] = self._place_stacked(source, layer)
            return
        # The host already holds the packed experts (the checkpoint's mmap): charge them, copy nothing.
        put = device.adopt if isinstance(device, HostDevice) else device.place
        for layer in self.layers:
            for e in range(n_experts):
                w = source(layer, e)
                parts = {name: put(("weights", f"layers.{layer}.ffn.experts.{e}.{name}"), getattr(w, name))
                         for name in ("w1", "w1_scale", "w3", "w3_scale", "w2", "w2_scale")}
                self.experts[(layer, e)] = ExpertWeights(fmt=w.fmt, **parts)
                self.nbytes += self.experts[(layer, e)].nbytes

    _STACKED = ("w13", "w13_scale", "w2", "w2_scale")

    def _fused_kernels(self, source):
        if not self.layers or source(self.layers[0], 0).fmt != "fp4":
            return None
        from offload.gpu_decode import fused_kernels

        mods = fused_kernels()
        return mods.moe if mods is not None else None

    def _place_stacked(self, source, layer: int) -> tuple[torch.Tensor, ...]:
        """One layer's experts copied straight into their slots of four device tensors (no host-side stack)."""
        first = source(layer, 0)
        inter, half = first.w1.shape
        shapes = {"w13": ((2 * inter, half), torch.int8), "w13_scale": ((2 * inter, first.w1_scale.shape[1]), torch.uint8),
                  "w2": (tuple(first.w2.shape), torch.int8), "w2_scale": (tuple(first.w2_scale.shape), torch.uint8)}
        out = {name: self.device.empty(("weights", f"layers.{layer}.ffn.experts.{name}"), (self.n_experts, *shape),
                                       dtype) for name, (shape, dtype) in shapes.items()}
        for e in range(self.n_experts):
            w = first if e == 0 else source(layer, e)
            out["w13"][e, :inter].copy_(w.w1.view(torch.int8))
            out["w13"][e, inter:].copy_(w.w3.view(torch.int8))
            out["w13_scale"][e, :inter].copy_(w.w1_scale.view(torch.uint8))
            out["w13_scale"][e, inter:].copy_(w.w3_scale.view(torch.uint8))
            out["w2"][e].copy_(w.w2.view(torch.int8))
            out["w2_scale"][e].copy_(w.w2_scale.view(torch.uint8))
        self.nbytes += sum(t.numel() * t.element_size() for t in out.values())
        return tuple(out[n] for n in self._STACKED)

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                expert_weights: torch.Tensor) -> torch.Tensor:
        dev = self.device.torch_device
        if self._moe is not None:
            return self._forward_fused(layer, x.to(dev), expert_ids.to(dev), expert_weights.to(dev)).to(x.device)
        xc = x.to(dev, self.compute_dtype)
        ids, wts = expert_ids.to(dev), expert_weights.to(dev, self.compute_dtype)
        out = torch.zeros_like(xc)  # (T, D)
        for e in torch.unique(ids).tolist():
            rows, slot = torch.nonzero(ids == e, as_tuple=True)
            w1, w3, w2 = dequant_on_device(self.experts[(layer, e)], self.compute_dtype)
            y = swiglu_expert(xc[rows], w1, w3, w2, self.swiglu_limit)  # (n, D)
            out.index_add_(0, rows, y * wts[rows, slot].unsqueeze(-1))
        return out.to(x.device, x.dtype)

    def _forward_fused(self, layer: int, x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        w13c, w13s, w2c, w2s = self.stacked[layer]
        if x.shape[0] <= FUSED_MAX_ROWS:
            return self._moe.fp4_moe_decode(x, ids, wts, self.table, w13c, w13s, w2c, w2s, self.swiglu_limit,
                                            out_dtype=x.dtype, fewest_programs=self._fewest)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        self._moe.fp4_moe_grouped(x, ids, wts, self.n_experts, w13c, w13s, w2c, w2s, self.swiglu_limit, out,
                                  fewest_programs=self._fewest)
        return out.to(x.dtype)

    def stats(self) -> BackendStats:
        return BackendStats(type(self).__name__, resident={"device": self.device.name, "layers": list(self.layers),
                                                           "experts": len(self.layers) * self.n_experts,
                                                           "bytes": self.nbytes, "fused": self._moe is not None})

    def close(self) -> None:
        tags = [("weights", f"layers.{l}.ffn.experts.{e}.{n}") for l, e in self.experts
                for n in ("w1", "w1_scale", "w3", "w3_scale", "w2", "w2_scale")]
        tags += [("weights", f"layers.{l}.ffn.experts.{n}") for l in self.stacked for n in self._STACKED]
        tags += [("weights", "experts.identity_slot_table")] if self._moe is not None else []
        self.device.free_all(tags)
        self.experts, self.stacked = {}, {}
