"""DeepSeek-V4 configuration: `ModelArgs` from a Hugging Face config.json, the attention kind of each layer, YaRN."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from homerun.errors import ConfigError
from homerun.formats.v4_layout import attention_kinds, compress_rates, expert_dtype, hash_layers

# a layer's attention kind (homerun.formats.v4_layout.attention_kinds reads them from a config)
LAYER_SLIDING, LAYER_CSA, LAYER_HCA = "sliding", "csa", "hca"
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
        kinds = attention_kinds(cfg)  # the planner's and the checkpoint layout's definition too
        if cfg.get("qk_rope_head_dim") is not None:
            rope_dim = int(cfg["qk_rope_head_dim"])
        elif cfg.get("partial_rotary_factor") is not None:
            rope_dim = int(head_dim * float(cfg["partial_rotary_factor"]))
        else:
            rope_dim = 64
        csa_rate, hca_rate = compress_rates(cfg)
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
            n_hash_layers=hash_layers(cfg),  # the checkpoint layout's too
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
            expert_dtype=expert_dtype(dict(cfg)),
        )
