"""The contract between the runtime's MoE layer and whatever computes routed experts.

The runtime routes (router, top-k, weights) and computes the shared expert itself; everything about where a
routed expert's bytes live and which device multiplies them is behind `ExpertBackend`. Backends: the plain fp32
reference below, the native CPU kernels (offload/cpu_backend.py over homerun/kernels) and the GPU expert cache (offload/cache.py).
"""

from __future__ import annotations

from typing import Protocol

import torch

from homerun.formats.experts import ExpertSource, ExpertWeights  # noqa: F401 - part of the contract
from homerun.kernels.reference import reference_moe, swiglu_expert  # noqa: F401 - the reference formula


class ExpertBackend(Protocol):
    def forward(
        self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, D] (the MoE's normalized input); expert_ids [T, k] int64; expert_weights [T, k] fp32, already
        normalized and multiplied by routed_scaling_factor. Returns sum_k w_k * expert_k(x) as [T, D] in x.dtype.
        The shared expert is not included."""
        ...


class ReferenceExpertBackend:
    """The plain fp32 path: dequantize each selected expert when it is used, multiply in fp32. Slow, obviously
    correct; the numeric reference for every other backend."""

    def __init__(self, source: ExpertSource, *, swiglu_limit: float, compute_dtype: torch.dtype = torch.float32):
        self.source = source
        self.swiglu_limit = swiglu_limit
        self.compute_dtype = compute_dtype

    def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, expert_weights: torch.Tensor) -> torch.Tensor:
        return reference_moe(self.source, layer, x, expert_ids, expert_weights, swiglu_limit=self.swiglu_limit,
                             compute_dtype=self.compute_dtype)
