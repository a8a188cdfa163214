"""CPU-served misses on the hybrid decode path cost no host wait of their own (offload/gpu_decode.py, issue 13): the
layer's activations (fp32) and routing weights cross to pinned host buffers before the layer's one event, so when the
host reads the miss mask the rows a CPU miss needs are already there (`FusedDecode.early_cpu_rows`). Checked on the
tiny stand-in hybrid model (3 layers, per-layer cache pools too small for the routing, every miss on the CPU,
speculation "never"): each decode step's logits and backend state equal those of the old path (a second wait per
missed layer to fetch the rows), eager and graphed; a step with misses waits exactly once per layer, where the old
path waited once more per missed layer; and the early copy is skipped when its bytes cost more than a wait."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

from offload.cached_backend import CacheOptions, MissOptions, build_cached_backend  # noqa: E402
from offload.devices import CudaStandInDevice  # noqa: E402

PROMPT = [1, 2, 3, 4]
TOKENS = [7, 300, 7, 41, 7, 123, 7]  # new tokens miss, repeats hit once cached
SLOTS_PER_LAYER = 3  # of 8 experts: new tokens miss in most layers
N_LAYERS = 3


@pytest.fixture(scope="module")
def ckpt(short_window_checkpoint):
    return short_window_checkpoint


def _model(path, *, graphs: str, early: bool):
    from homerun.formats.loader import open_checkpoint

    ckpt = open_checkpoint(path)
    args = ModelArgs.from_hf_config(ckpt.config)
    assert args.n_layers == N_LAYERS
    be = build_cached_backend(ckpt.expert, range(args.n_layers), args.n_routed_experts,
                              swiglu_limit=args.swiglu_limit, device=CudaStandInDevice("cuda-standin:0", 1 << 30),
                              cache=CacheOptions(slots_per_layer={l: SLOTS_PER_LAYER for l in range(args.n_layers)}),
                              misses=MissOptions("cpu", speculate="never"))
    assert be.fused is not None
    be.fused.early_cpu_rows = early
    be.cache.engine.max_in_flight = 1 << 10  # the link never turns a prefetch away: no landing time decides
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    model = load(path, dtype="bfloat16", experts="reference", expert_backend=be, placement=pl, cuda_graphs=graphs)
    return model, be, args


def _state(be) -> dict:
    d = be.stats().to_dict()
    return {"cache": {k: d["cache"][k] for k in ("hits", "misses", "prefetches", "n_copies")},
            "prefetch": d["prefetch"], "cpu_experts": d["cpu_experts"], "miss_calls": d["gpu"]["decode"]["miss_calls"]}


def _run(path, *, graphs: str, early: bool) -> list[dict]:
    """Per decode step: logits, backend state after it, event waits, counted syncs, device launches."""
    model, be, _ = _model(path, graphs=graphs, early=early)
    s = model.session()
    s.feed(PROMPT)
    steps = [{"state": _state(be)}]
    for tok in TOKENS:
        waits0, miss0 = be.fused.n_event_waits, be.fused.n_miss_calls
        with count_device_work() as cw:
            logits = s.feed([tok])
        steps.append({"logits": logits.clone(), "state": _state(be), "waits": be.fused.n_event_waits - waits0,
                      "missed_layers": be.fused.n_miss_calls - miss0, "syncs": cw.c.syncs,
                      "launches": cw.c.device_launches})
    return steps


@pytest.fixture(scope="module")
def runs(ckpt):
    return {"old": _run(ckpt, graphs="off", early=False), "eager": _run(ckpt, graphs="off", early=True),
            "graphed": _run(ckpt, graphs="on", early=True)}


@pytest.mark.parametrize("which", ["eager", "graphed"])
def test_early_rows_give_the_old_paths_logits_and_traffic(runs, which):
    old, new = runs["old"], runs[which]
    assert new[0]["state"] == old[0]["state"]
    for i in range(1, len(old)):
        assert torch.equal(new[i]["logits"], old[i]["logits"]), (which, i)
        assert new[i]["state"] == old[i]["state"], (which, i)
    assert old[-1]["state"]["cpu_experts"] > 0  # the CPU served misses: the rows were used


def test_the_logits_match_the_reference_model(ckpt, runs):
    """The hybrid path against the all-reference model (CPU experts, no cache): argmax equal, bf16 tolerance."""
    ref = load(ckpt, dtype="bfloat16", experts="reference").session()
    ref.feed(PROMPT)
    for i, tok in enumerate(TOKENS, start=1):
        want, got = ref.feed([tok]).float(), runs["eager"][i]["logits"].float()
        assert torch.equal(want.argmax(-1), got.argmax(-1)), i
        assert ((got - want).abs().max() / want.abs().max()).item() <= 2e-2, i


@pytest.mark.parametrize("which", ["eager", "graphed"])
def test_a_step_with_cpu_misses_waits_once_per_layer(runs, which):
    old, new = runs["old"], runs[which]
    miss_steps = [i for i in range(1, len(new)) if new[i]["missed_layers"]]
    assert len(miss_steps) >= 3
    for i in range(1, len(new)):
        assert new[i]["waits"] == N_LAYERS, (which, i, new[i]["waits"])  # the second wait per missed layer is gone
        assert new[i]["syncs"] <= old[i]["syncs"], (which, i)
    for i in miss_steps:  # the old path: one wait more per layer whose misses went to the CPU
        assert old[i]["waits"] == N_LAYERS + old[i]["missed_layers"] > N_LAYERS, i


def test_all_hit_steps_pay_a_few_launches_for_the_early_copy(runs):
    old, new = runs["old"], runs["eager"]
    hit_steps = [i for i in range(1, len(new)) if not new[i]["missed_layers"]]
    assert hit_steps
    for i in hit_steps:
        assert old[i]["launches"] < new[i]["launches"] <= old[i]["launches"] + 2 * N_LAYERS, i  # x and w copies


def test_rows_too_large_for_a_wait_take_the_old_path(ckpt):
    """Above wait_s x link_gbps bytes the early copy costs more than the wait it saves: the old path (two waits)."""
    model, be, args = _model(ckpt, graphs="off", early=True)
    fd = be.fused
    k = args.n_activated_experts
    x = torch.randn(1, args.dim, dtype=torch.bfloat16)
    ids, w = torch.tensor([[0, 1][:k]], dtype=torch.int64), torch.full((1, k), 0.5, dtype=torch.float32)
    assert 0 < fd.early_rows_max_bytes() < 1e6
    for max_bytes, waits in ((None, 1), (4 * args.dim - 1, 2)):
        ids = ids + k  # experts not resident yet: the call misses, on the CPU
        if max_bytes is not None:
            fd.early_rows_max_bytes = lambda: max_bytes
        waits0, miss0 = fd.n_event_waits, fd.n_miss_calls
        be.forward(0, x, ids, w)
        assert fd.n_miss_calls - miss0 == 1 and fd.n_event_waits - waits0 == waits, max_bytes
