"""Host-side expert backends: `CpuExpertBackend` for CPU-resident routed experts, served by the native fused op
(homerun.kernels.cpu_experts.CpuMoE; its torch fallback where the kernels are not built), and `HostExpertBackend`,
which runs a host backend for a model whose other weights live on another device.
"""

from __future__ import annotations


import torch

from homerun.kernels.cpu_experts import CpuMoE
from offload.base import ExpertBackend, WrappingBackend


class CpuExpertBackend(CpuMoE, ExpertBackend):
    """Routed experts computed on the CPU from packed FP4/FP8 weights; implements `offload.base.ExpertBackend`.
    `source(layer, e)` is asked once per expert; its tensors (normally zero-copy mmap views) stay referenced and their
    addresses cached, so a forward call copies no weights and runs no Python per expert."""

    def close(self) -> None:
        self.clear()


class HostExpertBackend(WrappingBackend):
    """Runs a host (CPU) expert backend for a model on another device: x goes to the host and the result back.
    The default when `device` is not the CPU and no backend is given (the packed experts live in host RAM)."""

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor):
        out = self.inner.forward(layer, x.cpu(), expert_ids.cpu(), expert_weights.cpu())
        return out.to(x.device)

