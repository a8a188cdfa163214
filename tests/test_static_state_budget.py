"""The decode graphs' static attention state against the device budget (issue 13, "VRAM as planned"): a bucket change
holds one static state (the plan's charge), not the old and the new at once, and the ramp checks (a session's growth,
the runtime's Think Max check) credit the held state whole, so growth the plan promises is not refused after a reset
or in a new session. CUDA stand-ins, Triton under the interpreter, emulated graphs."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import gc  # noqa: E402
import weakref  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine import graphs as G  # noqa: E402
from homerun.engine.graph_bytes import held_bytes, static_state_bytes  # noqa: E402
from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import THINK_MAX_MIN_CONTEXT_TOKENS, load  # noqa: E402
from homerun.errors import ContextFullError  # noqa: E402
from homerun.formats.loader import open_checkpoint  # noqa: E402
from homerun.models.decode_bytes import static_bytes  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402

MIN_BUCKET = 16  # small buckets: a 13-token prompt crosses from 16 to 32 within a few graphed steps


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    from tiny import make_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("static-budget"), "mixed", sliding_window=8, index_topk=4)
    return path, ModelArgs.from_hf_config(open_checkpoint(path).config)


def _model(small, ramp_tokens=None):
    path, args = small
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    kw = {"ramp_tokens": ramp_tokens} if ramp_tokens else {}
    # pages of 64 tokens: a prompt below 64 tokens takes no more KV than kv_bytes_at(64) counts (no page rounding)
    m = load(path, dtype="bfloat16", experts="reference", placement=pl, kv_dtype="fp8", cuda_graphs="on",
             page_tokens=64, **kw)
    m.decode_graphs.min_bucket_tokens = MIN_BUCKET
    return m, m.devices["standin:0"]


def test_a_bucket_change_holds_one_static_state(small, monkeypatch):
    """Graphed steps across the 16 -> 32 bucket: no earlier static state is alive when the next is built, and the
    crossing step's accounted peak is the bytes before it, less the old state's own charge (its arena, row numbers
    and reservation: its stores live on in the session's states until the step ends), plus the new state as the
    plan's formula charges it."""
    m, dev = _model(small)
    dg = m.decode_graphs
    built = []
    init = G.StaticDecodeKV.__init__

    def tracked(self, *a, **k):
        assert [r().ctx_tokens for r in built if r() is not None] == []  # the older states are gone
        built.append(weakref.ref(self))
        init(self, *a, **k)

    monkeypatch.setattr(G.StaticDecodeKV, "__init__", tracked)
    s = m.session()
    s.feed(list(range(1, 14)))
    crossed = 0
    for t in range(6):
        old = dg.static
        old_own = dev.bytes_of(old._tags) if old is not None else 0
        del old
        base = dev.used_bytes
        dev._peak_bytes = base
        s.feed([t + 3])
        if len(built) > 1 + crossed:  # this step built the next bucket's state
            crossed += 1
            assert dg.static.ctx_tokens == 32 and old_own > 0
            assert dev._peak_bytes - base <= dg.static.planned.total - old_own, (dev._peak_bytes - base, old_own)
    assert crossed == 1 and [r().ctx_tokens for r in built if r() is not None] == [32]


@pytest.mark.parametrize("kv_dtype", ["fp8", "bf16"])
def test_the_peak_across_a_bucket_change_is_the_plans(small, kv_dtype):
    """Graphed steps across the 16 -> 32 bucket change: at every step the device's peak of KV pages and static
    state is within the plan's charge at that context (the KV in whole pages, decode_bytes.static_bytes beside it:
    graph_bytes.static_state_bytes), and at the change it is over that charge less `moving`. The new bucket's buffers
    must be new allocations (the captured step reads each store's capacity as one tensor at one address, and no
    allocation grows in place), so each store's rows are copied once: one store's old buffer lives beside the new
    ones (StaticDecodeKV._adopt, store by store), and the plan charges exactly that transient."""
    from homerun.models.decode_bytes import entry_stores, paged_bytes
    from homerun.models.deepseek_v4.static_decode import static_shape

    path, args = small
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    m = load(path, dtype="bfloat16", experts="reference", placement=pl, kv_dtype=kv_dtype, cuda_graphs="on",
             page_tokens=64)
    dg, dev = m.decode_graphs, m.devices["standin:0"]
    dg.min_bucket_tokens = MIN_BUCKET
    s = m.session()
    s.feed(list(range(1, 14)))
    stores = entry_stores(static_shape(args), kv_dtype, 2)
    crossed = False
    for t in range(6):  # positions 13..18: the change at 16
        dev._peak_bytes = dev.used_bytes
        weights = dev.used_bytes - sum(dev.bytes_by_class().get(c, 0) for c in ("kv", "graph"))
        bucket = dg.static.ctx_tokens if dg.static is not None else 0
        s.feed([t + 3])
        n = s.n_tokens
        peak = dev.usage().peak_bytes - weights
        planned = paged_bytes(stores, n, m.page_tokens) + static_state_bytes(dg, n, kv_dtype,
                                                                             page_tokens=m.page_tokens)
        assert peak <= planned, (n, peak, planned)
        if bucket and dg.static.ctx_tokens != bucket:  # the step that moved the stores into the next bucket
            crossed = True
            moving = static_bytes(static_shape(args), n, kv_dtype, 2, MIN_BUCKET, page_tokens=m.page_tokens).moving
            assert peak > planned - moving, (peak, planned, moving)
    assert crossed and dg.static.ctx_tokens == 2 * MIN_BUCKET


def _decode_a_little(m):
    s = m.session()
    s.feed(list(range(1, 14)))
    s.feed([5])
    s.feed([6])
    assert m.decode_graphs.static is not None and m.decode_graphs.static.ctx_tokens == MIN_BUCKET
    return s


@pytest.mark.parametrize("how", ["reset", "new session"])
def test_growth_after_a_graphed_decode_counts_the_held_state_once(small, how):
    """A budget of exactly what a fresh model's growth to 64 tokens asks for (the KV and the static state of that
    context). After a session decoded with graphs (a static state of bucket 16 held, its stores charged), a reset
    session and a new one grow the same: the held state is credited whole, as the new bucket's state replaces it;
    and the grown session then decodes at 64 within that budget."""
    m, dev = _model(small, ramp_tokens=(32, 64))
    need = m.kv_bytes_at(64) + static_state_bytes(m.decode_graphs, 64, "fp8", page_tokens=m.page_tokens)
    dev.budget_bytes = dev.used_bytes + need
    a = _decode_a_little(m)
    if how == "reset":
        a.reset()
        s = a
    else:
        del a
        gc.collect()
        s = m.session()
    assert held_bytes(m.decode_graphs, dev) == m.decode_graphs.static.charged_bytes(dev) > dev.bytes_of(
        m.decode_graphs.static._tags) > 0  # nothing else views it: its stores count too
    s._ensure_capacity(40)
    assert s.capacity_tokens == 64
    s.feed(list(range(1, 38)))
    for t in range(3):  # bucket 64: the bucket-16 state goes before this one is charged
        s.feed([t + 3])
    assert m.decode_graphs.static.ctx_tokens == 64 and dev.used_bytes <= dev.budget_bytes


def test_a_state_other_live_states_view_is_credited_without_its_stores(small):
    """While another session's states view the held state's stores, a new session's growth counts only the held
    state's own charge: loading the new sequence would leave the other session copies of those pages."""
    m, dev = _model(small)
    a = _decode_a_little(m)
    kv = m.decode_graphs.static
    own = dev.bytes_of(kv._tags)
    assert 0 < own < kv.charged_bytes(dev)
    assert held_bytes(m.decode_graphs, dev, m.session()._states) == own
    assert held_bytes(m.decode_graphs, dev, a._states) == kv.charged_bytes(dev) + sum(
        st.window.numel() * st.window.element_size() + sum(c.allocated_bytes - c.store.nbytes
                                                           for c in (st.comp, st.index_comp) if c is not None)
        for st in a._states)


@pytest.mark.parametrize("decoded", [False, True])
def test_think_max_agrees_with_the_ramp_check(small, decoded):
    """Think Max's device check asks what a new session's growth to its context asks (the KV, the static state of
    that context, the held state credited): at one byte short both refuse, at the boundary both accept."""
    need = THINK_MAX_MIN_CONTEXT_TOKENS
    m, dev = _model(small, ramp_tokens=(64, need))
    if decoded:
        a = _decode_a_little(m)
        a.reset()
    graph = static_state_bytes(m.decode_graphs, need, "fp8", page_tokens=m.page_tokens)
    assert graph > 0
    short = dev.used_bytes - held_bytes(m.decode_graphs, dev) + m.kv_bytes_at(need) + graph - 1
    for budget, ok in ((short, False), (short + 1, True)):
        dev.budget_bytes = budget
        avail, reason = m.think_max_available()
        s = m.session()
        try:
            s._ensure_capacity(need)
            grew = True
        except ContextFullError:
            grew = False
        assert avail is grew is ok, (reason, budget)
        if not ok:
            assert "static state" in reason


def test_decoding_from_a_checkpoint_of_an_outgrown_bucket_copies_nothing(small):
    """Graphed decode past the 16 -> 32 bucket change, then a rollback to a checkpoint from the first bucket and
    graphed steps from it (one closes a CSA window): the steps run in the bucket that holds every row the stores
    hand out (32, already captured; static_decode.bucket_for), over the same stores, with no copy of the KV (the
    device's peak and "kv" bytes unchanged; before: a second copy of the early state's rows in a bucket-16 buffer,
    which the plan did not count). The logits and the rows the later checkpoint is left with equal the eager path's
    (a model without graphs fed the same: the rows past the rollback are overwritten as the rollback's contract
    says)."""
    m, dev = _model(small)
    path, args = small
    ref = load(path, dtype="bfloat16", experts="reference", placement=single_device(
        args.n_layers, "standin:0", gpu_path=True, experts="device"), kv_dtype="fp8", cuda_graphs="off",
        page_tokens=64)
    runs = []
    for model in (m, ref):
        s = model.session()
        lg = [s.feed(list(range(1, 14))), s.feed([5])]
        early = s.checkpoint()  # 14 tokens: bucket 16
        lg += [s.feed([t + 3]) for t in range(7)]  # to 21 tokens: bucket 32
        late = s.checkpoint()
        if model is m:
            dg = m.decode_graphs
            assert dg.static.ctx_tokens == 32 and dg.step_captures == 2
            kv_bytes, stores = dev.bytes_by_class()["kv"], dg.static.stores()
            base = dev._peak_bytes = dev.used_bytes  # the device's peak from here (before: +988 B, the copy)
        s.rollback(early)
        lg += [s.feed([t + 9]) for t in range(2)]  # positions 14 and 15 (a CSA close: row 3)
        comps = [c for ls in late.states for c in (ls.comp, ls.index_comp) if c is not None]
        runs.append((lg, [c.entries().view(torch.uint8) for c in comps]))
    assert dg.static.ctx_tokens == 32 and dg.step_captures == 2  # no bucket-16 state built again
    assert dev._peak_bytes == base  # nothing allocated on the device past what the later state held
    assert dev.bytes_by_class()["kv"] == kv_bytes and all(a is b for a, b in zip(dg.static.stores(), stores))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0], runs[1][0]))
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_a_write_lowers_the_high_water_mark_so_the_bucket_follows_the_live_state(small):
    """After a rollback, a feed's writes make the rows past them no state's (the rollback's contract), so the
    graphed steps after it run in the bucket of the new context, not of the dead later rows."""
    m, _ = _model(small)
    s = m.session()
    s.feed(list(range(1, 14)))
    early = s.checkpoint()  # 13 tokens
    for t in range(28):  # to 41 tokens: bucket 64, 10 CSA rows
        s.feed([t + 3])
    assert m.decode_graphs.static.ctx_tokens == 64
    s.rollback(early)
    s.feed([7, 8, 9])  # a prefill chunk from the early state: CSA row 3 written again, rows 4.. no state's
    s.feed([4])  # position 16: bucket 32 (the dead rows would ask for 64)
    assert m.decode_graphs.static.ctx_tokens == 32
