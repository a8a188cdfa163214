"""Whole-step decode graphs (homerun.engine.graphs, every layer resident) on CUDA stand-ins: one graph per step over
the static attention state of the context's bucket, captured again when the context crosses a bucket. The graphed
steps must equal the eager forward bit for bit across window fills, CSA closes and bucket crossings for the three
tiny presets, and when a step starts from a state the graphs do not hold (another session, an earlier state of the
same one), for every kv_dtype: the compute dtype, bf16 entries under fp32 compute, fp8 entries (quantized on store,
dequantized on read, as the eager path does)."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The three presets with an 8-token window and a top-k of 4 (a strict subset of the closed CSA entries from
    position 20)."""
    from tiny import TINY_KINDS, make_checkpoint

    root = tmp_path_factory.mktemp("whole-step")
    return {kind: make_checkpoint(root, kind, sliding_window=8, index_topk=4) for kind in TINY_KINDS}


def _graphed(path, dtype, kv_dtype="auto", graphs="on"):
    from homerun.formats.loader import open_checkpoint

    args = ModelArgs.from_hf_config(open_checkpoint(path).config)
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    model = load(path, dtype=dtype, experts="reference", placement=pl, cuda_graphs=graphs, kv_dtype=kv_dtype)
    if graphs == "on":
        model.decode_graphs.min_bucket_tokens = 16  # buckets 16, 32, 64 within a short decode
    return model


def _eager(model, tok: int, pos: int, states) -> torch.Tensor:
    with torch.inference_mode():
        hidden, _ = model.net.forward(torch.tensor([tok]), pos, states)
        return model.net.logits(hidden)[0].float()


_EXT = pytest.mark.extended  # CI's second pass: the lossy stores on the csa and hca presets


@pytest.mark.parametrize("kind,dtype,kv_dtype", [
    ("mixed", "bfloat16", "auto"), ("csa", "float32", "auto"), ("hca", "bfloat16", "auto"),
    ("mixed", "bfloat16", "fp8"), pytest.param("csa", "float32", "fp8", marks=_EXT),
    pytest.param("csa", "float32", "bf16", marks=_EXT), pytest.param("hca", "float32", "fp8", marks=_EXT)])
def test_whole_step_graphs_equal_the_eager_forward_across_buckets(checkpoints, kind, dtype, kv_dtype):
    model = _graphed(checkpoints[kind], dtype, kv_dtype)
    dg = model.decode_graphs
    s = model.session()
    logits = s.feed([3, 1, 4])
    kept = {}
    for pos in range(3, 37):
        tok = int(logits.argmax())
        if pos in (12, 30):
            kept[pos] = (tok, s._states)  # states of buckets 16 and 32, decoded from again below
        eager = _eager(model, tok, pos, s._states)
        logits = s.feed([tok])
        assert torch.equal(eager, logits), (kind, pos, (eager - logits).abs().max().item())
    assert s.n_tokens == 37 and dg.replays == 34
    assert dg.step_captures == 3 and dg.static.ctx_tokens == 64 and list(dg.segments) == [("step",)]
    # From states the graphs do not hold: an earlier one of this session (of an older bucket, its stores now holding
    # rows past it: decoded in the bucket that holds them, static_decode.bucket_for), then the current one again.
    for pos, (tok, states) in sorted(kept.items()):
        eager = _eager(model, tok, pos, states)
        with torch.inference_mode():
            hidden = model._forward(torch.tensor([tok]), pos, states)[0]
            assert torch.equal(eager, model.net.logits(hidden)[0].float()), pos
    tok = int(logits.argmax())
    eager = _eager(model, tok, s.n_tokens, s._states)
    assert torch.equal(eager, s.feed([tok]))
    assert dg.step_captures == 3 and dg.static.ctx_tokens == 64  # all in bucket 64: no copy, no capture


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_two_sessions_take_turns(checkpoints, kv_dtype):
    """Each step from the other session's state (at the same position: only the states tell them apart) reloads the
    static state; each session stays equal to the same session on a model that never captured (the entries the
    graphs handed one session survive the other's turn: they are not the shared buffers')."""
    model = _graphed(checkpoints["mixed"], "bfloat16", kv_dtype)
    ref = _graphed(checkpoints["mixed"], "bfloat16", kv_dtype, graphs="off")
    pairs = [(model.session(), ref.session(), p) for p in ([5, 6, 7, 8, 9], [2, 7, 1, 8, 2])]
    last = [s.feed(p) for s, _, p in pairs]
    assert all(torch.equal(lg, r.feed(p)) for lg, (_, r, p) in zip(last, pairs))
    for _ in range(6):
        for j, (s, r, _) in enumerate(pairs):
            tok = int(last[j].argmax())
            last[j] = s.feed([tok])
            assert torch.equal(last[j], r.feed([tok])), (j, s.n_tokens)
    assert model.decode_graphs.replays == 12


@pytest.mark.parametrize("kv_dtype", ["auto", pytest.param("fp8", marks=_EXT)])
def test_an_hca_close_and_a_bucket_crossing_in_the_graph(checkpoints, kv_dtype):
    """The hca preset's rate-128 layers close their first window at position 127, the last of bucket 128: the step
    that writes the entry at a device-side slot is replayed, and the next one reads it from the new bucket's
    buffers (captured at 128)."""
    model = _graphed(checkpoints["hca"], "bfloat16", kv_dtype)
    dg = model.decode_graphs
    s = model.session()
    logits = s.feed(torch.randint(0, 512, (122,), generator=torch.Generator().manual_seed(9)).tolist())
    for pos in range(122, 132):
        tok = int(logits.argmax())
        eager = _eager(model, tok, pos, s._states)
        logits = s.feed([tok])
        assert torch.equal(eager, logits), (pos, (eager - logits).abs().max().item())
    assert dg.step_captures == 2 and dg.static.ctx_tokens == 256
    assert all(st.comp.n_entries == 1 for st, lay in zip(s._states, model.net.layers) if lay.kind == "hca")


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_the_static_entries_are_charged_to_the_device_budget(checkpoints, kv_dtype):
    """A placed model's KV pages are charged to its device; the whole-step graphs' entry buffers replace them for
    the session and are charged likewise (fp8: codes, scales and rope parts), then given back with the last state
    that holds them."""
    import gc

    model = _graphed(checkpoints["mixed"], "bfloat16", kv_dtype)
    dev = next(iter(model.devices.values()))
    s = model.session()
    s.feed([3, 1, 4, 1, 5])
    s.feed([9])  # the first whole step: the static buffers, loaded from the prefill's pages
    gc.collect()  # the prefill's states (and their pages) are gone: only the static buffers hold entries
    kv = model.decode_graphs.static
    static_bytes = sum(t.numel() * t.element_size() for lay in kv.layers for c in (lay.comp, lay.index)
                       if c is not None for t in c.store._parts(c.page))
    assert static_bytes > 0 and dev.bytes_by_class()["kv"] == static_bytes
    del s, kv
    model.decode_graphs.static = model.decode_graphs._mine = None
    gc.collect()
    assert dev.bytes_by_class().get("kv", 0) == 0


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_only_live_states_keep_a_copy_of_the_static_entries(checkpoints, kv_dtype):
    """Before another session's entries go into the static buffers, the states handed out keep a copy of the page,
    charged to the device: with room for only part of it, the step fails as a whole (the sessions
    then decode on, equal to a model that never captured); a dropped session (chat /reset, a cleared prefix cache)
    is owed no copy, so the next session's step fits in the same budget."""
    import gc

    from homerun.errors import DoesNotFitError

    model = _graphed(checkpoints["mixed"], "bfloat16", kv_dtype)
    ref = _graphed(checkpoints["mixed"], "bfloat16", kv_dtype, graphs="off")
    dev = next(iter(model.devices.values()))
    budget = dev.budget_bytes
    pairs = [(model.session(), ref.session()) for _ in range(2)]
    for (s, r), p in zip(pairs, ([5, 6, 7, 8, 9], [2, 7, 1, 8, 2])):
        assert torch.equal(s.feed(p), r.feed(p))
    (a, ra), (b, rb) = pairs
    assert torch.equal(a.feed([9]), ra.feed([9]))  # a holds states over the static stores
    gc.collect()
    first = next(c for lay in model.decode_graphs.static.layers for c in (lay.comp, lay.index) if c is not None)
    used = dev.used_bytes  # room for a copy of the first of a's pages, not of the next
    dev.budget_bytes = used + sum(t.numel() * t.element_size() for t in first.store._parts(first.store.pages[0]))
    with pytest.raises(DoesNotFitError):
        b.feed([4])
    assert dev.used_bytes == used  # the first copy given back
    dev.budget_bytes = budget
    for s, r in ((b, rb), (a, ra), (b, rb)):  # nothing half-swapped: both read their own entries
        assert torch.equal(s.feed([3]), r.feed([3]))
    del pairs, a, ra  # b's states hold the static stores now; a's own copies go with it
    c, rc = model.session(), ref.session()
    assert torch.equal(c.feed([1, 2, 3, 4, 5, 6]), rc.feed([1, 2, 3, 4, 5, 6]))
    del b, rb, s, r  # dropped: its states are unreachable
    gc.collect()
    dev.budget_bytes = dev.used_bytes
    assert torch.equal(c.feed([8]), rc.feed([8]))  # same bucket, no copy for the dropped session's states
    dev.budget_bytes = budget


@pytest.mark.parametrize("kv_dtype", ["auto", "fp8"])
def test_a_prefill_between_decodes_reads_the_graphs_states(checkpoints, kv_dtype):
    """A chat turn: decode, then an eager prefill of the next message over the states the graphed steps handed back
    (views of the static buffers, the static entry stores), then decode again: every logit equal to a model that
    never captured."""
    path = checkpoints["csa"]
    graphed = _graphed(path, "bfloat16", kv_dtype)
    eager = _graphed(path, "bfloat16", kv_dtype, graphs="off")
    sg, se = graphed.session(), eager.session()
    turns = [[3, 1, 4, 1, 5], [7] * 6, [2, 6, 5], [8] * 6, [9, 7, 9, 3, 2, 3, 8], [4] * 4]
    for turn in turns:  # prompts fed at once (prefill), replies one token at a time (decode)
        chunks = [turn] if len(set(turn)) > 1 else [[t] for t in turn]
        for chunk in chunks:
            lg, le = sg.feed(chunk), se.feed(chunk)
            assert torch.equal(lg, le), (sg.n_tokens, (lg - le).abs().max().item())
    assert graphed.decode_graphs.replays == 16 and sg.n_tokens == 31 and graphed.decode_graphs.step_captures == 2
