"""The exact tensor layout of an official DeepSeek-V4 checkpoint, derived from `config.json`.

One function, `v4_tensors(config)`, lists every tensor (name, shape, safetensors dtype, class) that the
official checkpoint holds for that config. The planner sums it, the loader validates against it and the
checkpoint writer writes it, so the three can never disagree. It reproduces the published inventories
exactly (Flash 69,187 tensors / 159,609,485,896 bytes; Pro 145,116 / 864,704,792,696).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I64": 8, "I32": 4, "U8": 1}
FP8_BLOCK = 128
FP4_BLOCK = 32


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


def _block(config: dict[str, Any], prefix: str, ratio: int, hash_layer: bool, pre: str) -> Iterator[TensorInfo]:
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
    if ratio:
        # CSA (ratio 4) keeps two overlapping series, so its compressor is twice as wide.
        width = 2 * hd if ratio == 4 else hd
        comp = pre + "compressor"
        yield TensorInfo(f"{a}.compressor.ape", (ratio, width), "F32", comp)
        yield TensorInfo(f"{a}.compressor.wkv.weight", (width, d), "BF16", comp)
        yield TensorInfo(f"{a}.compressor.wgate.weight", (width, d), "BF16", comp)
        yield TensorInfo(f"{a}.compressor.norm.weight", (hd,), "BF16", comp)
    if ratio == 4:
        idx = pre + "indexer"
        yield from _fp8(f"{a}.indexer.wq_b", idx_heads * idx_dim, lq, idx)
        yield TensorInfo(f"{a}.indexer.weights_proj.weight", (idx_heads, d), "BF16", idx)
        yield TensorInfo(f"{a}.indexer.compressor.ape", (ratio, 2 * idx_dim), "F32", idx)
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


def layer_ratio(config: dict[str, Any], layer: int) -> int:
    """Compression ratio of a layer (0 sliding-only, 4 CSA, 128 HCA); index n_layers.. belong to MTP."""
    ratios = config.get("compress_ratios") or []
    return int(ratios[layer]) if layer < len(ratios) else 0


def v4_tensors(config: dict[str, Any], *, include_mtp: bool = True) -> list[TensorInfo]:
    """Every tensor of an official-format V4 checkpoint for this config, in checkpoint order."""
    d = config["hidden_size"]
    vocab = config["vocab_size"]
    n_hc = config.get("hc_mult", 4)
    n_layers = config["num_hidden_layers"]
    n_hash = config.get("num_hash_layers", 0)
    out = [
        TensorInfo("embed.weight", (vocab, d), "BF16", "embed"),
        TensorInfo("head.weight", (vocab, d), "BF16", "head"),
        TensorInfo("norm.weight", (d,), "BF16", "norm"),
        TensorInfo("hc_head_fn", (n_hc, n_hc * d), "F32", "hc"),
        TensorInfo("hc_head_base", (n_hc,), "F32", "hc"),
        TensorInfo("hc_head_scale", (1,), "F32", "hc"),
    ]
    for layer in range(n_layers):
        out.extend(_block(config, f"layers.{layer}", layer_ratio(config, layer), layer < n_hash, ""))
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
            out.extend(_block(config, p, layer_ratio(config, n_layers + m), False, "mtp_"))
    return out
