"""The torch kernel set: the definition of every dense family a model forward calls (linears over weights kept as
stored, the mHC family, RMSNorm + RoPE, one-query attention) in plain torch ops, on any device and dtype. Every other
set (`homerun.kernels.dispatch`, `homerun.kernels.triton.kernel_set`) subclasses it and is tested against it."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F


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

    def hc_pre_norm(self, pre: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """The sublayer's input: norm_rope(hc_pre(pre, x), weight, eps) (a set may fuse the two)."""
        return self.norm_rope(self.hc_pre(pre, x), weight, eps)

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

    def attend_rows(self, q: torch.Tensor, keys: torch.Tensor, key_pos0: int, window: int, comp: torch.Tensor | None,
                    sel: torch.Tensor | None, q_pos0: int, rate: int, sink: torch.Tensor, scale: float) -> torch.Tensor:
        """Prefill attention of consecutive queries: q [T, H, D] at absolute positions q_pos0.. over
        - keys [N, D], the sliding window's rows at positions key_pos0..: visible iff pos - window < kpos <= pos;
        - comp [C, D], compressed entries (entry c is closed for the query at pos iff c < (pos + 1) // rate): every
          closed one (HCA: sel None), or the ones sel [T, k] lists (CSA; listed entries not yet closed are dropped);
        with sink [H] in the softmax denominator (its column dropped before the value product) -> [T, H, D] fp32.
        Keys double as values. Temporaries are [T, H, N + C or k]: callers block the queries."""
        T, H, _ = q.shape
        dev = q.device
        qf = q.float()
        kw = keys.float()
        tpos = torch.arange(q_pos0, q_pos0 + T, device=dev)
        kpos = torch.arange(kw.shape[0], device=dev) + key_pos0
        vis = (kpos[None, :] <= tpos[:, None]) & (kpos[None, :] > tpos[:, None] - window)
        s_w = torch.einsum("qhd,kd->qhk", qf, kw) * scale
        parts = [s_w.masked_fill(~vis[:, None, :], float("-inf"))]
        thr = (tpos + 1) // rate if rate else None  # entries c < thr are closed for query t
        ke = gathered = None
        if comp is not None and rate and sel is None and comp.shape[0]:
            ke = comp.float()  # HCA: every entry, the ones not yet closed masked
            s_c = torch.einsum("qhd,kd->qhk", qf, ke) * scale
            cvis = torch.arange(ke.shape[0], device=dev)[None, :] < thr[:, None]
            parts.append(s_c.masked_fill(~cvis[:, None, :], float("-inf")))
        elif comp is not None and rate and sel is not None and sel.shape[1]:
            valid = (sel < thr[:, None]) & (sel >= 0)  # picks that landed on masked (future) entries are dropped
            gathered = comp[sel.clamp(0, max(comp.shape[0] - 1, 0))].float()  # (T, k, D): only the selected rows
            s_c = torch.einsum("qhd,qkd->qhk", qf, gathered) * scale
            parts.append(s_c.masked_fill(~valid[:, None, :], float("-inf")))
        logits = torch.cat(parts + [sink.reshape(1, H, 1).float().expand(T, H, 1)], dim=-1)
        probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)
        nw = kw.shape[0]
        o = torch.einsum("qhk,kd->qhd", probs[..., :nw], kw)
        if ke is not None:
            o = o + torch.einsum("qhk,kd->qhd", probs[..., nw : nw + ke.shape[0]], ke)
        if gathered is not None:
            o = o + torch.einsum("qhk,qkd->qhd", probs[..., nw : nw + gathered.shape[1]], gathered)
        return o
