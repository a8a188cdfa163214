"""DeepSeek-V4 forward math (Flash / Pro): mHC, sliding + CSA + HCA attention, hash/top-k MoE, HC head.

Pure math: no file I/O, no printing. Weights arrive through a `get(name)` callable that returns the raw stored
tensor under its official checkpoint name (FP8 weights come with a sibling `<name>.scale`); routed experts go
through an `offload.base.ExpertBackend`. The inference state (`LayerState`) is explicit and functional: a forward
over a chunk returns the new states and never mutates the old ones, except for writes past the committed end of a
`RowStore`, so an interrupted chunk leaves the previous state intact.

Where the official reference (`inference/model.py`) and transformers (>= 5.10) differ, this follows transformers:
  * no FP8 activation / KV / FP4-indexer quantize-dequantize simulation, no Hadamard rotation in the indexer
    (HF dequantizes the weights and computes in the model dtype);
  * compressor projections and the router logits are computed in the compute dtype (official: fp32);
  * the shared expert uses the clamped SwiGLU (HF >= 5.10 and the current official revision);
  * routing weights are normalized as w / (sum + 1e-20) (HF TopKRouter / HashRouter).
Deliberate differences from transformers (none changes fp32 results beyond rounding):
  * attention scores, the sink softmax and the P.V product are computed in fp32 whatever the compute dtype
    (official kernel behaviour; HF uses the model dtype, so bf16 runs differ at bf16 rounding);
  * CSA attention gathers only the indexer's top-k entries per query instead of masking a dense
    [T, n_entries] score matrix, and the indexer's top-k is merged one KV page at a time (scores [q, Hi, page],
    never [q, n_entries]); query blocks bound the temporaries. Entry stores are paged (`homerun.models.kv`).
MTP (`mtp.*`) is not part of the forward: the loader may hold its tensors, this module never reads them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from homerun.errors import ConfigError
from homerun.models.kv import DEFAULT_PAGE_TOKENS, Fp8PagedRows, PagedRows
from homerun.models.layers import NATIVE_HC_MAX_ROWS, Projections, QLinear, native_bf16, native_hc, native_sinkhorn

LAYER_SLIDING, LAYER_CSA, LAYER_HCA = "sliding", "csa", "hca"
_RATIO_TO_KIND = {0: LAYER_SLIDING, 4: LAYER_CSA, 128: LAYER_HCA}
_HF_TYPE_TO_KIND = {
    "sliding_attention": LAYER_SLIDING,
    "compressed_sparse_attention": LAYER_CSA,
    "heavily_compressed_attention": LAYER_HCA,
}
# Attention temporaries (score blocks) are kept under this many elements.
_BLOCK_ELEMS = 1 << 24


# ----------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class YarnParams:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0


@dataclass(frozen=True)
class ModelArgs:
    """Every architecture number the forward needs, read from an HF-style `config.json` dict."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_lora_rank: int
    o_groups: int
    n_routed_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    route_scale: float
    score_func: str
    n_hash_layers: int
    swiglu_limit: float
    window_size: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    norm_eps: float
    rope_theta: float
    compress_rope_theta: float
    yarn: YarnParams | None
    layer_kinds: tuple[str, ...]  # per layer: "sliding" | "csa" | "hca"
    csa_rate: int = 4
    hca_rate: int = 128
    n_mtp_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    expert_dtype: str = "fp8"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rate(self, layer: int) -> int:
        kind = self.layer_kinds[layer]
        return self.csa_rate if kind == LAYER_CSA else self.hca_rate if kind == LAYER_HCA else 0

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        """Accepts the official config.json and the form transformers re-saves (layer_types, rope_parameters)."""

        def need(key: str) -> Any:
            if key not in cfg:
                raise ConfigError(f"config.json: missing field {key!r}", hint="is this a DeepSeek-V4 config.json?")
            return cfg[key]

        n_layers = int(need("num_hidden_layers"))
        head_dim = int(need("head_dim"))
        if cfg.get("layer_types"):
            kinds = tuple(_HF_TYPE_TO_KIND[t] for t in cfg["layer_types"][:n_layers])
        else:
            ratios = list(cfg.get("compress_ratios") or [])
            if len(ratios) < n_layers:
                raise ConfigError(
                    f"config.json: compress_ratios has {len(ratios)} entries for {n_layers} layers",
                    hint="compress_ratios needs one entry (0, 4 or 128) per layer",
                )
            bad = [r for r in ratios[:n_layers] if int(r) not in _RATIO_TO_KIND]
            if bad:
                raise ConfigError(f"config.json: compress_ratios values must be 0, 4 or 128, got {bad}")
            kinds = tuple(_RATIO_TO_KIND[int(r)] for r in ratios[:n_layers])
        if cfg.get("mlp_layer_types"):
            n_hash = sum(1 for t in cfg["mlp_layer_types"][:n_layers] if t == "hash_moe")
        else:
            n_hash = int(cfg.get("num_hash_layers", 3))
        if cfg.get("qk_rope_head_dim") is not None:
            rope_dim = int(cfg["qk_rope_head_dim"])
        elif cfg.get("partial_rotary_factor") is not None:
            rope_dim = int(head_dim * float(cfg["partial_rotary_factor"]))
        else:
            rope_dim = 64
        rates = dict(cfg.get("compress_rates") or {})
        csa_rate = int(cfg.get("compress_rate_csa") or rates.get("compressed_sparse_attention", 4))
        hca_rate = int(cfg.get("compress_rate_hca") or rates.get("heavily_compressed_attention", 128))
        rope_theta = float(cfg.get("rope_theta", 10000.0))
        compress_theta = float(cfg.get("compress_rope_theta", 160000.0))
        scaling = cfg.get("rope_scaling")
        rp = cfg.get("rope_parameters")
        if isinstance(rp, Mapping) and isinstance(rp.get("compress"), Mapping):
            scaling = rp["compress"]
            compress_theta = float(scaling.get("rope_theta", compress_theta))
            if isinstance(rp.get("main"), Mapping):
                rope_theta = float(rp["main"].get("rope_theta", rope_theta))
        elif isinstance(rp, Mapping) and not scaling:
            scaling = rp
        yarn = None
        if isinstance(scaling, Mapping) and (scaling.get("rope_type") or scaling.get("type")) == "yarn":
            orig = int(scaling["original_max_position_embeddings"])
            factor = scaling.get("factor")
            if factor is None:
                factor = float(cfg.get("max_position_embeddings", orig)) / orig
            yarn = YarnParams(
                factor=float(factor),
                original_max_position_embeddings=orig,
                beta_fast=float(scaling.get("beta_fast") or 32),
                beta_slow=float(scaling.get("beta_slow") or 1),
            )
        qc = cfg.get("quantization_config") or {}
        eos = cfg.get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=int(need("vocab_size")),
            dim=int(need("hidden_size")),
            n_layers=n_layers,
            n_heads=int(need("num_attention_heads")),
            head_dim=head_dim,
            rope_dim=rope_dim,
            q_lora_rank=int(need("q_lora_rank")),
            o_lora_rank=int(need("o_lora_rank")),
            o_groups=int(need("o_groups")),
            n_routed_experts=int(need("n_routed_experts")),
            n_activated_experts=int(need("num_experts_per_tok")),
            moe_inter_dim=int(need("moe_intermediate_size")),
            route_scale=float(cfg.get("routed_scaling_factor", 1.5)),  # transformers default
            score_func=str(cfg.get("scoring_func", "sqrtsoftplus")),
            n_hash_layers=min(n_hash, n_layers),
            swiglu_limit=float(cfg.get("swiglu_limit", 10.0)),
            window_size=int(cfg.get("sliding_window", 128)),
            index_n_heads=int(cfg.get("index_n_heads", 64)),
            index_head_dim=int(cfg.get("index_head_dim", 128)),
            index_topk=int(cfg.get("index_topk", 512)),
            hc_mult=int(cfg.get("hc_mult", 4)),
            hc_sinkhorn_iters=int(cfg.get("hc_sinkhorn_iters", 20)),
            hc_eps=float(cfg.get("hc_eps", 1e-6)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            compress_rope_theta=compress_theta,
            yarn=yarn,
            layer_kinds=kinds,
            csa_rate=csa_rate,
            hca_rate=hca_rate,
            n_mtp_layers=int(cfg.get("num_nextn_predict_layers", 0)),
            bos_token_id=cfg.get("bos_token_id", 0),
            eos_token_id=eos,
            expert_dtype=str(cfg.get("expert_dtype") or qc.get("expert_dtype") or "fp8"),
        )


# ------------------------------------------------------------------------------------------------- primitives


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm in fp32 (weight multiplied in fp32, one cast at the end, as HF >= 5.12)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        xf = weight * xf
    return xf.to(x.dtype)


def inv_freq(rope_dim: int, theta: float, yarn: YarnParams | None) -> torch.Tensor:
    """Per-pair inverse frequencies [rope_dim/2] (fp32); YaRN ramp as transformers (truncate, no mscale)."""
    pos = theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
    extra = 1.0 / pos
    if yarn is None:
        return extra
    inter = 1.0 / (yarn.factor * pos)

    def corr_dim(rot: float) -> float:
        return rope_dim * math.log(yarn.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(corr_dim(yarn.beta_fast)), 0)
    high = min(math.ceil(corr_dim(yarn.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # share of the unscaled (extrapolated) frequency
    return inter * (1 - keep) + extra * keep


def rope_cos_sin(freqs: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [T] -> cos, sin [T, rope_dim/2] in fp32."""
    ang = positions.to(torch.float32)[:, None] * freqs.to(positions.device)[None, :]
    return ang.cos(), ang.sin()


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


def norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor | None = None,
              sin: torch.Tensor | None = None, *, norm: bool = True, inverse: bool = False) -> torch.Tensor:
    """rms_norm (when norm) then apply_rope (when cos is given); decode-sized fp32 CPU rows take one native call
    for the ~20 tiny torch ops."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= NATIVE_HC_MAX_ROWS:
        native = native_hc()
        if native is not None:
            return native.norm_rope(x, weight, eps, cos, sin, norm=norm, inverse=inverse)
    if norm:
        x = rms_norm(x, weight, eps)
    return x if cos is None else apply_rope(x, cos, sin, inverse=inverse)


# ------------------------------------------------------------------------------------------------------ state


# Entry stores are paged (homerun.models.kv): growing never copies the stored rows.
RowStore = PagedRows


@dataclass(frozen=True)
class CompressorState:
    """One compressor's state: closed entries (in `store`, first `n_entries` rows), the open window's projected
    rows (kv and gate, before the position bias) and, for CSA, the last closed window's Ca slice (overlap)."""

    store: RowStore
    n_entries: int = 0
    pending_kv: torch.Tensor | None = None  # [r < rate, width]
    pending_gate: torch.Tensor | None = None
    overlap_kv: torch.Tensor | None = None  # [rate, head_dim] (CSA only)
    overlap_gate: torch.Tensor | None = None

    def entries(self) -> torch.Tensor:
        return self.store.view(self.n_entries)

    def _small_bytes(self) -> int:
        n = 0
        for t in (self.pending_kv, self.pending_gate, self.overlap_kv, self.overlap_gate):
            if t is not None:
                n += t.numel() * t.element_size()
        return n

    @property
    def nbytes(self) -> int:
        """Live bytes: committed entries plus the open window and overlap slices."""
        return self.n_entries * self.store.row_bytes + self._small_bytes()

    @property
    def allocated_bytes(self) -> int:
        """Like nbytes, but the entry store counts its whole pages."""
        return self.store.nbytes + self._small_bytes()


@dataclass(frozen=True)
class LayerState:
    """Per-layer inference state. `window`: the last window_size-1 kv rows (the current token is the W-th key)."""

    window: torch.Tensor  # [<= W-1, head_dim]
    comp: CompressorState | None = None
    index_comp: CompressorState | None = None

    @property
    def nbytes(self) -> int:
        n = self.window.numel() * self.window.element_size()
        for c in (self.comp, self.index_comp):
            if c is not None:
                n += c.nbytes
        return n

    @property
    def allocated_bytes(self) -> int:
        n = self.window.numel() * self.window.element_size()
        for c in (self.comp, self.index_comp):
            if c is not None:
                n += c.allocated_bytes
        return n


# ----------------------------------------------------------------------------------------------------- model


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

    def __post_init__(self) -> None:
        lins = [self.wq_a, self.wkv]
        if self.comp is not None:
            lins += [self.comp.wkv, self.comp.wgate]
        if self.indexer is not None:
            lins += [self.indexer.comp.wkv, self.indexer.comp.wgate, self.indexer.weights_proj]
        self.inputs = Projections(lins)


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
    stage: int = 0  # pipeline stage (placement device number): activations hop when it changes


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
    embed_stage: int = 0
    head_stage: int = 0
    activation_hops: int = 0  # pipeline-stage changes crossed by forward passes so far (a counter)

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

        def store(width: int, rate: int, rope_dim: int, scale_fp32: bool, dev, kv_dev, account) -> PagedRows:
            rows = max(1, page_tokens // rate)
            if kv_dtype == "fp8":
                return Fp8PagedRows(width, dt, kv_dev, rows, dev, rope_dim=rope_dim, scale_fp32=scale_fp32,
                                    account=account)
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
                comp = CompressorState(store(a.head_dim, a.rate(layer.index), a.rope_dim, False, dev, kv_dev, account))
            if layer.kind == LAYER_CSA:
                idx = CompressorState(store(a.index_head_dim, a.csa_rate, 0, True, dev, kv_dev, account))
            out.append(LayerState(window, comp, idx))
        return out

    # ------------------------------------------------------------------------------------------- forward

    def forward(
        self, ids: torch.Tensor, start_pos: int, states: Sequence[LayerState]
    ) -> tuple[torch.Tensor, list[LayerState]]:
        """ids [T] at absolute positions start_pos.. -> (final hidden [T, D] after HC head + norm, new states)."""
        a = self.args
        ids = ids.to(self.device)
        positions = torch.arange(start_pos, start_pos + ids.shape[0], device=self.device)
        hook = getattr(self.experts, "prefetch_hash_layer", None)
        if hook is not None:  # hash layers' experts are known from the token ids before any layer runs
            for layer in self.layers:
                if layer.moe.tid2eid is not None:
                    hook(layer.index, layer.moe.tid2eid, ids)
        h = F.embedding(ids, self.embed).to(self.compute_dtype)  # (T, D)
        x = h.unsqueeze(1).expand(-1, a.hc_mult, -1).contiguous()  # (T, n, D)
        new_states = []
        dev, stage = self.device, self.embed_stage
        for layer, st in zip(self.layers, states):
            # Pipeline split: the residual streams, token ids and positions follow the layers to their device,
            # once per boundary (a no-op between stand-ins, which share the host's memory).
            ldev = layer.device or self.device
            if ldev != dev:
                x, ids, positions, dev = x.to(ldev), ids.to(ldev), positions.to(ldev), ldev
            if layer.stage != stage:
                stage = layer.stage
                self.activation_hops += 1
            x, st = self._block(layer, x, ids, positions, st)
            new_states.append(st)
        hdev = self.head_device or self.device
        if hdev != dev:
            x = x.to(hdev)
        if self.head_stage != stage:
            self.activation_hops += 1
        h = self._hc_head(x)
        return norm_rope(h, self.norm, a.norm_eps), new_states

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, D] -> float32 logits [T, V]."""
        return self.head(hidden).float()

    # ------------------------------------------------------------------------------------------------ mHC

    def _hc_weights(self, hc: _HC, x: torch.Tensor):
        """x [T, n, D] -> pre [T, n], post [T, n], comb [T, n, n] (fp32; Sinkhorn-normalized comb)."""
        a, n = self.args, self.args.hc_mult
        native = native_hc() if self._hc_native_ok(x) else None
        if native is not None:  # one call instead of ~20 tiny ops and a threaded GEMV
            return native.hc_weights(x, hc.fn, hc.scale, hc.base, a.norm_eps, a.hc_eps, a.hc_sinkhorn_iters)
        flat = rms_norm(x.flatten(1).float(), None, a.norm_eps)
        mix = F.linear(flat, hc.fn)  # (T, (2+n)n)
        pre = torch.sigmoid(mix[:, :n] * hc.scale[0] + hc.base[:n]) + a.hc_eps
        post = 2 * torch.sigmoid(mix[:, n : 2 * n] * hc.scale[1] + hc.base[n : 2 * n])
        comb = mix[:, 2 * n :].view(-1, n, n) * hc.scale[2] + hc.base[2 * n :].view(n, n)
        comb = torch.softmax(comb, dim=-1) + a.hc_eps
        native = native_sinkhorn() if comb.device.type == "cpu" else None
        if native is not None:  # same passes in the same order, without ~120 tiny ops per call
            return pre, post, native(comb.contiguous(), a.hc_sinkhorn_iters, a.hc_eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + a.hc_eps)
        for _ in range(a.hc_sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + a.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + a.hc_eps)
        return pre, post, comb

    def _hc_site(self, hc: _HC, x: torch.Tensor, norm_w: torch.Tensor, sub: Callable[[torch.Tensor], torch.Tensor]):
        dt = x.dtype
        pre, post, comb = self._hc_weights(hc, x)
        native = native_hc() if self._hc_native_ok(x) else None
        if native is not None:  # the same sums on the calling thread: no threaded bmm for 65k multiply-adds
            y = sub(norm_rope(native.hc_pre(pre, x), norm_w, self.args.norm_eps))
            return native.hc_post(post, y, comb, x)
        collapsed = (pre.unsqueeze(-1) * x).sum(dim=1).to(dt)  # (T, D)
        y = sub(rms_norm(collapsed, norm_w, self.args.norm_eps))
        # comb is applied transposed: out_j = sum_i comb[i, j] x_i (official hc_post; HF comb^T @ X).
        return post.to(dt).unsqueeze(-1) * y.unsqueeze(1) + torch.matmul(comb.to(dt).transpose(-1, -2), x)

    @staticmethod
    def _hc_native_ok(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] <= NATIVE_HC_MAX_ROWS

    def _hc_head(self, x: torch.Tensor) -> torch.Tensor:
        a = self.args
        native = native_hc() if self._hc_native_ok(x) else None
        if native is not None:
            pre, _, _ = native.hc_weights(x, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, a.norm_eps,
                                          a.hc_eps, a.hc_sinkhorn_iters)
            return native.hc_pre(pre, x)
        flat = rms_norm(x.flatten(1).float(), None, a.norm_eps)
        mix = F.linear(flat, self.hc_head_fn)
        pre = torch.sigmoid(mix * self.hc_head_scale + self.hc_head_base) + a.hc_eps
        return (pre.unsqueeze(-1) * x).sum(dim=1).to(x.dtype)

    def _block(self, layer: _Layer, x, ids, positions, st: LayerState):
        new_st: list[LayerState] = []

        def attn(h):
            out, s = self._attention(layer, h, positions, st)
            new_st.append(s)
            return out

        x = self._hc_site(layer.hc_attn, x, layer.attn_norm, attn)
        x = self._hc_site(layer.hc_ffn, x, layer.ffn_norm, lambda h: self._moe(layer, h, ids))
        return x, new_st[0]

    # ------------------------------------------------------------------------------------------ attention

    def _compress(self, c: _Compressor, kv: torch.Tensor, gate: torch.Tensor, start_pos: int, st: CompressorState,
                  freqs) -> CompressorState:
        """From this step's projections kv, gate [T, width] (c.wkv(x), c.wgate(x)): close every full window, append
        the new entries past st.n_entries."""
        if st.pending_kv is not None and st.pending_kv.shape[0]:
            kv = torch.cat([st.pending_kv, kv])
            gate = torch.cat([st.pending_gate, gate])
        n_win = kv.shape[0] // c.rate
        usable = n_win * c.rate
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
        cos, sin = rope_cos_sin(freqs, pos)
        entries = norm_rope((slots_kv * wts).sum(dim=1), c.norm, self.args.norm_eps, cos, sin)  # (W, hd)
        n = st.store.write(st.n_entries, entries)
        return CompressorState(st.store, n, pending_kv, pending_gate, overlap_kv, overlap_gate)

    def _attention(self, layer: _Layer, x: torch.Tensor, positions: torch.Tensor, st: LayerState):
        """x [T, D] (normalized) -> ([T, D], new LayerState)."""
        a, at = self.args, layer.attn
        T = x.shape[0]
        H, Dh = a.n_heads, a.head_dim
        start = int(positions[0])
        freqs = self.freqs_main if layer.kind == LAYER_SLIDING else self.freqs_compress
        cos, sin = rope_cos_sin(freqs, positions)

        proj = at.inputs(x)  # wq_a, wkv, then the compressors' and the indexer's (see _Attention.inputs)
        qr = norm_rope(proj[0], at.q_norm, a.norm_eps)  # (T, Lq)
        q = norm_rope(at.wq_b(qr).view(T, H, Dh), None, a.norm_eps, cos, sin)  # (T, H, Dh), per-head norm
        kv = norm_rope(proj[1], at.kv_norm, a.norm_eps, cos, sin)  # (T, Dh)

        past = st.window
        keys = torch.cat([past, kv]) if past.shape[0] else kv  # rows at positions start-P .. start+T-1
        keep = a.window_size - 1
        window = keys[max(0, keys.shape[0] - keep) :].clone() if keep > 0 else keys[:0].clone()

        comp = idx_st = iw = None
        if at.comp is not None:
            comp = self._compress(at.comp, proj[2], proj[3], start, st.comp, self.freqs_compress)
        if at.indexer is not None:
            idx_st = self._compress(at.indexer.comp, proj[4], proj[5], start, st.index_comp, self.freqs_compress)
            iw = proj[6]

        out = self._attend(layer, q, qr, iw, keys, start, past.shape[0], comp, idx_st, (cos, sin))  # (T, H, Dh)
        out = norm_rope(out, None, 0.0, cos, sin, norm=False, inverse=True)
        z = at.wo_a.grouped(out.reshape(T, a.o_groups, -1), a.o_groups).flatten(1)  # (T, G*Lo)
        return at.wo_b(z), LayerState(window, comp, idx_st)

    def _attend(self, layer, q, qr, iw, keys, start, n_past, comp, idx_st, rope) -> torch.Tensor:
        """iw: the indexer's weights_proj(x) [T, Hi] (CSA layers); rope: this step's (cos, sin), which in a CSA
        layer are the compressed-frequency ones the indexer's queries use."""
        a, at = self.args, layer.attn
        T, H, Dh = q.shape
        W = a.window_size
        rate = a.rate(layer.index)
        scale = Dh**-0.5
        n_comp_max = comp.n_entries if comp is not None else 0
        k_sel = 0
        if layer.kind == LAYER_CSA:
            k_sel = min(a.index_topk, n_comp_max)
            iq = at.indexer.wq_b(qr).view(T, a.index_n_heads, a.index_head_dim)
            iq = norm_rope(iq, None, 0.0, *rope, norm=False).float()  # (T, Hi, Di)
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
                out[s0] = self._attend_one(layer, qf[0], kw, comp, idx_st, idx_q, start + s0, k_sel, sink, scale)
                continue
            kpos = torch.arange(k1 - k0, device=q.device) + (start - n_past + k0)
            vis = (kpos[None, :] <= tpos[:, None]) & (kpos[None, :] > tpos[:, None] - W)
            s_w = torch.einsum("qhd,kd->qhk", qf, kw) * scale
            s_w = s_w.masked_fill(~vis[:, None, :], float("-inf"))
            parts, values = [s_w], [kw]
            thr = (tpos + 1) // rate if rate else None  # entries w < thr are closed for query t
            if layer.kind == LAYER_HCA and n_comp_max:
                n_vis = (start + s1) // rate
                ke = comp.store.view(n_vis).float()  # all T/128 HCA entries visible to this block
                s_c = torch.einsum("qhd,kd->qhk", qf, ke) * scale
                cvis = torch.arange(n_vis, device=q.device)[None, :] < thr[:, None]
                parts.append(s_c.masked_fill(~cvis[:, None, :], float("-inf")))
                values.append(ke)
            gathered = None
            if layer.kind == LAYER_CSA and k_sel:
                n_vis = (start + s1) // rate
                sel = self._index_topk(at.indexer, iq[s0:s1], iw[s0:s1], idx_st.store, n_vis, thr, k_sel)
                valid = sel < thr[:, None]  # picks that landed on masked (future) entries are dropped
                gathered = comp.store.gather(sel).float()  # (q, k, Dh): only the selected entries are read
                s_c = torch.einsum("qhd,qkd->qhk", qf, gathered) * scale
                parts.append(s_c.masked_fill(~valid[:, None, :], float("-inf")))
            logits = torch.cat(parts + [sink.expand(nq, H, 1)], dim=-1)
            probs = torch.softmax(logits - logits.amax(dim=-1, keepdim=True), dim=-1)
            nw = kw.shape[0]
            o = torch.einsum("qhk,kd->qhd", probs[..., :nw], kw)
            off = nw
            if layer.kind == LAYER_HCA and len(values) > 1:
                ke = values[1]
                o = o + torch.einsum("qhk,kd->qhd", probs[..., off : off + ke.shape[0]], ke)
                off += ke.shape[0]
            if gathered is not None:
                o = o + torch.einsum("qhk,qkd->qhd", probs[..., off : off + gathered.shape[1]], gathered)
            out[s0:s1] = o.to(out.dtype)
        return out

    def _attend_one(self, layer, q1, kw, comp, idx_st, idx_q, pos: int, k_sel: int, sink, scale: float):
        """One query at absolute position pos: q1 [H, Dh] over its window rows kw [nk, Dh] (all visible) plus the
        layer's compressed entries (HCA: every closed one; CSA: the indexer's top-k of the closed ones) -> [H, Dh].
        Every row is visible to the only query, so the general path's masks are all-true and are skipped."""
        rows = [kw]
        rate = self.args.rate(layer.index)
        n_closed = (pos + 1) // rate if rate else 0
        if layer.kind == LAYER_HCA and n_closed:
            rows.append(comp.store.view(n_closed).float())
        elif layer.kind == LAYER_CSA and k_sel and n_closed:
            thr = torch.tensor([n_closed], device=q1.device)
            sel = self._index_topk(layer.attn.indexer, *idx_q, idx_st.store, n_closed, thr, k_sel)
            rows.append(comp.store.gather(sel)[0].float())  # k <= n_closed picks, all closed
        kv = torch.cat(rows) if len(rows) > 1 else kw
        native = native_hc() if q1.device.type == "cpu" and q1.dtype == torch.float32 else None
        if native is not None:  # every core, while torch's ops of a decode step run on one (homerun.kernels.cpu_step)
            return native.attend_one(q1, kv, sink.reshape(-1), scale)
        logits = torch.cat([torch.mm(q1, kv.T) * scale, sink.view(-1, 1)], dim=1)  # (H, N + 1)
        probs = torch.softmax(logits, dim=-1)
        return torch.mm(probs[:, :-1], kv)

    def _index_topk(self, indexer, iq, iw, keys: PagedRows, n_vis: int, thr: torch.Tensor, k_sel: int):
        """Indexer top-k over the first n_vis keys, merged page by page: the score temporary is [q, Hi, page]
        and [q, k + page], never [q, n_vis]. Entries w >= thr (future for that query) score -inf. -> [q, k]."""
        a = self.args
        nq = iq.shape[0]
        k = min(k_sel, n_vis)
        best_v = iq.new_empty(nq, 0, dtype=torch.float32)
        best_i = torch.empty(nq, 0, dtype=torch.long, device=iq.device)
        for r0, ik in keys.iter_pages(n_vis):
            ik = ik.float()  # (p, Di)
            sc = torch.relu(torch.einsum("qhd,nd->qhn", iq, ik)) * a.index_head_dim**-0.5
            score = (sc * iw.unsqueeze(-1)).sum(dim=1)  # (q, p)
            ids = torch.arange(r0, r0 + ik.shape[0], device=iq.device)
            score = score.masked_fill(ids[None, :] >= thr[:, None], float("-inf"))
            v = torch.cat([best_v, score], dim=1)
            i = torch.cat([best_i, ids.expand(nq, -1)], dim=1)
            top = v.topk(min(k, v.shape[1]), dim=-1)
            best_v, best_i = top.values, i.gather(1, top.indices)
        return best_i

    # ------------------------------------------------------------------------------------------------ MoE

    def route(self, layer: _Layer, x: torch.Tensor, ids: torch.Tensor,
              logits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (expert ids [T, k] int64, weights [T, k] fp32, normalized and scaled); logits: the router's
        gate(x) when already computed."""
        a, m = self.args, layer.moe
        logits = (m.gate(x) if logits is None else logits).float()  # (T, E)
        if a.score_func == "sqrtsoftplus":
            scores = F.softplus(logits).sqrt()
        elif a.score_func == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits.softmax(dim=-1)
        if m.tid2eid is not None:
            idx = m.tid2eid[ids].long()  # hash layers: experts are a function of the token id
        else:
            # The bias only decides which experts are picked; the weights come from the unbiased scores.
            idx = torch.topk(scores + m.bias, a.n_activated_experts, dim=-1, sorted=False).indices
        w = scores.gather(1, idx)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * a.route_scale
        return idx, w

    def _moe(self, layer: _Layer, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        a, m = self.args, layer.moe
        gate_logits, g, u = m.inputs(x)  # router, shared w1, shared w3: one call per decode step
        idx, w = self.route(layer, x, ids, gate_logits)
        hook = getattr(self.experts, "prefetch_speculative", None)
        nxt = layer.index + 1
        if hook is not None and nxt < len(self.layers) and self.layers[nxt].moe.tid2eid is None:
            # Guess the next layer's experts from this layer's MoE input, so fetching overlaps this layer's experts.
            m_next = self.layers[nxt].moe
            hook(nxt, x, m_next.gate.dequant(x.dtype), m_next.bias, a.n_activated_experts)
        routed = self.experts.forward(layer.index, x, idx, w)
        lim = a.swiglu_limit
        g, u = g.clamp(max=lim), u.clamp(-lim, lim)
        return routed.to(x.dtype) + m.shared_w2(F.silu(g) * u)

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


# ------------------------------------------------------------------------------------------------------ build


def build_model(
    args: ModelArgs,
    get: Callable[[str], torch.Tensor],
    has: Callable[[str], bool],
    experts: Any,
    *,
    weights_dtype: str = "fp8",
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    on_layer: Callable[[int, int], None] | None = None,
    upcast_bf16: bool = True,
    layer_devices: Sequence[torch.device] | None = None,
    head_device: torch.device | str | None = None,
    stages: Sequence[int] | None = None,
    put: Callable[[str, torch.Tensor, torch.device], torch.Tensor] | None = None,
) -> DeepseekV4:
    """Assemble the model from stored tensors. `get(name)` returns the tensor as stored (FP8 weight, e8m0 scale,
    bf16, fp32, int64); `has(name)` tells whether it exists. weights_dtype "fp8" keeps FP8 weights packed;
    "bf16"/"fp32" dequantize FP8 (and convert bf16) weights once here. `upcast_bf16`: with an fp32 compute dtype, hold
    the BF16-stored matrices (head, compressors, routers, indexer weights_proj) in fp32, since converting them on
    every call costs more than the matmul (the head alone is 0.5G elements on V4). `on_layer(done, total)` reports
    progress.
    Pipeline split: `device` holds the embedding, `layer_devices[i]` layer i, `head_device` the final norm, HC head
    and lm head (defaults: `device`); `stages` numbers the placement devices as (embed, layer 0..n-1, head) so the
    forward counts hops. `put(name, tensor, device)` materializes each final tensor (official name) where it
    lives (default `tensor.to(device)`); the placement executor passes one that charges a budgeted device."""
    device = torch.device(device)
    dense = {"fp8": None, "bf16": torch.bfloat16, "fp32": torch.float32}[weights_dtype]
    layer_devs = [torch.device(d) for d in layer_devices] if layer_devices is not None else [device] * args.n_layers
    head_dev = torch.device(head_device) if head_device is not None else device
    stage_of = list(stages) if stages is not None else [0] * (args.n_layers + 2)
    if len(layer_devs) != args.n_layers or len(stage_of) != args.n_layers + 2:
        raise ConfigError(f"build_model: {len(layer_devs)} layer devices / {len(stage_of)} stages for "
                          f"{args.n_layers} layers", hint="one device per layer; stages for embed, layers, head")

    def _to(name: str, t: torch.Tensor, dev: torch.device) -> torch.Tensor:
        return t.to(dev) if t.device != dev else t

    place = put or _to
    device_now = device  # where the tensors being built go (set per layer and for the head)

    def lin(name: str) -> QLinear:
        device = device_now
        w = get(f"{name}.weight")
        s = get(f"{name}.scale") if has(f"{name}.scale") else None
        q = QLinear(w, s)
        if dense is not None:
            q = q.to_dense(dense)
        elif s is None and upcast_bf16 and compute_dtype == torch.float32 and w.dtype != torch.float32 and not (
            w.dtype == torch.bfloat16 and device.type == "cpu" and native_bf16() is not None
        ):  # the native bf16 kernel is exact and reads half the bytes, so bf16 stays bf16 where it runs
            q = q.to_dense(torch.float32)
        return QLinear(place(f"{name}.weight", q.weight, device),
                       None if q.scale is None else place(f"{name}.scale", q.scale, device))

    def f32(name: str) -> torch.Tensor:
        return place(name, get(name).to(torch.float32), device_now)

    def hc(prefix: str, site: str) -> _HC:
        return _HC(f32(f"{prefix}.hc_{site}_fn"), f32(f"{prefix}.hc_{site}_base"), f32(f"{prefix}.hc_{site}_scale"))

    def compressor(prefix: str, rate: int, head_dim: int, overlap: bool) -> _Compressor:
        return _Compressor(
            lin(f"{prefix}.wkv"), lin(f"{prefix}.wgate"), f32(f"{prefix}.ape"), f32(f"{prefix}.norm.weight"),
            rate, head_dim, overlap,
        )

    layers = []
    for i in range(args.n_layers):
        p = f"layers.{i}"
        kind = args.layer_kinds[i]
        device_now = layer_devs[i]
        comp = indexer = None
        if kind == LAYER_CSA:
            comp = compressor(f"{p}.attn.compressor", args.csa_rate, args.head_dim, True)
            indexer = _Indexer(
                lin(f"{p}.attn.indexer.wq_b"),
                lin(f"{p}.attn.indexer.weights_proj"),
                compressor(f"{p}.attn.indexer.compressor", args.csa_rate, args.index_head_dim, True),
            )
        elif kind == LAYER_HCA:
            comp = compressor(f"{p}.attn.compressor", args.hca_rate, args.head_dim, False)
        attn = _Attention(
            lin(f"{p}.attn.wq_a"), f32(f"{p}.attn.q_norm.weight"), lin(f"{p}.attn.wq_b"), lin(f"{p}.attn.wkv"),
            f32(f"{p}.attn.kv_norm.weight"), lin(f"{p}.attn.wo_a"), lin(f"{p}.attn.wo_b"), f32(f"{p}.attn.attn_sink"),
            comp, indexer,
        )
        is_hash = i < args.n_hash_layers
        moe = _MoE(
            lin(f"{p}.ffn.gate"),
            None if is_hash else f32(f"{p}.ffn.gate.bias"),
            place(f"{p}.ffn.gate.tid2eid", get(f"{p}.ffn.gate.tid2eid").to(torch.int64), device_now) if is_hash
            else None,
            lin(f"{p}.ffn.shared_experts.w1"), lin(f"{p}.ffn.shared_experts.w3"), lin(f"{p}.ffn.shared_experts.w2"),
        )
        layers.append(_Layer(
            i, kind, f32(f"{p}.attn_norm.weight"), f32(f"{p}.ffn_norm.weight"), hc(p, "attn"), hc(p, "ffn"), attn, moe,
            device_now, stage_of[1 + i],
        ))
        if on_layer is not None:
            on_layer(i + 1, args.n_layers)
    embed = place("embed.weight", get("embed.weight"), device)  # kept as stored: a lookup reads one row per token
    device_now = head_dev
    return DeepseekV4(
        args=args,
        embed=embed,
        head=lin("head"),
        norm=f32("norm.weight"),
        hc_head_fn=f32("hc_head_fn"),
        hc_head_base=f32("hc_head_base"),
        hc_head_scale=f32("hc_head_scale"),
        layers=layers,
        experts=experts,
        compute_dtype=compute_dtype,
        device=device,
        head_device=head_dev,
        embed_stage=stage_of[0],
        head_stage=stage_of[-1],
    )
