"""LoadOptions (homerun.engine.options): every impossible combination is refused with a one-line error naming the
field; a plain load and the same load through an explicit single-device placement are the same path (bit-identical
logits); activation hops come from the placement, not from the model."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields

import pytest
import torch

import homerun
from homerun.engine.options import (
    FLAT_FIELDS, ComputeOptions, ContextOptions, ExpertOptions, LoadOptions, PlacementOptions,
)
from homerun.engine.placement import single_device, split_layers
from homerun.errors import UsageError

PL2 = split_layers(3, ["standin:0", "standin:1"], [2, 1], experts="device")

# (flat overrides, the field the message must name)
REFUSED = [
    (dict(dtype="int3"), "compute.dtype"),
    (dict(weights_dtype="fp4"), "compute.weights_dtype"),
    (dict(max_chunk_tokens=0), "compute.max_chunk_tokens"),
    (dict(max_chunk_tokens=True), "compute.max_chunk_tokens"),
    (dict(experts="gpu-magic"), "experts.kind"),
    (dict(expert_act="int4"), "experts.act"),
    (dict(experts="reference", expert_act="int8"), "experts.act"),
    (dict(expert_cache_slots=0), "experts.cache_slots"),
    (dict(expert_cache_slots=4, cache_policy="mru"), "experts.cache_policy"),
    (dict(cache_policy="lru"), "experts.cache_policy"),  # a policy with no cache to apply it to
    (dict(ramp_tokens=[]), "context.ramp_tokens"),
    (dict(ramp_tokens=[4096, 0]), "context.ramp_tokens"),
    (dict(kv_budget_bytes=-1), "context.kv_budget_bytes"),
    (dict(kv_device="tpu"), "context.kv_device"),
    (dict(page_tokens=0), "context.page_tokens"),
    (dict(kv_dtype="int4"), "context.kv_dtype"),
    (dict(device="standin:0"), "placement.device"),
    (dict(device="cuda:x"), "placement.device"),
    (dict(device="cpu", placement=PL2), "placement.device"),  # a placement names its own devices
    (dict(placement="3xh100"), "placement.placement"),
    (dict(placement=PL2, kv_device="cpu"), "context.kv_device"),  # KV of a split lives with its layers
    (dict(placement=PL2, expert_cache_slots=2), "experts.cache_slots"),  # every expert resident: nothing to cache
]


@pytest.mark.parametrize("flat,field", REFUSED, ids=[f for _, f in REFUSED])
def test_impossible_combinations_are_refused_naming_the_field(flat, field):
    with pytest.raises(UsageError) as exc:
        LoadOptions.of(**flat)
    msg = str(exc.value)
    assert field in msg and "\n" not in msg and exc.value.hint and "\n" not in exc.value.hint
    assert exc.value.exit_code == 2


def test_unknown_flat_name_is_refused():
    with pytest.raises(UsageError, match="unknown load option 'expert_slots'"):
        LoadOptions.of(expert_slots=4)


def test_every_field_has_exactly_one_flat_name():
    groups = {"placement": PlacementOptions, "compute": ComputeOptions, "experts": ExpertOptions,
              "context": ContextOptions}
    assert [f.name for f in fields(LoadOptions)] == list(groups)
    want = sorted(f"{g}.{f.name}" for g, cls in groups.items() for f in fields(cls))
    assert sorted(f"{g}.{f}" for g, f in FLAT_FIELDS.values()) == want
    o = LoadOptions.of(dtype="bf16", expert_act="fp32", ramp_tokens=[65536, 4096], kv_dtype="fp8")
    assert o.compute.dtype == "bf16" and o.experts.act == "fp32" and o.context.kv_dtype == "fp8"
    assert o.context.ramp_tokens == (4096, 65536)  # sorted, a tuple: the record is frozen and hashable-safe
    assert LoadOptions.of(**o.to_flat()) == o
    with pytest.raises(Exception):
        o.compute = ComputeOptions()  # frozen


def test_possible_combinations_are_accepted():
    single = single_device(3, "standin:0", budget_bytes=1 << 30)
    LoadOptions.of(placement=single, kv_device="cpu")  # one device: its KV may live elsewhere
    LoadOptions.of(placement=split_layers(3, ["standin:0", "standin:1"], experts="host"), expert_cache_slots=2,
                   cache_policy="lru")
    LoadOptions.of(device="cuda:1", expert_cache_slots=8, cache_policy="arc", kv_device="cpu")
    LoadOptions.of(experts="reference", expert_act="fp32")


def test_options_module_imports_no_torch():
    code = ("import sys, homerun; homerun.LoadOptions.of(dtype='bf16'); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_refuses_before_reading_the_checkpoint(tmp_path):
    with pytest.raises(UsageError, match="compute.weights_dtype"):
        homerun.load(tmp_path / "nope", weights_dtype="int3")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_plain_load_is_a_single_device_placement(tiny_checkpoint):
    """A plain load and the same load through an explicit single_device placement: the same path, the same bits."""
    ids = torch.randint(3, 500, (45,), generator=torch.Generator().manual_seed(5)).tolist()
    opts = LoadOptions(experts=ExpertOptions(act="fp32"))
    plain = homerun.load(tiny_checkpoint, opts)
    n = plain.args.n_layers
    placed = homerun.load(tiny_checkpoint, opts.replace(placement=single_device(n, "cpu")))
    assert plain.placement == placed.placement == single_device(n, "cpu")
    a, b = plain.logits(ids), placed.logits(ids)
    assert torch.equal(a, b)
    sa, sb = plain.session(), placed.session()
    la, lb = sa.feed(ids[:30]), sb.feed(ids[:30])
    for t in ids[30:35]:
        assert torch.equal(la, lb)
        la, lb = sa.feed([t]), sb.feed([t])
    assert torch.equal(la, lb)
    st = plain.stats()
    assert st["activation_hops"] == 0 and st["placement"]["source"] == "single device"
    assert [d["name"] for d in st["devices"]] == ["cpu"] and st["devices"][0]["bytes_by_class"]["weights"] > 0


def test_plain_load_with_a_cache_is_a_single_device_placement_with_one(tiny_checkpoint):
    ids = list(range(3, 40))
    ref = homerun.load(tiny_checkpoint, expert_act="fp32", experts="reference").logits(ids)
    cached = homerun.load(tiny_checkpoint, expert_act="fp32", experts="reference", expert_cache_slots=2,
                          cache_policy="lru")
    assert cached.placement.devices[0].expert_cache_slots == 2
    assert _rel(cached.logits(ids), ref) <= 1e-5  # only the order of the expert sum differs
    assert cached.stats()["experts"]["cache"]["misses"] > 0


def test_hops_come_from_the_placement(tiny_checkpoint):
    """stats()["activation_hops"] = the placement's device boundaries per forward x forwards run; the model holds
    no counter of its own."""
    from homerun.engine.placement import DeviceSpec, LayerPlacement, Placement

    big = 1 << 40
    devs = (DeviceSpec("standin:0", "standin", big), DeviceSpec("standin:1", "standin", big))
    layers = tuple(LayerPlacement(i, d, "device", "test") for i, d in enumerate(["standin:1", "standin:0",
                                                                                  "standin:1"]))
    pl = Placement(devs, "standin:0", layers, "standin:0")
    assert pl.hops_per_forward() == 4  # s0 -> s1 -> s0 -> s1 -> s0
    assert single_device(3, "standin:0").hops_per_forward() == 0
    ids = list(range(3, 13))
    plain = homerun.load(tiny_checkpoint, experts="reference")
    model = homerun.load(tiny_checkpoint, experts="reference", placement=pl, max_chunk_tokens=4)
    assert not hasattr(model.net, "activation_hops")
    assert _rel(model.logits(ids), plain.logits(ids)) <= 1e-6
    assert model.forwards == 3 and model.stats()["activation_hops"] == 3 * 4  # 10 tokens in chunks of 4
    s = model.session()
    s.feed(ids[:5])  # two chunks
    s.feed([7])
    assert model.stats()["activation_hops"] == (3 + 2 + 1) * 4
