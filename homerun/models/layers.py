"""Linear layers over weights kept as stored: FP8 e4m3 + ue8m0 128x128 scales, or dense (bf16 / fp32) tensors.

`QLinear` holds a weight as stored and computes y = x W^T without a resident dequantized copy: its torch path
dequantizes in row blocks of at most `BLOCK_ELEMS` elements and uses the BLAS GEMM. Which kernel runs a linear is the
kernel set's choice (`homerun.kernels.dispatch`); a QLinear only caches its native binding (`bound()`). Not here: the routed experts (offload.base.ExpertBackend).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from homerun.formats.quant import FP8_BLOCK, dequant_fp8, e8m0_to_float
from homerun.kernels.dispatch import native_dense

# Dequantized weight blocks are kept under this many elements.
BLOCK_ELEMS = 1 << 24


def native_bf16() -> Callable | None:
    """cpu_dense.bf16_linear when built. With it, bf16-stored matrices stay bf16 in an fp32 model: exact products,
    half the bytes per decode step of an fp32 copy (a load decision, made by the model's build step)."""
    mod = native_dense()
    return mod.bf16_linear if mod is not None else None


class QLinear:
    """y = x W^T for a weight kept as stored: FP8 e4m3 + ue8m0 128x128 scales, or a dense tensor.

    FP8 (and dense weights whose dtype differs from x) are dequantized per call in row blocks, so the transient is
    bounded (`BLOCK_ELEMS`) and the resident copy stays packed.
    """

    __slots__ = ("weight", "scale", "_bound")

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None):
        self.weight = weight
        self.scale = scale
        self._bound: Any = None  # (weight it was bound for, cpu_dense.BoundLinear or None), made on first use

    def bound(self) -> Any:
        """This weight's cpu_dense.BoundLinear (FP8 or bf16 on the CPU with the kernel built), else None; bound on
        first use and again if the weight was replaced."""
        b = self._bound
        if b is None or b[0] is not self.weight:
            mod = native_dense()
            b = self._bound = (self.weight, mod.bind_linear(self.weight, self.scale) if mod is not None else None)
        return b[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def nbytes(self) -> int:
        n = self.weight.numel() * self.weight.element_size()
        return n + (self.scale.numel() * self.scale.element_size() if self.scale is not None else 0)

    def dequant(self, dtype: torch.dtype, rows: tuple[int, int] | None = None) -> torch.Tensor:
        r0, r1 = rows if rows is not None else (0, self.out_features)
        w = self.weight[r0:r1]
        if self.scale is None:
            return w.to(dtype)
        in_f = self.in_features
        if r0 % FP8_BLOCK == 0 and (r1 - r0) % FP8_BLOCK == 0 and in_f % FP8_BLOCK == 0:
            s = e8m0_to_float(self.scale[r0 // FP8_BLOCK : r1 // FP8_BLOCK]).to(w.device, dtype)
            nr, nc = (r1 - r0) // FP8_BLOCK, in_f // FP8_BLOCK
            # Scales are powers of two, so the multiply is exact in bf16 and fp32 alike.
            out = w.to(dtype).view(nr, FP8_BLOCK, nc, FP8_BLOCK) * s.view(nr, 1, nc, 1)
            return out.view(r1 - r0, in_f)
        s0 = r0 // FP8_BLOCK
        s1 = -(-r1 // FP8_BLOCK)
        full = dequant_fp8(self.weight[s0 * FP8_BLOCK : min(s1 * FP8_BLOCK, self.out_features)],
                           self.scale[s0:s1], dtype)
        return full[r0 - s0 * FP8_BLOCK : r1 - s0 * FP8_BLOCK]

    def row_block(self) -> int:
        rb = max(FP8_BLOCK, (BLOCK_ELEMS // max(self.in_features, 1)) // FP8_BLOCK * FP8_BLOCK)
        return rb

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The torch path: F.linear over the weight dequantized to x's dtype in bounded row blocks."""
        if self.scale is None and self.weight.dtype == x.dtype:
            return F.linear(x, self.weight)
        out_f = self.out_features
        rb = self.row_block()
        if rb >= out_f:
            return F.linear(x, self.dequant(x.dtype))
        y = x.new_empty(*x.shape[:-1], out_f)
        for r0 in range(0, out_f, rb):
            r1 = min(r0 + rb, out_f)
            y[..., r0:r1] = F.linear(x, self.dequant(x.dtype, (r0, r1)))
        return y

    __call__ = torch_forward

    def torch_grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """Block-diagonal grouped projection: x [T, G, in] -> [T, G, out/G], group g uses rows g*out/G...(g+1)."""
        per = self.out_features // groups
        if self.scale is None and self.weight.dtype == x.dtype:
            w = self.weight.view(groups, per, self.in_features)
            return torch.einsum("tgi,goi->tgo", x, w)
        ys = [F.linear(x[:, g], self.dequant(x.dtype, (g * per, (g + 1) * per))) for g in range(groups)]
        return torch.stack(ys, dim=1)

    grouped = torch_grouped

    def to_dense(self, dtype: torch.dtype) -> "QLinear":
        """The same linear with a pre-dequantized weight (weights_dtype bf16/fp32)."""
        if self.scale is None and self.weight.dtype == dtype:
            return self
        return QLinear(self.dequant(dtype))

    def to(self, device: torch.device | str) -> "QLinear":
        return QLinear(self.weight.to(device), None if self.scale is None else self.scale.to(device))


class Projections:
    """Linears of one input (a layer's attention input feeds wq_a, wkv and the compressors' and indexer's
    projections; its MoE input the router and the shared expert's w1, w3). A kernel set may run them as one call
    (`homerun.kernels.cpu_dense.bind_multi` for decode-sized CPU rows); this object caches that binding."""

    __slots__ = ("lins", "_multi")

    def __init__(self, lins: list[QLinear]):
        self.lins = tuple(lins)
        self._multi: Any = None  # (the bound weights it was made for, BoundMulti or None)

    def get(self, dense: Any, bound: list[Any]) -> Any:
        """The multi-matrix binding of these linears' bound weights (made once, again if a weight changed), or None
        when any weight does not bind."""
        m = self._multi
        if m is None or any(a is not b for a, b in zip(m[0], bound)):
            ok = all(b is not None for b in bound)
            m = self._multi = (tuple(bound), dense.bind_multi(list(bound)) if ok else None)
        return m[1]
