import pytest
import torch

from offload.base import ReferenceExpertBackend
from offload.cache import ExpertCache
from offload.cached_backend import CacheOptions, CachedExpertBackend, MissOptions, build_cached_backend
from offload.devices import StandInDevice
from offload.host_store import HostExpertStore, random_packed_expert
from offload.miss_policy import MissPolicy, costs_for_expert
from offload.cpu_backend import CpuExpertBackend

D, I, E, L, K = 64, 32, 8, 3, 2


def _experts(fmt="fp4", seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(l, e): random_packed_expert(D, I, g, fmt=fmt) for l in range(L) for e in range(E)}


def _routing(g, t):
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])  # (T, K)
    return torch.randn(t, D, generator=g) * 3, ids, torch.rand(t, K, generator=g) * 1.5


def _assert_equal_outputs(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("fmt,slots,mode", [
    *[("fp4", s, m) for s in (1, 2) for m in ("auto", "cpu", "stream")], ("fp8", 1, "auto"), ("fp8", 2, "stream"),
])
def test_equivalent_to_reference_with_tiny_cache(fmt, slots, mode):
    ex = _experts(fmt)
    src = lambda l, e: ex[(l, e)]  # noqa: E731
    ref = ReferenceExpertBackend(src, swiglu_limit=10.0)
    be = build_cached_backend(src, range(L), E, swiglu_limit=10.0,
                              device=StandInDevice("gpu0", 1 << 30), cache=CacheOptions(slots, policy="adaptive"),
                              misses=MissOptions(mode))
    g = torch.Generator().manual_seed(1)
    for t in (1, 5, 17, 1):  # decode steps and prefill-sized batches
        for layer in range(L):
            x, ids, w = _routing(g, t)
            _assert_equal_outputs(be.forward(layer, x, ids, w), ref.forward(layer, x, ids, w))
    st = be.stats()
    c = st.cache
    assert sum(s.hits + s.misses for s in c.layers) == st.cache.to_dict()["hits"] + st.cache.to_dict()["misses"] > 0
    if mode == "cpu":
        assert st.cpu_experts == c.to_dict()["misses"] and st.miss_policy["n_stream"] == 0
    if mode == "stream":
        assert st.cpu_experts == 0 and c.to_dict()["n_copies"] >= c.to_dict()["misses"]
    be.close()


def test_bf16_input_keeps_dtype_and_hits_warm_cache():
    ex = _experts()
    store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex))
    be = build_cached_backend(store, range(L), E, swiglu_limit=10.0, host_store=store,
                              device=StandInDevice("gpu0", 1 << 30), cache=CacheOptions(L * E),
                              misses=MissOptions("stream"))
    g = torch.Generator().manual_seed(2)
    x, ids, w = _routing(g, 4)
    ref = ReferenceExpertBackend(store, swiglu_limit=10.0)
    for _ in range(3):
        y = be.forward(0, x.bfloat16(), ids, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref.forward(0, x.bfloat16(), ids, w))
    s = be.stats().cache.layers[0]
    assert s.misses == len(torch.unique(ids)) and s.hits == 2 * s.misses  # cold once, then warm
    be.close()


def test_cpu_misses_are_promoted_so_decode_warms_the_cache():
    ex = _experts()
    be = build_cached_backend(lambda l, e: ex[(l, e)], [0], E, swiglu_limit=10.0,
                              device=StandInDevice("gpu0", 1 << 30), cache=CacheOptions(E), misses=MissOptions("cpu"))
    g = torch.Generator().manual_seed(3)
    x, ids, w = _routing(g, 1)
    be.forward(0, x, ids, w)
    be.cache.engine.drain()
    be.forward(0, x, ids, w)
    s = be.stats().cache.layers[0]
    assert (s.misses, s.hits, s.promotions) == (K, K, K)
    be.close()


def test_hash_layer_prefetch_is_exact():
    ex = _experts()
    be = build_cached_backend(lambda l, e: ex[(l, e)], range(L), E, swiglu_limit=10.0,
                              device=StandInDevice("gpu0", 1 << 30), cache=CacheOptions(6),
                              misses=MissOptions("stream"))
    g = torch.Generator().manual_seed(4)
    tid2eid = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(50)])  # (V, K)
    token_ids = torch.tensor([7, 7, 21])
    be.prefetch_hash_layer(0, tid2eid, token_ids)
    x = torch.randn(3, D, generator=g)
    be.forward(0, x, tid2eid[token_ids], torch.ones(3, K))
    hash_stats = next(p for p in be.stats().prefetch if p.kind == "hash")
    assert hash_stats.precision == 1.0 and hash_stats.recall == 1.0
    assert be.stats().cache.layers[0].misses == 0  # everything was there (or in flight) when the layer ran
    be.close()


def test_speculative_prefetch_scores_precision_and_recall():
    ex = _experts()
    be = build_cached_backend(lambda l, e: ex[(l, e)], range(L), E, swiglu_limit=10.0,
                              device=StandInDevice("gpu0", 1 << 30), cache=CacheOptions(8),
                              misses=MissOptions("stream"))
    g = torch.Generator().manual_seed(5)
    gate_w, h = torch.randn(E, D, generator=g), torch.randn(2, D, generator=g)
    guess = torch.sqrt(torch.nn.functional.softplus(h @ gate_w.T)).topk(K, dim=-1).indices  # the model's router
    predicted = be.prefetch_speculative(1, guess)
    assert predicted == torch.unique(guess).tolist()
    ids = torch.tensor([[predicted[0], next(e for e in range(E) if e not in predicted)]] * 2)  # 1 of 2 predicted
    be.forward(1, h, ids, torch.ones(2, K))
    spec = next(p for p in be.stats().prefetch if p.kind == "speculative")
    assert spec.correct == 1 and spec.used == 2 and spec.predicted == len(predicted)
    assert spec.recall == 0.5 and spec.precision == pytest.approx(1 / len(predicted))
    be.close()


def test_miss_policy_cpu_at_batch_one_stream_at_prefill_both_in_between():
    # V4-Flash experts, PCIe 4.0, a purely bandwidth-bound CPU kernel that reaches the DRAM peak: streaming
    # cannot add bandwidth, so decode misses all go to the CPU.
    c = costs_for_expert(13_369_344, 4096, 2048, link_gbps=25.0, cpu_gbps=60.0, host_dram_gbps=60.0,
                         cpu_gflops=1e6)
    mp = MissPolicy(c)
    decode = mp.split({e: 1 for e in range(6)})
    assert decode.stream == () and len(decode.cpu) == 6
    # A slower CPU kernel leaves DRAM bandwidth for the link: most misses stay on the CPU, some stream meanwhile.
    slow_cpu = MissPolicy(costs_for_expert(13_369_344, 4096, 2048, link_gbps=25.0, cpu_gbps=30.0))
    d2 = slow_cpu.split({e: 1 for e in range(6)})
    assert len(d2.cpu) >= len(d2.stream)
    prefill = mp.split({e: 2000 for e in range(64)})
    assert len(prefill.stream) > len(prefill.cpu)
    mid = mp.split({e: 10 for e in range(16)})
    assert mid.cpu and mid.stream  # both paths at once
    # The split beats either path alone.
    all_cpu = sum(c.cpu_s(10) for _ in range(16))
    all_stream = sum(c.stream_s(10) for _ in range(16))
    assert mid.predicted_s < min(all_cpu, all_stream)


def test_miss_policy_follows_measurements():
    mp = MissPolicy(costs_for_expert(1 << 20, 64, 32, link_gbps=25.0), ewma=0.5)
    mp.observe_link(1 << 30, 1.0)  # a measured ~1.07 GB/s link
    assert mp.costs.link_gbps == pytest.approx(0.5 * 25.0 + 0.5 * (1 << 30) / 1e9)


def test_miss_policy_recovers_after_one_slow_cpu_call():
    """A pathological patch of CPU calls (a page fault storm, a busy core) must not starve the CPU path for good: idle splits
    pull the estimate back toward the prior and a probe re-measures it."""
    def policy(**kw):
        c = costs_for_expert(13_369_344, 4096, 2048, link_gbps=25.0, cpu_gbps=60.0, host_dram_gbps=60.0,
                             cpu_gflops=1e6)
        return MissPolicy(c, **kw)

    for kw in ({}, {"recover": 0.0}, {"probe_every": 10**9}):  # both mechanisms, and each alone
        mp = policy(**kw)
        for _ in range(30):  # a bad patch: calls ~1000x too slow
            mp.observe_cpu(6, 6, 100.0)
        assert mp.split({e: 1 for e in range(6)}).cpu == ()  # the CPU path is starved right after
        got_work = None
        for step in range(200):
            plan = mp.split({e: 1 for e in range(6)})
            if plan.cpu:
                got_work = step
                break
        assert got_work is not None, kw
        if plan.cpu and len(plan.cpu) == 1:  # a probe: its measurement brings the estimate back
            mp.observe_cpu(1, 1, 13_369_344 / 60e9)
    starved = policy(recover=0.0, probe_every=10**9)
    for _ in range(30):
        starved.observe_cpu(6, 6, 100.0)
    assert all(not starved.split({e: 1 for e in range(6)}).cpu for _ in range(200))
    assert policy().to_dict()["n_probes"] == 0


def test_backend_without_cpu_path_streams_everything():
    ex = _experts()
    store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex))
    cache = ExpertCache(store, StandInDevice("gpu0", 1 << 30), n_slots=1)
    be = CachedExpertBackend(cache, swiglu_limit=10.0)
    g = torch.Generator().manual_seed(6)
    x, ids, w = _routing(g, 3)
    ref = ReferenceExpertBackend(store, swiglu_limit=10.0)
    _assert_equal_outputs(be.forward(2, x, ids, w), ref.forward(2, x, ids, w))
    assert be.stats().cpu_experts == 0
    be.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_device_dequant_is_bit_exact(dtype):
    from offload.cached_backend import dequant_on_device
    g = torch.Generator().manual_seed(7)
    for quantize in (True, False):
        w = random_packed_expert(128, 64, g, quantize=quantize)
        assert all(torch.equal(a, b) for a, b in zip(w.dequant(dtype), dequant_on_device(w, dtype)))


def test_native_cpu_backend_serves_misses():
    ex = _experts()
    store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex))
    cpu = CpuExpertBackend(store, swiglu_limit=10.0)  # reads the store's contiguous buffers
    be = build_cached_backend(store, range(L), E, swiglu_limit=10.0, host_store=store,
                              device=StandInDevice("gpu0", 1 << 30), cpu_backend=cpu, cache=CacheOptions(2),
                              misses=MissOptions("auto"))
    ref = ReferenceExpertBackend(store, swiglu_limit=10.0)
    g = torch.Generator().manual_seed(8)
    for t in (1, 1, 9):
        for layer in range(L):
            x, ids, w = _routing(g, t)
            _assert_equal_outputs(be.forward(layer, x, ids, w), ref.forward(layer, x, ids, w))
    assert be.stats().cpu_experts > 0
    be.close()
