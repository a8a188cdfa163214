"""Decode replayed from captured graphs (homerun.engine.graphs) on a CUDA stand-in, where `EmulatedGraphs` gives a
CUDA graph's semantics (replay re-runs the recorded launches on the recorded tensors). The graphed steps must equal
the eager forward bit for bit across the transitions a decode meets: a CSA window closing, the sliding window
filling and then sliding."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.graphs import DecodeGraphs, EmulatedGraphs, GraphCaptureError, decode_graphs_for  # noqa: E402
from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.errors import UsageError  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")


def _graphed(path, dtype="bfloat16", graphs="on"):
    from homerun.formats.loader import open_checkpoint

    args = ModelArgs.from_hf_config(open_checkpoint(path).config)
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    return load(path, dtype=dtype, experts="reference", placement=pl, cuda_graphs=graphs), args


@pytest.fixture(scope="module")
def short_ckpt(short_window_checkpoint):
    return short_window_checkpoint


@pytest.fixture(scope="module")
def steps(short_ckpt):
    """Prefill 4 tokens, then 5 greedy decode steps (positions 4..8), each computed twice: eagerly (net.forward
    on the session's states, which it does not mutate) and through the session (the first captures, the rest
    replay). Position 7 closes a CSA window (and its indexer's) and fills the 7-row window; 8 slides it."""
    model, args = _graphed(short_ckpt)
    assert args.window_size == 8 and args.csa_rate == 4
    prompt = torch.randint(0, 512, (4,), generator=torch.Generator().manual_seed(3)).tolist()
    s = model.session()
    logits = s.feed(prompt)
    out = []
    for _ in range(5):
        tok = int(logits.argmax())
        pos = s.n_tokens
        with torch.inference_mode():
            hidden, _ = model.net.forward(torch.tensor([tok]), pos, s._states)
            eager = model.net.logits(hidden)[0].float()
        logits = s.feed([tok])
        out.append((pos, eager, logits.clone()))
    return model, out


def test_graphed_decode_equals_the_eager_forward_bit_for_bit(steps):
    model, out = steps
    assert model.decode_graphs is not None and model.decode_graphs.captured
    assert model.decode_graphs.replays == 5  # the capture step and four replays
    assert [p for p, _, _ in out] == [4, 5, 6, 7, 8]
    for pos, eager, graphed in out:
        assert torch.equal(eager, graphed), pos


def test_a_replay_that_misses_the_new_position_is_caught(steps):
    """The emulation is faithful enough to fail a broken runner: replaying with a stale position buffer (a graph
    that baked its capture position) gives different logits."""
    model, _ = steps
    dg = model.decode_graphs
    s = model.session()
    s.feed([1, 2])
    tok, pos = 7, s.n_tokens
    with torch.inference_mode():
        hidden, _ = model.net.forward(torch.tensor([tok]), pos, s._states)
        eager = model.net.logits(hidden)[0].float()
    real_fill = dg.pos_buf.fill_
    try:
        dg.pos_buf.fill_ = lambda v: real_fill(4)  # type: ignore[method-assign]
        bad = s.feed([tok])
    finally:
        del dg.pos_buf.fill_
    assert not torch.equal(eager, bad)


def _count_step(model):
    """The device work of one replayed decode step and its logits (a replay before counting: the graphs exist)."""
    s = model.session()
    s.feed([1, 2])
    s.feed([5])
    ids = torch.tensor([6])
    with torch.inference_mode(), count_device_work() as cw:
        hidden = model._forward(ids, s.n_tokens, s._states)[0]
        model.net.logits(hidden)
    return cw.c


def test_a_resident_step_is_one_graph_launch(steps):
    """Every layer resident and the KV in the compute dtype: the whole step is one graph (static attention cores,
    homerun.models.deepseek_v4.static_decode). Around it: the token id's copy, the position's fill, the new states'
    snapshot (one clone per dtype of the small state), the logits (linear, cast)."""
    model, _ = steps
    c = _count_step(model)
    assert c.graphs == 1
    assert c.syncs == 0, c.sync_names
    assert c.device_launches <= 7, sorted(c.op_names.items(), key=lambda kv: -kv[1])  # the graph counts one


def test_the_piecewise_layout_is_one_launch_per_segment_plus_the_cores(steps):
    """whole_step off (as for fp8 KV pages off the device): n_layers + 1 graph launches, the attention cores eagerly
    between them (measured 10.3 launches per layer on the tiny preset, against ~31 without graphs)."""
    model, _ = steps
    model.decode_graphs.whole_step = False
    try:
        c = _count_step(model)
    finally:
        model.decode_graphs.whole_step = True
    n = model.args.n_layers
    assert c.graphs == n + 1
    assert c.syncs == 0, c.sync_names
    assert c.device_launches / n <= 12, sorted(c.op_names.items(), key=lambda kv: -kv[1])


def test_kv_pages_off_the_layers_device_are_not_mirrored(steps):
    """The static core adopts the stores it mirrors (its buffers become their pages); a store whose pages lie
    elsewhere (host RAM, where a GPU without room for the KV keeps it) would be copied onto the device whole,
    uncharged: whole_step_reason names it, so those steps run the eager cores over the pages where they lie."""
    from dataclasses import replace

    from homerun.engine.graphs import whole_step_reason

    model, _ = steps
    s = model.session()
    s.feed([1, 2, 3, 4, 5])
    assert whole_step_reason(model.net, s._states) is None
    i = next(i for i, st in enumerate(s._states) if st.comp is not None)
    st = s._states[i]
    far = st.comp.store.empty_like(4, torch.device("meta"))  # any other device (a real one is not here)
    moved = list(s._states)
    moved[i] = replace(st, comp=replace(st.comp, store=far))
    assert "entries kept on meta" in whole_step_reason(model.net, moved)


def test_a_host_sync_inside_a_capture_raises():
    x = torch.ones(3)
    with pytest.raises(GraphCaptureError, match="host sync"):
        EmulatedGraphs().capture(lambda: (x * 2).sum().item())


def test_graphs_are_refused_where_the_step_cannot_be_captured(tiny_checkpoints):
    path = tiny_checkpoints["mixed"]
    cpu = load(path, experts="reference")
    assert cpu.decode_graphs is None and "GPU kernel set" in cpu.decode_graphs_reason
    with pytest.raises(UsageError, match="cuda_graphs=on"):
        load(path, experts="reference", cuda_graphs="on")
    auto, _ = _graphed(path, graphs="auto")  # a stand-in captures only when asked
    assert auto.decode_graphs is None and "stand-in" in auto.decode_graphs_reason
    with pytest.raises(ValueError, match="unsupported"):
        DecodeGraphs(cpu.net, EmulatedGraphs())
    assert decode_graphs_for(auto.net, "off") == (None, "off by request")


def test_a_failed_capture_in_auto_mode_falls_back_to_eager_with_one_warning(short_ckpt, monkeypatch):
    """auto is the default on CUDA: a capture that fails must not cost the user the session."""
    model, _ = _graphed(short_ckpt, graphs="on")
    model.graph_mode = "auto"  # as auto would have chosen on a real GPU
    s = model.session()
    s.feed([1, 2])

    def broken(*a, **k):
        raise GraphCaptureError("host sync (nonzero) during graph capture")

    monkeypatch.setattr(model.decode_graphs.graphs, "capture", broken)
    with pytest.warns(RuntimeWarning, match="decode graphs off"):
        s.feed([3])
    assert model.decode_graphs is None and "capture failed" in model.decode_graphs_reason
    assert s.n_tokens == 3


def test_bench_times_graphed_decode_and_counts_experts_in_an_eager_pass(short_ckpt):
    """`homerun bench` times decode as it runs (replayed from the graphs, no wrapper on the timed path) and counts the
    experts each token reads in a separate eager pass, which must equal the count of an eager model's run."""
    from homerun.bench import model_bench as hb
    from homerun.bench.records import BenchTest

    test = BenchTest(0, 3, 0)
    counts = {}
    for graphs in ("on", "off"):
        model, args = _graphed(short_ckpt, graphs=graphs)
        backend = model.net.experts
        hb.time_test(model, backend, test, seed=0)  # warm-up: captures
        replays = model.decode_graphs.replays if model.decode_graphs else 0
        sample = hb.time_test(model, backend, test, seed=0)
        timed_replays = (model.decode_graphs.replays if model.decode_graphs else 0) - replays
        counts[graphs] = hb.count_expert_loads(model, backend, 100, test, seed=0)
        assert model.net.experts is backend  # the counting wrapper is gone again
        costs = hb.gpu_costs(model, seed=0)
        if graphs == "on":
            assert timed_replays == 3 == sample.forward_passes  # the counting pass replayed nothing
            assert costs["decode_runner"].startswith("graphs") and costs["graph_replays_per_token"] == 1  # whole step
        else:
            assert costs["decode_runner"].startswith("eager") and costs["graph_replays_per_token"] == 0
        counts[graphs + "_launches"] = costs["launches_per_token"]
    assert counts["on"] == counts["off"] > 0
    assert counts["on_launches"] < counts["off_launches"]


def test_a_new_expert_backend_drops_the_graphs_of_the_old_one(short_ckpt):
    from offload.base import WrappingBackend

    model, _ = _graphed(short_ckpt, graphs="on")
    s = model.session()
    s.feed([1, 2])
    s.feed([3])
    old = model.decode_graphs
    assert old.captured
    assert not old.split and "experts in the segments" in model.decode_graphs_reason
    model.set_expert_backend(model.net.experts)  # the same backend: the captured graphs stay
    assert model.decode_graphs is old
    wrapped = WrappingBackend(old.backend)  # not graph-safe: its calls run between the segments of new graphs
    model.set_expert_backend(wrapped)
    dg = model.decode_graphs
    assert dg is not old and dg.backend is wrapped and dg.split and not dg.captured
    assert "experts eager between segments" in model.decode_graphs_reason
    s.feed([4])
    assert dg.captured and dg.replays == 1
    model.set_expert_backend(old.backend)  # a new DecodeGraphs, captured at the next decode step
    assert model.decode_graphs is not old and model.decode_graphs is not dg and not model.decode_graphs.captured
    assert not model.decode_graphs.split
    s.feed([5])
    assert model.decode_graphs.captured and dg.replays == 1
