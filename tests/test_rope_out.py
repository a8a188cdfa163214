"""The kernel sets' `rope_out` (RoPE of a tensor the caller hands over): the CPU prefill set rotates the trailing
channels in place, with the same bits as its norm_rope into a new tensor (what the model called before), and leaves
the other channels' memory untouched; the torch set (and the GPU set, which inherits it) returns a new tensor. The
model's prefill logits are bit-equal either way."""

from __future__ import annotations

import pytest
import torch

import homerun
from homerun.kernels import dispatch

TORCH = dispatch.TORCH


def _cpu_set() -> dispatch.CpuPrefillKernels:
    dense = dispatch.native_dense()
    if dense is None or dispatch.native_prefill() is None:
        pytest.skip("native kernels not built")
    return dispatch.CpuPrefillKernels(dense)


def _case(t: int, h: int, d: int, half: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, d, generator=g) * 3
    ang = torch.rand(t, half, generator=g) * 40
    return x, ang.cos(), ang.sin()


@pytest.mark.parametrize("t,h,d,half", [(1, 4, 64, 8), (67, 8, 512, 32), (130, 3, 128, 32), (5, 2, 16, 8)])
@pytest.mark.parametrize("inverse", [False, True])
def test_cpu_rope_out_in_place_equals_norm_rope(t, h, d, half, inverse):
    ks = _cpu_set()
    x, cos, sin = _case(t, h, d, half, seed=t + d)
    before = x.clone()
    want = ks.norm_rope(before, None, 0.0, cos, sin, norm=False, inverse=inverse)
    got = ks.rope_out(x, cos, sin, inverse=inverse)
    assert got.data_ptr() == x.data_ptr()  # in place
    assert torch.equal(got, want)  # bit for bit what the copying call gives
    assert torch.equal(got[..., : d - 2 * half], before[..., : d - 2 * half])
    ref = TORCH.norm_rope(before, None, 0.0, cos, sin, norm=False, inverse=inverse)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
    assert not torch.equal(got[..., d - 2 * half :], before[..., d - 2 * half :])


def test_rope_out_copies_where_it_must():
    ks = _cpu_set()
    x, cos, sin = _case(9, 4, 64, 16, seed=3)
    strided = x.transpose(0, 1).contiguous().transpose(0, 1)  # [T, H, d], not contiguous
    before = strided.clone()
    got = ks.rope_out(strided, cos, sin, inverse=True)
    assert torch.equal(strided, before)  # the fallback writes a new tensor
    assert torch.equal(got, ks.norm_rope(before, None, 0.0, cos, sin, norm=False, inverse=True))
    got_t = TORCH.rope_out(x, cos, sin, inverse=True)  # the torch (and GPU) set: never in place
    assert got_t.data_ptr() != x.data_ptr()
    assert torch.equal(got_t, TORCH.norm_rope(x, None, 0.0, cos, sin, norm=False, inverse=True))


@pytest.mark.skipif(not dispatch.USE_NATIVE, reason="HOMERUN_KERNELS=torch: native sets off")
@pytest.mark.parametrize("act", ["fp32", "int8"])
def test_model_prefill_bit_equal_with_copying_rope(tiny_checkpoints, monkeypatch, act):
    """The in-place rotation changes no logit: the same prefill with rope_out copying as before."""
    _cpu_set()
    model = homerun.load(tiny_checkpoints["mixed"], expert_act=act)
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(1)).tolist()
    calls = []
    real = dispatch.CpuPrefillKernels.rope_out
    monkeypatch.setattr(dispatch.CpuPrefillKernels, "rope_out", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = model.session().feed(ids)
    assert calls  # the prefill went through the in-place path
    monkeypatch.setattr(dispatch.CpuPrefillKernels, "rope_out", dispatch.TorchKernels.rope_out)
    ref = model.session().feed(ids)
    assert torch.equal(got, ref)
