"""Device bytes of the decode step's static attention state (issue 13, "VRAM as planned"), one formula for the
planner (homerun.plan.graph_memory, which charges it where the runtime captures decode graphs) and the runtime
(homerun.models.deepseek_v4.static_decode, which charges the same bytes to the layer's budgeted device). Torch-free,
so the planner imports it without torch.

What a static state of capacity bucket B holds on the device (static_decode's module docstring), per part:

  entries      every compressor's static entry buffer: B // rate + 1 rows (the last: the dump row of non-closing
               steps) in the store's row format, CSA entries and indexer keys, HCA entries. These ARE the session's
               KV (the state adopts its stores), so beside the KV that a context of T tokens charges (`kv_entries`:
               T // rate rows a store in whole pages, as the plan's KV layout charges them and the runtime allocates
               them, so the sum of the two never falls as T grows) only the bucket's padding counts (`padding`).
  moving       while a load adopts the stores, one store's old pages beside its new buffer: the largest store's
               T // rate rows rounded up to its page, plus the dump row of the last bucket's buffer (the prefill's
               pages at the first graphed step; at a bucket change the last buffer and the pages an eager chunk
               appended past it, pages of the store's own size: static_decode._page_rows).
  arena        the small per-layer tensors (static_decode._Arena): the window [W, Dh], each compressor's open window
               (kv and gate, [rate, width]: CSA and the indexer keep two series, width 2 x dim) and the CSA overlap
               slices (kv in the compute dtype, gate in fp32).
  positions    the indexer's row numbers over the capacity (int64, one per CSA entry row): the top-k's mask.
  snapshots    two copies of the arena: the states a session holds view one (StaticDecodeKV.states), and the next
               step makes the next one while those are still held.
  workspace    the step's largest transient (in a CUDA graph's private pool, held while the graph lives): reading a
               store over the whole capacity. An fp8 store dequantizes it (Fp8PagedRows._decode: in bf16 or fp16
               compute straight into the output with 2-byte scales, exact; in fp32 codes to fp32, times the scales,
               the rope columns joined), the indexer scores it ([1, cap]
               fp32, masked into a second one, and a bool mask); a store of another format is read as a view.

The step's other activations (one token's) are small and are the stated fixed overhead, as are the allocator's
rounding and the top-k's scratch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# The smallest context capacity of a static decode state (tokens): the buckets double from here, so a sequence of L
# tokens is captured about log2(L / 256) + 1 times and pads its compressed rows at most twofold.
MIN_BUCKET_TOKENS = 256
# The runtime's smallest KV page (tokens of context; homerun.models.kv re-exports it): a page is at least this and
# 1/32 of the first ramp step, a multiple of the largest compression rate (`kv_page_tokens`).
DEFAULT_PAGE_TOKENS = 1024
FP8_BLOCK = 64  # dims per ue8m0 scale of an FP8 compressed entry (homerun.models.kv.Fp8PagedRows)
_F32 = 4


# The runtime's context ramp where none is asked for (homerun.plan.records re-exports it): these steps up to the
# model's max_position_embeddings (`default_ramp`); its first step sets the default KV page (`kv_page_tokens`).
RAMP_TOKENS = (131072, 262144, 393216, 524288, 786432, 1048576)


def default_ramp(max_position: int) -> tuple[int, ...]:
    """The runtime's ramp for a model of max_position tokens (homerun.engine.runtime.load): the standard steps up to
    it, else the model's max alone."""
    return tuple(r for r in RAMP_TOKENS if r <= max_position) or (max_position,)


def paged_bytes(stores: tuple[tuple[int, int, int], ...], tokens: int, page_tokens: int) -> int:
    """The bytes of entry stores at a context of `tokens` in whole pages of page_tokens tokens (PagedRows.reserve:
    page_tokens // rate rows a page, at least one); stores: (count, rate, bytes per row) per kind of store."""
    total = 0
    for count, rate, row_b in stores:
        page = max(1, page_tokens // rate)
        total += count * -(-(tokens // rate) // page) * page * row_b
    return total


def bucket_tokens(pos: int, min_tokens: int = MIN_BUCKET_TOKENS) -> int:
    """The context capacity (tokens) whose captured core serves position pos: a power of two, >= min_tokens."""
    return max(min_tokens, 1 << pos.bit_length())  # > pos: positions 0 .. cap-1


def buffer_rows(cap: int, page_rows: int) -> int:
    """The rows of a static entry buffer of cap entry rows adopted by a store of page_rows rows a page: whole pages
    (its page size never shrinks), at least one past cap (row cap: the dump row of non-closing steps)."""
    return cap + 1 if cap % page_rows == 0 else -(-cap // page_rows) * page_rows


def kv_page_tokens(rate: int, first_ramp_tokens: int, asked: int | None = None) -> int:
    """The runtime's KV page in tokens of context: `asked`, else at least DEFAULT_PAGE_TOKENS and 1/32 of the first
    ramp step (past that step the last pages' spare room is under ~3% of the KV); a multiple of the largest
    compression rate `rate`, so every store gets whole rows."""
    pt = asked or max(DEFAULT_PAGE_TOKENS, first_ramp_tokens // 32)
    return max(rate, -(-pt // rate) * rate)


def fp8_row_bytes(width: int, rope_dim: int, scale_fp32: bool) -> int:
    """Bytes per stored row of an FP8 KV store (homerun.models.kv.Fp8PagedRows): 584 for V4's 512-dim entries, 132
    for its 128-dim indexer keys."""
    nope = width - rope_dim
    if scale_fp32:
        return nope + 4 + rope_dim * 2
    return nope + -(-(nope // FP8_BLOCK) // 8) * 8 + rope_dim * 2


@dataclass(frozen=True)
class StaticShape:
    """The attention shapes a V4 static decode state depends on (from a ModelArgs or a plan's ModelSpec)."""

    n_layers: int
    n_csa: int
    n_hca: int
    head_dim: int
    rope_dim: int
    index_head_dim: int
    window: int
    csa_rate: int = 4
    hca_rate: int = 128


@dataclass(frozen=True)
class StaticBytes:
    """The parts of a static state of capacity `bucket_tokens` (module docstring), in bytes."""

    bucket_tokens: int
    entries: int
    arena: int
    positions: int
    snapshots: int
    workspace: int
    kv_entries: int = 0  # the entries' bytes the KV of the context already charges (static_bytes; 0: none)
    moving: int = 0

    @property
    def padding(self) -> int:
        """The entry buffers' bytes past the context's KV: the bucket's rows past T // rate, and the dump rows."""
        return max(0, self.entries - self.kv_entries)

    @property
    def total(self) -> int:
        """The bytes beside the context's KV (all of the entries where no KV is charged with them: capacity_bytes)."""
        return self.padding + self.moving + self.arena + self.positions + self.snapshots + self.workspace

    @property
    def reserved(self) -> int:
        """The bytes the runtime charges without allocating them through the budget: copies and transients."""
        return self.snapshots + self.workspace


def row_bytes(width: int, rope_dim: int, scale_fp32: bool, kv_dtype: str, act_bytes: int) -> int:
    """Bytes per stored row of a store of kv_dtype ("auto": the compute dtype of act_bytes per element)."""
    if kv_dtype == "fp8":
        return fp8_row_bytes(width, rope_dim, scale_fp32)
    return width * (2 if kv_dtype == "bf16" else act_bytes)


def entry_stores(shape: StaticShape, kv_dtype: str, act_bytes: int) -> tuple[tuple[int, int, int], ...]:
    """(count, rate, bytes per row) of a V4 model's entry stores: CSA entries and indexer keys, HCA entries."""
    s = shape
    entry_b = row_bytes(s.head_dim, s.rope_dim, False, kv_dtype, act_bytes)
    key_b = row_bytes(s.index_head_dim, 0, True, kv_dtype, act_bytes)
    return (s.n_csa, s.csa_rate, entry_b), (s.n_csa, s.csa_rate, key_b), (s.n_hca, s.hca_rate, entry_b)


def small_state_bytes(shape: StaticShape, act_bytes: int) -> int:
    """A sequence's small state at its largest, in the compute dtype (the static state's arena holds the same): each
    layer's window [W, Dh], each compressor's open window (kv and gate, [rate, width]: CSA and the indexer keep two
    series, width 2 x dim) and the CSA overlap slices (kv in the compute dtype, gate in fp32)."""
    s = shape

    def opened(rate: int, dim: int, overlap: bool) -> int:
        width = 2 * dim if overlap else dim
        return 2 * rate * width * act_bytes + (rate * dim * (act_bytes + _F32) if overlap else 0)

    return (s.n_layers * s.window * s.head_dim * act_bytes
            + s.n_csa * (opened(s.csa_rate, s.head_dim, True) + opened(s.csa_rate, s.index_head_dim, True))
            + s.n_hca * opened(s.hca_rate, s.head_dim, False))


def read_transient_bytes(n: int, width: int, rope_dim: int, scale_fp32: bool, kv_dtype: str, act_bytes: int) -> int:
    """Peak bytes live while n rows of a store are read whole (its `_get`): fp8 decodes them (Fp8PagedRows._decode,
    step by step below; a tensor is freed when its last reference goes), other formats return a view. A compute dtype
    of 2 bytes, bf16 or fp16, is decoded without fp32 copies, into the output with one 2-byte scale per block
    (Fp8PagedRows._decode_bf16 / _decode_fp16: the same bytes). The GPU kernel set's one-launch decoder
    (homerun.kernels.triton.kv_fp8, a store's codec) keeps only the n x width output, never more than this."""
    if kv_dtype != "fp8":
        return 0
    nope = width - rope_dim
    nb = 1 if scale_fp32 else nope // FP8_BLOCK
    if act_bytes == 2:  # bf16 and fp16: the output, written in place, and the scales (fp16: exponents) in 2 bytes
        scale_b = n * nb * 2
        return max(scale_b + (0 if scale_fp32 else n * nb * _F32), scale_b + n * width * 2)  # ue8m0: fp32 first
    scale = 0 if scale_fp32 else n * nb * _F32  # ue8m0 -> fp32 scales (fp32 scales are read as they are)
    cast = n * width * act_bytes if act_bytes != _F32 else 0  # the last .to(dtype); none in fp32
    products = scale + 2 * n * nope * _F32  # codes.float() and its product with the scales
    if not rope_dim:
        return max(products, scale + n * nope * _F32 + cast)
    joined = scale + n * nope * _F32 + n * rope_dim * _F32 + n * width * _F32  # the product, rope.float(), the cat
    return max(products, joined, scale + n * nope * _F32 + n * width * _F32 + cast)


def static_bytes(shape: StaticShape, ctx_tokens: int, kv_dtype: str, act_bytes: int = 2,
                 min_bucket_tokens: int = MIN_BUCKET_TOKENS, *, page_tokens: int) -> StaticBytes:
    """The device bytes of the static state whose bucket holds a context of ctx_tokens (its last position,
    ctx_tokens - 1), entries kept as kv_dtype ("auto" | "bf16" | "fp8"), compute dtype of act_bytes per element,
    the session's KV in pages of page_tokens; its `total` is what the state takes beside the KV of ctx_tokens
    (module docstring)."""
    b = capacity_bytes(shape, bucket_tokens(max(ctx_tokens - 1, 0), min_bucket_tokens), kv_dtype, act_bytes,
                       page_tokens=page_tokens)
    s = shape
    entry_b = row_bytes(s.head_dim, s.rope_dim, False, kv_dtype, act_bytes)
    key_b = row_bytes(s.index_head_dim, 0, True, kv_dtype, act_bytes)
    # the entries' share of the KV as homerun.plan.specs.kv_layout charges it: the stores' whole pages at the context
    kv_entries = paged_bytes(entry_stores(s, kv_dtype, act_bytes), ctx_tokens, page_tokens)

    def held(rate: int) -> int:  # a store's rows at the context, in whole pages, and the last buffer's dump row
        page = max(1, page_tokens // rate)
        return -(-(ctx_tokens // rate) // page) * page + 1

    moving = max([held(s.csa_rate) * max(entry_b, key_b)] * bool(s.n_csa)
                 + [held(s.hca_rate) * entry_b] * bool(s.n_hca), default=0)
    return replace(b, kv_entries=kv_entries, moving=moving)


def capacity_bytes(shape: StaticShape, cap: int, kv_dtype: str, act_bytes: int = 2, *,
                   page_tokens: int | None) -> StaticBytes:
    """static_bytes for a static state of capacity cap tokens (static_decode.StaticDecodeKV's ctx_tokens), its
    buffers adopted by stores in pages of page_tokens (None: held by stores of the bucket's own pages)."""
    s = shape
    n_csa, n_hca = max(1, cap // s.csa_rate), max(1, cap // s.hca_rate)  # entry rows per store (static_decode.caps)
    entry_b = row_bytes(s.head_dim, s.rope_dim, False, kv_dtype, act_bytes)
    key_b = row_bytes(s.index_head_dim, 0, True, kv_dtype, act_bytes)

    def rows(n: int, rate: int) -> int:  # static_decode's buffer of n entry rows
        return buffer_rows(n, n if page_tokens is None else max(1, page_tokens // rate))

    entries = s.n_csa * rows(n_csa, s.csa_rate) * (entry_b + key_b) + s.n_hca * rows(n_hca, s.hca_rate) * entry_b

    arena = small_state_bytes(s, act_bytes)
    positions = (n_csa * 8 if s.n_csa else 0) + (n_hca * 8 if s.n_hca else 0)  # one arange per rate in use
    work = 0
    if s.n_hca:
        work = read_transient_bytes(n_hca, s.head_dim, s.rope_dim, False, kv_dtype, act_bytes)
    if s.n_csa:
        keys = read_transient_bytes(n_csa, s.index_head_dim, 0, True, kv_dtype, act_bytes)
        read_out = n_csa * s.index_head_dim * act_bytes if kv_dtype == "fp8" else 0  # the decoded keys, scored
        # the scores beside the decoded keys; then the scores, their masked copy and the mask (bool)
        work = max(work, keys, read_out + n_csa * _F32, n_csa * (2 * _F32 + 1))
    return StaticBytes(cap, entries, arena, positions, 2 * arena, work)
