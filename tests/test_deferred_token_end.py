"""The end of a speculated decode token rides the generation loop's one readback (homerun.models.speculation,
Session.decode / settle, generate): an all-hit hybrid token makes one host wait in total (the sampled id read back;
the end-of-token check reads the masks that wait brought back), eager and graphed, for an all-cached and a
1-resident + 2-cached tiny model; and where speculated tokens miss, the redo after the readback gives the tokens and
logits of the non-speculating run bit for bit (the redo chooses from the step's own draw)."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.bench.graph_check import hybrid_placement, warm_every_expert  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

PROMPT = [1, 2, 3, 4]
N_LAYERS, N_EXPERTS, RESIDENT = 3, 8, 1
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9, seed=7)


def _placement(mixed: bool, slots: int | None = None):
    return hybrid_placement(N_LAYERS, N_EXPERTS, resident=RESIDENT if mixed else None, slots=slots)


def _model(path, *, mixed: bool, graphs: str, speculate: str, slots: int | None = None):
    model = load(path, dtype="bfloat16", experts="reference", placement=_placement(mixed, slots), cuda_graphs=graphs)
    cached = model.net.experts.backends_by_layer[0] if mixed else model.net.experts
    cached.miss_policy.mode = "cpu"  # no timing decides a split
    cached.fused.policy.mode = speculate
    return model, cached


@pytest.mark.parametrize("graphs", ["off", "on"])
@pytest.mark.parametrize("mixed", [False, True], ids=["all-cached", "mixed"])
def test_an_all_hit_hybrid_token_waits_once_in_total(short_window_checkpoint, mixed, graphs):
    model, cached = _model(short_window_checkpoint, mixed=mixed, graphs=graphs, speculate="auto")
    warm_every_expert(cached, N_LAYERS, N_EXPERTS, RESIDENT if mixed else None)
    gen = model.generate(PROMPT, max_new_tokens=6, stop_ids=[], greedy=True)
    d0 = None
    for i in range(6):
        if i == 3:
            d0 = cached.fused.stats()
        with count_device_work() as cw:
            next(gen)
        if i >= 3:  # past the prefill and the captures
            assert (cw.c.syncs, cw.c.waits) == (1, 0), (i, cw.c.sync_names)  # the id read back, and no event wait
    d1 = cached.fused.stats()
    assert d1["speculative_tokens"] - d0["speculative_tokens"] == 3 and d1["redos"] == d0["redos"]
    assert d1["event_waits"] == d0["event_waits"]
    if graphs == "on":
        assert model.decode_graphs.replays > 0
    cached.close()


def _generate(path, how: dict, speculate: str, graphs: str) -> tuple[list[int], list[torch.Tensor], dict]:
    """The mixed plan with 6 slots for the cached layers' 16 experts (CPU misses); guesses prefetch nothing, so the
    speculating and the exact run keep the same cache contents."""
    model, cached = _model(path, mixed=True, graphs=graphs, speculate=speculate, slots=6)
    cached.cache.engine.max_in_flight = 1 << 10  # the link never turns a prefetch away: no landing time decides
    cached.prefetcher.speculated = lambda layer, ids: []
    s = model.session()
    toks, logits = [], []
    for step in model.generate(PROMPT, max_new_tokens=6, stop_ids=[], session=s, **how):
        toks.append(step.token_id)
        logits.append(s.last_logits.clone())  # settled by the loop already: the logits the token was drawn from
    stats = cached.fused.stats()
    cached.close()
    return toks, logits, stats


@pytest.fixture(scope="module")
def exact(short_window_checkpoint):
    return {name: _generate(short_window_checkpoint, how, "never", "off")
            for name, how in (("greedy", dict(greedy=True)), ("sampled", SAMPLED))}


@pytest.mark.parametrize("name,graphs", [("sampled", "off"), ("sampled", "on"), ("greedy", "off")])
def test_a_redo_after_the_readback_gives_the_exact_tokens_and_logits(short_window_checkpoint, exact, name, graphs):
    how = dict(greedy=True) if name == "greedy" else SAMPLED
    want_toks, want_logits, _ = exact[name]
    toks, logits, d = _generate(short_window_checkpoint, how, "always", graphs)
    assert d["speculative_tokens"] >= 5 and d["redos"] >= 1  # speculated tokens missed and were redone
    assert toks == want_toks
    for i, (g, w) in enumerate(zip(logits, want_logits)):
        assert torch.equal(g, w), i


def test_a_redo_draws_nothing_new_and_no_state_is_saved(short_window_checkpoint, monkeypatch):
    """The redo of a missed speculated token chooses from the step's own draw: one `exponential_` draw per generated
    token, redone or not, and the generator's state is never saved or restored (that was a host copy of its state
    every speculated sampled token, and a second vocabulary-sized draw on every redo)."""
    import homerun.engine.generate as generate_mod

    calls = {"get_state": 0, "set_state": 0}

    class Spy(torch.Generator):
        def get_state(self):
            calls["get_state"] += 1
            return super().get_state()

        def set_state(self, state):
            calls["set_state"] += 1
            return super().set_state(state)

    def make_generator(seed, device="cpu"):
        g = Spy(device=device)
        g.manual_seed(int(seed))
        return g

    monkeypatch.setattr(generate_mod, "make_generator", make_generator)
    model, cached = _model(short_window_checkpoint, mixed=True, graphs="off", speculate="always", slots=6)
    cached.cache.engine.max_in_flight = 1 << 10
    cached.prefetcher.speculated = lambda layer, ids: []
    draws, toks = [], []
    gen = model.generate(PROMPT, max_new_tokens=6, stop_ids=[], **SAMPLED)
    for _ in range(6):
        with count_device_work() as cw:
            toks.append(next(gen).token_id)
        draws.append(cw.c.op_names.get("exponential_", 0))
    d = cached.fused.stats()
    cached.close()
    assert d["speculative_tokens"] >= 5 and d["redos"] >= 1  # speculated tokens missed and were redone
    assert draws == [1] * 6 and calls == {"get_state": 0, "set_state": 0}
