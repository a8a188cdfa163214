"""Placement as data: which device holds each tensor class of a loaded model, with a reason per decision.

A `Placement` names the devices (a CUDA GPU, a CPU stand-in "GPU" with a byte budget, or the host), then puts the
embedding, each layer (attention, compressors, norms, mHC, router, shared expert, and that layer's KV state), and
the head (final norm, HC head, lm head) on one of them, and says where each layer's routed experts live:
  "device": resident on the layer's device (nothing offloaded);
  "host":   the host expert store (the checkpoint's packed experts in RAM), with an optional cache of
            `expert_cache_slots` slots on the layer's device (one pool per device, shared by its host layers).
`placement_from_plan` turns the planner's structured layout (`homerun.plan.planner.Plan.layout`, no label parsing) into
one (the plan's GPU i on cuda:i); `require_devices` checks that mapping against the machine's CUDA devices (count
and memory); `single_device` is the plain one-device layout.
This module only describes; `homerun.engine.runtime.load(..., placement=...)` executes it (through
`offload.devices.Device` byte accounting). It imports no torch and touches no hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from homerun.errors import DoesNotFitError, UsageError

# "cuda-standin": a stand-in that runs the GPU code path (kernels, dtypes) on the CPU (offload.devices).
DEVICE_KINDS = ("cuda", "standin", "cuda-standin", "host")
EXPERT_HOMES = ("device", "host")
# Budget of a device with no stated limit (a host device, or a stand-in asked for without one).
UNBOUNDED_BYTES = 1 << 62



@dataclass(frozen=True)
class DeviceSpec:
    """One device of a placement. budget_bytes caps what the executor may place there (weights, KV pages, the
    expert cache); `expert_cache_slots` sizes the expert cache pool serving this device's "host" layers."""

    name: str  # "cuda:1", "standin:2", "cpu"
    kind: str  # cuda | standin | cuda-standin | host
    budget_bytes: int
    expert_cache_slots: int = 0
    reason: str = ""
    capacity_bytes: int = 0  # the plan's memory of this GPU (its profile's; 0: unstated), checked by require_devices

    @property
    def index(self) -> int:
        """The CUDA ordinal (or stand-in number) of the device; 0 for the host."""
        return int(self.name.split(":")[1]) if ":" in self.name else 0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "budget_bytes": self.budget_bytes,
                "expert_cache_slots": self.expert_cache_slots, "reason": self.reason,
                "capacity_bytes": self.capacity_bytes}


@dataclass(frozen=True)
class LayerPlacement:
    layer: int
    device: str  # attention/norms/mHC/router/shared expert and the layer's KV state
    experts: str  # device | host
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "device": self.device, "experts": self.experts, "reason": self.reason}


@dataclass(frozen=True)
class Placement:
    devices: tuple[DeviceSpec, ...]
    embed_device: str
    layers: tuple[LayerPlacement, ...]
    head_device: str  # final norm, HC head, lm head
    embed_reason: str = ""
    head_reason: str = ""
    source: str = ""  # what produced it ("single device", "plan: 3xh100 / DeepSeek-V4-Flash")

    def __post_init__(self) -> None:
        names = [d.name for d in self.devices]
        if not names or len(set(names)) != len(names):
            raise UsageError(f"placement: device names must be distinct and non-empty, got {names}")
        for d in self.devices:
            if d.kind not in DEVICE_KINDS:
                raise UsageError(f"placement: device {d.name} has unknown kind {d.kind!r}",
                                 hint=f"use one of {', '.join(DEVICE_KINDS)}")
        for where, dev in [("embedding", self.embed_device), ("head", self.head_device)] + [
                (f"layer {lp.layer}", lp.device) for lp in self.layers]:
            if dev not in names:
                raise UsageError(f"placement: {where} is on {dev!r}, which is not one of its devices {names}")
        for lp in self.layers:
            if lp.experts not in EXPERT_HOMES:
                raise UsageError(f"placement: layer {lp.layer} experts {lp.experts!r} is not one of {EXPERT_HOMES}")
        if [lp.layer for lp in self.layers] != list(range(len(self.layers))):
            raise UsageError("placement: layers must be listed once each, in order from 0")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def device(self, name: str) -> DeviceSpec:
        return next(d for d in self.devices if d.name == name)

    def layer_counts(self) -> list[int]:
        """Layers per device, in device order (the pipeline split)."""
        return [sum(1 for lp in self.layers if lp.device == d.name) for d in self.devices]

    def layers_on(self, name: str) -> list[int]:
        return [lp.layer for lp in self.layers if lp.device == name]

    def hops_per_forward(self) -> int:
        """Device boundaries one forward crosses on its way embedding -> layers -> head (the activations move
        once per boundary)."""
        sites = [self.embed_device] + [lp.device for lp in self.layers] + [self.head_device]
        return sum(1 for a, b in zip(sites, sites[1:]) if a != b)

    def host_expert_layers(self, name: str) -> list[int]:
        return [lp.layer for lp in self.layers if lp.device == name and lp.experts == "host"]

    def check_layers(self, n_layers: int) -> None:
        if n_layers != self.n_layers:
            raise UsageError(f"placement covers {self.n_layers} layers, the checkpoint has {n_layers}",
                             hint="build the placement from a plan of this checkpoint (homerun.engine.placement)")

    def with_cache_slots(self, slots: int) -> "Placement":
        """The same placement with every device that serves "host" layers given an expert cache of `slots`."""
        devs = tuple(
            DeviceSpec(d.name, d.kind, d.budget_bytes, slots if self.host_expert_layers(d.name) else 0,
                       d.reason + (f"; expert cache forced to {slots} slots" if self.host_expert_layers(d.name)
                                   else ""), d.capacity_bytes)
            for d in self.devices)
        return Placement(devs, self.embed_device, self.layers, self.head_device, self.embed_reason,
                         self.head_reason, self.source)

    def summary(self) -> dict[str, Any]:
        """The short form for run/chat stats: per device its kind, layer count and range, where those layers'
        experts live, its expert-cache slots and budget."""
        devs = []
        for d in self.devices:
            mine = [lp for lp in self.layers if lp.device == d.name]
            homes = sorted({lp.experts for lp in mine})
            devs.append({"name": d.name, "kind": d.kind, "n_layers": len(mine),
                         "layers": [mine[0].layer, mine[-1].layer] if mine else None,
                         "experts": homes[0] if len(homes) == 1 else homes or None,
                         "expert_cache_slots": d.expert_cache_slots, "budget_bytes": d.budget_bytes})
        return {"source": self.source, "n_layers": self.n_layers, "layer_counts": self.layer_counts(),
                "embedding": self.embed_device, "head": self.head_device, "devices": devs}

    def describe(self) -> str:
        """One line: "cuda:0 15 layers, cuda:1 14 layers, cuda:2 14 layers (plan: 3xh100 / ...)"."""
        parts = [f"{d.name} {n} layer{'s' if n != 1 else ''}" + (f" +{d.expert_cache_slots}-slot cache"
                                                                  if d.expert_cache_slots else "")
                 for d, n in zip(self.devices, self.layer_counts())]
        return ", ".join(parts) + (f" ({self.source})" if self.source else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "devices": [d.to_dict() for d in self.devices],
            "embedding": {"device": self.embed_device, "reason": self.embed_reason},
            "layers": [lp.to_dict() for lp in self.layers],
            "head": {"device": self.head_device, "reason": self.head_reason},
            "layer_counts": self.layer_counts(),
        }


def single_device(n_layers: int, device: str = "cpu", *, budget_bytes: int | None = None,
                  experts: str = "host", expert_cache_slots: int | None = None, gpu_path: bool = False) -> Placement:
    """Everything on one device (today's layout). device: "cpu" (the host), "cuda:N", or "standin:N" (a CPU
    stand-in with `budget_bytes`; a "cuda-standin" with `gpu_path=True`). experts "host" (default: packed experts
    stay in host RAM, with an optional device cache of `expert_cache_slots`) or "device" (all routed experts
    resident on the device)."""
    kind = "host" if device == "cpu" else "cuda" if device.startswith("cuda") else "standin" \
        if device.startswith("standin") else None
    if kind is None:
        raise UsageError(f"placement: unknown device {device!r}", hint="use cpu, cuda:N or standin:N")
    kind = "cuda-standin" if kind == "standin" and gpu_path else kind
    if experts not in EXPERT_HOMES:
        raise UsageError(f"placement: experts must be one of {EXPERT_HOMES}, got {experts!r}")
    slots = int(expert_cache_slots or 0)
    spec = DeviceSpec(device, kind, UNBOUNDED_BYTES if budget_bytes is None else int(budget_bytes), slots,
                      "the only device")
    why = ("routed experts resident on the device" if experts == "device" else
           "routed experts in the host store" + (f", {slots}-slot cache on {device}" if slots else ""))
    layers = tuple(LayerPlacement(i, device, experts, why) for i in range(n_layers))
    return Placement((spec,), device, layers, device, "the only device", "the only device", "single device")


def split_layers(n_layers: int, devices: Sequence[str], counts: Sequence[int] | None = None, *,
                 experts: str = "device", budgets_bytes: Sequence[int] | None = None,
                 expert_cache_slots: Sequence[int] | None = None, kind: str = "standin") -> Placement:
    """A pipeline split by hand: `counts[i]` consecutive layers on devices[i] (default: as even as possible),
    embedding on the first device, head on the last. Handy for tests and for rigs without a profile."""
    n = len(devices)
    if counts is None:
        counts = [n_layers // n + (1 if i < n_layers % n else 0) for i in range(n)]
    if len(counts) != n or sum(counts) != n_layers or min(counts) < 0:
        raise UsageError(f"placement: layer counts {list(counts)} do not split {n_layers} layers over {n} devices")
    budgets = list(budgets_bytes) if budgets_bytes is not None else [UNBOUNDED_BYTES] * n
    slots = list(expert_cache_slots) if expert_cache_slots is not None else [0] * n
    specs = tuple(DeviceSpec(d, "host" if d == "cpu" else kind, int(b), int(s), "pipeline stage")
                  for d, b, s in zip(devices, budgets, slots))
    layers, start = [], 0
    for dev, c in zip(devices, counts):
        for i in range(start, start + c):
            layers.append(LayerPlacement(i, dev, experts, f"pipeline stage {dev} (layers {start}-{start + c - 1})"))
        start += c
    return Placement(specs, devices[0], tuple(layers), devices[-1], "first pipeline stage", "last pipeline stage",
                     "split")


def placement_from_plan(plan: Any, *, standin: bool | str = False, n_layers: int | None = None) -> Placement:
    """The planner's decisions as a Placement, read from the plan's structured `layout` (a `homerun.plan.planner.Plan`,
    or its `to_dict()` / `homerun plan --json` document). GPU stage i -> "cuda:i" ("standin:i" with
    `standin=True`; of kind "cuda-standin", which runs the GPU code path, with `standin="cuda"`; budget = the
    GPU's capacity less the plan's margins, the same either way); each layer and its KV
    on its stage's device; routed experts resident there ("all-vram") or in the host store with the stage's expert
    cache ("hybrid", "disk-mmap"). One-pool plans ("unified", "cpu-only") put everything on the host ("cpu"),
    experts read in place. `n_layers`, when given, must match the plan's layer count. A plan that does not fit
    raises DoesNotFitError."""
    doc = plan.to_dict() if hasattr(plan, "to_dict") else dict(plan)
    if not doc.get("fits"):
        raise DoesNotFitError(f"the plan does not fit: {doc.get('remedy') or doc.get('verdict')}",
                              hint="pick a bigger profile, a shorter --context, or --allow-disk")
    layout = doc.get("layout")
    if not layout or not layout.get("stages"):
        raise UsageError(f"plan ({doc.get('mode')}) has no layout record to place from",
                         hint="re-run `homerun plan` with this version of homerun")
    total = int(layout["n_layers"])
    if n_layers is not None and int(n_layers) != total:
        raise UsageError(f"plan ({doc.get('mode')}) places {total} layers, the checkpoint has {n_layers}",
                         hint="plan this checkpoint itself (homerun plan PATH), not another model")
    stages = layout["stages"]
    covered = [i for st in stages for i in range(st["first_layer"], st["stop_layer"])]
    if covered != list(range(total)):
        raise UsageError(f"plan ({doc.get('mode')}): its stages cover layers {covered}, not 0-{total - 1} in order",
                         hint="re-run `homerun plan`; the plan's layout is incomplete")
    profile = (doc.get("hardware") or {}).get("profile")
    source = f"plan: {profile} / {(doc.get('model') or {}).get('name')} ({doc.get('mode')})"
    gpu_stages = [st for st in stages if st["kind"] == "gpu"]
    if not gpu_stages:  # unified memory or CPU only: one pool, experts read in place from the host store
        why = f"{doc.get('mode')}: one memory pool, no copies"
        layers = tuple(LayerPlacement(i, "cpu", "host", why + "; experts read in place from the host store")
                       for i in range(total))
        spec = DeviceSpec("cpu", "host", UNBOUNDED_BYTES, 0, why)
        return Placement((spec,), "cpu", layers, "cpu", why, why, source)
    kind = "cuda-standin" if standin == "cuda" else "standin" if standin else "cuda"
    specs, layers = [], []
    embed_dev = head_dev = None
    for st in gpu_stages:
        name = f"{kind}:{st['index']}"
        slots = int(st["expert_cache_slots"]) if st["experts"] == "host" else 0
        specs.append(DeviceSpec(name, kind, int(st["budget_bytes"]), slots,
                                f"{st['device']}: {st['reason']}; budget = capacity less margins",
                                int(st.get("capacity_bytes", 0))))
        for i in range(st["first_layer"], st["stop_layer"]):
            why = (f"{st['device']} layers {st['first_layer']}-{st['stop_layer'] - 1}, KV with them; " +
                   (f"routed experts resident on {name}" if st["experts"] == "device" else
                    "routed experts in the host store" + (f", {slots}-expert cache on {name}" if slots
                                                          else ", no device cache")))
            layers.append(LayerPlacement(i, name, st["experts"], why))
        embed_dev = name if st["embedding"] and embed_dev is None else embed_dev
        head_dev = name if st["head"] else head_dev
    names = [d.name for d in specs]
    return Placement(tuple(specs), embed_dev or names[0], tuple(layers), head_dev or names[-1],
                     "first pipeline stage", "last pipeline stage", source)


def require_devices(placement: Placement, cuda_count: int, *, profile: str | None = None,
                    total_bytes: Sequence[int] = ()) -> list[str]:
    """Check the plan's GPU i -> cuda:i mapping (placement_from_plan) against this machine: `cuda_count` =
    torch.cuda.device_count(), `total_bytes` = each CUDA ordinal's memory (get_device_properties(i).total_memory;
    empty: not checked). Refuses a missing device, naming it and what it was to hold, and a device with less memory
    than its budget (the load would run out of memory on it); returns a one-line note with a hint per device whose
    memory differs from the plan's GPU by more than 5 % (the plan may be for other GPUs, or in another order).
    Stand-ins and the host always exist."""
    plan = f"the plan for {profile}" if profile else "the placement"
    notes = []
    for d in placement.devices:
        if d.kind != "cuda":
            continue
        if d.index >= cuda_count:
            layers = placement.layers_on(d.name)
            span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}" if layers else ""
            parts = [x for x, here in ((span, bool(span)), ("the embedding", placement.embed_device == d.name),
                                       ("the head", placement.head_device == d.name)) if here]
            what = " and ".join(parts) or "its share of the plan"
            have = "no CUDA device" if cuda_count == 0 else f"{cuda_count} CUDA device(s)"
            raise UsageError(f"{plan} puts {what} on {d.name}, and this machine has {have}",
                             hint="add --standin to run the plan's GPUs as CPU stand-ins with the same budgets "
                                  "(slow), or plan for this machine with --hw auto")
        if d.index >= len(total_bytes):
            continue
        have, gib = int(total_bytes[d.index]), 2**30
        gpu = f"its GPU {d.index}" + (f" of {d.capacity_bytes / gib:.1f} GiB" if d.capacity_bytes else "")
        if have < d.budget_bytes:
            raise UsageError(f"{plan} gives {d.name} a budget of {d.budget_bytes / gib:.1f} GiB ({gpu}), and "
                             f"{d.name} has {have / gib:.1f} GiB in all",
                             hint="plan for this machine with --hw auto, or order the GPUs with CUDA_VISIBLE_DEVICES "
                                  "so that the plan's GPU i is cuda:i")
        if d.capacity_bytes and abs(have - d.capacity_bytes) > 0.05 * d.capacity_bytes:
            notes.append(f"{d.name} has {have / gib:.1f} GiB, {plan} assumed {d.capacity_bytes / gib:.1f} GiB for "
                         f"{gpu.split(' of ')[0]}: plan for this machine with --hw auto to use what it has")
    return notes


def placed_build_kwargs(placement: Any, devs: dict[str, Any]) -> dict[str, Any]:
    """build_model's device arguments for a placement, with a `put` that charges each tensor (by its official
    name) to its device as ("weights", name): copied onto CUDA devices and stand-ins, adopted in place on the
    host (mmap'd checkpoint views stay zero-copy)."""
    layer_dev = [lp.device for lp in placement.layers]

    def site(name: str) -> str:
        if name.startswith("embed."):
            return placement.embed_device
        if name.startswith("layers."):
            return layer_dev[int(name.split(".", 2)[1])]
        return placement.head_device  # head, final norm, hc_head_*

    def put(name: str, t: Any, _dev: Any) -> Any:  # torch tensors and devices (this module imports no torch)
        d = devs[site(name)]
        if d.kind == "host" and t.device.type == "cpu":
            return d.adopt(("weights", name), t)
        return d.place(("weights", name), t)

    return {
        "device": devs[placement.embed_device].torch_device,
        "layer_devices": [devs[n].torch_device for n in layer_dev],
        "head_device": devs[placement.head_device].torch_device,
        "put": put,
        # each device's kernels ("gpu" on CUDA and CUDA stand-ins: the GPU set, bf16 matrices kept as stored)
        "flavors": [devs[n].kernel_flavor for n in [placement.embed_device, *layer_dev, placement.head_device]],
        "sites": [placement.embed_device, *layer_dev, placement.head_device],  # each part's device guard's
    }
