"""Small decode ops fused into one launch each (definitions: homerun.kernels.torch_set.TorchKernels):

- `route`: the MoE router's scores (sqrt-softplus / sigmoid / softmax), the expert choice (top-k of the biased
  scores, or the hash table's row for the token) and the normalized, scaled weights; one program per token.
- `index_scores`: the lightning indexer's scores of one page of keys, sum_h relu(q_h . k_n * scale) * w_h.
- `rope_cos_sin`: the cos / sin tables of a forward's positions (one launch for both).

All math in fp32. Top-k ties go to the lower expert id; the picks come out in descending score order (torch's
unsorted top-k may list them in another order: the set is the same, the sum over them is reordered).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from homerun.kernels.triton.common import interpreting, launch

SCORE_FUNCS = {"sqrtsoftplus": 0, "sigmoid": 1, "softmax": 2}


@triton.jit
def _route_kernel(
    logit_ptr, bias_ptr, tid_ptr, tok_ptr, idx_ptr, w_ptr, E, K, route_scale,
    slt, sle, stv, stk, sit, sik, swt, swk,
    SCORE: tl.constexpr, HASH: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    re = tl.arange(0, BLOCK_E)
    e_mask = re < E
    x = tl.load(logit_ptr + t * slt + re * sle, mask=e_mask, other=0.0).to(tl.float32)
    if SCORE == 0:  # sqrt(softplus(x)), softplus with torch's threshold 20 and a log1p for tiny exp(x)
        u = tl.exp(x)
        sp = tl.where(x > 20.0, x, tl.where(u < 1e-4, u * (1.0 - 0.5 * u), tl.log(1.0 + u)))
        sc = tl.sqrt(sp)
    elif SCORE == 1:
        sc = 1.0 / (1.0 + tl.exp(-x))
    else:
        xm = tl.where(e_mask, x, float("-inf"))
        ex = tl.where(e_mask, tl.exp(xm - tl.max(xm, axis=0)), 0.0)
        sc = ex / tl.sum(ex, axis=0)
    rk = tl.arange(0, BLOCK_K)
    k_mask = rk < K
    if HASH:  # the experts are a function of the token id
        tok = tl.load(tok_ptr + t).to(tl.int64)
        idx = tl.load(tid_ptr + tok * stv + rk * stk, mask=k_mask, other=0).to(tl.int64)
        w = tl.sum(tl.where(re[None, :] == idx[:, None], sc[None, :], 0.0), axis=1)
    else:  # the bias picks, the unbiased scores weigh
        b = tl.load(bias_ptr + re, mask=e_mask, other=0.0).to(tl.float32)
        v = tl.where(e_mask, sc + b, float("-inf"))
        idx = tl.zeros((BLOCK_K,), dtype=tl.int64)
        w = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for j in range(0, K):
            best = tl.argmax(v, axis=0)
            idx = tl.where(rk == j, best.to(tl.int64), idx)
            w = tl.where(rk == j, tl.sum(tl.where(re == best, sc, 0.0), axis=0), w)
            v = tl.where(re == best, float("-inf"), v)
    w = tl.where(k_mask, w, 0.0)
    w = w / (tl.sum(w, axis=0) + 1e-20) * route_scale
    tl.store(idx_ptr + t * sit + rk * sik, idx, mask=k_mask)
    tl.store(w_ptr + t * swt + rk * swk, w, mask=k_mask)


def route(logits: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None, ids: torch.Tensor,
          score_func: str, topk: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] (any float dtype) -> (expert ids [T, k] int64, weights [T, k] fp32); hash layers (tid2eid
    [V, k]) take their ids from the table row of each token id ids [T], the others the top-k of scores + bias."""
    T, E = logits.shape
    idx = torch.empty((T, topk), device=logits.device, dtype=torch.int64)
    w = torch.empty((T, topk), device=logits.device, dtype=torch.float32)
    hash_ = tid2eid is not None
    tid = tid2eid if hash_ else idx
    launch(_route_kernel, (T,))(
        logits, bias if bias is not None else w, tid, ids, idx, w, E, topk, float(route_scale),
        logits.stride(0), logits.stride(1), tid.stride(0), tid.stride(1), idx.stride(0), idx.stride(1),
        w.stride(0), w.stride(1),
        SCORE=SCORE_FUNCS[score_func], HASH=hash_, BLOCK_E=max(2, triton.next_power_of_2(E)),
        BLOCK_K=max(2, triton.next_power_of_2(topk)),
    )
    return idx, w


@triton.jit
def _index_scores_kernel(
    q_ptr, w_ptr, k_ptr, o_ptr, HI, P, D, w_scale, scale,
    sqt, sqh, sqd, swt, swh, skn, skd, sot, son,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (n-block, query t): o[t, n] = sum_h relu(q[t, h] . k[n] * scale) * w[t, h] * w_scale."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1)
    rh = tl.arange(0, BLOCK_H)
    rd = tl.arange(0, BLOCK_D)
    h_mask = rh < HI
    n_mask = rn < P
    d_mask = rd < D
    q = tl.load(q_ptr + t * sqt + rh[:, None] * sqh + rd[None, :] * sqd, mask=h_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)
    k = tl.load(k_ptr + rn.to(tl.int64)[:, None] * skn + rd[None, :] * skd, mask=n_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)
    s = tl.maximum(tl.dot(q, tl.trans(k), input_precision="ieee"), 0.0) * scale  # [BH, BN]
    w = tl.load(w_ptr + t * swt + rh * swh, mask=h_mask, other=0.0).to(tl.float32) * w_scale
    tl.store(o_ptr + t * sot + rn * son, tl.sum(s * w[:, None], axis=0), mask=n_mask)


def index_scores(iq: torch.Tensor, iw: torch.Tensor, ik: torch.Tensor, iw_scale: float, scale: float) -> torch.Tensor:
    """iq [q, Hi, Di], iw [q, Hi], ik [P, Di] (any float dtypes and strides) -> scores [q, P] fp32."""
    nq, hi, d = iq.shape
    p = ik.shape[0]
    out = torch.empty((nq, p), device=iq.device, dtype=torch.float32)
    bn = min(max(16, triton.next_power_of_2(p)), 512 if interpreting() else 64)
    launch(_index_scores_kernel, (triton.cdiv(p, bn), nq))(
        iq, iw, ik, out, hi, p, d, float(iw_scale), float(scale),
        iq.stride(0), iq.stride(1), iq.stride(2), iw.stride(0), iw.stride(1), ik.stride(0), ik.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_H=max(16, triton.next_power_of_2(hi)), BLOCK_N=bn, BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return out


@triton.jit
def _rope_kernel(pos_ptr, f_ptr, c_ptr, s_ptr, T, R2, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    rr = tl.arange(0, BLOCK_R)
    m = (rt < T)[:, None] & (rr < R2)[None, :]
    pos = tl.load(pos_ptr + rt, mask=rt < T, other=0).to(tl.float32)
    ang = pos[:, None] * tl.load(f_ptr + rr, mask=rr < R2, other=0.0)[None, :]
    tl.store(c_ptr + rt[:, None] * R2 + rr[None, :], tl.cos(ang), mask=m)
    tl.store(s_ptr + rt[:, None] * R2 + rr[None, :], tl.sin(ang), mask=m)


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] (integer) -> cos, sin [T, R/2] fp32 for freqs [R/2] fp32, one launch."""
    T, r2 = positions.shape[0], freqs.shape[0]
    cos = torch.empty((T, r2), device=positions.device, dtype=torch.float32)
    sin = torch.empty((T, r2), device=positions.device, dtype=torch.float32)
    bt = min(max(1, triton.next_power_of_2(T)), 64)
    launch(_rope_kernel, (triton.cdiv(T, bt),))(
        positions, freqs, cos, sin, T, r2, BLOCK_T=bt, BLOCK_R=max(2, triton.next_power_of_2(r2)))
    return cos, sin
