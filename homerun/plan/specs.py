"""Parse a Hugging Face `config.json` into a typed, frozen `ModelSpec`, and resolve a model name to its config.

Covers the DeepSeek-V4 family (Flash, Pro, Flash-0731), DeepSeek-V3/R1, Qwen3-MoE, Mixtral-style and gpt-oss.
It also knows the KV-cache bytes per token of each architecture. It does not count tensor bytes (inventory.py) and
it does not decide placement (planner.py). Unknown keys in a HF config are ignored, missing required ones are a
`ConfigError` naming the key.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from homerun.errors import ConfigError, UnknownModelError
from homerun.models.decode_bytes import StaticShape, default_ramp, kv_page_tokens, paged_bytes, small_state_bytes

CARDS_DIR = Path(__file__).resolve().parent / "cards"

ARCHS = ("deepseek_v4", "deepseek_v3", "qwen3_moe", "mixtral", "gpt_oss")
# model_type -> arch family; DeepSeek-V2-style MLA configs (deepseek_v3, kimi_k2) share the V3 layout.
_MODEL_TYPES = {
    "deepseek_v4": "deepseek_v4",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "gpt_oss": "gpt_oss",
}
_ARCHITECTURES = {
    "DeepseekV4ForCausalLM": "deepseek_v4",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "GptOssForCausalLM": "gpt_oss",
}

KV_DTYPES = ("bf16", "fp8")


def most_tokens_within(bytes_for: Callable[[int], float], hi: int, budget_bytes: float) -> int:
    """The largest context in [0, hi] whose bytes_for (non-decreasing in tokens) is within budget_bytes: bisection."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bytes_for(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts the planner needs; `config` keeps the raw dict for exact tensor layouts."""

    name: str
    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    n_routed_experts: int
    experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int
    dense_layers: tuple[int, ...]  # layers with a dense MLP instead of MoE
    dense_intermediate_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    weight_format: str  # stored format of the non-expert linears: bf16 | fp8
    expert_format: str  # stored format of routed experts: bf16 | fp8 | fp4 | mxfp4
    mtp_layers: int
    sliding_window: int | None
    layer_types: tuple[str, ...]  # per layer: full | sliding | csa | hca | swa (V4 sliding-only)
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    csa_rate: int = 4  # V4: tokens per compressed KV entry of a CSA / HCA layer (the config's: compress_rates)
    hca_rate: int = 128
    has_dspark: bool = False
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def moe_layers(self) -> int:
        return self.num_layers - len(self.dense_layers)

    @property
    def routed_experts_total(self) -> int:
        """Routed experts in the main model (MTP excluded)."""
        return self.moe_layers * self.n_routed_experts

    @property
    def active_experts_per_token(self) -> int:
        return self.moe_layers * self.experts_per_tok

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("config")
        d["moe_layers"] = self.moe_layers
        d["routed_experts_total"] = self.routed_experts_total
        return d


def _req(cfg: Mapping[str, Any], key: str, source: str, *alts: str) -> Any:
    for k in (key, *alts):
        if cfg.get(k) is not None:
            return cfg[k]
    raise ConfigError(
        f"{source}: required key '{key}' is missing",
        hint="pass the model's own config.json; homerun reads it as published on the Hub",
    )


# No real config field comes near these; larger values are corrupt and would size loops and tuples without bound.
_MAX_FIELD = 2**48
_MAX_LAYERS = 100_000


def _int(cfg: Mapping[str, Any], key: str, source: str, *alts: str, lo: int = 0, hi: int = _MAX_FIELD) -> int:
    v = _req(cfg, key, source, *alts)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
        raise ConfigError(f"{source}: key '{key}' must be an integer, got {v!r}", hint="check the config.json")
    if not lo <= v <= hi:
        raise ConfigError(f"{source}: key '{key}' must be an integer in {lo}..{hi}, got {v!r}",
                          hint="check the config.json")
    return int(v)


def _opt_int(cfg: Mapping[str, Any], key: str, default: int, source: str) -> int:
    """An optional integer field: `default` when absent or null, else checked like a required one."""
    return default if cfg.get(key) is None else _int(cfg, key, source)


def detect_arch(cfg: Mapping[str, Any], source: str) -> str:
    mt = cfg.get("model_type")
    if isinstance(mt, str) and mt in _MODEL_TYPES:
        return _MODEL_TYPES[mt]
    archs = cfg.get("architectures") or []
    for a in archs if isinstance(archs, list) else []:
        if isinstance(a, str) and a in _ARCHITECTURES:
            return _ARCHITECTURES[a]
    raise ConfigError(
        f"{source}: model_type {mt!r} is not a supported MoE architecture",
        hint=f"supported: {', '.join(ARCHS)} (DeepSeek-V4 family, DeepSeek-V3/R1, Qwen3-MoE, Mixtral, gpt-oss)",
    )


def _quant_method(cfg: Mapping[str, Any]) -> str:
    qc = cfg.get("quantization_config") or {}
    if not isinstance(qc, Mapping):
        raise ConfigError(f"key 'quantization_config' must be an object, got {qc!r}", hint="check the config.json")
    return str(qc.get("quant_method") or "").lower()


def parse_config(cfg: Mapping[str, Any], name: str = "model", source: str | None = None) -> ModelSpec:
    """A HF config.json dict -> ModelSpec. `source` names the file in error messages."""
    src = source or name
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{src}: config must be a JSON object", hint="pass the model's config.json")
    arch = detect_arch(cfg, src)
    return {
        "deepseek_v4": _parse_v4,
        "deepseek_v3": _parse_v3,
        "qwen3_moe": _parse_qwen3,
        "mixtral": _parse_mixtral,
        "gpt_oss": _parse_gpt_oss,
    }[arch](cfg, name, src)


def _parse_v4(cfg: Mapping[str, Any], name: str, src: str) -> ModelSpec:
    from homerun.formats.v4_layout import attention_kinds, compress_rates, expert_dtype

    n_layers = _int(cfg, "num_hidden_layers", src, hi=_MAX_LAYERS)
    _quant_method(cfg)  # quantization_config must be an object before expert_dtype reads it
    # the runtime's definitions (ModelArgs reads the same functions): kinds from layer_types or compress_ratios codes,
    # the rates from the config's compress rates
    types = [{"sliding": "swa"}.get(k, k) for k in attention_kinds(cfg, src)]
    csa_rate, hca_rate = compress_rates(cfg, src)
    inter = _int(cfg, "moe_intermediate_size", src)
    return ModelSpec(
        name=name,
        arch="deepseek_v4",
        vocab_size=_int(cfg, "vocab_size", src),
        hidden_size=_int(cfg, "hidden_size", src),
        num_layers=n_layers,
        num_heads=_int(cfg, "num_attention_heads", src),
        num_kv_heads=_opt_int(cfg, "num_key_value_heads", 1, src),
        head_dim=_int(cfg, "head_dim", src),
        n_routed_experts=_int(cfg, "n_routed_experts", src),
        experts_per_tok=_int(cfg, "num_experts_per_tok", src),
        moe_intermediate_size=inter,
        n_shared_experts=_opt_int(cfg, "n_shared_experts", 1, src),
        dense_layers=(),
        dense_intermediate_size=0,
        max_position_embeddings=_int(cfg, "max_position_embeddings", src),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        weight_format="fp8",
        expert_format=expert_dtype(dict(cfg)),
        mtp_layers=_opt_int(cfg, "num_nextn_predict_layers", 0, src),
        sliding_window=_opt_int(cfg, "sliding_window", 128, src),
        layer_types=tuple(types),
        q_lora_rank=_int(cfg, "q_lora_rank", src),
        qk_rope_head_dim=_opt_int(cfg, "qk_rope_head_dim", 64, src),
        index_head_dim=_opt_int(cfg, "index_head_dim", 128, src),
        index_topk=_opt_int(cfg, "index_topk", 512, src),
        csa_rate=csa_rate,
        hca_rate=hca_rate,
        has_dspark=any(k.startswith("dspark_") for k in cfg),
        config=dict(cfg),
    )


def _parse_v3(cfg: Mapping[str, Any], name: str, src: str) -> ModelSpec:
    n_layers = _int(cfg, "num_hidden_layers", src, hi=_MAX_LAYERS)
    k_dense = _opt_int(cfg, "first_k_dense_replace", 0, src)
    fp8 = _quant_method(cfg) == "fp8"
    return ModelSpec(
        name=name,
        arch="deepseek_v3",
        vocab_size=_int(cfg, "vocab_size", src),
        hidden_size=_int(cfg, "hidden_size", src),
        num_layers=n_layers,
        num_heads=_int(cfg, "num_attention_heads", src),
        num_kv_heads=_opt_int(cfg, "num_key_value_heads", _int(cfg, "num_attention_heads", src), src),
        head_dim=_opt_int(cfg, "qk_nope_head_dim", 128, src) + _opt_int(cfg, "qk_rope_head_dim", 64, src),
        n_routed_experts=_int(cfg, "n_routed_experts", src),
        experts_per_tok=_int(cfg, "num_experts_per_tok", src),
        moe_intermediate_size=_int(cfg, "moe_intermediate_size", src),
        n_shared_experts=_opt_int(cfg, "n_shared_experts", 0, src),
        dense_layers=tuple(range(min(k_dense, n_layers))),
        dense_intermediate_size=_opt_int(cfg, "intermediate_size", 0, src),
        max_position_embeddings=_int(cfg, "max_position_embeddings", src),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        weight_format="fp8" if fp8 else "bf16",
        expert_format="fp8" if fp8 else "bf16",
        mtp_layers=_opt_int(cfg, "num_nextn_predict_layers", 0, src),
        sliding_window=None,
        layer_types=("full",) * n_layers,
        q_lora_rank=_opt_int(cfg, "q_lora_rank", 0, src),
        kv_lora_rank=_int(cfg, "kv_lora_rank", src),
        qk_rope_head_dim=_opt_int(cfg, "qk_rope_head_dim", 64, src),
        config=dict(cfg),
    )


def _gqa_common(cfg: Mapping[str, Any], src: str) -> dict[str, Any]:
    heads = _int(cfg, "num_attention_heads", src, lo=1)
    hidden = _int(cfg, "hidden_size", src)
    return dict(
        vocab_size=_int(cfg, "vocab_size", src),
        hidden_size=hidden,
        num_layers=_int(cfg, "num_hidden_layers", src, hi=_MAX_LAYERS),
        num_heads=heads,
        num_kv_heads=_opt_int(cfg, "num_key_value_heads", 0, src) or heads,
        head_dim=_opt_int(cfg, "head_dim", 0, src) or hidden // heads,
        max_position_embeddings=_int(cfg, "max_position_embeddings", src),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        config=dict(cfg),
    )


def _parse_qwen3(cfg: Mapping[str, Any], name: str, src: str) -> ModelSpec:
    c = _gqa_common(cfg, src)
    n = c["num_layers"]
    step = _opt_int(cfg, "decoder_sparse_step", 1, src) or 1
    mlp_only = cfg.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
        raise ConfigError(f"{src}: key 'mlp_only_layers' must be a list of layer numbers, got {mlp_only!r}",
                          hint="check the config.json")
    mlp_only = set(mlp_only)
    # HF Qwen3MoeDecoderLayer: MoE when not in mlp_only_layers and (layer + 1) % decoder_sparse_step == 0.
    dense = tuple(i for i in range(n) if i in mlp_only or (i + 1) % step != 0)
    window = _opt_int(cfg, "sliding_window", 0, src) if cfg.get("use_sliding_window") else None
    return ModelSpec(
        name=name,
        arch="qwen3_moe",
        n_routed_experts=_int(cfg, "num_experts", src, "num_local_experts"),
        experts_per_tok=_int(cfg, "num_experts_per_tok", src),
        moe_intermediate_size=_int(cfg, "moe_intermediate_size", src),
        n_shared_experts=0,
        dense_layers=dense,
        dense_intermediate_size=_opt_int(cfg, "intermediate_size", 0, src),
        weight_format="bf16",
        expert_format="bf16",
        mtp_layers=0,
        sliding_window=window or None,
        layer_types=("full",) * n,
        **c,
    )


def _parse_mixtral(cfg: Mapping[str, Any], name: str, src: str) -> ModelSpec:
    c = _gqa_common(cfg, src)
    inter = _int(cfg, "intermediate_size", src)
    window = _opt_int(cfg, "sliding_window", 0, src)
    return ModelSpec(
        name=name,
        arch="mixtral",
        n_routed_experts=_int(cfg, "num_local_experts", src),
        experts_per_tok=_int(cfg, "num_experts_per_tok", src),
        moe_intermediate_size=inter,  # Mixtral's intermediate_size is the per-expert width
        n_shared_experts=0,
        dense_layers=(),
        dense_intermediate_size=0,
        weight_format="bf16",
        expert_format="bf16",
        mtp_layers=0,
        sliding_window=window or None,
        layer_types=(("sliding" if window else "full"),) * c["num_layers"],
        **c,
    )


def _parse_gpt_oss(cfg: Mapping[str, Any], name: str, src: str) -> ModelSpec:
    c = _gqa_common(cfg, src)
    n = c["num_layers"]
    raw_types = cfg.get("layer_types") or ["sliding_attention", "full_attention"] * ((n + 1) // 2)
    if not isinstance(raw_types, list):
        raise ConfigError(f"{src}: key 'layer_types' must be a list, got {raw_types!r}", hint="check the config.json")
    types = tuple("sliding" if t == "sliding_attention" else "full" for t in raw_types[:n])
    return ModelSpec(
        name=name,
        arch="gpt_oss",
        n_routed_experts=_int(cfg, "num_local_experts", src, "num_experts"),
        experts_per_tok=_int(cfg, "num_experts_per_tok", src, "experts_per_token"),
        moe_intermediate_size=_int(cfg, "intermediate_size", src),
        n_shared_experts=0,
        dense_layers=(),
        dense_intermediate_size=0,
        weight_format="bf16",
        expert_format="mxfp4" if _quant_method(cfg) == "mxfp4" else "bf16",
        mtp_layers=0,
        sliding_window=_opt_int(cfg, "sliding_window", 0, src) or 128,
        layer_types=types,
        **c,
    )


# ---- KV cache ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KvLayout:
    """KV bytes that grow with context (per token) plus the constant part (sliding windows), in one dtype."""

    dtype: str
    bytes_per_token: float
    constant_bytes: int
    note: str
    # Paged stores (V4: the runtime's PagedRows): (count, rate, bytes per row) per kind of store, allocated in whole
    # pages of page_tokens tokens (the runtime's page policy, decode_bytes.kv_page_tokens); () for a flat per-token
    # charge.
    stores: tuple[tuple[int, int, int], ...] = ()
    page_tokens: int = 0

    def bytes_for(self, tokens: int) -> int:
        if self.stores:
            return paged_bytes(self.stores, tokens, self.page_tokens) + self.constant_bytes
        return int(math.ceil(self.bytes_per_token * tokens)) + self.constant_bytes

    def tokens_for(self, budget_bytes: float) -> int:
        if budget_bytes <= self.constant_bytes:
            return 0
        flat = int((budget_bytes - self.constant_bytes) // self.bytes_per_token)
        if not self.stores:
            return flat
        # whole pages are never less than the rows, and the rows fall short of the per-token charge by < 1 a store
        return most_tokens_within(self.bytes_for, flat + max(rate for _, rate, _ in self.stores), budget_bytes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_layout(spec: ModelSpec, kv_dtype: str = "bf16") -> KvLayout:
    """KV-cache bytes per token from the architecture (deepseek-v4.md §5 for V4, §8 for V3 MLA)."""
    if kv_dtype not in KV_DTYPES:
        raise ConfigError(f"kv dtype {kv_dtype!r} is not one of {', '.join(KV_DTYPES)}", hint="use --kv-dtype bf16|fp8")
    fp8 = kv_dtype == "fp8"
    if spec.arch == "deepseek_v4":
        hd, rope, idx = spec.head_dim, spec.qk_rope_head_dim, spec.index_head_dim
        # vLLM FP8 entry: nope dims in FP8, rope dims in BF16, 8 scale bytes; indexer key FP8 + 4-byte scale (§5.1).
        entry = (hd - rope) + 2 * rope + 8 if fp8 else 2 * hd
        idx_key = idx + 4 if fp8 else 2 * idx
        csa = spec.layer_types.count("csa")
        hca = spec.layer_types.count("hca")
        rc, rh = spec.csa_rate, spec.hca_rate
        per_token = csa * (entry + idx_key) / rc + hca * entry / rh
        # the runtime's pages (its default page for this model's ramp) and its small state (windows, open windows,
        # overlaps) in the compute dtype, bf16 on a GPU: homerun.models.decode_bytes, the runtime's formulas
        page = kv_page_tokens(max(rc, rh), default_ramp(spec.max_position_embeddings)[0])
        shape = StaticShape(spec.num_layers, csa, hca, hd, rope, idx, spec.sliding_window or 0, rc, rh)
        return KvLayout(kv_dtype, per_token, small_state_bytes(shape, 2),
                        f"{csa} CSA (1/{rc}) + {hca} HCA (1/{rh}) layers in pages of {page:,} tokens; sliding windows "
                        "and open windows constant", ((csa, rc, entry + idx_key), (hca, rh, entry)), page)
    if spec.arch == "deepseek_v3":
        elems = spec.kv_lora_rank + spec.qk_rope_head_dim
        per_layer = (spec.kv_lora_rank + 2 * spec.qk_rope_head_dim + 16) if fp8 else 2 * elems  # vLLM FP8 MLA: 656 B
        return KvLayout(kv_dtype, float(spec.num_layers * per_layer), 0, f"MLA: {elems} elements per layer per token")
    elt = 1 if fp8 else 2
    per_layer = 2 * spec.num_kv_heads * spec.head_dim * elt
    full = sum(1 for t in spec.layer_types if t == "full")
    sliding = spec.num_layers - full
    window = sliding * (spec.sliding_window or 0) * per_layer
    note = f"GQA: 2 x {spec.num_kv_heads} kv heads x {spec.head_dim} x {elt} B per layer"
    if sliding:
        note += f"; {sliding} sliding-window layers hold {spec.sliding_window} tokens (constant)"
    return KvLayout(kv_dtype, float(full * per_layer), window, note)


def kv_read_bytes_per_token(spec: ModelSpec, kv: KvLayout, depth_tokens: int) -> float:
    """KV bytes one decode step reads at a given context depth (V4 reads only top-k CSA entries + all indexer keys)."""
    if spec.arch == "deepseek_v4":
        fp8 = kv.dtype == "fp8"
        hd, rope, idx = spec.head_dim, spec.qk_rope_head_dim, spec.index_head_dim
        entry = (hd - rope) + 2 * rope + 8 if fp8 else 2 * hd
        idx_key = idx + 4 if fp8 else 2 * idx
        window = spec.sliding_window or 0
        csa = spec.layer_types.count("csa")
        hca = spec.layer_types.count("hca")
        entries = depth_tokens / spec.csa_rate
        csa_bytes = entries * idx_key + min(spec.index_topk, entries) * entry
        return spec.num_layers * window * entry + csa * csa_bytes + hca * depth_tokens / spec.hca_rate * entry
    return float(kv.bytes_for(depth_tokens))


# ---- resolving a model name ---------------------------------------------------------------------------------------


def card_index() -> dict[str, dict[str, Any]]:
    """repo id -> card entry (file, aliases) of the shipped model cards."""
    return json.loads((CARDS_DIR / "index.json").read_text())["cards"]


def find_card(model: str) -> tuple[str, Path] | None:
    """(repo_id, card path) for a repo id or alias, case-insensitive; None if there is no card."""
    key = model.strip().lower()
    for repo, entry in card_index().items():
        if key == repo.lower() or key in (a.lower() for a in entry.get("aliases", [])):
            return repo, CARDS_DIR / entry["file"]
    return None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found", hint="check the path") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})", hint="check the file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable UTF-8 JSON file ({exc})", hint="check the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object", hint="pass a config.json")
    return data


def load_card(model: str) -> ModelSpec:
    """ModelSpec from a shipped card (repo id or alias)."""
    hit = find_card(model)
    if hit is None:
        raise unknown_model(model)
    repo, path = hit
    return parse_config(read_json(path), name=repo, source=f"card {path.name}")


def unknown_model(model: str) -> UnknownModelError:
    names = ", ".join(card_index())
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    where = "offline (HF_HUB_OFFLINE=1), so the Hub was not asked" if offline else "not a card, a local path or a Hub repo"
    return UnknownModelError(
        f"unknown model '{model}': {where}",
        hint=f"use a local directory with config.json, or one of the shipped cards: {names}",
    )
