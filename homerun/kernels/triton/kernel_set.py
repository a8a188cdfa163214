"""The GPU kernel set: the torch set with its FP8 linears on the Triton `fp8_linear` kernel.

`kernels_for` picks it on CUDA devices when triton imports, and on CUDA stand-ins (CPU tensors, the kernels under
Triton's interpreter), so the stand-in runs the same code path a GPU does. FP8 weights are read as stored (e4m3 bytes
+ ue8m0 scales, decoded in-kernel); dense (bf16-stored) weights stay as stored and go through torch's matmul in the
compute dtype (a bf16 model multiplies them as they are; an fp32 one converts bounded row blocks per call).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from homerun.kernels.torch_set import Linear, TorchKernels

# Decode-sized batches: a grouped projection runs as one launch over all groups (rows T*G against the whole weight,
# the diagonal blocks kept), which reads the weight once; past this many rows the per-group launches waste less.
GROUPED_ONE_LAUNCH_MAX_ROWS = 16


class TritonKernels(TorchKernels):
    """FP8 linears through `homerun.kernels.triton.fp8.fp8_linear`; everything else as the torch set."""

    name = "triton"

    def __init__(self, mods: Any):
        # Under the interpreter (a CUDA stand-in) the fewest programs per launch: the same launches, far less time.
        self._fp8 = functools.partial(mods.fp8.fp8_linear, fewest_programs=mods.common.interpreting())

    def linear(self, lin: Linear, x: torch.Tensor) -> torch.Tensor:
        if lin.scale is None:
            return lin.torch_forward(x)
        n, k = lin.weight.shape
        y = self._fp8(x.reshape(-1, k), lin.weight, lin.scale, x.dtype)
        return y.view(*x.shape[:-1], n)

    def grouped(self, lin: Linear, x: torch.Tensor, groups: int) -> torch.Tensor:
        """x [T, G, in] -> [T, G, out/G]; group g uses weight rows g*out/G .. (g+1)*out/G."""
        if lin.scale is None:
            return lin.torch_grouped(x, groups)
        t, g, k = x.shape
        per = lin.weight.shape[0] // groups
        if t * g <= GROUPED_ONE_LAUNCH_MAX_ROWS:
            y = self._fp8(x.reshape(t * g, k), lin.weight, lin.scale, x.dtype).view(t, g, g, per)
            return torch.diagonal(y, dim1=1, dim2=2).transpose(1, 2)  # a view: y[t, i, i, :]
        out = x.new_empty(t, g, per)
        for i in range(g):
            out[:, i] = self._fp8(x[:, i], lin.weight[i * per : (i + 1) * per], lin.scale, x.dtype, w_row0=i * per)
        return out

    def project(self, lins: Sequence[Linear], x: torch.Tensor, multi: Any = None) -> list[torch.Tensor]:
        return [self.linear(lin, x) for lin in lins]
