"""Choose and compose the routed-expert backend for a loaded checkpoint.

The runtime's MoE layer only knows `offload.base.ExpertBackend`; this module decides which one serves it:
- "reference": dequantize each selected expert and multiply in the compute dtype (the plain fp32 path);
- "native": the C SIMD kernels of `homerun.kernels.cpu_experts` (fused gate/up, clamped SwiGLU, down, weighted sum);
- "auto" (default): native when the kernels are built (whatever the compute dtype: activations are converted to fp32
  at the kernels' boundary and the result back), else reference.
`act` picks the native kernels' activation mode: "auto" (default) = int8 blocks where a SIMD int8 kernel exists
(~5e-3 relative error per matmul, the speed peers run at), else fp32; "fp32" is exact up to summation order.
`build_placed_backend` composes them for a placement (a plain load is a one-device placement): a device's expert
cache (its `expert_cache_slots`) goes in front, misses go to the CPU backend chosen above. With a cache, the experts are read from the checkpoint's mmap once into the host arena (offload.host_store), and both the
CPU backend and the cache's copies read that arena: one host copy. When a CUDA GPU is driven, the native pool leaves
one core to the thread that drives it.
`trace_path` wraps the result in a routing-trace recorder. Composition only: nothing here patches the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from homerun.engine.options import EXPERT_ACTS, EXPERT_BACKENDS
from homerun.errors import UsageError


def native_available() -> bool:
    try:
        from homerun.kernels.cpu_experts import backend_info
    except ImportError:
        return False
    return bool(backend_info().get("built"))


def resolve_act(act: str = "auto") -> str:
    """The activation mode the native kernels run for `act` ("auto" -> homerun.kernels.cpu_experts.default_act())."""
    if act not in EXPERT_ACTS:
        raise UsageError(f"unknown expert activation mode {act!r}", hint=f"use one of {', '.join(EXPERT_ACTS)}")
    if act != "auto":
        return act
    try:
        from homerun.kernels.cpu_experts import default_act
    except ImportError:
        return "fp32"
    return default_act()


def cpu_backend(ckpt: Any, *, swiglu_limit: float, compute_dtype: torch.dtype, kind: str = "auto",
                act: str = "auto", source: Any = None) -> Any:
    """The backend that computes experts on the CPU from packed weights: `source` (the host arena of a store) or
    else the checkpoint's (mmap'd) experts. The native kernels serve every compute dtype: they take fp32 activations
    and CpuMoE converts at its boundary (x to fp32, the result back to x's dtype)."""
    from offload.base import ReferenceExpertBackend

    if kind not in EXPERT_BACKENDS:
        raise UsageError(f"unknown expert backend {kind!r}", hint=f"use one of {', '.join(EXPERT_BACKENDS)}")
    act = resolve_act(act)
    source = source if source is not None else ckpt.expert
    use_native = kind == "native" or (kind == "auto" and native_available())
    if use_native:
        if not native_available():
            raise UsageError("the native CPU expert kernels are not built",
                             hint="reinstall with a C compiler (pip install -e .), or use --experts reference")
        from offload.cpu_backend import CpuExpertBackend

        return CpuExpertBackend(source, swiglu_limit=swiglu_limit, act=act)
    return ReferenceExpertBackend(source, swiglu_limit=swiglu_limit, compute_dtype=compute_dtype)


def host_store(ckpt: Any, layers: Any, n_experts: int) -> Any:
    """The one host copy of the offloaded layers' routed experts (read from the checkpoint's mmap once)."""
    from offload.host_store import HostExpertStore

    return HostExpertStore(ckpt.expert, [(l, e) for l in layers for e in range(n_experts)])


def leave_core_for_gpu_driver() -> None:
    """The native expert pool leaves one core to the thread that drives the GPU (only called when one is)."""
    import os

    from homerun.kernels.cpu_experts import set_threads

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if n > 1:
        set_threads(n - 1)


def on_device(backend: Any, device: str | torch.device) -> Any:
    """A host (CPU) expert backend serving layers on torch `device`: behind a HostExpertBackend (x to the host and
    the result back) when the device is not the CPU. The one place it is wrapped."""
    from offload.cpu_backend import HostExpertBackend

    return HostExpertBackend(backend) if torch.device(device).type != "cpu" else backend


def _traced(backend: Any, trace_path: str | Path | None, *, model_name: str, n_layers: int, n_experts: int,
            top_k: int | None) -> Any:
    """`backend` behind a routing-trace recorder writing `trace_path` (unchanged without a path)."""
    if trace_path is None:
        return backend
    from offload.trace import TraceHeader, TraceRecorder, TracingBackend

    header = TraceHeader(model=model_name, n_layers=n_layers, n_experts=n_experts, top_k=top_k or 0)
    return TracingBackend(backend, TraceRecorder(trace_path, header))


def build_placed_backend(
    ckpt: Any,
    placement: Any,
    devices: dict[str, Any],
    *,
    n_experts: int,
    swiglu_limit: float,
    compute_dtype: torch.dtype,
    kind: str = "auto",
    cache_policy: str | None = None,
    trace_path: str | Path | None = None,
    top_k: int | None = None,
    model_name: str = "model",
    act: str = "auto",
) -> Any:
    """The routed-expert backend of a placed model (`homerun.engine.placement.Placement`, devices by name): per device,
    its "device" layers get a ResidentExpertBackend (every expert placed there, charged as "weights"), its "host"
    layers the CPU backend, behind an expert cache of `expert_cache_slots` on that device when the placement gives
    one (charged as "expert_cache"); a CUDA device without a cache sends x to the host and back. One backend serves
    the model directly; several go behind a LayerSplitBackend that dispatches by layer."""
    from offload.base import LayerSplitBackend
    from offload.cached_backend import CacheOptions, build_cached_backend
    from offload.resident_backend import ResidentExpertBackend

    host = store = plain = None
    cached = [s.name for s in placement.devices if s.expert_cache_slots and placement.host_expert_layers(s.name)]
    if cached:  # one host arena for every cached device's layers; the CPU backend reads it too
        layers = sorted(l for n in cached for l in placement.host_expert_layers(n))
        store = host_store(ckpt, layers, n_experts)
        host = cpu_backend(ckpt, swiglu_limit=swiglu_limit, compute_dtype=compute_dtype, kind=kind, act=act,
                           source=store)
        if any(devices[n].is_cuda for n in cached):
            leave_core_for_gpu_driver()
    by_layer: dict[int, Any] = {}
    for spec in placement.devices:
        dev = devices[spec.name]
        resident = [lp.layer for lp in placement.layers if lp.device == spec.name and lp.experts == "device"]
        if resident:
            b = ResidentExpertBackend(ckpt.expert, resident, n_experts, device=dev, swiglu_limit=swiglu_limit,
                                      compute_dtype=compute_dtype)
            by_layer.update({layer: b for layer in resident})
        offloaded = placement.host_expert_layers(spec.name)
        if not offloaded:
            continue
        if spec.expert_cache_slots:
            b = build_cached_backend(store, offloaded, n_experts, swiglu_limit=swiglu_limit, host_store=store,
                                     device=dev, compute_dtype=compute_dtype, cpu_backend=host,
                                     cache=CacheOptions(spec.expert_cache_slots, policy=cache_policy))
        else:  # layers served from the checkpoint's mmap in place (they are not in the arena)
            plain = plain or cpu_backend(ckpt, swiglu_limit=swiglu_limit, compute_dtype=compute_dtype, kind=kind,
                                         act=act)
            b = on_device(plain, dev.torch_device)
        by_layer.update({layer: b for layer in offloaded})
    uniq = {id(b): b for b in by_layer.values()}
    backend = next(iter(uniq.values())) if len(uniq) == 1 else LayerSplitBackend(by_layer)
    return _traced(backend, trace_path, model_name=model_name, n_layers=placement.n_layers, n_experts=n_experts,
                   top_k=top_k)
