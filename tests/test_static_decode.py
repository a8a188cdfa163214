"""The static-capacity decode core (homerun.models.deepseek_v4.static_decode) against the eager one, layer by layer,
on CUDA stand-ins (Triton interpreted): bit for bit at every position across window fills, compressor closes (CSA
every 4 tokens, HCA at 128) and capacity buckets, for the three tiny presets; then captured (EmulatedGraphs) per
bucket and replayed."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.graphs import EmulatedGraphs  # noqa: E402
from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.dispatch import for_act, kernels_for  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402
from homerun.models.deepseek_v4.static_decode import StaticDecodeKV, bucket_tokens  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

MIN_TOKENS = 16  # the smallest bucket: small enough that a short decode crosses two or three


def _model(path, kv_dtype="auto", **kw):
    from homerun.formats.loader import open_checkpoint

    args = ModelArgs.from_hf_config(open_checkpoint(path).config)
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    return load(path, dtype="float32", experts="reference", placement=pl, cuda_graphs="off", kv_dtype=kv_dtype, **kw)


def _eager_step(net, kl, tok: int, pos: int, states, core):
    """One eager decode step; core(i, pa) is called on every layer's pre-attention too. -> (new states, the eager
    cores' outputs, the static ones')."""
    ids = torch.tensor([tok], device=net.device)
    positions = torch.tensor([pos], device=net.device)
    x = net._embed(ids)
    new, eager, static = [], [], []
    for i, (layer, st) in enumerate(zip(net.layers, states)):
        pa = net._pre_attention(layer, x, positions, kl)
        out, st = net._attention_core(layer, pa, pos, st, kl)
        eager.append(out.clone())
        static.append(core(i, pa).clone())
        new.append(st)
        x = net._post_attention(layer, x, pa, out, ids, kl)
    return new, eager, static


def _comps(states):
    """The compressor states (entries and indexer keys) of a sequence's LayerStates, layer by layer."""
    return [c for ls in states for c in (ls.comp, ls.index_comp) if c is not None]


def _static_comps(kv):
    """The static core's compressors (entries and indexer keys), in _comps' order."""
    return [sc for sl in kv.layers for sc in (sl.comp, sl.index) if sc is not None]


def _fork(states):
    """The states over copies of their entry stores (same format, the committed rows as stored): the static core
    adopts what it loads, so the eager run beside it keeps stores of its own."""
    import dataclasses

    def fork(c):
        if c is None:
            return None
        st = c.store
        new = st.empty_like(max(c.n_entries, 1), st.device)
        page = new._alloc()
        st.copy_rows(c.n_entries, page)
        new.pages.append(page)
        return dataclasses.replace(c, store=new)

    return [dataclasses.replace(ls, comp=fork(ls.comp), index_comp=fork(ls.index_comp)) for ls in states]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The three presets with an 8-token window (it fills and slides within the run) and a top-k of 4 (a strict
    subset of the closed CSA entries from position 20)."""
    from tiny import TINY_KINDS, make_checkpoint

    root = tmp_path_factory.mktemp("static-decode")
    return {kind: make_checkpoint(root, kind, sliding_window=8, index_topk=4) for kind in TINY_KINDS}


# The lossy stores on the csa and hca presets: CI's second pass (mixed has a layer of each kind in the default run).
@pytest.mark.parametrize("kind,kv_dtype", [
    pytest.param(kind, kv, marks=[] if kind == "mixed" or kv == "auto" else pytest.mark.extended)
    for kind in ("mixed", "csa", "hca") for kv in ("auto", "bf16", "fp8")])
def test_the_static_core_equals_the_eager_core_bit_for_bit(checkpoints, kind, kv_dtype):
    """A 3-token prefill, then decode to position 40 (mixed, csa) or across the HCA close at 127 (hca: prefill 120):
    every layer's core output equal at every position, the static state reloaded only where the bucket grows (4 ->
    16 -> 32 -> 64, or 128 -> 256), and the LayerStates it hands back equal the eager ones at the end. For each
    kv_dtype of the fp32 model: exact, bf16 entries (lossy), fp8 entries (quantized on store, as stored bits)."""
    model = _model(checkpoints[kind], kv_dtype)
    net = model.net
    kl = for_act(kernels_for(net.device, net.compute_dtype, 1, net.embed_flavor), net.experts.act)
    n_prompt, last = (120, 131) if kind == "hca" else (3, 40)
    s = model.session()
    logits = s.feed(torch.randint(0, 512, (n_prompt,), generator=torch.Generator().manual_seed(5)).tolist())
    states, pos = s._states, n_prompt
    kv, buckets, checked = None, [], 0
    with torch.inference_mode():
        while pos <= last:
            cap = bucket_tokens(pos, MIN_TOKENS)
            if kv is None or kv.ctx_tokens != cap:  # a new bucket: fresh buffers, a copy of the eager state adopted
                kv = StaticDecodeKV(net, cap, like=states)
                kv.load(_fork(states), pos)
                buckets.append(cap)
            kv.begin_step(torch.tensor([pos], device=net.device))
            tok = int(logits.argmax()) if pos == n_prompt else (pos * 7919) % 512
            states, eager, static = _eager_step(net, kl, tok, pos, states, lambda i, pa: kv.core(i, pa, kl))
            for i, (e, g) in enumerate(zip(eager, static)):
                assert torch.equal(e, g), (kind, pos, i, (e - g).abs().max().item())
                checked += 1
            pos += 1
        assert checked == (last + 1 - n_prompt) * len(net.layers)
        assert buckets == ([128, 256] if kind == "hca" else [16, 32, 64])
        back = kv.states(pos)
    for e, g, sl in zip(states, back, kv.layers):
        assert torch.equal(e.window, g.window)
        for ec, sc in ((e.comp, sl.comp), (e.index_comp, sl.index)):
            if ec is not None:  # the handed-back states read the static buffers' own entries, stored alike
                assert sc.store is not ec.store and sc.store.format == ec.store.format
                for e_part, s_part in zip(ec.store._parts(ec.store.pages[0]) if ec.n_entries else (),
                                          sc.store._parts(sc.page)):
                    n = min(ec.n_entries, e_part.shape[0])
                    assert torch.equal(e_part[:n].view(torch.uint8), s_part[:n].view(torch.uint8))
        for ec, gc in ((e.comp, g.comp), (e.index_comp, g.index_comp)):
            if ec is None:
                assert gc is None
                continue
            assert ec.n_entries == gc.n_entries and torch.equal(ec.entries(), gc.entries())
            assert torch.equal(ec.pending_kv, gc.pending_kv) and torch.equal(ec.pending_gate, gc.pending_gate)
            assert (ec.overlap_kv is None) == (gc.overlap_kv is None)
            if ec.overlap_kv is not None:
                assert torch.equal(ec.overlap_kv, gc.overlap_kv) and torch.equal(ec.overlap_gate, gc.overlap_gate)


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_load_adopts_the_sessions_stores(checkpoints, kv_dtype):
    """One copy of the KV: a load moves each entry store's rows into the bucket's buffer, which becomes the store's
    only page (the session's and its checkpoints' states read it), the old pages go back to the device's budget, and
    the device's "kv" bytes are the buffers'. A bucket change moves them into the next bucket's buffers (the old ones
    freed); another sequence's load leaves the first a copy of its page, its entries unchanged."""
    model = _model(checkpoints["mixed"], kv_dtype)
    net, dev = model.net, model.devices["standin:0"]
    s = model.session()
    prompt = torch.randint(0, 512, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    s.feed(prompt[:2])
    early = s._states  # no closed entries yet: its stores are the later states' too
    s.feed(prompt[2:])
    states = s._states
    before = [c.entries().clone() for c in _comps(states)]

    def check(kv, states):
        comps = [(c, sc) for ls, sl in zip(states, kv.layers) for c, sc in ((ls.comp, sl.comp), (ls.index_comp,
                                                                                                sl.index))
                 if c is not None]
        for (c, sc), e in zip(comps, before):
            assert c.store is sc.store and len(c.store.pages) == 1
            assert c.store._parts(c.store.pages[0])[0].data_ptr() == c.store._parts(sc.page)[0].data_ptr()
            assert torch.equal(c.entries().view(torch.uint8), e.view(torch.uint8))
        held = sum(t.numel() * t.element_size() for _, sc in comps for t in sc.store._parts(sc.page))
        assert dev.bytes_by_class()["kv"] == held

    kv = StaticDecodeKV(net, 32, like=states)
    kv.load(early, 2)  # an earlier state of the sequence: the later one's rows move with it
    check(kv, states)
    for cap in (32, 64):  # 21 tokens: the first bucket, then the next one adopts the same stores again
        kv = StaticDecodeKV(net, cap, like=states)
        kv.load(states, 21)
        check(kv, states)
    other = model.session()
    other.feed([7, 7, 7, 7, 7])
    kv.load(other._states, 5)  # another sequence: the first keeps its entries in a copy of its page
    mine = _comps(states)
    buffers = {sc.store._parts(sc.page)[0].data_ptr() for sc in _static_comps(kv)}
    assert not {c.store._parts(c.store.pages[0])[0].data_ptr() for c in mine} & buffers
    assert all(torch.equal(c.entries().view(torch.uint8), e.view(torch.uint8)) for c, e in zip(mine, before))


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_a_bucket_of_many_pages_keeps_the_stores_page_size(checkpoints, kv_dtype, monkeypatch):
    """Adopted into a bucket of many pages (16-token pages: 4 CSA rows, 1 HCA row; a 4096-token bucket: 1024 and 32
    rows), each store keeps its page size, its pages views of the buffer: the eager prefill after it walks the
    same pages as a session never graphed (the indexer's per-page temporaries, one walk per query block and layer),
    with bit-equal logits."""
    from homerun.models.kv import PagedRows

    model = _model(checkpoints["mixed"], kv_dtype)
    model.page_tokens = 16  # the sessions' pages (the runtime's own floor is a page of the HCA rate)
    walks, real = [], PagedRows.iter_pages

    def spy(self, n):
        walks.append([rows.shape[0] for _, rows in real(self, n)])
        return real(self, n)

    monkeypatch.setattr(PagedRows, "iter_pages", spy)
    gen = torch.Generator().manual_seed(11)
    prompt, more = torch.randint(0, 512, (21,), generator=gen).tolist(), torch.randint(0, 512, (40,), generator=gen)
    runs = []
    for graphed in (False, True):
        s = model.session()
        s.feed(prompt)
        comps = _comps(s._states)
        if graphed:
            kv = StaticDecodeKV(model.net, 4096, like=s._states)
            kv.load(s._states, 21)
            bufs = [sc.page for sc in _static_comps(kv)]
            for c, page in zip(comps, bufs):  # adopted: the pages view the buffer, more than one of them
                assert len(c.store.pages) > 1
                assert c.store._parts(c.store.pages[1])[0].data_ptr() == c.store._parts(page)[0][
                    c.store.page_rows :].data_ptr()
        walks.clear()
        logits = s.feed(more.tolist())
        runs.append((logits, list(walks), [c.store.page_rows for c in comps]))
    (plain, plain_walks, plain_rows), (graphed, graphed_walks, graphed_rows) = runs
    assert graphed_rows == plain_rows == [c.store.page_rows_base for c in comps]
    assert graphed_walks == plain_walks and max(max(w) for w in plain_walks) == 4
    assert torch.equal(plain, graphed)


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_another_sequences_load_detaches_every_page_of_the_first(checkpoints, kv_dtype):
    """Adopted into a bucket of many pages (16-token pages, a 4096-token bucket), a sequence's store has every page a
    view of the buffer: another sequence's load gives it copies of all of them (not only the first), so B's rows,
    written into the buffer, never show through A's later pages."""
    model = _model(checkpoints["mixed"], kv_dtype)
    model.page_tokens = 16
    gen = torch.Generator().manual_seed(5)
    a, b = model.session(), model.session()
    a.feed(torch.randint(0, 512, (40,), generator=gen).tolist())
    mine = _comps(a._states)
    before = [c.entries().clone() for c in mine]
    kv = StaticDecodeKV(model.net, 4096, like=a._states)
    kv.load(a._states, 40)
    assert all(len(c.store.pages) > 1 for c in mine)
    b.feed(torch.randint(0, 512, (40,), generator=gen).tolist())
    kv.load(b._states, 40)
    bufs = [t for sc in _static_comps(kv) for t in sc.store._parts(sc.page)]
    for c in mine:
        for page in c.store.pages:
            for part in c.store._parts(page):
                if part.numel():  # the fp8 indexer's rope part is zero-wide: no storage to share
                    assert not any(part.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                                   for t in bufs)
    assert all(torch.equal(c.entries().view(torch.uint8), e.view(torch.uint8)) for c, e in zip(mine, before))


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_a_bucket_smaller_than_a_page_keeps_the_stores_page_size(checkpoints, kv_dtype):
    """A bucket under one page (64-token pages: 16 CSA rows, 1 HCA row; a 32-token bucket: 8 CSA rows) adopts the
    stores into a buffer of one whole page: their page size stays, so the eager prefill after it makes as many pages
    as a session never graphed, with bit-equal logits."""
    model = _model(checkpoints["mixed"], kv_dtype)
    model.page_tokens = 64
    gen = torch.Generator().manual_seed(13)
    prompt, more = torch.randint(0, 512, (21,), generator=gen).tolist(), torch.randint(0, 512, (200,), generator=gen)
    runs = []
    for graphed in (False, True):
        s = model.session()
        s.feed(prompt)
        comps = _comps(s._states)
        if graphed:
            StaticDecodeKV(model.net, 32, like=s._states).load(s._states, 21)
            assert [c.store.page_rows for c in comps] == [c.store.page_rows_base for c in comps]
        logits = s.feed(more.tolist())
        runs.append((logits, [c.store.page_rows for c in comps], [len(c.store.pages) for c in comps]))
    (plain, plain_rows, plain_pages), (graphed, graphed_rows, graphed_pages) = runs
    assert graphed_rows == plain_rows == [c.store.page_rows_base for c in comps] and max(plain_rows) == 16
    assert graphed_pages == plain_pages
    assert torch.equal(plain, graphed)
