"""DeepSeek-V4's weights and per-step tensors as the forward (model.py) uses them: one dataclass per part."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from homerun.errors import UsageError
from homerun.models.layers import Projections, QLinear


@dataclass
class _Compressor:
    wkv: QLinear
    wgate: QLinear
    ape: torch.Tensor  # [rate, width] fp32
    norm: torch.Tensor  # [head_dim] fp32
    rate: int
    head_dim: int
    overlap: bool  # CSA: two series (Ca of the previous window + Cb of this one)


@dataclass
class _Indexer:
    wq_b: QLinear
    weights_proj: QLinear
    comp: _Compressor


@dataclass
class _Attention:
    wq_a: QLinear
    q_norm: torch.Tensor
    wq_b: QLinear
    wkv: QLinear
    kv_norm: torch.Tensor
    wo_a: QLinear
    wo_b: QLinear
    sink: torch.Tensor  # [H] fp32
    comp: _Compressor | None = None
    indexer: _Indexer | None = None
    # Every projection of the attention input, in this order: wq_a, wkv, [comp wkv, wgate], [indexer's comp wkv,
    # wgate, weights_proj]; one native call per decode step.
    inputs: Projections = field(init=False, repr=False)
    # The same split by what reads them: the state's (wkv, the compressors': every row) and the queries' (wq_a, the
    # indexer's weights_proj: only the rows whose output is used, see query_rows)
    state_inputs: Projections = field(init=False, repr=False)
    query_inputs: Projections = field(init=False, repr=False)

    def __post_init__(self) -> None:
        state, query = [self.wkv], [self.wq_a]
        if self.comp is not None:
            state += [self.comp.wkv, self.comp.wgate]
        if self.indexer is not None:
            state += [self.indexer.comp.wkv, self.indexer.comp.wgate]
            query.append(self.indexer.weights_proj)
        self.inputs = Projections([query[0], *state, *query[1:]])
        self.state_inputs, self.query_inputs = Projections(state), Projections(query)


@dataclass
class _MoE:
    gate: QLinear
    bias: torch.Tensor | None  # [E] fp32 (top-k layers)
    tid2eid: torch.Tensor | None  # [V, k] int64 (hash layers)
    shared_w1: QLinear
    shared_w3: QLinear
    shared_w2: QLinear
    inputs: Projections = field(init=False, repr=False)  # gate, shared_w1, shared_w3 of the MoE input

    def __post_init__(self) -> None:
        self.inputs = Projections([self.gate, self.shared_w1, self.shared_w3])


@dataclass
class _HC:
    fn: torch.Tensor  # [(2+n)n, n*D] fp32
    base: torch.Tensor
    scale: torch.Tensor


@dataclass
class _Layer:
    index: int
    kind: str
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    hc_attn: _HC
    hc_ffn: _HC
    attn: _Attention
    moe: _MoE
    device: torch.device | None = None  # where its weights and KV state live (None: the model's device)
    flavor: str = "auto"  # its device's kernel flavor (homerun.kernels.dispatch.FLAVORS; "gpu" on a CUDA stand-in)


@dataclass
class _PreAttn:
    """A layer's tensors from before its attention core (see DeepseekV4._pre_attention)."""

    post: torch.Tensor  # the attention site's mHC output weights [T, n]
    comb: torch.Tensor  # and stream mixing [T, n, n]
    proj: list[torch.Tensor]  # wq_a, wkv, [compressor wkv, wgate], [indexer's compressor wkv, wgate, weights_proj]
    qr: torch.Tensor  # the normed query latent [T, Lq]
    q: torch.Tensor  # [T, H, Dh], RoPE'd
    kv: torch.Tensor  # this step's window rows [T, Dh], RoPE'd
    cos: torch.Tensor
    sin: torch.Tensor


@dataclass
class _MoEIn:
    """A layer's MoE site before its routed experts (see DeepseekV4._moe_in)."""

    x: torch.Tensor  # the streams after the attention site [T, n, D]
    post: torch.Tensor  # the MoE site's mHC output weights [T, n]
    comb: torch.Tensor  # and stream mixing [T, n, n]
    h: torch.Tensor  # the routed and shared experts' input [T, D]
    idx: torch.Tensor  # the router's experts [T, k] int64
    w: torch.Tensor  # and weights [T, k] fp32
    g: torch.Tensor  # the shared expert's w1(h), w3(h)
    u: torch.Tensor


def out_slice(out_rows: slice | None, n_rows: int) -> slice | None:
    """A forward's `out_rows` over its n_rows -> the step-1 slice [r0, r1) it keeps, or None when it keeps every row."""
    if out_rows is None:
        return None
    if not isinstance(out_rows, slice) or out_rows.step not in (None, 1):
        raise UsageError(f"out_rows: {out_rows!r} is not a slice of step 1",
                         hint="pass slice(r0, r1), e.g. slice(-1, None) for the last row")
    r0, r1, _ = out_rows.indices(n_rows)
    r1 = max(r0, r1)
    return None if (r0, r1) == (0, n_rows) else slice(r0, r1)


def query_rows(k: Any, at: _Attention, h: torch.Tensor, rows: slice, post, comb, cos, sin) -> tuple:
    """The attention input's projections when only `rows` need queries: the state's for every row of h, wq_a and the
    indexer's weights_proj for those rows (None for none), in `inputs` order; and post, comb, cos, sin of the rows."""
    state = k.project(at.state_inputs.lins, h, at.state_inputs)
    hq = h[rows]
    query = k.project(at.query_inputs.lins, hq, at.query_inputs) if hq.shape[0] else [None] * len(at.query_inputs.lins)
    return [query[0], *state, *query[1:]], post[rows], comb[rows], cos[rows], sin[rows]
