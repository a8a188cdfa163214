"""Incremental inference state: chunked prefill + token-by-token decode equals the full pass; feed(a) then feed(b)
leaves exactly the state of feed(a+b); an interrupted feed leaves the session as it was; the capacity ramp."""

from __future__ import annotations

import pytest
import torch

import homerun
from homerun.errors import ContextFullError
from offload.base import ExpertBackend

KINDS = ("mixed", "csa", "hca")


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {k: homerun.load(tiny_checkpoints[k], expert_act="fp32") for k in KINDS}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / b.abs().max().item()


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_and_decode_match_full_pass(kind, models):
    model = models[kind]
    # The chunks end at 458; the decode crosses 512 (an HCA window closes, both sliding windows wrap, CSA closes
    # every 4) and attends the new HCA row for 12 tokens (decoding on to 620 crossed no boundary of a new kind).
    ids = _ids(524, model.args.vocab_size, seed=1)
    full = model.logits(ids)
    sess = model.session()
    pos = 0
    # Odd chunk sizes cross window (64/128), CSA (4) and HCA (128) boundaries at every phase.
    for size in (1, 3, 130, 5, 127, 2, 190):
        last = sess.feed(ids[pos : pos + size])
        pos += size
        assert _rel_err(last, full[pos - 1]) <= 1e-4
    while pos < ids.numel():  # then token-by-token decode
        last = sess.feed(ids[pos : pos + 1])
        pos += 1
        assert _rel_err(last, full[pos - 1]) <= 1e-4
    assert sess.n_tokens == ids.numel() and sess.tokens == ids.tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_one_query_blocks_equal_batched_blocks(kind, models, monkeypatch):
    """Blocks of one query (the decode path without masks, which a long prefill also takes once its query blocks
    shrink to one row) give the batched, masked blocks' logits at every position."""
    from homerun.models import deepseek_v4

    model = models[kind]
    ids = _ids(300, model.args.vocab_size, seed=5)
    batched = model.logits(ids)
    monkeypatch.setattr(deepseek_v4, "_BLOCK_ELEMS", 1)  # every query block is one row
    one = model.logits(ids)
    assert _rel_err(one, batched) <= 1e-5


def _state_tensors(sess) -> list[torch.Tensor]:
    out = []
    for st in sess._states:
        out.append(st.window)
        for c in (st.comp, st.index_comp):
            if c is None:
                continue
            out.append(c.entries())
            for t in (c.pending_kv, c.pending_gate, c.overlap_kv, c.overlap_gate):
                out.append(t if t is not None else torch.empty(0))
    return out


@pytest.mark.parametrize("split", [1, 4, 131, 259])
def test_feed_a_then_b_equals_feed_a_plus_b(split, models):
    model = models["mixed"]
    ids = _ids(300, model.args.vocab_size, seed=2)
    one = model.session()
    la = one.feed(ids)
    two = model.session()
    two.feed(ids[:split])
    lb = two.feed(ids[split:])
    assert torch.allclose(la, lb, rtol=0, atol=1e-5 * la.abs().max().item())
    sa, sb = _state_tensors(one), _state_tensors(two)
    assert len(sa) == len(sb)
    for a, b in zip(sa, sb):
        assert a.shape == b.shape
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_small_max_chunk_tokens_equals_one_chunk(tiny_checkpoints, models):
    model = models["csa"]
    small = homerun.load(tiny_checkpoints["csa"], max_chunk_tokens=37, expert_act="fp32")
    ids = _ids(300, model.args.vocab_size, seed=4)
    assert _rel_err(small.logits(ids), model.logits(ids)) <= 1e-5
    assert _rel_err(small.session().feed(ids), model.logits(ids)[-1]) <= 1e-5


class _FailingBackend(ExpertBackend):
    """Delegates to the model's backend but raises KeyboardInterrupt on the n-th call (simulated Ctrl-C)."""

    def __init__(self, inner, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def forward(self, *args):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.inner.forward(*args)


def test_interrupted_feed_leaves_session_consistent(tiny_checkpoints, models):
    ref = models["mixed"]
    ids = _ids(400, ref.args.vocab_size, seed=6)
    model = homerun.load(tiny_checkpoints["mixed"], max_chunk_tokens=100, expert_act="fp32")
    backend = _FailingBackend(model.net.experts, fail_at=10**9)
    model.net.experts = backend
    sess = model.session()
    sess.feed(ids[:150])
    # Interrupt the second chunk of the next feed, in the middle of the layer stack (a chunk before the prompt's last
    # makes no last-layer call: no row of it is read)
    backend.calls, backend.fail_at = 0, (ref.args.n_layers - 1) + 2
    with pytest.raises(KeyboardInterrupt):
        sess.feed(ids[150:400])
    assert sess.n_tokens == 250  # the first chunk (150..250) committed, the second did not
    backend.fail_at = 10**9
    last = sess.feed(ids[250:400])
    assert _rel_err(last, ref.logits(ids)[-1]) <= 1e-4


def test_capacity_ramp(tiny_checkpoints, models):
    ref = models["mixed"]
    model = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[64, 128, 256], expert_act="fp32")
    ids = _ids(300, ref.args.vocab_size, seed=7)
    sess = model.session()
    steps = []
    sess.on_capacity = steps.append
    assert sess.capacity_tokens == 64
    sess.feed(ids[:60])
    assert sess.capacity_tokens == 64
    sess.feed(ids[60:100])
    assert sess.capacity_tokens == 128
    last = sess.feed(ids[100:256])
    assert sess.capacity_tokens == 256 and steps == [128, 256]
    assert _rel_err(last, ref.logits(ids[:256])[-1]) <= 1e-4
    with pytest.raises(ContextFullError):
        sess.feed(ids[256:257])
    assert sess.n_tokens == 256  # nothing lost
    sess.reset()
    assert sess.capacity_tokens == 64 and sess.n_tokens == 0
    assert _rel_err(sess.feed(ids[:10]), ref.logits(ids[:10])[-1]) <= 1e-4


def test_kv_budget_stops_the_ramp(tiny_checkpoints):
    probe = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[64, 128, 256], expert_act="fp32")
    budget = probe.kv_bytes_at(128)
    model = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[64, 128, 256], kv_budget_bytes=budget, expert_act="fp32")
    assert model.max_context_tokens() == 128 and probe.max_context_tokens() == 256
    sess = model.session()
    ids = _ids(200, model.args.vocab_size, seed=8)
    sess.feed(ids[:128])
    with pytest.raises(ContextFullError, match="budget"):
        sess.feed(ids[128:200])
    assert sess.n_tokens == 128 and sess.capacity_tokens == 128
    with pytest.raises(ContextFullError):
        sess.feed(ids[128:129])


def test_kv_bytes_prediction_matches_state(models):
    model = models["mixed"]
    sess = model.session()
    fed = 0
    for n in (1, 3, 200, 517):  # pending windows, overlap slices and closed entries at several phases
        sess.feed(_ids(n - fed, model.args.vocab_size, seed=n))
        fed = n
        assert sess.kv_bytes == model.kv_bytes_at(n)
