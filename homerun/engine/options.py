"""`LoadOptions`: everything `homerun.load` can be told, as one frozen record of four groups.

    placement  where things run: one device (`device`, a plain load) or a multi-device `Placement`
    compute    compute dtype, how non-expert FP8 weights are held, the prefill chunk
    experts    the routed-expert backend: kind, activation mode, an expert cache and its policy, a routing trace
    context    the context ramp, KV budget, KV pages (device, tokens per page, dtype)

The constructors refuse impossible combinations with a one-line UsageError naming the field (e.g. `context.kv_device`
with a multi-device placement), so a record that exists can be loaded. `LoadOptions.of(**flat)` and `.replace(**flat)`
take the flat keyword names of `FLAT_FIELDS` (one per field, the names `load` has always taken). Torch-free: dtypes
are names, resolved by the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from homerun.engine.placement import Placement
from homerun.errors import UsageError
from offload.policies import POLICIES

COMPUTE_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                  "float16": "float16", "fp16": "float16"}
WEIGHTS_DTYPES = ("fp8", "bf16", "fp32")
KV_DTYPES = ("auto", "bf16", "fp8")  # auto: compressed entries in the compute dtype (exact)
EXPERT_BACKENDS = ("auto", "native", "reference")
EXPERT_ACTS = ("auto", "fp32", "int8", "bf16")
GRAPH_MODES = ("auto", "on", "off")  # homerun.engine.graphs, which imports torch


def _refuse(fld: str, value: Any, hint: str) -> UsageError:
    return UsageError(f"load option {fld}={value!r} is not possible", hint=hint)


def _one_of(fld: str, value: Any, allowed: Any) -> None:
    if value not in allowed:
        raise UsageError(f"unknown load option {fld}={value!r}", hint=f"use one of {', '.join(allowed)}")


def _positive(fld: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise _refuse(fld, value, "use a whole number >= 1, or leave it unset")


def device_kind(device: str) -> str | None:
    """"host" for the CPU, "cuda" for cuda/cuda:N, None for anything else."""
    if device == "cpu":
        return "host"
    head, _, idx = device.partition(":")
    return "cuda" if head == "cuda" and (not idx or idx.isdigit()) else None


@dataclass(frozen=True)
class PlacementOptions:
    """`device` ("cpu", "cuda", "cuda:N") for a plain load, which runs as a single-device placement; or an explicit
    `placement` (homerun.engine.placement), which names its own devices (then `device` stays unset)."""

    device: str | None = None
    placement: Placement | None = None

    def __post_init__(self) -> None:
        if self.placement is not None and not isinstance(self.placement, Placement):
            raise _refuse("placement.placement", type(self.placement).__name__,
                          "pass a homerun.engine.placement.Placement (e.g. placement_from_plan(plan))")
        if self.placement is not None and self.device is not None:
            raise _refuse("placement.device", self.device,
                          "a placement names its own devices: leave device unset, or drop the placement")
        if self.device is not None and device_kind(self.device) is None:
            raise _refuse("placement.device", self.device, "use cpu, cuda or cuda:N (stand-ins go in a placement)")

    @property
    def device_name(self) -> str:
        """The plain load's device as a placement device name ("cuda" -> "cuda:0")."""
        d = self.device or "cpu"
        return "cuda:0" if d == "cuda" else d


@dataclass(frozen=True)
class ComputeOptions:
    """dtype: compute dtype ("float32", "bfloat16", "float16"; aliases fp32/bf16/fp16). weights_dtype: "fp8" keeps
    FP8 weights packed (dequantized per matmul); "bf16"/"fp32" dequantize non-expert weights once at load.
    upcast_bf16: with fp32 compute, hold BF16-stored matrices in fp32 where no native bf16 kernel runs them.
    max_chunk_tokens: prefill chunk (default homerun.plan.records.prefill_chunk_tokens: 2048 where a GPU or CUDA
        stand-in runs the layers, else 512-2048 by the routed experts' batch, 1024 for V4-Flash; the planner charges
        the same chunk).
    cuda_graphs: one-token decode replayed from captured graphs (homerun.engine.graphs): "auto" (on a CUDA device
    when the model runs there whole; an expert backend that is not graph-safe, the hybrid cache, runs eagerly between
    the segments), "on" (also emulated on CUDA stand-ins), "off"."""

    dtype: str = "float32"
    weights_dtype: str = "fp8"
    upcast_bf16: bool = True
    max_chunk_tokens: int | None = None
    cuda_graphs: str = "auto"

    def __post_init__(self) -> None:
        _one_of("compute.dtype", self.dtype, COMPUTE_DTYPES)
        _one_of("compute.cuda_graphs", self.cuda_graphs, GRAPH_MODES)
        _one_of("compute.weights_dtype", self.weights_dtype, WEIGHTS_DTYPES)
        _positive("compute.max_chunk_tokens", self.max_chunk_tokens)


@dataclass(frozen=True)
class ExpertOptions:
    """kind: "auto" (native CPU kernels when built), "native" or "reference" (plain dequantize-and-multiply).
    act: the native kernels' activation mode ("auto": int8 blocks where a SIMD int8 kernel exists, ~5e-3 relative
    error per expert matmul; "fp32" exact up to summation order; "int8"; "bf16"). cache_slots: an expert cache of
    N slots on the device (every device that serves host-store layers, with a placement). cache_policy: its
    replacement policy. trace_path: record routing as JSONL."""

    kind: str = "auto"
    act: str = "auto"
    cache_slots: int | None = None
    cache_policy: str | None = None
    trace_path: str | None = None

    def __post_init__(self) -> None:
        _one_of("experts.kind", self.kind, EXPERT_BACKENDS)
        _one_of("experts.act", self.act, EXPERT_ACTS)
        if self.kind == "reference" and self.act not in ("auto", "fp32"):
            raise _refuse("experts.act", self.act, "the reference backend computes in the compute dtype: use "
                                                   "act auto or fp32, or experts kind native")
        _positive("experts.cache_slots", self.cache_slots)
        if self.cache_policy is not None:
            _one_of("experts.cache_policy", self.cache_policy, POLICIES)
        if self.trace_path is not None:
            object.__setattr__(self, "trace_path", str(self.trace_path))


@dataclass(frozen=True)
class ContextOptions:
    """ramp_tokens: the context capacity steps (default: the standard ramp up to max_position_embeddings).
    kv_budget_bytes: the KV budget. kv_device: where a plain load's KV pages live ("auto": the device while the KV at
    the largest permitted step fits there, else host RAM; a placement puts each layer's KV on its device).
    page_tokens: context tokens per KV page (default max(1024, ramp_tokens[0]/32)). kv_dtype: "auto" (the compute
    dtype, exact), "bf16", or "fp8" (lossy, 584 B per 512-dim entry)."""

    ramp_tokens: tuple[int, ...] | None = None
    kv_budget_bytes: int | None = None
    kv_device: str = "auto"
    page_tokens: int | None = None
    kv_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.ramp_tokens is not None:
            ramp = tuple(self.ramp_tokens)
            if not ramp or any(not isinstance(r, int) or r < 1 for r in ramp):
                raise _refuse("context.ramp_tokens", list(ramp), "use positive token counts, e.g. [4096, 65536]")
            object.__setattr__(self, "ramp_tokens", tuple(sorted(ramp)))
        if self.kv_budget_bytes is not None and self.kv_budget_bytes < 0:
            raise _refuse("context.kv_budget_bytes", self.kv_budget_bytes, "use a byte count >= 0, or leave it unset")
        if self.kv_device is None:  # the historical spelling of "auto"
            object.__setattr__(self, "kv_device", "auto")
        if self.kv_device != "auto" and device_kind(self.kv_device) is None:
            raise _refuse("context.kv_device", self.kv_device, "use auto, cpu, cuda or cuda:N")
        _positive("context.page_tokens", self.page_tokens)
        _one_of("context.kv_dtype", self.kv_dtype, KV_DTYPES)


@dataclass(frozen=True)
class LoadOptions:
    """What `homerun.load` is told; the cross-group checks (placement with KV device, cache and policy) run here."""

    placement: PlacementOptions = field(default_factory=PlacementOptions)
    compute: ComputeOptions = field(default_factory=ComputeOptions)
    experts: ExpertOptions = field(default_factory=ExpertOptions)
    context: ContextOptions = field(default_factory=ContextOptions)

    def __post_init__(self) -> None:
        pl = self.placement.placement
        if pl is not None and len(pl.devices) > 1 and self.context.kv_device != "auto":
            raise _refuse("context.kv_device", self.context.kv_device,
                          "with a placement on several devices each layer's KV lives on its layer's device: "
                          "leave kv_device at auto")
        if self.experts.cache_policy is not None and self.experts.cache_slots is None and not (
                pl is not None and any(d.expert_cache_slots for d in pl.devices)):
            raise _refuse("experts.cache_policy", self.experts.cache_policy,
                          "a policy needs an expert cache: set experts.cache_slots (--expert-cache-slots)")
        if self.experts.cache_slots is not None and pl is not None and not any(
                pl.host_expert_layers(d.name) for d in pl.devices):
            raise _refuse("experts.cache_slots", self.experts.cache_slots,
                          "the placement keeps every routed expert resident on its device: nothing to cache")

    @classmethod
    def of(cls, **flat: Any) -> "LoadOptions":
        """From flat keyword names (FLAT_FIELDS), e.g. LoadOptions.of(dtype="bfloat16", expert_act="fp32")."""
        return cls().replace(**flat)

    def replace(self, **flat: Any) -> "LoadOptions":
        """A copy with the named fields (flat names of FLAT_FIELDS) changed; checked like a new record."""
        groups: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            if name not in FLAT_FIELDS:
                raise UsageError(f"unknown load option {name!r}",
                                 hint=f"use one of {', '.join(sorted(FLAT_FIELDS))}")
            group, fld = FLAT_FIELDS[name]
            groups.setdefault(group, {})[fld] = tuple(value) if fld == "ramp_tokens" and value is not None else value
        return replace(self, **{g: replace(getattr(self, g), **kw) for g, kw in groups.items()})

    def to_flat(self) -> dict[str, Any]:
        return {name: getattr(getattr(self, g), f) for name, (g, f) in FLAT_FIELDS.items()}


# flat keyword name -> (group, field): one name per field.
FLAT_FIELDS: dict[str, tuple[str, str]] = {
    "device": ("placement", "device"), "placement": ("placement", "placement"),
    "dtype": ("compute", "dtype"), "weights_dtype": ("compute", "weights_dtype"),
    "upcast_bf16": ("compute", "upcast_bf16"), "max_chunk_tokens": ("compute", "max_chunk_tokens"),
    "cuda_graphs": ("compute", "cuda_graphs"),
    "experts": ("experts", "kind"), "expert_act": ("experts", "act"), "expert_cache_slots": ("experts", "cache_slots"),
    "cache_policy": ("experts", "cache_policy"), "trace_path": ("experts", "trace_path"),
    "ramp_tokens": ("context", "ramp_tokens"), "kv_budget_bytes": ("context", "kv_budget_bytes"),
    "kv_device": ("context", "kv_device"), "page_tokens": ("context", "page_tokens"),
    "kv_dtype": ("context", "kv_dtype"),
}
