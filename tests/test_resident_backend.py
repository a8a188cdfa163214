"""The all-VRAM plan's expert backend (`offload.resident_backend.ResidentExpertBackend`) on a GPU-flavored device: the
runtime's own backend, not a test double, runs the fused FP4 kernels (decode: `fp4_moe_decode`; prefill-sized calls:
two `fp4_grouped_gemm` launches over the pairs sorted by expert) with no host sync, charges the same bytes as the
per-expert placement, and matches the fp32 reference formula."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.formats.loader import open_checkpoint  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402
from homerun.kernels.reference import reference_moe  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402
from offload.resident_backend import ResidentExpertBackend  # noqa: E402
from offload.devices import CudaStandInDevice, StandInDevice  # noqa: E402
from offload.gpu_decode import FUSED_MAX_ROWS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")


@pytest.fixture(scope="module")
def mixed(tiny_checkpoints):
    ckpt = open_checkpoint(tiny_checkpoints["mixed"])
    return ckpt, ModelArgs.from_hf_config(ckpt.config)


def _inputs(args, t: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, args.dim, generator=g)
    ids = torch.stack([torch.randperm(args.n_routed_experts, generator=g)[: args.n_activated_experts]
                       for _ in range(t)])
    w = torch.rand(t, args.n_activated_experts, generator=g) + 0.1
    return x, ids, w


@pytest.mark.parametrize("t", [1, 3, FUSED_MAX_ROWS + 5])
def test_fused_resident_experts_match_the_reference_without_host_syncs(mixed, t):
    """Decode-sized (fused kernel) and prefill-sized (grouped GEMM) calls against reference_moe in fp32; neither
    makes a host sync (the all-VRAM plan's 0-sync goal is about this backend)."""
    ckpt, args = mixed
    be = ResidentExpertBackend(ckpt.expert, [0, 1], args.n_routed_experts, device=CudaStandInDevice("s:0", 1 << 30),
                               swiglu_limit=args.swiglu_limit)
    assert be.stats()["resident"]["fused"] is True
    x, ids, w = _inputs(args, t, seed=t)
    for layer in (0, 1):
        with count_device_work() as cw:
            y = be.forward(layer, x, ids, w)
        assert cw.c.syncs == 0, cw.c.sync_names
        assert cw.c.launches == 2  # gate/up + down, whichever kernel family serves the call
        ref = reference_moe(ckpt.expert, layer, x, ids, w, swiglu_limit=args.swiglu_limit)
        assert y.dtype == x.dtype
        assert ((y - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item() <= 1e-5
    be.close()


def test_bf16_activations_come_back_in_bf16_within_the_bound(mixed):
    ckpt, args = mixed
    be = ResidentExpertBackend(ckpt.expert, [0], args.n_routed_experts, device=CudaStandInDevice("s:0", 1 << 30),
                               swiglu_limit=args.swiglu_limit)
    x, ids, w = _inputs(args, 2, seed=7)
    y = be.forward(0, x.bfloat16(), ids, w)
    ref = reference_moe(ckpt.expert, 0, x.bfloat16().float(), ids, w, swiglu_limit=args.swiglu_limit)
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item() <= 1e-2


def test_stacked_placement_charges_the_per_expert_bytes(mixed):
    """The stacked slot cache holds exactly the packed experts' bytes (plus the identity slot table), so the plan's
    expert bytes stay right; close() gives every byte back."""
    ckpt, args = mixed
    layers = [0, 1]
    fused_dev, plain_dev = CudaStandInDevice("s:0", 1 << 30), StandInDevice("p:0", 1 << 30)
    fused = ResidentExpertBackend(ckpt.expert, layers, args.n_routed_experts, device=fused_dev,
                                  swiglu_limit=args.swiglu_limit)
    plain = ResidentExpertBackend(ckpt.expert, layers, args.n_routed_experts, device=plain_dev,
                                  swiglu_limit=args.swiglu_limit)
    assert plain.stats()["resident"]["fused"] is False
    per_expert = sum(ckpt.expert(l, e).nbytes for l in layers for e in range(args.n_routed_experts))
    assert plain_dev.used_bytes == per_expert
    assert fused_dev.used_bytes == per_expert + 4 * args.n_routed_experts
    fused.close()
    plain.close()
    assert fused_dev.used_bytes == 0 and plain_dev.used_bytes == 0
