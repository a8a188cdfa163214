"""Every part of a step runs with its device current (homerun.kernels.device_guard; issue 13): Triton launches on the
current CUDA device, so a layer on cuda:1 whose kernels ran with cuda:0 current would launch on the wrong device. On
CUDA stand-ins the guard keeps the placement's device name as the current site; these tests note the current site
at every Triton launch (through the launcher's `around` hook) and at every part of the step (embedding, each layer's
pre-attention, core, output projections, MoE and routed call, the head, the logits), and require each part's to be
its placement device's: the eager forward (prefill and decode) across three stand-ins, the whole-step graphs across
devices, and the hybrid layout (eager routed calls between segments) on a model placed on standin:1 alone."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import contextlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.placement import DeviceSpec, LayerPlacement, Placement, single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.device_guard import current_site, on_device  # noqa: E402
from homerun.kernels.triton.common import LaunchCounter  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

# the parts of a step the model's forward and the decode graphs call, and the layer argument's position (None: the
# embedding's or the head's part)
_LAYER_PARTS = ("_pre_attention", "_attention_core", "_attn_out", "_moe_in", "_moe_out")


def _three_sites() -> Placement:
    """The embedding and layer 0 on standin:0, layers 1-2 on standin:1, the head alone on standin:2."""
    devs = tuple(DeviceSpec(f"standin:{i}", "cuda-standin", 1 << 62) for i in range(3))
    layers = tuple(LayerPlacement(i, f"standin:{min(i, 1)}", "device", "test") for i in range(3))
    return Placement(devs, "standin:0", layers, "standin:2")


@contextlib.contextmanager
def _sites_seen(model):
    """-> a list of (part, current site) noted at every Triton launch and every part's call; part: "embed", "head",
    or a layer's index (None for a launch outside any wrapped part: the static core, the RoPE tables)."""
    net, seen, parts = model.net, [], []

    def wrap(obj, name, part_of, note=True):  # note: at the call (logits enters its section inside: its launches)
        fn = getattr(obj, name)

        def noted(*args, **kwargs):
            part = part_of(*args)
            if note:
                seen.append((part, current_site()))
            parts.append(part)
            try:
                return fn(*args, **kwargs)
            finally:
                parts.pop()

        setattr(obj, name, noted)  # on the instance: the graphs' backend identity and the net stay the same objects

    for name in _LAYER_PARTS:
        wrap(net, name, lambda layer, *a: layer.index)
    wrap(net.experts, "forward", lambda layer, *a: layer)
    wrap(net, "_embed", lambda *a: "embed")
    wrap(net, "_final", lambda *a: "head")
    wrap(net, "logits", lambda *a: "head", note=False)

    @contextlib.contextmanager
    def at_launch():
        seen.append((parts[-1] if parts else None, current_site()))
        yield

    old = LaunchCounter.around
    LaunchCounter.around = at_launch
    try:
        yield seen
    finally:
        LaunchCounter.around = old
        for name in (*_LAYER_PARTS, "_embed", "_final", "logits"):
            del net.__dict__[name]
        del net.experts.__dict__["forward"]


def _check(seen, pl: Placement, launches_outside: set) -> None:
    want = {"embed": pl.embed_device, "head": pl.head_device, **{lp.layer: lp.device for lp in pl.layers}}
    assert seen and {p for p, _ in seen} >= set(want)  # every part ran, and was noted
    wrong = [(p, s) for p, s in seen if (s != want[p] if p is not None else s not in launches_outside)]
    assert not wrong, wrong[:5]
    assert current_site() is None  # every section closed


def _run(model, steps: int) -> None:
    s = model.session()
    logits = s.feed([3, 1, 4, 1, 5])  # prefill: 5 rows
    for _ in range(steps):
        logits = s.feed([int(logits.argmax())])


def test_eager_forward_runs_each_part_on_its_device(short_window_checkpoint):
    pl = _three_sites()
    model = load(short_window_checkpoint, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs="off")
    with _sites_seen(model) as seen:
        _run(model, 3)
    _check(seen, pl, set())  # every launch inside a part
    assert {s for _, s in seen} == {"standin:0", "standin:1", "standin:2"}


def test_graphs_across_devices_capture_each_run_on_its_device(short_window_checkpoint):
    pl = _three_sites()
    model = load(short_window_checkpoint, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs="on")
    assert model.decode_graphs.multi
    with _sites_seen(model) as seen:
        _run(model, 3)
    assert model.decode_graphs.step_captures == 1
    _check(seen, pl, {"standin:0", "standin:1"})  # the static cores and the RoPE tables of the runs with layers


def test_hybrid_graphs_on_the_second_device_run_their_eager_parts_there(short_window_checkpoint):
    """One device, standin:1: the segments, and the routed calls between them (the cached backend), with standin:1
    current, not the first device's."""
    from homerun.formats.loader import open_checkpoint
    from homerun.models.deepseek_v4 import ModelArgs

    args = ModelArgs.from_hf_config(open_checkpoint(short_window_checkpoint).config)
    pl = single_device(args.n_layers, "standin:1", gpu_path=True, experts="host", expert_cache_slots=6)
    model = load(short_window_checkpoint, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs="on")
    assert model.decode_graphs is not None and not model.net.experts.graph_safe
    with _sites_seen(model) as seen:
        _run(model, 4)
    assert model.decode_graphs.replays == 4
    _check(seen, pl, {"standin:1"})
    assert any(p == 0 and isinstance(p, int) for p, _ in seen)  # the routed calls were noted


def test_a_cuda_device_is_made_current_for_the_section(monkeypatch):
    """On CUDA the section enters torch.cuda.device(device): a recording stand-in for it here (no CUDA device)."""
    entered = []

    class Recording:
        def __init__(self, device):
            self.index = torch.device(device).index

        def __enter__(self):
            entered.append(("enter", self.index))

        def __exit__(self, *exc):
            entered.append(("exit", self.index))

    monkeypatch.setattr(torch.cuda, "device", Recording)
    with on_device(torch.device("cuda", 1), "cuda:1"):
        assert current_site() == "cuda:1" and entered == [("enter", 1)]
        with on_device(torch.device("cpu")):
            assert current_site() == "cpu" and entered == [("enter", 1)]  # no CUDA guard for the host
        assert current_site() == "cuda:1"
    assert entered == [("enter", 1), ("exit", 1)] and current_site() is None
