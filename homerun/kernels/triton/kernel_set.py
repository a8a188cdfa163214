"""The GPU kernel set: the torch set with its FP8 linears on the Triton `fp8_linear` kernel and the small decode
ops fused (mHC weights + Sinkhorn, stream collapse + norm, stream update, RMSNorm + RoPE, the RoPE tables, a
compressor's window close (with a captured step's writes into the open window and the overlap), an eager step's
appends to the open window (rows and gates together), one-query
attention over two row sources, the indexer's scores, MoE routing, the shared expert's activation + down projection
+ residual, the FP8 KV cache's row encode and decode: one launch each; homerun.kernels.triton.mhc / norm / attention /
decode / fp8 / kv_fp8).

`kernels_for` picks it on CUDA devices when triton imports, and on CUDA stand-ins (CPU tensors, the kernels under
Triton's interpreter), so the stand-in runs the same code path a GPU does. FP8 weights are read as stored (e4m3 bytes
+ ue8m0 scales, decoded in-kernel); dense (bf16-stored) weights stay as stored too: decode-sized inputs go through
`dense_linear` where it saves a launch (a weight of another dtype than the input's, converted in-kernel as the torch
set converts it instead of per call; two dense projections of one input in one launch), the rest through torch's
matmul in the compute dtype (a bf16 model multiplies them as they are; an fp32 one converts bounded row blocks per
call).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from homerun.kernels.torch_set import Linear, TorchKernels

# Decode-sized batches: a grouped projection runs as one launch over all groups (rows T*G against the whole weight,
# the diagonal blocks kept), which reads the weight once; past this many rows the per-group launches waste less.
GROUPED_ONE_LAUNCH_MAX_ROWS = 16
DENSE_KERNEL_MAX_ROWS = 16  # dense linears of at most this many rows (decode) may go through dense_linear
_DENSE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _pairable(a: Linear, b: Linear) -> bool:
    """Two FP8 linears one launch can run: same input width, same weight and scale strides."""
    return (a.scale is not None and b.scale is not None and a.weight.shape[1] == b.weight.shape[1]
            and a.weight.stride() == b.weight.stride() and a.scale.stride() == b.scale.stride()
            and a.weight.dtype == b.weight.dtype)


def _dense(lin: Linear, x: torch.Tensor) -> bool:
    """A dense linear dense_linear can run on x (2-d, decode-sized, float dtypes)."""
    return (lin.scale is None and lin.weight.dim() == 2 and lin.weight.dtype in _DENSE_DTYPES and x.dim() == 2
            and x.shape[0] <= DENSE_KERNEL_MAX_ROWS and x.dtype in (torch.bfloat16, torch.float32))


def _dense_pairable(a: Linear, b: Linear, x: torch.Tensor) -> bool:
    return (_dense(a, x) and _dense(b, x) and a.weight.dtype == b.weight.dtype
            and a.weight.shape[1] == b.weight.shape[1] and a.weight.stride() == b.weight.stride())


class TritonKernels(TorchKernels):
    """FP8 linears through `homerun.kernels.triton.fp8.fp8_linear`, the fused small ops; the torch set's math."""

    name = "triton"

    def __init__(self, mods: Any):
        # Under the interpreter (a CUDA stand-in) the fewest programs per launch: the same launches, far less time.
        self._fp8 = functools.partial(mods.fp8.fp8_linear, fewest_programs=mods.common.interpreting())
        self._dense = functools.partial(mods.fp8.dense_linear, fewest_programs=mods.common.interpreting())
        self._mhc, self._norm, self._attn, self._dec = mods.mhc, mods.norm, mods.attention, mods.decode
        self.fp8_rows = mods.kv_fp8

    def linear(self, lin: Linear, x: torch.Tensor) -> torch.Tensor:
        if lin.scale is None:
            if lin.weight.dtype != x.dtype and _dense(lin, x.reshape(-1, x.shape[-1])):  # no converted copy
                n, k = lin.weight.shape
                return self._dense(x.reshape(-1, k), lin.weight, x.dtype).view(*x.shape[:-1], n)
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
        if per & -per >= 16:  # one launch, each output tile reading its own group's input: no wasted blocks
            return self._fp8(x, lin.weight, lin.scale, x.dtype, group_rows=per).view(t, g, per)
        if t * g <= GROUPED_ONE_LAUNCH_MAX_ROWS:
            y = self._fp8(x.reshape(t * g, k), lin.weight, lin.scale, x.dtype).view(t, g, g, per)
            return torch.diagonal(y, dim1=1, dim2=2).transpose(1, 2)  # a view: y[t, i, i, :]
        out = x.new_empty(t, g, per)
        for i in range(g):
            out[:, i] = self._fp8(x[:, i], lin.weight[i * per : (i + 1) * per], lin.scale, x.dtype, w_row0=i * per)
        return out

    def project(self, lins: Sequence[Linear], x: torch.Tensor, multi: Any = None) -> list[torch.Tensor]:
        """Consecutive FP8 linears of the same layout go two per launch, and so do consecutive dense ones of
        decode-sized x (outputs side by side, returned as views)."""
        out: list[torch.Tensor] = []
        i = 0
        while i < len(lins):
            a = lins[i]
            b = lins[i + 1] if i + 1 < len(lins) else None
            if b is not None and x.dim() == 2 and _pairable(a, b):
                n = a.weight.shape[0]
                y = self._fp8(x, a.weight, a.scale, x.dtype, second=(b.weight, b.scale))
                out += [y[:, :n], y[:, n:]]
                i += 2
            elif b is not None and x.dim() == 2 and _dense_pairable(a, b, x):
                n = a.weight.shape[0]
                y = self._dense(x, a.weight, x.dtype, second=b.weight)
                out += [y[:, :n], y[:, n:]]
                i += 2
            else:
                out.append(self.linear(a, x))
                i += 1
        return out

    def swiglu_down(self, lin: Linear, g: torch.Tensor, u: torch.Tensor, limit: float,
                    residual: torch.Tensor) -> torch.Tensor:
        if lin.scale is None or g.stride() != u.stride() or residual.dtype != g.dtype:
            return super().swiglu_down(lin, g, u, limit, residual)
        n, k = lin.weight.shape
        y = self._fp8(g.reshape(-1, k), lin.weight, lin.scale, g.dtype, x2=u.reshape(-1, k), swiglu_limit=limit,
                      residual=residual.reshape(-1, n))
        return y.view(*g.shape[:-1], n)

    # ---- MoE routing
    def route(self, logits, bias, tid2eid, ids, score_func, topk, route_scale):
        if score_func not in self._dec.SCORE_FUNCS or (tid2eid is None and bias is None):
            return super().route(logits, bias, tid2eid, ids, score_func, topk, route_scale)
        return self._dec.route(logits, bias, tid2eid, ids, score_func, topk, route_scale)

    # ---- mHC
    def hc_weights(self, x, fn, scale, base, norm_eps, hc_eps, iters):
        return self._mhc.hc_weights(x, fn, scale, base, norm_eps, hc_eps, iters)

    def hc_pre(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._mhc.hc_pre_norm(pre, x, None, 0.0, norm=False)

    def hc_pre_norm(self, pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        return self._mhc.hc_pre_norm(pre, x, weight, eps)

    def hc_post(self, post: torch.Tensor, y: torch.Tensor, comb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._mhc.hc_post(post, y, comb, x)

    # ---- norms, rotary
    def norm_rope(self, x, weight, eps, cos=None, sin=None, *, norm=True, inverse=False):
        return self._norm.norm_rope(x, weight, eps, cos, sin, norm=norm, inverse=inverse)

    def rope_cos_sin(self, freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dec.rope_cos_sin(freqs, positions)

    def compress_close(self, pend_kv, kv, pend_gate, gate, ape, overlap_kv, overlap_gate, overlap, norm_w, eps, freqs,
                       pos, head_dim):
        if (any(t.stride(-1) != 1 for t in (pend_kv, kv, pend_gate, gate, ape))
                or any(t is not None and t.stride(-1) != 1 for t in (overlap_kv, overlap_gate))
                or kv.dtype != pend_kv.dtype):
            return super().compress_close(pend_kv, kv, pend_gate, gate, ape, overlap_kv, overlap_gate, overlap,
                                          norm_w, eps, freqs, pos, head_dim)
        return self._dec.compress_close(pend_kv, kv, pend_gate, gate, ape, overlap_kv, overlap_gate, overlap, norm_w,
                                        eps, freqs, pos, head_dim)

    def compress_append(self, pend_kv, pend_gate, kv, gate):
        if (any(t.dim() != 2 or t.stride(-1) != 1 for t in (pend_kv, kv, pend_gate, gate))
                or kv.dtype != pend_kv.dtype or gate.dtype != pend_gate.dtype or kv.shape[0] != 1):
            return super().compress_append(pend_kv, pend_gate, kv, gate)
        return self._dec.compress_append(pend_kv, pend_gate, kv, gate)

    def compress_step(self, pend_kv, pend_gate, kv, gate, slot, closing, ape, overlap_kv, overlap_gate, overlap,
                      norm_w, eps, freqs, pos, head_dim):
        args = (pend_kv, pend_gate, kv, gate, slot, closing, ape, overlap_kv, overlap_gate, overlap, norm_w, eps, freqs,
                pos, head_dim)
        for name, t in (("overlap_kv", overlap_kv), ("overlap_gate", overlap_gate)):
            if overlap and t is not None and t.stride(-1) != 1:  # the kernel writes the overlap rows as contiguous
                raise ValueError(f"compress_step: {name} needs unit column stride (got strides {t.stride()}); "
                                 "pass a contiguous state tensor")
        if (any(t.stride(-1) != 1 for t in (pend_kv, kv, pend_gate, gate, ape)) or kv.dtype != pend_kv.dtype
                or gate.dtype != pend_gate.dtype or (overlap and overlap_kv is None)):
            return super().compress_step(*args)
        return self._dec.compress_step(*args)

    # ---- attention
    def attend_one(self, q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
        return self._attn.attend_one(q, kv, sink, scale)

    def attend_rows(self, q, kv, kv2, sink, scale, out_dtype, lengths=None):
        # lengths: device row counts over static capacities (homerun.models.deepseek_v4.static_decode)
        return self._attn.attend_two(q, kv, kv2, sink, scale, out_dtype, lengths)

    def index_scores(self, iq, iw, ik, iw_scale, scale):
        return self._dec.index_scores(iq, iw, ik, iw_scale, scale)
