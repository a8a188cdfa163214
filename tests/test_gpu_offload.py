"""CUDA checks of the offload path (run by scripts/device-check.sh; skipped without a GPU)."""

import pytest
import torch

from offload.base import ReferenceExpertBackend
from offload.cached_backend import CacheOptions, MissOptions, build_cached_backend, dequant_on_device
from offload.devices import CudaDevice
from offload.host_store import HostExpertStore, random_packed_expert
from offload.transfer import CudaTransferEngine, measure_h2d_gbps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
D, I, E, L, K = 256, 128, 8, 3, 2


@pytest.fixture
def store():
    g = torch.Generator().manual_seed(0)
    ex = {(l, e): random_packed_expert(D, I, g) for l in range(L) for e in range(E)}
    return HostExpertStore(lambda l, e: ex[(l, e)], list(ex))


def test_store_is_pinned_on_cuda(store):
    assert store.pinned and store.buffer((0, 0)).is_pinned()


def test_cuda_engine_copies_on_its_own_stream_and_times_them():
    dev = CudaDevice(0, 1 << 30)
    eng = CudaTransferEngine(dev, max_in_flight=2)
    srcs = [torch.full((1 << 20,), i, dtype=torch.uint8).pin_memory() for i in range(5)]
    dsts = [torch.empty(1 << 20, dtype=torch.uint8, device="cuda") for _ in srcs]
    handles = [eng.copy(d, s, tag=(0, i)) for i, (d, s) in enumerate(zip(dsts, srcs))]
    assert len(eng._in_flight) <= 2
    for h in handles:
        eng.wait(h)
    assert all(int(d[0].item()) == i for i, d in enumerate(dsts))  # .item() after the stream wait
    eng.drain()
    st = eng.stats()
    assert st.n_copies == 5 and st.bytes_moved == 5 << 20 and st.achieved_gbps > 0
    assert eng.stream != torch.cuda.current_stream()


def test_device_dequant_matches_cpu(store):
    w = store(1, 3)
    cuda_w = store.layout.views(store.buffer((1, 3)).cuda())
    for a, b in zip(w.dequant(), dequant_on_device(cuda_w, torch.float32)):
        assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("mode", ["auto", "cpu", "stream"])
def test_cuda_backend_equals_reference(store, slots, mode):
    be = build_cached_backend(store, range(L), E, swiglu_limit=10.0, host_store=store,
                              device=CudaDevice(0, 1 << 30), cache=CacheOptions(slots), misses=MissOptions(mode))
    ref = ReferenceExpertBackend(store, swiglu_limit=10.0)
    g = torch.Generator().manual_seed(1)
    for t in (1, 7, 1, 33):
        for layer in range(L):
            x = torch.randn(t, D, generator=g)
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
            w = torch.rand(t, K, generator=g)
            got = be.forward(layer, x.cuda(), ids.cuda(), w.cuda())
            want = ref.forward(layer, x, ids, w)
            assert got.is_cuda
            rel = ((got.cpu() - want).abs().max() / want.abs().max()).item()
            assert rel <= 1e-5, rel
    st = be.stats().cache
    assert st.to_dict()["hits"] + st.to_dict()["misses"] > 0
    be.close()


def test_pinned_h2d_bandwidth_is_measured():
    assert measure_h2d_gbps(CudaDevice(0), nbytes=64 << 20, repeats=3) > 1.0
