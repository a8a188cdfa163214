"""One-query attention for decode in one launch (definition: homerun.kernels.torch_set.TorchKernels.attend_one):
q [H, D] over rows kv [N, D] every head sees (keys are values), then the rows of an optional second source kv2
[N2, D] (the window and the compressed entries, read where they lie: no concatenated copy), softmax over
[scale * q.kv_j ..., sink[h]] with the sink column dropped before the value product; written in the output dtype.

Program: BLOCK_H heads (padded to 16 for tl.dot), a loop over N in blocks with an online softmax. The sink starts
the running max and sum (m = sink, l = 1), so it is in the denominator and never in the value product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from homerun.kernels.triton.common import interpreting, launch, rne_bf16


@triton.jit
def _online_block(q, kv_ptr, rn, N, skn, skd, rd, d_mask, scale, m_i, l_i, acc, BLOCK_N: tl.constexpr):
    """One block of rows into the online softmax state (m, l, acc)."""
    n_mask = rn < N
    kv = tl.load(kv_ptr + rn.to(tl.int64)[:, None] * skn + rd[None, :] * skd,
                 mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BN, BD]
    s = tl.dot(q, tl.trans(kv), input_precision="ieee") * scale  # [BH, BN]
    s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, kv, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _attend_two_kernel(
    q_ptr, kv_ptr, kv2_ptr, sink_ptr, o_ptr, len_ptr, H, N, N2, D, scale,
    sqh, sqd, skn, skd, s2n, s2d, ssh, soh, sod,
    OUT_BF16: tl.constexpr, LEN_DEV: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """attend_one over kv's N rows then kv2's N2 rows (N2 may be 0), one online softmax. LEN_DEV: N and N2 are read
    from len_ptr[0:2] (a captured decode step's lengths, written on the device each step)."""
    if LEN_DEV:
        N = tl.load(len_ptr).to(tl.int32)
        N2 = tl.load(len_ptr + 1).to(tl.int32)
    rh = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = rh < H
    rd = tl.arange(0, BLOCK_D)
    d_mask = rd < D
    q = tl.load(q_ptr + rh[:, None] * sqh + rd[None, :] * sqd, mask=h_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)
    m_i = tl.load(sink_ptr + rh * ssh, mask=h_mask, other=0.0).to(tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32) + 1.0
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        m_i, l_i, acc = _online_block(q, kv_ptr, n0 + tl.arange(0, BLOCK_N), N, skn, skd, rd, d_mask, scale,
                                      m_i, l_i, acc, BLOCK_N)
    for n0 in range(0, N2, BLOCK_N):
        m_i, l_i, acc = _online_block(q, kv2_ptr, n0 + tl.arange(0, BLOCK_N), N2, s2n, s2d, rd, d_mask, scale,
                                      m_i, l_i, acc, BLOCK_N)
    o = acc / l_i[:, None]
    if OUT_BF16:
        o = rne_bf16(o)
    tl.store(o_ptr + rh[:, None] * soh + rd[None, :] * sod, o, mask=h_mask[:, None] & d_mask[None, :])


@triton.jit
def _attend_one_kernel(
    q_ptr, kv_ptr, sink_ptr, o_ptr, H, N, D, scale,
    sqh, sqd, skn, skd, ssh, soh, sod,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rh = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = rh < H
    rd = tl.arange(0, BLOCK_D)
    d_mask = rd < D
    q = tl.load(q_ptr + rh[:, None] * sqh + rd[None, :] * sqd, mask=h_mask[:, None] & d_mask[None, :],
                other=0.0).to(tl.float32)
    m_i = tl.load(sink_ptr + rh * ssh, mask=h_mask, other=0.0).to(tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32) + 1.0
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        kv = tl.load(kv_ptr + rn.to(tl.int64)[:, None] * skn + rd[None, :] * skd,
                     mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BN, BD]
        s = tl.dot(q, tl.trans(kv), input_precision="ieee") * scale  # [BH, BN]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, kv, input_precision="ieee")
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(o_ptr + rh[:, None] * soh + rd[None, :] * sod, o, mask=h_mask[:, None] & d_mask[None, :])


def attend_one(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
    """q [H, D], kv [N, D], sink [H] (any float dtypes, any strides) -> [H, D] fp32 (fp32 products)."""
    H, D = q.shape
    N = kv.shape[0]
    assert kv.shape[1] == D and sink.numel() == H, (q.shape, kv.shape, sink.shape)
    sink = sink.reshape(-1)
    o = torch.empty((H, D), device=q.device, dtype=torch.float32)
    bd = max(16, triton.next_power_of_2(D))
    # tl.dot's 16-row minimum; the interpreter pays per program (up to 64 heads in one)
    bh = max(16, min(64 if interpreting() else 16, triton.next_power_of_2(H)))
    bn = min(max(16, triton.next_power_of_2(N)), 256) if interpreting() else (32 if bd <= 256 else 16)
    launch(_attend_one_kernel, (triton.cdiv(H, bh),))(
        q, kv, sink, o, H, N, D, float(scale), q.stride(0), q.stride(1), kv.stride(0), kv.stride(1),
        sink.stride(0), o.stride(0), o.stride(1), BLOCK_H=bh, BLOCK_N=bn, BLOCK_D=bd,
    )
    return o


def attend_two(q: torch.Tensor, kv: torch.Tensor, kv2: torch.Tensor | None, sink: torch.Tensor, scale: float,
               out_dtype: torch.dtype = torch.float32, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """attend_one over the rows of kv then of kv2 (None: none), q [H, D], kv [N, D], kv2 [N2, D] (any float dtypes
    and strides), sink [H] -> [H, D] in out_dtype (fp32 math, one rounding at the end). lengths: a device tensor
    [2] (integer) of the row counts to read, at most N and N2 (kv and kv2 are then static capacities): no host read.
    The row blocks never depend on the counts (fixed BLOCK_N), so a read over a capacity with the true counts on the
    device gives the same bits as one over exactly those rows."""
    H, D = q.shape
    N = kv.shape[0]
    assert kv.shape[1] == D and sink.numel() == H and (kv2 is None or kv2.shape[1] == D), (q.shape, kv.shape)
    sink = sink.reshape(-1)
    k2 = kv2 if kv2 is not None else kv
    n2 = kv2.shape[0] if kv2 is not None else 0
    o = torch.empty((H, D), device=q.device, dtype=out_dtype)
    bd = max(16, triton.next_power_of_2(D))
    bh = max(16, min(64 if interpreting() else 16, triton.next_power_of_2(H)))
    bn = 32 if bd <= 256 else 16
    launch(_attend_two_kernel, (triton.cdiv(H, bh),))(
        q, kv, k2, sink, o, lengths if lengths is not None else o, H, N, n2, D, float(scale), q.stride(0),
        q.stride(1), kv.stride(0), kv.stride(1), k2.stride(0), k2.stride(1), sink.stride(0), o.stride(0), o.stride(1),
        OUT_BF16=out_dtype == torch.bfloat16, LEN_DEV=lengths is not None, BLOCK_H=bh, BLOCK_N=bn, BLOCK_D=bd,
    )
    return o
