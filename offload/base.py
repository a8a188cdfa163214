"""The contract between the runtime's MoE layer and whatever computes routed experts.

The runtime routes (router, top-k, weights) and computes the shared expert itself; everything about where a
routed expert's bytes live and which device multiplies them is behind `ExpertBackend`. Backends: the plain fp32
reference below, the native CPU kernels (homerun/kernels/cpu_experts.py) and the GPU expert cache (offload/cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from homerun.formats.quant import dequant_fp4, dequant_fp8


@dataclass(frozen=True)
class ExpertWeights:
    """One routed expert as stored: w1 (gate) and w3 (up) [I, D], w2 (down) [D, I].

    fmt "fp4": int8 codes [out, in/2] (low nibble first) + e8m0 scales [out, in/32].
    fmt "fp8": float8_e4m3fn [out, in] + e8m0 scales [ceil(out/128), ceil(in/128)].
    """

    w1: torch.Tensor
    w1_scale: torch.Tensor
    w3: torch.Tensor
    w3_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    fmt: str = "fp4"

    @property
    def nbytes(self) -> int:
        ts = (self.w1, self.w1_scale, self.w3, self.w3_scale, self.w2, self.w2_scale)
        return sum(t.numel() * t.element_size() for t in ts)

    def dequant(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        deq = dequant_fp4 if self.fmt == "fp4" else dequant_fp8
        return (
            deq(self.w1, self.w1_scale, dtype),
            deq(self.w3, self.w3_scale, dtype),
            deq(self.w2, self.w2_scale, dtype),
        )


# (layer, expert) -> that expert's packed weights (usually zero-copy mmap views of the checkpoint).
ExpertSource = Callable[[int, int], ExpertWeights]


class ExpertBackend(Protocol):
    def forward(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, D] (the MoE's normalized input); expert_ids [T, k] int64; expert_weights [T, k] fp32, already
        normalized and multiplied by routed_scaling_factor. Returns sum_k w_k * expert_k(x) as [T, D] in x.dtype.
        The shared expert is not included."""
        ...


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU: g = min(x w1^T, limit), u = clamp(x w3^T, -limit, limit), y = (silu(g) * u) w2^T."""
    g = (x @ w1.T).clamp(max=limit)
    u = (x @ w3.T).clamp(-limit, limit)
    return (F.silu(g) * u) @ w2.T


class ReferenceExpertBackend:
    """The plain fp32 path: dequantize each selected expert when it is used, multiply in fp32. Slow, obviously
    correct; the numeric reference for every other backend."""

    def __init__(self, source: ExpertSource, *, swiglu_limit: float, compute_dtype: torch.dtype = torch.float32):
        self.source = source
        self.swiglu_limit = swiglu_limit
        self.compute_dtype = compute_dtype

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        xc = x.to(self.compute_dtype)
        out = torch.zeros_like(xc)
        for e in torch.unique(expert_ids).tolist():
            rows, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            w1, w3, w2 = self.source(layer, e).dequant(self.compute_dtype)
            y = swiglu_expert(xc[rows], w1, w3, w2, self.swiglu_limit)
            out.index_add_(0, rows, y * expert_weights[rows, slot].unsqueeze(-1).to(self.compute_dtype))
        return out.to(x.dtype)
