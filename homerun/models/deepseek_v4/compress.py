"""A CSA/HCA compressor's step (DeepSeek-V4): this step's projections pooled into closed windows' entries, the open
window and the CSA overlap slice carried in the state. Pure math, called by DeepseekV4._compress."""

from __future__ import annotations

from dataclasses import replace

import torch

from homerun.kernels.torch_set import TorchKernels
from homerun.models.deepseek_v4.parts import _Compressor
from homerun.models.deepseek_v4.state import CompressorState


def compress(c: _Compressor, kv: torch.Tensor, gate: torch.Tensor, st: CompressorState, freqs: torch.Tensor,
             norm_eps: float, k: TorchKernels) -> CompressorState:
    """From this step's projections kv, gate [T, width] (c.wkv(x), c.wgate(x)): close every full window, append
    the new entries past st.n_entries."""
    if kv.shape[0] == 1 and c.rate > 1 and st.pending_kv is not None and st.pending_kv.shape[0] == c.rate - 1:
        # decode closes one window: the kernel set's one-window step (one launch on the GPU)
        entry, okv, ogate = k.compress_close(st.pending_kv, kv, st.pending_gate, gate, c.ape, st.overlap_kv,
                                             st.overlap_gate, c.overlap, c.norm, norm_eps, freqs,
                                             st.n_entries * c.rate, c.head_dim)
        n = st.store.write(st.n_entries, entry)
        return CompressorState(st.store, n, kv.new_empty(0, kv.shape[1]), gate.new_empty(0, gate.shape[1]), okv,
                               ogate)
    fresh = st.pending_kv is not None and st.pending_kv.shape[0]
    if kv.shape[0] == 1 and c.rate > 1:
        # decode, the window stays open: its rows and this step's as new tensors (one launch on the GPU; the state
        # keeps no reference to kv, gate: a replayed step rewrites them)
        pending_kv, pending_gate = k.compress_append(st.pending_kv if fresh else kv[:0],
                                                     st.pending_gate if fresh else gate[:0], kv, gate)
        return replace(st, pending_kv=pending_kv, pending_gate=pending_gate)
    if fresh:
        kv = torch.cat([st.pending_kv, kv])
        gate = torch.cat([st.pending_gate, gate])
    n_win = kv.shape[0] // c.rate
    usable = n_win * c.rate
    if fresh and not usable:  # the open window is the new concatenation itself: no copy
        pending_kv, pending_gate = kv, gate
    else:
        pending_kv, pending_gate = kv[usable:].clone(), gate[usable:].clone()
    if n_win == 0:
        return replace(st, pending_kv=pending_kv, pending_gate=pending_gate)
    first_pos = st.n_entries * c.rate
    hd, r = c.head_dim, c.rate
    ckv = kv[:usable].view(n_win, r, -1)
    cgate = gate[:usable].view(n_win, r, -1) + c.ape  # (W, r, width); fp32 ape promotes
    overlap_kv, overlap_gate = st.overlap_kv, st.overlap_gate
    if c.overlap:
        slots_kv = ckv.new_zeros(n_win, 2 * r, hd)
        slots_gate = cgate.new_full((n_win, 2 * r, hd), float("-inf"))
        slots_kv[:, r:] = ckv[..., hd:]
        slots_gate[:, r:] = cgate[..., hd:]
        if n_win > 1:
            slots_kv[1:, :r] = ckv[:-1, :, :hd]
            slots_gate[1:, :r] = cgate[:-1, :, :hd]
        if st.overlap_kv is not None:
            slots_kv[0, :r] = st.overlap_kv.to(slots_kv.dtype)
            slots_gate[0, :r] = st.overlap_gate.to(slots_gate.dtype)
        overlap_kv, overlap_gate = ckv[-1, :, :hd].clone(), cgate[-1, :, :hd].clone()
    else:
        slots_kv, slots_gate = ckv, cgate
    wts = slots_gate.softmax(dim=1, dtype=torch.float32).to(slots_kv.dtype)
    pos = torch.arange(n_win, device=kv.device) * r + first_pos
    cos, sin = k.rope_cos_sin(freqs, pos)
    entries = k.norm_rope((slots_kv * wts).sum(dim=1), c.norm, norm_eps, cos, sin)  # (W, hd)
    n = st.store.write(st.n_entries, entries)
    return CompressorState(st.store, n, pending_kv, pending_gate, overlap_kv, overlap_gate)
