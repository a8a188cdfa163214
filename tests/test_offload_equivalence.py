"""End-to-end: the model with routed experts offloaded through a 1-2 slot cache gives the same greedy tokens and
the same fp32 logits as the fully resident model (CPU stand-in device here; tests/test_gpu_offload.py on CUDA)."""

import pytest
import torch

from homerun.formats.loader import open_checkpoint
from homerun.models.deepseek_v4 import ModelArgs
from homerun.engine.runtime import load
from offload.cached_backend import CacheOptions, MissOptions, build_cached_backend
from offload.devices import StandInDevice


def _offloaded_backend(path, slots, mode):
    ckpt = open_checkpoint(path)
    args = ModelArgs.from_hf_config(ckpt.config)
    return build_cached_backend(ckpt.expert, range(args.n_layers), args.n_routed_experts,
                                swiglu_limit=args.swiglu_limit,
                                device=StandInDevice("standin:0", 1 << 30), cache=CacheOptions(slots),
                                misses=MissOptions(mode))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("kind,slots,mode", [("mixed", 1, "auto"), ("mixed", 2, "stream"), ("hca", 2, "cpu")])
def test_offloaded_model_equals_resident(tiny_checkpoints, kind, slots, mode):
    path = tiny_checkpoints[kind]
    resident = load(path, expert_act="fp32")
    backend = _offloaded_backend(path, slots, mode)
    offloaded = load(path, expert_backend=backend)
    prompt = torch.randint(0, resident.args.vocab_size, (48,), generator=torch.Generator().manual_seed(3)).tolist()

    assert _rel(offloaded.logits(prompt), resident.logits(prompt)) <= 1e-5

    a, b = resident.session(), offloaded.session()
    la, lb = a.feed(prompt), b.feed(prompt)
    for _ in range(8):  # greedy decode, one token at a time
        assert _rel(lb, la) <= 1e-5
        ta, tb = int(la.argmax()), int(lb.argmax())
        assert ta == tb
        la, lb = a.feed([ta]), b.feed([tb])

    st = backend.stats().cache
    assert st.n_slots == slots and st.to_dict()["misses"] > 0
    if mode != "cpu":
        assert st.to_dict()["bytes_moved"] > 0
    assert offloaded.stats()["experts"]["cache"]["n_slots"] == slots
    backend.close()
