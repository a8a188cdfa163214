"""An eager V4 decode step's device bytes beside the KV (homerun.models.eager_bytes; issue 13, "VRAM as planned"):
each read's formula against the bytes it really keeps alive (tests/live_bytes.py), a whole eager step on a CUDA
stand-in against the formula, and the plan's charge where decode runs eagerly (across GPUs with host experts).
CUDA stand-ins, Triton under the interpreter (the GPU kernel set's indexer)."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.dispatch import gpu_kernels  # noqa: E402
from homerun.models.decode_bytes import StaticShape, small_state_bytes  # noqa: E402
from homerun.models.deepseek_v4.static_decode import static_shape  # noqa: E402
from homerun.models.eager_bytes import eager_step_bytes, gather_bytes, index_bytes, view_bytes  # noqa: E402
from homerun.models.kv import Fp8PagedRows, PagedRows  # noqa: E402
from live_bytes import LiveBytes  # noqa: E402

GEN = torch.Generator().manual_seed(0)


def _store(kv_dtype: str, width: int, rope_dim: int, page_rows: int, n: int, key: bool = False) -> PagedRows:
    if kv_dtype == "fp8":
        st = Fp8PagedRows(width, torch.bfloat16, "cpu", page_rows, rope_dim=rope_dim, scale_fp32=key)
    else:
        st = PagedRows(width, torch.bfloat16, "cpu", page_rows)
    st.write(0, torch.randn(n, width, generator=GEN).to(torch.bfloat16))
    return st


@pytest.mark.parametrize("kv_dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("n, page_rows", [(10, 16), (16, 16), (40, 16), (100, 32)])
def test_each_read_keeps_the_bytes_its_formula_charges(kv_dtype, n, page_rows):
    """HCA's read of every entry (PagedRows.view: exact), CSA's gather of the top-k (exact in one page; over several
    the page masks are charged at most, every pick in one page) and the indexer's page-by-page top-k on the GPU kernel
    set (a bound: two decoded pages and INDEX_MERGE_BYTES a key, within 10% where fp8 pages dominate)."""
    st = _store(kv_dtype, 512, 64, page_rows, n)
    with LiveBytes() as lb:
        st.view(n)
    assert lb.peak_bytes == view_bytes(n, page_rows, 512, 64, kv_dtype, 2)
    for k in (4, 8):
        bound = gather_bytes(k, n, page_rows, 512, 64, kv_dtype, 2)
        last = n - (n - 1) // page_rows * page_rows  # the last page's rows
        # picks anywhere (several pages: each page's take is smaller), and all in the last page (the formula's case)
        for sel in (torch.randperm(n, generator=GEN)[:k], n - 1 - torch.randperm(last, generator=GEN)[:k]):
            with LiveBytes() as lb:
                st.gather(sel.view(1, -1))
            assert lb.peak_bytes <= bound, (lb.peak_bytes, bound)
        if n <= page_rows:
            assert lb.peak_bytes == bound
        elif last >= k:
            assert lb.peak_bytes >= 0.9 * bound, (lb.peak_bytes, bound)
    keys = _store(kv_dtype, 128, 0, page_rows, n, key=True)
    iq = torch.randn(1, 8, 128, generator=GEN).to(torch.bfloat16)
    iw = torch.randn(1, 8, generator=GEN).to(torch.bfloat16)
    for k in (4, 8):
        with LiveBytes() as lb:
            gpu_kernels().index_topk_one(iq, iw, keys.iter_pages(n), n, k, 0.3, 0.1)
        bound = index_bytes(min(page_rows, n), min(k, n), 128, kv_dtype, 2)
        assert lb.peak_bytes <= bound, (lb.peak_bytes, bound)
        if kv_dtype == "fp8" and n > page_rows:
            assert lb.peak_bytes >= 0.9 * bound, (lb.peak_bytes, bound)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    from tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("eager-bytes"), "mixed", index_topk=4)


# One token's activations (the streams, projections and logits of the tiny model): the stated fixed overhead of the
# whole step's check; measured 3.7 KiB over the formula's bytes in bf16
ACT_OVERHEAD_BYTES = 16 * 1024


@pytest.mark.parametrize("kv_dtype", ["fp8", "bf16"])
def test_an_eager_step_keeps_what_the_plan_charges_beside_the_kv(mixed, kv_dtype):
    """A decode step with graphs off on a cuda stand-in, at the position where its new small state is largest (every
    open window one row short of closing: position 382 of the HCA's 128 and the CSA's 4), pages of 64 tokens (HCA
    and CSA reads over several pages): the bytes it makes and keeps alive at once are the formula's (its new small state
    while the session holds the old one, its largest read of the entries) plus one token's activations; the formula
    is a bound that is not loose (each layer's read comes before the later layers' new states, so the peak is a
    little under their sum)."""
    pl = single_device(3, "standin:0", gpu_path=True, experts="device")
    m = load(mixed, dtype="bfloat16", experts="reference", placement=pl, kv_dtype=kv_dtype, cuda_graphs="off",
             page_tokens=64)
    assert m.decode_graphs is None or not m.decode_graphs.whole_step
    a, ctx = m.net.args, 382
    s = m.session()
    s.feed(torch.randint(0, 512, (ctx,), generator=torch.Generator().manual_seed(7)).tolist())
    with LiveBytes() as lb:
        s.feed([3])
    shape = static_shape(a)
    assert (ctx + 1) % a.hca_rate == a.hca_rate - 1 and (ctx + 1) % a.csa_rate == a.csa_rate - 1
    f = eager_step_bytes(shape, ctx + 1, kv_dtype, 2, m.page_tokens, a.index_topk)
    assert f > small_state_bytes(shape, 2)  # a read is charged
    assert 0.9 * f <= lb.peak_bytes <= f + ACT_OVERHEAD_BYTES, (lb.peak_bytes, f)


# V4-Flash over 2 H100s, bf16 KV at 262,144 tokens, experts in host RAM (hybrid: decode runs eagerly across the GPUs),
# layers split [22, 21]; each GPU's eager step by hand, pages of 4,096 tokens (32 HCA rows, 1,024 CSA rows):
#   small state   gpu0 22 x 128 x 512 x 2 + 10 x 35,840 + 10 x 262,144 = 5,863,424; gpu1 21 x ... + 11 x ...
#                 = 5,768,192
#   largest read  HCA's 2,048 entries over 64 pages joined: 2,048 x 512 x 2 = 2,097,152 (CSA's top-512 ids 512 x 8,
#                 their gather 2 x 512 x 512 x 2 and its page masks 512 x 17: 1,061,376; the indexer's pages of bf16
#                 keys are views: 40 x (1,024 + 512) = 61,440)
FLASH_2XH100_EAGER_BYTES = [5_863_424 + 2_097_152, 5_768_192 + 2_097_152]


def test_a_plan_that_decodes_eagerly_across_gpus_charges_each_its_step():
    from homerun.plan.graph_memory import eager_stage_bytes
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import PlanOptions, plan
    from homerun.plan.specs import kv_layout
    from profiles import load_profile

    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")
    p = plan(spec, inv, load_profile("2xh100"), PlanOptions(kv_dtype="bf16", context_tokens=262_144))
    assert p.mode == "hybrid"
    counts = [s.stop_layer - s.first_layer for s in p.layout.stages]
    assert counts == [22, 21]
    assert eager_stage_bytes(spec, kv_layout(spec, "bf16"), counts, 262_144) == FLASH_2XH100_EAGER_BYTES
    rows = [r for r in p.placement if r.what.startswith("eager decode step")]
    assert [(r.device, r.bytes) for r in rows] == [("gpu0", FLASH_2XH100_EAGER_BYTES[0]),
                                                   ("gpu1", FLASH_2XH100_EAGER_BYTES[1])]
    for i, d in enumerate(d for d in p.devices if d.kind == "gpu"):  # every row of the GPU is in its used bytes
        assert d.used_bytes == sum(r.bytes for r in p.placement if r.device == f"gpu{i}") + sum(d.margins.values())
    decision = next(d for d in p.decisions if d["what"] == "decode graphs")
    assert decision["choice"] == "none" and "eager step" in decision["reason"]
    # one GPU captures graphs (a static state charged instead): no eager row
    one = plan(spec, inv, load_profile("rtx5090-192gb"), PlanOptions(kv_dtype="bf16", context_tokens=131_072))
    assert not [r for r in one.placement if r.what.startswith("eager decode step")]


def test_the_formula_grows_with_the_context():
    """The plan charges the target context's step and may reserve a shorter one: the reads never shrink as it grows."""
    flash = StaticShape(43, 21, 20, 512, 64, 128, 128)
    for kv_dtype in ("fp8", "bf16"):
        b = [eager_step_bytes(flash, t, kv_dtype, 2, 4096, 512) for t in (1, 4096, 65_536, 131_072, 1 << 20)]
        assert b == sorted(b), b


def test_the_ramp_keeps_room_for_the_eager_step(mixed):
    """Without static cores (graphs off), a ramp step's check on the device counts the eager step's bytes at the new
    context beside the KV (graph_bytes.eager_state_bytes, the plan's formula): room for the KV alone is refused,
    room for both grows."""
    from homerun.engine.graph_bytes import eager_state_bytes
    from homerun.errors import ContextFullError

    pl = single_device(3, "standin:0", gpu_path=True, experts="device")
    m = load(mixed, dtype="bfloat16", experts="reference", placement=pl, kv_dtype="fp8", cuda_graphs="off",
             ramp_tokens=(64, 256))
    eager = eager_state_bytes(m.net, 256, "fp8", page_tokens=m.page_tokens)
    assert eager == eager_step_bytes(static_shape(m.net.args), 256, "fp8", 2, m.page_tokens, m.net.args.index_topk)
    dev = m.devices["standin:0"]
    s = m.session()
    dev.budget_bytes = dev.used_bytes + m.kv_bytes_at(256) + eager - 1
    with pytest.raises(ContextFullError, match="standin:0"):
        s._ensure_capacity(70)
    dev.budget_bytes += 1
    s._ensure_capacity(70)
    assert s.capacity_tokens == 256


@pytest.mark.parametrize("kv_dtype", ["fp8", "bf16"])
def test_a_standins_peak_holds_the_eager_step_the_plan_charges(mixed, kv_dtype):
    """Two CUDA stand-ins, experts in host RAM (decode runs eagerly across the GPUs, where the plan charges each its
    eager step: graph_memory.eager_stage_bytes), the step at position 126 (every open window one row short of
    closing: the new small state at its largest): each device's accounted peak past its weights and expert cache is
    its planned KV (pages and small state) plus its eager step, within 10% below and one token's activations above.
    The stand-ins charge what CUDA's allocator would hold (homerun.engine.standin_bytes): the step's tensors and
    the small state the session holds; before, only the pages (under 0.1 of the plan)."""
    from dataclasses import replace

    from homerun.engine.placement import split_layers
    from homerun.plan.graph_memory import eager_stage_bytes, stage_kv_bytes
    from homerun.plan.inventory import resolve_model
    from homerun.plan.specs import kv_layout

    pl = split_layers(3, ["standin:0", "standin:1"], kind="cuda-standin", experts="host", expert_cache_slots=[4, 4])
    m = load(mixed, dtype="bfloat16", experts="reference", placement=pl, kv_dtype=kv_dtype, page_tokens=64)
    assert m.decode_graphs is None  # host experts across devices: eager decode
    ctx = 126
    s = m.session()
    s.feed(torch.randint(0, 512, (ctx,), generator=torch.Generator().manual_seed(7)).tolist())
    for dev in m.devices.values():
        dev._peak_bytes = dev.used_bytes
    s.feed([3])
    spec, _ = resolve_model(str(mixed))
    kv = replace(kv_layout(spec, kv_dtype), page_tokens=m.page_tokens)
    usage = m.device_usage()
    eager = eager_stage_bytes(spec, kv, [len(u["layers"]) for u in usage], ctx + 1)
    for u, step in zip(usage, eager):
        shape = static_shape(m.net.args, u["layers"])
        planned = stage_kv_bytes(kv, 0, shape, ctx + 1) + step
        held = u["peak_bytes"] - u["bytes_by_class"]["weights"] - u["bytes_by_class"].get("expert_cache", 0)
        assert 0.9 * planned <= held <= planned + ACT_OVERHEAD_BYTES, (u["name"], held, planned)


def test_the_watch_charges_what_a_section_makes_once():
    """StepBytes: a tensor made in a stand-in's section raises that device's peak by its bytes while it lives (not
    its used bytes), one the device allocates itself counts once (its tag), and outside every section nothing."""
    from homerun.engine.standin_bytes import StepBytes
    from homerun.kernels.device_guard import on_device
    from offload.devices import CudaStandInDevice

    dev = CudaStandInDevice("standin:0", 1 << 20)
    watch = StepBytes({"standin:0": dev})
    with watch:
        outside = torch.ones(1000)
        with on_device(torch.device("cpu"), "standin:0"):
            x = torch.ones(1000)  # 4,000 B
            live = dev.usage().peak_bytes
            assert 4000 <= live <= 4000 + 64 and dev.used_bytes == 0  # (a scalar or two of the op's)
            page = dev.empty(("kv", 0), (500,), torch.float32)  # 2,000 B charged under its tag, counted once
            peak = dev.usage().peak_bytes
            assert live + 2000 <= peak <= live + 2000 + 64 and dev.used_bytes == 2000
            del x
            y = torch.ones(250)  # 1,000 B in x's place: the peak stays
            assert dev.usage().peak_bytes == peak
    assert outside.numel() and page.numel() and y.numel()
    dev.empty(("kv", 1), (1000,), torch.float32)  # after the watch: the accounted bytes alone
    assert dev.usage().peak_bytes == peak and dev.used_bytes == 6000


def test_the_watch_forgets_a_devices_dead_storages():
    """When every storage watched on one stand-in has died, an op on another stand-in notes 0 for the first: a later
    allocation there is charged its own bytes, not the dead ones too."""
    from homerun.engine.standin_bytes import StepBytes
    from homerun.kernels.device_guard import on_device
    from offload.devices import CudaStandInDevice

    a, b = CudaStandInDevice("standin:0", 1 << 22), CudaStandInDevice("standin:1", 1 << 22)
    watch = StepBytes({"standin:0": a, "standin:1": b})
    with watch:
        with on_device(torch.device("cpu"), "standin:0"):
            x = torch.ones(100_000)  # 400,000 B, then dead
        peak_a = a.usage().peak_bytes
        del x
        with on_device(torch.device("cpu"), "standin:1"):
            y = torch.ones(10)
        a._peak_bytes = a.used_bytes  # what comes next starts from the accounted bytes alone
        a.empty(("kv", 0), (10,), torch.float32)
        assert a.usage().peak_bytes == 40, (a.usage().peak_bytes, peak_a)
    assert y.numel()
