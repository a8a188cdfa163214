"""KV snapshots, the read side: check a snapshot file against a loaded `Model` and restore it as a new `Session`
(the format and the writer are in homerun.engine.snapshot, whose docstring describes both). Reading checks the
header, the model, the dtypes, the file size and the KV budget before it allocates anything, then reads each page
straight into a freshly allocated page of the model's own KV placement, verifying each tensor's crc32 and the token
hash. Any refusal raises `SnapshotError` and leaves every live session untouched. This module never prints.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from homerun.errors import ContextFullError, SnapshotError
from homerun.models.deepseek_v4 import CompressorState, LayerState
from homerun.models.kv import PagedRows
from homerun.engine.snapshot import (FORMAT, META_KEY, TOKEN_CHUNK, VERSION, _HINT_CORRUPT, _MAX_HEADER, _ST, _TORCH,
                                     Progress, _bytes_view, _elsize, _kv_dtype_name, _numel, _page_part, _store_parts,
                                     model_identity)

if TYPE_CHECKING:
    from homerun.engine.runtime import Model
    from homerun.engine.session import Session


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
