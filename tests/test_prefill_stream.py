"""Layer-by-layer streamed prefill on a CUDA stand-in (offload/prefill_stream.py): the grouped FP4 GEMM over a
double-buffered stage equals the reference, leaves the decode cache exactly as it was, and stages exactly the
layer's distinct experts (plus, in a model, the speculative guesses it reports as wasted)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from homerun.kernels import triton as hr_triton  # noqa: E402
from offload.base import ReferenceExpertBackend  # noqa: E402
from offload.cached_backend import CacheOptions, MissOptions, PrefillOptions, build_cached_backend  # noqa: E402
from offload.devices import CudaStandInDevice  # noqa: E402
from offload.host_store import random_packed_expert  # noqa: E402

if not hr_triton.available():  # pragma: no cover
    pytest.skip(f"triton kernels unavailable: {hr_triton.unavailable_reason()}", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")
D, I, E, L, K = 64, 32, 8, 3, 2


@pytest.fixture(scope="module")
def experts():
    g = torch.Generator().manual_seed(0)
    return {(l, e): random_packed_expert(D, I, g) for l in range(L) for e in range(E)}


def _rel(a, b):
    return ((a.float() - b).abs().max() / b.abs().max()).item()


def _cache_state(be):
    c = be.cache
    return dict(c._slot_of), c.slot_table.clone(), c.stats().to_dict()


@pytest.mark.parametrize("stage", [None, 3])  # a whole layer per stage; groups of 3 experts
def test_prefill_equals_reference_and_leaves_the_decode_cache(experts, stage):
    src = lambda l, e: experts[(l, e)]  # noqa: E731
    ref = ReferenceExpertBackend(src, swiglu_limit=10.0)
    be = build_cached_backend(src, range(L), E, swiglu_limit=10.0,
                              device=CudaStandInDevice("cuda-standin:0", 1 << 30), cache=CacheOptions(4),
                              misses=MissOptions("stream"), prefill=PrefillOptions(stage_experts=stage, min_rows=4))
    assert be.prefill is not None and be.prefill.capacity == (stage or E)
    g = torch.Generator().manual_seed(1)
    for layer in range(L):  # decode warms the cache
        be.forward(layer, torch.randn(1, D, generator=g), torch.tensor([[layer, layer + 1]]), torch.rand(1, K))
    before = _cache_state(be)
    t = 20
    for layer in range(L):
        x = torch.randn(t, D, generator=g) * 3
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
        w = torch.rand(t, K, generator=g)
        assert _rel(be.forward(layer, x, ids, w), ref.forward(layer, x, ids, w)) <= 1e-5
        c = be.prefill.stats()["layers"][layer]
        uniq = len(torch.unique(ids))
        assert c["experts"] == uniq and c["staged_bytes"] == uniq * be.cache.store.expert_bytes
        assert c["wasted_bytes"] == 0
    after = _cache_state(be)
    assert after[0] == before[0] and torch.equal(after[1], before[1]) and after[2] == before[2]
    be.close()


def test_model_prefill_through_the_stage_equals_the_resident_model(tiny_checkpoints):
    from homerun.engine.runtime import load
    from homerun.formats.loader import open_checkpoint
    from homerun.models.deepseek_v4 import ModelArgs

    path = tiny_checkpoints["mixed"]
    ckpt = open_checkpoint(path)
    a = ModelArgs.from_hf_config(ckpt.config)
    be = build_cached_backend(ckpt.expert, range(a.n_layers), a.n_routed_experts, swiglu_limit=a.swiglu_limit,
                              device=CudaStandInDevice("cuda-standin:0", 1 << 30), cache=CacheOptions(2),
                              prefill=PrefillOptions(min_rows=8))
    resident = load(path, expert_act="fp32")
    streamed = load(path, expert_backend=be)
    prompt = torch.randint(0, a.vocab_size, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    assert _rel(streamed.logits(prompt), resident.logits(prompt)) <= 1e-4
    st = be.prefill.stats()
    assert st["experts"] > 0
    # every staged byte is a used expert's, or a guess the stats call wasted
    assert st["staged_bytes"] - st["wasted_bytes"] == st["experts"] * be.cache.store.expert_bytes
    assert be.stats().cache.to_dict()["hits"] + be.stats().cache.to_dict()["misses"] == 0  # the cache sat out
    be.close()


def test_hash_layers_stage_from_host_reads_without_a_device_sync(tiny_checkpoints):
    """A hash layer's experts are tid2eid at the host token ids (offload.prefetch.HostTid2Eid): staging them ahead and
    the layer's own forward read no device unique + tolist. Against the device reads (`host_reads` False): the same
    logits and the same staging, two device reads fewer per hash layer, and what remains is one read per routed
    layer and one per guess."""
    from homerun.engine.runtime import load
    from homerun.formats.loader import open_checkpoint
    from homerun.kernels.counting import count_device_work
    from homerun.models.deepseek_v4 import ModelArgs

    path = tiny_checkpoints["mixed"]
    ckpt = open_checkpoint(path)
    a = ModelArgs.from_hf_config(ckpt.config)
    assert a.n_hash_layers >= 1
    prompt = torch.randint(0, a.vocab_size, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    runs = {}
    for host_reads in (True, False):
        be = build_cached_backend(ckpt.expert, range(a.n_layers), a.n_routed_experts, swiglu_limit=a.swiglu_limit,
                                  device=CudaStandInDevice("cuda-standin:0", 1 << 30), cache=CacheOptions(2),
                                  prefill=PrefillOptions(min_rows=8))
        be.prefill.tid2eid.host_reads = host_reads
        guesses = []
        real = be.prefill.speculate
        be.prefill.speculate = lambda layer, ids: (guesses.append(layer), real(layer, ids))[1]
        model = load(path, expert_backend=be)
        with count_device_work() as cw:
            logits = model.logits(prompt)
        st = be.prefill.stats()
        runs[host_reads] = (logits, {k: v for k, v in st.items() if k not in ("copy_s", "stall_s", "layers")},
                            cw.c, len(guesses))
        be.close()
    (new_logits, new_st, new, n_guesses), (old_logits, old_st, old, _) = runs[True], runs[False]
    assert torch.equal(new_logits, old_logits)
    assert new_st == old_st and new_st["experts"] > 0
    n_hash = a.n_hash_layers
    fewer = old.sync_names["_unique2"] - new.sync_names.get("_unique2", 0)
    assert fewer == 2 * n_hash, (old.sync_names, new.sync_names)  # hash_layer's read and the layer's own
    assert old.syncs - new.syncs == 4 * n_hash  # each read was a unique and a tolist
    assert new.sync_names.get("_unique2", 0) == (a.n_layers - n_hash) + n_guesses
