"""Open an official-format DeepSeek-V4 checkpoint directory: validate it completely, then hand out its tensors as
zero-copy views of the memory-mapped shards, in their stored dtypes.

`open_checkpoint(path)` reads `config.json` (fields checked, `ConfigError` naming the field), the index and every
shard header (our own parser, so a truncated shard is named before anything maps it), and compares the complete
set of names, shapes and dtypes with `homerun.formats.v4_layout.v4_tensors(config)`. Every problem is a `CheckpointError`
naming the tensor and the file. `Checkpoint.get(name)` then returns the stored tensor (float8_e4m3fn,
float8_e8m0fnu, int8, bfloat16, float32, int64) backed by the file's page cache through safetensors' mmap: nothing
is copied into anonymous memory, so routed experts stay packed and are only paged in when used.

It does no math (no dequantization, no placement) and never moves tensors to a device. Checkpoint-name and
config quirks live in `QUIRKS` below and nowhere else.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from homerun.errors import CheckpointError, ConfigError
from homerun.formats.v4_layout import DTYPE_BYTES, TensorInfo, expert_dtype, v4_tensors
from homerun.formats.experts import ExpertWeights

INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a larger value means a corrupt or non-safetensors file
_HINT_REDOWNLOAD = "re-download the checkpoint (`homerun download REPO`) or rewrite it"


# ------------------------------------------------------------------------------------------------- config checks

_POSITIVE_INT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "q_lora_rank",
    "o_lora_rank", "o_groups", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
)
_OPTIONAL_INT_FIELDS = {  # field -> minimum value
    "index_n_heads": 1, "index_head_dim": 1, "index_topk": 1, "hc_mult": 1, "hc_sinkhorn_iters": 1,
    "qk_rope_head_dim": 0, "sliding_window": 1, "num_hash_layers": 0, "num_nextn_predict_layers": 0,
}


def _bad(field: str, value: Any, why: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: field {field!r} = {value!r} {why}", hint="fix config.json or re-download it")


def validate_config(config: dict[str, Any], source: str = "config.json") -> None:
    """Raise ConfigError naming the first field of a V4 config.json that is missing or inconsistent."""
    if config.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise _bad("model_type", config.get("model_type"), "is not 'deepseek_v4'", source)
    for field in _POSITIVE_INT_FIELDS:
        v = config.get(field)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise _bad(field, v, "must be a positive integer", source)
    for field, lo in _OPTIONAL_INT_FIELDS.items():
        v = config.get(field, lo)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise _bad(field, v, f"must be an integer >= {lo}", source)
    n_layers = config["num_hidden_layers"]
    ratios = config.get("compress_ratios")
    if not isinstance(ratios, list) or len(ratios) < n_layers or any(r not in (0, 4, 128) for r in ratios):
        raise _bad("compress_ratios", ratios, f"must list 0/4/128 for each of the {n_layers} layers", source)
    if config["num_experts_per_tok"] > config["n_routed_experts"]:
        raise _bad("num_experts_per_tok", config["num_experts_per_tok"], "exceeds n_routed_experts", source)
    if config.get("num_hash_layers", 0) > n_layers:
        raise _bad("num_hash_layers", config["num_hash_layers"], "exceeds num_hidden_layers", source)
    if config["num_attention_heads"] * config["head_dim"] % config["o_groups"]:
        raise _bad("o_groups", config["o_groups"], "does not divide num_attention_heads * head_dim", source)
    rope = config.get("qk_rope_head_dim", 64)
    if rope > config["head_dim"] or rope > config.get("index_head_dim", 128) or rope % 2:
        raise _bad("qk_rope_head_dim", rope, "must be even and <= head_dim and index_head_dim", source)
    if not isinstance(config.get("quantization_config") or {}, dict):
        raise _bad("quantization_config", config.get("quantization_config"), "must be an object", source)
    fmt = expert_dtype(config)
    if fmt not in ("fp4", "fp8"):
        raise _bad("expert_dtype", fmt, "must be 'fp4' or 'fp8'", source)
    if fmt == "fp4" and (config["hidden_size"] % 32 or config["moe_intermediate_size"] % 32):
        raise _bad("moe_intermediate_size", config["moe_intermediate_size"],
                   "and hidden_size must be multiples of 32 for FP4 experts", source)


# ------------------------------------------------------------------------------------------------------- quirks


@dataclass(frozen=True)
class Quirk:
    name: str
    why: str
    # (config, {tensor name: safetensors dtype}) -> the fixed config, or None when the quirk does not apply
    apply: Callable[[dict[str, Any], dict[str, str]], dict[str, Any] | None]


def _expert_dtype_from_tensors(config: dict[str, Any], dtypes: dict[str, str]) -> dict[str, Any] | None:
    qc = config.get("quantization_config") or {}
    if config.get("expert_dtype") or qc.get("expert_dtype"):
        return None
    w1 = dtypes.get("layers.0.ffn.experts.0.w1.weight")
    return {**config, "expert_dtype": "fp4"} if w1 == "I8" else None


# Every deviation of a shipped checkpoint from what v4_tensors(config) expects is listed here.
QUIRKS: tuple[Quirk, ...] = (
    Quirk(
        "flash-initial-expert-dtype",
        "config.json has no expert_dtype (DeepSeek-V4-Flash initial revision efc85512) but the routed expert "
        "weights are I8 packed FP4: read as expert_dtype 'fp4' (the current revision 60d8d707 says so explicitly)",
        _expert_dtype_from_tensors,
    ),
)


# -------------------------------------------------------------------------------------------------- shard headers


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lives: file name, safetensors dtype, shape and absolute byte range in the file."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    begin_bytes: int
    end_bytes: int

    @property
    def nbytes(self) -> int:
        return self.end_bytes - self.begin_bytes


def read_shard_header(path: Path) -> dict[str, StoredTensor]:
    """Parse a safetensors header and check every data range against the file size (truncation) and the declared
    dtype/shape. Reads only the header bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name}: truncated shard (only {size} bytes, no header)", hint=_HINT_REDOWNLOAD)
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path.name}: not a safetensors file (header length {n})", hint=_HINT_REDOWNLOAD)
        if n > size - 8:  # checked before reading: a read of n bytes allocates n bytes up front
            raise CheckpointError(f"{path.name}: truncated shard (header of {n} bytes cut at {size} bytes)",
                                  hint=_HINT_REDOWNLOAD)
        raw = f.read(n)
    if len(raw) < n:
        raise CheckpointError(f"{path.name}: truncated shard (header cut at {size} bytes)", hint=_HINT_REDOWNLOAD)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path.name}: corrupt safetensors header ({exc})", hint=_HINT_REDOWNLOAD) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not a JSON object)", hint=_HINT_REDOWNLOAD)
    data_start = 8 + n
    out: dict[str, StoredTensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = (_header_int(x) for x in meta["data_offsets"])
            st = StoredTensor(name, path.name, str(meta["dtype"]), tuple(_header_int(d) for d in meta["shape"]),
                              data_start + b, data_start + e)
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: tensor {name} has a corrupt header entry", hint=_HINT_REDOWNLOAD) from exc
        width = DTYPE_BYTES.get(st.dtype)
        if b > e or (width is not None and st.nbytes != width * math.prod(st.shape)):
            raise CheckpointError(f"tensor {name} in {path.name}: byte range {b}..{e} does not match "
                                  f"{st.dtype}{list(st.shape)}", hint=_HINT_REDOWNLOAD)
        out[name] = st
    spans = sorted(out.values(), key=lambda s: (s.begin_bytes, s.end_bytes))
    for prev, cur in zip(spans, spans[1:]):
        if cur.begin_bytes < prev.end_bytes:
            raise CheckpointError(f"{path.name}: tensors {prev.name} and {cur.name} overlap in the file",
                                  hint=_HINT_REDOWNLOAD)
    cut = [st for st in out.values() if st.end_bytes > size]
    if cut:
        first = min(cut, key=lambda s: s.begin_bytes)
        raise CheckpointError(
            f"{path.name}: truncated shard ({size} bytes, needs {max(s.end_bytes for s in out.values())}); "
            f"tensor {first.name} and {len(cut) - 1} more are cut off", hint=_HINT_REDOWNLOAD)
    return out


def _header_int(x: Any) -> int:
    """A shape or offset entry: a non-negative JSON integer (no bools, floats or strings)."""
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{x!r} is not a non-negative integer")
    return x


def _read_json(path: Path, *, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise error(f"{path}: file is missing", hint=_HINT_REDOWNLOAD) from exc
    except (OSError, ValueError) as exc:
        raise error(f"{path}: not valid JSON ({exc})", hint=_HINT_REDOWNLOAD) from exc
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object", hint=_HINT_REDOWNLOAD)
    return obj


def _scan_shards(root: Path) -> dict[str, StoredTensor]:
    """All stored tensors, from the index (every file it names must exist and hold what it claims) or, without an
    index, from every *.safetensors file in the directory."""
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{root}: no {INDEX_FILE} and no *.safetensors files", hint=_HINT_REDOWNLOAD)
        weight_map = None
    else:
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: has no weight_map", hint=_HINT_REDOWNLOAD)
        bad = next((n for n, f in weight_map.items() if not isinstance(f, str) or not f), None)
        if bad is not None:
            raise CheckpointError(f"{index_path}: weight_map maps tensor {bad} to {weight_map[bad]!r}, not a file name",
                                  hint=_HINT_REDOWNLOAD)
        files = sorted(set(weight_map.values()))
    stored: dict[str, StoredTensor] = {}
    for fname in files:
        fpath = root / fname
        if not fpath.is_file():
            example = next(n for n, f in weight_map.items() if f == fname) if weight_map else fname
            raise CheckpointError(f"{INDEX_FILE} maps tensor {example} to {fname}, which does not exist in {root}",
                                  hint=_HINT_REDOWNLOAD)
        for name, st in read_shard_header(fpath).items():
            if name in stored:
                raise CheckpointError(f"tensor {name} is stored twice: in {stored[name].file} and {fname}",
                                      hint=_HINT_REDOWNLOAD)
            stored[name] = st
    if weight_map is not None:
        for name, fname in weight_map.items():
            st = stored.get(name)
            if st is None or st.file != fname:
                where = f"it is in {st.file}" if st else "no shard holds it"
                raise CheckpointError(f"{INDEX_FILE} maps tensor {name} to {fname}, but {where}", hint=_HINT_REDOWNLOAD)
        extra = sorted(set(stored) - set(weight_map))
        if extra:
            raise CheckpointError(f"tensor {extra[0]} in {stored[extra[0]].file} is not listed in {INDEX_FILE}",
                                  hint=_HINT_REDOWNLOAD)
    return stored


def _check_layout(root: Path, stored: dict[str, StoredTensor], expected: list[TensorInfo]) -> None:
    want = {t.name: t for t in expected}
    missing = [n for n in want if n not in stored]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]} is missing from {root} (in no shard and not in the index){more}",
                              hint=_HINT_REDOWNLOAD)
    extra = sorted(n for n in stored if n not in want)
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(f"unexpected tensor {extra[0]} in {stored[extra[0]].file}{more}",
                              hint="the checkpoint does not match its config.json")
    for name, info in want.items():
        st = stored[name]
        if st.dtype != info.dtype:
            raise CheckpointError(f"tensor {name} in {st.file} has dtype {st.dtype}, expected {info.dtype}",
                                  hint=_HINT_REDOWNLOAD)
        if st.shape != info.shape:
            raise CheckpointError(f"tensor {name} in {st.file} has shape {list(st.shape)}, expected {list(info.shape)}",
                                  hint=_HINT_REDOWNLOAD)


# ---------------------------------------------------------------------------------------------------- checkpoint


class Checkpoint:
    """A validated checkpoint directory. Tensors come back in their stored dtype as mmap-backed views; they share
    pages with the file, so treat them as read-only (writes are copy-on-write and never reach the file)."""

    def __init__(self, path: Path, config: dict[str, Any], generation_config: dict[str, Any],
                 stored: dict[str, StoredTensor], layout: dict[str, TensorInfo], quirks: tuple[Quirk, ...]) -> None:
        self.path = path
        self.config = config
        self.generation_config = generation_config
        self.quirks = quirks
        self.layout = layout  # name -> TensorInfo (with its class: attn, routed, mtp_routed, ...)
        self._stored = stored
        self._handles: dict[str, Any] = {}

    @property
    def names(self) -> list[str]:
        """Every tensor name, in the official layout order."""
        return list(self.layout)

    @property
    def nbytes(self) -> int:
        """Tensor payload bytes (the index's metadata.total_size)."""
        return sum(st.nbytes for st in self._stored.values())

    @property
    def file_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)

    @property
    def files(self) -> list[str]:
        return sorted({st.file for st in self._stored.values()})

    @property
    def has_mtp(self) -> bool:
        return any(n.startswith("mtp.") for n in self.layout)

    @property
    def expert_dtype(self) -> str:
        return expert_dtype(self.config)

    def stored(self, name: str) -> StoredTensor:
        try:
            return self._stored[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in checkpoint {self.path}",
                                  hint="names follow homerun.formats.v4_layout.v4_tensors") from None

    def get(self, name: str) -> torch.Tensor:
        """The stored tensor, zero-copy (mmap). Raises CheckpointError for an unknown name."""
        st = self.stored(name)
        handle = self._handles.get(st.file)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[st.file] = safe_open(str(self.path / st.file), framework="pt")
        return handle.get_tensor(name)

    def expert(self, layer: int, e: int) -> ExpertWeights:
        """Routed expert `e` of `layer`, packed as stored (an `ExpertSource`). Layers
        num_hidden_layers + m are the MTP block m."""
        n_layers = self.config["num_hidden_layers"]
        prefix = f"layers.{layer}" if layer < n_layers else f"mtp.{layer - n_layers}"
        p = f"{prefix}.ffn.experts.{e}"
        return ExpertWeights(
            w1=self.get(f"{p}.w1.weight"), w1_scale=self.get(f"{p}.w1.scale"),
            w3=self.get(f"{p}.w3.weight"), w3_scale=self.get(f"{p}.w3.scale"),
            w2=self.get(f"{p}.w2.weight"), w2_scale=self.get(f"{p}.w2.scale"),
            fmt=self.expert_dtype,
        )

    def tokenizer(self):
        from homerun.formats.tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._stored)} tensors, {self.nbytes / 1e9:.3f} GB)"


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Validate a checkpoint directory completely (config, index, shard headers, names/shapes/dtypes) and return a
    Checkpoint. Reads only JSON and safetensors headers; no tensor data is touched."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint directory", hint="pass a local directory or a Hub repo id")
    config = _read_json(root / "config.json", error=ConfigError)
    validate_config(config, str(root / "config.json"))
    gen_path = root / "generation_config.json"
    generation = _read_json(gen_path, error=ConfigError) if gen_path.is_file() else {}
    stored = _scan_shards(root)
    dtypes = {n: st.dtype for n, st in stored.items()}
    applied = []
    for quirk in QUIRKS:
        fixed = quirk.apply(config, dtypes)
        if fixed is not None:
            config, applied = fixed, applied + [quirk]
    # The layout is built from config.json alone: a config declaring far more tensors than the shards hold is refused
    # first, so a corrupt expert or layer count cannot make it build a layout of unbounded size.
    n_expert_tensors = config["num_hidden_layers"] * config["n_routed_experts"] * 6  # w1/w2/w3 weight + scale
    if n_expert_tensors > len(stored):
        raise CheckpointError(
            f"{root / 'config.json'} declares {config['num_hidden_layers']} layers x {config['n_routed_experts']} "
            f"routed experts ({n_expert_tensors} expert tensors), but the shards hold {len(stored)} tensors in all",
            hint="the checkpoint does not match its config.json; " + _HINT_REDOWNLOAD)
    # MTP is optional (speculative decoding only): a checkpoint may drop it entirely, but not in part.
    has_mtp = any(n.startswith("mtp.") for n in stored)
    expected = v4_tensors(config, include_mtp=has_mtp)
    _check_layout(root, stored, expected)
    return Checkpoint(root, config, generation, stored, {t.name: t for t in expected}, tuple(applied))
