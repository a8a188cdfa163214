"""Linear layers over weights kept as stored: FP8 e4m3 + ue8m0 128x128 scales, or dense (bf16 / fp32) tensors.

`QLinear` computes y = x W^T without a resident dequantized copy. On the CPU with fp32 activations and at most
`NATIVE_FP8_MAX_ROWS` rows (decode, small batches) it calls the native kernels (`hr_fp8_gemm`, `hr_bf16_gemm`,
bound once per weight by `homerun.kernels.cpu_dense.bind_linear`): exact products, fp32 sums. Otherwise it dequantizes in
row blocks of at most `BLOCK_ELEMS` elements and uses the BLAS GEMM. Not here: the routed experts (offload.base.ExpertBackend).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from homerun.formats.quant import FP8_BLOCK, dequant_fp8, e8m0_to_float

# Dequantized weight blocks are kept under this many elements.
BLOCK_ELEMS = 1 << 24
# FP8 and bf16 matmuls of at most this many rows on CPU/fp32 use the native kernels (homerun.kernels.cpu_dense.bind_linear)
# when built: no dequantized copy, fp32 accumulation. Larger batches dequantize in
# row blocks and use the BLAS GEMM.
NATIVE_FP8_MAX_ROWS = 64
USE_NATIVE_LINEAR = True
_dense_module: Any = None
# Token counts up to which mHC's per-token mixes run natively on the calling thread (decode and small batches);
# larger batches keep torch's batched (and threaded) ops.
NATIVE_HC_MAX_ROWS = 64


def native_dense() -> Any:
    """The `homerun.kernels.cpu_dense` module when its native kernels are built, else None (resolved once); it ignores
    USE_NATIVE_LINEAR, which the per-op hooks below honour."""
    global _dense_module
    if _dense_module is None:
        _dense_module = False
        try:
            from homerun.kernels import cpu_dense

            if cpu_dense.available():
                _dense_module = cpu_dense
        except Exception:  # noqa: BLE001 - no kernel: every caller has a torch path
            _dense_module = False
    return _dense_module or None


def native_bf16() -> Callable | None:
    """cpu_dense.bf16_linear when built. With it, bf16-stored matrices stay bf16 in an fp32 model: exact products,
    half the bytes per decode step of an fp32 copy (the load decision, so not switched by USE_NATIVE_LINEAR)."""
    mod = native_dense()
    return mod.bf16_linear if mod is not None else None


def native_sinkhorn() -> Callable | None:
    """cpu_dense.sinkhorn_ (in place, CPU fp32) when built and enabled, else None."""
    mod = native_dense()
    return mod.sinkhorn_ if mod is not None and USE_NATIVE_LINEAR else None


def native_hc() -> Any:
    """cpu_dense (hc_pre, hc_post) when built and enabled, else None."""
    mod = native_dense()
    return mod if mod is not None and USE_NATIVE_LINEAR else None


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

    def _native_call(self, x: torch.Tensor) -> Any:
        """The bound native matmul for x (fp32 on the CPU, decode-sized), or None: then the torch path runs."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() > NATIVE_FP8_MAX_ROWS * self.in_features:
            return None
        return self.bound() if USE_NATIVE_LINEAR else None  # off: the torch path (upcast per row block) compares

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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None and self.weight.dtype == x.dtype:
            return F.linear(x, self.weight)
        nat = self._native_call(x)
        if nat is not None:
            return nat(x)
        out_f = self.out_features
        rb = self.row_block()
        if rb >= out_f:
            return F.linear(x, self.dequant(x.dtype))
        y = x.new_empty(*x.shape[:-1], out_f)
        for r0 in range(0, out_f, rb):
            r1 = min(r0 + rb, out_f)
            y[..., r0:r1] = F.linear(x, self.dequant(x.dtype, (r0, r1)))
        return y

    def grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor:
        """Block-diagonal grouped projection: x [T, G, in] -> [T, G, out/G], group g uses rows g*out/G...(g+1)."""
        per = self.out_features // groups
        if self.scale is None and self.weight.dtype == x.dtype:
            w = self.weight.view(groups, per, self.in_features)
            return torch.einsum("tgi,goi->tgo", x, w)
        nat = self._native_call(x[:, 0]) if per % FP8_BLOCK == 0 and self.scale is not None else None
        if nat is not None:  # one kernel call for every group: one dispatch, threads balanced over all rows
            return nat.grouped(x)
        ys = [F.linear(x[:, g], self.dequant(x.dtype, (g * per, (g + 1) * per))) for g in range(groups)]
        return torch.stack(ys, dim=1)

    def to_dense(self, dtype: torch.dtype) -> "QLinear":
        """The same linear with a pre-dequantized weight (weights_dtype bf16/fp32)."""
        if self.scale is None and self.weight.dtype == dtype:
            return self
        return QLinear(self.dequant(dtype))

    def to(self, device: torch.device | str) -> "QLinear":
        return QLinear(self.weight.to(device), None if self.scale is None else self.scale.to(device))


class Projections:
    """Linears of one input (a layer's attention input feeds wq_a, wkv and the compressors' and indexer's
    projections; its MoE input the router and the shared expert's w1, w3). Decode-sized fp32 CPU inputs run them
    as one native call (`homerun.kernels.cpu_dense.bind_multi`); otherwise, or with any weight not bindable, one call each."""

    __slots__ = ("lins", "_multi")

    def __init__(self, lins: list[QLinear]):
        self.lins = tuple(lins)
        self._multi: Any = None  # (the bound weights it was made for, BoundMulti or None)

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        lin0 = self.lins[0]
        if (len(self.lins) > 1 and USE_NATIVE_LINEAR and x.dtype == torch.float32 and x.device.type == "cpu"
                and x.numel() <= NATIVE_FP8_MAX_ROWS * lin0.in_features):
            bound = tuple(lin.bound() for lin in self.lins)
            m = self._multi
            if m is None or any(a is not b for a, b in zip(m[0], bound)):
                mod = native_dense()
                ok = mod is not None and all(b is not None for b in bound)
                m = self._multi = (bound, mod.bind_multi(list(bound)) if ok else None)
            if m[1] is not None:
                return m[1](x)
        return [lin(x) for lin in self.lins]
