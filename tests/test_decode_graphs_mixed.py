"""Decode graphs over a model whose layers are partly resident, partly cached (homerun.engine.graphs, per-layer
layout; offload.base.ExpertBackend.graph_safe_layer): a layer whose routed experts all sit on the device is captured
whole, its routed call inside its segment, and only the cached layers run their routed call eagerly between two
segments; with the static attention cores inside the segments, a step replays one segment per stretch between two
cached layers' calls, n_cached + 1. No planner output builds this mix on one device, so
the Placement is made by hand: the tiny mixed preset (3 layers, layer 0 a hash layer, 8 experts, top-2) on one
CUDA stand-in, layer 1 resident, layers 0 and 2 behind a 6-slot expert cache with CPU-served misses. The graphed
steps equal the eager forward bit for bit, with the same cache traffic, and the reference model's logits within
bf16 tolerance."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.bench.graph_check import hybrid_placement, warm_every_expert  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

PROMPT = [1, 2, 3, 4]
TOKENS = [7, 7, 300, 7, 41, 7]
N_LAYERS = 3
RESIDENT = 1  # the one layer whose experts are all on the device
SLOTS = 6  # cache slots for the two cached layers' 16 experts: misses come and go


@pytest.fixture(scope="module")
def ckpt(short_window_checkpoint):
    return short_window_checkpoint


def _mixed_placement():
    return hybrid_placement(N_LAYERS, 8, resident=RESIDENT, slots=SLOTS)  # 8 experts a layer in the tiny model


def _model(path, graphs: str):
    model = load(path, dtype="bfloat16", experts="reference", placement=_mixed_placement(), cuda_graphs=graphs)
    be = model.net.experts
    assert type(be).__name__ == "LayerSplitBackend"
    cached, resident = be.backends_by_layer[0], be.backends_by_layer[RESIDENT]
    assert type(cached).__name__ == "CachedExpertBackend" and cached.fused is not None
    assert type(resident).__name__ == "ResidentExpertBackend" and resident.graph_safe
    assert [be.graph_safe_layer(i) for i in range(N_LAYERS)] == [False, True, False]
    cached.miss_policy.mode = "cpu"
    cached.fused.policy.mode = "never"
    cached.cache.engine.max_in_flight = 1 << 10  # the link never turns a prefetch away: no landing time decides
    calls = []
    real = resident.forward
    resident.forward = lambda *a, **kw: (calls.append(a[0]), real(*a, **kw))[1]  # eager calls of the resident part
    return model, cached, calls


def _traffic(cached) -> dict:
    d = cached.stats().to_dict()
    return {"cache": {k: d["cache"][k] for k in ("hits", "misses", "n_copies", "bytes_moved")},
            "prefetch": d["prefetch"], "cpu_experts": d["cpu_experts"]}


def _run(model, cached, calls) -> list[dict]:
    s = model.session()
    s.feed(PROMPT)
    out = [{"traffic": _traffic(cached)}]
    for tok in TOKENS:
        n0 = len(calls)
        with count_device_work() as cw:
            logits = s.feed([tok])
        out.append({"logits": logits.clone(), "traffic": _traffic(cached), "counts": cw.c,
                    "resident_calls": len(calls) - n0})
    return out


@pytest.fixture(scope="module")
def runs(ckpt):
    eager = _model(ckpt, "off")
    graphed = _model(ckpt, "on")
    old = _model(ckpt, "on")  # the old layout: every routed call eager, the resident one too
    old[0].decode_graphs.eager_routed = [True] * N_LAYERS
    return {"eager": _run(*eager), "graphed": _run(*graphed), "old": _run(*old), "model": graphed[0]}


def test_mixed_graphs_equal_eager_with_the_same_traffic(runs):
    eager, graphed = runs["eager"], runs["graphed"]
    dg = runs["model"].decode_graphs
    assert dg.eager_routed == [True, False, True] and dg.split and dg.replays == len(TOKENS)
    assert "eager between segments in 2 of 3 layers" in runs["model"].decode_graphs_reason
    assert eager[0]["traffic"] == graphed[0]["traffic"]
    for i in range(1, len(eager)):
        assert torch.equal(eager[i]["logits"], graphed[i]["logits"]), i
        assert torch.equal(eager[i]["logits"], runs["old"][i]["logits"]), i
        assert eager[i]["traffic"] == graphed[i]["traffic"], i  # hits, misses, copies, CPU experts, prefetches
    last = eager[-1]["traffic"]
    assert last["cpu_experts"] > 0 and last["cache"]["hits"] > 0  # misses and hits both happened
    spec = [p for p in last["prefetch"] if p["kind"] == "speculative"][0]
    # no guess: the one at layer 2 would be made at the resident layer 1 and read behind a wait of its own
    assert spec["predicted"] == 0 and not any(runs["model"].decode_graphs.guess_at)


def test_mixed_graphs_match_the_reference_model(ckpt, runs):
    ref = load(ckpt, dtype="bfloat16", experts="reference").session()
    ref.feed(PROMPT)
    for i, tok in enumerate(TOKENS, start=1):
        want, got = ref.feed([tok]).float(), runs["graphed"][i]["logits"].float()
        assert torch.equal(want.argmax(-1), got.argmax(-1)), i
        assert ((got - want).abs().max() / want.abs().max()).item() <= 2e-2, i


def test_the_resident_layer_is_captured_whole(runs):
    dg = runs["model"].decode_graphs
    sk = ("static",)  # the segments hold the static attention cores (KV in the compute dtype)
    # one segment per stretch between two eager routed calls: the resident layer's inside the one after layer 0's
    assert set(dg.segments) == {("run", j) + sk for j in [-1] + [i for i in range(N_LAYERS) if i != RESIDENT]}
    eager, graphed, old = runs["eager"], runs["graphed"], runs["old"]
    for i in range(1, len(eager)):
        assert eager[i]["resident_calls"] == 1 and old[i]["resident_calls"] == 1, i
        # replays run the captured call; the capture step calls it twice (warm-up, recording)
        assert graphed[i]["resident_calls"] == (2 if i == 1 else 0), i


def test_mixed_steps_replay_one_segment_per_stretch_between_cached_calls(runs):
    eager, graphed, old = runs["eager"], runs["graphed"], runs["old"]
    n_cached = N_LAYERS - 1
    for i in range(2, len(eager)):  # after the capture step
        g, o, e = graphed[i]["counts"], old[i]["counts"], eager[i]["counts"]
        # static cores: n_cached + 1 segments (n_layers + 1 + n_cached with the segments apart); every call eager: n + 1
        assert g.graphs == n_cached + 1 and o.graphs == N_LAYERS + 1, i
        assert g.device_launches < o.device_launches < e.device_launches, (i, g.device_launches, o.device_launches)
        assert g.syncs == o.syncs == e.syncs, i  # the graphs add no host sync, nor take the backend's away
