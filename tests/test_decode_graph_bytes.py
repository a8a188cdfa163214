"""The static decode state's device bytes (homerun.models.decode_bytes; issue 13, "VRAM as planned"): the formula
against V4-Flash's shapes worked out by hand, its read transient against the bytes a read really keeps alive, and
the plan's charge where the runtime captures decode graphs. CPU only, no Triton."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from homerun.models.decode_bytes import StaticShape, read_transient_bytes, static_bytes
from homerun.errors import DoesNotFitError
from homerun.models.deepseek_v4.static_decode import _new_buffer, static_store
from homerun.models.kv import Fp8PagedRows, PagedRows
from homerun.plan.graph_memory import PLAN_PAGE_TOKENS
from live_bytes import LiveBytes
from offload.devices import StandInDevice

# V4-Flash: 43 layers (21 CSA, 20 HCA, 2 sliding), head_dim 512 (rope 64), indexer keys of 128, window 128
FLASH = StaticShape(n_layers=43, n_csa=21, n_hca=20, head_dim=512, rope_dim=64, index_head_dim=128, window=128)
# Small per-layer state in bf16, the same at every context:
#   windows 43 x 128 x 512 x 2                                                   = 5,636,096
#   CSA  21 x (open kv+gate 2 x 4 x 1024 x 2 + overlap 4 x 512 x (2 + 4)          = 28,672
#              + indexer 2 x 4 x 256 x 2 + 4 x 128 x (2 + 4)                      =  7,168)  = 752,640
#   HCA  20 x open kv+gate 2 x 128 x 512 x 2                                      = 5,242,880
FLASH_ARENA = 5_636_096 + 752_640 + 5_242_880


# The entries the KV of the context already charges (T / rate rows a store, the bytes rounded up as the plan's KV
# layout rounds them) and the largest store's rows at that context in whole pages (1,024-token pages: 256 CSA rows),
# plus the last buffer's dump row (one store's old pages while a load moves them into its buffer): fp8 584 B a
# CSA/HCA entry (the largest), bf16 1,024 B.
KV_32K_FP8 = 21 * 32_768 * 716 + 20 * 1_024 * 584
KV_1M_FP8 = 21 * 262_144 * 716 + 20 * 8_192 * 584


@pytest.mark.parametrize("ctx, kv_dtype, bucket, entries, positions, workspace, kv_entries, moving", [
    # fp8 rows: entry 448 + 8 scale bytes + 64 x 2 rope = 584, key 128 + 4 = 132.
    # 1M: 21 x (262,144 + 1) x (584 + 132) + 20 x (8,192 + 1) x 584; the largest transient: the indexer keys
    # decoded in bf16 beside their scores, 262,144 x (128 x 2 + 4) (the keys' read, 262,144 x (2 + 256), and the
    # HCA read, 8,192 x (8 x 2 + 1,024), are less; through fp32 the keys' read was 2 x 262,144 x 128 x 4)
    (1_048_576, "fp8", 1_048_576, 3_941_612_220 + 95_694_240, (262_144 + 8_192) * 8, 68_157_440,
     KV_1M_FP8, (262_144 + 1) * 584),
    # 128K: 21 x 32,769 x 716 + 20 x 1,025 x 584; 32,768 x (128 x 2 + 4)
    (131_072, "fp8", 131_072, 492_714_684 + 11_972_000, (32_768 + 1_024) * 8, 8_519_680, KV_32K_FP8,
     (32_768 + 1) * 584),
    # bucket padding: 131,073 tokens need the 262,144 bucket: 21 x 65,537 x 716 + 20 x 2,049 x 584; the KV one token
    # more is the same whole pages (no row closed: 32,768 CSA rows, 1,024 HCA rows)
    (131_073, "fp8", 262_144, 985_414_332 + 23_932_320, (65_536 + 2_048) * 8, 17_039_360, KV_32K_FP8,
     (32_768 + 1) * 584),
    # bf16 rows (1,024 and 256 B) are read as views: the transient is the indexer's scores, 262,144 x (4 + 4 + 1)
    (1_048_576, "bf16", 1_048_576, 21 * 262_145 * 1_280 + 20 * 8_193 * 1_024, (262_144 + 8_192) * 8, 2_359_296,
     21 * 262_144 * 1_280 + 20 * 8_192 * 1_024, (262_144 + 1) * 1_024),
])
def test_static_bytes_of_v4_flash_by_hand(ctx, kv_dtype, bucket, entries, positions, workspace, kv_entries, moving):
    """The entry buffers are the session's KV (the state adopts its stores): beside the KV only their padding (the
    bucket's rows past the context's, the dump rows) counts, and one store's old pages while a load moves them."""
    b = static_bytes(FLASH, ctx, kv_dtype, act_bytes=2, page_tokens=1_024)
    assert b.bucket_tokens == bucket
    assert b.entries == entries
    assert b.arena == FLASH_ARENA
    assert b.positions == positions
    assert b.snapshots == 2 * FLASH_ARENA  # the states a session holds, and the next step's copy
    assert b.workspace == workspace
    assert (b.kv_entries, b.moving, b.padding) == (kv_entries, moving, entries - kv_entries)
    assert b.total == entries - kv_entries + moving + 3 * FLASH_ARENA + positions + workspace


@pytest.mark.parametrize("page_tokens, csa_rows, hca_rows", [(4_096, 1_024, 32), (3_072, 768, 24), (256, 65, 3)])
def test_a_bucket_under_a_page_is_charged_a_whole_page(page_tokens, csa_rows, hca_rows):
    """A 256-token bucket (64 CSA entry rows, 2 HCA) adopted by stores of bigger pages: each buffer is one whole page
    of the store's (static_pages: the store's page size never shrinks), in fp8 584 B an entry row, 132 B a key row;
    a page that the bucket fills gets the dump row past it."""
    b = static_bytes(FLASH, 200, "fp8", page_tokens=page_tokens)
    assert b.entries == 21 * csa_rows * (584 + 132) + 20 * hca_rows * 584


def test_the_moving_store_is_charged_in_whole_pages():
    """At 131,473 tokens in 4,096-token pages (1,024 CSA rows): the largest store's 32,868 rows in 33 pages = 33,792
    rows, and the dump row of the last bucket's buffer (a prompt that crossed the bucket left it, pages after it)."""
    assert static_bytes(FLASH, 131_473, "fp8", page_tokens=4_096).moving == (33 * 1_024 + 1) * 584


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1 << 21), st.sampled_from(["fp8", "bf16"]))
def test_the_graph_layout_never_charges_less_for_more_tokens(t, kv_dtype):
    """The plan's KV + static state: non-decreasing in the context (the entries the KV charges rounded as the KV
    layout rounds them), so its bisection finds every context that fits (V4-Flash fp8 at 131,072 came back 131,008)."""
    from homerun.plan.graph_memory import with_decode_graphs
    from homerun.plan.inventory import resolve_model
    from homerun.plan.specs import kv_layout

    spec, _ = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    g = with_decode_graphs(kv_layout(spec, kv_dtype), spec)
    assert g.bytes_for(t) <= g.bytes_for(t + 1)
    assert g.tokens_for(g.bytes_for(t)) >= t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width, rope, scale_fp32, rows", [(512, 64, False, 8192), (128, 0, True, 32768)])
def test_fp8_read_transient_is_what_a_read_keeps_alive(dtype, width, rope, scale_fp32, rows):
    """A static fp8 store read whole, as the graphed step reads it (V4-Flash widths: the HCA entries of a 1M bucket,
    the indexer keys of a 128K one): the peak of the bytes the read allocates and keeps alive equals the formula."""
    like = Fp8PagedRows(width, dtype, "cpu", 16, rope_dim=rope, scale_fp32=scale_fp32)
    store, page, _ = static_store(like, rows, torch.device("cpu"))
    store._put(page, 0, torch.randn(rows, width, generator=torch.Generator().manual_seed(0)))
    with LiveBytes() as live:
        out = store._get(store.pages[0], store.page_rows)
    assert out.shape == (rows, width)
    assert live.peak_bytes == read_transient_bytes(rows, width, rope, scale_fp32, "fp8", dtype.itemsize)


@pytest.mark.parametrize("width, rope, scale_fp32, rows", [(512, 64, False, 8192), (128, 0, True, 32768)])
def test_a_bf16_read_keeps_no_fp32_copy(width, rope, scale_fp32, rows):
    """In bf16 compute a whole read holds the output and the bf16 scales only (and, for ue8m0 scales, their fp32
    powers of two, freed before the output is made): 2 B a dim and 2 B a scale block, under fp32 codes."""
    like = Fp8PagedRows(width, torch.bfloat16, "cpu", 16, rope_dim=rope, scale_fp32=scale_fp32)
    store, page, _ = static_store(like, rows, torch.device("cpu"))
    with LiveBytes() as live:
        store._get(store.pages[0], store.page_rows)
    n_blocks = 1 if scale_fp32 else (width - rope) // 64
    assert live.peak_bytes == rows * (width * 2 + n_blocks * 2) < rows * (width - rope) * 4


def _decode_via_fp32(st, q, s, r):  # Fp8PagedRows._decode before it decoded bf16 without fp32 copies
    n = q.shape[0]
    scale = s.float() if st.scale_fp32 else torch.exp2(s[:, : st.n_blocks].float() - 127)
    nope = (q.float().view(n, st.n_blocks, st.block) * scale.unsqueeze(-1)).view(n, st.nope)
    return (torch.cat([nope, r.float()], dim=-1) if st.rope_dim else nope).to(st.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width, rope, scale_fp32", [(512, 64, False), (128, 0, True)])
def test_the_half_decodes_have_the_fp32_decodes_bits(width, rope, scale_fp32, dtype):
    """Every e4m3 byte but the two NaNs (0x7f, 0xff), in every block, under every scale _encode writes (2^-126 ..
    2^126: ue8m0 bytes 1 .. 253), including the products below the dtype's normal range (fp16: subnormals, signed
    zeros) and above its largest value (inf), and the scales fp16 cannot hold (below 2^-24, above 2^15)."""
    st = Fp8PagedRows(width, dtype, "cpu", 16, rope_dim=rope, scale_fp32=scale_fp32)
    g = torch.Generator().manual_seed(0)
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    exps = torch.arange(-126, 127).repeat_interleave(8)  # 8 rows a scale: >= 1,024 codes, every byte under each
    n = exps.numel()
    q = codes[(torch.arange(n * st.nope) % codes.numel()).view(n, st.nope)]
    if scale_fp32:
        s = torch.exp2(exps.float()).unsqueeze(1)
    else:
        s = torch.zeros(n, st.scale_cols, dtype=torch.uint8)
        s[:, : st.n_blocks] = (exps + 127).to(torch.uint8).unsqueeze(1)
    r = torch.randn(n, rope, generator=g).to(torch.bfloat16)
    q = q.view(torch.float8_e4m3fn)
    new, old = st._decode(q, s, r), _decode_via_fp32(st, q, s, r)
    assert new.dtype == old.dtype == dtype
    assert torch.equal(new.view(torch.int16), old.view(torch.int16))
    tiny = torch.finfo(dtype).tiny  # the smallest normal: the edges were reached (subnormals, zeros, inf)
    assert old.isinf().any() and (old != 0).logical_and(old.abs() < tiny).any() and (old[:, : st.nope] == 0).any()


def test_a_store_in_the_compute_dtype_is_read_without_a_copy():
    store, page, _ = static_store(PagedRows(512, torch.bfloat16, "cpu", 16), 4096, torch.device("cpu"))
    with LiveBytes() as live:
        store._get(store.pages[0], store.page_rows)
    assert live.peak_bytes == read_transient_bytes(4096, 512, 64, False, "bf16", 2) == 0


# ---- the plan --------------------------------------------------------------------------------------------------


def _flash_plan(profile: str, **opts):
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import PlanOptions, plan
    from profiles import load_profile

    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    return plan(spec, inv, load_profile(profile), PlanOptions(**opts))


def _graph_rows(p):
    return [r for r in p.placement if r.what.startswith("decode graphs'")]


def test_one_gpu_plan_charges_the_static_state_on_top_of_the_kv():
    p = _flash_plan("rtx5090-192gb", kv_dtype="fp8", context_tokens=131_072)
    g = static_bytes(FLASH, 131_072, "fp8", page_tokens=PLAN_PAGE_TOKENS)
    (row,) = _graph_rows(p)
    assert row.bytes == g.total and row.device == "gpu0"
    (kv_row,) = [r for r in p.placement if r.what.startswith("KV cache")]
    assert (p.layout.stages[0].kv_bytes, p.layout.stages[0].graph_bytes) == (kv_row.bytes, g.total)
    decision = next(d for d in p.decisions if d["what"] == "decode graphs")
    assert "131,072" in decision["reason"] and "transient" in decision["reason"]


def test_the_planned_context_fits_kv_and_static_state():
    """The plan's longest context is the largest whose KV and static state (of its bucket) fit the KV budget: the
    plan's own (rtx4090-128gb, where 1M fits now that the state is not a second copy of the KV), and a budget one
    byte short of 1M's."""
    from homerun.plan.graph_memory import GraphKvLayout

    from homerun.plan.inventory import resolve_model
    from homerun.plan.specs import kv_layout

    p = _flash_plan("rtx4090-128gb", kv_dtype="bf16")
    ctx = p.context
    flat = kv_layout(resolve_model("deepseek-ai/DeepSeek-V4-Flash")[0], "bf16")
    assert (flat.bytes_per_token, flat.constant_bytes) == (ctx["kv_bytes_per_token"], ctx["kv_constant_bytes"])
    kv = GraphKvLayout(ctx["kv_dtype"], flat.bytes_per_token, flat.constant_bytes, "", flat.stores, flat.page_tokens,
                       FLASH)
    t, budget = ctx["max_tokens"], ctx["kv_capacity_bytes"]
    assert t == 1_048_576 and kv.bytes_for(t) <= budget
    t = kv.tokens_for(kv.bytes_for(1_048_576) - 1)
    assert kv.bytes_for(t) <= kv.bytes_for(1_048_576) - 1 < kv.bytes_for(t + 1) and t < 1_048_576
    assert kv.bytes_for(t) == kv.kv_bytes_for(t) + static_bytes(FLASH, t, "bf16", page_tokens=PLAN_PAGE_TOKENS).total


# V4-Flash over 2 H100s, layers split [22, 21]: gpu0 holds layers 0-21 (2 sliding, 10 CSA, 10 HCA), gpu1 layers 22-42
# (11 CSA, 10 HCA). bf16 KV at a context of 65,536 (bucket 65,536: 16,384 CSA rows, 512 HCA rows; entry 1,024 B, key
# 256 B), each stage's share of the static state by hand:
# The entries are the KV, charged beside: only the dump rows (the bucket equals the context), and the largest store's
# 16,384 rows (16 whole pages of the plan's 4,096 tokens: 1,024 CSA rows) and a dump row x 1,024 B moving while a
# load adopts it: 16,385 x 1,024 = 16,778,240.
#   gpu0 padding 10 x 1,280 + 10 x 1,024                                          =      23,040
#        arena   22 x 128 x 512 x 2 + 10 x (28,672 + 7,168) + 10 x 262,144         =   5,863,424 (x 3 with its copies)
#   gpu1 padding 11 x 1,280 + 10 x 1,024                                          =      24,320
#        arena   21 x 128 x 512 x 2 + 11 x 35,840 + 10 x 262,144                   =   5,768,192 (x 3)
#   both: row numbers (16,384 + 512) x 8 = 135,168; the transient (bf16: the indexer's scores) 16,384 x 9 = 147,456
FLASH_2XH100_GRAPH_BYTES = [23_040 + 16_778_240 + 3 * 5_863_424 + 135_168 + 147_456,
                            24_320 + 16_778_240 + 3 * 5_768_192 + 135_168 + 147_456]


def test_two_gpus_all_in_vram_charge_each_stage_its_layers_state():
    """An all-VRAM split captures one whole-step graph per device (homerun.engine.graph_sites): each GPU is charged
    the static state of its own layers, in its row, its Stage and its decision."""
    p = _flash_plan("2xh100", kv_dtype="bf16", context_tokens=65_536)
    assert p.mode == "all-vram"
    assert [(s.first_layer, s.stop_layer) for s in p.layout.stages] == [(0, 22), (22, 43)]
    rows = _graph_rows(p)
    assert [(r.device, r.bytes) for r in rows] == [("gpu0", FLASH_2XH100_GRAPH_BYTES[0]),
                                                   ("gpu1", FLASH_2XH100_GRAPH_BYTES[1])]
    assert [s.graph_bytes for s in p.layout.stages] == FLASH_2XH100_GRAPH_BYTES
    kv_rows = [r.bytes for r in p.placement if r.what.startswith("KV cache")]
    assert [s.kv_bytes for s in p.layout.stages] == kv_rows
    # each stage's KV is its own layers' stores (16,384 CSA rows of 1,280 B, 512 HCA rows of 1,024 B, whole pages),
    # not a share by layer count (gpu0's 2 sliding layers hold no pages); their small state is the arena above
    assert kv_rows == [10 * 16_384 * 1_280 + 10 * 512 * 1_024, 11 * 16_384 * 1_280 + 10 * 512 * 1_024]
    decisions = [d for d in p.decisions if d["what"] == "decode graphs"]
    assert [d["choice"].split(":")[0] for d in decisions] == ["gpu0", "gpu1"]
    assert "layers 22-42 (11 CSA, 10 HCA)" in decisions[1]["reason"]


def test_two_gpus_promise_a_context_that_fits_the_tightest_stage():
    """The longest context is the largest whose KV share and static state fit on every GPU: at max_tokens each stage
    fits its free bytes, one more token does not fit some stage (here the bucket doubles)."""
    from homerun.plan.graph_memory import stage_bytes, stage_shapes
    from homerun.plan.inventory import resolve_model
    from homerun.plan.specs import kv_layout

    p = _flash_plan("2xh100", kv_dtype="fp8", context_tokens=65_536)
    assert p.mode == "all-vram"
    spec, _ = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    kv, t = kv_layout(spec, "fp8"), p.context["max_tokens"]
    counts = [s.stop_layer - s.first_layer for s in p.layout.stages]
    shapes, fracs = stage_shapes(spec, counts), [k / spec.num_layers for k in counts]
    gpus = [d for d in p.devices if d.kind == "gpu"]
    free = [d.capacity_bytes - d.used_bytes + s.kv_bytes + s.graph_bytes for d, s in zip(gpus, p.layout.stages)]
    assert 65_536 < t < spec.max_position_embeddings
    assert all(stage_bytes(kv, f, sh, t) <= b for f, sh, b in zip(fracs, shapes, free))
    assert any(stage_bytes(kv, f, sh, t + 1) > b for f, sh, b in zip(fracs, shapes, free))


def test_several_gpus_with_host_experts_capture_no_graphs_and_charge_none():
    """A hybrid split (an expert cache on each GPU) runs decode eagerly across devices (the rule the runtime shares,
    homerun.plan.records.graphs_across_devices_reason): no static state charged."""
    p = _flash_plan("2xh100", kv_dtype="bf16", context_tokens=262_144)
    assert p.mode == "hybrid"
    assert not _graph_rows(p) and all(s.graph_bytes == 0 for s in p.layout.stages)
    decision = next(d for d in p.decisions if d["what"] == "decode graphs")
    assert decision["choice"] == "none" and "43 layers' experts are not resident" in decision["reason"]


def test_a_buffer_that_does_not_fit_leaves_the_store_charged_as_before():
    """A static buffer allocated as one of a session store's pages: when a part does not fit (fp8: the codes, 1,000
    rows x 448 B = 448,000 B, fit the 448,100-byte budget, the scales do not), the parts charged before it go back
    and the store keeps no tag of them; a buffer that fits is then charged whole."""
    dev = StandInDevice("gpu0", 448_100)
    st = Fp8PagedRows(512, torch.bfloat16, "cpu", 16, rope_dim=64, account=dev)
    with pytest.raises(DoesNotFitError):
        _new_buffer(st, 999)
    assert dev.used_bytes == 0 and st._tags == []
    page, tags = _new_buffer(st, 15)
    assert tags == st._tags and dev.used_bytes == sum(t.numel() * t.element_size() for t in page) == 16 * 584
