"""The router's guess at the next layer is made only where the backend reads it (issue 13), eagerly and under decode
graphs: a speculated token reads none, so its replayed graphs hold no guess (the guess is a segment of its own,
replayed on exact tokens only); an exact token's graphed guesses are the eager ones; and in a 1-resident + 2-cached
plan no guess is made at all, since the one the cached part could read (at its layer 2, made at the resident layer 1)
would reach the host behind a wait of its own: an exact token waits once per cached layer. Tiny mixed preset,
3 layers, 8 experts, a cache holding every expert (every call hits), through Session.feed."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.bench.graph_check import hybrid_placement, warm_every_expert  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

PROMPT = [1, 2, 3, 4]
TOKENS = [7, 300, 41]
N_LAYERS, N_EXPERTS, RESIDENT = 3, 8, 1


def _run(path, *, mixed: bool, graphs: str, speculate: str) -> list[dict]:
    pl = hybrid_placement(N_LAYERS, N_EXPERTS, resident=RESIDENT if mixed else None)
    model = load(path, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs=graphs)
    be = model.net.experts
    cached = be.backends_by_layer[0] if mixed else be
    cached.miss_policy.mode = "cpu"
    cached.fused.policy.mode = speculate
    warm_every_expert(cached, N_LAYERS, N_EXPERTS, RESIDENT if mixed else None)
    guesses: list[tuple[int, list]] = []  # what reached the prefetch hook: (layer, guessed ids)
    real = cached.prefetch_speculative

    def hook(layer, ids):
        guesses.append((layer, ids.reshape(-1).tolist()))
        return real(layer, ids)

    cached.prefetch_speculative = hook
    s = model.session()
    s.feed(PROMPT)
    for tok in TOKENS[:2]:  # the captures
        s.feed([tok])
    steps = []
    for tok in TOKENS:
        guesses.clear()
        with count_device_work() as cw:
            logits = s.feed([tok])
        steps.append({"logits": logits, "graph_kernels": cw.c.graph_kernels, "graphs": cw.c.graphs,
                      "waits": cw.c.waits, "guesses": list(guesses)})
    cached.close()
    return steps


@pytest.fixture(scope="module")
def runs(short_window_checkpoint):
    p = short_window_checkpoint
    return {(mixed, graphs, spec): _run(p, mixed=mixed, graphs=graphs, speculate=spec)
            for mixed, graphs, spec in [(False, "on", "always"), (False, "on", "never"), (False, "off", "never"),
                                        (True, "on", "always"), (True, "on", "never"), (True, "off", "never")]}


def test_a_speculated_token_replays_no_guess(runs):
    spec, exact = runs[(False, "on", "always")], runs[(False, "on", "never")]
    for s, e in zip(spec, exact):
        assert s["guesses"] == [] and [g[0] for g in e["guesses"]] == [1, 2]
        assert s["graph_kernels"] < e["graph_kernels"], (s["graph_kernels"], e["graph_kernels"])  # no router pass
        assert torch.equal(s["logits"], e["logits"])


def test_graphed_guesses_are_the_eager_ones(runs):
    for g, e in zip(runs[(False, "on", "never")], runs[(False, "off", "never")]):
        assert g["guesses"] == e["guesses"] and g["waits"] == e["waits"] == N_LAYERS
        assert torch.equal(g["logits"], e["logits"])


def test_a_mixed_plan_guesses_nothing_and_waits_once_per_cached_layer(runs):
    for graphs in ("on", "off"):
        for s in runs[(True, graphs, "never")]:
            assert s["guesses"] == [] and s["waits"] == N_LAYERS - 1, graphs
    # speculated or exact, the same graphed work: no guess is captured anywhere in this layout
    for s, e in zip(runs[(True, "on", "always")], runs[(True, "on", "never")]):
        assert s["graph_kernels"] == e["graph_kernels"] and s["graphs"] == e["graphs"]
        assert torch.equal(s["logits"], e["logits"])
