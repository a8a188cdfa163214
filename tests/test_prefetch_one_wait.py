"""The hybrid decode path's prefetches cost no host wait of their own (offload/gpu_decode.py, issue 13): the router's
guess at the next layer's experts crosses to the host behind the current layer's one event wait, and hash layers read a
host copy of tid2eid at the host token ids. Checked on the tiny stand-in hybrid model (3 layers, one a hash layer,
per-layer cache pools, CPU-served misses, speculation "never", the link never refusing a prefetch): every decode step's
logits, cache traffic, prefetch scores and cache contents equal those of the reference path that reads each guess at
once (`FusedDecode.defer_guesses = False`, a host sync per guess), eager and graphed; an all-hit step makes at most
one host wait per layer plus the session's own reads of the host token ids; the backend copies the guess it is given
(a decode graph rewrites that buffer every step)."""

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
TOKENS = [7, 7, 7, 300, 7, 7, 41]  # repeats hit once cached; new tokens miss
SLOTS_PER_LAYER = 4  # of 8 experts: guesses evict, so prefetches are issued on most steps
# Host reads per decode step that are no device sync on CUDA: the session checks the host token ids (two scalar reads
# in Model._check_ids) and appends them to its token list (one .tolist, Session.feed). The stand-in counts them.
SESSION_HOST_READS = 3


@pytest.fixture(scope="module")
def ckpt(short_window_checkpoint):
    return short_window_checkpoint


def _model(path, *, graphs: str, deferred: bool):
    from homerun.formats.loader import open_checkpoint

    ckpt = open_checkpoint(path)
    args = ModelArgs.from_hf_config(ckpt.config)
    be = build_cached_backend(ckpt.expert, range(args.n_layers), args.n_routed_experts,
                              swiglu_limit=args.swiglu_limit, device=CudaStandInDevice("cuda-standin:0", 1 << 30),
                              cache=CacheOptions(slots_per_layer={l: SLOTS_PER_LAYER for l in range(args.n_layers)}),
                              misses=MissOptions("cpu", speculate="never"))
    assert be.fused is not None
    be.fused.defer_guesses = deferred
    be.cache.engine.max_in_flight = 1 << 10  # the link never turns a prefetch away: no landing time decides
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    model = load(path, dtype="bfloat16", experts="reference", expert_backend=be, placement=pl, cuda_graphs=graphs)
    return model, be, args


def _state(be, args) -> dict:
    d = be.stats().to_dict()
    return {"cache": {k: d["cache"][k] for k in ("hits", "misses", "prefetches", "promotions", "n_copies")},
            "prefetch": d["prefetch"], "cpu_experts": d["cpu_experts"],
            "resident": [(l, e) for l in range(args.n_layers) for e in range(args.n_routed_experts) if (l, e) in be.cache]}


def _run(path, *, graphs: str, deferred: bool) -> list[dict]:
    """Per decode step: its logits, the backend state after it, its counted host syncs and event waits."""
    model, be, args = _model(path, graphs=graphs, deferred=deferred)
    s = model.session()
    s.feed(PROMPT)
    steps = [{"state": _state(be, args)}]
    for tok in TOKENS:
        waits0 = be.fused.n_event_waits
        with count_device_work() as cw:
            logits = s.feed([tok])
        steps.append({"logits": logits.clone(), "state": _state(be, args), "syncs": cw.c.syncs,
                      "sync_names": dict(cw.c.sync_names), "waits": be.fused.n_event_waits - waits0})
    if graphs == "on":
        assert model.decode_graphs is not None and model.decode_graphs.split and model.decode_graphs.replays > 0
    return steps


@pytest.fixture(scope="module")
def runs(ckpt):
    return {"reference": _run(ckpt, graphs="off", deferred=False), "eager": _run(ckpt, graphs="off", deferred=True),
            "graphed": _run(ckpt, graphs="on", deferred=True)}


def _all_hit(steps, i) -> bool:
    return steps[i]["state"]["cache"]["misses"] == steps[i - 1]["state"]["cache"]["misses"]


@pytest.mark.parametrize("which", ["eager", "graphed"])
def test_deferred_guesses_prefetch_exactly_as_the_reference(runs, which):
    ref, new = runs["reference"], runs[which]
    assert new[0]["state"] == ref[0]["state"]  # the prefill (its guesses go the prefill's way)
    for i in range(1, len(ref)):
        assert torch.equal(new[i]["logits"], ref[i]["logits"]), (which, i)
        assert new[i]["state"] == ref[i]["state"], (which, i)  # scores, issued copies, hits, contents: step by step
    spec = [p for p in ref[-1]["state"]["prefetch"] if p["kind"] == "speculative"][0]
    hashed = [p for p in ref[-1]["state"]["prefetch"] if p["kind"] == "hash"][0]
    assert spec["predicted"] > 0 and spec["issued"] > 0 and hashed["issued"] > 0  # the comparison compared something
    kinds = {_all_hit(ref, i) for i in range(1, len(ref))}
    assert kinds == {True, False}


@pytest.mark.parametrize("which", ["eager", "graphed"])
def test_an_all_hit_step_waits_once_per_layer(runs, which):
    n_layers = 3
    steps = runs[which]
    hit_steps = [i for i in range(1, len(steps)) if _all_hit(steps, i)]
    assert hit_steps
    for i in range(1, len(steps)):
        st = steps[i]
        assert not any(n.startswith("_unique") for n in st["sync_names"]), (which, i, st["sync_names"])
        assert st["sync_names"].get("tolist", 0) <= 1 + 2 * (not _all_hit(steps, i)), (which, i, st["sync_names"])
    for i in hit_steps:
        st = steps[i]
        assert st["waits"] == n_layers, (which, i)
        assert st["syncs"] + st["waits"] <= n_layers + SESSION_HOST_READS, (which, i, st["sync_names"])
    # the reference reads each guess and hash layer on the host: a sync per layer more
    ref = runs["reference"]
    for i in hit_steps:
        assert ref[i]["syncs"] + ref[i]["waits"] > n_layers + SESSION_HOST_READS


def test_the_backend_copies_the_guess_it_is_given(ckpt):
    """A decode graph's guess is a static buffer rewritten by the next step's replay: the prefetches issued after
    the layer's wait are those of the guess as it was when prefetch_speculative was called."""
    model, be, args = _model(ckpt, graphs="off", deferred=True)
    k = args.n_activated_experts
    be.begin_token(1)
    guess = torch.tensor([[5, 6][:k]], dtype=torch.int64)
    assert be.prefetch_speculative(1, guess) == []  # read after layer 0's wait, not now
    guess.fill_(0)  # the caller rewrites its buffer before the layer runs
    x = torch.randn(1, args.dim, dtype=torch.bfloat16)
    ids = torch.tensor([[0, 1][:k]], dtype=torch.int64)
    be.forward(0, x, ids, torch.full((1, k), 0.5, dtype=torch.float32))
    assert be.prefetcher._pending[1] == ("speculative", {5, 6})
    assert (1, 5) in be.cache and (1, 6) in be.cache and (1, 0) not in be.cache
    be.end_token()


def test_a_guess_for_the_layer_about_to_run_is_issued_before_it(ckpt):
    """Behind a LayerSplitBackend the guess for layer l + 1 reaches the backend of l + 1 while layer l runs on
    another: its next call is the guess for layer l + 2 or layer l + 1 itself, so the guess is issued before that
    layer's miss mask (one wait of its own), as the reference path issued it, and the layer hits what it guessed."""
    model, be, args = _model(ckpt, graphs="off", deferred=True)
    k = args.n_activated_experts
    for experts, then_guess_next in (([3, 4], False), ([1, 2], True)):  # neither pair is resident before its guess
        ids = torch.tensor([experts[:k]], dtype=torch.int64)
        be.begin_token(1)
        before, waits0 = be.cache.stats().to_dict(), be.fused.n_event_waits
        be.prefetch_speculative(1, ids.clone())
        if then_guess_next:  # the next guess arrives first: the pending one is issued at once
            be.prefetch_speculative(2, torch.tensor([[6, 7][:k]], dtype=torch.int64))
        x = torch.randn(1, args.dim, dtype=torch.bfloat16)
        be.forward(1, x, ids, torch.full((1, k), 0.5, dtype=torch.float32))
        after = be.cache.stats().to_dict()
        assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (k, 0), experts
        assert be.fused.n_event_waits - waits0 == 2  # the guess's own wait, then the layer's
        assert be.prefetcher._pending.get(2) == (("speculative", {6, 7}) if then_guess_next else None)
        be.end_token()
