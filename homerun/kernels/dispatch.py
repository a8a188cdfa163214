"""One interface for the dense kernel families a model forward calls, chosen once per forward (and device).

A model asks `kernels_for(device, dtype, rows)` at the top of a forward and calls the returned set's methods:
`linear` / `grouped` / `project` (FP8 or dense weights kept as stored), the mHC family (`hc_weights`, `hc_pre`,
`hc_post`), `norm_rope`, and `attend_one` (one query over rows every head shares). Sets:

- `TorchKernels` ("torch"): plain torch ops on any device. It is what CUDA runs until a GPU family overrides it, and
  the reference every other set is tested against. `HOMERUN_KERNELS=torch` forces it on the CPU too (CI runs the
  model tests a second time that way, so the torch path cannot rot behind the native one).
- `CpuPrefillKernels` ("cpu"): the torch set plus the native Sinkhorn, for CPU batches above `NATIVE_MAX_ROWS`.
- `NativeCpuKernels` ("cpu-native"): decode-sized fp32 rows on the CPU through the native library
  (`homerun.kernels.cpu_dense`): exact products, fp32 sums, one call where torch needs tens of tiny ops.

The math is the same in every set (the torch methods below are its definition); only where and how it runs changes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F

# Rows (tokens) up to which fp32 CPU work takes the native decode kernels; larger batches keep torch's batched and
# threaded ops (and the BLAS GEMM for the linears).
NATIVE_MAX_ROWS = 64
# The native decode set is used when built; False (or HOMERUN_KERNELS=torch) runs the torch set everywhere.
USE_NATIVE = os.environ.get("HOMERUN_KERNELS", "auto").lower() != "torch"


class Linear(Protocol):
    """What a kernel set needs of a linear layer (homerun.models.layers.QLinear)."""

    weight: torch.Tensor
    scale: torch.Tensor | None

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor: ...
    def torch_grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor: ...
    def bound(self) -> Any: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (weight multiplied in fp32, one cast at the end, as HF >= 5.12)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        xf = weight * xf
    return xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Interleaved-pair RoPE on the trailing 2*cos.shape[-1] channels of x [T, ..., Dh]; cos/sin [T, R/2]."""
    r = cos.shape[-1] * 2
    extra = x.dim() - 2  # broadcast over head axes between T and Dh
    c = cos.view(cos.shape[0], *([1] * extra), -1)
    s = sin.view(sin.shape[0], *([1] * extra), -1)
    if inverse:
        s = -s
    rope = x[..., -r:].float()
    even, odd = rope[..., 0::2], rope[..., 1::2]
    rotated = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2).to(x.dtype)
    return torch.cat((x[..., :-r], rotated), dim=-1)


def sinkhorn(comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """A column pass, then (iters - 1) x (rows, columns), each dividing by (sum + eps)."""
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


class TorchKernels:
    """The definition of every family in plain torch ops; runs on any device and dtype."""

    name = "torch"

    # ---- linears over weights kept as stored
    def linear(self, lin: Linear, x: torch.Tensor) -> torch.Tensor:
        return lin.torch_forward(x)

    def grouped(self, lin: Linear, x: torch.Tensor, groups: int) -> torch.Tensor:
        """Block-diagonal projection: x [T, G, in] -> [T, G, out/G], group g uses rows g*out/G .. (g+1)*out/G."""
        return lin.torch_grouped(x, groups)

    def project(self, lins: Sequence[Linear], x: torch.Tensor, multi: Any = None) -> list[torch.Tensor]:
        """Several linears of one input."""
        return [self.linear(lin, x) for lin in lins]

    # ---- mHC
    def sinkhorn(self, comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        return sinkhorn(comb, iters, eps)

    def hc_weights(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, norm_eps: float,
                   hc_eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """x [T, n, D] -> pre [T, n], post [T, n], comb [T, n, n] (fp32; Sinkhorn-normalized comb); with the
        head's fn [n, n*D], pre alone (post, comb None)."""
        n = x.shape[1]
        flat = rms_norm(x.flatten(1).float(), None, norm_eps)
        mix = F.linear(flat, fn)  # (T, (2+n)n) or (T, n)
        if fn.shape[0] == n:  # the HC head: one scale, pre only
            return torch.sigmoid(mix * scale + base) + hc_eps, None, None
        pre = torch.sigmoid(mix[:, :n] * scale[0] + base[:n]) + hc_eps
        post = 2 * torch.sigmoid(mix[:, n : 2 * n] * scale[1] + base[n : 2 * n])
        comb = mix[:, 2 * n :].view(-1, n, n) * scale[2] + base[2 * n :].view(n, n)
        comb = torch.softmax(comb, dim=-1) + hc_eps
        return pre, post, self.sinkhorn(comb.contiguous(), iters, hc_eps)

    def hc_pre(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Collapse the streams before a sublayer: sum_i pre[t, i] x[t, i] -> [T, D] in x's dtype."""
        return (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)

    def hc_post(self, post: torch.Tensor, y: torch.Tensor, comb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Update the streams after a sublayer: post[t, j] y[t] + sum_i comb[t, i, j] x[t, i] (comb transposed, as
        the official hc_post; HF comb^T @ X) -> [T, n, D] in x's dtype."""
        dt = x.dtype
        return post.to(dt).unsqueeze(-1) * y.to(dt).unsqueeze(1) + torch.matmul(comb.to(dt).transpose(-1, -2), x)

    # ---- norms, rotary
    def norm_rope(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None = None,
                  sin: torch.Tensor | None = None, *, norm: bool = True, inverse: bool = False) -> torch.Tensor:
        """rms_norm (when norm) then apply_rope (when cos is given)."""
        if norm:
            x = rms_norm(x, weight, eps)
        return x if cos is None else apply_rope(x, cos, sin, inverse=inverse)

    # ---- attention
    def attend_one(self, q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
        """One query over rows every head sees: q [H, D], kv [N, D], sink [H] -> [H, D] (fp32), softmax over
        [scale * q.kv_j ..., sink] with the sink column dropped before the value product."""
        logits = torch.cat([torch.mm(q, kv.T) * scale, sink.reshape(-1, 1)], dim=1)  # (H, N + 1)
        probs = torch.softmax(logits, dim=-1)
        return torch.mm(probs[:, :-1], kv)


class CpuPrefillKernels(TorchKernels):
    """CPU batches above the decode size: torch's batched ops, with the native Sinkhorn (same passes in the same order
    without ~120 tiny ops per call)."""

    name = "cpu"

    def __init__(self, dense: Any):
        self._dense = dense

    def sinkhorn(self, comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        if comb.dtype != torch.float32:
            return super().sinkhorn(comb, iters, eps)
        return self._dense.sinkhorn_(comb.contiguous(), iters, eps)


class NativeCpuKernels(CpuPrefillKernels):
    """Decode-sized fp32 rows on the CPU through the native library: linears bound once per weight, one call for a
    layer input's projections, mHC and norm+RoPE on the calling thread, one-query attention with heads on the pool."""

    name = "cpu-native"

    def linear(self, lin: Linear, x: torch.Tensor) -> torch.Tensor:
        b = lin.bound()
        return b(x) if b is not None else lin.torch_forward(x)

    def grouped(self, lin: Linear, x: torch.Tensor, groups: int) -> torch.Tensor:
        per = lin.weight.shape[0] // groups
        b = lin.bound() if lin.scale is not None and per % 128 == 0 else None
        # one kernel call for every group: one dispatch, threads balanced over all rows
        return b.grouped(x) if b is not None else lin.torch_grouped(x, groups)

    def project(self, lins: Sequence[Linear], x: torch.Tensor, multi: Any = None) -> list[torch.Tensor]:
        """One native call for every projection of an input when each weight binds (`multi` caches the binding)."""
        if len(lins) > 1 and multi is not None:
            m = multi.get(self._dense, [lin.bound() for lin in lins])
            if m is not None:
                return m(x)
        return [self.linear(lin, x) for lin in lins]

    def hc_weights(self, x, fn, scale, base, norm_eps, hc_eps, iters):
        return self._dense.hc_weights(x, fn, scale, base, norm_eps, hc_eps, iters)

    def hc_pre(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._dense.hc_pre(pre, x)

    def hc_post(self, post: torch.Tensor, y: torch.Tensor, comb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._dense.hc_post(post, y, comb, x)

    def norm_rope(self, x, weight, eps, cos=None, sin=None, *, norm=True, inverse=False):
        if x.dtype != torch.float32:
            return super().norm_rope(x, weight, eps, cos, sin, norm=norm, inverse=inverse)
        return self._dense.norm_rope(x, weight, eps, cos, sin, norm=norm, inverse=inverse)

    def attend_one(self, q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
        return self._dense.attend_one(q, kv, sink.reshape(-1), scale)


TORCH = TorchKernels()
_dense_module: Any = None


def native_dense() -> Any:
    """The `homerun.kernels.cpu_dense` module when its native kernels are built, else None (resolved once)."""
    global _dense_module
    if _dense_module is None:
        _dense_module = False
        try:
            from homerun.kernels import cpu_dense

            if cpu_dense.available():
                _dense_module = cpu_dense
        except Exception:  # noqa: BLE001 - no kernel: every family has a torch path
            _dense_module = False
    return _dense_module or None


_SETS: dict[tuple[bool, bool], TorchKernels] = {}


def kernels_for(device: torch.device | str, dtype: torch.dtype, rows: int) -> TorchKernels:
    """The kernel set for a forward over `rows` tokens in `dtype` on `device`."""
    if torch.device(device).type != "cpu" or not USE_NATIVE:
        return TORCH
    dense = native_dense()
    if dense is None:
        return TORCH
    decode = dtype == torch.float32 and rows <= NATIVE_MAX_ROWS
    key = (decode, True)
    ks = _SETS.get(key)
    if ks is None:
        ks = _SETS[key] = NativeCpuKernels(dense) if decode else CpuPrefillKernels(dense)
    return ks


def set_native(enabled: bool) -> Callable[[], None]:
    """Switch the native sets on or off (tests compare both paths); returns a function that restores the setting."""
    global USE_NATIVE
    old = USE_NATIVE
    USE_NATIVE = bool(enabled)

    def restore() -> None:
        global USE_NATIVE
        USE_NATIVE = old

    return restore
