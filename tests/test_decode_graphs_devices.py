"""Decode graphs across devices (homerun.engine.graph_sites) on 2 and 3 CUDA stand-ins: one whole-step graph per run of
the step on one device, each captured on that device's graph API, the streams copied between them. The graphed
steps must equal the eager multi-device forward bit for bit across buckets and compressor closes, greedy generation
must match token for token, and the launches per layer and token must stay within issue 13's budget (a fallback
to the eager forward fails the count)."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.graphs import EmulatedGraphs, decode_graphs_for  # noqa: E402
from homerun.engine.placement import DeviceSpec, LayerPlacement, Placement, split_layers  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

LAUNCHES_PER_LAYER_BUDGET = 40  # issue 13: host launches per layer per decode token
VRAM_REL_TOL = 0.05  # issue 13, "VRAM as planned"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """mixed and hca with an 8-token window and a top-k of 4 (a strict subset of the closed CSA entries)."""
    from tiny import make_checkpoint

    root = tmp_path_factory.mktemp("devices")
    return {kind: make_checkpoint(root, kind, sliding_window=8, index_topk=4) for kind in ("mixed", "hca")}


def _placement(n_devices: int, experts: str = "device", head_apart: bool = False) -> Placement:
    """3 layers over n_devices cuda-standins (the embedding on the first, the head on the last or, with
    head_apart, on a third device of its own)."""
    if not head_apart:
        return split_layers(3, [f"standin:{i}" for i in range(n_devices)], kind="cuda-standin", experts=experts)
    devs = tuple(DeviceSpec(f"standin:{i}", "cuda-standin", 1 << 62) for i in range(3))
    layers = tuple(LayerPlacement(i, f"standin:{min(i, 1)}", experts, "test") for i in range(3))
    return Placement(devs, "standin:0", layers, "standin:2")


def _load(path, pl, graphs="on", kv_dtype="auto"):
    model = load(path, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs=graphs, kv_dtype=kv_dtype)
    if graphs == "on":
        model.decode_graphs.min_bucket_tokens = 16  # buckets 16, 32, 64 within a short decode
    return model


def _eager(model, tok: int, pos: int, states) -> torch.Tensor:
    with torch.inference_mode():
        hidden, _ = model.net.forward(torch.tensor([tok]), pos, states)
        return model.net.logits(hidden)[0].float()


@pytest.mark.parametrize("kind,n_devices,head_apart,kv_dtype", [
    ("mixed", 2, False, "auto"), ("mixed", 3, False, "auto"), ("hca", 3, True, "auto"), ("mixed", 2, False, "fp8")])
def test_graphs_across_devices_equal_the_eager_forward_across_buckets(checkpoints, kind, n_devices, head_apart,
                                                                      kv_dtype):
    """head_apart: layers 0 on standin:0, 1-2 on standin:1, the head alone on standin:2 (a run with no layers)."""
    model = _load(checkpoints[kind], _placement(n_devices, head_apart=head_apart), kv_dtype=kv_dtype)
    dg = model.decode_graphs
    runs = len(dg.runs)
    assert dg.multi and runs == n_devices and "one graph per device" in model.decode_graphs_reason
    captured = []  # (site, the run's layers) of each capture: a run is captured on its own device's graphs
    for site, g in dg.graphs_by_site.items():
        g.capture = (lambda cap, site: lambda fn, reset=None: (captured.append(site), cap(fn, reset))[1])(
            g.capture, site)
    s = model.session()
    logits = s.feed([3, 1, 4])
    for pos in range(3, 37):  # CSA closes every 4 positions, the window fills at 7, buckets 16 -> 32 -> 64
        tok = int(logits.argmax())
        eager = _eager(model, tok, pos, s._states)
        logits = s.feed([tok])
        assert torch.equal(eager, logits), (kind, pos, (eager - logits).abs().max().item())
    assert dg.replays == 34 and dg.step_captures == 3 and dg.static.ctx_tokens == 64
    assert sorted(dg.segments) == [(j, "step") for j in range(runs)]
    assert captured == [r.site for r in dg.runs] * 3  # every run once per bucket, on its device's graphs
    assert len({id(g) for g in dg.graphs_by_site.values()}) == len(dg.graphs_by_site) == n_devices
    # the static state per device: each shard holds only its run's layers
    assert [len(kv.layers) for kv in dg.static.shards] == [len(r.layers) for r in dg.runs if len(r.layers)]


def test_greedy_generation_matches_the_eager_multi_device_model(checkpoints):
    graphed = _load(checkpoints["mixed"], _placement(3))
    eager = _load(checkpoints["mixed"], _placement(3), graphs="off")
    sg, se = graphed.session(), eager.session()
    lg, le = sg.feed([5, 6, 7, 8, 9]), se.feed([5, 6, 7, 8, 9])
    for _ in range(24):
        assert torch.equal(lg, le), sg.n_tokens
        tg, te = int(lg.argmax()), int(le.argmax())
        assert tg == te
        lg, le = sg.feed([tg]), se.feed([te])
    assert graphed.decode_graphs.replays == 24


def test_launches_per_layer_on_two_devices_are_within_the_budget(checkpoints):
    """2 runs: 2 replays, 1 copy of the streams, a token id and a position per device, the logits; the eager
    multi-device forward (what a fallback would run) launches about 30 per layer, over the bound below."""
    model = _load(checkpoints["mixed"], _placement(2))
    n_layers, s = model.args.n_layers, model.session()
    logits = s.feed([3, 1, 4, 1])
    for _ in range(2):  # the capture
        logits = s.feed([int(logits.argmax())])
    tokens = 6
    launches = replays = 0
    for _ in range(tokens):
        with torch.inference_mode(), count_device_work() as cw:
            logits = s.feed([int(logits.argmax())])
        launches, replays = launches + cw.c.device_launches, replays + cw.c.graphs
    per_layer = launches / tokens / n_layers
    assert per_layer <= LAUNCHES_PER_LAYER_BUDGET
    assert replays / tokens == 2
    # whole steps per device: a constant per device, not per layer (15 measured; the eager forward ~100)
    assert launches / tokens <= 8 * 2, launches / tokens


def test_reasons_across_devices(checkpoints):
    """Cached experts across devices: no graphs (the reason says why); off: eager by request; on one device the
    layout string is unchanged."""
    cached = load(checkpoints["mixed"], dtype="bfloat16", experts="reference", cuda_graphs="auto",
                  placement=split_layers(3, ["standin:0", "standin:1"], kind="cuda-standin", experts="host",
                                         expert_cache_slots=[4, 4]))
    dg, reason = decode_graphs_for(cached.net, "on", ["standin:0", "standin:0", "standin:1", "standin:1",
                                                      "standin:1"])
    assert dg is None and "span 2 devices" in reason and "not resident" in reason
    model = _load(checkpoints["mixed"], _placement(2))
    assert decode_graphs_for(model.net, "off", ["standin:0"] * 5) == (None, "off by request")
    dg, reason = decode_graphs_for(model.net, "on", ["standin:0"] * 5)
    assert not dg.multi and reason == ("captured: emulated graphs (a CUDA stand-in), one graph per step, else "
                                       "experts in the segments")
    assert isinstance(dg.graphs, EmulatedGraphs)


def test_ramp_checks_count_each_devices_share_of_the_static_state(checkpoints):
    """Across devices each device holds a static state of its own layers (ShardedStaticKV): a ramp check on a device
    needs that device's share of the plan's formula (not the whole model's) and credits only the shard charged to
    that device's account."""
    from homerun.engine.graph_bytes import held_bytes, static_state_bytes
    from homerun.engine.session import device_kv_more_bytes

    model = _load(checkpoints["mixed"], _placement(2), kv_dtype="fp8")
    dg = model.decode_graphs
    s = model.session()
    logits = s.feed([3, 1, 4])
    for _ in range(20):  # past bucket 16: a sharded static state is held
        logits = s.feed([int(logits.argmax())])
    whole = static_state_bytes(dg, 64, "fp8", page_tokens=model.page_tokens)
    shares = {}
    for name, dev in model.devices.items():
        layers = model.placement.layers_on(name)
        shares[name] = static_state_bytes(dg, 64, "fp8", layers, page_tokens=model.page_tokens)
        assert 0 < shares[name] < whole
        shard = next(kv for kv in dg.static.shards if kv.account is dev)
        states = [s._states[i] for i in layers]
        outside = held_bytes(None, dev, states)  # the states' own bytes, no static state
        assert held_bytes(dg, dev, states) == outside + shard.charged_bytes(dev) - sum(
            st.nbytes for st in shard.stores() if any(c is not None and c.store is st for ls in states
                                                      for c in (ls.comp, ls.index_comp)))
        more, graph = device_kv_more_bytes(model, name, 64, states)
        assert graph == shares[name]
    assert sum(shares.values()) >= whole - max(shares.values())  # the shares add up to about the whole


def test_peak_device_bytes_match_a_two_gpu_plan_under_graphs(checkpoints):
    """The tiny checkpoint planned on 2 GPUs (all in VRAM: one whole-step graph per device) and run on 2 cuda
    stand-ins, fp8 KV, a prompt that fills the planned context, then graphed steps: on each device the peak accounted
    bytes besides the weights within 5% of that device's planned KV and static state (its layers' share:
    homerun.plan.graph_memory), plus one KV page per compressed store of its layers (the pages' rounding) as the
    stated fixed overhead. The weights are left out: the plan splits the non-expert bytes by layer count, which on
    3 tiny layers of 3 kinds is 4% over on one device and 8% under on the other (V4's 43 layers average it out)."""
    from dataclasses import replace

    from homerun.engine.placement import placement_from_plan
    from homerun.models.decode_bytes import static_bytes
    from homerun.models.deepseek_v4.static_decode import static_shape
    from homerun.models.kv import fp8_row_bytes
    from homerun.plan.graph_memory import PLAN_PAGE_TOKENS, stage_kv_bytes
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import PlanOptions, plan
    from homerun.plan.specs import kv_layout
    from profiles import load_profile

    path = checkpoints["mixed"]
    ctx, page_tokens = 48, 64
    spec, inv = resolve_model(str(path))
    p = plan(spec, inv, load_profile("2xh100"), PlanOptions(context_tokens=ctx, kv_dtype="fp8"))
    assert p.mode == "all-vram" and all(s.graph_bytes > 0 for s in p.layout.stages)
    pl = placement_from_plan(p, standin="cuda")
    assert [d.kind for d in pl.devices] == ["cuda-standin"] * 2
    model = load(path, dtype="bfloat16", experts="reference", placement=pl, kv_dtype="fp8", page_tokens=page_tokens,
                 cuda_graphs="on")
    s = model.session()
    s.feed(torch.randint(0, 512, (ctx - 2,), generator=torch.Generator().manual_seed(7)).tolist())
    s.feed([3])
    s.feed([4])
    dg, args = model.decode_graphs, model.net.args
    assert dg.whole_step and dg.step_captures >= 1
    entry, key = fp8_row_bytes(args.head_dim, args.rope_dim, False), fp8_row_bytes(args.index_head_dim, 0, True)
    for i, usage in enumerate(model.device_usage()):
        kinds = [args.layer_kinds[j] for j in usage["layers"]]
        page_overhead = (kinds.count("csa") * page_tokens // args.csa_rate * (entry + key)
                         + kinds.count("hca") * max(1, page_tokens // args.hca_rate) * entry)
        stage = p.layout.stages[i]
        planned = stage.kv_bytes + stage.graph_bytes
        # the plan's buffers and moving store in the default pages (PLAN_PAGE_TOKENS), this model's in its own
        shape = static_shape(args, usage["layers"])
        planned -= (static_bytes(shape, ctx, "fp8", 2, page_tokens=PLAN_PAGE_TOKENS).total
                    - static_bytes(shape, ctx, "fp8", 2, page_tokens=model.page_tokens).total)
        # ... and its layers' KV in whole pages of the plan's page, this model's in its own
        kv = kv_layout(spec, "fp8")
        planned -= (stage_kv_bytes(kv, 0, shape, ctx)
                    - stage_kv_bytes(replace(kv, page_tokens=model.page_tokens), 0, shape, ctx))
        assert [r.bytes for r in p.placement if r.device == f"gpu{i}" and "attention state" in r.what
                or r.device == f"gpu{i}" and r.what.startswith("KV cache")] == [stage.kv_bytes, stage.graph_bytes]
        state = usage["peak_bytes"] - usage["bytes_by_class"]["weights"]
        assert usage["bytes_by_class"].get("graph", 0) > 0, usage
        assert abs(state - planned) <= VRAM_REL_TOL * planned + page_overhead, (i, state, planned, page_overhead)
