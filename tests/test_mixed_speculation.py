"""Speculative decode tokens through a LayerSplitBackend (offload/base.py): a mixed plan, some layers' experts
resident and some cached, speculates an all-hit token like a pure cached plan (one host wait at its end, not one per
cached layer), and parts that each speculate agree on one redo. Checked on the tiny mixed preset with a hand-built
Placement (layer 1 resident, layers 0 and 2 behind a cache on one CUDA stand-in, as tests/test_decode_graphs_mixed.py
builds it): waits and counted syncs per all-hit decode token against the same model's non-speculating run and a pure
cached plan, logits equal to the non-speculating run (eager and graphed) and within bf16 of the reference; and, with
no model, two cached parts and a resident one: the earliest miss of all parts is redone, each part counts only the
layers before it (no hit counted twice), and parts that disagree speculate nothing."""

from __future__ import annotations

import dataclasses
import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.bench.graph_check import hybrid_placement, warm_every_expert  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

from offload.base import LayerSplitBackend, ReferenceExpertBackend  # noqa: E402
from offload.cached_backend import CacheOptions, MissOptions, build_cached_backend  # noqa: E402
from offload.devices import CudaStandInDevice  # noqa: E402
from offload.host_store import random_packed_expert  # noqa: E402
from offload.resident_backend import ResidentExpertBackend  # noqa: E402

PROMPT = [1, 2, 3, 4]
TOKENS = [7, 7, 300, 7, 41]
N_LAYERS, N_EXPERTS = 3, 8
RESIDENT = 1


def _placement(mixed: bool):
    """Every layer's experts behind a cache big enough for all of them, layer RESIDENT resident when `mixed`."""
    return hybrid_placement(N_LAYERS, N_EXPERTS, resident=RESIDENT if mixed else None)


def _model(path, *, mixed: bool, speculate: str, graphs: str = "off"):
    """The model with every cached expert made resident first, so every decode call hits."""
    model = load(path, dtype="bfloat16", experts="reference", placement=_placement(mixed), cuda_graphs=graphs)
    be = model.net.experts
    cached = be.backends_by_layer[0] if mixed else be
    assert type(be).__name__ == ("LayerSplitBackend" if mixed else "CachedExpertBackend")
    cached.miss_policy.mode = "cpu"  # no timing decides a split
    cached.fused.policy.mode = speculate
    warm_every_expert(cached, N_LAYERS, N_EXPERTS, RESIDENT if mixed else None)
    return model, cached


def _run(path, **kw) -> list[dict]:
    """Per decode step: logits, the cached part's event waits, counted syncs and launches, misses."""
    model, cached = _model(path, **kw)
    s = model.session()
    s.feed(PROMPT)
    steps = []
    for tok in TOKENS:
        d0 = cached.fused.stats()
        m0 = cached.cache.stats().to_dict()["misses"]
        with count_device_work() as cw:
            logits = s.feed([tok])
        d1 = cached.fused.stats()
        steps.append({"logits": logits.clone(), "waits": d1["event_waits"] - d0["event_waits"], "syncs": cw.c.syncs,
                      "launches": cw.c.device_launches, "spec": d1["speculative_tokens"] - d0["speculative_tokens"],
                      "misses": cached.cache.stats().to_dict()["misses"] - m0})
    return steps


@pytest.fixture(scope="module")
def runs(short_window_checkpoint):
    p = short_window_checkpoint
    return {"mixed_never": _run(p, mixed=True, speculate="never"), "mixed_auto": _run(p, mixed=True, speculate="auto"),
            "mixed_graphed": _run(p, mixed=True, speculate="auto", graphs="on"),
            "cached_auto": _run(p, mixed=False, speculate="auto")}


def test_an_all_hit_mixed_token_waits_once_like_a_cached_plan(runs):
    never, auto, graphed, cached = runs["mixed_never"], runs["mixed_auto"], runs["mixed_graphed"], runs["cached_auto"]
    for i in range(len(TOKENS)):
        assert never[i]["misses"] == auto[i]["misses"] == cached[i]["misses"] == 0, i  # every call hit
        assert auto[i]["spec"] == graphed[i]["spec"] == cached[i]["spec"] == 1 and never[i]["spec"] == 0, i
        assert auto[i]["waits"] == graphed[i]["waits"] == cached[i]["waits"] == 1, i
        assert auto[i]["syncs"] == cached[i]["syncs"], i  # what the session's host-side id checks count, no more
        # without speculation: a wait per cached layer (no guess at layer 2 from the resident layer 1: its own wait)
        assert never[i]["waits"] == N_LAYERS - 1 and never[i]["syncs"] == auto[i]["syncs"], i
        assert auto[i]["launches"] < never[i]["launches"], i  # no router guesses while speculating


def test_an_exact_token_guesses_only_where_a_guess_is_read(short_window_checkpoint):
    """Without speculation no layer of this plan reads a guess: the resident layer 1 would throw a guess at itself away,
    and the cached part would read a guess at its layer 2, made at the resident layer 1, only behind a wait of its own
    (offload.base.LayerSplitBackend._guesser). The model asks per layer (wants_speculation_for): no router pass."""
    model, cached = _model(short_window_checkpoint, mixed=True, speculate="never")
    net, targets, real = model.net, [], model.net._next_layer_guess

    def spy(layer, h, ids):
        targets.append(layer.index + 1)
        return real(layer, h, ids)

    net._next_layer_guess = spy
    s = model.session()
    s.feed(PROMPT)
    targets.clear()
    s.feed([TOKENS[0]])
    assert targets == []
    cached.close()


@pytest.mark.parametrize("which", ["mixed_auto", "mixed_graphed"])
def test_speculated_mixed_tokens_equal_the_exact_path(runs, which):
    for i in range(len(TOKENS)):
        assert torch.equal(runs[which][i]["logits"], runs["mixed_never"][i]["logits"]), (which, i)


def test_speculated_mixed_tokens_match_the_reference(short_window_checkpoint, runs):
    ref = load(short_window_checkpoint, dtype="bfloat16", experts="reference").session()
    ref.feed(PROMPT)
    for i, tok in enumerate(TOKENS):
        want, got = ref.feed([tok]).float(), runs["mixed_auto"][i]["logits"].float()
        assert torch.equal(want.argmax(-1), got.argmax(-1)), i
        assert ((got - want).abs().max() / want.abs().max()).item() <= 2e-2, i


# --- the protocol between parts, no model ---------------------------------------------------------------------------

D, I_DIM, E = 64, 32, 6


def _split(speculate=("always", "always")):
    """Part A: a cached backend for layer 0 (cold: its calls miss); part B: a cached backend for layers 2 and 3 (warm);
    a resident backend for layer 1. Misses stream, so every expert is computed by the same fused kernel."""
    g = torch.Generator().manual_seed(0)
    experts = {(l, e): random_packed_expert(D, I_DIM, g) for l in range(4) for e in range(E)}
    src = lambda l, e: experts[(l, e)]  # noqa: E731

    def cached(layers, mode):
        return build_cached_backend(src, layers, E, swiglu_limit=10.0,
                                    device=CudaStandInDevice("cuda-standin:0", 1 << 30),
                                    cache=CacheOptions(slots_per_layer={l: E for l in layers}),
                                    misses=MissOptions("stream", speculate=mode))
    a, b = cached([0], speculate[0]), cached([2, 3], speculate[1])
    for key in [(l, e) for l in (2, 3) for e in range(E)]:
        b.cache.prefetch(key, block=True)
    b.cache.commit()
    res = ResidentExpertBackend(src, [1], E, device=CudaStandInDevice("cuda-standin:1", 1 << 30), swiglu_limit=10.0)
    return LayerSplitBackend({0: a, 1: res, 2: b, 3: b}), a, b, ReferenceExpertBackend(src, swiglu_limit=10.0)


def _hits_misses(be) -> tuple[int, int]:
    c = be.cache.stats().to_dict()
    return c["hits"], c["misses"]


def test_the_earliest_miss_of_all_parts_is_redone_and_counted_once():
    split, a, b, ref = _split()
    g = torch.Generator().manual_seed(1)
    x, ids, w = torch.randn(1, D, generator=g), torch.tensor([[1, 4]]), torch.rand(1, 2, generator=g)
    assert split.begin_token(1) is True and not split.wants_speculation
    ys = [split.forward(l, x, ids, w) for l in range(4)]
    assert torch.equal(ys[0], torch.zeros_like(ys[0]))  # layer 0 missed both experts
    assert split.end_token() == 0  # A's miss; B hit everywhere but its layers are redone too
    assert _hits_misses(b) == (0, 0)  # B counted none of its speculative hits: the reruns will
    assert a.fused.n_event_waits == b.fused.n_event_waits == 1  # one wait per part for the whole token
    redo = [split.forward(l, x, ids, w) for l in range(4)]  # the model's rerun from layer 0: exact
    assert split.end_token() is None and split.wants_speculation
    for layer in range(4):
        assert torch.allclose(redo[layer], ref.forward(layer, x, ids, w), rtol=1e-5, atol=1e-6), layer
    assert _hits_misses(b) == (4, 0) and _hits_misses(a) == (0, 2)  # each (call, expert) once
    assert b.fused.stats()["redos"] == 0 and a.fused.stats()["redo_from"] == {0: 1}
    for be in (a, b):
        be.close()


def test_an_all_hit_split_token_stands():
    split, a, b, _ = _split()
    for key in [(0, e) for e in range(E)]:
        a.cache.prefetch(key, block=True)
    a.cache.commit()
    x, ids, w = torch.randn(1, D), torch.tensor([[1, 4]]), torch.rand(1, 2)
    assert split.begin_token(1) is True
    for layer in range(4):
        split.forward(layer, x, ids, w)
    assert split.end_token() is None
    assert _hits_misses(a) == (2, 0) and _hits_misses(b) == (4, 0)
    for be in (a, b):
        be.close()


def test_parts_that_disagree_speculate_nothing():
    """A part that declines (its policy) would run its layers exactly; another part's redo would rerun them and count
    them twice, so no part speculates."""
    split, a, b, _ = _split(("never", "always"))
    assert split.begin_token(1) is False and not a.fused.speculating and not b.fused.speculating
    x, ids, w = torch.randn(1, D), torch.tensor([[1, 4]]), torch.rand(1, 2)
    for layer in range(4):
        split.forward(layer, x, ids, w)
    assert split.end_token() is None
    assert b.fused.stats()["speculative_tokens"] == 0 and b.fused.stats()["tokens"] == 1
    for be in (a, b):
        be.close()


# --- a mixed plan whose cache is too small: speculated tokens miss and are redone ------------------------------------

def _missing_run(path, speculate: str, graphs: str = "off") -> tuple[list[torch.Tensor], dict, dict]:
    """Layers 0 and 2 share 6 slots for their 16 experts (CPU misses), layer 1 resident; guesses prefetch nothing, so
    the exact and the speculating run keep the same cache contents and may be compared bit for bit."""
    pl = _placement(True)
    pl = dataclasses.replace(pl, devices=(dataclasses.replace(pl.devices[0], expert_cache_slots=6),))
    model = load(path, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs=graphs)
    cached = model.net.experts.backends_by_layer[0]
    cached.miss_policy.mode = "cpu"
    cached.fused.policy.mode = speculate
    cached.cache.engine.max_in_flight = 1 << 10  # the link never turns a prefetch away: no landing time decides
    cached.prefetcher.speculated = lambda layer, ids: []
    s = model.session()
    s.feed(PROMPT)
    logits = [s.feed([tok]).clone() for tok in TOKENS]
    c = cached.cache.stats().to_dict()
    return logits, {k: c[k] for k in ("hits", "misses", "n_copies")}, cached.fused.stats()


@pytest.fixture(scope="module")
def exact_missing(short_window_checkpoint):
    return _missing_run(short_window_checkpoint, "never")


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_redone_mixed_tokens_equal_the_exact_path(short_window_checkpoint, exact_missing, graphs):
    want, traffic, _ = exact_missing
    got, traffic_spec, d = _missing_run(short_window_checkpoint, "always", graphs)
    assert d["speculative_tokens"] == len(TOKENS) + 1 and d["redos"] >= 1  # the 4-token prompt is decode-sized too
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), i
    assert traffic_spec == traffic and traffic["misses"] > 0  # each (call, expert) counted once


def test_a_speculated_token_prefetches_hash_layers_only_from_host_ids():
    """While speculating, a hash layer's experts are prefetched when its ids are read on the host (no sync), so they
    land before the layer instead of forcing a redo; ids that only the device could read are left alone."""
    split, a, b, _ = _split()
    tid2eid = torch.tensor([[1, 4], [2, 3]])
    assert split.begin_token(1) is True
    with count_device_work() as cw:
        assert split.prefetch_hash_layer(0, tid2eid, torch.tensor([0])) == [1, 4]
        a.prefetcher.tid2eid.host_reads = False  # the device path: unique + tolist
        assert split.prefetch_hash_layer(0, tid2eid, torch.tensor([1])) == []
    assert cw.c.syncs == 0
    x, ids, w = torch.randn(1, D), torch.tensor([[1, 4]]), torch.rand(1, 2)
    for layer in range(4):
        split.forward(layer, x, ids, w)
    assert split.end_token() is None  # layer 0's cold experts were prefetched by the hash hook: no redo
    assert _hits_misses(a) == (2, 0)
    for be in (a, b):
        be.close()
