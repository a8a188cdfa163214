"""KV snapshots: a `Session`'s whole state on disk, restored onto a loaded `Model` in seconds instead of a re-prefill.

File format: safetensors (8-byte little-endian header length, a JSON header of tensors with dtype, shape and data
offsets, then the raw bytes), readable by any safetensors reader. `__metadata__["homerun"]` is a JSON document:

    format "homerun-kv-snapshot", version, model identity (sha256 of config.json, of the shard headers and of a
    sample of the weight bytes; the Hub commit when the path has one), kv_dtype and compute dtype, page_tokens,
    the KV device of each layer, n_tokens, sha256 of the token ids, kv_bytes, per-layer counts, crc32 per tensor.

Tensors: `layers.{i}.window` (sliding-window rows), `layers.{i}.{comp|index}.rows` (a plain store's committed rows
[n_entries, width]; an FP8 store gives `.codes`, `.scales`, `.rope` instead), `.pending_kv` / `.pending_gate` (the
open window) and `.overlap_kv` / `.overlap_gate` (CSA overlap) when present, `tokens` (int64) and `last_logits`.
A store's rows are contiguous in the file, so the file does not depend on the page size.

Writing streams each store page by page straight from the page memory (host pages are never copied; a device page
is copied to the host one page at a time) into a temp file next to the target, then fsync, rename, fsync of the
directory: a crash or SIGKILL leaves the previous snapshot intact. Reading checks the header, the model, the dtypes,
the file size and the KV budget before it allocates anything, then reads each page straight into a freshly
allocated page of the model's own KV placement (host pages: `readinto` the page memory; device pages: through one
page-sized host buffer), verifying each tensor's crc32 and the token hash. Any refusal raises `SnapshotError`
(`reason`: "model", "kv_dtype", "corrupt", "budget", "version", "io") and leaves every live session untouched: a
restore builds a new Session. This module holds the format and the writer; the reader is homerun.engine.snapshot_read.
Neither prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
import weakref
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from homerun.models.kv import Fp8PagedRows, PagedRows

if TYPE_CHECKING:
    from homerun.engine.runtime import Model
    from homerun.engine.session import Session

FORMAT = "homerun-kv-snapshot"
VERSION = 1
META_KEY = "homerun"
SUFFIX = ".kv.safetensors"
TOKEN_CHUNK = 1 << 16  # token ids are written and read in chunks of this many
_MAX_HEADER = 1 << 30
_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3",
       torch.uint8: "U8", torch.int64: "I64"}
_TORCH = {v: k for k, v in _ST.items()}
_SMALL = ("pending_kv", "pending_gate", "overlap_kv", "overlap_gate")
_HINT_CORRUPT = "delete it and save again (the conversation history re-prefills without it)"
# progress(done_bytes, total_bytes) while a snapshot is written or read
Progress = Callable[[int, int], None]


def _elsize(dt: torch.dtype) -> int:
    return torch.empty(0, dtype=dt).element_size()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _bytes_view(t: torch.Tensor) -> memoryview:
    """The bytes of t as a flat memoryview: the tensor's own memory for a contiguous host tensor (no copy), else a
    host copy of t (a device page, one at a time)."""
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


# ------------------------------------------------------------------------------------------------ identity

_IDENTITY: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_identity(model: "Model") -> dict[str, Any]:
    """What a snapshot must match: sha256 of the config, of the shard headers (names, dtypes, shapes, offsets) and
    of 64 KiB from the middle and the end of every shard (a retrained revision with the same shapes), plus the Hub
    commit when the checkpoint path is a Hub snapshot (informational). Cached per model."""
    try:
        return _IDENTITY[model]
    except (KeyError, TypeError):
        pass
    ident: dict[str, Any] = {"config_sha256": _sha(json.dumps(model.config, sort_keys=True, default=str).encode())}
    ckpt = getattr(model, "checkpoint", None)
    if ckpt is not None:
        rows = []
        for name in sorted(ckpt.names):
            st = ckpt.stored(name)
            rows.append([name, st.file, st.dtype, list(st.shape), st.begin_bytes, st.end_bytes])
        ident["shards_sha256"] = _sha(json.dumps(rows).encode())
        h = hashlib.sha256()
        for fname in ckpt.files:
            fpath = Path(ckpt.path) / fname
            size = fpath.stat().st_size
            with open(fpath, "rb") as fh:
                for at in (size // 2, max(0, size - 65536)):
                    fh.seek(at)
                    h.update(fh.read(65536))
        ident["weights_sample_sha256"] = h.hexdigest()
    m = re.search(r"snapshots/([0-9a-f]{40})", str(getattr(model, "path", "") or ""))
    if m:
        ident["commit"] = m.group(1)
    try:
        _IDENTITY[model] = ident
    except TypeError:
        pass
    return ident


def _kv_dtype_name(model: "Model") -> str:
    if model.kv_dtype == "auto":
        return str(model.dtype).replace("torch.", "")
    return model.kv_dtype


# ----------------------------------------------------------------------------------------------- the parts


def _store_parts(store: PagedRows) -> list[tuple[str, int | None, int, torch.dtype]]:
    """(suffix, index in a page tuple or None, columns, dtype) of each tensor a store's pages hold."""
    if isinstance(store, Fp8PagedRows):
        parts = [("codes", 0, store.nope, torch.float8_e4m3fn),
                 ("scales", 1, store.scale_cols, torch.float32 if store.scale_fp32 else torch.uint8),
                 ("rope", 2, store.rope_dim, torch.bfloat16)]
        return [p for p in parts if p[2] > 0]
    return [("rows", None, store.width, store.dtype)]


def _page_part(store: PagedRows, p: int, k: int | None) -> torch.Tensor:
    page = store.pages[p]
    return page if k is None else page[k]


def _session_parts(session: "Session") -> tuple[list[tuple[str, torch.dtype, tuple, Callable[[], Iterator]]],
                                                 list[dict[str, Any]]]:
    """Every tensor of the session in file order as (name, dtype, shape, chunks) -- chunks() yields host-or-device
    tensors whose bytes, in order, are the tensor's -- plus the per-layer description for the header."""
    parts: list = []
    layers: list[dict[str, Any]] = []
    for i, st in enumerate(session._states):
        w = st.window
        parts.append((f"layers.{i}.window", w.dtype, tuple(w.shape), lambda w=w: iter((w,))))
        desc: dict[str, Any] = {"window_rows": int(w.shape[0]), "kv_device": str(w.device)}
        for key, c in (("comp", st.comp), ("index", st.index_comp)):
            if c is None:
                desc[key] = None
                continue
            store, n = c.store, c.n_entries
            desc["kv_device"] = str(store.device)
            d: dict[str, Any] = {"n_entries": n, "width": store.width, "fp8": isinstance(store, Fp8PagedRows),
                                 "small": [s for s in _SMALL if getattr(c, s) is not None]}
            for suffix, k, cols, dt in _store_parts(store):
                def chunks(store=store, n=n, k=k) -> Iterator[torch.Tensor]:
                    for p in range(-(-n // store.page_rows)):
                        rows = min(store.page_rows, n - p * store.page_rows)
                        yield _page_part(store, p, k)[:rows]
                parts.append((f"layers.{i}.{key}.{suffix}", dt, (n, cols), chunks))
            for s in d["small"]:
                t = getattr(c, s)
                parts.append((f"layers.{i}.{key}.{s}", t.dtype, tuple(t.shape), lambda t=t: iter((t,))))
            desc[key] = d
        layers.append(desc)
    toks = session._tokens

    def token_chunks() -> Iterator[torch.Tensor]:
        for t0 in range(0, len(toks), TOKEN_CHUNK):
            yield torch.tensor(toks[t0 : t0 + TOKEN_CHUNK], dtype=torch.int64)

    parts.append(("tokens", torch.int64, (len(toks),), token_chunks))
    if session.last_logits is not None:
        lg = session.last_logits
        parts.append(("last_logits", lg.dtype, tuple(lg.shape), lambda lg=lg: iter((lg,))))
    return parts, layers


def _tokens_sha(tokens: list[int]) -> str:
    h = hashlib.sha256()
    for t0 in range(0, len(tokens), TOKEN_CHUNK):
        h.update(_bytes_view(torch.tensor(tokens[t0 : t0 + TOKEN_CHUNK], dtype=torch.int64)))
    return h.hexdigest()


def _header_bytes(meta: dict[str, Any], entries: dict[str, Any]) -> bytes:
    raw = json.dumps({"__metadata__": {META_KEY: json.dumps(meta, separators=(",", ":"))}, **entries},
                     separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # data starts 8-byte aligned


def snapshot_nbytes(session: "Session") -> int:
    """Bytes a snapshot of `session` takes on disk, header excluded (the header adds a few KB)."""
    parts, _ = _session_parts(session)
    return sum(_numel(shape) * _elsize(dt) for _, dt, shape, _ in parts)


# --------------------------------------------------------------------------------------------------- save


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _remove_stale_temps(path: Path) -> None:
    """Temp files of earlier saves to the same path whose writer process is gone (killed mid-save)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 : -4]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def save_session(session: "Session", path: str | Path, *, extra: dict[str, Any] | None = None,
                 progress: Progress | None = None) -> dict[str, Any]:
    """Write the session's whole state to `path` (atomically; see the module docstring) and return the header
    metadata. `extra`: a JSON-able dict stored in the header (e.g. the chat's text of the tokens)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    model = session.model
    parts, layers = _session_parts(session)
    entries: dict[str, Any] = {}
    off = 0
    for name, dt, shape, _ in parts:
        nb = _numel(shape) * _elsize(dt)
        entries[name] = {"dtype": _ST[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
        off += nb
    total = off
    meta: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": model_identity(model), "kv_dtype": _kv_dtype_name(model),
        "compute_dtype": str(model.dtype).replace("torch.", ""), "weights_dtype": getattr(model, "weights_dtype", None),
        "page_tokens": getattr(model, "page_tokens", None), "kv_devices": [d["kv_device"] for d in layers],
        "n_tokens": session.n_tokens, "tokens_sha256": _tokens_sha(session._tokens), "kv_bytes": session.kv_bytes,
        "data_bytes": total, "layers": layers, "extra": extra or {},
        "crc32": {name: "00000000" for name, *_ in parts},
    }
    header = _header_bytes(meta, entries)
    _remove_stale_temps(path)
    tmp = _temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as fh:
            fh.write(struct.pack("<Q", len(header)))
            fh.write(header)
            done = 0
            for name, _dt, _shape, chunks in parts:
                crc, start = 0, done
                for chunk in chunks():
                    mv = _bytes_view(chunk)
                    fh.write(mv)
                    crc = zlib.crc32(mv, crc)
                    done += len(mv)
                    del mv
                    if progress is not None:
                        progress(done, total)
                if done - start != entries[name]["data_offsets"][1] - entries[name]["data_offsets"][0]:
                    raise RuntimeError(f"snapshot: {name} changed size while it was written")
                meta["crc32"][name] = f"{crc:08x}"
            final = _header_bytes(meta, entries)
            assert len(final) == len(header)
            fh.seek(8)
            fh.write(final)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return meta
