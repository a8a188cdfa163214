"""The placement executor: multi-device placements on CPU stand-ins give the single-device model's logits and greedy
tokens, every device's accounted bytes are exactly what was placed there and stay within its budget (KV growth
included), a short budget fails naming the device, and plans become placements from the planner's structured layout
(checked here against what the plan's rendered rows say)."""

import gc
import json
import re
from dataclasses import replace

import pytest
import torch

from homerun.errors import ContextFullError, DoesNotFitError, ExitCode, UsageError
from homerun.plan.inventory import resolve_model
from homerun.models.layers import QLinear
from homerun.engine.placement import Placement, placement_from_plan, require_devices, single_device, split_layers
from homerun.plan.planner import PlanOptions, activation_bytes, plan
from homerun.plan.placement import _split_layers
from homerun.plan.records import GPU_PREFILL_CHUNK_TOKENS
from homerun.engine.runtime import load
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
    hops0 = model.stats()["activation_hops"]
    for _ in range(6):  # greedy decode, one token at a time
        assert _rel(lb, la) <= 1e-6
        ta, tb = int(la.argmax()), int(lb.argmax())
        assert ta == tb
        la, lb = a.feed([ta]), b.feed([tb])
    # One hop per stage change on the way embed -> layers -> head, per forward (each decode step is one forward).
    stages = [pl.embed_device] + [lp.device for lp in pl.layers] + [pl.head_device]
    per_forward = sum(1 for x, y in zip(stages, stages[1:]) if x != y)
    assert per_forward == pl.hops_per_forward() > 0
    assert model.stats()["activation_hops"] - hops0 == 6 * per_forward
    _check_accounting(model, b._states)
    if experts == "device":  # everything on the devices: no host store, no cache, nothing offloaded
        backends = model.stats()["experts"]["backends"]
        assert [next(iter(x)) for x in backends] == ["resident"] * len(backends)
        assert all(d["bytes_by_class"].keys() <= {"weights", "kv"} for d in model.device_usage())


def test_default_experts_backend_matches(tiny_checkpoints, tmp_path):
    """The default expert path (native kernels on the host when built): host-expert layers on stand-ins run the
    same kernels as the single-device model; resident experts run the torch dequantize-and-multiply math, equal to
    the reference backend's up to fp32 summation order (the native kernels may quantize activations, so they are not
    the yardstick for it)."""
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
    assert _rel(resident.logits(prompt), load(path, experts="reference").logits(prompt)) <= 1e-5


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
    assert one.stats()["activation_hops"] == 0 and one.forwards > 0
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


_LAYER_ROW = re.compile(r"^layers (\d+)-(\d+):")
_EXPERT_ROW = re.compile(r"^routed experts, layers (\d+)-(\d+)")
_CACHE_ROW = re.compile(r"^GPU expert cache \((\d+) experts\)")
_KV_ROW = re.compile(r"^KV cache \((\d+) tokens")


def _from_rows(p):
    """What the plan's rendered rows say, per GPU (the label parsing placement_from_plan used to do)."""
    gpus = {}
    for r in p.placement:
        if not r.device.startswith("gpu"):
            continue
        g = gpus.setdefault(r.device, {"layers": None, "resident": False, "cache": 0, "kv_bytes": 0, "embed": False,
                                       "head": False})
        if m := _LAYER_ROW.match(r.what):
            g["layers"] = (int(m[1]), int(m[2]) + 1)
        elif m := _EXPERT_ROW.match(r.what):
            g["resident"] = (int(m[1]), int(m[2]) + 1)
        elif m := _CACHE_ROW.match(r.what):
            g["cache"] = int(m[1])
        elif m := _KV_ROW.match(r.what):
            g["kv_bytes"], g["kv_tokens"] = r.bytes, int(m[1])
        g["embed"] |= r.what == "embedding"
        g["head"] |= r.what == "lm head"
    return gpus


def _cpu_only(name):
    return replace(load_profile(name), gpus=())


@pytest.mark.parametrize("model,profile,opts", [
    (FLASH, "2xh100", {}), (FLASH, "3xh100", {}), (FLASH, "rtx5090-192gb", {}), (FLASH, "epyc-4090", {}),
    (FLASH, "rtx4090-128gb", {"allow_disk": True}), ("deepseek-ai/DeepSeek-V4-Pro", "3xh100-1tb", {}),
])
def test_layout_matches_the_rows_on_gpus(model, profile, opts):
    """The structured layout says what the rendered rows say: per GPU its layer range, resident experts or a cache of
    N experts, its KV, and a budget of capacity less margins; placement_from_plan reads only the layout."""
    spec, inv = resolve_model(model)
    prof = load_profile(profile.removesuffix("-1tb"))
    if profile.endswith("-1tb"):  # room for V4-Pro's experts in host RAM: a hybrid plan on 3 GPUs
        prof = replace(prof, cpu=replace(prof.cpu, ram_gib=1024))
    p = plan(spec, inv, prof, PlanOptions(**opts))
    assert p.fits
    rows, stages = _from_rows(p), p.layout.stages
    assert p.layout.n_layers == spec.num_layers == p.model["n_layers"]
    assert [s.device for s in stages] == list(rows) == [f"gpu{i}" for i in range(len(prof.gpu_list))]
    gpu_maps = [d for d in p.devices if d.kind == "gpu"]
    for s, g, d in zip(stages, rows.values(), gpu_maps):
        assert (s.first_layer, s.stop_layer) == g["layers"]
        assert s.experts == ("device" if g["resident"] else "host")
        if g["resident"]:
            assert g["resident"] == g["layers"] and s.expert_cache_slots == 0
        assert s.expert_cache_slots == g["cache"] and (s.kv_bytes, s.kv_tokens) == (g["kv_bytes"], g["kv_tokens"])
        assert (s.embedding, s.head) == (g["embed"], g["head"])
        assert s.budget_bytes == d.capacity_bytes - sum(d.margins.values()) and s.reason
    assert p.mode == ("all-vram" if stages[0].experts == "device" else "hybrid" if not opts else "disk-mmap")
    doc = json.loads(json.dumps(p.to_dict()))
    assert doc["layout"]["layer_counts"] == [s.n_layers for s in stages]
    pl = placement_from_plan(p)
    assert pl == placement_from_plan(doc)  # the `homerun plan --json` document places the same
    assert [d.name for d in pl.devices] == [f"cuda:{i}" for i in range(len(stages))]
    assert pl.layer_counts() == [s.n_layers for s in stages]
    assert pl.layer_counts() == _split_layers(spec.num_layers, [d.budget_bytes for d in pl.devices])
    for s, d in zip(stages, pl.devices):
        assert pl.layers_on(d.name) == list(range(s.first_layer, s.stop_layer))
        assert {pl.layers[i].experts for i in pl.layers_on(d.name)} <= {s.experts}
        assert d.expert_cache_slots == s.expert_cache_slots and d.budget_bytes == s.budget_bytes
    assert pl.embed_device == "cuda:0" and pl.head_device == pl.devices[-1].name
    standin = placement_from_plan(p, standin=True)
    assert [d.kind for d in standin.devices] == ["standin"] * len(stages)
    assert standin.layer_counts() == pl.layer_counts()
    assert [d.budget_bytes for d in standin.devices] == [d.budget_bytes for d in pl.devices]


@pytest.mark.parametrize("profile,mode", [("m3-ultra-512gb", "unified"), ("strix-halo-128gb", None),
                                          ("cpu-only:epyc-4090", "cpu-only")])
def test_layout_of_one_pool_plans(profile, mode):
    """Unified and CPU-only plans: one stage with every layer, the experts read in place; no n_layers needed."""
    spec, inv = resolve_model(FLASH)
    prof = _cpu_only(profile.split(":")[1]) if profile.startswith("cpu-only:") else load_profile(profile)
    p = plan(spec, inv, prof)
    (stage,) = p.layout.stages
    assert {r.device for r in p.placement} == {stage.device} == {"host" if mode == "cpu-only" else "unified"}
    assert (stage.first_layer, stage.stop_layer, stage.experts) == (0, spec.num_layers, "host")
    kv = [r for r in p.placement if r.what.startswith("KV cache")]
    assert [stage.kv_bytes] == [r.bytes for r in kv] and stage.embedding and stage.head
    if not p.fits:  # strix-halo's 128 GiB do not hold V4-Flash: the layout is there, the placement refuses
        assert mode is None
        with pytest.raises(DoesNotFitError):
            placement_from_plan(p)
        return
    assert p.mode == mode
    pl = placement_from_plan(p)
    assert [d.name for d in pl.devices] == ["cpu"] and pl.layer_counts() == [spec.num_layers]
    assert {lp.experts for lp in pl.layers} == {"host"}
    assert placement_from_plan(p, n_layers=spec.num_layers) == pl
    with pytest.raises(UsageError, match=f"places {spec.num_layers} layers, the checkpoint has 3") as err:
        placement_from_plan(p, n_layers=3)
    assert "plan this checkpoint" in err.value.hint


def test_placement_from_plan_refuses_no_fit_and_missing_layout():
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Pro")
    p = plan(spec, inv, load_profile("3xh100"))  # 512 GiB of RAM does not hold V4-Pro's experts
    with pytest.raises(DoesNotFitError) as err:
        placement_from_plan(p)
    assert err.value.exit_code == ExitCode.NO_FIT
    spec, inv = resolve_model(FLASH)
    with pytest.raises(UsageError, match="no layout"):
        placement_from_plan(replace(plan(spec, inv, load_profile("3xh100")), layout=None))


def test_require_devices_names_the_missing_gpu():
    spec, inv = resolve_model(FLASH)
    pl = placement_from_plan(plan(spec, inv, load_profile("3xh100")))
    require_devices(pl, 3)
    with pytest.raises(UsageError, match="cuda:0, and this machine has no CUDA device") as err:
        require_devices(pl, 0, profile="3xh100")
    assert "--standin" in err.value.hint and err.value.exit_code == ExitCode.USAGE
    first, last = pl.layers_on("cuda:2")[0], pl.layers_on("cuda:2")[-1]
    with pytest.raises(UsageError, match=f"layers {first}-{last} and the head on cuda:2"):
        require_devices(pl, 2)
    require_devices(placement_from_plan(plan(spec, inv, load_profile("3xh100")), standin=True), 0)


def _tiny_hybrid_plan(spec, inv):
    """2 GPUs with no reserve or overhead and the least VRAM (in 64 KiB steps) for which the tiny model's plan with
    4096 tokens of context is hybrid with an expert cache on every GPU: its experts do not fit beside the KV."""
    prof = load_profile("2xh100")
    pol = replace(prof.policy, reserve_vram_gib=0.0, runtime_overhead_gib=0.0)
    opts = PlanOptions(context_tokens=4096)
    for step in range(200):
        vram = (activation_bytes(spec, GPU_PREFILL_CHUNK_TOKENS) + inv.non_expert_bytes // 2 + step * 65536) / 2**30
        p = plan(spec, inv, replace(prof, gpus=(replace(prof.gpus[0], vram_gib=vram),), policy=pol), opts)
        if p.mode == "hybrid" and all(s.expert_cache_slots for s in p.layout.stages):
            return p
    raise AssertionError("no VRAM size gives the tiny model a hybrid plan with caches")


def test_hybrid_plan_of_tiny_checkpoint_runs_on_standins(mixed):
    """The planner's hybrid decisions executed: routed experts in the host store, each stand-in's cache sized by
    the plan, budgets = the plan's (capacity less margins) and held; logits equal the single-device model's."""
    path, _ = mixed
    spec, inv = resolve_model(str(path))
    p = _tiny_hybrid_plan(spec, inv)
    slots = [s.expert_cache_slots for s in p.layout.stages]
    assert all(slots) and all(s.experts == "host" for s in p.layout.stages)
    pl = placement_from_plan(p, standin=True)
    assert [d.expert_cache_slots for d in pl.devices] == slots
    # The plan reserves bf16 KV; 1024-token pages keep the executor's page granularity inside that reserve.
    model = load(path, experts="reference", placement=pl, kv_dtype="bf16", page_tokens=1024)
    prompt = _prompt(64)
    ref = load(path, experts="reference", kv_dtype="bf16").logits(prompt)  # same KV rounding, one device
    assert _rel(model.logits(prompt), ref) <= 1e-6
    backends = model.stats()["experts"]["backends"]
    assert [b["cache"]["n_slots"] for b in backends] == slots
    s = model.session()
    s.feed(prompt)
    for d, st in zip(model.device_usage(), p.layout.stages):
        assert d["budget_bytes"] == st.budget_bytes and d["peak_bytes"] <= d["budget_bytes"]
        assert d["bytes_by_class"]["expert_cache"] == st.expert_cache_slots * inv.bytes_per_expert


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
    from homerun.engine.placement import DeviceSpec, LayerPlacement

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


def test_require_devices_checks_each_gpus_memory():
    """The plan's GPU i runs on cuda:i: a device with less memory than its budget is refused (one line naming it,
    with a hint); one whose memory differs from the profile's GPU by more than 5 % gets a note."""
    spec, inv = resolve_model(FLASH)
    pl = placement_from_plan(plan(spec, inv, load_profile("3xh100")))
    h100 = pl.devices[0].capacity_bytes
    assert h100 == 80 * 2**30 and all(d.capacity_bytes == h100 for d in pl.devices)
    assert require_devices(pl, 3, total_bytes=[h100] * 3) == []
    small = [h100, 24 * 2**30, h100]  # a 24 GiB card at ordinal 1
    with pytest.raises(UsageError, match=r"gives cuda:1 a budget of .* GiB \(its GPU 1 of 80.0 GiB\), and cuda:1 "
                                         r"has 24.0 GiB in all") as err:
        require_devices(pl, 3, profile="3xh100", total_bytes=small)
    assert "CUDA_VISIBLE_DEVICES" in err.value.hint and err.value.exit_code == ExitCode.USAGE
    notes = require_devices(pl, 3, total_bytes=[h100, 141 * 2**30, int(h100 * 1.04)])
    assert len(notes) == 1 and notes[0].startswith("cuda:1 has 141.0 GiB") and "--hw auto" in notes[0]
    assert require_devices(placement_from_plan(plan(spec, inv, load_profile("3xh100")), standin=True), 0,
                           total_bytes=[1]) == []
