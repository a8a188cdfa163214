"""Placement for one-pool machines (unified memory: Macs, DGX Spark, Strix Halo; CPU-only hosts): every tensor in one
memory pool, experts read in place. Internal to `homerun.plan.planner` (and `placement.plan_discrete`, for hosts with no
GPU); nothing here reads files or touches hardware.

What bounds the pool is whatever runs the layers: homerun.engine.placement.placement_from_plan puts every layer of a
one-pool plan on the host CPU (there is no MPS/Metal or ROCm backend, and a unified CUDA GPU is not used), so the plan
may fill host RAM less the host reserve. A GPU's share of the pool (the Mac wired limit, iogpu.wired_limit_mb; the
Linux GTT limit) bounds only what a GPU maps, so it applies only where the GPU runs the layers.
"""

from __future__ import annotations

import math
from dataclasses import replace

from homerun.plan.records import (CLASS_LABELS, MIN_CONTEXT_TOKENS, DeviceMap, PlacementRow, Plan, Stage, _Ctx, gib,
                                  gpu_runs_prefill)
from homerun.plan.speed import (activation_bytes, add_cpu_prefill, chunk_decision, context_section, decode_speed,
                                finish, prefill_speed)
from profiles.schema import GIB, HardwareProfile


def pool_limit(prof: HardwareProfile, gpu_runs: bool) -> tuple[float, bool, str]:
    """(bytes of the pool the plan may fill, whether the GPU's limit set it, why). The host runs the layers: RAM less
    the host reserve. A GPU runs them: the smaller of that and the profile's GPU limit (memory.gpu_limit_gib)."""
    ram_gib, reserve_gib = prof.cpu.ram_gib, prof.policy.host_reserve_gib
    host = (ram_gib - reserve_gib) * GIB
    gpu_gib = prof.memory.gpu_limit_gib if prof.memory.unified else None
    if gpu_runs and gpu_gib is not None and gpu_gib * GIB < host:
        return gpu_gib * GIB, True, (f"the GPU runs the layers and may map {gpu_gib:g} GiB of the {ram_gib:g} GiB "
                                     "(its wired/GTT limit)")
    why = f"the host CPU runs every layer: {ram_gib:g} GiB of RAM less the {reserve_gib:g} GiB host reserve"
    if gpu_gib is not None:
        why += (f"; the GPU's {gpu_gib:g} GiB limit (macOS iogpu.wired_limit_mb, Linux GTT) bounds only what a GPU "
                "maps, and the GPU maps nothing here")
    return host, False, why


def pool_remedy(prof: HardwareProfile, need_bytes: float, gpu_bound: bool) -> str:
    """What to change when the pool cannot hold the weights and the minimum KV: the GPU's limit when that alone is
    short (the GPU runs the layers and RAM less the reserve would hold them), else more memory."""
    ram_gib, reserve_gib = prof.cpu.ram_gib, prof.policy.host_reserve_gib
    if gpu_bound and need_bytes <= (ram_gib - reserve_gib) * GIB:
        return (f"needs {gib(need_bytes):.0f} GiB of GPU-usable memory, the limit is {prof.memory.gpu_limit_gib:.0f} "
                f"GiB: raise it (macOS: sudo sysctl iogpu.wired_limit_mb={math.ceil(need_bytes / 2**20)})")
    return (f"needs {gib(need_bytes):.0f} GiB of memory for weights and KV, the profile has {ram_gib:.0f} GiB "
            f"({ram_gib - reserve_gib:.0f} GiB after the {reserve_gib:g} GiB host reserve)")


def plan_unified(c: _Ctx, cpu_only: bool = False) -> Plan:
    spec, inv, prof, opts = c.spec, c.inv, c.prof, c.opts
    ram = prof.cpu.ram_gib * GIB
    dev = "host" if cpu_only else "unified"
    what = "host RAM (CPU only)" if cpu_only else "unified memory"
    # the stage's layers go on the host (placement_from_plan): the CPU runs them, prefill included (its chunk)
    gpu_runs = gpu_runs_prefill([dev])
    gpus = f"; the profile's GPU ({prof.gpus[0].name}, {prof.gpus[0].mem_bw_gbps:g} GB/s) runs nothing" if (
        prof.gpus and not cpu_only) else ""
    c.decide("executor", "the CPU kernels", f"homerun runs {what} plans on the host CPU (every layer on the host "
             f"device){gpus}: decode reads at the CPU's {prof.cpu.mem_bw_gbps:g} GB/s x the DRAM efficiency, "
             "prefill at the CPU prefill fit")
    act = activation_bytes(spec, chunk_decision(c, gpu=gpu_runs))
    limit, gpu_bound, why = pool_limit(prof, gpu_runs)
    c.decide("memory limit", f"{gib(limit):.0f} GiB of {prof.cpu.ram_gib:.0f} GiB", why)
    margins = {("outside_gpu_limit" if gpu_bound else "host_reserve"): int(ram - limit),
               "runtime_overhead": int(prof.policy.runtime_overhead_gib * GIB), "activations": act}
    usable = limit - margins["runtime_overhead"] - act
    mtp = inv.mtp_bytes if opts.include_mtp else 0
    weights = inv.non_expert_bytes + inv.routed_expert_bytes + mtp
    ctx_target = min(opts.context_tokens or spec.max_position_embeddings, spec.max_position_embeddings)
    kv_cap = usable - weights
    max_tokens = min(c.kv.tokens_for(kv_cap), spec.max_position_embeddings) if kv_cap > 0 else 0
    reserved = max(0, min(ctx_target, max_tokens))
    if opts.expert_placement is not None:
        c.decide("expert placement", "not applied", f"{opts.expert_placement.describe()}: {what} is one memory pool, "
                 "there is no VRAM/CPU split to impose")
    c.decide("placement", what, "no discrete GPU: every tensor in one memory pool" if cpu_only else
             f"CPU and GPU share {prof.cpu.ram_gib:.0f} GiB: every tensor in it, read in place")
    for cls, b in sorted(inv.bytes_by_class.items(), key=lambda kv: -kv[1]):
        if cls == "mtp" and not opts.include_mtp:
            continue
        label = CLASS_LABELS.get(cls, cls) + (f" ({spec.expert_format})" if cls == "routed" else "")
        c.placement.append(PlacementRow(label, dev, b, "one pool: no copies between CPU and GPU memory"))
    kv_b = c.kv.bytes_for(reserved) if reserved else 0
    c.placement.append(PlacementRow(f"KV cache ({reserved} tokens, {c.kv.dtype})", dev, kv_b, "same pool"))
    used = weights + kv_b + sum(margins.values())
    # One pool: every layer, its KV and the experts (read in place, no copies) on the one device.
    c.stages.append(Stage(device=dev, kind=dev, index=0, first_layer=0, stop_layer=spec.num_layers, experts="host",
                          expert_cache_slots=0, kv_tokens=reserved, kv_bytes=kv_b, budget_bytes=int(usable),
                          embedding=True, head=True, reason=f"{what}: one memory pool, experts read in place"))
    c.devices.append(DeviceMap(what, dev, int(ram), int(used), margins))
    context = context_section(c, max(kv_cap, 0), reserved)
    if kv_cap < c.kv.bytes_for(MIN_CONTEXT_TOKENS):
        need = weights + c.kv.bytes_for(MIN_CONTEXT_TOKENS) + margins["runtime_overhead"] + act
        remedy = pool_remedy(prof, need, gpu_bound)
        c.decide("verdict", "does not fit", remedy)
        pred = {"decode_tok_s": None, "decode_tok_s_upper_bound": None, "prefill_tok_s": None,
                "expert_cache_hit_rate": None, "reason": "does not fit"}
        return finish(c, fits=False, mode="none", verdict=f"does not fit: {remedy}", remedy=remedy,
                      context=context, predicted=pred)
    # The CPU kernels reach the DRAM efficiency, not the GPU's VRAM one; the CPU prefill fit prefills.
    c = replace(c, opts=replace(c.opts, efficiency=replace(c.opts.efficiency, vram=c.opts.efficiency.dram)))
    resident_read = inv.non_expert_bytes - inv.bytes_by_class.get("embed", 0)
    pred = decode_speed(c, resident_bytes=resident_read, hit_rate=1.0, local_gbps=prof.cpu.mem_bw_gbps,
                        local_name="dram", pcie_gbps=0.0, dram_gbps=prof.cpu.mem_bw_gbps,
                        hit_rate_source="all experts in the same memory pool")
    pred.update(prefill_speed(c, tflops=None, weight_bytes_per_chunk=weights, weight_gbps=prof.cpu.mem_bw_gbps,
                              stream_bytes_per_pass=0, stream_gbps=0, stream_link="none"))
    add_cpu_prefill(c, pred, cpu_runs_prefill=True)
    verdict = f"fits in {what}; context up to {max_tokens:,} tokens"
    return finish(c, fits=True, mode="unified" if not cpu_only else "cpu-only", verdict=verdict, remedy=None,
                  context=context, predicted=pred)
