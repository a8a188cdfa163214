"""The plain fp32 formulas every routed-expert kernel is checked against: dequantize, multiply, clamped SwiGLU.
Slow and obviously correct; also the torch fallback where no native kernel is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from homerun.formats.experts import ExpertSource


def swiglu_expert(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, limit: float) -> torch.Tensor:
    """Clamped SwiGLU: g = min(x w1^T, limit), u = clamp(x w3^T, -limit, limit), y = (silu(g) * u) w2^T."""
    g = (x @ w1.T).clamp(max=limit)
    u = (x @ w3.T).clamp(-limit, limit)
    return (F.silu(g) * u) @ w2.T


def reference_moe(source: ExpertSource, layer: int, x: torch.Tensor, expert_ids: torch.Tensor,
                  expert_weights: torch.Tensor, *, swiglu_limit: float,
                  compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sum_k w_k * expert_k(x) with each selected expert dequantized when used, computed in compute_dtype."""
    xc = x.to(compute_dtype)
    out = torch.zeros_like(xc)
    for e in torch.unique(expert_ids).tolist():
        rows, slot = torch.nonzero(expert_ids == e, as_tuple=True)
        w1, w3, w2 = source(layer, e).dequant(compute_dtype)
        y = swiglu_expert(xc[rows], w1, w3, w2, swiglu_limit)
        out.index_add_(0, rows, y * expert_weights[rows, slot].unsqueeze(-1).to(compute_dtype))
    return out.to(x.dtype)
