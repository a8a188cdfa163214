"""Device bytes of an eager V4 decode step beside the KV (issue 13, "VRAM as planned"): where decode is not captured
(across GPUs with host experts, KV pages off the device, graphs off), each step makes what the plan's KV layout
(homerun.plan.specs.kv_layout: the stores' pages and one small state) does not count. Torch-free; the plan charges
it per GPU stage (homerun.plan.graph_memory.eager_stage_bytes) where decode runs eagerly across GPUs, and the
runtime's ramp check keeps room for it where no static cores run (homerun.engine.graph_bytes.eager_state_bytes);
tests/test_eager_step_bytes.py measures each part against live bytes.

  small      the step's new small state (model._attention_core: the window is a view of the step's keys, W rows; the
             open windows are new concatenations) while the session still holds the one it started from (the KV
             layout's constant): decode_bytes.small_state_bytes, its largest.
  read       the step's largest read of the entries, layer by layer (each layer's is freed before the next):
             HCA reads every closed entry (PagedRows.view: rows over several pages are joined into one tensor, an
             fp8 store decodes every page first); CSA's indexer walks the keys page by page (index_topk_one: an
             fp8 page decoded at a time, two alive across the loop, its scores and the running top-k), then
             gathers the top-k entries (PagedRows.gather: the output, the picked rows and their decode).

One token's activations, the attention kernel's output and the allocator's rounding are the stated fixed overhead.
"""

from __future__ import annotations

from homerun.models.decode_bytes import StaticShape, fp8_row_bytes, read_transient_bytes, small_state_bytes

_INT64 = 8
# index_topk_one's scores and running top-k, bytes per key of a page and of the top-k (an fp32 score, an int64 id,
# their concatenations and the top-k's copies: measured 24-33 on the GPU kernel set; a bound)
INDEX_MERGE_BYTES = 40


def _el(kv_dtype: str, act_bytes: int) -> int:  # a plain store's element (kv_dtype "bf16" or the compute dtype)
    return 2 if kv_dtype == "bf16" else act_bytes


def view_bytes(n: int, page_rows: int, width: int, rope_dim: int, kv_dtype: str, act_bytes: int) -> int:
    """Peak bytes of PagedRows.view(n) of an entry store (HCA's read): rows within one page are a view (fp8: decoded),
    rows over several pages are joined into one new tensor (fp8: every page decoded first, then joined)."""
    if n <= 0:
        return 0
    if kv_dtype != "fp8":
        return 0 if n <= page_rows else n * width * _el(kv_dtype, act_bytes)
    if n <= page_rows:
        return read_transient_bytes(n, width, rope_dim, False, "fp8", act_bytes)
    last = n - (-(-n // page_rows) - 1) * page_rows
    return max(2 * n * width * act_bytes,
               (n - last) * width * act_bytes + read_transient_bytes(last, width, rope_dim, False, "fp8", act_bytes))


def gather_bytes(k: int, n: int, page_rows: int, width: int, rope_dim: int, kv_dtype: str, act_bytes: int) -> int:
    """Peak bytes of PagedRows.gather of k of a store's first n rows (CSA's top-k entries): the output, the picked rows
    (fp8: their stored bytes and their decode); over several pages also the page numbers, a page's mask and offsets
    (at most: every pick in one page)."""
    if k <= 0:
        return 0
    if kv_dtype == "fp8":
        out = k * width * act_bytes
        take = k * fp8_row_bytes(width, rope_dim, False) + read_transient_bytes(k, width, rope_dim, False, "fp8",
                                                                                act_bytes)
    else:
        out = take = k * width * _el(kv_dtype, act_bytes)
    return out + take + (k * (2 * _INT64 + 1) if n > page_rows else 0)


def index_bytes(p: int, k: int, width: int, kv_dtype: str, act_bytes: int) -> int:
    """A bound on index_topk_one's bytes over pages of p indexer keys with a top-k of k: two pages of keys decoded
    (fp8; the loop's page and the next one's), the scores and the running top-k (INDEX_MERGE_BYTES)."""
    return 2 * read_transient_bytes(p, width, 0, True, kv_dtype, act_bytes) + INDEX_MERGE_BYTES * (p + k)


def read_bytes(shape: StaticShape, ctx_tokens: int, kv_dtype: str, act_bytes: int, page_tokens: int,
               index_topk: int) -> int:
    """The eager step's largest read of the entries at a context of ctx_tokens (module docstring)."""
    s, hca, csa = shape, 0, 0
    if s.n_hca:
        hca = view_bytes(ctx_tokens // s.hca_rate, max(1, page_tokens // s.hca_rate), s.head_dim, s.rope_dim, kv_dtype,
                         act_bytes)
    n = ctx_tokens // s.csa_rate
    if s.n_csa and n:
        pr, k = max(1, page_tokens // s.csa_rate), min(index_topk, n)
        gathered = k * _INT64 + gather_bytes(k, n, pr, s.head_dim, s.rope_dim, kv_dtype, act_bytes)  # after the ids
        csa = max(index_bytes(min(pr, n), k, s.index_head_dim, kv_dtype, act_bytes), gathered)
    return max(hca, csa)


def eager_step_bytes(shape: StaticShape, ctx_tokens: int, kv_dtype: str, act_bytes: int, page_tokens: int,
                     index_topk: int) -> int:
    """What an eager decode step at a context of ctx_tokens takes beside the KV layout's bytes: its new small state
    and its largest read (module docstring)."""
    return small_state_bytes(shape, act_bytes) + read_bytes(shape, ctx_tokens, kv_dtype, act_bytes, page_tokens,
                                                            index_topk)
