"""Small decode ops fused into one launch each (definitions: homerun.kernels.torch_set.TorchKernels):

- `route`: the MoE router's scores (sqrt-softplus / sigmoid / softmax), the expert choice (top-k of the biased
  scores, or the hash table's row for the token) and the normalized, scaled weights; one program per token.
- `index_scores`: the lightning indexer's scores of one page of keys, sum_h relu(q_h . k_n * scale) * w_h.
- `rope_cos_sin`: the cos / sin tables of a forward's positions (one launch for both).
- `compress_close`: a compressor window closes (gated pooling, RMSNorm, RoPE; CSA's next overlap slots);
  `compress_step`: the same over a captured step's static window, after writing this step's row into it at a device
  slot, with the overlap replaced in place only where the step closes the window.
- `compress_append`: an eager step's open window grows by this step's row, kv and gate in one launch.

All math in fp32. Top-k ties go to the lower expert id; the picks come out in descending score order (torch's
unsorted top-k may list them in another order: the set is the same, the sum over them is reordered).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from homerun.kernels.triton.common import interpreting, launch, rne_bf16

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


@triton.jit
def _slots(s, ch, pk_ptr, nk_ptr, pg_ptr, ng_ptr, ape_ptr, ok_ptr, og_ptr, S, R, P, HD,
           spk, spg, sape, sok, sog, OVERLAP: tl.constexpr, HAS_PREV: tl.constexpr):
    """The pooling slots s [BS] x channels ch [BC]: (kv, gate + ape) in fp32, gate -inf where a slot is empty.
    OVERLAP: slots 0..R-1 are the previous window's first halves (overlap_*), R..2R-1 this window's second halves;
    window row i is pending row i (i < P) or the new row."""
    s_ok = s < S
    if OVERLAP:
        prev = s < R
        row = tl.where(prev, 0, s - R)
        col = ch + HD
    else:
        prev = s < 0
        row = s
        col = ch
    in_p = (s_ok & ~prev & (row < P))[:, None]
    in_n = (s_ok & ~prev & (row >= P))[:, None]
    r2 = row[:, None]
    c2 = col[None, :]
    kv = tl.load(pk_ptr + r2 * spk + c2, mask=in_p, other=0.0).to(tl.float32) + \
        tl.load(nk_ptr + c2 + r2 * 0, mask=in_n, other=0.0).to(tl.float32)
    g = tl.load(pg_ptr + r2 * spg + c2, mask=in_p, other=0.0).to(tl.float32) + \
        tl.load(ng_ptr + c2 + r2 * 0, mask=in_n, other=0.0).to(tl.float32) + \
        tl.load(ape_ptr + r2 * sape + c2, mask=in_p | in_n, other=0.0).to(tl.float32)
    if OVERLAP:
        pm = (s_ok & prev)[:, None]
        if HAS_PREV:
            kv += tl.load(ok_ptr + s[:, None] * sok + ch[None, :], mask=pm, other=0.0).to(tl.float32)
            g = tl.where(pm, tl.load(og_ptr + s[:, None] * sog + ch[None, :], mask=pm, other=0.0).to(tl.float32), g)
        else:
            g = tl.where(pm, float("-inf"), g)
    g = tl.where(s_ok[:, None], g, float("-inf"))
    return kv, g


@triton.jit
def _pool(ch, pk_ptr, nk_ptr, pg_ptr, ng_ptr, ape_ptr, ok_ptr, og_ptr, S, R, P, HD, spk, spg, sape, sok, sog,
          OVERLAP: tl.constexpr, HAS_PREV: tl.constexpr, KV_BF16: tl.constexpr, BLOCK_S: tl.constexpr,
          BLOCK_C: tl.constexpr):
    """sum_s softmax_s(gate)[s, c] * kv[s, c] for the channels ch, rounded as the torch set's ops in kv's dtype."""
    m = tl.zeros((BLOCK_C,), dtype=tl.float32) + float("-inf")
    lsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        _, g = _slots(s, ch, pk_ptr, nk_ptr, pg_ptr, ng_ptr, ape_ptr, ok_ptr, og_ptr, S, R, P, HD,
                      spk, spg, sape, sok, sog, OVERLAP, HAS_PREV)
        m_new = tl.maximum(m, tl.max(g, axis=0))
        lsum = lsum * tl.exp(m - m_new) + tl.sum(tl.exp(g - m_new[None, :]), axis=0)
        m = m_new
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        kv, g = _slots(s, ch, pk_ptr, nk_ptr, pg_ptr, ng_ptr, ape_ptr, ok_ptr, og_ptr, S, R, P, HD,
                       spk, spg, sape, sok, sog, OVERLAP, HAS_PREV)
        w = tl.exp(g - m[None, :]) / lsum[None, :]
        if KV_BF16:
            w = rne_bf16(w)
            acc += tl.sum(rne_bf16(kv * w), axis=0)
        else:
            acc += tl.sum(kv * w, axis=0)
    if KV_BF16:
        acc = rne_bf16(acc)
    return acc


@triton.jit
def _compress_close_kernel(
    pk_ptr, nk_ptr, pg_ptr, ng_ptr, ape_ptr, ok_ptr, og_ptr, nw_ptr, f_ptr, y_ptr, okn_ptr, ogn_ptr, pos_ptr,
    skv_ptr, sg_ptr, slot_ptr, cl_ptr,
    S, R, P, HD, R2, eps, pos, W,
    spk, spg, sape, sok, sog,
    OVERLAP: tl.constexpr, HAS_PREV: tl.constexpr, KV_BF16: tl.constexpr, POS_DEV: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, STEP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """One program: the closing window's entry (softmax-gated pooling, RMSNorm, RoPE at pos) and, OVERLAP, this
    window's first halves (kv, gate + ape) as the next window's overlap slots. POS_DEV: pos is read from pos_ptr.
    STEP (a captured step, compress_step): first this step's row (skv, sg [W]) into the open window at row
    slot_ptr[0] (pk_ptr: the window's row 0), read back by the pooling; the overlap slots go into ok / og where
    cl_ptr[0] is true. One program: a barrier orders each write after the reads of every thread."""
    if STEP:
        slot = tl.load(slot_ptr).to(tl.int64)
        cw = tl.arange(0, BLOCK_W)
        wm = cw < W
        tl.store(pk_ptr + slot * spk + cw, tl.load(skv_ptr + cw, mask=wm), mask=wm)
        tl.store(pg_ptr + slot * spg + cw, tl.load(sg_ptr + cw, mask=wm), mask=wm)
        tl.debug_barrier()
    if POS_DEV:
        pos = tl.load(pos_ptr).to(tl.float32)
    ch = tl.arange(0, BLOCK_C)
    c_mask = ch < HD
    x = _pool(ch, pk_ptr, nk_ptr, pg_ptr, ng_ptr, ape_ptr, ok_ptr, og_ptr, S, R, P, HD, spk, spg, sape, sok, sog,
              OVERLAP, HAS_PREV, KV_BF16, BLOCK_S, BLOCK_C)
    x = tl.where(c_mask, x, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / HD + eps)
    y = tl.load(nw_ptr + ch, mask=c_mask, other=0.0).to(tl.float32) * (x * rstd)
    if KV_BF16:
        y = rne_bf16(y)
    tl.store(y_ptr + ch, y, mask=c_mask & (ch < HD - 2 * R2))
    rp = tl.arange(0, BLOCK_P)
    p_mask = rp < R2
    de = HD - 2 * R2 + 2 * rp
    ev = _pool(de, pk_ptr, nk_ptr, pg_ptr, ng_ptr, ape_ptr, ok_ptr, og_ptr, S, R, P, HD, spk, spg, sape, sok, sog,
               OVERLAP, HAS_PREV, KV_BF16, BLOCK_S, BLOCK_P)
    od = _pool(de + 1, pk_ptr, nk_ptr, pg_ptr, ng_ptr, ape_ptr, ok_ptr, og_ptr, S, R, P, HD, spk, spg, sape, sok,
               sog, OVERLAP, HAS_PREV, KV_BF16, BLOCK_S, BLOCK_P)
    ev = tl.load(nw_ptr + de, mask=p_mask, other=0.0).to(tl.float32) * (ev * rstd)
    od = tl.load(nw_ptr + de + 1, mask=p_mask, other=0.0).to(tl.float32) * (od * rstd)
    if KV_BF16:
        ev = rne_bf16(ev)
        od = rne_bf16(od)
    ang = pos * tl.load(f_ptr + rp, mask=p_mask, other=0.0)
    c = tl.cos(ang)
    s = tl.sin(ang)
    re = ev * c - od * s
    ro = od * c + ev * s
    if KV_BF16:
        re = rne_bf16(re)
        ro = rne_bf16(ro)
    tl.store(y_ptr + de, re, mask=p_mask)
    tl.store(y_ptr + de + 1, ro, mask=p_mask)
    if OVERLAP:  # rows 0..R-1 of this window, channels 0..HD-1
        keep = 1
        if STEP:
            tl.debug_barrier()  # every thread has read the previous overlap (the pooling)
            keep = tl.load(cl_ptr)
        for s0 in range(0, R, BLOCK_S):
            rs = s0 + tl.arange(0, BLOCK_S)
            rm = rs < R
            in_p = (rm & (rs < P))[:, None] & c_mask[None, :]
            in_n = (rm & (rs >= P))[:, None] & c_mask[None, :]
            r2 = rs[:, None]
            c2 = ch[None, :]
            kv = tl.load(pk_ptr + r2 * spk + c2, mask=in_p, other=0.0) + tl.load(nk_ptr + c2 + r2 * 0, mask=in_n,
                                                                                other=0.0)
            g = tl.load(pg_ptr + r2 * spg + c2, mask=in_p, other=0.0).to(tl.float32) + \
                tl.load(ng_ptr + c2 + r2 * 0, mask=in_n, other=0.0).to(tl.float32) + \
                tl.load(ape_ptr + r2 * sape + c2, mask=in_p | in_n, other=0.0).to(tl.float32)
            if STEP:
                tl.store(ok_ptr + r2 * sok + c2, kv, mask=(in_p | in_n) & keep)
                tl.store(og_ptr + r2 * sog + c2, g, mask=(in_p | in_n) & keep)
            else:
                tl.store(okn_ptr + r2 * HD + c2, kv, mask=in_p | in_n)
                tl.store(ogn_ptr + r2 * HD + c2, g, mask=in_p | in_n)


def compress_close(pend_kv: torch.Tensor, kv: torch.Tensor, pend_gate: torch.Tensor, gate: torch.Tensor,
                   ape: torch.Tensor, overlap_kv: torch.Tensor | None, overlap_gate: torch.Tensor | None,
                   overlap: bool, norm_w: torch.Tensor, eps: float, freqs: torch.Tensor, pos: int | torch.Tensor,
                   head_dim: int):
    """The window of pend_kv [rate-1, W] + kv [1, W] (gate likewise; ape [rate, W] fp32) closes: -> (entry [1, hd] in
    kv's dtype, next overlap kv [rate, hd] or None, next overlap gate [rate, hd] fp32 or None). W = 2 hd with
    overlap (CSA: the previous window's overlap_* fill the first rate slots, -inf gates when None), else hd.
    pos: the entry's RoPE position, an int or a one-element integer device tensor (a captured step's)."""
    return _close(pend_kv, kv, pend_gate, gate, ape, overlap_kv, overlap_gate, overlap, norm_w, eps, freqs, pos,
                  head_dim)


def compress_step(pend_kv: torch.Tensor, pend_gate: torch.Tensor, kv: torch.Tensor, gate: torch.Tensor,
                  slot: torch.Tensor, closing: torch.Tensor, ape: torch.Tensor, overlap_kv: torch.Tensor | None,
                  overlap_gate: torch.Tensor | None, overlap: bool, norm_w: torch.Tensor, eps: float,
                  freqs: torch.Tensor, pos: torch.Tensor, head_dim: int) -> torch.Tensor:
    """TorchKernels.compress_step in one launch: this step's row into the open window pend_kv / pend_gate [rate, W]
    at row slot, the entry [1, hd], the next overlap into overlap_kv / overlap_gate where closing (in place)."""
    r = pend_kv.shape[0]
    assert kv.shape == (1, pend_kv.shape[1]) and gate.shape == (1, pend_gate.shape[1]) and kv.stride(1) == 1
    assert not overlap or (overlap_kv is not None and overlap_gate is not None)
    y, _, _ = _close(pend_kv[: r - 1], pend_kv[r - 1 :], pend_gate[: r - 1], pend_gate[r - 1 :], ape, overlap_kv,
                     overlap_gate, overlap, norm_w, eps, freqs, pos, head_dim, step=(kv, gate, slot, closing))
    return y


def _close(pend_kv, kv, pend_gate, gate, ape, overlap_kv, overlap_gate, overlap, norm_w, eps, freqs, pos, head_dim,
           step=None):
    rate = pend_kv.shape[0] + 1
    assert kv.shape[0] == 1 and pend_kv.stride(1) == 1 and kv.stride(1) == 1 and ape.stride(1) == 1
    assert pend_gate.stride(1) == 1 and gate.stride(1) == 1
    hd = head_dim
    dev = kv.device
    y = torch.empty((1, hd), device=dev, dtype=kv.dtype)
    has_prev = overlap and overlap_kv is not None
    okn = torch.empty((rate, hd), device=dev, dtype=kv.dtype) if overlap and step is None else y
    ogn = torch.empty((rate, hd), device=dev, dtype=torch.float32) if overlap and step is None else y
    ok = overlap_kv if has_prev else y
    og = overlap_gate if has_prev else y
    r2 = freqs.shape[0]
    bc = triton.next_power_of_2(hd)
    pos_dev = isinstance(pos, torch.Tensor)
    skv, sg, slot, closing = step if step is not None else (y, y, y, y)
    width = skv.shape[1]
    launch(_compress_close_kernel, (1,))(
        pend_kv, kv, pend_gate, gate, ape, ok, og, norm_w, freqs, y, okn, ogn, pos if pos_dev else y,
        skv, sg, slot, closing,
        2 * rate if overlap else rate, rate, rate - 1, hd, r2, float(eps), 0.0 if pos_dev else float(pos), width,
        pend_kv.stride(0), pend_gate.stride(0), ape.stride(0), ok.stride(0), og.stride(0),
        OVERLAP=overlap, HAS_PREV=has_prev, KV_BF16=kv.dtype == torch.bfloat16, POS_DEV=pos_dev,
        BLOCK_S=min(16, triton.next_power_of_2(2 * rate)), BLOCK_C=bc, BLOCK_P=max(2, triton.next_power_of_2(r2)),
        STEP=step is not None, BLOCK_W=triton.next_power_of_2(width),
    )
    if step is not None:
        return y, overlap_kv, overlap_gate
    return y, (okn if overlap else None), (ogn if overlap else None)


@triton.jit
def _append_kernel(pk_ptr, pg_ptr, k_ptr, g_ptr, ok_ptr, og_ptr, P, W, spk, spg, sok, sog,
                   BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    """Program r-block: out rows [r0, r0 + BLOCK_R) of both outputs, row i < P from the open rows, row P the new."""
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    for w0 in range(0, W, BLOCK_W):
        cw = w0 + tl.arange(0, BLOCK_W)
        wm = (cw < W)[None, :]
        old = (rr < P)[:, None] & wm
        new = (rr == P)[:, None] & wm
        r2 = rr.to(tl.int64)[:, None]
        c2 = cw[None, :]
        kv = tl.where(old, tl.load(pk_ptr + r2 * spk + c2, mask=old, other=0.0), tl.load(k_ptr + c2 + r2 * 0, mask=new,
                                                                                        other=0.0))
        g = tl.where(old, tl.load(pg_ptr + r2 * spg + c2, mask=old, other=0.0), tl.load(g_ptr + c2 + r2 * 0, mask=new,
                                                                                       other=0.0))
        tl.store(ok_ptr + r2 * sok + c2, kv, mask=old | new)
        tl.store(og_ptr + r2 * sog + c2, g, mask=old | new)


def compress_append(pend_kv: torch.Tensor, pend_gate: torch.Tensor, kv: torch.Tensor,
                    gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TorchKernels.compress_append in one launch: (cat(pend_kv, kv), cat(pend_gate, gate)), new tensors, the same
    bits (a copy: no arithmetic). pend_* [P, W] and kv / gate [1, W] with unit column strides, each pair one dtype."""
    p, w = pend_kv.shape
    out_kv = torch.empty((p + 1, w), device=kv.device, dtype=kv.dtype)
    out_g = torch.empty((p + 1, w), device=gate.device, dtype=gate.dtype)
    br = min(16, triton.next_power_of_2(p + 1))
    launch(_append_kernel, (triton.cdiv(p + 1, br),))(
        pend_kv, pend_gate, kv, gate, out_kv, out_g, p, w, pend_kv.stride(0), pend_gate.stride(0),
        out_kv.stride(0), out_g.stride(0), BLOCK_R=br,
        BLOCK_W=min(256, triton.next_power_of_2(w)))  # at most 16x256 fp32 per tile: no register spills on 4 warps
    return out_kv, out_g
