"""The static decode state's entry buffers as KV pages (homerun.models.deepseek_v4.static_decode): a buffer is
allocated (and charged) as one of a store's pages, whole pages of the store's own size (decode_bytes.buffer_rows,
the plan's formula), and the store's pages become views of it, so adopting it never changes the store's page size."""

from __future__ import annotations

from typing import Any

import torch

from homerun.models.decode_bytes import buffer_rows
from homerun.models.kv import PagedRows


def _new_buffer(owner: PagedRows, cap: int) -> tuple[Any, list]:
    """A zeroed static buffer of cap entry rows in owner's format, whole pages of owner's base size and at least
    cap + 1 rows (decode_bytes.buffer_rows; row cap: the dump row of non-closing steps), allocated (and charged) as
    one of owner's pages. -> (the buffer as a page, the budget tags it added to owner's)."""
    mark = len(owner._tags)
    try:
        page = owner._alloc(buffer_rows(cap, owner.page_rows_base))
    except BaseException:  # a part that did not fit: the parts charged before it go back (the store lives on)
        if owner.account is not None:
            owner.account.free_all(owner._tags[mark:])
        del owner._tags[mark:]
        raise
    for t in owner._parts(page):
        t.zero_()
    return page, owner._tags[mark:]


def _page_rows(store: PagedRows, cap: int, rows: int) -> int:
    """The page size of a store viewing a static buffer of cap entry rows (rows in all): its own where the buffer
    holds whole pages of it (a buffer it allocated: always), so every eager reader (prefill's query blocks, the
    indexer's page temporaries, snapshots, growth past the bucket) walks the pages it would have without the graphs;
    else (a buffer of another store's pages) the largest power of two under it that divides cap (cap if smaller)."""
    pr = store.page_rows_base
    if -(-cap // pr) * pr <= rows:
        return pr
    if cap % pr:
        pr = min(cap, 1 << (pr.bit_length() - 1))
    return pr if cap % pr == 0 else cap


def _views(store: PagedRows, page, cap: int) -> list:
    """The buffer `page`'s pages over its first cap rows as store's (views of store.page_rows rows each)."""
    return [store._slice(page, store.page_rows, r0) for r0 in range(0, cap, store.page_rows)]


def static_store(like: PagedRows, cap: int, device: torch.device, account: Any = None) -> tuple[PagedRows, Any, list]:
    """An empty store of like's format whose first page is a static buffer of cap + 1 rows (its first cap rows).
    -> (store, the whole buffer as a page, the budget tags it is charged under to `account`: freed with the store)."""
    store = like.empty_like(cap, device, account)
    page, tags = _new_buffer(store, cap)
    store.pages.append(store._slice(page, cap))
    return store, page, tags


def _move_tags(tags: list, src: PagedRows, dst: PagedRows) -> None:
    """The budget tags move from src to dst, so that src's finalizer no longer frees them and dst's does."""
    for tag in tags:
        if tag in src._tags:
            src._tags.remove(tag)
            dst._tags.append(tag)
