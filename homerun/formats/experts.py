"""A routed expert as stored: its six packed tensors (FP4 codes or FP8 values, each with ue8m0 scales), and the
callable that hands them out by (layer, expert). The checkpoint reader produces them; kernels and backends read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

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
