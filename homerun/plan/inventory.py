"""Byte inventory of a checkpoint by tensor class, from config.json alone or from safetensors headers.

Classes: embed, head, norm, hc (mHC), attn, compressor, indexer, router, shared, routed, dense (dense-MLP
layers), other; everything under an MTP / next-token-prediction block is counted once as `mtp`.
From config alone the tensor list is generated (V4: `homerun.formats.v4_layout.v4_tensors`, exact; others: the HF layout
and quantization_config rules). From headers it reads only the JSON header of each `.safetensors` file, locally or
from the Hub with `huggingface_hub.get_safetensors_metadata`, never the weights. It does not place anything.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import re
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from homerun.errors import CheckpointError, ConfigError, DownloadError, UnknownModelError
from homerun.plan.specs import ModelSpec, card_index, find_card, load_card, parse_config, read_json, unknown_model

DTYPE_BYTES = {
    "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8, "BOOL": 1,
}
CLASSES = ("embed", "head", "norm", "hc", "attn", "compressor", "indexer", "router", "shared", "routed", "dense", "other")
_SCALE_SUFFIXES = (".scale", "_scale_inv", "_scales", ".weight_scale")
_MAX_HEADER_BYTES = 100 * 2**20  # a real header is a few MB; anything larger is a corrupt or hostile file

Tensor = tuple[str, tuple[int, ...], str]  # (name, shape, safetensors dtype)


@dataclass(frozen=True)
class Inventory:
    """Bytes by class; `routed_expert_bytes` and `non_expert_bytes` cover the main model (MTP excluded)."""

    model: str
    source: str
    tensor_count: int
    total_bytes: int
    bytes_by_class: dict[str, int]
    params_by_class: dict[str, int]
    mtp_bytes: int
    routed_expert_bytes: int
    bytes_per_expert: int
    non_expert_bytes: int
    active_params_per_token: int
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tensor_bytes(shape: Iterable[int], dtype: str, name: str = "?") -> int:
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"tensor {name}: unknown safetensors dtype {dtype!r}", hint="a newer checkpoint format?")
    n = DTYPE_BYTES[dtype]
    for d in shape:
        n *= int(d)
    return n


def _params(name: str, shape: Iterable[int], dtype: str, cls: str) -> int:
    if name.endswith(_SCALE_SUFFIXES):
        return 0
    n = math.prod(int(d) for d in shape)
    # Packed FP4 (V4 I8 experts, gpt-oss U8 *_blocks): two weights per byte.
    if (cls == "routed" and dtype == "I8") or name.endswith("_blocks"):
        n *= 2
    return n


# ---- classification ----------------------------------------------------------------------------------------------

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def classify(spec: ModelSpec, name: str) -> str:
    """Tensor class of a checkpoint tensor name ('mtp' for anything in an MTP block)."""
    if spec.arch == "deepseek_v4":
        return _classify_v4(name)
    m = _HF_LAYER.match(name)
    if m and int(m.group(1)) >= spec.num_layers:
        return "mtp"
    if name.startswith(("mtp.", "model.mtp.")):
        return "mtp"
    return _classify_hf(name)


def _classify_v4(name: str) -> str:
    if name.startswith("mtp."):
        return "mtp"
    if name == "embed.weight":
        return "embed"
    if name == "head.weight":
        return "head"
    if name.startswith("hc_head") or ".hc_" in name:
        return "hc"
    if name == "norm.weight" or name.endswith(("attn_norm.weight", "ffn_norm.weight")):
        return "norm"
    for key, cls in ((".attn.indexer.", "indexer"), (".attn.compressor.", "compressor"), (".attn.", "attn"),
                     (".ffn.gate.", "router"), (".ffn.experts.", "routed"), (".ffn.shared_experts.", "shared")):
        if key in name:
            return cls
    return "other"


def _classify_hf(name: str) -> str:
    if "embed_tokens" in name:
        return "embed"
    if name.startswith("lm_head"):
        return "head"
    if name == "model.norm.weight" or "layernorm" in name or name.endswith("norm.weight"):
        return "norm"
    if ".self_attn." in name:
        return "attn"
    if "shared_expert_gate" in name:
        return "router"
    if "shared_expert" in name:
        return "shared"
    if ".experts." in name:
        return "routed"
    if ".mlp.gate." in name or ".block_sparse_moe.gate." in name or ".mlp.router." in name:
        return "router"
    if ".mlp." in name:
        return "dense"
    return "other"


# ---- building an inventory ---------------------------------------------------------------------------------------


def inventory_from_tensors(spec: ModelSpec, tensors: Iterable[Tensor], source: str,
                           notes: tuple[str, ...] = ()) -> Inventory:
    """Sum a tensor list (from headers or generated) into an Inventory."""
    by_class = {c: 0 for c in CLASSES}
    params = {c: 0 for c in CLASSES}
    by_class["mtp"] = params["mtp"] = 0
    count = 0
    for name, shape, dtype in tensors:
        cls = classify(spec, name)
        by_class[cls] += tensor_bytes(shape, dtype, name)
        params[cls] += _params(name, shape, dtype, "routed" if cls in ("routed", "mtp") else cls)
        count += 1
    total = sum(by_class.values())
    routed = by_class["routed"]
    n_exp = spec.routed_experts_total
    per_expert = routed // n_exp if n_exp else 0
    notes = tuple(notes)
    if n_exp and routed % n_exp:
        notes += (f"routed bytes {routed} do not split evenly over {n_exp} experts",)
    main_params = sum(v for k, v in params.items() if k not in ("mtp", "embed"))
    routed_params_per_expert = params["routed"] // n_exp if n_exp else 0
    active = main_params - params["routed"] + spec.active_experts_per_token * routed_params_per_expert
    return Inventory(
        model=spec.name,
        source=source,
        tensor_count=count,
        total_bytes=total,
        bytes_by_class={k: v for k, v in by_class.items() if v},
        params_by_class={k: v for k, v in params.items() if v},
        mtp_bytes=by_class["mtp"],
        routed_expert_bytes=routed,
        bytes_per_expert=per_expert,
        non_expert_bytes=total - routed - by_class["mtp"],
        active_params_per_token=active,
        notes=notes,
    )


def inventory_from_config(spec: ModelSpec) -> Inventory:
    """Inventory from config.json + quantization_config alone (no checkpoint needed)."""
    notes: tuple[str, ...] = ()
    if spec.arch == "deepseek_v4":
        from homerun.formats.v4_layout import v4_tensors

        # Flash-0731's DSpark stages are not the V4 MTP layout; the backbone is (deepseek-v4.md §3.12).
        mtp = not spec.has_dspark
        if spec.has_dspark:
            notes = ("DSpark speculative stages (shards 46-48) are not derived from config; backbone only",)
        tensors: Iterable[Tensor] = ((t.name, t.shape, t.dtype) for t in v4_tensors(dict(spec.config), include_mtp=mtp))
    else:
        tensors = synth_tensors(spec)
    return inventory_from_tensors(spec, tensors, "config.json (layout rules)", notes)


def _linear(name: str, out_f: int, in_f: int, fp8: bool) -> Iterator[Tensor]:
    if fp8:
        # DeepSeek-V3 FP8: e4m3 weight + fp32 scale_inv per 128x128 block (README_WEIGHTS.md, deepseek-v4.md §8).
        yield f"{name}.weight", (out_f, in_f), "F8_E4M3"
        yield f"{name}.weight_scale_inv", (-(-out_f // 128), -(-in_f // 128)), "F32"
    else:
        yield f"{name}.weight", (out_f, in_f), "BF16"


def synth_tensors(spec: ModelSpec) -> Iterator[Tensor]:
    """The HF-layout tensor list of a non-V4 checkpoint, from its config (names, shapes, stored dtypes)."""
    d, v = spec.hidden_size, spec.vocab_size
    yield "model.embed_tokens.weight", (v, d), "BF16"
    yield "model.norm.weight", (d,), "BF16"
    if not spec.tie_word_embeddings:
        yield "lm_head.weight", (v, d), "BF16"
    for layer in range(spec.num_layers + spec.mtp_layers):
        p = f"model.layers.{layer}"
        yield f"{p}.input_layernorm.weight", (d,), "BF16"
        yield f"{p}.post_attention_layernorm.weight", (d,), "BF16"
        yield from _attn(spec, p)
        yield from _ffn(spec, p, layer)
        if layer >= spec.num_layers:  # DeepSeek-V3 MTP block extras
            yield f"{p}.embed_tokens.weight", (v, d), "BF16"
            yield f"{p}.enorm.weight", (d,), "BF16"
            yield f"{p}.hnorm.weight", (d,), "BF16"
            yield f"{p}.eh_proj.weight", (d, 2 * d), "BF16"
            yield f"{p}.shared_head.norm.weight", (d,), "BF16"
            yield f"{p}.shared_head.head.weight", (v, d), "BF16"


def _attn(spec: ModelSpec, p: str) -> Iterator[Tensor]:
    d, h = spec.hidden_size, spec.num_heads
    a = f"{p}.self_attn"
    if spec.arch == "deepseek_v3":
        fp8 = spec.weight_format == "fp8"
        cfg = spec.config
        nope, rope = int(cfg.get("qk_nope_head_dim", 128)), spec.qk_rope_head_dim
        vdim, kvr = int(cfg.get("v_head_dim", 128)), spec.kv_lora_rank
        if spec.q_lora_rank:
            yield from _linear(f"{a}.q_a_proj", spec.q_lora_rank, d, fp8)
            yield f"{a}.q_a_layernorm.weight", (spec.q_lora_rank,), "BF16"
            yield from _linear(f"{a}.q_b_proj", h * (nope + rope), spec.q_lora_rank, fp8)
        else:
            yield from _linear(f"{a}.q_proj", h * (nope + rope), d, fp8)
        yield from _linear(f"{a}.kv_a_proj_with_mqa", kvr + rope, d, fp8)
        yield f"{a}.kv_a_layernorm.weight", (kvr,), "BF16"
        yield from _linear(f"{a}.kv_b_proj", h * (nope + vdim), kvr, fp8)
        yield from _linear(f"{a}.o_proj", d, h * vdim, fp8)
        return
    hd, kv = spec.head_dim, spec.num_kv_heads
    bias = spec.arch == "gpt_oss" or bool(spec.config.get("attention_bias"))
    for proj, out_f, in_f in (("q_proj", h * hd, d), ("k_proj", kv * hd, d), ("v_proj", kv * hd, d), ("o_proj", d, h * hd)):
        yield f"{a}.{proj}.weight", (out_f, in_f), "BF16"
        if bias:
            yield f"{a}.{proj}.bias", (out_f,), "BF16"
    if spec.arch == "qwen3_moe":
        yield f"{a}.q_norm.weight", (hd,), "BF16"
        yield f"{a}.k_norm.weight", (hd,), "BF16"
    if spec.arch == "gpt_oss":
        yield f"{a}.sinks", (h,), "BF16"


def _ffn(spec: ModelSpec, p: str, layer: int) -> Iterator[Tensor]:
    d, e, inter = spec.hidden_size, spec.n_routed_experts, spec.moe_intermediate_size
    fp8 = spec.expert_format == "fp8"
    if layer in spec.dense_layers:
        for proj, o, i in (("gate_proj", spec.dense_intermediate_size, d), ("up_proj", spec.dense_intermediate_size, d),
                           ("down_proj", d, spec.dense_intermediate_size)):
            yield from _linear(f"{p}.mlp.{proj}", o, i, spec.weight_format == "fp8")
        return
    if spec.arch == "mixtral":
        yield f"{p}.block_sparse_moe.gate.weight", (e, d), "BF16"
        for x in range(e):
            for w, o, i in (("w1", inter, d), ("w2", d, inter), ("w3", inter, d)):
                yield f"{p}.block_sparse_moe.experts.{x}.{w}.weight", (o, i), "BF16"
        return
    if spec.arch == "gpt_oss":
        yield f"{p}.mlp.router.weight", (e, d), "BF16"
        yield f"{p}.mlp.router.bias", (e,), "BF16"
        x = f"{p}.mlp.experts"
        if spec.expert_format == "mxfp4":
            # MXFP4: 32-wide blocks of 16 packed bytes + one e8m0 scale byte per block.
            yield f"{x}.gate_up_proj_blocks", (e, 2 * inter, d // 32, 16), "U8"
            yield f"{x}.gate_up_proj_scales", (e, 2 * inter, d // 32), "U8"
            yield f"{x}.down_proj_blocks", (e, d, inter // 32, 16), "U8"
            yield f"{x}.down_proj_scales", (e, d, inter // 32), "U8"
        else:
            yield f"{x}.gate_up_proj", (e, d, 2 * inter), "BF16"
            yield f"{x}.down_proj", (e, inter, d), "BF16"
        yield f"{x}.gate_up_proj_bias", (e, 2 * inter), "BF16"
        yield f"{x}.down_proj_bias", (e, d), "BF16"
        return
    yield f"{p}.mlp.gate.weight", (e, d), "BF16"
    if spec.arch == "deepseek_v3":
        yield f"{p}.mlp.gate.e_score_correction_bias", (e,), "F32"
    for x in range(e):
        for proj, o, i in (("gate_proj", inter, d), ("up_proj", inter, d), ("down_proj", d, inter)):
            yield from _linear(f"{p}.mlp.experts.{x}.{proj}", o, i, fp8)
    if spec.n_shared_experts:
        width = inter * spec.n_shared_experts
        for proj, o, i in (("gate_proj", width, d), ("up_proj", width, d), ("down_proj", d, width)):
            yield from _linear(f"{p}.mlp.shared_experts.{proj}", o, i, spec.weight_format == "fp8")


# ---- headers ----------------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> list[Tensor]:
    """Tensors listed in one .safetensors file's header (reads 8 + N bytes, never the data)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)", hint="re-download it")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} is implausible", hint="the file is corrupt")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard listed in the index is missing", hint="re-download the checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: safetensors header is not valid JSON", hint="the file is corrupt") from None
    return [(k, tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"]


def local_tensors(directory: Path) -> list[Tensor]:
    """All tensors of a local checkpoint directory, via model.safetensors.index.json when present."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(read_json(index).get("weight_map", {}).values()))
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
    out: list[Tensor] = []
    for name in files:
        out.extend(read_safetensors_header(directory / name))
    return out


def inventory_file_tensors(path: Path) -> list[Tensor]:
    """A shipped inventory (`[name, shape, dtype, class]` rows, optionally gzipped) read as if it were headers."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = json.load(f)
    return [(r[0], tuple(r[1]), r[2]) for r in rows]


def hub_tensors(repo_id: str, revision: str | None = None) -> list[Tensor]:
    """Tensor list from the Hub's safetensors headers (HTTP range requests; no weights are downloaded)."""
    from huggingface_hub import get_safetensors_metadata

    try:
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except Exception as exc:  # noqa: BLE001 - huggingface_hub raises many types; all mean "could not read headers"
        raise DownloadError(f"{repo_id}: could not read safetensors headers from the Hub ({type(exc).__name__})",
                            hint="check the repo id and your network, or use a shipped card offline") from None
    out: list[Tensor] = []
    for fmeta in meta.files_metadata.values():
        out.extend((name, tuple(t.shape), t.dtype) for name, t in fmeta.tensors.items())
    return out


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick DNS + TCP probe, so an offline machine fails in seconds instead of huggingface_hub's retries."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return True  # the cache answers offline lookups; let huggingface_hub do it
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def hub_config(repo_id: str, revision: str | None = None) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    if not _hub_reachable():
        raise UnknownModelError(f"{repo_id}: not a shipped card or local directory, and the Hub is unreachable",
                                hint="pass a local directory holding config.json, or one of the shipped cards: "
                                     + ", ".join(card_index()))
    try:
        path = hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as exc:  # noqa: BLE001
        raise UnknownModelError(f"{repo_id}: no config.json reachable on the Hub ({type(exc).__name__})",
                                hint="check the repo id, or use a local directory / shipped card") from None
    return read_json(Path(path))


# ---- resolving a model argument ---------------------------------------------------------------------------------


def resolve_model(model: str, *, hub: bool = False, revision: str | None = None) -> tuple[ModelSpec, Inventory]:
    """Spec + inventory for a local path, a shipped card (repo id or alias), or a Hub repo.

    Cards are used offline from config alone; `hub=True` reads the real headers from the Hub instead.
    """
    path = Path(model).expanduser()
    if path.exists():
        return _resolve_local(path)
    card = find_card(model)
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if card is not None and not hub:
        return _card_inventory(card[0])
    if offline or "/" not in model:
        if card is not None:
            raise ConfigError(f"{model}: --hub needs the network but HF_HUB_OFFLINE=1",
                              hint="drop --hub to plan from the shipped card")
        raise unknown_model(model)
    repo = card[0] if card else model
    spec = parse_config(hub_config(repo, revision), name=repo, source=f"{repo}/config.json")
    return spec, inventory_from_tensors(spec, hub_tensors(repo, revision), f"hub safetensors headers ({repo})")


@functools.lru_cache(maxsize=16)
def _card_inventory(repo: str) -> tuple[ModelSpec, Inventory]:
    """Cards never change at runtime; V4-Pro's 145k-tensor layout takes ~0.3 s, so compute it once per process."""
    spec = load_card(repo)
    return spec, inventory_from_config(spec)


def _resolve_local(path: Path) -> tuple[ModelSpec, Inventory]:
    if path.is_file():
        if path.suffix != ".json":
            raise ConfigError(f"{path}: expected a config.json or a checkpoint directory", hint="pass the model folder")
        spec = parse_config(read_json(path), name=path.parent.name or str(path), source=str(path))
        return spec, inventory_from_config(spec)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ConfigError(f"{path}: no config.json in this directory", hint="pass a Hugging Face checkpoint folder")
    spec = parse_config(read_json(cfg_path), name=path.name, source=str(cfg_path))
    tensors = local_tensors(path)
    if not tensors:
        return spec, inventory_from_config(spec)
    return spec, inventory_from_tensors(spec, tensors, f"safetensors headers ({path})")
