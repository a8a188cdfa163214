"""Writer of official-format DeepSeek-V4 checkpoints with random weights, for any V4-shaped config.

`write_checkpoint(path, config)` writes what DeepSeek ships: `config.json`, sharded
`model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`, `generation_config.json`, and a tiny byte-level
BPE `tokenizer.json` + `tokenizer_config.json` holding the V4 special tokens. The tensor list comes from
`homerun.formats.v4_layout.v4_tensors` (official names, shapes, dtypes, MTP block, `tid2eid` for hash layers) and the weights
are quantized with the official formats of `homerun.formats.quant` (FP8 e4m3 + ue8m0 128x128, FP4 packed + ue8m0 1x32).

Shard headers are computed from the layout before any weight exists, then tensors are generated one at a time and
streamed to disk, so a real-shaped model (hidden 4096, 256 experts) never holds more than one tensor (large BF16
tables: one row chunk) in memory. Random init is chosen so the model is not degenerate (activations O(1), unsaturated
mHC, distinct router and lightning-indexer scores; see `_init_spec`). It does not train anything, and the weights
carry no meaning: these checkpoints are for tests and synthetic benchmarks only.

`tiny_config(kind)` gives the small presets used by the tests; `flash_shaped_config(layers)` gives V4-Flash's real
per-layer shapes.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from homerun.errors import ConfigError
from homerun.formats.quant import FP4_BLOCK, FP4_MAX, pow2_exponent, float_to_e8m0, quant_fp8
from homerun.formats.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer
from homerun.formats.v4_layout import TensorInfo, v4_tensors

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9
# The bytes a (config, seed) gives: raise it when they change, so that a cache of written checkpoints (bench's
# synthetic models) writes them again. 2: the scale exponents exact (homerun.formats.quant.pow2_exponent).
WRITER_VERSION = 2
_ROW_CHUNK_ELEMS = 1 << 24  # BF16 tables are generated in row chunks of at most 16M elements
_TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "I8": torch.int8,
    "I64": torch.int64,
}

_QUANT_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}

# Everything a V4 config.json holds apart from the shape fields; values are V4-Flash's.
_BASE_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hc_eps": 1e-6,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "max_position_embeddings": 1048576,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1,
    "qk_rope_head_dim": 64,
    "quantization_config": _QUANT_CONFIG,
    "rms_norm_eps": 1e-6,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "sliding_window": 128,
    "swiglu_limit": 10.0,
    "tie_word_embeddings": False,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "expert_dtype": "fp4",
}

# Shared by the tiny presets: hidden and expert widths are multiples of 128 so every FP8 scale block is full.
_TINY_SHAPES: dict[str, Any] = {
    "vocab_size": 512,
    "hidden_size": 256,
    "num_attention_heads": 4,
    "head_dim": 128,
    "q_lora_rank": 128,
    "o_lora_rank": 128,
    "o_groups": 2,
    "moe_intermediate_size": 128,
    "index_n_heads": 16,
    "index_head_dim": 128,
}

# Three presets that together cover sliding/CSA/HCA layers, hash and routed MoE, 8-16 experts, top-2..4, and a CSA
# top-k (16-32) far below the ~150 entries of a 600-token prompt. The YaRN rope values are the real ones (factor 16,
# original 65536): YaRN rescales the low-frequency rope pairs at every position, so it is active at short lengths.
TINY_PRESETS: dict[str, dict[str, Any]] = {
    # one layer of each kind: SWA (hash MoE), CSA, HCA; MTP block sliding
    "mixed": {
        "num_hidden_layers": 3,
        "compress_ratios": [0, 4, 128, 0],
        "num_hash_layers": 1,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "index_topk": 16,
    },
    # two CSA layers (first one hash-routed), more experts, a short sliding window so it rolls many times
    "csa": {
        "num_hidden_layers": 2,
        "compress_ratios": [4, 4, 0],
        "num_hash_layers": 1,
        "n_routed_experts": 16,
        "num_experts_per_tok": 4,
        "index_topk": 32,
        "sliding_window": 64,
        "routed_scaling_factor": 2.5,
    },
    # V4-Pro-like schedule: HCA first, then CSA, HCA; two hash layers
    "hca": {
        "num_hidden_layers": 3,
        "compress_ratios": [128, 4, 128, 0],
        "num_hash_layers": 2,
        "n_routed_experts": 8,
        "num_experts_per_tok": 3,
        "index_topk": 24,
    },
}

# V4-Flash's real shape fields (flash-config.json).
_FLASH_SHAPES: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 4096,
    "num_attention_heads": 64,
    "head_dim": 512,
    "q_lora_rank": 1024,
    "o_lora_rank": 1024,
    "o_groups": 8,
    "moe_intermediate_size": 2048,
    "n_routed_experts": 256,
    "num_experts_per_tok": 6,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "index_topk": 512,
    "num_hash_layers": 3,
}


def tiny_config(kind: str = "mixed", **overrides: Any) -> dict[str, Any]:
    """A tiny V4 config.json dict: `kind` is one of TINY_PRESETS; keyword overrides replace fields."""
    if kind not in TINY_PRESETS:
        raise ConfigError(f"unknown tiny config {kind!r}", hint=f"choose one of {', '.join(TINY_PRESETS)}")
    cfg = {**copy.deepcopy(_BASE_CONFIG), **_TINY_SHAPES, **copy.deepcopy(TINY_PRESETS[kind])}
    cfg.update(copy.deepcopy(overrides))
    return cfg


def flash_shaped_config(num_hidden_layers: int = 1, **overrides: Any) -> dict[str, Any]:
    """V4-Flash's real per-layer shapes with few layers: layer 0.. follow Flash's schedule shifted to start at CSA
    (so one layer is CSA, two are CSA + HCA); the first min(layers, 3) are hash layers as in Flash."""
    ratios = [4 if i % 2 == 0 else 128 for i in range(num_hidden_layers)] + [0]
    cfg = {**copy.deepcopy(_BASE_CONFIG), **_FLASH_SHAPES, "num_hidden_layers": num_hidden_layers}
    cfg["compress_ratios"] = ratios
    cfg["num_hash_layers"] = min(num_hidden_layers, 3)
    cfg.update(copy.deepcopy(overrides))
    return cfg


# ---------------------------------------------------------------------------------------------------- random init


def _generator(seed: int, name: str) -> torch.Generator:
    # One stream per tensor name: values do not depend on shard layout, chunking of other tensors or include_mtp.
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def _init_spec(name: str, shape: tuple[int, ...], config: dict[str, Any]) -> tuple[str, float, float]:
    """(kind, mean, std) of the random init for one (logical) tensor; kind is normal, uniform or ones_plus.

    Linear weights get std gain/sqrt(fan_in) so every projection keeps O(1) activations; sublayer outputs (wo_b, w2)
    get gain 0.5 so the residual streams grow slowly. mHC fn is small so the sigmoid/softmax/Sinkhorn inputs stay
    around +-0.5 (unsaturated). Router logits are unit-variance so expert scores are distinct; the lightning
    indexer gets 16 heads of unit-variance q.K, so almost no index score is an exact ReLU zero (the section 3.7
    top-k tie pitfall)."""
    fan_in = shape[-1] if len(shape) > 1 else 1
    d = config["hidden_size"]
    n_hc = config.get("hc_mult", 4)
    if name.endswith("norm.weight"):
        return "ones_plus", 1.0, 0.1
    if name == "embed.weight":
        return "normal", 0.0, 1.0
    if name == "head.weight":
        return "normal", 0.0, 2.0 / math.sqrt(d)
    if "hc_" in name and name.endswith("_fn"):
        return "normal", 0.0, 0.5 / math.sqrt(n_hc * d)
    if "hc_" in name and name.endswith("_base"):
        return "normal", 0.0, 0.5
    if "hc_" in name and name.endswith("_scale"):
        return "uniform", 0.5, 1.5
    if name.endswith("attn_sink"):
        return "normal", 0.0, 1.0
    if name.endswith(".ape"):
        return "normal", 0.0, 0.5
    if name.endswith("gate.bias"):
        return "normal", 0.0, 0.05
    gain = 0.5 if (name.endswith("wo_b.weight") or name.endswith("w2.weight")) else 1.0
    return "normal", 0.0, gain / math.sqrt(fan_in)


def _sample(g: torch.Generator, shape: tuple[int, ...], spec: tuple[str, float, float]) -> torch.Tensor:
    kind, a, b = spec
    if kind == "uniform":
        return torch.rand(shape, generator=g) * (b - a) + a
    x = torch.randn(shape, generator=g) * b
    return x + a


_FP4_THRESHOLDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])


def _quant_fp4_fast(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same bytes as `homerun.formats.quant.quant_fp4` (nearest E2M1 magnitude, ties to the lower code), ~9x faster: the
    midpoints between E2M1 magnitudes are compared directly instead of an argmin over 8 distances. Needed to write
    a 256-expert layer in minutes; tests/test_quant.py checks it against quant_fp4 byte for byte."""
    out_f, in_f = w.shape
    if in_f % FP4_BLOCK:
        raise ValueError(f"FP4 input width {in_f} is not a multiple of {FP4_BLOCK}")
    blocks = w.to(torch.float32).view(out_f, in_f // FP4_BLOCK, FP4_BLOCK)
    exp = pow2_exponent(blocks.abs().amax(dim=-1), FP4_MAX)
    x = (blocks / torch.exp2(exp).unsqueeze(-1)).reshape(out_f, in_f)
    code = torch.bucketize(x.abs(), _FP4_THRESHOLDS).to(torch.uint8)
    code = code | ((x < 0) & (code > 0)).to(torch.uint8) << 3
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8)
    return packed, float_to_e8m0(exp)


def _tid2eid(g: torch.Generator, vocab: int, n_experts: int, k: int) -> torch.Tensor:
    # k distinct expert ids per token: the first k of a random permutation of the experts.
    return torch.rand((vocab, n_experts), generator=g).argsort(dim=1)[:, :k].contiguous().to(torch.int64)


class _TensorFactory:
    """Makes each tensor of the layout on demand. A quantized weight and its scale are made together; the scale
    waits in `_pending` until its turn (they are adjacent in the layout, so at most one waits)."""

    def __init__(self, config: dict[str, Any], seed: int) -> None:
        self.config = config
        self.seed = seed
        self._pending: dict[str, torch.Tensor] = {}

    def chunks(self, info: TensorInfo) -> Iterator[torch.Tensor]:
        """The tensor's data in row order, as one or more contiguous tensors of the stored dtype."""
        if info.name in self._pending:
            yield self._pending.pop(info.name)
            return
        g = _generator(self.seed, info.name)
        if info.dtype in ("F8_E4M3", "I8"):
            yield self._quantized(info, g)
        elif info.dtype == "I64":
            yield _tid2eid(g, info.shape[0], self.config["n_routed_experts"], info.shape[1])
        else:
            spec = _init_spec(info.name, info.shape, self.config)
            dtype = _TORCH_DTYPES[info.dtype]
            if len(info.shape) == 2 and info.shape[0] * info.shape[1] > _ROW_CHUNK_ELEMS:
                rows = max(1, _ROW_CHUNK_ELEMS // info.shape[1])
                for start in range(0, info.shape[0], rows):
                    n = min(rows, info.shape[0] - start)
                    yield _sample(g, (n, info.shape[1]), spec).to(dtype)
            else:
                yield _sample(g, info.shape, spec).to(dtype)

    def _quantized(self, info: TensorInfo, g: torch.Generator) -> torch.Tensor:
        base = info.name.removesuffix(".weight")
        if info.dtype == "I8":
            shape = (info.shape[0], info.shape[1] * 2)  # logical [out, in]; stored two codes per byte
            w, s = _quant_fp4_fast(_sample(g, shape, _init_spec(info.name, shape, self.config)))
        else:
            w, s = quant_fp8(_sample(g, info.shape, _init_spec(info.name, info.shape, self.config)))
        self._pending[f"{base}.scale"] = s
        return w


# ---------------------------------------------------------------------------------------------------- file writing


def _plan_shards(tensors: list[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(tensors: list[TensorInfo]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_shard(path: Path, tensors: list[TensorInfo], factory: _TensorFactory, on_tensor: Callable[[TensorInfo], None]) -> None:
    with open(path, "wb") as f:
        f.write(_header_bytes(tensors))
        for t in tensors:
            written = 0
            for chunk in factory.chunks(t):
                data = chunk.contiguous().view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            if written != t.nbytes:  # a layout/generator mismatch would silently corrupt every later offset
                raise AssertionError(f"{t.name}: generated {written} bytes, layout says {t.nbytes}")
            on_tensor(t)


def write_checkpoint(
    path: str | Path,
    config: dict[str, Any],
    *,
    seed: int = 0,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    include_mtp: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> Path:
    """Write a complete official-format checkpoint directory with random weights; returns its path.

    `progress(done_bytes, total_bytes, tensor_name)` is called after each tensor. `include_mtp=False` leaves the
    `mtp.*` block out (as a checkpoint pruned to save memory would be). The tokenizer has `tokenizer_vocab_size()`
    tokens; `config["vocab_size"]` may be larger (ids past the tokenizer decode to nothing). An existing checkpoint
    in `path` is replaced (its shards and index are deleted first, so no stale shard survives)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model-*-of-*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    config = copy.deepcopy(config)
    tensors = v4_tensors(config, include_mtp=include_mtp)
    shards = _plan_shards(tensors, max_shard_bytes)
    total_bytes = sum(t.nbytes for t in tensors)
    n = len(shards)
    weight_map: dict[str, str] = {}
    factory = _TensorFactory(config, seed)
    done = [0]

    def on_tensor(t: TensorInfo) -> None:
        done[0] += t.nbytes
        if progress is not None:
            progress(done[0], total_bytes, t.name)

    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        _write_shard(out / fname, shard, factory, on_tensor)
        weight_map.update({t.name: fname for t in shard})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    _dump_json(out / "model.safetensors.index.json", index)
    _dump_json(out / "config.json", config)
    _dump_json(out / "generation_config.json", generation_config(config))
    write_tokenizer(out)
    return out


def generation_config(config: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek's generation_config.json: sample at temperature 1.0, top_p 1.0 (the model card's recommendation)."""
    return {
        "_from_model_config": True,
        "bos_token_id": config.get("bos_token_id", 0),
        "eos_token_id": config.get("eos_token_id", 1),
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
    }


def write_tokenizer(out: Path) -> None:
    """tokenizer.json (tiny byte-level BPE with the V4 special tokens) and a tokenizer_config.json like DeepSeek's."""
    tok = build_tiny_tokenizer()
    tok.save(str(out / "tokenizer.json"))

    def added(content: str) -> dict[str, Any]:
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    bos, eos = SPECIAL_TOKENS[0], SPECIAL_TOKENS[1]
    _dump_json(out / "tokenizer_config.json", {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": added(bos),
        "eos_token": added(eos),
        "pad_token": added(eos),
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": 1048576,
        "unk_token": None,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })


def tokenizer_vocab_size() -> int:
    """Number of tokens in the tokenizer the writer ships (the tiny presets' vocab_size)."""
    return build_tiny_tokenizer().get_vocab_size()


def checkpoint_bytes(config: dict[str, Any], *, include_mtp: bool = True) -> int:
    """Tensor payload bytes the writer will produce for this config (metadata.total_size)."""
    return sum(t.nbytes for t in v4_tensors(config, include_mtp=include_mtp))


def _dump_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
