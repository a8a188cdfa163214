"""The placement executor: multi-device placements on CPU stand-ins give the single-device model's logits and greedy
tokens, every device's accounted bytes are exactly what was placed there and stay within its budget (KV growth
included), a short budget fails naming the device, and plans for the multi-GPU profiles become multi-device
placements."""

import gc
import json
from dataclasses import replace

import pytest
import torch

from homerun.errors import ContextFullError, DoesNotFitError, ExitCode, UsageError
from homerun.inventory import resolve_model
from homerun.models.layers import QLinear
from homerun.placement import Placement, placement_from_plan, single_device, split_layers
from homerun.planner import plan
from homerun.planner_placement import _split_layers
from homerun.runtime import load
from profiles import load_profile

PROMPT_TOKENS = 160
FLASH = "deepseek-ai/DeepSeek-V4-Flash"


def _prompt(n=PROMPT_TOKENS, seed=3):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _tensor_bytes(obj, seen) -> int:
    """Bytes of every tensor reachable from a model part (QLinear weight + scale, dataclass fields), once each."""
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, QLinear):
        return _tensor_bytes(obj.weight, seen) + (_tensor_bytes(obj.scale, seen) if obj.scale is not None else 0)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return 0


def _expected_bytes(model, name: str) -> dict[str, int]:
    """What the executor should have charged to device `name`, recomputed from the model and the checkpoint."""
    pl, net, seen = model.placement, model.net, set()
    weights = 0
    if pl.embed_device == name:
        weights += _tensor_bytes(net.embed, seen)
    if pl.head_device == name:
        weights += sum(_tensor_bytes(t, seen) for t in (net.head, net.norm, net.hc_head_fn, net.hc_head_base,
                                                          net.hc_head_scale))
    for lp in pl.layers:
        if lp.device != name:
            continue
        weights += _tensor_bytes(net.layers[lp.layer], seen)
        if lp.experts == "device":
            weights += sum(model.checkpoint.expert(lp.layer, e).nbytes for e in range(model.args.n_routed_experts))
    return {"weights": weights}


def _kv_bytes(model, states, name: str) -> int:
    total = 0
    for lp, st in zip(model.placement.layers, states):
        if lp.device == name:
            total += sum(c.store.nbytes for c in (st.comp, st.index_comp) if c is not None)
    return total


def _check_accounting(model, states=None, cache_bytes=None):
    for d in model.device_usage():
        cls = d["bytes_by_class"]
        assert cls.get("weights", 0) == _expected_bytes(model, d["name"])["weights"]
        if states is not None:
            assert cls.get("kv", 0) == _kv_bytes(model, states, d["name"])
        if cache_bytes is not None:
            assert cls.get("expert_cache", 0) == cache_bytes.get(d["name"], 0)
        assert d["used_bytes"] == sum(cls.values())
        assert d["used_bytes"] <= d["budget_bytes"] and d["peak_bytes"] <= d["budget_bytes"]


@pytest.fixture(scope="module")
def mixed(tiny_checkpoints):
    path = tiny_checkpoints["mixed"]
    return path, load(path, experts="reference")


@pytest.mark.parametrize("devices,counts,experts", [
    (["standin:0", "standin:1"], [2, 1], "device"),
    (["standin:0", "standin:1", "standin:2"], None, "device"),
    (["standin:0", "standin:1", "standin:2"], [1, 2, 0], "host"),
])
def test_split_matches_single_device(mixed, devices, counts, experts):
    path, base = mixed
    pl = split_layers(base.args.n_layers, devices, counts, experts=experts)
    model = load(path, experts="reference", placement=pl)
    prompt = _prompt()
    assert _rel(model.logits(prompt), base.logits(prompt)) <= 1e-6

    a, b = base.session(), model.session()
    la, lb = a.feed(prompt), b.feed(prompt)
    hops0 = model.net.activation_hops
    for _ in range(6):  # greedy decode, one token at a time
        assert _rel(lb, la) <= 1e-6
        ta, tb = int(la.argmax()), int(lb.argmax())
        assert ta == tb
        la, lb = a.feed([ta]), b.feed([tb])
    # One hop per stage change on the way embed -> layers -> head, per forward (each decode step is one forward).
    stages = [pl.embed_device] + [lp.device for lp in pl.layers] + [pl.head_device]
    per_forward = sum(1 for x, y in zip(stages, stages[1:]) if x != y)
    assert model.net.activation_hops - hops0 == 6 * per_forward
    _check_accounting(model, b._states)
    if experts == "device":  # everything on the devices: no host store, no cache, nothing offloaded
        backends = model.stats()["experts"]["backends"]
        assert [next(iter(x)) for x in backends] == ["resident"] * len(backends)
        assert all(d["bytes_by_class"].keys() <= {"weights", "kv"} for d in model.device_usage())


def test_default_experts_backend_matches(tiny_checkpoints, tmp_path):
    """The default expert path (native kernels on the host when built): host-expert layers on stand-ins run the
    same kernels as the single-device model; resident experts run the torch dequantize-and-multiply math, equal to
    the native kernels up to fp32 rounding (measured about 5e-7 here)."""
    path = tiny_checkpoints["csa"]
    base = load(path)
    prompt = _prompt(96)
    ref = base.logits(prompt)
    host = load(path, placement=split_layers(2, ["standin:0", "standin:1"], experts="host"),
                trace_path=tmp_path / "trace.jsonl")
    assert _rel(host.logits(prompt), ref) <= 1e-6
    lines = (tmp_path / "trace.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["n_layers"] == 2 and len(lines) == 1 + 2 * len(prompt)
    resident = load(path, placement=split_layers(2, ["standin:0", "standin:1"], experts="device"))
    assert _rel(resident.logits(prompt), ref) <= 1e-5


def test_accounting_tracks_kv_growth_and_release(mixed):
    path, base = mixed
    pl = split_layers(base.args.n_layers, ["standin:0", "standin:1", "standin:2"], experts="device")
    model = load(path, experts="reference", placement=pl, page_tokens=128)  # small pages: growth shows
    _check_accounting(model)
    s = model.session()
    kv = []
    for n in (130, 300, 600):  # closes HCA windows (128) and grows CSA/indexer pages past one page
        s.feed(_prompt(n - s.n_tokens, seed=n))
        _check_accounting(model, s._states)
        kv.append(sum(d["bytes_by_class"].get("kv", 0) for d in model.device_usage()))
    assert 0 < kv[0] < kv[1] < kv[2]
    s.reset()
    gc.collect()
    assert all(d["bytes_by_class"].get("kv", 0) == 0 for d in model.device_usage())
    assert model.stats()["devices"][1]["layers"] == [1]


def test_weights_budget_too_small_names_the_device(mixed):
    path, base = mixed
    names = ["standin:0", "standin:1", "standin:2"]
    roomy = load(path, experts="reference", placement=split_layers(3, names, experts="device"))
    need = {d["name"]: d["used_bytes"] for d in roomy.device_usage()}
    budgets = [need["standin:0"], need["standin:1"] - 1, need["standin:2"]]
    with pytest.raises(DoesNotFitError) as err:
        load(path, experts="reference", placement=split_layers(3, names, experts="device", budgets_bytes=budgets))
    assert "standin:1" in str(err.value) and err.value.exit_code == ExitCode.NO_FIT == 3
    # Exactly the bytes it needs is enough.
    exact = load(path, experts="reference",
                 placement=split_layers(3, names, experts="device", budgets_bytes=list(need.values())))
    assert [d["free_bytes"] for d in exact.device_usage()] == [0, 0, 0]


def test_kv_growth_past_budget(mixed):
    path, base = mixed
    names = ["standin:0", "standin:1"]
    roomy = load(path, experts="reference", placement=split_layers(3, names, [1, 2], experts="device"))
    weights = {d["name"]: d["used_bytes"] for d in roomy.device_usage()}
    # Room for the KV of 128 tokens (one 128-token page per store) on standin:1 (layers 1-2), not for 4096: the ramp
    # step up refuses, naming the device, before anything of that feed runs.
    kv128 = roomy.kv_bytes_at(128, layers=[1, 2])
    budgets = [weights["standin:0"] + (1 << 20), weights["standin:1"] + kv128]
    pl = split_layers(3, names, [1, 2], experts="device", budgets_bytes=budgets)
    model = load(path, experts="reference", placement=pl, ramp_tokens=[128, 4096], page_tokens=128)
    s = model.session()
    s.feed(_prompt(100))
    _check_accounting(model, s._states)
    with pytest.raises(ContextFullError, match="standin:1"):
        s.feed(_prompt(40, seed=9))
    assert s.n_tokens == 100
    # Without a ramp step to check, the page allocation itself refuses, naming the device; the session keeps the
    # chunks completed before (feeds commit per chunk) and the accounting still matches and holds.
    model = load(path, experts="reference", placement=pl, ramp_tokens=[4096], page_tokens=128)
    s = model.session()
    with pytest.raises(DoesNotFitError, match="standin:1"):
        s.feed(_prompt(1500))
    assert s.n_tokens < 1500 and s.n_tokens % model.max_chunk_tokens == 0
    _check_accounting(model, s._states)


def test_expert_cache_slots_on_host_layers(mixed):
    path, base = mixed
    pl = split_layers(3, ["standin:0", "standin:1"], [2, 1], experts="host")
    model = load(path, experts="reference", placement=pl, expert_cache_slots=1)
    prompt = _prompt(48)
    assert _rel(model.logits(prompt), base.logits(prompt)) <= 1e-6
    assert [d.expert_cache_slots for d in model.placement.devices] == [1, 1]
    backends = model.stats()["experts"]["backends"]
    assert [b["cache"]["n_slots"] for b in backends] == [1, 1]
    assert all(b["cache"]["misses"] > 0 for b in backends)
    expert_bytes = backends[0]["cache"]["expert_bytes"]
    _check_accounting(model, cache_bytes={"standin:0": expert_bytes, "standin:1": expert_bytes})


def test_mixed_resident_and_host_layers(mixed):
    """One device keeps its experts resident, another serves them from the host store through a 2-slot cache."""
    path, base = mixed
    pl = split_layers(3, ["standin:0", "standin:1"], [1, 2], experts="device", expert_cache_slots=[0, 2])
    pl = replace(pl, layers=tuple(replace(lp, experts="host") if lp.device == "standin:1" else lp
                                  for lp in pl.layers))
    model = load(path, experts="reference", placement=pl)
    prompt = _prompt(64)
    assert _rel(model.logits(prompt), base.logits(prompt)) <= 1e-6
    kinds = {next(iter(b)) for b in model.stats()["experts"]["backends"]}
    assert kinds == {"resident", "cache"}
    _check_accounting(model)


def test_single_device_and_host_device(mixed):
    path, base = mixed
    prompt = _prompt(64)
    one = load(path, experts="reference", placement=single_device(3, "standin:0", budget_bytes=1 << 30))
    assert _rel(one.logits(prompt), base.logits(prompt)) <= 1e-6
    assert one.net.activation_hops == 0
    _check_accounting(one)
    # The host as a placement device charges the checkpoint's tensors without copying them.
    host = load(path, experts="reference", placement=split_layers(3, ["cpu", "standin:1"], [2, 1]))
    assert _rel(host.logits(prompt), base.logits(prompt)) <= 1e-6
    assert host.net.embed.data_ptr() == host.checkpoint.get("embed.weight").data_ptr()
    _check_accounting(host)


def test_placement_record_and_validation(mixed):
    path, base = mixed
    pl = split_layers(3, ["standin:0", "standin:1"], experts="host", expert_cache_slots=[4, 4])
    d = json.loads(json.dumps(pl.to_dict()))
    assert [x["name"] for x in d["devices"]] == ["standin:0", "standin:1"]
    assert d["layer_counts"] == [2, 1] and d["embedding"]["device"] == "standin:0"
    assert all(x["reason"] for x in d["layers"]) and d["head"]["device"] == "standin:1"
    with pytest.raises(UsageError, match="not one of its devices"):
        Placement(pl.devices, "cuda:7", pl.layers, pl.head_device)
    with pytest.raises(UsageError, match="2 layers"):
        load(path, placement=split_layers(2, ["standin:0", "standin:1"]))
    with pytest.raises(UsageError, match="kv_device"):
        load(path, placement=pl, kv_device="cpu")


@pytest.mark.parametrize("profile", ["2xh100", "3xh100"])
def test_placement_from_plan_multi_gpu(profile):
    spec, inv = resolve_model(FLASH)
    prof = load_profile(profile)
    p = plan(spec, inv, prof)
    pl = placement_from_plan(p)
    n_gpus = len(prof.gpu_list)
    assert [d.name for d in pl.devices] == [f"cuda:{i}" for i in range(n_gpus)]
    assert pl.n_layers == spec.num_layers and sum(pl.layer_counts()) == spec.num_layers
    # The split is the planner's: in proportion to each GPU's usable memory (capacity less margins).
    assert pl.layer_counts() == _split_layers(spec.num_layers, [d.budget_bytes for d in pl.devices])
    rows = [r for r in p.placement if r.what.startswith("layers ")]
    for r in rows:
        first, last = (int(x) for x in r.what.split()[1].rstrip(":").split("-"))
        assert pl.layers_on(f"cuda:{r.device[3:]}") == list(range(first, last + 1))
    assert p.mode == "all-vram" and all(lp.experts == "device" for lp in pl.layers)
    assert pl.embed_device == "cuda:0" and pl.head_device == f"cuda:{n_gpus - 1}"
    standin = placement_from_plan(p, standin=True)
    assert [d.kind for d in standin.devices] == ["standin"] * n_gpus
    assert standin.layer_counts() == pl.layer_counts()


def test_placement_from_plan_hybrid_unified_and_no_fit():
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Pro")
    prof = load_profile("3xh100")
    roomy = replace(prof, cpu=replace(prof.cpu, ram_gib=1024))
    p = plan(spec, inv, roomy)
    assert p.mode == "hybrid"
    pl = placement_from_plan(p, standin=True)
    caches = [int(r.what.split("(")[1].split()[0]) for r in p.placement if r.what.startswith("GPU expert cache")]
    assert [d.expert_cache_slots for d in pl.devices] == caches
    assert all(lp.experts == "host" for lp in pl.layers) and len(pl.devices) == 3
    with pytest.raises(DoesNotFitError):
        placement_from_plan(plan(spec, inv, prof))  # 512 GiB of RAM does not hold V4-Pro's experts
    spec_f, inv_f = resolve_model(FLASH)
    uni = placement_from_plan(plan(spec_f, inv_f, load_profile("m3-ultra-512gb")), n_layers=spec_f.num_layers)
    assert [d.name for d in uni.devices] == ["cpu"] and uni.layer_counts() == [spec_f.num_layers]


def test_plan_of_tiny_checkpoint_runs_on_standins(mixed):
    path, base = mixed
    spec, inv = resolve_model(str(path))
    p = plan(spec, inv, load_profile("3xh100"))
    pl = placement_from_plan(p, standin=True)
    assert len(pl.devices) == 3 and sum(pl.layer_counts()) == base.args.n_layers
    model = load(path, experts="reference", placement=pl)
    prompt = _prompt(64)
    assert _rel(model.logits(prompt), base.logits(prompt)) <= 1e-6
    _check_accounting(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_and_standin_hops(mixed):
    """Real device hops: layer 0 and the head on cuda:0, layer 1 on a CPU stand-in, layer 2 back on cuda:0, with
    resident experts on the GPU and a 1-slot cache on the stand-in."""
    from homerun.placement import DeviceSpec, LayerPlacement

    path, base = mixed
    devs = (DeviceSpec("cuda:0", "cuda", 8 << 30), DeviceSpec("standin:1", "standin", 1 << 30, 1))
    layers = (LayerPlacement(0, "cuda:0", "device", "test"), LayerPlacement(1, "standin:1", "host", "test"),
              LayerPlacement(2, "cuda:0", "device", "test"))
    pl = Placement(devs, "cuda:0", layers, "cuda:0")
    model = load(path, experts="reference", placement=pl)
    assert model.net.layers[1].device.type == "cpu" and model.net.layers[2].device.type == "cuda"
    prompt = _prompt(96)
    assert _rel(model.logits(prompt), base.logits(prompt)) <= 1e-5
    a, b = base.session(), model.session()
    la, lb = a.feed(prompt), b.feed(prompt)
    for _ in range(4):
        assert int(la.argmax()) == int(lb.argmax())
        la, lb = a.feed([int(la.argmax())]), b.feed([int(lb.argmax())])
    _check_accounting(model, b._states)
