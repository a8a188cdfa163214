"""The exact tensor layout of an official DeepSeek-V4 checkpoint, derived from `config.json`.

One function, `v4_tensors(config)`, lists every tensor (name, shape, safetensors dtype, class) that the
official checkpoint holds for that config. The planner sums it, the loader validates against it and the
checkpoint writer writes it, so the three can never disagree. It reproduces the published inventories
exactly (Flash 69,187 tensors / 159,609,485,896 bytes; Pro 145,116 / 864,704,792,696).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from homerun.errors import ConfigError

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I64": 8, "I32": 4, "U8": 1}
FP8_BLOCK = 128
FP4_BLOCK = 32
# A V4 layer's attention kind by its official compress_ratios code and by transformers' layer_types name; the
# compressed kinds' default tokens per KV entry (`compress_rates` reads a config's own)
KIND_OF_RATIO = {0: "sliding", 4: "csa", 128: "hca"}
KIND_OF_LAYER_TYPE = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
                      "heavily_compressed_attention": "hca"}
DEFAULT_RATES = {"csa": 4, "hca": 128}
DEFAULT_HASH_LAYERS = 3  # where a config names none (transformers' DeepseekV4Config default)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string
    cls: str  # embed, head, norm, hc, attn, compressor, indexer, router, shared, routed; "mtp_" prefix for MTP

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fp8(name: str, out_f: int, in_f: int, cls: str) -> Iterator[TensorInfo]:
    yield TensorInfo(f"{name}.weight", (out_f, in_f), "F8_E4M3", cls)
    yield TensorInfo(f"{name}.scale", (_cdiv(out_f, FP8_BLOCK), _cdiv(in_f, FP8_BLOCK)), "F8_E8M0", cls)


def _fp4(name: str, out_f: int, in_f: int, cls: str) -> Iterator[TensorInfo]:
    # Two E2M1 codes per byte along the input axis; one ue8m0 scale per 1x32 block.
    yield TensorInfo(f"{name}.weight", (out_f, in_f // 2), "I8", cls)
    yield TensorInfo(f"{name}.scale", (out_f, in_f // FP4_BLOCK), "F8_E8M0", cls)


def expert_dtype(config: dict[str, Any]) -> str:
    """'fp4' or 'fp8': where the routed experts' format is declared (top level or inside quantization_config)."""
    qc = config.get("quantization_config") or {}
    return str(config.get("expert_dtype") or qc.get("expert_dtype") or "fp8")


def _expert(prefix: str, e: int, d: int, inter: int, fmt: str, cls: str) -> Iterator[TensorInfo]:
    lin = _fp4 if fmt == "fp4" else _fp8
    yield from lin(f"{prefix}.ffn.experts.{e}.w1", inter, d, cls)
    yield from lin(f"{prefix}.ffn.experts.{e}.w3", inter, d, cls)
    yield from lin(f"{prefix}.ffn.experts.{e}.w2", d, inter, cls)


def _block(config: dict[str, Any], prefix: str, kind: str, hash_layer: bool, pre: str) -> Iterator[TensorInfo]:
    d = config["hidden_size"]
    n_hc = config.get("hc_mult", 4)
    heads = config["num_attention_heads"]
    hd = config["head_dim"]
    lq = config["q_lora_rank"]
    groups = config["o_groups"]
    lo = config["o_lora_rank"]
    n_exp = config["n_routed_experts"]
    inter = config["moe_intermediate_size"]
    idx_heads = config.get("index_n_heads", 64)
    idx_dim = config.get("index_head_dim", 128)
    mix = (2 + n_hc) * n_hc
    for site in ("attn", "ffn"):
        yield TensorInfo(f"{prefix}.hc_{site}_fn", (mix, n_hc * d), "F32", pre + "hc")
        yield TensorInfo(f"{prefix}.hc_{site}_base", (mix,), "F32", pre + "hc")
        yield TensorInfo(f"{prefix}.hc_{site}_scale", (3,), "F32", pre + "hc")
    yield TensorInfo(f"{prefix}.attn_norm.weight", (d,), "BF16", pre + "norm")
    yield TensorInfo(f"{prefix}.ffn_norm.weight", (d,), "BF16", pre + "norm")
    a = f"{prefix}.attn"
    attn = pre + "attn"
    yield TensorInfo(f"{a}.attn_sink", (heads,), "F32", attn)
    yield from _fp8(f"{a}.wq_a", lq, d, attn)
    yield TensorInfo(f"{a}.q_norm.weight", (lq,), "BF16", attn)
    yield from _fp8(f"{a}.wq_b", heads * hd, lq, attn)
    yield from _fp8(f"{a}.wkv", hd, d, attn)
    yield TensorInfo(f"{a}.kv_norm.weight", (hd,), "BF16", attn)
    yield from _fp8(f"{a}.wo_a", groups * lo, heads * hd // groups, attn)
    yield from _fp8(f"{a}.wo_b", d, groups * lo, attn)
    if kind != "sliding":
        # CSA keeps two overlapping series, so its compressor is twice as wide; ape: one row per token of an entry.
        width = 2 * hd if kind == "csa" else hd
        rate = compress_rates(config)[0 if kind == "csa" else 1]
        comp = pre + "compressor"
        yield TensorInfo(f"{a}.compressor.ape", (rate, width), "F32", comp)
        yield TensorInfo(f"{a}.compressor.wkv.weight", (width, d), "BF16", comp)
        yield TensorInfo(f"{a}.compressor.wgate.weight", (width, d), "BF16", comp)
        yield TensorInfo(f"{a}.compressor.norm.weight", (hd,), "BF16", comp)
    if kind == "csa":
        idx = pre + "indexer"
        yield from _fp8(f"{a}.indexer.wq_b", idx_heads * idx_dim, lq, idx)
        yield TensorInfo(f"{a}.indexer.weights_proj.weight", (idx_heads, d), "BF16", idx)
        yield TensorInfo(f"{a}.indexer.compressor.ape", (rate, 2 * idx_dim), "F32", idx)
        yield TensorInfo(f"{a}.indexer.compressor.wkv.weight", (2 * idx_dim, d), "BF16", idx)
        yield TensorInfo(f"{a}.indexer.compressor.wgate.weight", (2 * idx_dim, d), "BF16", idx)
        yield TensorInfo(f"{a}.indexer.compressor.norm.weight", (idx_dim,), "BF16", idx)
    router = pre + "router"
    yield TensorInfo(f"{prefix}.ffn.gate.weight", (n_exp, d), "BF16", router)
    if hash_layer:
        yield TensorInfo(f"{prefix}.ffn.gate.tid2eid", (config["vocab_size"], config["num_experts_per_tok"]), "I64", router)
    else:
        yield TensorInfo(f"{prefix}.ffn.gate.bias", (n_exp,), "F32", router)
    fmt = expert_dtype(config)
    for e in range(n_exp):
        yield from _expert(prefix, e, d, inter, fmt, pre + "routed")
    shared = pre + "shared"
    yield from _fp8(f"{prefix}.ffn.shared_experts.w1", inter, d, shared)
    yield from _fp8(f"{prefix}.ffn.shared_experts.w3", inter, d, shared)
    yield from _fp8(f"{prefix}.ffn.shared_experts.w2", d, inter, shared)


def compress_rates(config: Mapping[str, Any], source: str = "config.json") -> tuple[int, int]:
    """(CSA, HCA) tokens per compressed KV entry: compress_rate_csa / compress_rate_hca, else transformers'
    compress_rates by layer type, else 4 / 128 (deepseek-v4.md section 5). The one definition: the runtime's
    ModelArgs, the planner's ModelSpec and this layout (the compressors' ape rows) read them here."""
    rates = config.get("compress_rates") or {}
    if not isinstance(rates, Mapping):
        raise ConfigError(f"{source}: compress_rates must be an object, got {rates!r}",
                          hint='e.g. {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}')
    out = []
    for key, layer_type in (("compress_rate_csa", "compressed_sparse_attention"),
                            ("compress_rate_hca", "heavily_compressed_attention")):
        given = config.get(key) is not None
        v = config[key] if given else rates.get(layer_type, DEFAULT_RATES[KIND_OF_LAYER_TYPE[layer_type]])
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            field = key if given else f"compress_rates[{layer_type!r}]"
            raise ConfigError(f"{source}: {field} must be a positive integer, got {v!r}", hint="check the config")
        out.append(v)
    return out[0], out[1]


def attention_kinds(config: Mapping[str, Any], source: str = "config.json") -> tuple[str, ...]:
    """Each main layer's attention kind, "sliding" | "csa" | "hca": from transformers' layer_types where given, else
    the official compress_ratios, whose entries are kind codes (0 / 4 / 128, read as transformers reads them; the
    rates are `compress_rates`)."""
    n = int(config["num_hidden_layers"])
    if config.get("layer_types"):
        types = config["layer_types"]
        if not isinstance(types, list) or len(types) < n or any(not isinstance(t, str) or t not in KIND_OF_LAYER_TYPE
                                                                for t in types[:n]):
            raise ConfigError(f"{source}: layer_types must name one of {', '.join(KIND_OF_LAYER_TYPE)} for each of "
                              f"the {n} layers, got {types!r}", hint="check layer_types")
        return tuple(KIND_OF_LAYER_TYPE[t] for t in types[:n])
    ratios = config.get("compress_ratios")
    if not isinstance(ratios, list) or len(ratios) < n:
        raise ConfigError(f"{source}: compress_ratios must list 0, 4 or 128 for each of the {n} layers, got {ratios!r}",
                          hint="compress_ratios needs one entry (0, 4 or 128) per layer")
    bad = [r for r in ratios[:n] if isinstance(r, bool) or not isinstance(r, (int, float)) or r not in KIND_OF_RATIO]
    if bad:
        raise ConfigError(f"{source}: compress_ratios values must be 0, 4 or 128, got {bad}",
                          hint="check compress_ratios")
    return tuple(KIND_OF_RATIO[int(r)] for r in ratios[:n])


def hash_layers(config: Mapping[str, Any], source: str = "config.json") -> int:
    """How many leading layers route by token id (hash MoE, gate.tid2eid instead of gate.bias): transformers'
    mlp_layer_types where given (the hash_moe entries must lead), else num_hash_layers, else 3 (transformers'
    default); at most the layer count."""
    n = int(config["num_hidden_layers"])
    types = config.get("mlp_layer_types")
    if types:
        if not isinstance(types, list) or any(not isinstance(t, str) for t in types):
            raise ConfigError(f"{source}: mlp_layer_types must be a list of strings, got {types!r}",
                              hint='e.g. ["hash_moe", "hash_moe", "hash_moe", "moe", ...]')
        k = next((i for i, t in enumerate(types) if t != "hash_moe"), len(types))
        if "hash_moe" in types[k:]:
            raise ConfigError(f"{source}: mlp_layer_types has a hash_moe layer after a routed one (layer "
                              f"{types.index('hash_moe', k)})", hint="hash-routed layers are the leading layers")
        return min(n, k)
    v = config.get("num_hash_layers")
    v = DEFAULT_HASH_LAYERS if v is None else v
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{source}: num_hash_layers must be a non-negative integer, got {v!r}", hint="check the config")
    return min(n, v)


def layer_ratio(config: dict[str, Any], layer: int) -> int:
    """The official compress_ratios code of a layer (0 sliding-only, 4 CSA, 128 HCA); index n_layers.. belong to MTP
    (0 when the list stops short). A kind code, not the rate: `compress_rates`."""
    ratios = config.get("compress_ratios") or []
    if layer >= len(ratios):
        return 0
    r = ratios[layer]
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise ConfigError(f"config.json: compress_ratios[{layer}] must be 0, 4 or 128, got {r!r}",
                          hint="check compress_ratios")
    return int(r)


def v4_tensors(config: dict[str, Any], *, include_mtp: bool = True) -> list[TensorInfo]:
    """Every tensor of an official-format V4 checkpoint for this config, in checkpoint order."""
    d = config["hidden_size"]
    vocab = config["vocab_size"]
    n_hc = config.get("hc_mult", 4)
    n_layers = config["num_hidden_layers"]
    n_hash = hash_layers(config)
    out = [
        TensorInfo("embed.weight", (vocab, d), "BF16", "embed"),
        TensorInfo("head.weight", (vocab, d), "BF16", "head"),
        TensorInfo("norm.weight", (d,), "BF16", "norm"),
        TensorInfo("hc_head_fn", (n_hc, n_hc * d), "F32", "hc"),
        TensorInfo("hc_head_base", (n_hc,), "F32", "hc"),
        TensorInfo("hc_head_scale", (1,), "F32", "hc"),
    ]
    for layer, kind in enumerate(attention_kinds(config)):
        out.extend(_block(config, f"layers.{layer}", kind, layer < n_hash, ""))
    if include_mtp:
        for m in range(config.get("num_nextn_predict_layers", 0)):
            p = f"mtp.{m}"
            out.extend(_fp8(f"{p}.e_proj", d, d, "mtp_"))
            out.extend(_fp8(f"{p}.h_proj", d, d, "mtp_"))
            out += [TensorInfo(f"{p}.{n}.weight", (d,), "BF16", "mtp_") for n in ("enorm", "hnorm", "norm")]
            out += [
                TensorInfo(f"{p}.hc_head_fn", (n_hc, n_hc * d), "F32", "mtp_"),
                TensorInfo(f"{p}.hc_head_base", (n_hc,), "F32", "mtp_"),
                TensorInfo(f"{p}.hc_head_scale", (1,), "F32", "mtp_"),
            ]
            code = layer_ratio(config, n_layers + m)
            if code not in KIND_OF_RATIO:
                raise ConfigError(f"config.json: compress_ratios[{n_layers + m}] (MTP block {m}) = {code}, expected 0, "
                                  "4 or 128", hint="check compress_ratios")
            out.extend(_block(config, p, KIND_OF_RATIO[code], False, "mtp_"))
    return out
