"""Placement for the planner: discrete GPUs + host RAM (all-in-VRAM, hybrid with a GPU expert cache, disk-mmap
tier); one-pool machines (unified memory, CPU only) are in `one_pool`. Internal to `homerun.plan.planner`, which owns
the public `plan()`; the records and the speed model are in `records` and `speed`; nothing here reads files or touches
hardware.
"""

from __future__ import annotations

from dataclasses import replace

from homerun.plan.graph_memory import eager_stage_bytes, kv_rows, stage_shapes, stages_tokens_for, with_decode_graphs
from homerun.plan.one_pool import plan_unified
from homerun.plan.priors import (handoff_seconds_per_layer, hit_rate_prior, numa_estimate_gbps,
                                 page_cache_resident_fraction, tp_comm_seconds)
from homerun.plan.records import (ALL_VRAM_MIN_CONTEXT_TOKENS, MIN_CONTEXT_TOKENS, DeviceMap,
                                  PlacementRow, Plan, Stage, _Ctx, gib, gpu_runs_prefill,
                                  graphs_across_devices_reason)
from homerun.plan.staging import STAGE_BUFFERS, device_table_bytes, prefill_stage_experts
from homerun.plan.speed import (activation_bytes, add_cpu_prefill, chunk_decision, context_section, decode_speed,
                                finish, link_admission, prefill_speed)
from profiles.schema import GIB



# ---- discrete GPUs + host RAM --------------------------------------------------------------------------------------


def _split_layers(n_layers: int, usable: list[float]) -> list[int]:
    """Layers per GPU in proportion to each GPU's usable memory (pipeline split; sums to n_layers)."""
    total = sum(usable)
    counts = [int(n_layers * u / total) for u in usable]
    i = 0
    while sum(counts) < n_layers:  # hand the remainder to the roomiest GPUs first
        counts[sorted(range(len(usable)), key=lambda j: -usable[j])[i % len(usable)]] += 1
        i += 1
    return counts


def _split_layers_by_bytes(layer_bytes: list[float], usable: list[float]) -> list[int]:
    """Contiguous layers per GPU so that each GPU's share of the bytes tracks its share of usable memory: a layer goes
    to the GPU whose share its midpoint falls in. For an imposed placement, whose VRAM experts make some layers far
    heavier than others (--n-cpu-moe: the last ones), where a split by layer count would pile them on one GPU."""
    total_w, total_u = sum(layer_bytes), sum(usable)
    bounds = [total_w * sum(usable[:i + 1]) / total_u for i in range(len(usable))]
    counts = [0] * len(usable)
    acc, g = 0.0, 0
    for w in layer_bytes:
        while g < len(usable) - 1 and acc + w / 2 > bounds[g]:
            g += 1
        counts[g] += 1
        acc += w
    return counts


def plan_discrete(c: _Ctx) -> Plan:
    spec, inv, prof, opts = c.spec, c.inv, c.prof, c.opts
    gpus = prof.gpu_list
    if not gpus:
        return plan_unified(c, cpu_only=True)
    pol = prof.policy
    if len(gpus) == 1 and spec.arch == "deepseek_v4":  # the runtime captures decode graphs: charge their state
        c = replace(c, kv=with_decode_graphs(c.kv, spec))
    act = activation_bytes(spec, chunk_decision(c, gpu=gpu_runs_prefill(["gpu"])))  # the GPU stages run every layer
    margins = {"gpu_reserve": int(pol.reserve_vram_gib * GIB), "runtime_overhead": int(pol.runtime_overhead_gib * GIB),
               "activations": act}
    usable = [g.vram_gib * GIB - sum(margins.values()) for g in gpus]
    embed = inv.bytes_by_class.get("embed", 0)
    head = inv.bytes_by_class.get("head", 0)
    mtp = inv.mtp_bytes if opts.include_mtp else 0
    layer_bytes = inv.non_expert_bytes - embed - head  # per-layer tensors (attention, shared, routers, norms, ...)
    experts = inv.routed_expert_bytes
    counts = _split_layers(spec.num_layers, usable)
    n = len(gpus)
    ep = opts.expert_placement
    if ep is not None and n > 1 and 0 < ep.gpu_experts(spec, 0, spec.num_layers) < spec.routed_experts_total:
        per_layer = [layer_bytes / spec.num_layers + ep.gpu_experts(spec, i, i + 1) * inv.bytes_per_expert
                     for i in range(spec.num_layers)]
        by_bytes = _split_layers_by_bytes(per_layer, usable)
        if by_bytes != counts and all(by_bytes):
            c.decide("split", f"{n} pipeline stages, layers {by_bytes}", "imposed placement: layers split so each "
                     f"GPU's non-expert weights and imposed VRAM experts track its usable VRAM (by count: {counts})")
            counts = by_bytes
    fracs = [k / spec.num_layers for k in counts]
    resident = [layer_bytes * fracs[i] + (embed if i == 0 else 0) + (head + mtp if i == n - 1 else 0) for i in range(n)]
    ctx_target = min(opts.context_tokens or spec.max_position_embeddings, spec.max_position_embeddings)
    if opts.context_tokens and opts.context_tokens > spec.max_position_embeddings:
        c.notes.append(f"requested context {opts.context_tokens} exceeds the model's {spec.max_position_embeddings}")
    c.decide("mtp", "resident" if opts.include_mtp else "skipped",
             "kept for speculative decoding (--mtp)" if opts.include_mtp
             else f"not needed for plain decoding; saves {gib(inv.mtp_bytes):.1f} GiB")

    # All in VRAM when the experts fit too and at least 128K (or the requested context) of KV remains.
    free_all = [usable[i] - resident[i] - experts * fracs[i] for i in range(n)]
    kv_cap_all = min(free_all[i] / fracs[i] for i in range(n) if fracs[i] > 0)
    cap_tokens = None
    if shapes := stage_shapes(spec, counts):  # all in VRAM across GPUs: decode graphs, each stage its layers' state
        cap_tokens = stages_tokens_for(c.kv, fracs, shapes, free_all)  # (the KV's whole pages may hold more)
        kv_cap_all = float(c.kv.bytes_for(cap_tokens))
    # An explicit --context must fit as a whole; otherwise all-in-VRAM only needs to leave 128K of KV.
    kv_min_tokens = ctx_target if opts.context_tokens else min(ctx_target, ALL_VRAM_MIN_CONTEXT_TOKENS)
    kv_min_all = c.kv.bytes_for(kv_min_tokens)
    if ep is not None:
        # A peer's placement, imposed: the planner only checks that it fits and predicts its speed.
        starts = [sum(counts[:i]) for i in range(n)]
        on_gpu = [ep.gpu_experts(spec, starts[i], starts[i] + counts[i]) for i in range(n)]
        total = spec.routed_experts_total
        if sum(on_gpu) >= total:
            kv_min = c.kv.bytes_for(ctx_target if opts.context_tokens else MIN_CONTEXT_TOKENS)
            if kv_cap_all >= kv_min:
                c.decide("expert placement", "imposed: all in VRAM", ep.describe() + "; all experts fit in VRAM "
                         "with the non-expert set and KV")
                return _all_vram(c, gpus, counts, fracs, resident, margins, kv_cap_all, ctx_target, cap_tokens)
        c.decide("expert placement", f"imposed: {sum(on_gpu)}/{total} experts in VRAM",
                 ep.describe() + "; the VRAM experts are a static set, every other expert is computed on the CPU "
                 "(none streamed over PCIe); the planner does not choose")
        return _hybrid(c, gpus, counts, fracs, resident, margins, usable, ctx_target, imposed=on_gpu)
    if kv_cap_all >= kv_min_all:
        return _all_vram(c, gpus, counts, fracs, resident, margins, kv_cap_all, ctx_target, cap_tokens)
    c.decide("experts", "host RAM",
             f"all weights + {kv_min_tokens} tokens of KV need "
             f"{gib(experts + sum(resident) + kv_min_all):.1f} GiB, the GPUs offer {gib(sum(usable)):.1f} GiB usable")
    return _hybrid(c, gpus, counts, fracs, resident, margins, usable, ctx_target)


def _gpu_rows(c: _Ctx, gpus: tuple, counts: list[int], resident: list[float], experts_on_gpu: list[float]) -> None:
    inv, spec = c.inv, c.spec
    start = 0
    for i, g in enumerate(gpus):
        dev = f"gpu{i}"
        end = start + counts[i] - 1
        if i == 0 and inv.bytes_by_class.get("embed"):
            c.placement.append(PlacementRow("embedding", dev, inv.bytes_by_class["embed"], "first pipeline stage"))
        c.placement.append(PlacementRow(
            f"layers {start}-{end}: attention, compressors, routers, shared experts, norms", dev,
            int(resident[i] - (inv.bytes_by_class.get("embed", 0) if i == 0 else 0)
                - ((inv.bytes_by_class.get("head", 0) + (inv.mtp_bytes if c.opts.include_mtp else 0))
                   if i == len(gpus) - 1 else 0)),
            "non-expert weights run every token: keep them in the fastest memory"))
        if experts_on_gpu[i]:
            c.placement.append(PlacementRow(f"routed experts, layers {start}-{end}", dev, int(experts_on_gpu[i]),
                                         "all experts fit in VRAM: no host RAM, no PCIe traffic"))
        if i == len(gpus) - 1:
            c.placement.append(PlacementRow("lm head", dev, inv.bytes_by_class.get("head", 0), "last pipeline stage"))
            if c.opts.include_mtp and inv.mtp_bytes:
                c.placement.append(PlacementRow("MTP block", dev, inv.mtp_bytes, "speculative decoding (--mtp)"))
        start = end + 1
    if spec.arch == "deepseek_v4":
        c.notes.append("GPU-resident weights stay FP8/FP4 and are dequantized per matmul (deepseek-v4.md §4.5)")


def _gpu_stages(c: _Ctx, gpus: tuple, counts: list[int], margins: dict[str, int], *, experts: str,
                cache_slots: list[int], kv_per: list[int], graph: list[int], kv_tokens: int,
                imposed: bool = False) -> None:
    """The structured twin of _gpu_rows/_kv_rows and the cache rows: one Stage per GPU, layers in pipeline order.
    kv_per, graph: each GPU's KV and static decode state, and the latter alone (graph_memory.kv_rows)."""
    start = 0
    for i, g in enumerate(gpus):
        where = ("routed experts resident in VRAM" if experts == "device" else
                 f"imposed placement: {cache_slots[i]} experts static in VRAM, the rest computed on the CPU"
                 if imposed else
                 f"routed experts in host RAM, {cache_slots[i]}-expert cache in VRAM" if cache_slots[i] else
                 "routed experts in host RAM, no VRAM left for an expert cache")
        c.stages.append(Stage(
            device=f"gpu{i}", kind="gpu", index=i, first_layer=start, stop_layer=start + counts[i], experts=experts,
            expert_cache_slots=cache_slots[i], kv_tokens=kv_tokens, kv_bytes=kv_per[i] - graph[i],
            budget_bytes=int(g.vram_gib * GIB - sum(margins.values())), embedding=i == 0, head=i == len(gpus) - 1,
            reason=f"pipeline stage {i + 1} of {len(gpus)} ({g.name}): layers in proportion to usable VRAM; {where}",
            graph_bytes=graph[i], capacity_bytes=int(g.vram_gib * GIB)))
        start += counts[i]


def _staging_rows(c: _Ctx, gpus: tuple, usable: list[float], room: list[float], bpe: int,
                  imposed: bool = False) -> list[int]:
    """Charge each hybrid GPU the layer-wise prefill's double-buffered staging area (homerun.plan.staging: 2 x
    min(512 MiB, one layer's experts, 1/4 of the VRAM budget), whole experts) and its stage tables, capped by the VRAM
    left after KV (`room`, the slot table already out of it); the expert cache gets what remains. Returns each GPU's
    staging bytes, its stage tables included."""
    out = []
    n_exp = c.spec.n_routed_experts
    for i in range(len(gpus)):
        stage_tables = device_table_bytes(0, n_exp, staged=True)
        per = prefill_stage_experts(bpe, n_exp, int(usable[i]))
        per = min(per, int(max(room[i] - stage_tables, 0.0) // (STAGE_BUFFERS * bpe)))
        b = STAGE_BUFFERS * per * bpe
        out.append(b + (stage_tables if per else 0))
        if b:
            c.placement.append(PlacementRow(
                f"prefill staging ({STAGE_BUFFERS} x {per} experts)", f"gpu{i}", b,
                "layer-wise prefill's double-buffered uploads, apart from the decode cache: "
                "2 x min(512 MiB, a layer's experts, 1/4 of the VRAM budget)"))
            c.placement.append(PlacementRow(
                f"prefill staging tables ({STAGE_BUFFERS} x {n_exp} int32)", f"gpu{i}", stage_tables,
                "each stage's expert -> row table, read on the device by the fused prefill kernels"))
    if any(out):
        c.decide("prefill staging", f"{gib(sum(out)):.2f} GiB of VRAM",
                 f"{STAGE_BUFFERS} buffers per GPU of min(512 MiB, one layer's {c.spec.n_routed_experts} experts, 1/4 of "
                 "the VRAM budget) in whole experts, " + ("from the VRAM the imposed experts and KV leave" if imposed
                                                          else "taken from the expert cache"))
    return out


def _all_vram(c: _Ctx, gpus: tuple, counts: list[int], fracs: list[float], resident: list[float],
              margins: dict[str, int], kv_cap: float, ctx_target: int, cap_tokens: int | None = None) -> Plan:
    spec, inv, prof = c.spec, c.inv, c.prof
    n = len(gpus)
    c.decide("experts", "VRAM", f"all {gib(inv.total_bytes):.1f} GiB of weights plus >= 128K tokens of KV fit "
             f"in {n} GPU(s); host RAM holds nothing")
    c.decide("split", f"{n} pipeline stage(s)", f"layers split {counts} in proportion to usable VRAM")
    experts_on = [inv.routed_expert_bytes * f for f in fracs]
    _gpu_rows(c, gpus, counts, resident, experts_on)
    max_tokens = min(c.kv.tokens_for(kv_cap) if cap_tokens is None else cap_tokens, spec.max_position_embeddings)
    reserved_tokens = min(ctx_target, max_tokens)
    kv_per, graph = kv_rows(c, fracs, c.kv.bytes_for(reserved_tokens), reserved_tokens, stage_shapes(spec, counts))
    _gpu_stages(c, gpus, counts, margins, experts="device", cache_slots=[0] * n, kv_per=kv_per, graph=graph,
                kv_tokens=reserved_tokens)
    for i, g in enumerate(gpus):
        used = resident[i] + experts_on[i] + kv_per[i] + sum(margins.values())
        c.devices.append(DeviceMap(f"gpu{i} ({g.name})", "gpu", int(g.vram_gib * GIB), int(used), dict(margins)))
    host_m = {"host_reserve": int(prof.policy.host_reserve_gib * GIB)}
    c.devices.append(DeviceMap("host RAM", "host", int(prof.cpu.ram_gib * GIB), host_m["host_reserve"], host_m))
    c.placement.append(PlacementRow("routed experts (host copy)", "host", 0, "not needed: everything is in VRAM"))
    g0 = min(gpus, key=lambda g: g.mem_bw_gbps)  # the slowest GPU paces a tensor-parallel step
    resident_read = inv.non_expert_bytes - inv.bytes_by_class.get("embed", 0)
    comm = tp_comm_seconds(n, spec.num_layers, spec.hidden_size, g0.h2d_gbps)
    if n > 1:
        c.decide("decode parallelism", f"tensor parallel x{n}",
                 f"all weights are in VRAM: each GPU reads its 1/{n} share of every layer at once (vLLM/SGLang TP), "
                 f"paying two all-reduces per layer ({comm * 1e3:.2f} ms/token); a pipeline would read at one GPU's "
                 "bandwidth")
    pred = decode_speed(c, resident_bytes=resident_read, hit_rate=1.0, local_gbps=g0.mem_bw_gbps, local_name="vram",
                        pcie_gbps=0.0, dram_gbps=prof.cpu.mem_bw_gbps, hit_rate_source="all experts in VRAM",
                        parallel=n, comm_s=comm)
    pred.update(prefill_speed(c, tflops=g0.tflops_bf16, weight_bytes_per_chunk=inv.non_expert_bytes + inv.routed_expert_bytes,
                              weight_gbps=g0.mem_bw_gbps, stream_bytes_per_pass=0, stream_gbps=0, stream_link="pcie",
                              parallel=n))
    add_cpu_prefill(c, pred, cpu_runs_prefill=False)
    if n > 1:
        c.notes.append(f"decode and prefill speeds assume tensor parallelism over the {n} GPUs (the layout above is "
                       "the memory split); with a pipeline split one GPU's bandwidth bounds decode instead")
    verdict = (f"fits entirely in VRAM on {n} GPU(s): no experts in host RAM; "
               f"context up to {max_tokens:,} tokens")
    return finish(c, fits=True, mode="all-vram", verdict=verdict, remedy=None,
                  context=context_section(c, kv_cap, reserved_tokens, cap_tokens), predicted=pred)


def _hybrid(c: _Ctx, gpus: tuple, counts: list[int], fracs: list[float], resident: list[float],
            margins: dict[str, int], usable: list[float], ctx_target: int, imposed: list[int] | None = None) -> Plan:
    """Experts in host RAM, a GPU expert cache in the VRAM left over; or, with `imposed` (experts per GPU from an
    imposed ExpertPlacement), that static set in VRAM first and KV in what it leaves."""
    spec, inv, prof, opts = c.spec, c.inv, c.prof, c.opts
    pol = prof.policy
    n = len(gpus)
    experts = inv.routed_expert_bytes
    bpe = max(inv.bytes_per_expert, 1)
    stops = [sum(counts[:i + 1]) for i in range(n)]
    # The cache's slot table is device memory the runtime allocates next to the slots (staging.device_table_bytes).
    tables = [device_table_bytes(stops[i], spec.n_routed_experts, staged=False) for i in range(n)]
    static = [(imposed[i] if imposed else 0) * bpe for i in range(n)]
    eager_layers = sum(1 for i in range(spec.num_layers)  # layers whose experts are not all resident on their GPU
                       if not imposed or opts.expert_placement.gpu_experts(spec, i, i + 1) < spec.n_routed_experts)
    why = graphs_across_devices_reason(n, eager_layers) if spec.arch == "deepseek_v4" else None
    # no graphs: each step's new small state and its reads of the entries beside the KV, at the target context (the
    # reads grow with it, so the context reserved below, at most that, fits too)
    eager = eager_stage_bytes(spec, c.kv, counts, min(ctx_target, spec.max_position_embeddings)) if why else [0] * n
    free = [usable[i] - resident[i] - tables[i] - static[i] - eager[i] for i in range(n)]
    kv_cap = min(free[i] / fracs[i] for i in range(n) if fracs[i] > 0)
    max_tokens = max(0, min(c.kv.tokens_for(kv_cap), spec.max_position_embeddings)) if kv_cap > 0 else 0
    reserved_tokens = max(0, min(ctx_target, max_tokens))
    kv_reserved = c.kv.bytes_for(reserved_tokens) if reserved_tokens else 0
    _gpu_rows(c, gpus, counts, resident, [0.0] * n)
    kv_per, graph = kv_rows(c, fracs, kv_reserved, reserved_tokens)
    if why:
        c.decide("decode graphs", "none", f"{why}: the runtime runs decode eagerly, so no static attention state is "
                 f"charged; each GPU its eager step's {gib(max(eager)):.3f} GiB at most (its layers' new small state "
                 "and their largest read of the entries: homerun.models.eager_bytes)")
        for i in range(n):
            c.placement.append(PlacementRow(
                "eager decode step's attention state", f"gpu{i}", eager[i], "beside the KV: the step's new windows "
                "and open windows while the session holds the old ones, and its layers' largest read of the entries"))
    for i in range(n):
        c.placement.append(PlacementRow(
            f"expert slot table ({stops[i]} x {spec.n_routed_experts} int32)", f"gpu{i}", tables[i],
            "the cache's expert -> slot table, read on the device by the fused decode kernels"))
    staging = _staging_rows(c, gpus, usable, [max(0.0, free[i] - kv_per[i]) for i in range(n)], bpe,
                            imposed=bool(imposed))
    cache_bytes = [max(0.0, free[i] - kv_per[i] - staging[i]) for i in range(n)]
    layer_experts = [counts[i] * spec.n_routed_experts for i in range(n)]
    if imposed:
        cache_experts = list(imposed)
        for i in range(n):
            if cache_experts[i]:
                c.placement.append(PlacementRow(
                    f"routed experts in VRAM, imposed ({cache_experts[i]} experts)", f"gpu{i}", static[i],
                    f"imposed placement ({opts.expert_placement.describe()}): a static set, no refills"))
    else:
        cache_experts = [min(int(cache_bytes[i] // bpe), layer_experts[i]) for i in range(n)]
        for i in range(n):
            if cache_experts[i]:
                c.placement.append(PlacementRow(f"GPU expert cache ({cache_experts[i]} experts)", f"gpu{i}",
                                                cache_experts[i] * bpe, "leftover VRAM after KV for the target "
                                                "context, the prefill staging and the slot table"))
    total_cache = sum(cache_experts)
    _gpu_stages(c, gpus, counts, margins, experts="host", cache_slots=cache_experts, kv_per=kv_per, graph=graph,
                kv_tokens=reserved_tokens, imposed=bool(imposed))
    if imposed:
        c.decide("expert cache", "none (imposed placement)", f"{total_cache} experts static in VRAM as imposed; "
                 f"KV for {reserved_tokens:,} tokens in the VRAM they leave")
    else:
        c.decide("expert cache", f"{total_cache} experts", f"{gib(sum(cache_bytes)):.1f} GiB of VRAM left after the "
                 f"non-expert set and KV for {reserved_tokens:,} tokens, at {bpe / 2**20:.2f} MiB per expert")
    for i, g in enumerate(gpus):
        used = (resident[i] + tables[i] + kv_per[i] + eager[i] + staging[i] + cache_experts[i] * bpe
                + sum(margins.values()))
        c.devices.append(DeviceMap(f"gpu{i} ({g.name})", "gpu", int(g.vram_gib * GIB), int(used), dict(margins)))

    host_cap = prof.cpu.ram_gib * GIB
    host_m = {"host_reserve": int(pol.host_reserve_gib * GIB), "pinned_staging": int(pol.pinned_staging_gib * GIB)}
    host_usable = max(host_cap - sum(host_m.values()), 0)
    vram_expert_bytes = total_cache * bpe
    # A dynamic GPU cache keeps a host copy of every expert (a slot can be refilled with any expert). When RAM cannot
    # hold them all, the experts in VRAM become a static set with no host copy, and the host holds only the rest.
    # An imposed placement's VRAM experts are static too (llama.cpp, KTransformers: no host copy once loaded).
    vram_only = (experts > host_usable or bool(imposed)) and vram_expert_bytes > 0
    tier = experts - vram_expert_bytes if vram_only else experts  # expert bytes the host must serve
    in_ram = min(tier, host_usable)
    on_disk = tier - in_ram
    if vram_only and not imposed:
        c.decide("VRAM experts", f"static, VRAM only ({gib(vram_expert_bytes):.1f} GiB)",
                 f"host RAM ({gib(host_usable):.0f} GiB usable) cannot also hold copies of all {gib(experts):.0f} GiB "
                 "of experts: the GPU's experts stay put (no host copy, no refills); the host holds the rest")
    gpu_short = min(free[i] - c.kv.bytes_for(MIN_CONTEXT_TOKENS) * fracs[i] for i in range(n)) < 0
    c.placement.append(PlacementRow(f"routed experts ({spec.routed_experts_total} x {bpe:,} B, {spec.expert_format})"
                                 + (" not held in VRAM" if vram_only else ""),
                                 "host", int(in_ram), "the experts the imposed placement leaves on the CPU, computed "
                                 "there" if imposed and c.opts.cpu_experts else
                                 "primary copy at stored precision; misses are computed on the "
                                 "CPU or streamed over PCIe" if c.opts.cpu_experts else
                                 "primary copy at stored precision; misses are streamed over PCIe (no CPU experts)"))
    remedy = None
    mode = "hybrid"
    page_hit = 1.0
    if on_disk > 0:
        if opts.allow_disk:
            mode = "disk-mmap"
            page_hit = page_cache_resident_fraction(host_usable, tier)
            c.placement.append(PlacementRow("routed experts (mmap from disk)", "disk", int(on_disk),
                                         "host RAM is short: pages come from disk on demand (slow)"))
            c.devices.append(DeviceMap("disk (mmap)", "disk", int(on_disk), int(on_disk), {}))
            c.decide("disk tier", "on", f"{gib(on_disk):.0f} GiB of experts do not fit in RAM; --allow-disk given")
            c.decide("page cache", f"{page_hit:.0%} of host expert reads from RAM",
                     f"the {gib(tier):.0f} GiB tier is read through a {gib(host_usable):.0f} GiB page cache that keeps "
                     "the most recently used pages; experts recur ~n/k tokens apart, so a read finds its page resident "
                     "with probability cache/tier and faults it in from disk otherwise")
        else:
            remedy = (f"needs {gib(tier):.0f} GiB of host RAM for experts, the profile has "
                      f"{prof.cpu.ram_gib:.0f} GiB")
    c.devices.append(DeviceMap("host RAM", "host", int(host_cap), int(in_ram + sum(host_m.values())), host_m))
    if gpu_short and imposed:
        worst = min(range(n), key=lambda i: free[i] - c.kv.bytes_for(MIN_CONTEXT_TOKENS) * fracs[i])
        need = (resident[worst] + tables[worst] + static[worst] + c.kv.bytes_for(MIN_CONTEXT_TOKENS) * fracs[worst]
                + sum(margins.values()))
        flag = "raise --n-cpu-moe" if opts.expert_placement.cpu_moe_layers is not None else "lower --gpu-experts"
        vram = (f"the imposed placement ({opts.expert_placement.describe()}) needs {gib(need):.1f} GiB of VRAM on "
                f"gpu{worst} for its {imposed[worst]} experts, the non-expert set, {MIN_CONTEXT_TOKENS} tokens of KV and "
                f"margins, the GPU has {gpus[worst].vram_gib:.0f} GiB: {flag}")
        remedy = f"{remedy}; it also {vram}" if remedy else vram
    elif gpu_short:
        need = max(resident) + c.kv.bytes_for(MIN_CONTEXT_TOKENS) + sum(margins.values())
        vram = (f"needs {gib(need):.1f} GiB of VRAM per GPU for the non-expert set, {MIN_CONTEXT_TOKENS} tokens of "
                f"KV and margins, the GPU has {gpus[0].vram_gib:.0f} GiB")
        remedy = f"{remedy}; it also {vram}" if remedy else vram
    context = context_section(c, kv_cap, reserved_tokens)
    if remedy:
        c.decide("verdict", "does not fit", remedy)
        pred = {"decode_tok_s": None, "decode_tok_s_upper_bound": None, "prefill_tok_s": None,
                "expert_cache_hit_rate": None, "reason": "does not fit"}
        return finish(c, fits=False, mode="none", verdict=f"does not fit: {remedy}", remedy=remedy,
                      context=context, predicted=pred)
    g0 = gpus[0]
    numa = prof.cpu.numa_nodes
    dram_est = numa_estimate_gbps(prof.cpu.mem_bw_gbps, numa)
    handoff = handoff_seconds_per_layer(spec.hidden_size, g0.h2d_gbps)
    resident_read = inv.non_expert_bytes - inv.bytes_by_class.get("embed", 0)
    speed_kw = dict(resident_bytes=resident_read, local_gbps=g0.mem_bw_gbps, local_name="vram",
                    pcie_gbps=g0.h2d_gbps, dram_gbps=prof.cpu.mem_bw_gbps, disk_fraction=1.0 - page_hit,
                    disk_gbps=prof.disk.read_gbps, handoff_s=handoff, estimate_dram_gbps=dram_est,
                    cpu_misses_only=bool(imposed) and opts.cpu_experts)
    if opts.hit_rate is not None:
        hit, src = opts.hit_rate, "--hit-rate"
    elif imposed:
        hit = total_cache / spec.routed_experts_total if spec.routed_experts_total else 0.0
        src = (f"imposed placement ({opts.expert_placement.describe()}): {total_cache}/{spec.routed_experts_total} "
               "experts static in VRAM; each MoE layer routes the same top-k, so picks land there at their share "
               "(for --gpu-experts: a set chosen without a popularity profile)")
    elif vram_only:
        hit = min(1.0, vram_expert_bytes / experts) if experts else 0.0
        src = (f"static VRAM-only experts: {total_cache}/{spec.routed_experts_total} chosen without a popularity "
               "profile are hit at their share of the experts")
    else:  # one link's worth: each GPU refills its own layers' cache over its own link, and promotes a CPU-computed
        # miss only while its own layers run (offload/cache.py prefetch: a free in-flight slot on its own engine);
        # the stages run one after another, so GPU i carries its layers' share of the misses in the same share of
        # the token time, as decode_speed streams them over one link
        hit, src = hit_rate_prior(spec, total_cache, admit=link_admission(c, g0.h2d_gbps, **speed_kw))
    if numa > 1 and c.opts.cpu_experts:
        c.decide("NUMA", f"{numa} nodes: estimate at {dram_est:.0f} GB/s",
                 f"experts spread over {numa} nodes are read mostly across the socket link; the bound keeps "
                 f"{prof.cpu.mem_bw_gbps:.0f} GB/s, which NUMA-aware placement reaches")
    c.decide("per-layer handoff", f"{handoff * 1e6:.0f} us per MoE layer",
             "each layer waits for its router on the GPU, sends activations and expert ids to the host, wakes the "
             "CPU pool, returns the expert output and restarts the GPU (homerun.plan.priors)")
    pred = decode_speed(c, hit_rate=hit, hit_rate_source=src, **speed_kw)
    stream = experts - vram_expert_bytes
    # Streamed bytes cross PCIe, and the part the page cache misses also comes off the disk first.
    t_stream = stream / (g0.h2d_gbps * 1e9) + ((1 - page_hit) * tier / (prof.disk.read_gbps * 1e9) if on_disk else 0.0)
    pred.update(prefill_speed(c, tflops=g0.tflops_bf16, weight_bytes_per_chunk=inv.non_expert_bytes + vram_expert_bytes,
                              weight_gbps=g0.mem_bw_gbps, stream_bytes_per_pass=stream,
                              stream_gbps=stream / t_stream / 1e9 if t_stream else 0.0, stream_link="expert_streaming"))
    add_cpu_prefill(c, pred, cpu_runs_prefill=False)
    where = "host RAM" if mode == "hybrid" else "host RAM + disk mmap (slow)"
    verdict = (f"fits: non-expert set, KV and {total_cache} imposed static experts on GPU, the other routed experts "
               f"in {where}; context up to {max_tokens:,} tokens" if imposed else
               f"fits: non-expert set, KV and a {total_cache}-expert cache on GPU, routed experts in {where}; "
               f"context up to {max_tokens:,} tokens")
    return finish(c, fits=True, mode=mode, verdict=verdict, remedy=None, context=context, predicted=pred)
