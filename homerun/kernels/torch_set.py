"""The torch kernel set: the definition of every dense family a model forward calls (linears over weights kept as
stored, the shared expert's down projection with its activation and residual, the mHC family, RMSNorm + RoPE and the
RoPE tables, one-query attention, the indexer's scores, MoE routing) in plain torch ops, on any device and dtype.
Every other set (`homerun.kernels.dispatch`, `homerun.kernels.triton.kernel_set`) subclasses it and is tested
against it."""

from __future__ import annotations

from typing import Any, Iterable, Protocol, Sequence

import torch
import torch.nn.functional as F


class Linear(Protocol):
    """What a kernel set needs of a linear layer (homerun.models.layers.QLinear)."""

    weight: torch.Tensor
    scale: torch.Tensor | None

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor: ...
    def torch_grouped(self, x: torch.Tensor, groups: int) -> torch.Tensor: ...
    def bound(self) -> Any: ...
    def row_block(self) -> int: ...


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


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, rope_dim/2] in fp32."""
    ang = positions.to(torch.float32)[:, None] * freqs.to(positions.device)[None, :]
    return ang.cos(), ang.sin()


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
    # The FP8 KV cache's one-launch row codec (homerun.models.kv.Fp8PagedRows' `codec`: `put` / `read` with the
    # store's bits); None: the store's own torch ops encode and decode
    fp8_rows: Any = None

    # ---- linears over weights kept as stored
    def linear(self, lin: Linear, x: torch.Tensor) -> torch.Tensor:
        return lin.torch_forward(x)

    def grouped(self, lin: Linear, x: torch.Tensor, groups: int) -> torch.Tensor:
        """Block-diagonal projection: x [T, G, in] -> [T, G, out/G], group g uses rows g*out/G .. (g+1)*out/G."""
        return lin.torch_grouped(x, groups)

    def project(self, lins: Sequence[Linear], x: torch.Tensor, multi: Any = None) -> list[torch.Tensor]:
        """Several linears of one input."""
        return [self.linear(lin, x) for lin in lins]

    def swiglu_down(self, lin: Linear, g: torch.Tensor, u: torch.Tensor, limit: float,
                    residual: torch.Tensor) -> torch.Tensor:
        """The shared expert's output plus the routed experts' sum (residual, in g's dtype): residual +
        lin(silu(min(g, L)) * clamp(u, -L, L))."""
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        return residual + self.linear(lin, F.silu(g) * u)

    # ---- MoE routing
    def route(self, logits: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
              ids: torch.Tensor, score_func: str, topk: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] -> (expert ids [T, k] int64, weights [T, k] fp32, normalized and scaled). Hash
        layers (tid2eid [V, k]) take the table's row of each token id ids [T]; the others the top-k of scores + bias
        (the bias only picks; the weights come from the unbiased scores)."""
        logits = logits.float()
        if score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        if tid2eid is not None:
            idx = tid2eid[ids].long()
        else:
            idx = torch.topk(scores + bias, topk, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * route_scale
        return idx, w

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

    def rope_out(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
        """norm_rope(x, norm=False) of a tensor the caller hands over and reads no more (the attention output, a
        fresh projection): a set may rotate x's trailing channels in place and return x. Here a new tensor, as in
        every set whose callers replay captured graphs (a graph input rotated in place would rotate again on the
        replay after the warm-up run)."""
        return self.norm_rope(x, None, 0.0, cos, sin, norm=False, inverse=inverse)

    def rope_cos_sin(self, freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rope_dim/2] in fp32."""
        return rope_cos_sin(freqs, positions)

    # ---- compressors
    def compress_close(self, pend_kv: torch.Tensor, kv: torch.Tensor, pend_gate: torch.Tensor, gate: torch.Tensor,
                       ape: torch.Tensor, overlap_kv: torch.Tensor | None, overlap_gate: torch.Tensor | None,
                       overlap: bool, norm_w: torch.Tensor, eps: float, freqs: torch.Tensor, pos: int,
                       head_dim: int):
        """A decode step closes one compressor window: its rows are the open rows pend_kv [rate-1, W] and this
        step's kv [1, W] (gate likewise, ape [rate, W] the position bias). -> (entry [1, hd]: the softmax(gate +
        ape)-weighted sum over the window's slots, RMSNorm(norm_w), RoPE at pos; the next overlap kv, gate). With
        overlap (CSA) the slots are the previous window's first halves (overlap_*, none at the start) and this
        window's second halves, and this window's first halves become the next overlap; else they pass through."""
        kv = torch.cat([pend_kv, kv])
        gate = torch.cat([pend_gate, gate])
        r, hd = kv.shape[0], head_dim
        ckv = kv.view(1, r, -1)
        cgate = gate.view(1, r, -1) + ape  # fp32 ape promotes
        if overlap:
            slots_kv = ckv.new_zeros(1, 2 * r, hd)
            slots_gate = cgate.new_full((1, 2 * r, hd), float("-inf"))
            slots_kv[:, r:] = ckv[..., hd:]
            slots_gate[:, r:] = cgate[..., hd:]
            if overlap_kv is not None:
                slots_kv[0, :r] = overlap_kv.to(slots_kv.dtype)
                slots_gate[0, :r] = overlap_gate.to(slots_gate.dtype)
            overlap_kv, overlap_gate = ckv[-1, :, :hd].clone(), cgate[-1, :, :hd].clone()
        else:
            slots_kv, slots_gate = ckv, cgate
        wts = slots_gate.softmax(dim=1, dtype=torch.float32).to(slots_kv.dtype)
        cos, sin = self.rope_cos_sin(freqs, torch.arange(1, device=kv.device) * r + pos)
        entry = self.norm_rope((slots_kv * wts).sum(dim=1), norm_w, eps, cos, sin)
        return entry, overlap_kv, overlap_gate

    def compress_append(self, pend_kv: torch.Tensor, pend_gate: torch.Tensor, kv: torch.Tensor,
                        gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An eager decode step that does not close its compressor's window: the open rows pend_kv [P, W] (P >= 0)
        with this step's kv [1, W] after them, and the gates likewise, as new tensors (the old ones stay as they are:
        an earlier state of the sequence may read them; kv and gate may be rewritten by a replayed step)."""
        return torch.cat([pend_kv, kv]), torch.cat([pend_gate, gate])

    def compress_step(self, pend_kv: torch.Tensor, pend_gate: torch.Tensor, kv: torch.Tensor, gate: torch.Tensor,
                      slot: torch.Tensor, closing: torch.Tensor, ape: torch.Tensor, overlap_kv: torch.Tensor | None,
                      overlap_gate: torch.Tensor | None, overlap: bool, norm_w: torch.Tensor, eps: float,
                      freqs: torch.Tensor, pos: torch.Tensor, head_dim: int) -> torch.Tensor:
        """A captured decode step's compressor update, in place (homerun.models.deepseek_v4.static_decode): this
        step's kv [1, W] and gate into the open window pend_kv / pend_gate [rate, W] at row `slot` (a one-element
        device index), the window's entry as compress_close pools it (-> [1, hd]; the caller keeps it only when the
        step closes the window), and with overlap the next overlap slots into overlap_kv / overlap_gate where
        `closing` (a one-element bool device tensor) is true."""
        r = pend_kv.shape[0]
        pend_kv.index_copy_(0, slot, kv)
        pend_gate.index_copy_(0, slot, gate)
        entry, okn, ogn = self.compress_close(pend_kv[: r - 1], pend_kv[r - 1 :], pend_gate[: r - 1],
                                              pend_gate[r - 1 :], ape, overlap_kv, overlap_gate, overlap, norm_w, eps,
                                              freqs, pos, head_dim)
        if overlap:
            overlap_kv.copy_(torch.where(closing, okn, overlap_kv))
            overlap_gate.copy_(torch.where(closing, ogn, overlap_gate))
        return entry

    # ---- attention
    def attend_one(self, q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
        """One query over rows every head sees: q [H, D], kv [N, D], sink [H] -> [H, D] (fp32), softmax over
        [scale * q.kv_j ..., sink] with the sink column dropped before the value product."""
        logits = torch.cat([torch.mm(q, kv.T) * scale, sink.reshape(-1, 1)], dim=1)  # (H, N + 1)
        probs = torch.softmax(logits, dim=-1)
        return torch.mm(probs[:, :-1], kv)

    def attend_rows(self, q: torch.Tensor, kv: torch.Tensor, kv2: torch.Tensor | None, sink: torch.Tensor,
                    scale: float, out_dtype: torch.dtype) -> torch.Tensor:
        """attend_one in fp32 over the rows of kv then of kv2 (None: none), inputs in any float dtype -> [H, D] in
        out_dtype (the decode step's window and compressed entries, without the caller's copies)."""
        kv = kv.float() if kv2 is None else torch.cat([kv.float(), kv2.float()])
        return self.attend_one(q.float(), kv, sink, scale).to(out_dtype)

    def index_scores(self, iq: torch.Tensor, iw: torch.Tensor, ik: torch.Tensor, iw_scale: float,
                     scale: float) -> torch.Tensor:
        """The lightning indexer's scores of keys ik [P, Di] for queries iq [q, Hi, Di] with head weights iw [q, Hi]:
        sum_h relu(iq_h . ik_n) * scale * iw_h * iw_scale -> [q, P] fp32."""
        iw = iw.float() * iw_scale
        sc = torch.relu(torch.einsum("qhd,nd->qhn", iq.float(), ik.float())) * scale
        return (sc * iw.unsqueeze(-1)).sum(dim=1)

    def index_topk_one(self, iq: torch.Tensor, iw: torch.Tensor, pages: Iterable[tuple[int, torch.Tensor]], n_vis: int,
                       k_sel: int, iw_scale: float, scale: float) -> torch.Tensor:
        """The decode step's indexer top-k: one query iq [1, Hi, Di] (weights iw [1, Hi], times iw_scale here) that
        sees all n_vis keys, given as pages. The scores go through `index_scores` (the GPU set's fused kernel), one
        top-k per page merged into the running best -> [1, min(k_sel, n_vis)], higher score first."""
        kk = min(k_sel, n_vis)
        best_v = best_i = None
        for r0, ik in pages:
            score = self.index_scores(iq, iw, ik, iw_scale, scale)  # (1, p)
            if best_v is None and ik.shape[0] >= n_vis:  # one page holds every key: one top-k
                return score.topk(min(kk, score.shape[1]), dim=-1).indices
            ids = torch.arange(r0, r0 + ik.shape[0], device=iq.device).expand(1, -1)
            v = score if best_v is None else torch.cat([best_v, score], dim=1)
            i = ids if best_i is None else torch.cat([best_i, ids], dim=1)
            top = v.topk(min(kk, v.shape[1]), dim=-1)
            best_v, best_i = top.values, i.gather(1, top.indices)
        return best_i if best_i is not None else torch.empty(1, 0, dtype=torch.long, device=iq.device)

    def index_topk(self, iq: torch.Tensor, iw: torch.Tensor, pages: Iterable[tuple[int, torch.Tensor]], n_vis: int,
                   thr: torch.Tensor | None, k_sel: int, scale: float) -> torch.Tensor:
        """The lightning indexer's top-k over the first n_vis compressed keys, given as pages (first row index, rows
        [p, Di]) in row order: score[q, n] = scale * sum_h iw[q, h] relu(iq[q, h] . key[n]) for iq [q, Hi, Di],
        iw [q, Hi] (the weights as used). Key n is visible to query q iff n < thr[q] (thr None: all n_vis). ->
        [q, k] int64, k = min(k_sel, n_vis): each query's k best visible keys, higher score first and the lower index
        first on equal scores (a stable sort, so equal scores pick one defined set, the one the native kernel picks);
        -1 past a query's visible keys (attend_prefill drops those). Merged page by page: the temporaries are
        [q, Hi, page] and [q, k + page]."""
        nq = iq.shape[0]
        k = min(k_sel, n_vis)
        iq, iw = iq.float(), iw.float()
        best_v = iq.new_empty(nq, 0)
        best_i = torch.empty(nq, 0, dtype=torch.long, device=iq.device)
        for r0, ik in pages:
            sc = torch.relu(torch.einsum("qhd,nd->qhn", iq, ik.float())) * scale
            score = (sc * iw.unsqueeze(-1)).sum(dim=1)  # (q, p)
            ids = torch.arange(r0, r0 + ik.shape[0], device=iq.device)
            if thr is not None:
                score = score.masked_fill(ids[None, :] >= thr[:, None], float("-inf"))
            # best_v's ties are in index order and every id of this page is larger: a stable sort keeps that order
            v, order = torch.cat([best_v, score], dim=1).sort(dim=-1, descending=True, stable=True)
            best_v = v[:, :k]
            best_i = torch.cat([best_i, ids.expand(nq, -1)], dim=1).gather(1, order[:, :k])
        if thr is not None:
            best_i = best_i.masked_fill(best_v == float("-inf"), -1)
        return best_i

    def attend_prefill(self, q: torch.Tensor, keys: torch.Tensor, key_pos0: int, window: int, comp: torch.Tensor | None,
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
