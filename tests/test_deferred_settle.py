"""A deferred decode step's end (Session.decode(defer=True) / settle, homerun.models.speculation) never leaks: the
session's own next feed or decode starts from the settled states and logits; settle waits for the step itself unless
told the host already did; an exception after the step or inside its settle loses neither the pending end nor the
session's consistency; experts_wrapped settles a step deferred inside it before the wrapper goes. Checked bit for
bit against a model that never speculates, on the mixed tiny plan whose speculated tokens miss (redos)."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.bench.graph_check import hybrid_placement  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.models import speculation  # noqa: E402
from offload.base import WrappingBackend  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

PROMPT = [1, 2, 3, 4]
N_LAYERS, N_EXPERTS, RESIDENT, SLOTS = 3, 8, 1, 6
N_STEPS = 6


def _model(path, speculate: str):
    """The mixed plan with 6 slots for the cached layers' 16 experts (CPU misses); guesses prefetch nothing, so the
    speculating and the exact model keep the same cache contents (as tests/test_deferred_token_end.py's)."""
    pl = hybrid_placement(N_LAYERS, N_EXPERTS, resident=RESIDENT, slots=SLOTS)
    model = load(path, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs="off")
    cached = model.net.experts.backends_by_layer[0]
    cached.miss_policy.mode = "cpu"
    cached.fused.policy.mode = speculate
    cached.cache.engine.max_in_flight = 1 << 10
    cached.prefetcher.speculated = lambda layer, ids: []
    return model, cached


def _ids(t: int) -> torch.Tensor:
    return torch.tensor([t])


@pytest.fixture(scope="module")
def exact(short_window_checkpoint):
    """The greedy tokens of a never-speculating session and the host logits after the prompt and each of them."""
    model, cached = _model(short_window_checkpoint, "never")
    s = model.session()
    logits = [s.feed(PROMPT).clone()]
    toks = []
    for _ in range(N_STEPS):
        toks.append(int(logits[-1].argmax()))
        s.decode(_ids(toks[-1]), toks[-1])
        logits.append(s.last_logits.clone())
    cached.close()
    return toks, logits


@pytest.fixture
def spec(short_window_checkpoint):
    model, cached = _model(short_window_checkpoint, "always")
    yield model, cached
    cached.close()


def _redos(cached) -> int:
    return cached.fused.stats()["redos"]


def test_the_sessions_own_next_step_starts_from_the_settled_step(spec, exact):
    """decode after decode, a feed and an empty feed after a deferred decode: none settled by the caller."""
    (model, cached), (toks, want) = spec, exact
    s = model.session()
    s.feed(PROMPT)
    for t in toks[:-2]:
        s.decode(_ids(t), t, defer=True)
    got = s.feed([toks[-2]], on_device=True)
    assert torch.equal(got.cpu(), want[-2])
    s.decode(_ids(toks[-1]), toks[-1], defer=True)
    assert torch.equal(s.feed([], on_device=True).cpu(), want[-1])
    assert _redos(cached) >= 1  # speculated steps missed: their redos are what the next steps had to start from
    assert s.tokens == PROMPT + toks


def test_decode_settles_unless_deferred_and_settle_waits_by_default(spec, exact, monkeypatch):
    (model, cached), (toks, want) = spec, exact
    told = []  # host_synced calls: the caller saying it waited already, so the end-of-token check makes no wait
    real = cached.fused.host_synced
    monkeypatch.setattr(cached.fused, "host_synced", lambda: (told.append(1), real())[1])
    s = model.session()
    s.feed(PROMPT)
    for i, t in enumerate(toks[:3]):
        got = s.decode(_ids(t), t)
        assert not s.unsettled and torch.equal(got.cpu(), want[i + 1]), i  # an outside caller's logits are settled
    s.decode(_ids(toks[3]), toks[3], defer=True)
    assert s.unsettled
    s.settle()  # nothing was read back: the end-of-token check waits for the step's mask copies itself
    assert told == []
    assert torch.equal(s.last_logits, want[4])


def test_an_exception_after_a_deferred_step_keeps_its_pending_end(spec, exact):
    """on_progress raising after each deferred step: the step stands committed with its end pending, and the next
    step settles it first."""
    (model, cached), (toks, want) = spec, exact
    s = model.session()
    s.feed(PROMPT)

    def boom(done, total):
        raise KeyboardInterrupt

    s.on_progress = boom
    for t in toks[:-1]:
        with pytest.raises(KeyboardInterrupt):
            s.decode(_ids(t), t, defer=True)
        assert s.unsettled  # committed, its end still pending
    s.on_progress = None
    s.decode(_ids(toks[-1]), toks[-1], defer=True)
    assert torch.equal(s.feed([], on_device=True).cpu(), want[-1])
    assert _redos(cached) >= 1 and s.tokens == PROMPT + toks


def test_a_settle_that_raises_drops_the_step(spec, exact, monkeypatch):
    """The redo (or the end check) raising: the session is what it was before the step (the same state objects, token
    list and logits), and usable. Feeding the token again is not bit-equal to the exact run any more: the dropped
    step moved experts into the cache, so the rerun serves on the device rows the exact run served on the CPU."""
    (model, cached), (toks, want) = spec, exact
    s = model.session()
    s.feed(PROMPT)
    for t in toks[:2]:
        s.decode(_ids(t), t)
    before_states, before_logits = list(s._states), s.last_logits
    s.decode(_ids(toks[2]), toks[2], defer=True)
    assert s.unsettled
    real = speculation.DeferredEnd.settle

    def settle_then_fail(self, synced):
        real(self, synced)  # the backend's token ends (and a redo runs) as it would
        raise RuntimeError("injected")

    monkeypatch.setattr(speculation.DeferredEnd, "settle", settle_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        s.settle()
    monkeypatch.undo()
    assert not s.unsettled and s.tokens == PROMPT + toks[:2]
    assert all(a is b for a, b in zip(s._states, before_states)) and torch.equal(s.last_logits, before_logits)
    s.decode(_ids(toks[2]), toks[2], defer=True)
    torch.testing.assert_close(s.feed([], on_device=True).cpu(), want[3], atol=0.1, rtol=0.02)
    assert s.tokens == PROMPT + toks[:3]


def test_experts_wrapped_settles_a_step_deferred_inside_it(spec, exact):
    (model, cached), (toks, want) = spec, exact
    ends = []

    class Tracing(WrappingBackend):
        def end_token(self, redo_from=None):
            ends.append(redo_from)
            return super().end_token(redo_from)

    s = model.session()
    s.feed(PROMPT)
    inner = model.net.experts
    with model.experts_wrapped(Tracing(inner)):
        s.decode(_ids(toks[0]), toks[0], defer=True)
        assert s.unsettled and not ends
    assert not s.unsettled and ends  # settled through the wrapper, before it went
    assert model.net.experts is inner
    assert torch.equal(s.last_logits, want[1])


def test_a_deferred_redo_is_charged_to_the_standins(spec, exact, monkeypatch):
    """A redo that runs from Session.settle is an eager step on the stand-ins too: it runs under the model's step
    watch (homerun.engine.standin_bytes), so its tensors reach the devices' peaks as an undeferred redo's do."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    (model, cached), (toks, _) = spec, exact
    assert model._step_bytes.devices  # the hybrid plan's GPU is a CUDA stand-in
    watched = []
    real = speculation.DeferredEnd.settle

    def settle(self, synced):
        watched.append(model._step_bytes in _get_current_dispatch_mode_stack())
        return real(self, synced)

    monkeypatch.setattr(speculation.DeferredEnd, "settle", settle)
    s = model.session()
    s.feed(PROMPT)
    for t in toks:
        s.decode(_ids(t), t, defer=True)
    s.settle()
    assert _redos(cached) >= 1 and watched and all(watched), watched
