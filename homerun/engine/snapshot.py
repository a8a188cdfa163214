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
restore builds a new Session. This module never prints.
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

from homerun.errors import ContextFullError, SnapshotError
from homerun.models.deepseek_v4 import CompressorState, LayerState
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


# --------------------------------------------------------------------------------------------------- read


def _corrupt(path: Path, why: str) -> SnapshotError:
    return SnapshotError(f"{path}: not a usable KV snapshot ({why})", hint=_HINT_CORRUPT, reason="corrupt")


def read_header(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(metadata, tensor entries, data start) of a snapshot, after checking its format, version and that the file
    holds every byte the header names (a truncated file is refused here). Reads only the header."""
    path = Path(path).expanduser()
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _corrupt(path, f"truncated: {size} bytes, no header")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > min(size - 8, _MAX_HEADER):
                raise _corrupt(path, f"truncated or not safetensors: header of {hlen} bytes in a {size}-byte file")
            raw = fh.read(hlen)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no such KV snapshot", hint="save one first (Session.save, /save)",
                            reason="io") from None
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read the KV snapshot ({exc})", reason="io") from None
    try:
        header = json.loads(raw)
        meta = json.loads(header.pop("__metadata__")[META_KEY])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise _corrupt(path, f"no homerun snapshot header: {exc!r}") from None
    if meta.get("format") != FORMAT:
        raise _corrupt(path, f"format is {meta.get('format')!r}, not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise SnapshotError(f"{path}: KV snapshot version {meta.get('version')}, this homerun reads version {VERSION}",
                            hint="save it again with this homerun", reason="version")
    end = 0
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b0, b1 = e["data_offsets"]
        if b0 != end or b1 - b0 != _numel(e["shape"]) * _elsize(_TORCH[e["dtype"]]):
            raise _corrupt(path, f"tensor {name} has inconsistent offsets")
        end = b1
    data_start = 8 + hlen
    if size < data_start + end:
        raise _corrupt(path, f"truncated: {size} bytes, the header names {data_start + end}")
    if size > data_start + end:
        raise _corrupt(path, f"{size - data_start - end} bytes past the last tensor")
    return meta, header, data_start


def check_snapshot(model: "Model", path: str | Path) -> dict[str, Any]:
    """The snapshot's metadata when it can be restored onto `model`, else SnapshotError: another model or revision,
    another kv_dtype or compute dtype, truncated, or more KV than the model's budget and ramp allow."""
    return _checked(model, Path(path).expanduser())[0]


def _checked(model: "Model", path: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    meta, entries, data_start = read_header(path)
    mine, theirs = model_identity(model), meta.get("model") or {}
    for key in ("config_sha256", "shards_sha256", "weights_sample_sha256"):
        if key in mine and mine.get(key) != theirs.get(key):
            what = {"config_sha256": "config.json", "shards_sha256": "checkpoint layout",
                    "weights_sample_sha256": "weights"}[key]
            raise SnapshotError(
                f"{path}: KV snapshot of another model or revision (its {what} differs from {model.path})",
                hint="restore it with the checkpoint it was saved from, or re-prefill the conversation", reason="model")
    kv, compute = _kv_dtype_name(model), str(model.dtype).replace("torch.", "")
    if meta.get("kv_dtype") != kv or meta.get("compute_dtype") != compute:
        raise SnapshotError(
            f"{path}: KV snapshot in kv_dtype {meta.get('kv_dtype')} / compute {meta.get('compute_dtype')}, this model "
            f"runs kv_dtype {kv} / compute {compute}",
            hint="load with kv_dtype/dtype matching the snapshot, or re-prefill", reason="kv_dtype")
    if len(meta.get("layers") or []) != model.args.n_layers:
        raise _corrupt(path, "its layer count differs from the model's")
    _check_budget(model, path, int(meta["n_tokens"]))
    return meta, entries, data_start


def _check_budget(model: "Model", path: Path, n: int) -> None:
    ramp = model.ramp_tokens
    have = model.kv_bytes_at(n)
    steps = [r for r in ramp if r >= n]
    if not steps:
        raise SnapshotError(
            f"{path}: the snapshot holds {n:,} tokens ({have / 1e9:.2f} GB of KV); this model's ramp ends at "
            f"{ramp[-1]:,} tokens", hint="load with a ramp that reaches it", reason="budget")
    step = steps[0]
    need, budget = model.kv_bytes_at(step), model.kv_budget_bytes
    if budget is not None and need > budget:
        raise SnapshotError(
            f"{path}: the snapshot holds {n:,} tokens ({have / 1e9:.3f} GB of KV) and needs the {step:,}-token ramp "
            f"step ({need / 1e9:.3f} GB), over this plan's KV budget of {budget / 1e9:.3f} GB",
            hint=f"restore on a plan whose KV budget is at least {need / 1e9:.3f} GB (the {step:,}-token step)",
            reason="budget")


def _readinto(fh, buf: memoryview, path: Path) -> None:
    got = 0
    while got < len(buf):
        n = fh.readinto(buf[got:])
        if not n:
            raise _corrupt(path, "truncated while reading")
        got += n


class _Reader:
    """Reads named tensors of one snapshot, checking each tensor's crc32; device destinations go through one
    reusable host buffer (the largest page part seen)."""

    def __init__(self, fh, path: Path, meta: dict[str, Any], entries: dict[str, Any], data_start: int,
                 progress: Progress | None):
        self.fh, self.path, self.entries, self.start = fh, path, entries, data_start
        self.crcs = meta.get("crc32") or {}
        self.total = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries.values())
        self.done = 0
        self.progress = progress
        self._staging: torch.Tensor | None = None

    def entry(self, name: str, dtype: torch.dtype | None = None, cols: int | None = None) -> dict[str, Any]:
        e = self.entries.get(name)
        if e is None:
            raise _corrupt(self.path, f"tensor {name} is missing")
        if dtype is not None and _TORCH[e["dtype"]] != dtype:
            raise _corrupt(self.path, f"tensor {name} is {e['dtype']}, expected {_ST[dtype]}")
        if cols is not None and (len(e["shape"]) != 2 or e["shape"][1] != cols):
            raise _corrupt(self.path, f"tensor {name} has shape {e['shape']}, expected [*, {cols}]")
        return e

    def _fill(self, dst: torch.Tensor, crc: int) -> int:
        if dst.numel() == 0:
            return crc
        if dst.device.type == "cpu" and dst.is_contiguous():
            buf = memoryview(dst.view(torch.uint8).numpy()).cast("B")
            _readinto(self.fh, buf, self.path)
        else:
            nb = dst.numel() * dst.element_size()
            if self._staging is None or self._staging.numel() < nb:
                self._staging = torch.empty(nb, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            host = self._staging[:nb]
            buf = memoryview(host.numpy()).cast("B")
            _readinto(self.fh, buf, self.path)
            dst.copy_(host.view(dst.dtype).view(dst.shape))
        self.done += len(buf)
        if self.progress is not None:
            self.progress(self.done, self.total)
        return zlib.crc32(buf, crc)

    def _check(self, name: str, crc: int) -> None:
        if self.crcs.get(name) != f"{crc:08x}":
            raise _corrupt(self.path, f"checksum mismatch in {name}")

    def small(self, name: str, device: torch.device) -> torch.Tensor:
        e = self.entry(name)
        t = torch.empty(e["shape"], dtype=_TORCH[e["dtype"]])
        self.fh.seek(self.start + e["data_offsets"][0])
        self._check(name, self._fill(t, 0))
        return t.to(device)

    def rows(self, name: str, store: PagedRows, k: int | None, dtype: torch.dtype, cols: int, n: int) -> None:
        """Rows [n, cols] into the store's pages (already reserved), page by page."""
        e = self.entry(name, dtype, cols)
        if e["shape"][0] != n:
            raise _corrupt(self.path, f"tensor {name} has {e['shape'][0]} rows, the header says {n}")
        self.fh.seek(self.start + e["data_offsets"][0])
        crc = 0
        for p in range(-(-n // store.page_rows)):
            rows = min(store.page_rows, n - p * store.page_rows)
            crc = self._fill(_page_part(store, p, k)[:rows], crc)
        self._check(name, crc)

    def tokens(self, n: int, expect_sha: str) -> list[int]:
        e = self.entry("tokens", torch.int64)
        if e["shape"] != [n]:
            raise _corrupt(self.path, f"{e['shape']} token ids, the header says {n}")
        self.fh.seek(self.start + e["data_offsets"][0])
        out: list[int] = []
        crc, h = 0, hashlib.sha256()
        buf = torch.empty(min(n, TOKEN_CHUNK), dtype=torch.int64)
        for t0 in range(0, n, TOKEN_CHUNK):
            part = buf[: min(TOKEN_CHUNK, n - t0)]
            crc = self._fill(part, crc)
            h.update(_bytes_view(part))
            out.extend(part.tolist())
        self._check("tokens", crc)
        if h.hexdigest() != expect_sha:
            raise _corrupt(self.path, "the token ids do not match their hash")
        return out


def restore_session(model: "Model", path: str | Path, *, progress: Progress | None = None) -> "Session":
    """A new Session holding the snapshot's state on `model`'s KV placement (each layer's pages allocated where the
    model puts them, charged to the device budgets of a placed model), ready to feed or generate. Refusals raise
    SnapshotError before anything is allocated (model, dtype, truncation, budget) or, for a checksum mismatch,
    before the new session is returned; live sessions are never touched."""
    path = Path(path).expanduser()
    meta, entries, data_start = _checked(model, path)
    n = int(meta["n_tokens"])
    session = model.session()
    try:
        session._ensure_capacity(n)  # free memory / per-device budgets, on an empty session
    except ContextFullError as exc:
        raise SnapshotError(f"{path}: cannot restore {n:,} tokens: {exc.message}", hint=exc.hint,
                            reason="budget") from None
    states = model._new_state()
    new_states: list[LayerState] = []
    try:
        with open(path, "rb", buffering=0) as fh:
            rd = _Reader(fh, path, meta, entries, data_start, progress)
            for i, (fresh, desc) in enumerate(zip(states, meta["layers"])):
                win = rd.small(f"layers.{i}.window", fresh.window.device)
                if win.dtype != fresh.window.dtype or (win.numel() and win.shape[1] != fresh.window.shape[1]):
                    raise _corrupt(path, f"layer {i}: window of {win.dtype}/{list(win.shape)}")
                comps = []
                for key, c in (("comp", fresh.comp), ("index", fresh.index_comp)):
                    d = desc.get(key)
                    if (c is None) != (d is None):
                        raise _corrupt(path, f"layer {i}: {key} compressor does not match the model's")
                    if c is None:
                        comps.append(None)
                        continue
                    store, ne = c.store, int(d["n_entries"])
                    store.reserve(ne)
                    for suffix, k, cols, dt in _store_parts(store):
                        rd.rows(f"layers.{i}.{key}.{suffix}", store, k, dt, cols, ne)
                    small = {s: rd.small(f"layers.{i}.{key}.{s}", store.compute_device) for s in d.get("small", [])}
                    comps.append(CompressorState(store, ne, **small))
                new_states.append(LayerState(win, comps[0], comps[1]))
            tokens = rd.tokens(n, meta["tokens_sha256"])
            logits = rd.small("last_logits", torch.device("cpu")) if "last_logits" in entries else None
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read the KV snapshot ({exc})", reason="io") from None
    session._states = new_states
    session._tokens = tokens
    session.last_logits = logits
    return session
