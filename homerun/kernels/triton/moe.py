"""FP4 (e2m1 + 1x32 ue8m0) routed experts: the fused MoE decode over a device slot cache (two launches per layer) and
the grouped GEMM for prefill (group offsets resolved in-kernel, no host sync).

Semantics (offload/base.py swiglu_expert): g = min(x w1^T, L), u = clamp(x w3^T, -L, L), h = silu(g) * u,
y = sum_k w_k (h w2^T); routing weights arrive normalized and scaled; the shared expert is not included.
Slot layout: w13 = cat([w1, w3]) along rows, so a slot fill is a plain copy of the checkpoint's tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from homerun.kernels.triton.common import (
    e2m1_to_f32, e8m0_to_f32, interpreting, launch, mma, round_bf16, store_rounding,
)

@triton.jit
def _fp4_rowtile_dot(x_ptr, sxk, w_ptr, s_ptr, rows64, r_mask, swr, swc, ssr, ssc, K,
                     BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """sum_k x[k] * dequant_fp4(w)[rows, k] for one activation row x (fp32 math): [BLOCK_R] fp32. w_ptr / s_ptr point
    at one expert's codes / scales. Even / odd activation columns meet the low / high nibbles, so no interleave."""
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns
        b_mask = rb < K // 2
        xe = tl.load(x_ptr + (2 * rb) * sxk, mask=b_mask, other=0.0).to(tl.float32)
        xo = tl.load(x_ptr + (2 * rb + 1) * sxk, mask=b_mask, other=0.0).to(tl.float32)
        m2 = r_mask[:, None] & b_mask[None, :]
        c = tl.load(w_ptr + rows64[:, None] * swr + rb[None, :] * swc, mask=m2, other=0).to(tl.uint32)
        sc = e8m0_to_f32(tl.load(s_ptr + rows64[:, None] * ssr + (rb // 16)[None, :] * ssc, mask=m2, other=127))
        lo = e2m1_to_f32(c & 15) * sc
        hi = e2m1_to_f32(c >> 4) * sc
        acc += tl.sum(lo * xe[None, :] + hi * xo[None, :], axis=1)
    return acc


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, ids_ptr, slot_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr,
    TOPK, H, I, limit,
    sxt, sxh, sit, sik, swe, swr, swc, sse, ssr, ssc, sht, shk, shi,
    BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (pair = t*TOPK + j, i-tile): h[t, j, i-tile] = silu(min(g, L)) * clamp(u, -L, L) with
    g = x[t] @ w1[slot]^T, u = x[t] @ w3[slot]^T. Pairs whose expert has slot -1 write nothing."""
    pair = tl.program_id(0)
    t = pair // TOPK
    j = pair % TOPK
    e = tl.load(ids_ptr + t * sit + j * sik)
    slot = tl.load(slot_ptr + e)
    if slot >= 0:
        ri = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        i_mask = ri < I
        ri64 = ri.to(tl.int64)
        slot64 = slot.to(tl.int64)
        xrow = x_ptr + t * sxt
        g = _fp4_rowtile_dot(xrow, sxh, w1_ptr + slot64 * swe, s1_ptr + slot64 * sse, ri64, i_mask,
                             swr, swc, ssr, ssc, H, BLOCK_I, BLOCK_K)
        u = _fp4_rowtile_dot(xrow, sxh, w3_ptr + slot64 * swe, s3_ptr + slot64 * sse, ri64, i_mask,
                             swr, swc, ssr, ssc, H, BLOCK_I, BLOCK_K)
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        hv = g / (1.0 + tl.exp(-g)) * u
        tl.store(h_ptr + t * sht + j * shk + ri * shi, hv, mask=i_mask)


@triton.jit
def _moe_down_kernel(
    h_ptr, ids_ptr, wts_ptr, slot_ptr, w2_ptr, s2_ptr, y_ptr,
    TOPK, H, I,
    sht, shk, shi, sit, sik, swt, swk, swe, swr, swc, sse, ssr, ssc, syt, syh,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """Deterministic (ATOMIC=False), program (t, h-tile): y[t, h-tile] = sum_j wts[t, j] * (h[t, j] @ w2[slot_j]^T),
    j in order, resident experts only, one store. ATOMIC=True, program (t*TOPK + j, h-tile): atomic_add of one
    expert's weighted contribution into a zeroed fp32 y (more parallelism, run-to-run nondeterministic)."""
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = rh < H
    rh64 = rh.to(tl.int64)
    if ATOMIC:
        pair = tl.program_id(0)
        t = pair // TOPK
        j = pair % TOPK
        slot = tl.load(slot_ptr + tl.load(ids_ptr + t * sit + j * sik))
        if slot >= 0:
            slot64 = slot.to(tl.int64)
            part = _fp4_rowtile_dot(h_ptr + t * sht + j * shk, shi, w2_ptr + slot64 * swe, s2_ptr + slot64 * sse,
                                    rh64, h_mask, swr, swc, ssr, ssc, I, BLOCK_H, BLOCK_K)
            wt = tl.load(wts_ptr + t * swt + j * swk).to(tl.float32)
            tl.atomic_add(y_ptr + t * syt + rh * syh, part * wt, mask=h_mask)
    else:
        t = tl.program_id(0)
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for j in range(0, TOPK):
            slot = tl.load(slot_ptr + tl.load(ids_ptr + t * sit + j * sik))
            if slot >= 0:
                slot64 = slot.to(tl.int64)
                part = _fp4_rowtile_dot(h_ptr + t * sht + j * shk, shi, w2_ptr + slot64 * swe, s2_ptr + slot64 * sse,
                                        rh64, h_mask, swr, swc, ssr, ssc, I, BLOCK_H, BLOCK_K)
                wt = tl.load(wts_ptr + t * swt + j * swk).to(tl.float32)
                acc += part * wt
        tl.store(y_ptr + t * syt + rh * syh, store_rounding(acc, ROUND_BF16), mask=h_mask)


def fp4_moe_decode(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, slot_table: torch.Tensor,
                   w13_codes: torch.Tensor, w13_scale: torch.Tensor, w2_codes: torch.Tensor, w2_scale: torch.Tensor,
                   swiglu_limit: float, *, out_dtype: torch.dtype | None = None, deterministic: bool = True,
                   block_i: int = 32, block_h: int = 16, block_k: int = 256, num_warps: int = 4,
                   return_h: bool = False, fewest_programs: bool = False):
    """Fused routed-expert MoE for decode over a slot cache, two launches per layer.

    x [T, H]; expert_ids [T, k] (int32/int64, global ids); weights [T, k] routing weights (already normalized and
    scaled); slot_table [n_experts] int32, expert -> slot or -1 (those (t, j) pairs contribute zero: the host adds
    them). Slot cache: w13_codes [n_slots, 2*I, H/2] int8 = cat([w1, w3]) along rows (w1 = gate rows 0..I-1, w3 = up
    rows I..2I-1), w13_scale [n_slots, 2*I, H/32] ue8m0, w2_codes [n_slots, H, I/2], w2_scale [n_slots, H, I/32].
    Any strides (e.g. views into a bigger cache). Math: y[t] = sum_j w[t,j] * (silu(min(g, L)) * clamp(u, -L, L))
    @ w2^T, fp32 throughout; returns y [T, H] in out_dtype (default x.dtype), plus h [T, k, I] fp32 if return_h
    (rows of non-resident pairs are uninitialized). `fewest_programs`: wide tiles for the interpreter (TritonKernels
    passes `interpreting()`)."""
    T, H = x.shape
    k = expert_ids.shape[1]
    I = w13_codes.shape[1] // 2
    assert w13_codes.shape[2] * 2 == H and w2_codes.shape[1] == H and w2_codes.shape[2] * 2 == I
    assert H % 32 == 0 and I % 32 == 0 and block_k % 32 == 0
    out_dtype = out_dtype or x.dtype
    if fewest_programs:  # the interpreter's cost is per program: whole rows per program
        block_i, block_h = max(block_i, min(256, triton.next_power_of_2(I))), max(block_h, 128)
    c13, s13 = w13_codes.view(torch.uint8), w13_scale.view(torch.uint8)
    w1c, w3c, w1s, w3s = c13[:, :I], c13[:, I:], s13[:, :I], s13[:, I:]
    c2, s2 = w2_codes.view(torch.uint8), w2_scale.view(torch.uint8)
    h = torch.empty((T, k, I), device=x.device, dtype=torch.float32)
    launch(_moe_gate_up_kernel, (T * k, triton.cdiv(I, block_i)))(
        x, expert_ids, slot_table, w1c, w3c, w1s, w3s, h,
        k, H, I, float(swiglu_limit),
        x.stride(0), x.stride(1), expert_ids.stride(0), expert_ids.stride(1),
        w1c.stride(0), w1c.stride(1), w1c.stride(2), w1s.stride(0), w1s.stride(1), w1s.stride(2),
        h.stride(0), h.stride(1), h.stride(2),
        BLOCK_I=block_i, BLOCK_K=block_k, num_warps=num_warps,
    )
    if deterministic:
        y = torch.empty((T, H), device=x.device, dtype=out_dtype)
        grid = (T, triton.cdiv(H, block_h))
    else:
        y = torch.zeros((T, H), device=x.device, dtype=torch.float32)
        grid = (T * k, triton.cdiv(H, block_h))
    launch(_moe_down_kernel, grid)(
        h, expert_ids, weights, slot_table, c2, s2, y,
        k, H, I,
        h.stride(0), h.stride(1), h.stride(2), expert_ids.stride(0), expert_ids.stride(1),
        weights.stride(0), weights.stride(1),
        c2.stride(0), c2.stride(1), c2.stride(2), s2.stride(0), s2.stride(1), s2.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_H=block_h, BLOCK_K=min(block_k, triton.next_power_of_2(I)), ATOMIC=not deterministic,
        ROUND_BF16=round_bf16(y),
        num_warps=num_warps,
    )
    y = y.to(out_dtype)
    return (y, h) if return_h else y


# ---------------------------------------------------------------------------------------- FP4 grouped GEMM


@triton.jit
def _fp4_grouped_gemm_kernel(
    x_ptr, off_ptr, gid_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, rw_ptr, y_ptr,
    G, N, K, limit,
    sxm, sxk, swe, swr, swc, sse, ssr, ssc, sym, syn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, G_POW2: tl.constexpr,
    HAS_GID: tl.constexpr, SWIGLU: tl.constexpr, HAS_RW: tl.constexpr,
    DOT_F32: tl.constexpr, UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """Program (m-tile slot, n-tile). The m-tile slots are laid out group after group (ceil(rows_g / BLOCK_M) each),
    computed in-kernel from the offsets, so the launch needs no host sync; slots past the last tile exit at once.
    y[rows of tile] = x[rows] @ dequant(w1[e])^T (SWIGLU: silu(min(., L)) * clamp(x @ w3[e]^T, -L, L)),
    times rw[row] if HAS_RW; e = gid[g] if HAS_GID else g."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    gi = tl.arange(0, G_POW2)
    g_mask = gi < G
    start = tl.load(off_ptr + gi, mask=g_mask, other=0)
    end = tl.load(off_ptr + gi + 1, mask=g_mask, other=0)
    ntiles = (end - start + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(ntiles, 0)  # inclusive
    g = tl.sum((cum <= pid_m).to(tl.int32), 0)  # first group whose tiles extend past pid_m
    if g < G:
        tiles_before = tl.sum(tl.where(gi < g, ntiles, 0), 0)
        m_start = tl.sum(tl.where(gi == g, start, 0), 0)
        m_end = tl.sum(tl.where(gi == g, end, 0), 0)
        if HAS_GID:
            e = tl.load(gid_ptr + g).to(tl.int64)
        else:
            e = g.to(tl.int64)
        rm = m_start + (pid_m - tiles_before) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < m_end
        rm64 = rm.to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rn64 = rn.to(tl.int64)
        w1 = w1_ptr + e * swe + rn64[:, None] * swr
        s1 = s1_ptr + e * sse + rn64[:, None] * ssr
        w3 = w3_ptr + e * swe + rn64[:, None] * swr
        s3 = s3_ptr + e * sse + rn64[:, None] * ssr
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rb = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte columns
            b_mask = rb < K // 2
            xm = m_mask[:, None] & b_mask[None, :]
            xe = tl.load(x_ptr + rm64[:, None] * sxm + (2 * rb)[None, :] * sxk, mask=xm, other=0.0)
            xo = tl.load(x_ptr + rm64[:, None] * sxm + (2 * rb + 1)[None, :] * sxk, mask=xm, other=0.0)
            wm = n_mask[:, None] & b_mask[None, :]
            c = tl.load(w1 + rb[None, :] * swc, mask=wm, other=0).to(tl.uint32)
            sc = e8m0_to_f32(tl.load(s1 + (rb // 16)[None, :] * ssc, mask=wm, other=127))
            acc = mma(xe, tl.trans(e2m1_to_f32(c & 15) * sc), acc, DOT_F32, UPCAST)
            acc = mma(xo, tl.trans(e2m1_to_f32(c >> 4) * sc), acc, DOT_F32, UPCAST)
            if SWIGLU:
                c = tl.load(w3 + rb[None, :] * swc, mask=wm, other=0).to(tl.uint32)
                sc = e8m0_to_f32(tl.load(s3 + (rb // 16)[None, :] * ssc, mask=wm, other=127))
                acc3 = mma(xe, tl.trans(e2m1_to_f32(c & 15) * sc), acc3, DOT_F32, UPCAST)
                acc3 = mma(xo, tl.trans(e2m1_to_f32(c >> 4) * sc), acc3, DOT_F32, UPCAST)
        if SWIGLU:
            gt = tl.minimum(acc, limit)
            ut = tl.minimum(tl.maximum(acc3, -limit), limit)
            acc = gt / (1.0 + tl.exp(-gt)) * ut
        if HAS_RW:
            acc = acc * tl.load(rw_ptr + rm64, mask=m_mask, other=0.0).to(tl.float32)[:, None]
        tl.store(y_ptr + rm64[:, None] * sym + rn[None, :] * syn, store_rounding(acc, ROUND_BF16),
                 mask=m_mask[:, None] & n_mask[None, :])


def fp4_grouped_gemm(x_sorted: torch.Tensor, group_offsets: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                     *, group_ids: torch.Tensor | None = None, swiglu_limit: float | None = None,
                     row_weights: torch.Tensor | None = None, out: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None, block_m: int = 64, block_n: int = 64, block_k: int = 64,
                     num_warps: int = 4, num_stages: int = 3, max_m_tiles: int | None = None,
                     fewest_programs: bool = False) -> torch.Tensor:
    """Prefill grouped GEMM over FP4 experts: rows group_offsets[g]:group_offsets[g+1] of x_sorted [M, K] (sorted by
    expert) times expert e = group_ids[g] (default g) of codes [E, N', K/2] / scales [E, N', K/32].
    swiglu_limit None: y = x @ dequant(w[e])^T, N = N'. Otherwise codes are w13 = cat([w1, w3]) (N' = 2N) and
    y = silu(min(x w1^T, L)) * clamp(x w3^T, -L, L) (gate/up fused). row_weights [M]: y rows scaled (routing weights
    for the down projection; the host then index_adds rows back to tokens). group_offsets int32 [G+1], on device;
    no host sync (grid = ceil(M / block_m) + G m-tile slots unless max_m_tiles is given). Returns [M, N].
    `fewest_programs`: wide tiles for the interpreter, whose cost is per program."""
    if fewest_programs:
        block_m, block_n, block_k = 16, 128, 128
    M, K = x_sorted.shape
    E, Nw, Kb = codes.shape
    assert Kb * 2 == K and K % 32 == 0 and block_k % 32 == 0 and block_m >= 16 and block_n >= 16
    G = group_offsets.numel() - 1
    c, s = codes.view(torch.uint8), scales.view(torch.uint8)
    if swiglu_limit is not None:
        N = Nw // 2
        w1c, w3c, w1s, w3s = c[:, :N], c[:, N:], s[:, :N], s[:, N:]
    else:
        N = Nw
        w1c = w3c = c
        w1s = w3s = s
    out_dtype = out_dtype or x_sorted.dtype
    y = out if out is not None else torch.empty((M, N), device=x_sorted.device, dtype=out_dtype)
    if M == 0 or G == 0:
        return y
    m_slots = max_m_tiles if max_m_tiles is not None else triton.cdiv(M, block_m) + G
    dummy = group_offsets
    launch(_fp4_grouped_gemm_kernel, (m_slots, triton.cdiv(N, block_n)))(
        x_sorted, group_offsets, group_ids if group_ids is not None else dummy, w1c, w3c, w1s, w3s,
        row_weights if row_weights is not None else dummy, y,
        G, N, K, float(swiglu_limit or 0.0),
        x_sorted.stride(0), x_sorted.stride(1), w1c.stride(0), w1c.stride(1), w1c.stride(2),
        w1s.stride(0), w1s.stride(1), w1s.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, G_POW2=triton.next_power_of_2(G + 1),
        HAS_GID=group_ids is not None, SWIGLU=swiglu_limit is not None, HAS_RW=row_weights is not None,
        DOT_F32=x_sorted.dtype == torch.float32, UPCAST=interpreting(), ROUND_BF16=round_bf16(y),
        num_warps=num_warps, num_stages=num_stages,
    )
    return y


def fp4_moe_grouped(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, n_groups: int,
                    w13_codes: torch.Tensor, w13_scale: torch.Tensor, w2_codes: torch.Tensor, w2_scale: torch.Tensor,
                    swiglu_limit: float, out: torch.Tensor, *, group_ids: torch.Tensor | None = None,
                    fewest_programs: bool = False) -> None:
    """Prefill MoE over FP4 experts, added into out [T, H] fp32: the (token, j) pairs of expert_ids [T, k] (group
    ids 0..n_groups-1; < 0: skipped) sorted by group, gate/up with the clamped SwiGLU then down with the routing
    weights as two `fp4_grouped_gemm` launches, each pair's row added to its token. Offsets from a device bincount
    and skipped pairs zeroed rather than selected: no host sync."""
    k = expert_ids.shape[1]
    flat = expert_ids.reshape(-1)
    valid = flat >= 0
    counts = torch.bincount(flat.clamp_min(0), weights=valid.to(torch.float32), minlength=n_groups)
    offsets = torch.zeros(n_groups + 1, dtype=torch.int32, device=flat.device)
    offsets[1:] = counts.to(torch.int64).cumsum(0).to(torch.int32)
    order = torch.argsort(torch.where(valid, flat, n_groups), stable=True)  # skipped pairs sort last
    rows = order // k
    h = fp4_grouped_gemm(x[rows], offsets, w13_codes, w13_scale, group_ids=group_ids, swiglu_limit=swiglu_limit,
                         out_dtype=torch.float32, fewest_programs=fewest_programs)
    y = fp4_grouped_gemm(h, offsets, w2_codes, w2_scale, group_ids=group_ids,
                         row_weights=weights.reshape(-1)[order].float(), out_dtype=torch.float32,
                         fewest_programs=fewest_programs)
    out.index_add_(0, rows, torch.where(valid[order, None], y, 0.0))  # a skipped pair's row is unwritten
