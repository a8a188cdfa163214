"""The planner: a pure function (ModelSpec, Inventory, HardwareProfile, PlanOptions) -> Plan, with a reason per decision.

It decides where every tensor class lives (GPU(s), host RAM, unified memory, or a disk-backed mmap), how much
VRAM is left for a GPU expert cache, how long a context the KV budget allows, and how fast decode and prefill
should run: an upper bound from the bytes each token moves over each link, and an estimate with efficiency
factors. It reads no files and touches no hardware; callers pass measured efficiencies in `PlanOptions`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from homerun.plan.inventory import Inventory
from homerun.plan.one_pool import plan_unified
from homerun.plan.placement import plan_discrete
from homerun.plan.records import (  # noqa: F401 - the planner's public records, imported from here by callers
    ALL_VRAM_MIN_CONTEXT_TOKENS, CLASS_LABELS, MIN_CONTEXT_TOKENS, RAMP_TOKENS, THINK_MAX_MIN_TOKENS,
    DeviceMap, Efficiency, ExpertPlacement, Layout, Link, PlacementRow, Plan, PlanOptions, Stage, _Ctx, gib)
from homerun.plan.specs import ModelSpec, kv_layout
from homerun.plan.speed import (  # noqa: F401 - re-exported for callers and tests
    activation_bytes, best_miss_split, cpu_kernel_from_flags, ramp)
from profiles.schema import HardwareProfile


def plan(spec: ModelSpec, inv: Inventory, prof: HardwareProfile, opts: PlanOptions | None = None) -> Plan:
    """Place the model on the profile and predict context length and speed. Pure: same inputs, same Plan."""
    opts = opts or PlanOptions()
    if opts.expert_placement is not None and (bad := opts.expert_placement.problem(spec)):
        raise ValueError(f"expert placement: {bad}")
    c = _Ctx(spec, inv, prof, opts, kv_layout(spec, opts.kv_dtype))
    return plan_unified(c) if prof.memory.unified else plan_discrete(c)


def with_distributed(p: Plan, suggestion: dict[str, Any]) -> Plan:
    return replace(p, distributed=suggestion)


def distributed_launch(spec: ModelSpec, inv: Inventory, context_tokens: int = 131072) -> dict[str, Any]:
    """A launch command for an existing distributed engine, sized from the model's bytes (TP/PP/EP)."""
    kv = kv_layout(spec, "bf16")
    need = inv.total_bytes * 1.1 + kv.bytes_for(min(context_tokens, spec.max_position_embeddings))
    options = []
    # GPU memory: H200 141 GB (saulelectric H200 page), H100 80 GB (NVIDIA H100 PCIe product brief PB-11133);
    # vLLM/SGLang reserve ~10 % by default.
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

