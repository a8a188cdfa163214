"""DeepseekV4.forward's `out_rows` (issue 19): the last layer computes its queries, attention output and FFN for the
kept rows only. The kept rows' hidden must equal the full forward's (fp32 rounding: one row takes other GEMM and
attention shapes) and every layer's state (window, compressor and indexer entries, open windows, overlap slices)
must be bit-equal to the full forward's, chunk after chunk; sessions read the last row of the last chunk only."""

from __future__ import annotations

import pytest
import torch

import homerun
from homerun.errors import UsageError
from offload.base import WrappingBackend

KINDS = ("mixed", "csa", "hca")
# (chunk tokens, rows kept): a window of 8 tokens closes in the middle of chunks, the CSA top-k runs over closed
# entries, one chunk keeps none, one a middle run of rows, one is a decode step
CHUNKS = ((100, slice(-1, None)), (37, slice(0, 0)), (3, slice(1, 3)), (1, slice(-1, None)), (90, slice(-1, None)),
          (60, slice(10, 70)))
# measured <= 1.1e-6 of max |h| (fp32; int8 experts on hca), bit-equal where the kept rows keep the GEMM shapes
HIDDEN_REL_TOL = 1e-5


def state_tensors(st) -> list:
    """Every tensor a layer's state carries (committed entries only) and the entry counts."""
    out = [st.window]
    for c in (st.comp, st.index_comp):
        if c is not None:
            out += [c.store.view(c.n_entries) if c.n_entries else None, c.pending_kv, c.pending_gate, c.overlap_kv,
                    c.overlap_gate, torch.tensor(c.n_entries)]
    return out


def assert_states_equal(sa, sb) -> None:
    for i, (a, b) in enumerate(zip(sa, sb, strict=True)):
        for j, (x, y) in enumerate(zip(state_tensors(a), state_tensors(b), strict=True)):
            assert (x is None and y is None) or torch.equal(x, y), (i, j)


def run_chunks(net, ids, chunks=CHUNKS):
    """The chunks through two state chains, every row and the kept rows: yields (hidden of the kept rows from the
    full forward, the out_rows forward's hidden, full states, out_rows states) per chunk."""
    sa, sb, pos = net.new_state(), net.new_state(), 0
    for T, rows in chunks:
        x = ids[pos : pos + T]
        with torch.inference_mode():
            ha, sa = net.forward(x, pos, sa)
            hb, sb = net.forward(x, pos, sb, out_rows=rows)
        yield ha[rows], hb, sa, sb
        pos += T


def check(net, ids, chunks=CHUNKS) -> None:
    for ref, got, sa, sb in run_chunks(net, ids, chunks):
        assert got.shape == ref.shape
        if ref.numel():
            assert (got - ref).abs().max().item() <= HIDDEN_REL_TOL * ref.abs().max().item()
        assert_states_equal(sa, sb)


def _ids(n: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
def test_kept_rows_equal_the_full_forward_and_states_are_bit_equal(tiny_checkpoints, kind, kernel_set):
    model = homerun.load(tiny_checkpoints[kind], expert_act="fp32")
    check(model.net, _ids(300, model.args.vocab_size))


def test_int8_prefill_set_kept_rows(tiny_checkpoints):
    """The fast activation mode (bf16 dense GEMMs, int8 experts) on the mixed preset."""
    model = homerun.load(tiny_checkpoints["mixed"], expert_act="int8")
    check(model.net, _ids(300, model.args.vocab_size, seed=2), CHUNKS[:2] + CHUNKS[4:5])


class _Rows(WrappingBackend):
    """Records the rows each layer's routed call got."""

    def __init__(self, inner, every_row: bool = False):
        super().__init__(inner)
        self.rows: list[tuple[int, int]] = []
        self._every = every_row

    @property
    def routes_every_row(self) -> bool:
        return self._every

    def forward(self, layer, x, expert_ids, expert_weights):
        self.rows.append((layer, x.shape[0]))
        return self.inner.forward(layer, x, expert_ids, expert_weights)


def test_session_prefill_runs_the_last_layer_for_the_last_row(tiny_checkpoints):
    """A 130-token prompt in 48-token chunks: the last layer's experts see no row of the first two chunks and one
    of the last; the last logits equal the full pass's, the states a full-row chain's bit for bit."""
    model = homerun.load(tiny_checkpoints["mixed"], expert_act="fp32")
    model.max_chunk_tokens = 48
    n_layers, ids = model.args.n_layers, _ids(130, model.args.vocab_size, seed=3)
    spy = _Rows(model.net.experts)
    with model.experts_wrapped(spy):
        sess = model.session()
        logits = sess.feed(ids.tolist())
    last = [r for layer, r in spy.rows if layer == n_layers - 1]
    assert last == [1] and sum(r for layer, r in spy.rows if layer == 0) == 130
    ref = model.logits(ids)[-1]
    assert (logits - ref).abs().max().item() <= HIDDEN_REL_TOL * ref.abs().max().item()
    states = model.net.new_state()
    with torch.inference_mode():
        for c0 in range(0, 130, 48):
            _, states = model.net.forward(ids[c0 : c0 + 48], c0, states)
    assert_states_equal(states, sess._states)


def decode_after_both_prefills(model, ids: torch.Tensor, n_decode: int) -> None:
    """Prefill `ids` in two sessions, as sessions do (the last layer runs the prompt's last row) and with every row
    (the forwards' out_rows dropped, as `prefill_shares.py --all-rows`), then decode n_decode greedy tokens in both:
    the prompt's last logits within fp32 rounding, every decode step's logits bit-equal (the states are)."""
    kept = model.session()
    first = kept.feed(ids.tolist())
    fwd = model._forward
    model._forward = lambda *args, out_rows=None, **kw: fwd(*args, **kw)
    try:
        full = model.session()
        ref = full.feed(ids.tolist())
    finally:
        del model._forward
    assert (first - ref).abs().max().item() <= HIDDEN_REL_TOL * ref.abs().max().item()
    assert_states_equal(full._states, kept._states)
    tok = int(ref.argmax())
    for _ in range(n_decode):
        a, b = kept.feed([tok]), full.feed([tok])
        assert torch.equal(a, b)
        tok = int(b.argmax())
    assert kept.n_tokens == full.n_tokens == ids.numel() + n_decode


@pytest.mark.parametrize("kind", KINDS)
def test_decode_after_a_kept_row_prefill_equals_decode_after_a_full_prefill(tiny_checkpoints, kind, kernel_set):
    """A 130-token prompt in 48-token chunks (the non-final chunks keep no row), then 12 decode tokens."""
    model = homerun.load(tiny_checkpoints[kind], expert_act="fp32")
    model.max_chunk_tokens = 48
    decode_after_both_prefills(model, _ids(130, model.args.vocab_size, seed=7), 12)


def test_a_backend_that_routes_every_row_sees_every_row(tiny_checkpoints):
    """A routing trace numbers tokens by the rows each layer saw: with routes_every_row the last layer runs every
    row, and the forward still returns the kept rows (equal to the full forward's, bit for bit)."""
    model = homerun.load(tiny_checkpoints["hca"], expert_act="fp32")
    net, ids = model.net, _ids(40, model.args.vocab_size, seed=4)
    with torch.inference_mode():
        full, _ = net.forward(ids, 0, net.new_state())
        spy = _Rows(net.experts, every_row=True)
        net.experts = spy
        try:
            got, _ = net.forward(ids, 0, net.new_state(), out_rows=slice(-1, None))
        finally:
            net.experts = spy.inner
    assert spy.rows == [(layer, 40) for layer in range(model.args.n_layers)]
    assert torch.equal(got, full[-1:])


class _RedoOnce(WrappingBackend):
    """Speculates every forward and asks for one redo from `layer` (as a missed speculative call would)."""

    def __init__(self, inner, layer: int):
        super().__init__(inner)
        self.layer, self.asked = layer, False

    def begin_token(self, n_tokens, speculate=True):
        return True

    def end_token(self, redo_from=None):
        if self.asked:
            return None
        self.asked = True
        return self.layer


@pytest.mark.parametrize("redo_layer", [0, 2])
def test_a_redo_reruns_the_kept_rows(tiny_checkpoints, redo_layer):
    """A speculated prefill with out_rows, redone from layer 0 and from the last layer: the same rows and states."""
    model = homerun.load(tiny_checkpoints["mixed"], expert_act="fp32")
    net, ids = model.net, _ids(50, model.args.vocab_size, seed=5)
    with torch.inference_mode():
        ref, ref_st = net.forward(ids, 0, net.new_state(), out_rows=slice(-1, None))
        net.experts = _RedoOnce(net.experts, redo_layer)
        try:
            got, got_st = net.forward(ids, 0, net.new_state(), out_rows=slice(-1, None))
        finally:
            net.experts = net.experts.inner
    assert got.shape == (1, model.args.dim) and torch.equal(got, ref)
    assert_states_equal(ref_st, got_st)


def test_out_rows_must_be_a_step_1_slice(tiny_checkpoints):
    model = homerun.load(tiny_checkpoints["hca"], expert_act="fp32")
    with pytest.raises(UsageError, match="out_rows"):
        model.net.forward(_ids(8, model.args.vocab_size), 0, model.net.new_state(), out_rows=slice(0, 8, 2))
