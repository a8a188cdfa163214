"""The early row copy of the hybrid decode path (offload/gpu_decode.py, `FusedDecode._early_rows`) is made only when
the miss policy may send a miss of the call to the CPU (`MissPolicy.cpu_possible`). In "auto" mode the policy's
estimates may stream every miss; the copy's two launches per layer then buy nothing. Checked: `cpu_possible`
against what `split` then does, over a sweep of estimates and the probe; on the tiny stand-in hybrid model
(tests/test_cpu_miss_rows_one_wait.py's), a CPU slower than the link makes no early copy, with the launches of the
path without one and the same logits. With the CPU favoured, "auto" still copies, and a step with CPU misses waits
once per layer."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: no CUDA here, the kernels interpret

import pytest  # noqa: E402
import torch  # noqa: E402

from offload.miss_policy import MissPolicy, costs_for_expert  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")


# --- the policy alone --------------------------------------------------------------------------------------------

def _cpu_used(policy: MissPolicy, m: int) -> bool:
    """What `split` does with m one-token misses, on a copy (split moves the policy's state)."""
    return bool(copy.deepcopy(policy).split(dict.fromkeys(range(100, 100 + m), 1)).cpu)


@pytest.mark.parametrize("expert_mb", [0.05, 13.4])
def test_cpu_possible_is_what_split_does_for_one_token(expert_mb):
    k = 6
    for cpu_gbps in (0.01, 1.0, 5.0, 15.0, 25.0, 40.0, 200.0):
        for link_gbps in (5.0, 25.0, 64.0):
            costs = costs_for_expert(int(expert_mb * 1e6), 4096, 2048, cpu_gbps=cpu_gbps, link_gbps=link_gbps)
            p = MissPolicy(costs)
            want = any(_cpu_used(p, m) for m in range(1, k + 1))
            assert p.cpu_possible(1, k) == want, (expert_mb, cpu_gbps, link_gbps)
            assert p.cpu_possible(1, k) == want  # memoized: same answer
    fast = MissPolicy(costs_for_expert(int(13.4e6), 4096, 2048))
    slow = MissPolicy(costs_for_expert(int(13.4e6), 4096, 2048, cpu_gbps=1.0))
    assert fast.cpu_possible(1, k) and not slow.cpu_possible(1, k)  # both answers occur
    assert slow.cpu_possible(2, k)  # several tokens: not worked out, so assumed possible
    assert not fast.cpu_possible(1, k, cpu_available=False)
    fast.mode = "stream"
    assert not fast.cpu_possible(1, k)
    slow.mode = "cpu"
    assert slow.cpu_possible(1, k)


def test_cpu_possible_foresees_the_probe():
    """A CPU estimate lowered by one slow call streams everything, until the probe sends it one miss."""
    p = MissPolicy(costs_for_expert(int(13.4e6), 4096, 2048), probe_every=4, recover=0.0)
    while p.cpu_possible(1, 6):
        p.observe_cpu(1, 1, 10.0)  # very slow calls, until the estimate streams every miss
    seen = []
    for _ in range(8):
        possible = p.cpu_possible(1, 6)
        seen.append(possible)
        assert possible == bool(p.split({1: 1, 2: 1}).cpu)
    assert True in seen and False in seen and p.n_probes >= 1


# --- on the stand-in hybrid model ---------------------------------------------------------------------------------

pytest.importorskip("triton")

from homerun.kernels import triton as hr_triton  # noqa: E402

if not hr_triton.available() or not hr_triton.interpreting():  # pragma: no cover
    pytest.skip(f"triton kernels unavailable here: {hr_triton.unavailable_reason()}", allow_module_level=True)

from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402
from offload.cached_backend import CacheOptions, MissOptions, build_cached_backend  # noqa: E402
from offload.devices import CudaStandInDevice  # noqa: E402

PROMPT = [1, 2, 3, 4]
TOKENS = [7, 300, 7, 41, 7]
N_LAYERS = 3


def _run(path, *, cpu_gbps: float | None, early: bool, always_copy: bool = False) -> list[dict]:
    """Decode steps in "auto" mode with frozen estimates (no timing decides); `always_copy`: the old rule, a copy on
    every call whenever a CPU backend exists."""
    from homerun.formats.loader import open_checkpoint

    ckpt = open_checkpoint(path)
    args = ModelArgs.from_hf_config(ckpt.config)
    be = build_cached_backend(ckpt.expert, range(args.n_layers), args.n_routed_experts,
                              swiglu_limit=args.swiglu_limit, device=CudaStandInDevice("cuda-standin:0", 1 << 30),
                              cache=CacheOptions(slots_per_layer={l: 3 for l in range(args.n_layers)}),
                              misses=MissOptions("auto", cpu_gbps=cpu_gbps, speculate="never"))
    be.fused.early_cpu_rows = early
    be.cache.engine.max_in_flight = 1 << 10
    mp = be.miss_policy
    mp.observe_cpu = mp.observe_link = lambda *a: None  # estimates stay the priors: the splits are deterministic
    if always_copy:
        mp.cpu_possible = lambda *a, **kw: True
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    model = load(path, dtype="bfloat16", experts="reference", expert_backend=be, placement=pl)
    s = model.session()
    s.feed(PROMPT)
    steps = []
    for tok in TOKENS:
        f0 = be.fused.stats()
        cpu0 = be.stats().to_dict()["cpu_experts"]
        with count_device_work() as cw:
            logits = s.feed([tok])
        f1 = be.fused.stats()
        steps.append({"logits": logits.clone(), "launches": cw.c.device_launches,
                      "waits": f1["event_waits"] - f0["event_waits"], "early": f1["early_rows"] - f0["early_rows"],
                      "missed": f1["miss_calls"] - f0["miss_calls"],
                      "cpu": be.stats().to_dict()["cpu_experts"] - cpu0})
    be.close()
    return steps


@pytest.fixture(scope="module")
def slow_cpu(short_window_checkpoint):
    p = short_window_checkpoint
    return {"new": _run(p, cpu_gbps=1e-3, early=True), "no_copy": _run(p, cpu_gbps=1e-3, early=False),
            "old": _run(p, cpu_gbps=1e-3, early=True, always_copy=True)}


def test_no_early_copy_when_every_miss_streams(slow_cpu):
    new, no_copy, old = slow_cpu["new"], slow_cpu["no_copy"], slow_cpu["old"]
    assert sum(s["missed"] for s in new) >= 3  # misses happened, and all of them streamed
    for i, s in enumerate(new):
        assert s["cpu"] == 0 and s["early"] == 0, i
        assert s["launches"] == no_copy[i]["launches"], i
        assert old[i]["launches"] == s["launches"] + 2 * N_LAYERS and old[i]["early"] == N_LAYERS, i  # x and w
        assert s["waits"] == old[i]["waits"] == N_LAYERS, i
        assert torch.equal(s["logits"], old[i]["logits"]), i


def test_cpu_misses_in_auto_mode_still_wait_once(short_window_checkpoint):
    steps = _run(short_window_checkpoint, cpu_gbps=None, early=True)  # the priors favour the CPU at batch 1
    cpu_steps = [s for s in steps if s["cpu"]]
    assert len(cpu_steps) >= 2
    for i, s in enumerate(steps):
        assert s["early"] == N_LAYERS and s["waits"] == N_LAYERS, i  # no second wait for the rows
