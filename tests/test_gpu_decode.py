"""The cached backend's GPU decode path on a CUDA stand-in (offload/gpu_decode.py): the fused FP4 kernel over the
device slot table equals the reference with every kind of miss, and the all-hit path makes no host sync."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # no CUDA here: the kernels interpret (set before triton imports)

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from homerun.kernels import triton as hr_triton  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402
from offload.base import ReferenceExpertBackend  # noqa: E402
from offload.cached_backend import CacheOptions, MissOptions, build_cached_backend  # noqa: E402
from offload.devices import CudaStandInDevice  # noqa: E402
from offload.host_store import random_packed_expert  # noqa: E402

if not hr_triton.available():  # pragma: no cover
    pytest.skip(f"triton kernels unavailable: {hr_triton.unavailable_reason()}", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")
D, I, E, L, K = 64, 32, 6, 2, 2


@pytest.fixture(scope="module")
def experts():
    g = torch.Generator().manual_seed(0)
    return {(l, e): random_packed_expert(D, I, g) for l in range(L) for e in range(E)}


def _backend(experts, slots, mode="auto"):
    src = lambda l, e: experts[(l, e)]  # noqa: E731
    return build_cached_backend(src, range(L), E, swiglu_limit=10.0,
                                device=CudaStandInDevice("cuda-standin:0", 1 << 30), cache=CacheOptions(slots),
                                misses=MissOptions(mode))


def _rel(a, b):
    return ((a.float() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("slots,mode", [(1, "auto"), (2, "stream"), (3, "cpu"), (L * E, "stream")])
def test_fused_decode_equals_reference(experts, slots, mode):
    ref = ReferenceExpertBackend(lambda l, e: experts[(l, e)], swiglu_limit=10.0)
    be = _backend(experts, slots, mode)
    assert be.fused is not None
    g = torch.Generator().manual_seed(1)
    for t in (1, 1, 3, 1):
        for layer in range(L):
            x = torch.randn(t, D, generator=g) * 3
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
            w = torch.rand(t, K, generator=g)
            assert _rel(be.forward(layer, x, ids, w), ref.forward(layer, x, ids, w)) <= 1e-5
    st = be.stats()
    d = st.to_dict()
    assert d["gpu"]["decode"]["calls"] == 4 * L and d["cache"]["misses"] > 0
    if mode == "cpu":
        assert st.cpu_experts == d["cache"]["misses"]
    if mode == "stream":
        assert st.cpu_experts == 0 and d["cache"]["n_copies"] >= d["cache"]["misses"]
    be.close()


def test_bf16_activations_keep_their_dtype(experts):
    ref = ReferenceExpertBackend(lambda l, e: experts[(l, e)], swiglu_limit=10.0)
    be = _backend(experts, 2, "auto")
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(1, D, generator=g) * 3).to(torch.bfloat16)
    ids, w = torch.tensor([[0, 3]]), torch.rand(1, K, generator=g)
    y = be.forward(0, x, ids, w)
    assert y.dtype == torch.bfloat16 and _rel(y, ref.forward(0, x.float(), ids, w)) <= 1e-2
    be.close()


def test_hit_path_has_no_host_sync_and_two_kernel_launches(experts):
    be = _backend(experts, L * E, "stream")
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[1, 4]])
    x, w = torch.randn(1, D, generator=g), torch.rand(1, K, generator=g)
    for layer in range(L):  # warm: every expert used below becomes resident
        be.forward(layer, x, ids, w)
    misses0 = be.stats().to_dict()["cache"]["misses"]
    with count_device_work() as counter:
        for layer in range(L):
            be.forward(layer, x, ids, w)
    c = counter.c
    assert c.syncs == 0, c.sync_names
    assert c.launches == 2 * L  # gate/up + down per layer
    assert c.ops <= 6 * L, c.op_names  # slot lookup, miss mask, two copies to pinned buffers, output
    d = be.stats().to_dict()
    assert d["cache"]["misses"] == misses0 and d["gpu"]["decode"]["miss_calls"] <= L
    be.close()


def test_eviction_clears_the_device_slot_table(experts):
    be = _backend(experts, 1, "stream")
    table = be.cache.slot_table
    x, w = torch.randn(1, D), torch.rand(1, 1)
    be.forward(0, x, torch.tensor([[2]]), w)
    assert table[0, 2] >= 0 and int((table >= 0).sum()) == 1
    be.forward(0, x, torch.tensor([[5]]), w)
    assert table[0, 2] == -1 and table[0, 5] >= 0 and int((table >= 0).sum()) == 1
    be.close()
