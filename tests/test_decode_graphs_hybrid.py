"""Decode graphs around the hybrid expert backend (homerun.engine.graphs, split layout) on a CUDA stand-in: the
cached backend (a device cache smaller than the expert set, misses served on the CPU or streamed) is not graph-safe,
so its routed call runs eagerly between captured segments (one per stretch between two calls). The graphed steps
must equal the eager forward bit for bit, with the same cache traffic, on steps with misses and all-hit steps,
speculated tokens and their redos included."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.graphs import GraphCaptureError  # noqa: E402
from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

PROMPT = [1, 2, 3, 4]
# Decode tokens: repeats make all-hit steps once their experts are cached, a new token brings misses back.
TOKENS = [7, 7, 7, 300, 7, 7, 41]


@pytest.fixture(scope="module")
def ckpt(short_window_checkpoint):
    """The mixed preset (3 layers: a hash layer, 8 experts, top-2) with an 8-token sliding window."""
    return short_window_checkpoint


def _hybrid(path, graphs: str, *, slots: int, misses: str, speculate: str):
    """A cached-backend stand-in model: `slots` cache slots (of 3 x 8 experts), misses all served one way, the
    speculation pinned and prefetches never refused, so both runs of a comparison make the same choices (the auto
    policies and the link's in-flight limit depend on timings)."""
    from homerun.formats.loader import open_checkpoint

    args = ModelArgs.from_hf_config(open_checkpoint(path).config)
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="host", expert_cache_slots=slots)
    model = load(path, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs=graphs)
    be = model.net.experts
    assert type(be).__name__ == "CachedExpertBackend" and be.fused is not None and not be.graph_safe
    be.miss_policy.mode = misses
    be.fused.policy.mode = speculate
    be.cache.engine.max_in_flight = 1 << 10  # the link never turns a prefetch away: no copy's landing time decides
    return model


def _traffic(model) -> dict:
    """The backend's counters that a decode step moves (timings left out)."""
    d = model.net.experts.stats().to_dict()
    dec = {k: v for k, v in d["gpu"]["decode"].items() if k != "speculation"}
    cache = {k: d["cache"][k] for k in ("hits", "misses", "n_copies", "bytes_moved")}
    return {"cache": cache, "prefetch": d["prefetch"], "cpu_experts": d["cpu_experts"], "decode": dec}


def _run(model) -> list[tuple[torch.Tensor, dict, object]]:
    """Prefill, then TOKENS one decode step each: per step its logits, the traffic after it, its device work (the
    prefill's traffic first)."""
    s = model.session()
    s.feed(PROMPT)
    out = [(None, _traffic(model), None)]
    for tok in TOKENS:
        with count_device_work() as cw:
            logits = s.feed([tok])
        out.append((logits.clone(), _traffic(model), cw.c))
    return out


CASES = {  # (slots, misses, speculate)
    "cpu-misses": (8, "cpu", "never"),  # every layer waits for its misses; the router guesses prefetch the next layer
    "streamed-speculated": (12, "stream", "always"),  # one wait per token; a missed layer is redone from there on
}


@pytest.fixture(scope="module", params=sorted(CASES))
def runs(request, ckpt):
    slots, misses, speculate = CASES[request.param]
    eager = _hybrid(ckpt, "off", slots=slots, misses=misses, speculate=speculate)
    graphed = _hybrid(ckpt, "on", slots=slots, misses=misses, speculate=speculate)
    assert eager.decode_graphs is None
    return request.param, graphed, _run(eager), _run(graphed)


def test_graphed_hybrid_decode_equals_eager_with_the_same_cache_traffic(runs):
    case, graphed, eager, out = runs
    dg = graphed.decode_graphs
    assert dg.split and dg.backend is graphed.net.experts and dg.replays == len(TOKENS)
    assert "experts eager between segments" in graphed.decode_graphs_reason
    assert eager[0][1] == out[0][1]  # the prefills (eager in both)
    kinds = []
    for i in range(1, len(eager)):
        (le, te, _), (lg, tg, _) = eager[i], out[i]
        assert torch.equal(le, lg), (case, i)
        assert te == tg, (case, i)  # hits, misses, copies, CPU experts, prefetches, waits, redos: step by step
        kinds.append("miss" if te["cache"]["misses"] > eager[i - 1][1]["cache"]["misses"] else "all-hit")
    assert kinds[0] == "miss" and "all-hit" in kinds[1:] and "miss" in kinds[1:], (case, kinds)  # capture missed
    last = eager[-1][1]
    if case == "cpu-misses":
        assert last["cpu_experts"] > 0 and last["prefetch"][1]["issued"] > eager[1][1]["prefetch"][1]["issued"]
    else:
        assert last["decode"]["speculative_tokens"] >= len(TOKENS) and last["decode"]["redos"] > 0
        assert last["cpu_experts"] == 0 and last["cache"]["n_copies"] > 0


def test_graphed_hybrid_steps_replay_one_segment_per_layer_and_one_with_fewer_launches(runs):
    """Static cores inside the segments: one segment per stretch between two eager routed calls, n_layers + 1."""
    case, graphed, eager, out = runs
    n = graphed.args.n_layers
    guesses = sum(graphed.decode_graphs.guess_at)  # layers whose guess at the next one the backend may read
    assert guesses == 2  # at layers 1 and 2, made at layers 0 and 1
    redos = 0
    for i in range(1, len(eager)):
        (_, te, ce), (_, tg, cg) = eager[i], out[i]
        redo = te["decode"]["redos"] - eager[i - 1][1]["decode"]["redos"]
        redos += redo
        assert ce.graphs == 0
        if i == 1:  # the capture step records its segments, replaying only those a redo runs again
            assert (cg.graphs > 0) == bool(redo), case
        elif not redo:  # an exact token also replays the router's guess segments (a speculated one reads none)
            assert cg.graphs == n + 1 + (guesses if case == "cpu-misses" else 0), (case, i)
            assert cg.device_launches < ce.device_launches, (case, i, cg.device_launches, ce.device_launches)
        else:  # a redo replays the layers from the missed one again, their guesses too
            assert n + 1 < cg.graphs <= n + 1 + n + guesses, (case, i)
        assert cg.syncs == ce.syncs, (case, i)  # the backend's own syncs stay; the graphs add none
    assert case != "streamed-speculated" or redos > 0


def test_capturing_the_hybrid_routed_call_fails(ckpt):
    """The split layout is needed: the cached backend's call captured with its segment (the full layout) is refused
    by the capture (a host sync), so a runner that captured it could not pass the equivalence above."""
    model = _hybrid(ckpt, "on", slots=6, misses="cpu", speculate="never")
    model.decode_graphs.eager_routed = [False] * model.args.n_layers
    s = model.session()
    s.feed(PROMPT)
    with pytest.raises(GraphCaptureError, match="host sync"):
        s.feed([7])


def test_bench_reports_the_split_runner_for_a_hybrid_stand_in(ckpt):
    from homerun.bench import model_bench as hb

    costs = {}
    for graphs in ("on", "off"):
        model = _hybrid(ckpt, graphs, slots=6, misses="cpu", speculate="never")
        costs[graphs] = hb.gpu_costs(model, seed=0)
    n = model.args.n_layers
    assert costs["on"]["decode_runner"].startswith("graphs") and "experts eager" in costs["on"]["decode_runner"]
    assert costs["on"]["graph_replays_per_token"] == n + 1 + 2  # and the two guesses an exact token reads
    assert costs["off"]["decode_runner"].startswith("eager") and costs["off"]["graph_replays_per_token"] == 0
    assert costs["on"]["launches_per_token"] < costs["off"]["launches_per_token"]
    assert costs["on"]["host_syncs_per_token"] == costs["off"]["host_syncs_per_token"]
