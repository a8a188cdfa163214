"""The planner's models of context and speed: the KV ramp, activation workspace, the assumed cache hit rate, the
optimal CPU/PCIe miss split, decode and prefill speed per link, CPU prefill at compute speed (its FLOPs, peaks and
efficiencies come from homerun.plan.compute), and the sections of a finished Plan.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from homerun.plan.compute import (cpu_prefill_fit, cpu_unit_peaks, depth_flops_per_token, last_layer_skip_per_token,
                                   linear_flops_per_token)
from homerun.plan.specs import KvLayout, ModelSpec, kv_read_bytes_per_token
from profiles.schema import GIB, HardwareProfile

from homerun.plan.records import (CPU_EXPERT_BATCH_TOKENS, CPU_PREFILL_CHUNK_MAX_TOKENS, CPU_PREFILL_CHUNK_TOKENS,
                                  GPU_PREFILL_CHUNK_TOKENS, RAMP_TOKENS,
                                  THINK_MAX_MIN_TOKENS, Layout, Link, Plan, _Ctx, prefill_chunk_tokens)

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


def plan_chunk_tokens(c: _Ctx, *, gpu: bool) -> int:
    """The prefill chunk the runtime would use where a GPU (`gpu`) or the CPU runs prefill: the user's explicit
    `prefill_chunk_tokens`, else the runtime's default for that device (homerun.plan.records.prefill_chunk_tokens)."""
    return prefill_chunk_tokens(gpu, c.opts.prefill_chunk_tokens, routed_experts=c.spec.n_routed_experts,
                                experts_per_token=c.spec.experts_per_tok)


def chunk_decision(c: _Ctx, *, gpu: bool) -> int:
    """Record the prefill chunk the plan charges (activations, per-chunk costs) and why; return it."""
    chunk = plan_chunk_tokens(c, gpu=gpu)
    where = "a GPU runs prefill" if gpu else "the CPU runs prefill"
    why = (f"the requested chunk ({where})" if c.opts.prefill_chunk_tokens else
           f"{where}: the runtime's chunk there ({GPU_PREFILL_CHUNK_TOKENS} on a GPU; on the CPU "
           f"{CPU_PREFILL_CHUNK_TOKENS}, doubled up to {CPU_PREFILL_CHUNK_MAX_TOKENS} while a routed expert's mean "
           f"batch is under {CPU_EXPERT_BATCH_TOKENS} tokens, homerun.plan.records)")
    c.decide("prefill chunk", f"{chunk} tokens", why)
    return chunk


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


def ramp(kv: KvLayout, kv_capacity_bytes: float, max_position: int) -> list[dict[str, Any]]:
    out = []
    for t in RAMP_TOKENS:
        need = kv.bytes_for(t)
        ok = need <= kv_capacity_bytes and t <= max_position
        why = "" if ok else ("beyond the model's max_position_embeddings" if t > max_position else "KV budget too small")
        out.append({"tokens": t, "fits": ok, "kv_bytes": need, "reason": why})
    return out


def context_section(c: _Ctx, kv_capacity_bytes: float, kv_reserved_tokens: int,
                    cap_tokens: int | None = None) -> dict[str, Any]:
    """cap_tokens: the longest context where the capacity is per stage (graph_memory.stages_tokens_for), not
    kv.tokens_for of the bytes (whole KV pages may hold a few tokens more than the stages' static state allows)."""
    spec = c.spec
    most = c.kv.tokens_for(kv_capacity_bytes) if cap_tokens is None else cap_tokens
    max_tokens = min(most, spec.max_position_embeddings)
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
                 pcie_gbps: float, dram_gbps: float, disk_fraction: float = 0.0, disk_gbps: float | None = None,
                 hit_rate_source: str = "", parallel: int = 1, comm_s: float = 0.0, handoff_s: float = 0.0,
                 estimate_dram_gbps: float | None = None, cpu_misses_only: bool = False) -> dict[str, Any]:
    """Decode tok/s: a physics bound and an estimate.

    Bound: 1 / max over links of bytes/bandwidth, links concurrent, misses split optimally between CPU compute and
    PCIe streaming (all over PCIe when the runtime computes no experts on the CPU, `cpu_experts=False`).
    Estimate: bandwidth x efficiency, and a token's layers run in order: the GPU's fixed reads (non-expert weights,
    KV) and the expert phase (cache hits on the GPU, misses on the CPU / over PCIe / off the disk, concurrent with each
    other) add, because a layer's experts wait for its router and the next layer waits for its experts; plus the
    per-layer overhead, the per-layer CPU<->GPU handoff of a hybrid layer (`handoff_s`) and the tensor-parallel
    all-reduces (`comm_s`). `parallel` GPUs each read 1/parallel of the bytes at once (tensor parallel).
    `disk_fraction` is the share of host-side expert reads the page cache misses (they come off the disk);
    `disk_gbps` is then required (ValueError without a positive one: no silent division by zero).
    `cpu_misses_only`: the runtime computes every miss on the CPU and streams none (an imposed peer placement such
    as llama.cpp's --n-cpu-moe), for the bound and the estimate alike."""
    if disk_fraction > 0 and not (disk_gbps and disk_gbps > 0):
        raise ValueError(f"decode_speed: disk_gbps must be a positive read bandwidth when disk_fraction > 0 "
                         f"(got disk_gbps={disk_gbps!r}, disk_fraction={disk_fraction})")
    spec, inv, eff = c.spec, c.inv, c.opts.efficiency
    expert_bytes = spec.active_experts_per_token * inv.bytes_per_expert
    kv_read = kv_read_bytes_per_token(spec, c.kv, c.opts.decode_depth_tokens)
    miss_bytes = (1.0 - hit_rate) * expert_bytes
    cpu = c.opts.cpu_experts
    fixed_bytes = (resident_bytes + kv_read) / parallel
    hit_bytes = hit_rate * expert_bytes / parallel

    def links(v: float, p: float, d: float, k: float) -> tuple[list[Link], float]:
        fixed = (fixed_bytes + hit_bytes) / (v * 1e9)
        if not miss_bytes or cpu_misses_only:
            f = 0.0
        elif not cpu and p > 0:
            f = 1.0
        else:
            f = best_miss_split(fixed, miss_bytes, v, p, d)
        out = [Link(local_name, fixed_bytes + hit_bytes + f * miss_bytes, v)]
        if miss_bytes:
            out.append(Link("dram", (1 - f) * miss_bytes, d))
            if p > 0:
                out.append(Link("pcie", f * miss_bytes, p))
            if disk_fraction > 0:
                out.append(Link("disk", disk_fraction * miss_bytes, k))
        return out, f

    bound_links, f_bound = links(local_gbps, pcie_gbps, dram_gbps, disk_gbps or 0.0)
    t_bound = max(x.seconds_per_token for x in bound_links)
    v_e, p_e = local_gbps * eff.vram, pcie_gbps * eff.pcie
    d_e = (dram_gbps if estimate_dram_gbps is None else estimate_dram_gbps) * eff.dram
    if miss_bytes and not cpu_misses_only:  # the expert phase alone decides the split: the fixed reads happen before it
        f_est = 1.0 if (not cpu and p_e > 0) else best_miss_split(hit_bytes / (v_e * 1e9), miss_bytes, v_e, p_e, d_e)
    else:
        f_est = 0.0
    est_links = [Link(local_name, fixed_bytes + hit_bytes + f_est * miss_bytes, v_e)]
    phase = [Link("vram experts", hit_bytes + f_est * miss_bytes, v_e)]
    if miss_bytes:
        est_links.append(Link("dram", (1 - f_est) * miss_bytes, d_e))
        phase.append(est_links[-1])
        if p_e > 0:
            est_links.append(Link("pcie", f_est * miss_bytes, p_e))
            phase.append(est_links[-1])
        if disk_fraction > 0:
            est_links.append(Link("disk", disk_fraction * miss_bytes, disk_gbps))
            phase.append(est_links[-1])
    t_fixed = fixed_bytes / (v_e * 1e9)
    t_phase = max(x.seconds_per_token for x in phase)
    layers = spec.num_layers
    t_overhead = eff.per_layer_overhead_s * layers
    t_handoff = handoff_s * spec.moe_layers if miss_bytes else 0.0
    t_est = t_fixed + t_phase + t_overhead + t_handoff + comm_s
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
        "estimate_seconds_per_token": {"fixed_reads": t_fixed, "expert_phase": t_phase, "per_layer_overhead": t_overhead,
                                       "handoff": t_handoff, "tensor_parallel_comm": comm_s},
        "tensor_parallel": parallel,
        "disk_fraction_of_host_reads": disk_fraction,
        "bottleneck": bottleneck,
        "efficiency": eff.to_dict(),
        "method": "upper bound = 1 / max over links of bytes_per_token / bandwidth (links run concurrently, misses "
                  "split between CPU compute and PCIe streaming at the best ratio); estimate = bandwidth x efficiency "
                  "with a token's fixed GPU reads and its expert phase in sequence, plus per-layer overhead, the "
                  "hybrid handoff per MoE layer and tensor-parallel all-reduces",
    }


def link_admission(c: _Ctx, link_gbps: float, **speed_kw: Any) -> Callable[[float], float]:
    """admit(h): the fraction of a token's expert misses the host link can carry into the GPU cache at hit rate h,
    for homerun.plan.priors.hit_rate_prior. A miss enters the cache only over the link (streamed, or promoted after
    the CPU computed it: offload/cached_backend.py, when the link has a free slot), so per token the link carries at
    most link_gbps x the pcie efficiency x the estimated token time (`decode_speed` with `speed_kw` at h), over the
    miss bytes that same estimate charges."""
    link_bps = link_gbps * 1e9 * c.opts.efficiency.pcie

    def admit(h: float) -> float:
        pred = decode_speed(c, hit_rate=h, **speed_kw)
        miss = (1.0 - h) * pred["bytes_per_token"]["experts"]
        tok_s = pred["decode_tok_s"]
        return link_bps / tok_s / miss if miss > 0 and tok_s else 1.0

    return admit


def prefill_speed(c: _Ctx, *, tflops: float | None, weight_bytes_per_chunk: float, weight_gbps: float,
                  stream_bytes_per_pass: float, stream_gbps: float, stream_link: str,
                  parallel: int = 1) -> dict[str, Any]:
    """Prefill tok/s: per chunk the slowest of GPU compute and resident-weight reads, plus expert streaming amortized
    layer-wise: a layer-wise prefill streams each layer's non-cached experts once per pass over the whole prompt
    (`prefill_prompt_tokens`, default the decode depth), not once per compute chunk; the activations it keeps between
    layers are the prompt's hidden states (a few MB per thousand tokens)."""
    eff = c.opts.efficiency
    chunk = plan_chunk_tokens(c, gpu=True)
    if not tflops:
        return {"prefill_tok_s": None, "prefill_chunk_tokens": chunk,
                "prefill_reason": "the profile gives no tflops_bf16 figure, so prefill compute cannot be estimated"}
    prompt = prefill_prompt_tokens(c)
    # 2 x active params: linear_flops_per_token splits the same figure by unit for the CPU estimate; less the last
    # layer's rows that no one reads (as the CPU estimate)
    skip = prefill_skip(c, prompt)
    flops = 2.0 * c.inv.active_params_per_token - skip["routed_experts"] - skip["dense"]
    t_compute = flops * chunk / (parallel * tflops * 1e12 * eff.gpu_compute)
    t_weights = weight_bytes_per_chunk / (parallel * weight_gbps * 1e9 * eff.vram)
    t_stream_pass = (stream_bytes_per_pass / (stream_gbps * 1e9 * eff.pcie)
                     if stream_bytes_per_pass and stream_gbps else 0.0)
    t_stream = t_stream_pass * chunk / prompt  # the pass's streaming, charged per chunk of the prompt
    parts = {"compute": t_compute, "weights": t_weights, stream_link: t_stream}
    limit = max(parts, key=parts.get)
    skipped = sum(skip[k] for k in ("routed_experts", "dense"))
    skipped_note = (f", less the last layer's {skipped / 1e9:.2f} GFLOP per token of rows no one reads" if skipped
                    else "")
    return {
        "prefill_tok_s": chunk / max(parts.values()),
        "prefill_chunk_tokens": chunk,
        "prefill_prompt_tokens": prompt,
        "prefill_seconds_per_chunk": parts,
        "prefill_bottleneck": limit,
        "prefill_reason": (f"per chunk: 2 x active params x tokens FLOPs{skipped_note} at tflops_bf16 x gpu_compute "
                           "efficiency, against reading resident weights once per chunk and streaming non-cached "
                           f"experts once per layer-wise pass over the {prompt}-token prompt; attention cost at long "
                           "depth is not modeled"),
    }


def prefill_skip(c: _Ctx, prompt: int) -> dict[str, float]:
    """Per prompt token, the last layer's FLOPs a session's prefill leaves out (compute.last_layer_skip_per_token);
    none with `prefill_all_rows`."""
    if c.opts.prefill_all_rows:
        return {"routed_experts": 0.0, "dense": 0.0, "attention": 0.0, "indexer": 0.0}
    return last_layer_skip_per_token(c.spec, c.inv, prompt)


def prefill_prompt_tokens(c: _Ctx) -> int:
    """The prompt a GPU prefill estimate is for: `prefill_prompt_tokens`, default the decode depth, at least one
    chunk."""
    return max(plan_chunk_tokens(c, gpu=True), c.opts.prefill_prompt_tokens or c.opts.decode_depth_tokens)


def cpu_peaks(c: _Ctx) -> dict[str, Any]:
    """The CPU unit peaks a CPU prefill estimate uses: measured ones (`PlanOptions.cpu_peaks`, --hw auto) where given,
    else derived from the profile (homerun.plan.compute.cpu_unit_peaks)."""
    derived = cpu_unit_peaks(c.prof.cpu)
    m = c.opts.cpu_peaks
    if not m or not (m.get("int8") or m.get("fp32")):
        return derived
    return {**derived, "int8": m.get("int8"), "fp32": m.get("fp32"), "bf16": m.get("bf16"),
            "int8_unit": "measured" if m.get("int8") else None, "bf16_unit": "measured" if m.get("bf16") else None,
            "source": m.get("source") or "measured"}


def cpu_prompt_tokens(c: _Ctx) -> int:
    """The prompt a CPU prefill estimate is for: `prefill_prompt_tokens`, default the decode depth. Not floored at a
    chunk as the GPU estimate is (it reads weights once per chunk): the CPU's cost per token has no per-chunk part
    here, and a 1K prompt planned as a 2048-token one read its attention and indexer at twice the depth."""
    return max(1, c.opts.prefill_prompt_tokens or c.opts.decode_depth_tokens)


def cpu_prefill_speed(c: _Ctx) -> dict[str, Any]:
    """CPU prefill tok/s at compute speed, for a prompt of `cpu_prompt_tokens(c)` tokens on all the CPU's cores.

    Per token, each part's FLOPs (homerun.plan.compute) over its unit's peak x our kernels' measured efficiency (the
    fit for the CPU's ISA, `compute.cpu_prefill_fit`): routed experts on the int8 unit, the dense linears on bf16
    where the CPU has bf16 units (else fp32), the attention core and the V4 indexer on fp32 at the prompt's mean
    depth, plus the elementwise ops (mHC, norms, RoPE) as a measured fraction of the linears' time and the fit's fixed
    cost (once per prompt and per layer, in tokens of one layer's linears, spread over the prompt's tokens); the lm
    head, and the last layer's queries, attention output and FFN, run for the prompt's last token only
    (`prefill_skip`; every token with `prefill_all_rows`). Weight reads are not a bound here: a prompt chunk of >= 512
    rows reuses each weight it reads hundreds of times."""
    spec, inv = c.spec, c.inv
    prompt = cpu_prompt_tokens(c)
    peaks = cpu_peaks(c)
    fit, fit_reason = cpu_prefill_fit(c.prof.cpu.flags)
    chunk = plan_chunk_tokens(c, gpu=False)  # the chunk the runtime runs on the CPU (records.cpu_prefill_chunk_tokens)
    out: dict[str, Any] = {"cpu_prefill_tok_s": None, "cpu_prefill_prompt_tokens": prompt,
                           "cpu_prefill_chunk_tokens": chunk,
                           "cpu_peak_gops": {k: peaks.get(k) for k in ("int8", "fp32", "bf16")},
                           "cpu_peak_source": peaks["source"], "cpu_prefill_fit": fit.name,
                           "cpu_prefill_fit_reason": fit_reason}
    if not peaks.get("int8") or not peaks.get("fp32"):
        out["cpu_prefill_reason"] = f"no CPU compute peak ({peaks['source']}): set cpu.clock_ghz in the profile"
        return out
    lin = linear_flops_per_token(spec, inv)
    att = idx = 0.0
    for t in spec.layer_types:
        d = depth_flops_per_token(spec, t, prompt)
        att, idx = att + d["attention"], idx + d["indexer"]
    dense_unit = "bf16" if peaks.get("bf16") else "fp32"
    e_dense = fit.dense_at(chunk)
    g = 1e9
    skip = prefill_skip(c, prompt)  # the last layer's rows other than the prompt's last
    flops = {"routed_experts": lin["routed_experts"] - skip["routed_experts"], "dense": lin["dense"] - skip["dense"],
             "lm_head": lin["lm_head"] / prompt, "attention": att - skip["attention"], "indexer": idx - skip["indexer"]}
    secs = {
        "routed_experts": flops["routed_experts"] / (peaks["int8"] * g * fit.experts_int8),
        "dense": flops["dense"] / (peaks[dense_unit] * g * e_dense),
        "lm_head": flops["lm_head"] / (peaks[dense_unit] * g * e_dense),
        "attention": flops["attention"] / (peaks["fp32"] * g * fit.attention),
        "indexer": flops["indexer"] / (peaks["fp32"] * g * fit.indexer),
    }
    secs["elementwise"] = fit.elementwise_fraction * (secs["routed_experts"] + secs["dense"])
    # the fixed cost: once per prompt in tokens of a mean layer's linears (lin is all layers'), plus any per layer;
    # measured in CPU-s and sized in every row's linears, it does not shrink with the last layer's skipped rows
    fixed_tokens = fit.per_prompt_linear_tokens / len(spec.layer_types) + fit.per_layer_linear_tokens
    every_row_linears = (lin["routed_experts"] / (peaks["int8"] * g * fit.experts_int8)
                         + lin["dense"] / (peaks[dense_unit] * g * e_dense))
    secs["per_prompt"] = fixed_tokens / prompt * every_row_linears
    total = sum(secs.values())
    skipped = ("" if not sum(skip.values()) else
               f", the last layer's {sum(skip.values()) / g:.2f} GFLOP per token of rows no one reads left out")
    per_prompt = (f" and {fit.per_prompt_linear_tokens:g} tokens of one layer's linears per prompt"
                  if fit.per_prompt_linear_tokens else "")
    per_prompt += (f" and {fit.per_layer_linear_tokens:g} per layer" if fit.per_layer_linear_tokens else "")
    out.update({
        "cpu_prefill_tok_s": 1.0 / total,
        "cpu_prefill_units": {"routed_experts": "int8", "dense": dense_unit, "attention": "fp32", "indexer": "fp32"},
        "cpu_prefill_flops_per_token": flops,
        "cpu_prefill_seconds_per_token": secs,
        "cpu_prefill_efficiency": {"int8_experts": fit.experts_int8, "dense": e_dense, "attention": fit.attention,
                                   "indexer": fit.indexer, "elementwise_fraction": fit.elementwise_fraction,
                                   "per_prompt_linear_tokens": fit.per_prompt_linear_tokens,
                                   "per_layer_linear_tokens": fit.per_layer_linear_tokens,
                                   "fit": fit.name, "source": fit.source},
        "cpu_prefill_reason": (
            f"per token of a {prompt}-token prompt: experts {flops['routed_experts'] / g:.2f} GOP at int8 "
            f"{peaks['int8']:,.0f} GOP/s x {fit.experts_int8}, dense {flops['dense'] / g:.2f} GFLOP at "
            f"{dense_unit} {peaks[dense_unit]:,.0f} x {e_dense} ({chunk}-row chunks, the runtime's on the CPU), attention "
            f"{flops['attention'] / g:.2f} and indexer {flops['indexer'] / g:.2f} GFLOP at the prompt's mean depth on "
            f"fp32 {peaks['fp32']:,.0f} x {fit.attention} / {fit.indexer}, elementwise +{fit.elementwise_fraction:.0%} "
            f"of the linears{per_prompt}{skipped} (efficiencies: the {fit.name} fit, {fit.source}; {fit_reason}; "
            f"peaks: {peaks['source']})"),
    })
    return out


def add_cpu_prefill(c: _Ctx, pred: dict[str, Any], *, cpu_runs_prefill: bool) -> None:
    """Add the CPU prefill estimate to a plan's predictions and decisions. `cpu_runs_prefill` (CPU only, or one memory
    pool whose GPU has no compute figure): it becomes the plan's `prefill_tok_s`; otherwise the GPU figure stays and
    the CPU one sits beside it (what the CPU alone would do, e.g. for the hybrid path's experts)."""
    cpu = cpu_prefill_speed(c)
    pred.update(cpu)
    tok_s = cpu["cpu_prefill_tok_s"]
    c.decide("CPU prefill", "not estimated" if tok_s is None else f"{tok_s:.2f} tok/s", cpu["cpu_prefill_reason"])
    if cpu_runs_prefill:
        pred["prefill_tok_s"] = tok_s
        pred["prefill_prompt_tokens"] = cpu["cpu_prefill_prompt_tokens"]
        pred["prefill_chunk_tokens"] = cpu["cpu_prefill_chunk_tokens"]
        pred["prefill_bottleneck"] = "cpu compute" if tok_s is not None else None
        pred["prefill_reason"] = "the CPU runs prefill: " + cpu["cpu_prefill_reason"]
