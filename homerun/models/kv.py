"""Paged row storage for the V4 inference state (CSA entries, indexer keys, HCA entries) and live free memory.

`PagedRows` holds append-only rows [n, width] in fixed-size pages: growing allocates one more page and never copies
the rows already stored, so the allocated bytes are the live bytes plus at most one partly filled page. Pages may
live on another device than the compute (host RAM for a GPU model when the GPU budget is short); reads bring the
rows to the compute device. This module does not know the attention math, the ramp or the token counts; the
runtime (`homerun.engine.runtime`) decides the page size and where pages live. With an `account` device
(`offload.devices.Device`), every page is allocated through it under a ("kv", store, allocation, part) tag, so a placed
model's KV growth is charged to that device's budget (DoesNotFitError names the device) and freed when the store
is garbage-collected.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Iterator

import torch

from homerun.formats.quant import pow2_exponent

# Default page size in tokens of context (DEFAULT_PAGE_TOKENS): a CSA store (one entry per 4 tokens) gets
# page_tokens/4 rows a page, an HCA store page_tokens/128. The runtime may pick a larger page for large ramps (fewer
# pages to walk at 1M).
from homerun.models.decode_bytes import (  # noqa: F401 - the row formula and the page, re-exported
    DEFAULT_PAGE_TOKENS, FP8_BLOCK, fp8_row_bytes)
_STORE_IDS = itertools.count()
_ALLOC_IDS = itertools.count()


class PagedRows:
    """Append-only rows [n, width] in pages of `page_rows` rows on `device`.

    The committed row count lives in the owner's (immutable) state, not here: writes past it are invisible until the
    owner commits, which is what makes a chunk's update all-or-nothing. Subclasses change how a page stores rows
    (`_alloc`, `_parts`, `_slice`, `_encode`, `_get`, `_take`, `row_bytes`, `format`, `empty_like`); reads always
    return rows in `dtype` on the compute device. The decode step's static core (models.deepseek_v4.static_decode)
    keeps its entries in a store of the same format, written and read through these same hooks.
    """

    def __init__(self, width: int, dtype: torch.dtype, device: torch.device | str, page_rows: int = 256,
                 compute_device: torch.device | str | None = None, account: Any = None):
        if page_rows < 1:
            raise ValueError(f"page_rows must be >= 1, got {page_rows}")
        self.width = width
        self.dtype = dtype
        self.device = torch.device(device) if account is None else account.torch_device
        self.compute_device = torch.device(compute_device) if compute_device is not None else self.device
        self.page_rows = page_rows
        # the page size the store was made with: the static decode core, which views its buffer as this store's
        # pages, keeps it (or the largest power of two under it that divides its capacity)
        self.page_rows_base = page_rows
        self.pages: list = []
        # high-water mark: no live state reads rows past it (written here, or handed out by the static decode core,
        # models.deepseek_v4.static_decode, which adopts a store only into a bucket that holds all of them)
        self.rows_used = 0
        self.account = account
        self._uid = next(_STORE_IDS)
        self._tags: list = []
        if account is not None:  # the pages' bytes go back to the device's budget with the store
            weakref.finalize(self, account.free_all, self._tags)

    def _empty(self, part: str, shape: tuple[int, ...], dtype: torch.dtype, zero: bool = False) -> torch.Tensor:
        """One page tensor on the store's device, charged to `account` when there is one."""
        if self.account is None:
            make = torch.zeros if zero else torch.empty
            return make(shape, dtype=dtype, device=self.device)
        tag = ("kv", self._uid, next(_ALLOC_IDS), part)
        t = self.account.empty(tag, shape, dtype)
        self._tags.append(tag)
        return t.zero_() if zero else t

    # ------------------------------------------------------------------------------------------ accounting

    @property
    def capacity_rows(self) -> int:
        return len(self.pages) * self.page_rows

    @property
    def row_bytes(self) -> int:
        return self.width * torch.empty(0, dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes allocated (whole pages)."""
        return self.capacity_rows * self.row_bytes

    @property
    def format(self) -> tuple:
        """What a row's stored bits mean: two stores of one format hold interchangeable rows (`copy_rows`)."""
        return type(self).__name__, self.width, self.dtype

    def empty_like(self, page_rows: int, device: torch.device, account: Any = None) -> "PagedRows":
        """An empty store of this format, its pages on `device` (also its compute device)."""
        return PagedRows(self.width, self.dtype, device, page_rows, compute_device=device, account=account)

    # ------------------------------------------------------------------------------------- page format hooks

    def _alloc(self, rows: int | None = None):
        return self._empty("rows", (rows or self.page_rows, self.width), self.dtype)

    def _parts(self, page) -> tuple[torch.Tensor, ...]:
        """A page's tensors, rows along dim 0 (what `_encode` writes)."""
        return (page,)

    def _slice(self, page, n: int, start: int = 0):
        """The page of the n rows of `page` from row `start` (views)."""
        return page[start : start + n]

    def _encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rows [n, width] as stored: one tensor per page part, on the store's device (a part's first columns:
        those past them, padding, stay as allocated; a part of no columns is not written)."""
        return (rows.to(device=self.device, dtype=self.dtype),)

    def _put(self, page, r0: int, rows: torch.Tensor) -> None:
        for part, enc in zip(self._parts(page), self._encode(rows)):
            if enc.shape[1]:
                part[r0 : r0 + enc.shape[0], : enc.shape[1]] = enc

    def put_at(self, page, at: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows stored at the device-side row indices `at` of `page` (no host read: a captured step's write)."""
        for part, enc in zip(self._parts(page), self._encode(rows)):
            if part.dtype.is_floating_point and part.element_size() == 1:  # no index_copy_ for fp8: as bytes
                part, enc = part.view(torch.uint8), enc.view(torch.uint8)
            if enc.shape[1]:
                part[:, : enc.shape[1]].index_copy_(0, at.to(part.device), enc)

    def copy_rows(self, n: int, page) -> None:
        """This store's first n rows, as stored (no re-encoding), into `page` of a store of the same `format`."""
        for p in range(-(-n // self.page_rows)):
            r0 = p * self.page_rows
            m = min(self.page_rows, n - r0)
            for dst, src in zip(self._parts(page), self._parts(self.pages[p])):
                if src.shape[1]:
                    dst[r0 : r0 + m] = src[:m]

    def _decode_bf16(self, q, s, r) -> torch.Tensor:
        """_decode's bits without fp32 copies (a whole-capacity read is the graphed step's largest transient): an e4m3
        code is exact in bf16 and the scales are powers of two (_encode writes 2^e, e in [-126, 126], in either
        format) that bf16 holds exactly (same exponent range as fp32), so bf16's one rounding of the product is the
        rounding of the exact fp32 product that _decode's .to(dtype) does. Written into the output in place."""
        n = q.shape[0]
        if self.scale_fp32:
            scale = s.to(torch.bfloat16)
        else:  # ue8m0 2^(b - 127) as _decode computes it; fp32 only [n, n_blocks]
            scale = s[:, : self.n_blocks].float().sub_(127).exp2_().to(torch.bfloat16)
        out = torch.empty(n, self.width, dtype=torch.bfloat16, device=self.device)
        out[:, : self.nope].copy_(q).view(n, self.n_blocks, self.block).mul_(scale.unsqueeze(-1))
        if self.rope_dim:
            out[:, self.nope :].copy_(r)
        return out.to(device=self.compute_device)

    # fp16 holds 2^a exactly for a in [-24, 15] only: a scale 2^e goes in as three factors, each an exact power
    _FP16_FACTORS = ((0, -14, 15), (15, 0, 15), (-14, -24, 0))  # (shift, lo, hi): 2^clamp(e - shift, lo, hi)

    def _decode_fp16(self, q, s, r) -> torch.Tensor:
        """_decode's bits in fp16 with _decode_bf16's bytes (one fp16 exponent per block, refilled from the page's
        scales for each factor). The codes are exact in fp16; times 2^clamp(e, -14, 15) is exact short of an
        overflow the whole product shares, and at most one of the other two factors (2^(e - 15) above, 2^(e + 14)
        below) is not 1: one rounding of the exact product, as _decode's .to(float16) of it; past 2^(15+15) it is
        inf, below 2^(-14-24) a signed zero, either way."""
        n = q.shape[0]
        out = torch.empty(n, self.width, dtype=torch.float16, device=self.device)
        exp = torch.empty(n, self.n_blocks, 1, dtype=torch.float16, device=self.device)
        out[:, : self.nope].copy_(q)
        nope = out[:, : self.nope].view(n, self.n_blocks, self.block)
        for shift, lo, hi in self._FP16_FACTORS:
            if self.scale_fp32:  # 2^e -> e (exact in fp16: |e| <= 126)
                torch.log2(s.view(n, 1, 1), out=exp)
            else:  # ue8m0 byte b -> e = b - 127
                exp.copy_(s[:, : self.n_blocks].unsqueeze(-1)).sub_(127)
            nope.mul_(exp.sub_(shift).clamp_(lo, hi).exp2_())
        if self.rope_dim:
            out[:, self.nope :].copy_(r)
        return out.to(device=self.compute_device)

    def _get(self, page, n: int) -> torch.Tensor:
        return page[:n].to(self.compute_device)

    def _take(self, page, rows: torch.Tensor) -> torch.Tensor:
        return page[rows.to(self.device)].to(self.compute_device)

    # ----------------------------------------------------------------------------------------------- write

    def reserve(self, rows: int) -> None:
        while self.capacity_rows < rows:
            self.pages.append(self._alloc())

    def write(self, at: int, rows: torch.Tensor) -> int:
        """Write rows at row index `at` (past the owner's committed end); returns the new end. The rows past it are
        no state's any more (Session.rollback: a later checkpoint is invalid from the next feed): the high-water mark
        falls to it, so the static decode core sizes its bucket from this state's rows, not a dead one's."""
        end = at + rows.shape[0]
        self.reserve(end)
        self.rows_used = end
        done = 0
        while at + done < end:
            p, r = divmod(at + done, self.page_rows)
            n = min(self.page_rows - r, end - at - done)
            self._put(self.pages[p], r, rows[done : done + n])
            done += n
        return end

    # ------------------------------------------------------------------------------------------------ read

    def iter_pages(self, n: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row index, rows [<= page_rows, width] on the compute device) over the first n rows."""
        for p in range(-(-n // self.page_rows)):
            r0 = p * self.page_rows
            yield r0, self._get(self.pages[p], min(self.page_rows, n - r0))

    def view(self, n: int) -> torch.Tensor:
        """The first n rows as one tensor on the compute device: a view when they sit in one plain page, else a
        copy (O(n) temporary; the attention uses it only for HCA's n = T/128 entries)."""
        if n == 0 or not self.pages:
            return torch.empty(0, self.width, dtype=self.dtype, device=self.compute_device)
        if n <= self.page_rows:
            return self._get(self.pages[0], n)
        return torch.cat([rows for _, rows in self.iter_pages(n)])

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows at indices idx (any shape, all < the committed count) -> [*idx.shape, width] on the compute
        device. Reads only the selected rows: one indexed copy per page that holds any of them."""
        flat = idx.reshape(-1)
        out = torch.empty(flat.numel(), self.width, dtype=self.dtype, device=self.compute_device)
        if flat.numel():
            if len(self.pages) == 1:
                out[:] = self._take(self.pages[0], flat)
            else:
                page_of = flat // self.page_rows
                for p in torch.unique(page_of).tolist():
                    m = page_of == p
                    out[m] = self._take(self.pages[p], flat[m] - p * self.page_rows)
        return out.view(*idx.shape, self.width)


class Fp8PagedRows(PagedRows):
    """Rows stored as in section 5 of deepseek-v4.md (the vLLM-style FP8 cache).

    Compressed entries (rope_dim > 0): the first width - rope_dim dims in e4m3 with one power-of-two ue8m0 scale
    per 64-dim block (scale bytes padded to a multiple of 8: 448 + 8 + 64 x 2 = 584 B for a 512-dim entry), the
    last rope_dim dims in bf16. Indexer keys (rope_dim = 0, scale_fp32): all dims e4m3 with one fp32 power-of-two
    scale per row (128 + 4 = 132 B). Reads dequantize to `dtype`; quantization is lossy (e4m3 keeps 3 mantissa bits).
    """

    BLOCK = FP8_BLOCK
    FP8_MAX = 448.0

    def __init__(self, width: int, dtype: torch.dtype, device, page_rows: int = 256, compute_device=None, *,
                 rope_dim: int = 0, scale_fp32: bool = False, account: Any = None, codec: Any = None):
        super().__init__(width, dtype, device, page_rows, compute_device, account)
        # codec: one-launch encode and decode with these ops' bits (a GPU kernel set's `fp8_rows`, e.g.
        # homerun.kernels.triton.kv_fp8: `put` and `read`), used where the pages are on the compute device
        self.codec = codec if self.device == self.compute_device else None
        self.rope_dim = rope_dim
        self.nope = width - rope_dim
        self.scale_fp32 = scale_fp32
        self.block = self.nope if scale_fp32 else self.BLOCK
        if self.nope % self.block:
            raise ValueError(f"FP8 KV needs the non-rope width ({self.nope}) in blocks of {self.block}")
        self.n_blocks = self.nope // self.block
        self.scale_cols = self.n_blocks if scale_fp32 else -(-self.n_blocks // 8) * 8

    @property
    def row_bytes(self) -> int:
        return fp8_row_bytes(self.width, self.rope_dim, self.scale_fp32)

    @property
    def format(self) -> tuple:
        return super().format + (self.rope_dim, self.scale_fp32)

    def empty_like(self, page_rows: int, device: torch.device, account: Any = None) -> "PagedRows":
        return Fp8PagedRows(self.width, self.dtype, device, page_rows, device, rope_dim=self.rope_dim,
                            scale_fp32=self.scale_fp32, account=account, codec=self.codec)

    def _alloc(self, rows: int | None = None):
        n = rows or self.page_rows
        q = self._empty("codes", (n, self.nope), torch.float8_e4m3fn)
        sdt = torch.float32 if self.scale_fp32 else torch.uint8
        s = self._empty("scales", (n, self.scale_cols), sdt, zero=True)
        r = self._empty("rope", (n, self.rope_dim), torch.bfloat16)
        return q, s, r

    def _parts(self, page) -> tuple[torch.Tensor, ...]:
        return page

    def _slice(self, page, n: int, start: int = 0):
        return tuple(t[start : start + n] for t in page)

    def _encode(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = rows.shape[0]
        x = rows.to(self.device, torch.float32)
        blocks = x[:, : self.nope].reshape(n, self.n_blocks, self.block)
        # power-of-two scale, amax / s <= 448, the exponent exact (formats.quant.pow2_exponent; +-126 keeps s normal)
        exp = pow2_exponent(blocks.abs().amax(dim=-1), self.FP8_MAX, limit=126)
        q = (blocks / torch.exp2(exp).unsqueeze(-1)).clamp(-self.FP8_MAX, self.FP8_MAX).reshape(
            n, self.nope).to(torch.float8_e4m3fn)
        s = torch.exp2(exp) if self.scale_fp32 else (exp + 127).to(torch.uint8)  # the padding columns stay zero
        return q, s, x[:, self.nope :].to(torch.bfloat16) if self.rope_dim else x[:, self.nope :]

    def _fused_put(self, rows: torch.Tensor) -> bool:
        """Whether the codec encodes these rows (in a dtype it encodes with _encode's bits, on the pages' device)."""
        return self.codec is not None and rows.dtype in self.codec.ENCODE_DTYPES and rows.device == self.device

    def _put(self, page, r0: int, rows: torch.Tensor) -> None:
        if self._fused_put(rows):
            self.codec.put(rows, page, self.block, self.scale_fp32, row0=r0)
        else:
            super()._put(page, r0, rows)

    def put_at(self, page, at: torch.Tensor, rows: torch.Tensor) -> None:
        if self._fused_put(rows):
            self.codec.put(rows, page, self.block, self.scale_fp32, at=at.to(self.device).reshape(-1))
        else:
            super().put_at(page, at, rows)

    def _decode(self, q, s, r) -> torch.Tensor:
        n = q.shape[0]
        if self.dtype in (torch.bfloat16, torch.float16):
            return (self._decode_bf16 if self.dtype == torch.bfloat16 else self._decode_fp16)(q, s, r)
        scale = s.float() if self.scale_fp32 else torch.exp2(s[:, : self.n_blocks].float() - 127)
        nope = (q.float().view(n, self.n_blocks, self.block) * scale.unsqueeze(-1)).view(n, self.nope)
        out = torch.cat([nope, r.float()], dim=-1) if self.rope_dim else nope
        return out.to(device=self.compute_device, dtype=self.dtype)

    def _get(self, page, n: int) -> torch.Tensor:
        q, s, r = page
        if self.codec is not None and self.dtype in self.codec.READ_DTYPES:
            return self.codec.read(page, n, self.dtype, self.block, self.scale_fp32)
        return self._decode(q[:n], s[:n], r[:n])

    def _take(self, page, rows: torch.Tensor) -> torch.Tensor:
        q, s, r = page
        rows = rows.to(self.device)
        if self.codec is not None and self.dtype in self.codec.READ_DTYPES and rows.dim() == 1:
            return self.codec.read(page, 0, self.dtype, self.block, self.scale_fp32, idx=rows)
        return self._decode(q[rows], s[rows], r[rows])


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory where state on `device` would be allocated: available host RAM (psutil) for the CPU; for CUDA the
    device's free memory (`torch.cuda.mem_get_info`) plus what torch's caching allocator holds unused
    (reserved - allocated), which it hands out again before asking the driver (after a /reset the freed KV pages
    sit there, and mem_get_info alone would refuse the same context again); None when it cannot be known."""
    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            free, _total = torch.cuda.mem_get_info(dev)
            cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
            return int(free) + max(0, int(cached))
        if dev.type == "cpu":
            import psutil

            return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - an unknown answer is better than a crash in the ramp
        return None
    return None
