"""The planner's records and constants: options, efficiencies, placement rows, device maps, links, pipeline stages,
the layout and the frozen Plan; and the working state of one planning run. Data only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from homerun.models.decode_bytes import RAMP_TOKENS  # noqa: F401 - the runtime's ramp, one definition
from homerun.plan.inventory import Inventory
from homerun.plan.specs import KvLayout, ModelSpec
from profiles.schema import GIB, HardwareProfile

THINK_MAX_MIN_TOKENS = 393216  # V4 model card: use >= 384K context for Think Max (deepseek-v4.md §6)
MIN_CONTEXT_TOKENS = 4096  # below this a plan is not useful
ALL_VRAM_MIN_CONTEXT_TOKENS = 131072  # all-in-VRAM only if it still leaves at least 128K of context
# The prefill chunk, one source for the planner and the runtime (homerun.engine.runtime.load): where a GPU (or a CUDA
# stand-in) runs the layers, 2048 (each layer's experts stream once per chunk; KTransformers' V4-Flash recipe,
# peers.md §1.1). Where the CPU runs them: the smallest power of two from 512 at which a routed expert's mean batch
# (chunk x top-k / experts) reaches 24 tokens, at most 2048. The fused int8 expert op runs at 0.26 of the VNNI peak
# at 8-12 tokens per expert and 0.38 at 32; on the one-layer V4-Flash (256 experts, top-6) 1024-token chunks spent
# 0.84x the routed experts' CPU-s of 512 (12 -> 24 tokens per expert) and 0.93-0.94x the prefill's, for +0.34 GiB RSS;
# 2048 (0.80x the experts', mHC and glue growing) saved no more overall and cost +0.93 GiB
# (benchmarks/prefill_cpu.md, "The CPU chunk by tokens per expert").
GPU_PREFILL_CHUNK_TOKENS = 2048
CPU_PREFILL_CHUNK_TOKENS = 512  # the CPU's smallest chunk (a dense model's, or few experts')
CPU_PREFILL_CHUNK_MAX_TOKENS = 2048
CPU_EXPERT_BATCH_TOKENS = 24  # the mean tokens per routed expert per chunk the CPU chunk grows to reach


GPU_DEVICE_KINDS = ("gpu", "cuda", "cuda-standin")  # a plan stage's kind, a runtime placement device's kinds


def gpu_runs_prefill(layer_device_kinds: Iterable[str]) -> bool:
    """Whether a GPU runs prefill, one rule for the planner and the runtime: the placement puts layers on a GPU
    device (a plan's "gpu" stages, which homerun.engine.placement.placement_from_plan makes "cuda" devices; a runtime
    placement's "cuda" or "cuda-standin" devices). One-pool plans ("unified", "host" stages) place every layer on the
    host, so the CPU runs their prefill whatever GPU the profile names."""
    return any(k in GPU_DEVICE_KINDS for k in layer_device_kinds)


def graphs_across_devices_reason(n_devices: int, eager_layers: int) -> str | None:
    """Why decode graphs are not captured (None when they are), one rule for the planner and the runtime
    (homerun.engine.graphs.unsupported_reason): across devices the step is one graph per device, which must hold every
    routed call, so a placement spanning several devices with `eager_layers` layers whose experts are not resident there
    (a cache, the CPU) runs eagerly; on one device any expert backend qualifies."""
    if n_devices > 1 and eager_layers:
        return (f"the layers span {n_devices} devices and {eager_layers} layers' experts are not resident "
                "(graphs across devices capture whole steps only)")
    return None


def cpu_prefill_chunk_tokens(routed_experts: int, experts_per_token: int) -> int:
    """The CPU's prefill chunk for a model with `routed_experts` experts per layer, `experts_per_token` of them per
    token (0 for a dense model): 512, doubled while an expert's mean batch per chunk is under 24 tokens, at most
    2048."""
    chunk = CPU_PREFILL_CHUNK_TOKENS
    if routed_experts > 0 and experts_per_token > 0:
        while (chunk < CPU_PREFILL_CHUNK_MAX_TOKENS
               and chunk * experts_per_token < CPU_EXPERT_BATCH_TOKENS * routed_experts):
            chunk *= 2
    return chunk


def prefill_chunk_tokens(gpu: bool, requested: int | None = None, *, routed_experts: int,
                         experts_per_token: int) -> int:
    """The prefill chunk the runtime uses: a user's explicit `requested` chunk, else 2048 where a GPU runs the layers
    (`gpu`), else the CPU's chunk for the model's routing (`cpu_prefill_chunk_tokens`). The routing arguments are
    required so that the planner (the model spec's) and the runtime (the loaded model's) cannot leave them out."""
    if requested:
        return int(requested)
    if gpu:
        return GPU_PREFILL_CHUNK_TOKENS
    return cpu_prefill_chunk_tokens(routed_experts, experts_per_token)


# The expert-cache hit-rate prior (homerun.plan.priors) comes from the routing model of offload/trace.py's
# `reuse_trace`, whose defaults reproduce llama.cpp #27861 (512 experts, top-10: per-layer LRU-64 hits ~67 %,
# LRU-128 ~81 %): a routed expert is, with probability REUSE_PROB, one of its layer's recently used experts at LRU
# stack depth d with P(d) ~ (d + STACK_OFFSET_TOKENS * top_k) ** -STACK_ALPHA, otherwise a fresh draw.
REUSE_PROB = 0.93
STACK_ALPHA = 2.0
STACK_OFFSET_TOKENS = 3.0
CLASS_LABELS = {"embed": "embedding", "head": "lm head", "attn": "attention", "compressor": "KV compressors",
                "indexer": "lightning indexers", "router": "routers", "shared": "shared experts",
                "routed": "routed experts", "norm": "norms", "hc": "mHC mixing", "dense": "dense MLP layers",
                "mtp": "MTP block", "other": "other tensors"}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of a link's bandwidth (or of peak FLOPS) a real runtime reaches; `homerun bench` measures them."""

    vram: float = 0.75  # GPU weight-streaming GEMV kernels vs. peak device bandwidth
    dram: float = 0.65  # CPU FP4 expert kernels vs. the profile's sustained DRAM bandwidth
    pcie: float = 0.85  # expert copies vs. measured pinned H2D bandwidth (per-copy latency, small experts)
    gpu_compute: float = 0.4  # prefill GEMMs vs. dense BF16 peak (dequantization, attention, launch gaps)
    per_layer_overhead_s: float = 1e-4  # per layer per decode step: launches, syncs, router top-k on host
    source: str = "defaults"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ExpertPlacement:
    """A peer runtime's expert placement, imposed on the plan instead of the one the planner would choose, so a plan
    compares like for like with a measurement of that runtime (issue 17). Exactly one field is set:

    - `cpu_moe_layers` N: llama.cpp's `--n-cpu-moe N`: the routed experts of the first N layers stay on the CPU, every
      later MoE layer's experts are in VRAM (`--cpu-moe` / `-ot exps=CPU`: N = all layers);
    - `gpu_experts_per_layer` N: KTransformers' `--kt-num-gpu-experts N`: N experts of every MoE layer in VRAM.

    The experts in VRAM are a static set (no refills, no host copy); every other expert is computed on the CPU."""

    cpu_moe_layers: int | None = None
    gpu_experts_per_layer: int | None = None
    source: str = ""  # how it was given (the flag, or the published row's field), for the plan's reasons

    def problem(self, spec: ModelSpec) -> str | None:
        """What is wrong with this placement for `spec` (None when it is valid): the flag, the value, the range."""
        if (self.cpu_moe_layers is None) == (self.gpu_experts_per_layer is None):
            return "give exactly one of --n-cpu-moe and --gpu-experts"
        if self.cpu_moe_layers is not None and not 0 <= self.cpu_moe_layers <= spec.num_layers:
            return (f"--n-cpu-moe must be 0..{spec.num_layers} (the model's layers), got {self.cpu_moe_layers}")
        if self.gpu_experts_per_layer is not None and not 0 <= self.gpu_experts_per_layer <= spec.n_routed_experts:
            return (f"--gpu-experts must be 0..{spec.n_routed_experts} (routed experts per layer), "
                    f"got {self.gpu_experts_per_layer}")
        return None

    def gpu_experts(self, spec: ModelSpec, first_layer: int, stop_layer: int) -> int:
        """Routed experts in VRAM among layers [first_layer, stop_layer) (dense layers hold none)."""
        moe = [i for i in range(first_layer, stop_layer) if i not in spec.dense_layers]
        if self.cpu_moe_layers is not None:
            return sum(1 for i in moe if i >= self.cpu_moe_layers) * spec.n_routed_experts
        return len(moe) * min(int(self.gpu_experts_per_layer or 0), spec.n_routed_experts)

    def describe(self) -> str:
        if self.cpu_moe_layers is not None:
            what = f"--n-cpu-moe {self.cpu_moe_layers}: routed experts of the first {self.cpu_moe_layers} layers on the CPU"
        else:
            what = f"--gpu-experts {self.gpu_experts_per_layer}: {self.gpu_experts_per_layer} experts per MoE layer in VRAM"
        return what + (f" ({self.source})" if self.source else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PlanOptions:
    context_tokens: int | None = None  # requested context; None = the model's max_position_embeddings
    kv_dtype: str = "bf16"
    prefill_chunk_tokens: int | None = None  # a user's explicit chunk; None = the runtime's for where prefill runs
    #   (prefill_chunk_tokens(): 2048 on a GPU; on the CPU 512-2048 by the routed experts' batch)
    decode_depth_tokens: int = 4096  # context depth at which decode speed is predicted
    prefill_prompt_tokens: int | None = None  # prompt a prefill estimate is for; None = decode_depth_tokens
    prefill_all_rows: bool = False  # the last layer runs every prompt row (a per-layer measurement's runs:
    #   prefill_shares --all-rows); False: the prompt's last row only, as a session's prefill
    #   (compute.last_layer_skip_per_token)
    include_mtp: bool = False  # keep the MTP block resident (speculative decoding)
    allow_disk: bool = False  # allow a disk-backed mmap tier for experts when RAM is short
    hit_rate: float | None = None  # override the assumed expert-cache hit rate
    cpu_experts: bool = True  # False: the runtime never computes experts on the CPU; misses stream over PCIe
    #   (MoE-Infinity, FreeToken --moe-backend offload); homerun's own runtime computes misses on the CPU
    expert_placement: ExpertPlacement | None = None  # impose a peer's placement instead of choosing one
    efficiency: Efficiency = field(default_factory=Efficiency)
    cpu_kernel: dict[str, Any] | None = None  # from homerun.plan.hardware; None -> derived from the profile's CPU flags
    cpu_peaks: dict[str, Any] | None = None  # measured CPU unit peaks, GOP/s over all threads ({"int8", "fp32", "bf16",
    #   "source"}; homerun.plan.hardware for --hw auto); None -> derived from the profile (homerun.plan.compute)


@dataclass(frozen=True)
class PlacementRow:
    """One row of a plan's placement table (what, where, bytes, why); the runtime's placement is
    homerun.engine.placement.Placement, built from the plan's `layout`."""

    what: str
    device: str
    bytes: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceMap:
    name: str
    kind: str  # gpu | host | unified | disk
    capacity_bytes: int
    used_bytes: int  # contents plus margins
    margins: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["free_bytes"] = self.capacity_bytes - self.used_bytes
        return d


@dataclass(frozen=True)
class Link:
    name: str  # vram | dram | pcie | disk | unified
    bytes_per_token: float
    gbps: float

    @property
    def seconds_per_token(self) -> float:
        return self.bytes_per_token / (self.gbps * 1e9) if self.bytes_per_token else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds_per_token": self.seconds_per_token}


@dataclass(frozen=True)
class Stage:
    """One device of the plan's layout, as data for the placement executor (`homerun.engine.placement`): which layers run
    there (and keep their KV there), where their routed experts live, and how big its expert cache is."""

    device: str  # the placement rows' device name: "gpu0", "gpu1", ... | "host" (CPU only) | "unified"
    kind: str  # gpu | host | unified
    index: int  # GPU ordinal (0 for a one-pool machine)
    first_layer: int
    stop_layer: int  # exclusive: layers [first_layer, stop_layer) run here; empty when equal
    experts: str  # "device": resident in this device's memory | "host": the host store (+ this device's cache)
    expert_cache_slots: int  # experts the device's cache holds (0: none)
    kv_tokens: int  # context tokens of KV reserved for this stage's layers
    kv_bytes: int
    budget_bytes: int  # capacity less the plan's margins: what weights, KV and the cache may use
    embedding: bool  # the embedding lives here (first stage)
    head: bool  # final norm + lm head (and MTP with --mtp) live here (last stage)
    reason: str
    graph_bytes: int = 0  # the decode graphs' static attention state at kv_tokens (homerun.plan.graph_memory)
    capacity_bytes: int = 0  # the profile's memory of this GPU, which the run's cuda:<index> should have (0: unstated)

    @property
    def n_layers(self) -> int:
        return self.stop_layer - self.first_layer

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "n_layers": self.n_layers}


@dataclass(frozen=True)
class Layout:
    """The plan's placement decisions as structured fields (the rows say the same in words, with bytes)."""

    n_layers: int
    stages: tuple[Stage, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"n_layers": self.n_layers, "stages": [s.to_dict() for s in self.stages],
                "layer_counts": [s.n_layers for s in self.stages]}


@dataclass(frozen=True)
class Plan:
    fits: bool
    mode: str  # all-vram | hybrid | unified | disk-mmap | none
    verdict: str
    remedy: str | None
    model: dict[str, Any]
    hardware: dict[str, Any]
    context: dict[str, Any]
    predicted: dict[str, Any]
    placement: tuple[PlacementRow, ...]
    devices: tuple[DeviceMap, ...]
    cpu_kernel: dict[str, Any]
    decisions: tuple[dict[str, str], ...]
    notes: tuple[str, ...] = ()
    distributed: dict[str, Any] | None = None
    layout: Layout | None = None  # structured placement decisions (what homerun.engine.placement executes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["placement"] = [p.to_dict() for p in self.placement]
        d["devices"] = [x.to_dict() for x in self.devices]
        d["layout"] = self.layout.to_dict() if self.layout is not None else None
        return d


def gib(n: float) -> float:
    return n / GIB


# ---- the planner -------------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """Working state of one planning run (internal; the result is the frozen Plan)."""

    spec: ModelSpec
    inv: Inventory
    prof: HardwareProfile
    opts: PlanOptions
    kv: KvLayout
    placement: list[PlacementRow] = field(default_factory=list)
    devices: list[DeviceMap] = field(default_factory=list)
    decisions: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)

    def decide(self, what: str, choice: str, reason: str) -> None:
        self.decisions.append({"what": what, "choice": choice, "reason": reason})
