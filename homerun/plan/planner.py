"""The planner: a pure function (ModelSpec, Inventory, HardwareProfile, PlanOptions) -> Plan, with a reason per decision.

It decides where every tensor class lives (GPU(s), host RAM, unified memory, or a disk-backed mmap), how much
VRAM is left for a GPU expert cache, how long a context the KV budget allows, and how fast decode and prefill
should run: an upper bound from the bytes each token moves over each link, and an estimate with efficiency
factors. It reads no files and touches no hardware; callers pass measured efficiencies in `PlanOptions`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from homerun.plan.inventory import Inventory
from homerun.plan.specs import KvLayout, ModelSpec, kv_layout, kv_read_bytes_per_token
from profiles.schema import GIB, HardwareProfile

RAMP_TOKENS = (131072, 262144, 393216, 524288, 786432, 1048576)
THINK_MAX_MIN_TOKENS = 393216  # V4 model card: use >= 384K context for Think Max (deepseek-v4.md §6)
MIN_CONTEXT_TOKENS = 4096  # below this a plan is not useful
ALL_VRAM_MIN_CONTEXT_TOKENS = 131072  # all-in-VRAM only if it still leaves at least 128K of context
# Assumed expert-cache hit rate h = c ** HIT_RATE_EXPONENT for a cache holding fraction c of all experts: between
# uniform routing (exponent 1) and llama.cpp #27861's LRU measurement (12.5 % cache -> 67 %, exponent ~0.19).
HIT_RATE_EXPONENT = 0.5
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
class PlanOptions:
    context_tokens: int | None = None  # requested context; None = the model's max_position_embeddings
    kv_dtype: str = "bf16"
    prefill_chunk_tokens: int = 2048  # KTransformers' V4-Flash recipe uses chunked prefill 2048 (peers.md §1.1)
    decode_depth_tokens: int = 4096  # context depth at which decode speed is predicted
    include_mtp: bool = False  # keep the MTP block resident (speculative decoding)
    allow_disk: bool = False  # allow a disk-backed mmap tier for experts when RAM is short
    hit_rate: float | None = None  # override the assumed expert-cache hit rate
    efficiency: Efficiency = field(default_factory=Efficiency)
    cpu_kernel: dict[str, Any] | None = None  # from homerun.plan.hardware; None -> derived from the profile's CPU flags


@dataclass(frozen=True)
class Placement:
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
    placement: tuple[Placement, ...]
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


# ---- pieces ------------------------------------------------------------------------------------------------------


def activation_bytes(spec: ModelSpec, chunk_tokens: int) -> int:
    """Estimated activation workspace for one prefill chunk: residual streams, attention and MoE temporaries."""
    hc = int(spec.config.get("hc_mult", 1)) if spec.arch == "deepseek_v4" else 1
    per_token = (16 * spec.hidden_size * hc + 6 * spec.experts_per_tok * spec.moe_intermediate_size
                 + 4 * spec.num_heads * spec.head_dim)
    scores = 0
    if spec.arch == "deepseek_v4":  # gathered top-k + window keys per query per head, fp32
        scores = chunk_tokens * spec.num_heads * (spec.index_topk + (spec.sliding_window or 0)) * 4
    return chunk_tokens * per_token + scores + spec.vocab_size * 4


def assumed_hit_rate(cache_experts: int, total_experts: int) -> float:
    if total_experts <= 0 or cache_experts <= 0:
        return 0.0
    return min(1.0, cache_experts / total_experts) ** HIT_RATE_EXPONENT


def best_miss_split(fixed_vram_s: float, miss_bytes: float, vram_gbps: float, pcie_gbps: float,
                    dram_gbps: float) -> float:
    """Fraction f of miss bytes streamed over PCIe (rest computed on the CPU) minimizing the slowest link.

    The per-token time max(fixed + f*m/V, f*m/P, (1-f)*m/D) is convex and piecewise linear in f, so the optimum is
    at an endpoint or where two of the lines cross.
    """
    if miss_bytes <= 0 or pcie_gbps <= 0:
        return 0.0
    m, v, p, d = miss_bytes, vram_gbps * 1e9, pcie_gbps * 1e9, dram_gbps * 1e9

    def t(f: float) -> float:
        return max(fixed_vram_s + f * m / v, f * m / p, (1 - f) * m / d)

    cands = [0.0, 1.0, p / (p + d), (m / d - fixed_vram_s) / (m / v + m / d)]
    return min((c for c in cands if 0.0 <= c <= 1.0), key=t)


def cpu_kernel_from_flags(flags: tuple[str, ...]) -> dict[str, Any]:
    """The CPU expert-kernel path a profile's CPU would use (the detected one comes from homerun.plan.hardware)."""
    f = {x.lower() for x in flags}
    path = "avx512" if "avx512f" in f else "avx2" if "avx2" in f else "neon" if ("neon" in f or "asimd" in f) else "portable"
    return {"path": path, "built": None, "reason": f"from the profile's CPU flags ({', '.join(sorted(f)) or 'none'})",
            "source": "profile"}


# ---- the planner -------------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """Working state of one planning run (internal; the result is the frozen Plan)."""

    spec: ModelSpec
    inv: Inventory
    prof: HardwareProfile
    opts: PlanOptions
    kv: KvLayout
    placement: list[Placement] = field(default_factory=list)
    devices: list[DeviceMap] = field(default_factory=list)
    decisions: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)

    def decide(self, what: str, choice: str, reason: str) -> None:
        self.decisions.append({"what": what, "choice": choice, "reason": reason})


def plan(spec: ModelSpec, inv: Inventory, prof: HardwareProfile, opts: PlanOptions | None = None) -> Plan:
    """Place the model on the profile and predict context length and speed. Pure: same inputs, same Plan."""
    opts = opts or PlanOptions()
    c = _Ctx(spec, inv, prof, opts, kv_layout(spec, opts.kv_dtype))
    from homerun.plan.placement import plan_discrete, plan_unified

    return plan_unified(c) if prof.memory.unified else plan_discrete(c)


def ramp(kv: KvLayout, kv_capacity_bytes: float, max_position: int) -> list[dict[str, Any]]:
    out = []
    for t in RAMP_TOKENS:
        need = kv.bytes_for(t)
        ok = need <= kv_capacity_bytes and t <= max_position
        why = "" if ok else ("beyond the model's max_position_embeddings" if t > max_position else "KV budget too small")
        out.append({"tokens": t, "fits": ok, "kv_bytes": need, "reason": why})
    return out


def context_section(c: _Ctx, kv_capacity_bytes: float, kv_reserved_tokens: int) -> dict[str, Any]:
    spec = c.spec
    max_tokens = min(c.kv.tokens_for(kv_capacity_bytes), spec.max_position_embeddings)
    think_ok = spec.arch == "deepseek_v4" and max_tokens >= THINK_MAX_MIN_TOKENS
    return {
        "max_tokens": max(max_tokens, 0),
        "model_max_tokens": spec.max_position_embeddings,
        "reserved_tokens": kv_reserved_tokens,
        "kv_dtype": c.kv.dtype,
        "kv_bytes_per_token": c.kv.bytes_per_token,
        "kv_constant_bytes": c.kv.constant_bytes,
        "kv_capacity_bytes": int(max(kv_capacity_bytes, 0)),
        "kv_note": c.kv.note,
        "ramp": ramp(c.kv, kv_capacity_bytes, spec.max_position_embeddings),
        "think_max_available": think_ok,
        "think_max_min_tokens": THINK_MAX_MIN_TOKENS,
    }


def model_section(c: _Ctx) -> dict[str, Any]:
    inv, spec = c.inv, c.spec
    return {
        "name": spec.name,
        "arch": spec.arch,
        "n_layers": spec.num_layers,
        "source": inv.source,
        "total_bytes": inv.total_bytes,
        "tensor_count": inv.tensor_count,
        "routed_expert_bytes": inv.routed_expert_bytes,
        "bytes_per_expert": inv.bytes_per_expert,
        "routed_experts": spec.routed_experts_total,
        "active_experts_per_token": spec.active_experts_per_token,
        "non_expert_bytes": inv.non_expert_bytes,
        "mtp_bytes": inv.mtp_bytes,
        "mtp_resident": c.opts.include_mtp,
        "active_params_per_token": inv.active_params_per_token,
        "bytes_by_class": inv.bytes_by_class,
        "expert_format": spec.expert_format,
        "weight_format": spec.weight_format,
    }


def hardware_section(prof: HardwareProfile) -> dict[str, Any]:
    return {
        "profile": prof.name,
        "source": prof.source,
        "description": prof.description,
        "gpus": [g.name for g in prof.gpu_list],
        "ram_bytes": int(prof.cpu.ram_gib * GIB),
        "dram_gbps": prof.cpu.mem_bw_gbps,
        "unified": prof.memory.unified,
    }


def finish(c: _Ctx, *, fits: bool, mode: str, verdict: str, remedy: str | None, context: dict[str, Any],
           predicted: dict[str, Any]) -> Plan:
    kernel = c.opts.cpu_kernel or cpu_kernel_from_flags(c.prof.cpu.flags)
    return Plan(
        fits=fits, mode=mode, verdict=verdict, remedy=remedy,
        model=model_section(c), hardware=hardware_section(c.prof), context=context, predicted=predicted,
        placement=tuple(c.placement), devices=tuple(c.devices), cpu_kernel=kernel,
        decisions=tuple(c.decisions), notes=tuple(c.notes) + c.inv.notes,
        layout=Layout(c.spec.num_layers, tuple(c.stages)) if c.stages else None,
    )


# ---- speed ---------------------------------------------------------------------------------------------------------


def decode_speed(c: _Ctx, *, resident_bytes: float, hit_rate: float, local_gbps: float, local_name: str,
                 pcie_gbps: float, dram_gbps: float, disk_fraction: float = 0.0, disk_gbps: float = 0.0,
                 hit_rate_source: str = "") -> dict[str, Any]:
    """Decode tok/s: physics bound (best miss split, links concurrent) and an estimate with efficiency factors."""
    spec, inv, eff = c.spec, c.inv, c.opts.efficiency
    expert_bytes = spec.active_experts_per_token * inv.bytes_per_expert
    kv_read = kv_read_bytes_per_token(spec, c.kv, c.opts.decode_depth_tokens)
    miss_bytes = (1.0 - hit_rate) * expert_bytes

    def links(v: float, p: float, d: float, k: float) -> tuple[list[Link], float]:
        fixed = (resident_bytes + kv_read + hit_rate * expert_bytes) / (v * 1e9)
        f = best_miss_split(fixed, miss_bytes, v, p, d) if miss_bytes else 0.0
        vram_bytes = resident_bytes + kv_read + hit_rate * expert_bytes + f * miss_bytes
        out = [Link(local_name, vram_bytes, v)]
        if miss_bytes:
            out.append(Link("dram", (1 - f) * miss_bytes, d))
            if p > 0:
                out.append(Link("pcie", f * miss_bytes, p))
            if disk_fraction > 0:
                out.append(Link("disk", disk_fraction * miss_bytes, k))
        return out, f

    bound_links, f_bound = links(local_gbps, pcie_gbps, dram_gbps, disk_gbps)
    t_bound = max(x.seconds_per_token for x in bound_links)
    est_links, f_est = links(local_gbps * eff.vram, pcie_gbps * eff.pcie, dram_gbps * eff.dram, disk_gbps)
    t_est = max(x.seconds_per_token for x in est_links) + eff.per_layer_overhead_s * spec.num_layers
    bottleneck = max(bound_links, key=lambda x: x.seconds_per_token).name
    return {
        "decode_tok_s": 1.0 / t_est if t_est > 0 else None,
        "decode_tok_s_upper_bound": 1.0 / t_bound if t_bound > 0 else None,
        "decode_depth_tokens": c.opts.decode_depth_tokens,
        "expert_cache_hit_rate": hit_rate,
        "hit_rate_source": hit_rate_source,
        "bytes_per_token": {"resident": resident_bytes, "experts": expert_bytes, "kv_read": kv_read},
        "links": [x.to_dict() for x in bound_links],
        "miss_pcie_fraction": f_bound,
        "estimate_links": [x.to_dict() for x in est_links],
        "estimate_miss_pcie_fraction": f_est,
        "bottleneck": bottleneck,
        "efficiency": eff.to_dict(),
        "method": "upper bound = 1 / max over links of bytes_per_token / bandwidth (links run concurrently, misses "
                  "split between CPU compute and PCIe streaming at the best ratio); estimate = same with "
                  "bandwidth x efficiency, plus per-layer overhead",
    }


def prefill_speed(c: _Ctx, *, tflops: float | None, weight_bytes_per_chunk: float, weight_gbps: float,
                  stream_bytes_per_chunk: float, stream_gbps: float, stream_link: str) -> dict[str, Any]:
    """Prefill tok/s for one chunk: the slowest of GPU compute, weight reads, and expert streaming (estimate)."""
    eff = c.opts.efficiency
    chunk = c.opts.prefill_chunk_tokens
    if not tflops:
        return {"prefill_tok_s": None, "prefill_chunk_tokens": chunk,
                "prefill_reason": "the profile gives no tflops_bf16 figure, so prefill compute cannot be estimated"}
    t_compute = 2.0 * c.inv.active_params_per_token * chunk / (tflops * 1e12 * eff.gpu_compute)
    t_weights = weight_bytes_per_chunk / (weight_gbps * 1e9 * eff.vram)
    t_stream = stream_bytes_per_chunk / (stream_gbps * 1e9 * eff.pcie) if stream_bytes_per_chunk and stream_gbps else 0.0
    parts = {"compute": t_compute, "weights": t_weights, stream_link: t_stream}
    limit = max(parts, key=parts.get)
    return {
        "prefill_tok_s": chunk / max(parts.values()),
        "prefill_chunk_tokens": chunk,
        "prefill_seconds_per_chunk": parts,
        "prefill_bottleneck": limit,
        "prefill_reason": "per chunk: 2 x active params x tokens FLOPs at tflops_bf16 x gpu_compute efficiency, "
                          "against reading resident weights and streaming non-cached experts once per chunk; "
                          "attention cost at long depth is not modeled",
    }


def with_distributed(p: Plan, suggestion: dict[str, Any]) -> Plan:
    return replace(p, distributed=suggestion)


def distributed_launch(spec: ModelSpec, inv: Inventory, context_tokens: int = 131072) -> dict[str, Any]:
    """A launch command for an existing distributed engine, sized from the model's bytes (TP/PP/EP)."""
    kv = kv_layout(spec, "bf16")
    need = inv.total_bytes * 1.1 + kv.bytes_for(min(context_tokens, spec.max_position_embeddings))
    options = []
    # GPU memory from hardware.md §1 (H200 141 GB, H100 80 GB); vLLM/SGLang reserve ~10 % by default.
    for gpu, mem_bytes in (("H200 141GB", 141e9), ("H100 80GB", 80e9)):
        n = max(1, math.ceil(need / (0.9 * mem_bytes)))
        n = 1 << (n - 1).bit_length()  # TP/EP sizes are powers of two
        nodes = max(1, n // 8)
        tp = min(n, 8)
        ctx = min(context_tokens, spec.max_position_embeddings)
        vllm = f"vllm serve {spec.name} --tensor-parallel-size {tp} --enable-expert-parallel --max-model-len {ctx}"
        if nodes > 1:
            vllm += f" --pipeline-parallel-size {nodes}"
        sglang = f"python -m sglang.launch_server --model-path {spec.name} --tp-size {n} --ep-size {n} --context-length {ctx}"
        if nodes > 1:
            sglang += f" --nnodes {nodes} --node-rank <0..{nodes - 1}> --dist-init-addr <head-ip>:5000"
        options.append({"gpu": gpu, "gpus": n, "nodes": nodes, "tensor_parallel": tp, "pipeline_parallel": nodes,
                        "expert_parallel": n, "vllm": vllm, "sglang": sglang})
    return {"needed_bytes": int(need), "reason": "no shipped single-machine profile holds this model; sized as "
            "weights x 1.1 + a 128K BF16 KV cache over GPUs at 90 % memory use", "options": options}

