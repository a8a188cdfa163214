import pytest
import torch

from homerun.errors import CheckpointError, DoesNotFitError, UsageError
from offload.base import ExpertWeights
from offload.host_store import ALIGN_BYTES, PARTS, ExpertLayout, HostExpertStore, random_packed_expert


def _experts(fmt="fp4", n_layers=2, n_experts=3, d=64, i=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(l, e): random_packed_expert(d, i, g, fmt=fmt) for l in range(n_layers) for e in range(n_experts)}


def _same(a: ExpertWeights, b: ExpertWeights) -> bool:
    return a.fmt == b.fmt and all(
        getattr(a, p).dtype == getattr(b, p).dtype
        and torch.equal(getattr(a, p).view(torch.uint8), getattr(b, p).view(torch.uint8)) for p in PARTS)


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_views_reconstruct_every_expert_bit_exactly(fmt):
    ex = _experts(fmt)
    store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex))
    for key, w in ex.items():
        got = store(*key)
        assert _same(got, w)
        buf = store.buffer(key)
        assert buf.is_contiguous() and buf.numel() == store.expert_bytes
        # Every tensor of the expert is a view into that one buffer.
        assert all(getattr(got, p).untyped_storage().data_ptr() == buf.untyped_storage().data_ptr() for p in PARTS)


def test_layout_is_aligned_and_covers_payload():
    w = _experts()[(0, 0)]
    lay = ExpertLayout.from_expert(w)
    # w1, its scales, w2 and its scales start aligned; w3 / w3_scale follow w1 / w1_scale directly (w13 blocks)
    assert all(p.offset_bytes % ALIGN_BYTES == 0 for p in lay.parts if p.name not in ("w3", "w3_scale"))
    assert lay.part("w3").offset_bytes == lay.part("w1").offset_bytes + lay.part("w1").nbytes
    assert lay.part("w3_scale").offset_bytes == lay.part("w1_scale").offset_bytes + lay.part("w1_scale").nbytes
    assert lay.payload_bytes == w.nbytes <= lay.stride_bytes < w.nbytes + len(PARTS) * ALIGN_BYTES


def test_tiers_fill_in_priority_order_and_disk_tier_says_it_is_slow(tmp_path):
    ex = _experts(n_layers=2, n_experts=4)
    keys = sorted(ex, key=lambda k: (k[1], k[0]))  # a priority order different from layer-major
    stride = ExpertLayout.from_expert(ex[keys[0]]).stride_bytes
    store = HostExpertStore(lambda l, e: ex[(l, e)], keys, pin=False, ram_budget_bytes=5 * stride + 7,
                            disk_dir=tmp_path)
    s = store.stats()
    assert (s.pinned_experts, s.ram_experts, s.disk_experts) == (0, 5, 3)
    assert [store.tier(k) for k in keys] == ["ram"] * 5 + ["disk"] * 3
    assert (tmp_path / "experts.bin").stat().st_size == 3 * stride
    assert all(_same(store(*k), ex[k]) for k in keys)  # disk-tier experts read back exactly
    assert any("disk" in n and "slower" in n for n in store.notes())


def test_without_disk_tier_overflow_is_refused():
    ex = _experts()
    with pytest.raises(DoesNotFitError, match="RAM budget"):
        HostExpertStore(lambda l, e: ex[(l, e)], list(ex), pin=False, ram_budget_bytes=100)


def test_no_pinning_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    ex = _experts()
    store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex))
    assert not store.pinned and store.stats().pinned_experts == 0
    assert not store.buffer((0, 0)).is_pinned()


def test_mismatched_expert_shapes_are_checkpoint_errors():
    ex = _experts()
    odd = random_packed_expert(64, 64, torch.Generator().manual_seed(3))
    src = lambda l, e: odd if (l, e) == (1, 2) else ex[(l, e)]  # noqa: E731
    with pytest.raises(CheckpointError, match="w1"):
        HostExpertStore(src, list(ex))


def test_unknown_key_is_usage_error():
    ex = _experts()
    store = HostExpertStore(lambda l, e: ex[(l, e)], list(ex))
    with pytest.raises(UsageError):
        store.buffer((9, 9))
