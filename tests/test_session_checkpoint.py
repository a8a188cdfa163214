"""Session.checkpoint / rollback: returning to a point gives exactly the state a fresh prefill of those tokens
reaches, and a checkpoint from another lineage is refused. An interrupted feed leaves no stale logits."""

from __future__ import annotations

import pytest
import torch

import homerun
from homerun.errors import UsageError


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return homerun.load(tiny_checkpoints["mixed"], expert_act="fp32", max_chunk_tokens=64)


def _ids(n, seed, vocab):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_rollback_equals_a_fresh_prefill(model):
    v = model.args.vocab_size
    a, b, c = _ids(150, 1, v), _ids(40, 2, v), _ids(30, 3, v)  # a crosses CSA/HCA compression boundaries
    s = model.session()
    s.feed(a)
    cp = s.checkpoint()
    s.feed(b)
    s.rollback(cp)
    assert s.tokens == a and torch.equal(s.last_logits, cp.last_logits)
    got = s.feed(c)
    fresh = model.session()
    fresh.feed(a)
    want = fresh.feed(c)
    assert torch.equal(got, want)


def test_rollback_to_another_lineage_is_refused(model):
    v = model.args.vocab_size
    s, other = model.session(), model.session()
    s.feed(_ids(10, 4, v))
    other.feed(_ids(10, 5, v))
    with pytest.raises(UsageError, match="lineage"):
        s.rollback(other.checkpoint())
    cp = s.checkpoint()
    s.reset()
    with pytest.raises(UsageError, match="lineage"):
        s.rollback(cp)


def test_an_interrupted_feed_leaves_no_stale_logits(model):
    v = model.args.vocab_size
    s = model.session()
    s.feed(_ids(20, 6, v))

    def stop(done, total):
        if done < total:
            raise KeyboardInterrupt

    s.on_progress = stop
    with pytest.raises(KeyboardInterrupt):
        s.feed(_ids(200, 7, v))  # 64-token chunks: interrupted after the first
    assert s.n_tokens == 20 + 64 and s.last_logits is None
