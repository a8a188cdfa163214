"""The decode step's attention core over static capacities, its lengths on the device (issue 13, whole-step graphs).

`DeepseekV4._attend_decode` sizes its work from host ints (window rows, closed entries, the indexer's top-k count),
so a captured decode step must run it eagerly between segments. `StaticDecodeKV` holds one session's per-layer
attention state in buffers whose shapes depend only on a capacity bucket (`ctx_tokens`: a power of two of the
context), and reads every length from the one-element position tensor of the step, so the whole core can be
captured once per bucket and replayed at every position below it:

  window        [W, Dh] rows in position order, the oldest first: the new row is written at slot min(pos, W-1) and
                the attention reads rows [0, min(pos+1, W)); once full, the rows shift down by one after the read
                (a shift, not a ring: the rows meet the online softmax in the eager order, so the bits match).
  compressor    the open window's rows [rate, width] (this step's row written at slot pos % rate); the closing
                pooling runs at every step and its entry is written at row n_closed - 1 when pos closes a window,
                else at a dump row past the capacity (computing it always is one small launch; a branch would need
                a host read). The overlap slices (CSA) are replaced only on a close (a device-side select). The row
                write, the pooling and the overlap's select are one kernel-set call (`compress_step`: one launch on
                the GPU set), the entry's write one more.
  HCA           attends over the first n_closed of its [cap, Dh] entries (the length read on the device).
  CSA           the indexer scores every key of its capacity, masks those past n_closed, takes a top-k of
                min(index_topk, cap) and attends over the first min(index_topk, n_closed) of the picks.

Every kernel walks its rows in blocks that do not depend on the lengths, so the outputs equal the eager core's bit
for bit (tests/test_static_decode.py); the cost is the padded work of the bucket: the indexer scores up to twice the
closed keys and the top-k runs over the capacity, while the window and entry reads stop at the true lengths.

The entries are kept as the sequence's own stores keep them (any kv_dtype), and in them: `load` adopts each of the
session's entry stores (homerun.models.kv: PagedRows in the compute dtype or in bf16, Fp8PagedRows), store by store:
its rows are copied once into a static buffer of the bucket (whole pages of the store's size, at least cap + 1 rows:
static_pages, allocated as one of that store's pages and charged as its KV), whose rows then are the store's pages
(views of its own page size, never changed), and its old pages go back to the budget. So the KV lives once on the
device (issue 13, "VRAM as planned": the plan charges the KV plus the bucket's padding, not a second copy); the
session's states, checkpoints and the eager path (which appends pages past the capacity) all read the same rows. The
captured step writes the buffer through the format's encoder at a device-side row (`put_at`: fp8 quantizes on
store) and reads it through its decoder (fp8 dequantizes the capacity's
rows each step, HCA entries and indexer keys, or the top-k's gathered CSA rows), the eager path's functions on the
same rows. A bucket change adopts the same stores into the next bucket's buffers (one store's old buffer alive at a
time, not two buckets). A state from before a bucket its sequence has outgrown decodes in a bucket that holds every
row its stores hand out (`bucket_for`: the stores adopted as they are, never copied; a step writes where the eager
step would). A state from another sequence is adopted likewise after the stores holding the buffers now get a copy
of their pages (of the same page size), if a live state still reads them (the static state holds them only weakly
once it lets them go: a dropped session's are not copied), all the copies charged or none. Stores off the device are
not mirrored (homerun.engine.graphs.whole_step_reason: their decode runs the eager cores).
"""

from __future__ import annotations

from dataclasses import dataclass
import itertools
import weakref
from typing import Any, Sequence

import torch

from homerun.models.deepseek_v4.config import LAYER_CSA, LAYER_HCA, LAYER_SLIDING
from homerun.models.decode_bytes import StaticShape, bucket_tokens, capacity_bytes  # noqa: F401 - re-exported
from homerun.models.deepseek_v4.state import CompressorState, LayerState
from homerun.models.deepseek_v4.static_pages import (  # noqa: F401 - re-exported (tests)
    _move_tags, _new_buffer, _page_rows, _views, static_store)
from homerun.models.kv import PagedRows


_STATIC_IDS = itertools.count()  # budget tags of the static states' arena, row numbers and reservation


def static_shape(args, layers: Sequence[int] | None = None) -> StaticShape:
    """The attention shapes of a model's ModelArgs that the static state of `layers` (model positions; None: every
    layer) depends on (decode_bytes). A device's shard across devices holds its own layers' state only."""
    kinds = [args.layer_kinds[i] for i in (range(args.n_layers) if layers is None else layers)]
    return StaticShape(len(kinds), kinds.count(LAYER_CSA), kinds.count(LAYER_HCA), args.head_dim, args.rope_dim,
                       args.index_head_dim, args.window_size, args.csa_rate, args.hca_rate)


class _Arena:
    """Small per-layer tensors carved from one flat buffer per dtype, so a step's whole small state is copied out in
    one launch per dtype (`snapshot`) and its views re-carved from the copy."""

    def __init__(self) -> None:
        self.specs: list[tuple[torch.dtype, int, tuple[int, ...]]] = []
        self.sizes: dict[torch.dtype, int] = {}
        self.bufs: dict[torch.dtype, torch.Tensor] = {}

    def add(self, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        off = self.sizes.get(dtype, 0)
        self.sizes[dtype] = off + shape[0] * shape[1]
        self.specs.append((dtype, off, shape))
        return len(self.specs) - 1

    def alloc(self, empty) -> None:
        """The buffers, zeroed; empty(dtype, n) makes each (the owner charges it where it has a budget)."""
        self.bufs = {dt: empty(dt, n).zero_() for dt, n in self.sizes.items()}

    @property
    def nbytes(self) -> int:
        return sum(n * torch.empty(0, dtype=dt).element_size() for dt, n in self.sizes.items())

    def view(self, i: int, bufs: dict[torch.dtype, torch.Tensor] | None = None) -> torch.Tensor:
        dt, off, shape = self.specs[i]
        return (bufs or self.bufs)[dt][off : off + shape[0] * shape[1]].view(shape)

    def snapshot(self) -> dict[torch.dtype, torch.Tensor]:
        return {dt: t.clone() for dt, t in self.bufs.items()}


@dataclass
class _Comp:
    """One compressor's static state: the open window, the overlap slices (CSA), the entries and a dump row."""

    rate: int
    pend_kv: torch.Tensor  # [rate, width]
    pend_gate: torch.Tensor  # [rate, width]
    overlap_kv: torch.Tensor | None  # [rate, hd] (CSA); zeros and -inf gates before the first close
    overlap_gate: torch.Tensor | None
    cap: int  # the entry rows the step reads (its shapes): the buffer's first cap rows
    page: Any  # the buffer (decode_bytes.buffer_rows): entries 0..cap-1, row cap the dump slot (None before a load)
    store: PagedRows  # the adopted session store, whose first pages view page's first cap rows (a format holder before)
    tags: list  # page's budget tags (in store's: they move with the page when the store changes)
    ids: tuple[int, ...]  # the arena views of pend_kv, pend_gate[, overlap_kv, overlap_gate]


@dataclass
class _Layer:
    window: torch.Tensor  # [W, Dh]
    window_id: int  # its arena view
    comp: _Comp | None
    index: _Comp | None


class _Step:
    """The step's device scalars, made from the position tensor inside the captured step (one set per rate)."""

    def __init__(self, kv: "StaticDecodeKV", pos: torch.Tensor) -> None:
        W = kv.window
        self.wslot = pos.clamp(max=W - 1)
        self.full = pos >= W - 1  # the window holds W rows after this step's write: shift after the read
        n_win = (pos + 1).clamp(max=W)
        self.slot, self.closing, self.entry_slot, self.entry_pos, self.n_closed = {}, {}, {}, {}, {}
        for rate, cap in kv.caps.items():
            self.slot[rate] = pos % rate
            self.closing[rate] = self.slot[rate] == rate - 1
            n_closed = (pos + 1) // rate
            self.n_closed[rate] = n_closed
            self.entry_slot[rate] = torch.where(self.closing[rate], n_closed - 1, cap)
            self.entry_pos[rate] = pos // rate * rate
        zero = torch.zeros_like(pos)
        self.lengths = {LAYER_SLIDING: torch.cat([n_win, zero])}
        for rate in kv.caps:
            self.lengths[(LAYER_HCA, rate)] = torch.cat([n_win, self.n_closed[rate]])
            self.lengths[(LAYER_CSA, rate)] = torch.cat([n_win, self.n_closed[rate].clamp(max=kv.args.index_topk)])


class StaticDecodeKV:
    """Static-capacity attention state and core for one decode sequence of `net` (module docstring). `load` takes a
    session's LayerStates in (host work: outside any capture), `begin_step` and `core` are the capturable step,
    `states` copies the state back out as LayerStates over the given stores."""

    def __init__(self, net, ctx_tokens: int, accounts: Sequence[Any] | None = None,
                 like: Sequence[LayerState] | None = None) -> None:
        """accounts: per layer, the budgeted device (offload.devices.Device) its entry buffers are charged to, as
        the KV pages of a placed model are (None: uncharged). like: per layer, a state whose entry stores give the
        static stores' formats (None: the compute dtype, kv_dtype "auto")."""
        a = net.args
        self.accounts = list(accounts) if accounts is not None else [None] * len(net.layers)
        self._handed_out = False  # states() returned LayerStates over the static stores since the last detach
        self.net, self.args, self.window, self.ctx_tokens = net, a, a.window_size, ctx_tokens
        rates = sorted({a.rate(lay.index) for lay in net.layers if lay.kind != LAYER_SLIDING})
        if a.window_size < 2:
            raise ValueError(f"a static window needs window_size >= 2, got {a.window_size}")
        # entry capacity per compression rate: (pos + 1) // rate <= ctx_tokens // rate closed below the capacity
        self.caps = {r: max(1, ctx_tokens // r) for r in rates}
        # The state's bytes besides the entry buffers (charged as the stores allocate them) go to the budgeted
        # device too, as the plan charges them (homerun.models.decode_bytes, one formula): the arena and the row
        # numbers are allocated through it, the snapshots and the step's transients reserved.
        self.account = next((acc for acc in self.accounts if acc is not None), None)
        kv_dtype = _kv_dtype(net, like)
        act_bytes = torch.empty(0, dtype=net.compute_dtype).element_size()
        self.planned = (capacity_bytes(static_shape(a, [lay.index for lay in net.layers]), ctx_tokens, kv_dtype,
                                      act_bytes, page_tokens=_page_tokens(net, like)) if kv_dtype else None)
        self._tags: list = []
        if self.account is not None:
            weakref.finalize(self, self.account.free_all, self._tags)
        uid = next(_STATIC_IDS)
        self.ar = {r: torch.arange(c, out=self._empty(("graph", uid, "positions", r), c, torch.int64))
                   for r, c in self.caps.items()}
        self.arena = _Arena()
        specs = [self._specs(lay) for lay in net.layers]
        self.arena.alloc(lambda dt, n: self._empty(("graph", uid, "arena", str(dt)), n, dt))
        if self.account is not None and self.planned is not None:  # the snapshots and the step's transients
            self.account.reserve(("graph", uid, "reserved"), self.planned.reserved)
            self._tags.append(("graph", uid, "reserved"))
        self.layers = [self._carve(i, sp, like[i] if like is not None else None) for i, sp in enumerate(specs)]
        self.step: _Step | None = None

    def _empty(self, tag: tuple, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A 1-d buffer of n elements on the model's device, charged to the account under tag when there is one."""
        if self.account is None:
            return torch.empty(n, dtype=dtype, device=self.net.device)
        out = self.account.empty(tag, (n,), dtype)
        self._tags.append(tag)
        return out

    def _specs(self, lay):
        """Layer lay's small tensors as arena entries: the window, then per compressor its open rows and overlap."""
        a, dt, ar = self.args, self.net.compute_dtype, self.arena
        at = lay.attn

        def comp(c):
            width = c.ape.shape[1]
            ids = [ar.add(dt, (c.rate, width)), ar.add(dt, (c.rate, width))]
            if c.overlap:
                ids += [ar.add(dt, (c.rate, c.head_dim)), ar.add(torch.float32, (c.rate, c.head_dim))]
            return c, tuple(ids)

        return (ar.add(dt, (a.window_size, a.head_dim)), comp(at.comp) if at.comp is not None else None,
                comp(at.indexer.comp) if at.indexer is not None else None)

    def _carve(self, i: int, specs, like: LayerState | None) -> _Layer:
        win_id, *comps = specs
        dt, dev, ar, account = self.net.compute_dtype, self.net.device, self.arena, self.accounts[i]
        out = []
        for part, spec in enumerate(comps):
            if spec is None:
                out.append(None)
                continue
            c, ids = spec
            cst = (like.comp if part == 0 else like.index_comp) if like is not None else None
            fmt = cst.store if cst is not None else PagedRows(c.head_dim, dt, dev)  # a store of the format to keep
            # the format's holder until a load adopts a session's store (the buffer is allocated then, in that store)
            holder = fmt.empty_like(self.caps[c.rate], dev, account)
            ok = og = None
            if c.overlap:  # before the first close: no previous window (zero rows, -inf gates: weight 0)
                ok, og = ar.view(ids[2]), ar.view(ids[3])
                og.fill_(float("-inf"))
            out.append(_Comp(c.rate, ar.view(ids[0]), ar.view(ids[1]), ok, og, self.caps[c.rate], None, holder, [],
                             ids))
        return _Layer(ar.view(win_id), win_id, *out)

    def stores(self) -> list[PagedRows]:
        """The entry stores the state holds now (those its next states share)."""
        return [sc.store for s in self.layers for sc in (s.comp, s.index) if sc is not None]

    def charged_bytes(self, account: Any) -> int:
        """The bytes the state charges to `account`: its arena, row numbers and reservation, and its stores' pages."""
        tags = list(self._tags) if self.account is account else []
        return account.bytes_of(tags + [t for st in self.stores() if st.account is account for t in st._tags])

    # ------------------------------------------------------------------------------------- host-side transfer

    def load(self, states, pos: int, layers: Sequence[int] | None = None) -> None:
        """The sequence's LayerStates before position pos into the static state (pos < ctx_tokens): the small tensors
        copied, each entry store adopted (its rows moved into the buffer, which holds all its pages; `_adopt`);
        layers: only those (model order)."""
        if pos >= self.ctx_tokens:
            raise ValueError(f"position {pos} is past the capacity {self.ctx_tokens}")
        layers = range(len(self.layers)) if layers is None else layers
        if self._handed_out and any(sc is not None and cst.store is not sc.store for i in layers
                                    for sc, cst in self._pairs(i, states)):
            self._detach()  # another sequence's entries are about to overwrite the buffers
        for i in layers:
            s, st = self.layers[i], states[i]
            n = st.window.shape[0]
            if n != min(pos, self.window - 1):
                raise ValueError(f"window of {n} rows at position {pos}")
            s.window[:n] = st.window
            for sc, cst in self._pairs(i, states):
                if sc is not None:
                    self._load_comp(sc, cst, pos)

    def _pairs(self, i: int, states) -> tuple:
        s, st = self.layers[i], states[i]
        return (s.comp, st.comp), (s.index, st.index_comp)

    def _detach(self) -> None:
        """The states handed out so far keep their entries: the buffers (and their budget tags) go to new stores of
        the same formats, which the next states share, and a store that a live state still reads gets a copy of its
        first page (charged as its pages are). A store nothing reaches any more (a dropped session, a reset prefix
        cache) is only known through a weak reference and is not copied. All or nothing: when a copy does not fit,
        the live stores keep the buffers and the error propagates."""
        comps = [sc for s in self.layers for sc in (s.comp, s.index) if sc is not None and sc.page is not None]
        refs = [weakref.ref(sc.store) for sc in comps]
        for sc in comps:  # our strong references to the old stores go (no local may keep one); the new stores keep
            # the old ones' page size, never the bucket's
            _move_buffer(sc, sc.store, sc.store.empty_like(sc.store.page_rows_base, self.net.device, sc.store.account))
        live = [(sc, old) for sc, r in zip(comps, refs) if (old := r()) is not None]
        marks, owns = [], []
        try:
            for sc, old in live:
                marks.append((old, len(old._tags)))
                owns.append(old._alloc(-(-self.caps[sc.rate] // old.page_rows) * old.page_rows))
        except BaseException:
            for old, n in marks:
                if old.account is not None:
                    old.account.free_all(old._tags[n:])
                del old._tags[n:]
            for sc, old in live:  # back to before: the buffers in the stores the live states read
                _move_buffer(sc, sc.store, old)
            raise
        for (sc, old), own in zip(live, owns):
            cap = self.caps[sc.rate]
            for dst, src in zip(old._parts(own), old._parts(sc.page)):
                dst[:cap].copy_(src[:cap])
            old.pages[: -(-cap // old.page_rows)] = _views(old, own, cap)  # the pages that viewed the buffer
        self._handed_out = False

    def _load_comp(self, sc: _Comp, cst: CompressorState, pos: int) -> None:
        if cst.store.format != sc.store.format:
            raise ValueError(f"entries stored as {cst.store.format}, the static core keeps {sc.store.format}")
        n_pend = cst.pending_kv.shape[0] if cst.pending_kv is not None else 0
        if cst.n_entries != pos // sc.rate or n_pend != pos % sc.rate:
            raise ValueError(f"compressor state ({cst.n_entries} entries, {n_pend} open rows) at position {pos}")
        if cst.store is not sc.store:
            self._adopt(sc, cst.store, cst.n_entries)
        if n_pend:
            sc.pend_kv[:n_pend] = cst.pending_kv
            sc.pend_gate[:n_pend] = cst.pending_gate
        if sc.overlap_kv is not None:
            if cst.overlap_kv is None:
                sc.overlap_kv.zero_()
                sc.overlap_gate.fill_(float("-inf"))
            else:
                sc.overlap_kv.copy_(cst.overlap_kv)
                sc.overlap_gate.copy_(cst.overlap_gate)

    def _adopt(self, sc: _Comp, store: PagedRows, n: int) -> None:
        """store's rows up to its high-water mark (what any state of the sequence reads) into the buffer (allocated
        now as one of store's pages if there is none), as stored bits; the buffer then holds all of store's pages and
        the others go back to the budget: the entries live once, and every state (checkpoints too) reads them there.
        One store at a time (decode_bytes' `moving`). The bucket holds every row the store hands out (`bucket_for`)
        and the store lies on the device (graphs.whole_step_reason), so no store is ever copied instead."""
        cap, old = self.caps[sc.rate], sc.store
        keep = max(n, store.rows_used)
        if keep > cap or store.device != self.net.device or store.compute_device != self.net.device:
            raise ValueError(f"a store of {keep} rows on {store.device} does not fit the static state's {cap} rows "
                             f"on {self.net.device}: pick the bucket with bucket_for")
        if sc.page is None:
            sc.page, sc.tags = _new_buffer(store, cap)
        else:
            _move_tags(sc.tags, old, store)
        if keep:
            store.copy_rows(keep, sc.page)
        stale = [t for t in store._tags if t not in sc.tags]
        if store.account is not None:
            store.account.free_all(stale)
        store._tags[:] = [t for t in store._tags if t in sc.tags]  # in place: the store's finalizer holds the list
        store.page_rows = _page_rows(store, cap, _rows(sc))
        store.pages[:] = _views(store, sc.page, cap)
        sc.store = store
        self._handed_out = True  # the session's store reads the buffer: another sequence's load detaches it

    def states(self, pos: int) -> list[LayerState]:
        """The state after the step at position pos - 1 (pos tokens seen) as new LayerStates: the small tensors are
        views of one copy of the arena (one launch per dtype: a later step does not change them), the entries those
        of the static stores (rows past a state's count are invisible to it, as in any store)."""
        snap = self.arena.snapshot()
        self._handed_out = True
        out = []
        for s in self.layers:
            window = self.arena.view(s.window_id, snap)[: min(pos, self.window - 1)]
            comp = self._comp_state(s.comp, snap, pos) if s.comp is not None else None
            idx = self._comp_state(s.index, snap, pos) if s.index is not None else None
            out.append(LayerState(window, comp, idx))
        return out

    def _comp_state(self, sc: _Comp, snap, pos: int) -> CompressorState:
        n, n_pend = pos // sc.rate, pos % sc.rate
        sc.store.rows_used = max(sc.store.rows_used, n)  # the rows the step wrote at device-side slots
        v = [self.arena.view(i, snap) for i in sc.ids]
        ok = og = None
        if sc.overlap_kv is not None and n:
            ok, og = v[2], v[3]
        return CompressorState(sc.store, n, v[0][:n_pend], v[1][:n_pend], ok, og)

    # ------------------------------------------------------------------------------------ the capturable step

    def begin_step(self, pos: torch.Tensor) -> None:
        """The step's device scalars from pos (a one-element int64 device tensor): once per step, before the cores."""
        self.step = _Step(self, pos)

    def core(self, i: int, pa, k) -> torch.Tensor:
        """Layer i's decode attention core over its static state: pa as net._pre_attention returned it for the
        step's one token, k the GPU kernel set -> [1, H, Dh] in q's dtype, the state advanced in place."""
        net, a, st = self.net, self.args, self.step
        lay, s = net.layers[i], self.layers[i]
        at, proj = lay.attn, pa.proj
        H, Dh = pa.q.shape[1], pa.q.shape[2]
        s.window.index_copy_(0, st.wslot, pa.kv)
        rows2, key = None, LAYER_SLIDING
        if s.comp is not None:
            self._close(s.comp, at.comp, proj[2], proj[3], k)
        if s.index is not None:
            self._close(s.index, at.indexer.comp, proj[4], proj[5], k)
        if lay.kind == LAYER_HCA:
            rows2, key = _read(s.comp), (LAYER_HCA, s.comp.rate)
        elif lay.kind == LAYER_CSA:
            rate = s.comp.rate
            cap = self.caps[rate]
            iq = k.linear(at.indexer.wq_b, pa.qr).view(1, a.index_n_heads, a.index_head_dim)
            iq = k.norm_rope(iq, None, 0.0, pa.cos, pa.sin, norm=False)
            score = k.index_scores(iq, proj[6], _read(s.index), a.index_n_heads**-0.5, a.index_head_dim**-0.5)
            score = score.masked_fill(self.ar[rate] >= st.n_closed[rate], float("-inf"))
            sel = score.topk(min(a.index_topk, cap), dim=-1).indices[0]  # the picks past the length are never read
            rows2, key = _read(s.comp, sel), (LAYER_CSA, rate)
        o = k.attend_rows(pa.q[0], s.window, rows2, at.sink.reshape(-1), Dh**-0.5, pa.q.dtype,
                          lengths=st.lengths[key])
        # the oldest row leaves once the window is full (after the read above)
        s.window[:-1].copy_(torch.where(st.full, s.window[1:], s.window[:-1]))
        return o.view(1, H, Dh)

    def _close(self, sc: _Comp, c, kv: torch.Tensor, gate: torch.Tensor, k) -> None:
        """This step's row into the open window; the window's pooled entry (kept only when pos closes it)."""
        st, r = self.step, sc.rate
        entry = k.compress_step(sc.pend_kv, sc.pend_gate, kv, gate, st.slot[r], st.closing[r], c.ape, sc.overlap_kv,
                                sc.overlap_gate, c.overlap, c.norm, self.args.norm_eps, self.net.freqs_compress,
                                st.entry_pos[r], c.head_dim)
        sc.store.put_at(sc.page, st.entry_slot[r], entry)


def bucket_for(net, states: Sequence[LayerState], pos: int, min_tokens: int) -> int:
    """The capacity bucket (tokens) whose static state serves position pos from `states`: the power of two past pos,
    or past every row their stores hand out (PagedRows.rows_used) where one holds more (a state from before a bucket
    its sequence has outgrown: its stores are adopted as they are, one copy of the KV, as the eager path keeps it)."""
    last = pos
    for lay, st in zip(net.layers, states):
        for c, rate in ((st.comp, net.args.rate(lay.index)), (st.index_comp, net.args.csa_rate)):
            if c is not None:
                last = max(last, c.store.rows_used * rate - 1)
    return bucket_tokens(last, min_tokens)


def _move_buffer(sc: _Comp, src: PagedRows, dst: PagedRows) -> None:
    """sc's static buffer (its first cap rows) becomes dst's pages that view it (views of dst's page size) and dst
    becomes sc.store; the buffer's budget tags move from src to dst."""
    _move_tags(sc.tags, src, dst)
    dst.page_rows = _page_rows(dst, sc.cap, _rows(sc))
    dst.pages[: -(-sc.cap // dst.page_rows)] = _views(dst, sc.page, sc.cap)
    sc.store = dst


def _rows(sc: _Comp) -> int:  # the rows of sc's buffer (its first cap the entries, row cap the dump row)
    return sc.store._parts(sc.page)[0].shape[0]


def _read(sc: _Comp, sel: torch.Tensor | None = None) -> torch.Tensor:
    """The static entries as the eager path reads its store's (decoded by the same format hooks): every row of the
    capacity, or the rows at the device indices sel."""
    if sel is None:
        return sc.store._get(sc.page, sc.cap)
    return sc.store._take(sc.page, sel)


def _page_tokens(net, like) -> int | None:
    """The page (tokens of context) of the stores of `like` that the buffers are allocated in (None: no stores given;
    decode_bytes then counts buffers of the bucket's own pages)."""
    for lay, st in zip(net.layers, like or ()):
        if st.comp is not None:
            return st.comp.store.page_rows_base * net.args.rate(lay.index)
    return None


def _kv_dtype(net, like) -> str | None:
    """The kv_dtype of decode_bytes' formula that the stores of `like` (None: the compute dtype) keep their entries
    in; None for a store of another format (the formula does not know its bytes)."""
    from homerun.models.kv import Fp8PagedRows

    stores = [c.store for st in (like or ()) for c in (st.comp, st.index_comp) if c is not None]
    if not stores:
        return "auto"
    st = stores[0]
    if type(st) is Fp8PagedRows:
        return "fp8"
    if type(st) is PagedRows:
        return "auto" if st.dtype == net.compute_dtype else "bf16" if st.dtype == torch.bfloat16 else None
    return None
