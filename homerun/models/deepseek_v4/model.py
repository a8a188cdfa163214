"""DeepSeek-V4 forward math: mHC, sliding + CSA + HCA attention with the lightning indexer, hash/top-k MoE routing,
the HC head and logits. See the package docstring for the deviations from the official reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from homerun.errors import ConfigError
from homerun.models.deepseek_v4.config import (
    _BLOCK_ELEMS,
    LAYER_CSA,
    LAYER_HCA,
    LAYER_SLIDING,
    ModelArgs,
)
from homerun.kernels.device_guard import on_device
from homerun.kernels.dispatch import TORCH, TorchKernels, for_act, kernels_for
from homerun.models.deepseek_v4.compress import compress
from homerun.models.deepseek_v4.ops import inv_freq
from homerun.models.deepseek_v4.state import CompressorState, LayerState
from homerun.models.deepseek_v4.parts import (_HC, _Attention, _Compressor, _Indexer, _Layer, _MoE, _MoEIn, _PreAttn,
                                              out_slice, query_rows)
from homerun.models.kv import DEFAULT_PAGE_TOKENS, Fp8PagedRows, PagedRows
from homerun.models.layers import QLinear
from homerun.models.speculation import DeferredEnd, end_or_defer

# ----------------------------------------------------------------------------------------------------- model


@dataclass
class DeepseekV4:
    """The whole V4 forward (main model; MTP excluded). Build with `build_model`."""

    args: ModelArgs
    embed: torch.Tensor  # [V, D] as stored (bf16)
    head: QLinear
    norm: torch.Tensor
    hc_head_fn: torch.Tensor
    hc_head_base: torch.Tensor
    hc_head_scale: torch.Tensor
    layers: list[_Layer]
    experts: Any  # offload.base.ExpertBackend
    compute_dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # the embedding's device
    freqs_main: torch.Tensor = field(default=None)  # type: ignore[assignment]
    freqs_compress: torch.Tensor = field(default=None)  # type: ignore[assignment]
    head_device: torch.device | None = None  # final norm, HC head, lm head (None: the model's device)
    embed_flavor: str = "auto"  # kernel flavors of the embedding's and the head's devices (see _Layer.flavor)
    head_flavor: str = "auto"
    # the placement's device names of [embedding, layer 0.., head] (None: the torch devices'), each part's site while
    # it runs (homerun.kernels.device_guard: CUDA stand-ins all compute on the CPU, only their names differ)
    sites: Sequence[str] | None = None

    def __post_init__(self) -> None:
        a = self.args
        self.freqs_main = inv_freq(a.rope_dim, a.rope_theta, None).to(self.device)
        self.freqs_compress = inv_freq(a.rope_dim, a.compress_rope_theta, a.yarn).to(self.device)

    # --------------------------------------------------------------------------------------------- state

    def new_state(
        self, kv_device: torch.device | str | None = None, page_tokens: int = DEFAULT_PAGE_TOKENS,
        kv_dtype: str = "auto", accounts: Sequence[Any] | None = None,
    ) -> list[LayerState]:
        """Empty per-layer states. Entry stores are paged (`page_tokens` tokens of context per page) on kv_device
        (default: each layer's device); the sliding window and open windows stay on the layer's device in the
        compute dtype. kv_dtype: "auto" (entries in the compute dtype: exact), "bf16", or "fp8" (homerun.models.kv
        Fp8PagedRows, lossy). accounts: one budgeted device per layer (offload.devices.Device) that allocates and
        charges that layer's pages (a placed model); it overrides kv_device."""
        a, dt = self.args, self.compute_dtype
        if kv_dtype not in ("auto", "bf16", "fp8"):
            raise ConfigError(f"unknown kv_dtype {kv_dtype!r}", hint="use auto, bf16 or fp8")

        def store(width: int, rate: int, rope_dim: int, scale_fp32: bool, dev, kv_dev, account, flavor) -> PagedRows:
            rows = max(1, page_tokens // rate)
            if kv_dtype == "fp8":  # the layer's kernel set may encode and decode rows in one launch each
                return Fp8PagedRows(width, dt, kv_dev, rows, dev, rope_dim=rope_dim, scale_fp32=scale_fp32,
                                    account=account, codec=kernels_for(dev, dt, 1, flavor).fp8_rows)
            return PagedRows(width, torch.bfloat16 if kv_dtype == "bf16" else dt, kv_dev, rows, compute_device=dev,
                             account=account)

        out = []
        for layer in self.layers:
            dev = layer.device or self.device
            account = accounts[layer.index] if accounts is not None else None
            kv_dev = torch.device(kv_device) if kv_device is not None else dev
            window = torch.empty(0, a.head_dim, dtype=dt, device=dev)
            comp = idx = None
            if layer.kind != LAYER_SLIDING:
                comp = CompressorState(store(a.head_dim, a.rate(layer.index), a.rope_dim, False, dev, kv_dev, account,
                                             layer.flavor))
            if layer.kind == LAYER_CSA:
                idx = CompressorState(store(a.index_head_dim, a.csa_rate, 0, True, dev, kv_dev, account,
                                            layer.flavor))
            out.append(LayerState(window, comp, idx))
        return out

    # ------------------------------------------------------------------------------------------- forward

    def _begin_token(self, host_ids: torch.Tensor) -> bool:
        """The expert backend's hooks before any layer of a forward: begin_token, then the hash layers' prefetches
        (their experts are known from the token ids; the ids as given, so host ids are read without a device sync)."""
        spec = self.experts.begin_token(host_ids.shape[0])
        for layer in self.layers:
            if layer.moe.tid2eid is not None:
                self.experts.prefetch_hash_layer(layer.index, layer.moe.tid2eid, host_ids)
        return spec

    def forward(self, ids: torch.Tensor, start_pos: int, states: Sequence[LayerState], *,
                out_rows: slice | None = None) -> tuple[torch.Tensor, list[LayerState]]:
        """ids [T] at absolute positions start_pos.. -> (final hidden [T, D] after HC head + norm, new states).
        out_rows: the rows of the hidden the caller reads (a step-1 slice of the T; default all): only those come
        back, [R, D], and the last layer computes its queries, attention output and FFN for those rows alone (every
        row still feeds the KV window, compressors and indexer: the states are the same)."""
        return self.forward_step(ids, start_pos, states, out_rows=out_rows)[:2]

    def forward_step(self, ids: torch.Tensor, start_pos: int, states: Sequence[LayerState], *,
                     defer_end: bool = False, out_rows: slice | None = None
                     ) -> tuple[torch.Tensor, list[LayerState], DeferredEnd | None]:
        """`forward`, and with `defer_end` a speculated forward returns before its end_token: its DeferredEnd
        (homerun.models.speculation), for the caller to settle after its own host wait; else None."""
        rows = out_slice(out_rows, ids.shape[0])
        cut = None
        if rows is not None and self.experts.routes_every_row:
            cut, rows = rows, None  # a routing trace numbers tokens by the rows it sees: every row runs, then the cut
        host_ids, ids = ids, ids.to(self.device)
        positions = torch.arange(start_pos, start_pos + ids.shape[0], device=self.device)
        spec = self._begin_token(host_ids)  # True: the backend may ask for a redo (see end_token)
        x = self._on(self.device, 0, self._embed, ids)
        dev, flavor = self.device, self.embed_flavor
        # The kernel set is chosen once per device the forward runs on (homerun.kernels.dispatch); the layers' dense
        # prefill GEMMs follow the expert activation mode (`for_act`), the head's stay exact.
        act = self.experts.act
        k = kernels_for(dev, self.compute_dtype, ids.shape[0], flavor)
        # A speculated forward keeps every layer's inputs (references, no copies): a redo from layer i restarts from
        # saved[i] and states[i:], which the forward never mutates (KV rows past a store's committed count are
        # invisible until the new state commits them, and a redo overwrites the same rows).
        saved: list[tuple] = []

        def run(first: int, inp: tuple, keep: bool):  # -> (a thunk making the final hidden, the layers' states)
            x, ids, positions, dev, flavor, k, kl = inp
            new_states, n = [], len(self.layers)
            for i, (layer, st) in enumerate(zip(self.layers[first:], states[first:]), first + 1):
                # Pipeline split: the residual streams, token ids and positions follow the layers to their device,
                # once per boundary (a no-op between stand-ins, which share the host's memory).
                ldev = layer.device or self.device
                if ldev != dev or layer.flavor != flavor:
                    x, ids, positions, dev, flavor = x.to(ldev), ids.to(ldev), positions.to(ldev), ldev, layer.flavor
                    k = kernels_for(dev, self.compute_dtype, ids.shape[0], flavor)
                    kl = for_act(k, act)
                if keep:
                    saved.append((x, ids, positions, dev, flavor, k, kl))
                with self._on(ldev, i):  # each layer's kernels with its device current
                    # the last layer runs the kept rows only; the one before guesses its experts from those rows
                    x, st = self._block(layer, x, ids, positions, start_pos, st, kl, rows if i == n else None,
                                        rows if i == n - 1 else None)
                new_states.append(st)
            if rows is not None:
                ids = ids[rows]
            hdev = self.head_device or self.device
            if hdev != dev or self.head_flavor != flavor:
                x = x.to(hdev)
                k = kernels_for(hdev, self.compute_dtype, ids.shape[0], self.head_flavor)
            if cut is None:  # the head once the layers stand
                return (lambda: self._on(hdev, -1, self._final, x, k)), new_states
            return (lambda: self._on(hdev, -1, self._final, x, k)[cut]), new_states

        head, new_states = run(0, (x, ids, positions, dev, flavor, k, for_act(k, act)), spec)

        def redo(layer_index: int) -> tuple[torch.Tensor, list[LayerState]]:
            first = next(i for i, lay in enumerate(self.layers) if lay.index == layer_index)
            # the missed run's states from `first` go before the rerun makes its own: one new small state at a time,
            # as the plan charges the step (homerun.models.eager_bytes); the caller keeps the states it started from
            del new_states[first:]
            head, tail = run(first, saved[first], False)
            self.experts.end_token()  # the exact rerun's end: it stands
            return head(), new_states + tail

        return end_or_defer(self.experts, spec, defer_end, lambda: (head(), new_states), redo)

    def _on(self, device: torch.device, part: int, fn=None, *args):
        """Part `part`'s section guard (0 the embedding, 1 + i layer i, -1 the head) on device, or fn(*args) in it."""
        guard = on_device(device, self.sites[part] if self.sites is not None else None)
        return guard if fn is None else guard.run(fn, *args)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> the residual streams [T, n, D]: the embedding copied into each of the n streams."""
        h = F.embedding(ids, self.embed).to(self.compute_dtype)  # (T, D)
        return h.unsqueeze(1).expand(-1, self.args.hc_mult, -1).contiguous()

    def _final(self, x: torch.Tensor, k: TorchKernels) -> torch.Tensor:
        """The streams after the last layer -> the final hidden [T, D] (HC head, then the final norm)."""
        if not x.shape[0]:  # no row kept (a prompt's chunk before its last)
            return x.new_empty(0, x.shape[-1])
        return k.norm_rope(self._hc_head(x, k), self.norm, self.args.norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, D] -> float32 logits [T, V]."""
        k = kernels_for(hidden.device, hidden.dtype, hidden.shape[0], self.head_flavor)
        return self._on(hidden.device, -1, k.linear, self.head, hidden).float()

    # ------------------------------------------------------------------------------------------------ mHC

    def _hc_weights(self, hc: _HC, x: torch.Tensor, k: TorchKernels):
        """x [T, n, D] -> pre [T, n], post [T, n], comb [T, n, n] (fp32; Sinkhorn-normalized comb)."""
        a = self.args
        return k.hc_weights(x, hc.fn, hc.scale, hc.base, a.norm_eps, a.hc_eps, a.hc_sinkhorn_iters)

    def _hc_head(self, x: torch.Tensor, k: TorchKernels) -> torch.Tensor:
        a = self.args
        pre, _, _ = k.hc_weights(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, a.norm_eps, a.hc_eps,
                                 a.hc_sinkhorn_iters)
        return k.hc_pre(pre, x)

    def _block(self, layer: _Layer, x, ids, positions, start: int, st: LayerState, k: TorchKernels,
               rows: slice | None = None, guess_rows: slice | None = None):
        """One layer -> (its output streams, its new state). rows: only those rows' output (the state still takes
        every row); guess_rows: the rows the next layer runs, from which its experts are guessed."""
        pa = self._pre_attention(layer, x, positions, k, rows)
        out, new_st = self._attention_core(layer, pa, start, st, k, q0=rows.start if rows is not None else 0)
        if rows is not None:
            x, ids = x[rows], ids[rows]
            if out is None:
                return x, new_st
        return self._post_attention(layer, x, pa, out, ids, k, guess_rows), new_st

    # ------------------------------------------------------------------------------------------ attention

    def _compress(self, c: _Compressor, kv: torch.Tensor, gate: torch.Tensor, start_pos: int, st: CompressorState,
                  freqs, k: TorchKernels) -> CompressorState:
        """From this step's projections kv, gate [T, width] (c.wkv(x), c.wgate(x)): close every full window, append
        the new entries past st.n_entries (homerun.models.deepseek_v4.compress)."""
        return compress(c, kv, gate, st, freqs, self.args.norm_eps, k)

    # A layer runs in three parts. Before and after the attention core the work depends on the token only through
    # tensors (the streams, the token ids, the positions' RoPE tables), never on a host-side position or length, so
    # a one-token decode can replay both parts from captured launches (homerun.engine.graphs); the core reads and
    # grows the layer's KV state, whose sizes are host-side ints.

    def _pre_attention(self, layer: _Layer, x: torch.Tensor, positions: torch.Tensor, k: TorchKernels,
                       rows: slice | None = None) -> _PreAttn:
        """The attention site's mHC weights and normalized mix, then every projection of it: q (normed, RoPE'd), the
        new window row kv (normed, RoPE'd), the compressors' and the indexer's inputs. rows: the queries' (q, qr,
        the indexer's weights, post, comb, cos, sin) for those rows only (q None for none); the rest for all."""
        a, at = self.args, layer.attn
        pre, post, comb = self._hc_weights(layer.hc_attn, x, k)
        h = k.hc_pre_norm(pre, x, layer.attn_norm, a.norm_eps)
        H, Dh = a.n_heads, a.head_dim
        freqs = self.freqs_main if layer.kind == LAYER_SLIDING else self.freqs_compress
        cos, sin = self._rope(freqs, positions, k)
        kv_proj = None
        if rows is None:
            proj = k.project(at.inputs.lins, h, at.inputs)  # wq_a, wkv, the compressors' and the indexer's
        else:
            proj, post, comb, cq, sq = query_rows(k, at, h, rows, post, comb, cos, sin)
            kv_proj = k.norm_rope(proj[1], at.kv_norm, a.norm_eps, cos, sin)
            cos, sin = cq, sq
            if proj[0] is None:
                return _PreAttn(post, comb, proj, None, None, kv_proj, cos, sin)
        qr = k.norm_rope(proj[0], at.q_norm, a.norm_eps)  # (T, Lq)
        q = k.norm_rope(k.linear(at.wq_b, qr).view(qr.shape[0], H, Dh), None, a.norm_eps, cos, sin)  # per head
        kv = k.norm_rope(proj[1], at.kv_norm, a.norm_eps, cos, sin) if kv_proj is None else kv_proj  # (T, Dh)
        return _PreAttn(post, comb, proj, qr, q, kv, cos, sin)

    def _attention_core(self, layer: _Layer, pa: _PreAttn, start: int, st: LayerState,
                        k: TorchKernels, q0: int = 0) -> tuple[torch.Tensor | None, LayerState]:
        """The queries at positions start + q0.. (Python ints: no device read) over the window and the compressed
        entries; closes compressor windows. -> (attention output [Tq, H, Dh] before the inverse RoPE, None without
        queries; new LayerState). The new state keeps no reference to pa's tensors (a replayed decode step rewrites
        them). q0: the first query's row in this step (pa's queries may be a slice of its rows, see _block)."""
        a, at = self.args, layer.attn
        proj, kv = pa.proj, pa.kv
        past = st.window
        keys = torch.cat([past, kv]) if past.shape[0] else kv  # rows at positions start-P .. start+T-1
        keep = a.window_size - 1
        if past.shape[0] and keep > 0 and kv.shape[0] == 1:  # decode: keys is a new tensor, its last rows the window
            window = keys[max(0, keys.shape[0] - keep) :]
        else:
            window = keys[max(0, keys.shape[0] - keep) :].clone() if keep > 0 else keys[:0].clone()

        comp = idx_st = iw = None
        if at.comp is not None:
            comp = self._compress(at.comp, proj[2], proj[3], start, st.comp, self.freqs_compress, k)
        if at.indexer is not None:
            idx_st = self._compress(at.indexer.comp, proj[4], proj[5], start, st.index_comp, self.freqs_compress, k)
            iw = proj[6]

        out = None
        if pa.q is not None:  # queries from row q0: as if the step began there with the rows before it as past keys
            out = self._attend(layer, pa.q, pa.qr, iw, keys, start + q0, past.shape[0] + q0, comp, idx_st,
                               (pa.cos, pa.sin), k)
        return out, LayerState(window, comp, idx_st)

    def _post_attention(self, layer: _Layer, x: torch.Tensor, pa: _PreAttn, out: torch.Tensor, ids: torch.Tensor,
                        k: TorchKernels, guess_rows: slice | None = None) -> torch.Tensor:
        """The attention output written back into the streams x, then the MoE site. -> the layer's output streams.
        The MoE site is three parts (`_moe_in`, the expert backend's routed call, `_moe_out`) so that decode graphs
        can replay the two outer ones around an eager routed call (homerun.engine.graphs)."""
        mi = self._moe_in(layer, self._attn_out(layer, x, pa, out, k), ids, k)
        if self.experts.wants_speculation_for(layer.index + 1):
            h, gids = (mi.h, ids) if guess_rows is None else (mi.h[guess_rows], ids[guess_rows])
            guess = self._next_layer_guess(layer, h, gids) if h.shape[0] else None
            if guess is not None:
                self.experts.prefetch_speculative(layer.index + 1, guess)
        return self._moe_out(layer, mi, self.experts.forward(layer.index, mi.h, mi.idx, mi.w), k)

    def _attn_out(self, layer: _Layer, x: torch.Tensor, pa: _PreAttn, out: torch.Tensor,
                  k: TorchKernels) -> torch.Tensor:
        """The attention output's inverse RoPE and output projections, written back into the streams x."""
        a, at = self.args, layer.attn
        T = out.shape[0]
        out = k.rope_out(out, pa.cos, pa.sin, inverse=True)  # the core's output is read no more
        z = k.grouped(at.wo_a, out.reshape(T, a.o_groups, -1), a.o_groups).flatten(1)  # (T, G*Lo)
        return k.hc_post(pa.post, k.linear(at.wo_b, z), pa.comb, x)

    def _attend(self, layer, q, qr, iw, keys, start, n_past, comp, idx_st, rope, k: TorchKernels) -> torch.Tensor:
        """iw: the indexer's weights_proj(x) [T, Hi] (CSA layers); rope: this step's (cos, sin), which in a CSA
        layer are the compressed-frequency ones the indexer's queries use."""
        if q.shape[0] == 1:
            return self._attend_decode(layer, q, qr, iw, keys, start, n_past, comp, idx_st, rope, k)
        a, at = self.args, layer.attn
        T, H, Dh = q.shape
        W = a.window_size
        rate = a.rate(layer.index)
        scale = Dh**-0.5
        n_comp_max = comp.n_entries if comp is not None else 0
        k_sel = 0
        if layer.kind == LAYER_CSA:
            k_sel = min(a.index_topk, n_comp_max)
            iq = k.linear(at.indexer.wq_b, qr).view(T, a.index_n_heads, a.index_head_dim)
            iq = k.rope_out(iq, *rope).float()  # (T, Hi, Di); iq is this projection's own output
            iw = iw.float() * a.index_n_heads**-0.5  # (T, Hi)
        # Elements per query row of the block temporaries: window scores, HCA scores or gathered CSA entries,
        # and the indexer's per-head scores over one page of keys (the top-k is merged page by page).
        per_q = H * (W + (k_sel if layer.kind == LAYER_CSA else n_comp_max))
        if layer.kind == LAYER_CSA:
            page = min(n_comp_max, idx_st.store.page_rows)
            per_q += k_sel * Dh + a.index_n_heads * page + 2 * (k_sel + page)
        qb = max(1, min(T, _BLOCK_ELEMS // max(per_q, 1)))
        while qb > 1 and qb * H * (qb + W) > _BLOCK_ELEMS:
            qb //= 2
        sink = at.sink.view(1, H, 1)
        out = q.new_empty(T, H, Dh)
        # The compressed rows any query of this step may read, materialized once (a view within one page).
        comp_all = comp.store.view(n_comp_max) if T > 1 and layer.kind != LAYER_SLIDING and n_comp_max else None
        for s0 in range(0, T, qb):
            s1 = min(s0 + qb, T)
            nq = s1 - s0
            qf = q[s0:s1].float()  # (q, H, Dh)
            tpos = torch.arange(start + s0, start + s1, device=q.device)  # absolute query positions
            # Sliding window: key position j is visible to query t iff t - W < j <= t.
            k0 = max(0, n_past + s0 - (W - 1))
            k1 = n_past + s1
            kw = keys[k0:k1].float()  # (nk, Dh)
            if nq == 1:  # decode: one query sees every row it is given, so one key matrix and no masks
                idx_q = (iq[s0:s1], iw[s0:s1]) if layer.kind == LAYER_CSA else None
                out[s0] = self._attend_one(layer, qf[0], kw, comp, idx_st, idx_q, start + s0, k_sel, sink, scale, k)
                continue
            comp_rows, sel = None, None
            if layer.kind == LAYER_HCA and n_comp_max:
                comp_rows = comp_all[: (start + s1) // rate]  # every entry closed for some query of the block
            if layer.kind == LAYER_CSA and k_sel:
                n_vis = (start + s1) // rate
                thr = (tpos + 1) // rate  # entries w < thr are closed for query t
                sel = self._index_topk(iq[s0:s1], iw[s0:s1], idx_st.store, n_vis, thr, k_sel, k)
                comp_rows = comp_all[:n_vis]
            o = k.attend_prefill(qf, kw, start - n_past + k0, W, comp_rows, sel, start + s0, rate, sink, scale)
            out[s0:s1] = o.to(out.dtype)
        return out

    def _attend_one(self, layer, q1, kw, comp, idx_st, idx_q, pos: int, k_sel: int, sink, scale: float,
                    k: TorchKernels):
        """One query at absolute position pos: q1 [H, Dh] over its window rows kw [nk, Dh] (all visible) plus the
        layer's compressed entries (HCA: every closed one; CSA: the indexer's top-k of the closed ones) -> [H, Dh].
        Every row is visible to the only query, so the general path's masks are all-true and are skipped."""
        rows = [kw]
        rate = self.args.rate(layer.index)
        n_closed = (pos + 1) // rate if rate else 0
        if layer.kind == LAYER_HCA and n_closed:
            rows.append(comp.store.view(n_closed).float())
        elif layer.kind == LAYER_CSA and k_sel and n_closed:
            # every one of the n_closed keys is visible to the only query: no threshold tensor (a host-to-device copy)
            sel = self._index_topk(*idx_q, idx_st.store, n_closed, None, k_sel, k)
            rows.append(comp.store.gather(sel)[0].float())  # k <= n_closed picks, all closed
        kv = torch.cat(rows) if len(rows) > 1 else kw
        return k.attend_one(q1, kv, sink.reshape(-1), scale)

    def _rope(self, freqs: torch.Tensor, positions: torch.Tensor, k: TorchKernels):
        """This forward's (cos, sin) for freqs at positions: computed once per forward and device, not per layer."""
        memo = self.__dict__.setdefault("_rope_memo", {})
        hit = memo.get(id(freqs))
        if hit is None or hit[0] is not positions:
            f = freqs
            if f.device != positions.device:  # a layer on another device: a copy kept there (kernels read it)
                copies = self.__dict__.setdefault("_freqs_on", {})
                f = copies.get((id(freqs), positions.device))
                if f is None:
                    f = copies[(id(freqs), positions.device)] = freqs.to(positions.device)
            hit = memo[id(freqs)] = (positions, *k.rope_cos_sin(f, positions))
        return hit[1], hit[2]

    def _attend_decode(self, layer, q, qr, iw, keys, start, n_past, comp, idx_st, rope, k: TorchKernels):
        """One query (decode) at position start: its window rows plus the layer's compressed entries (HCA: every
        closed one; CSA: the indexer's top-k of the closed ones), every row visible, so no masks; the rows are read
        where they lie (the kernel set's attend_rows takes two sources) and the output comes in q's dtype.
        The same math as _attend's general path, whose one-query blocks (_attend_one) it matches bit for bit."""
        a, at = self.args, layer.attn
        H, Dh = q.shape[1], q.shape[2]
        rate = a.rate(layer.index)
        n_closed = (start + 1) // rate if rate else 0
        kw = keys[max(0, n_past - (a.window_size - 1)) : n_past + 1]
        rows2 = None
        if layer.kind == LAYER_HCA and n_closed:
            rows2 = comp.store.view(n_closed)
        elif layer.kind == LAYER_CSA:
            k_sel = min(a.index_topk, comp.n_entries if comp is not None else 0)
            iq = k.linear(at.indexer.wq_b, qr).view(1, a.index_n_heads, a.index_head_dim)
            if k_sel and n_closed:
                iq = k.norm_rope(iq, None, 0.0, *rope, norm=False)
                sel = k.index_topk_one(iq, iw, idx_st.store.iter_pages(n_closed), n_closed, k_sel,
                                       a.index_n_heads**-0.5, a.index_head_dim**-0.5)
                rows2 = comp.store.gather(sel)[0]
        o = k.attend_rows(q[0], kw, rows2, at.sink.reshape(-1), Dh**-0.5, q.dtype)
        return o.view(1, H, Dh)

    def _index_topk(self, iq, iw, keys: PagedRows, n_vis: int, thr: torch.Tensor | None, k_sel: int,
                    k: TorchKernels) -> torch.Tensor:
        """Indexer top-k over the first n_vis keys, page by page through the kernel set (k.index_topk: the
        temporaries are at most a page per query, never [q, n_vis]). Entries w >= thr (future for that query) are
        invisible; thr None: all n_vis are. -> [q, min(k_sel, n_vis)], -1 where a query sees fewer keys."""
        return k.index_topk(iq, iw, keys.iter_pages(n_vis), n_vis, thr, k_sel, self.args.index_head_dim**-0.5)

    # ------------------------------------------------------------------------------------------------ MoE

    def route(self, layer: _Layer, x: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor | None = None,
              k: TorchKernels = TORCH) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (expert ids [T, k] int64, weights [T, k] fp32, normalized and scaled); logits: the router's
        gate(x) when already computed. Hash layers: experts are a function of the token id (k.route)."""
        a, m = self.args, layer.moe
        logits = m.gate(x) if logits is None else logits  # (T, E)
        return k.route(logits, m.bias, m.tid2eid, ids, a.score_func, a.n_activated_experts, a.route_scale)

    def _moe_in(self, layer: _Layer, x: torch.Tensor, ids: torch.Tensor, k: TorchKernels) -> _MoEIn:
        """The MoE site up to the routed experts: the mHC weights of the streams x, their normalized mix h, the
        router's choice and the shared expert's input projections."""
        a, m = self.args, layer.moe
        pre, post, comb = self._hc_weights(layer.hc_ffn, x, k)
        h = k.hc_pre_norm(pre, x, layer.ffn_norm, a.norm_eps)
        gate_logits, g, u = k.project(m.inputs.lins, h, m.inputs)  # router, shared w1, shared w3
        idx, w = self.route(layer, h, ids, gate_logits, k)
        return _MoEIn(x, post, comb, h, idx, w, g, u)

    def _next_layer_guess(self, layer: _Layer, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor | None:
        """The next layer's experts guessed by its router on this layer's MoE input h (so fetching them overlaps
        this layer's experts); None after the last layer and before a hash layer (known from the ids already)."""
        nxt = layer.index + 1
        if nxt >= len(self.layers) or self.layers[nxt].moe.tid2eid is not None:
            return None
        ln = self.layers[nxt]
        return self.route(ln, h.to(ln.device or self.device), ids)[0]

    def _moe_out(self, layer: _Layer, mi: _MoEIn, routed: torch.Tensor, k: TorchKernels) -> torch.Tensor:
        """The shared expert's down projection plus the routed experts' sum, written back into the streams."""
        y = k.swiglu_down(layer.moe.shared_w2, mi.g, mi.u, self.args.swiglu_limit, routed.to(mi.h.dtype))
        return k.hc_post(mi.post, y, mi.comb, mi.x)

    # ---------------------------------------------------------------------------------------------- stats

    def resident_bytes(self) -> int:
        """Bytes of non-expert weights held by this model object (as kept: packed FP8 or dequantized)."""
        seen: set[int] = set()
        total = 0

        def t_bytes(t: torch.Tensor | None) -> int:
            if t is None or id(t) in seen:
                return 0
            seen.add(id(t))
            return t.numel() * t.element_size()

        def walk(obj: Any) -> None:
            nonlocal total
            if isinstance(obj, torch.Tensor):
                total += t_bytes(obj)
            elif isinstance(obj, QLinear):
                total += t_bytes(obj.weight) + t_bytes(obj.scale)
            elif isinstance(obj, (_Compressor, _Indexer, _Attention, _MoE, _HC, _Layer)):
                for v in vars(obj).values():
                    walk(v)

        for t in (self.embed, self.norm, self.hc_head_fn, self.hc_head_base, self.hc_head_scale):
            walk(t)
        walk(self.head)
        for layer in self.layers:
            walk(layer)
        return total
