"""Choose and compose the routed-expert backend for a loaded checkpoint.

The runtime's MoE layer only knows `offload.base.ExpertBackend`; this module decides which one serves it:
- "reference": dequantize each selected expert and multiply in the compute dtype (the plain fp32 path);
- "native": the C SIMD kernels of `homerun.kernels.cpu_experts` (fused gate/up, clamped SwiGLU, down, weighted sum);
- "auto" (default): native when the kernels are built and the compute dtype is fp32, else reference.
`act` picks the native kernels' activation mode: "auto" (default) = int8 blocks where a SIMD int8 kernel exists
(~5e-3 relative error per matmul, the speed peers run at), else fp32; "fp32" is exact up to summation order.
`expert_cache_slots=N` puts a device expert cache of N slots in front (a CUDA device when one is used, otherwise a
CPU stand-in device, so offload can be exercised on any machine); misses go to the CPU backend chosen above.
`trace_path` wraps the result in a routing-trace recorder. Composition only: nothing here patches the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from homerun.errors import UsageError

EXPERT_BACKENDS = ("auto", "native", "reference")
EXPERT_ACTS = ("auto", "fp32", "int8", "bf16")


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
                act: str = "auto") -> Any:
    """The backend that computes experts on the CPU from the checkpoint's packed (mmap'd) weights."""
    from offload.base import ReferenceExpertBackend

    if kind not in EXPERT_BACKENDS:
        raise UsageError(f"unknown expert backend {kind!r}", hint=f"use one of {', '.join(EXPERT_BACKENDS)}")
    act = resolve_act(act)
    # The native kernels compute in fp32 (exact vs the fp32 reference); other compute dtypes use the reference path.
    use_native = kind == "native" or (kind == "auto" and compute_dtype == torch.float32 and native_available())
    if use_native:
        if not native_available():
            raise UsageError("the native CPU expert kernels are not built",
                             hint="reinstall with a C compiler (pip install -e .), or use --experts reference")
        from offload.cpu_backend import CpuExpertBackend

        return CpuExpertBackend(ckpt.expert, swiglu_limit=swiglu_limit, act=act)
    return ReferenceExpertBackend(ckpt.expert, swiglu_limit=swiglu_limit, compute_dtype=compute_dtype)


def build_expert_backend(
    ckpt: Any,
    *,
    n_layers: int,
    n_experts: int,
    num_hash_layers: int,
    swiglu_limit: float,
    compute_dtype: torch.dtype,
    device: str | torch.device = "cpu",
    kind: str = "auto",
    expert_cache_slots: int | None = None,
    cache_policy: str | None = None,
    trace_path: str | Path | None = None,
    top_k: int | None = None,
    model_name: str = "model",
    act: str = "auto",
) -> Any:
    backend = cpu_backend(ckpt, swiglu_limit=swiglu_limit, compute_dtype=compute_dtype, kind=kind, act=act)
    if expert_cache_slots is not None:
        if expert_cache_slots < 1:
            raise UsageError(f"expert_cache_slots must be >= 1, got {expert_cache_slots}")
        from offload.cached_backend import build_cached_backend
        from offload.devices import CudaDevice, StandInDevice

        dev = torch.device(device)
        cache_dev = CudaDevice(dev.index or 0) if dev.type == "cuda" else StandInDevice("standin:0", 1 << 62)
        backend = build_cached_backend(
            ckpt.expert, range(n_layers), n_experts, swiglu_limit=swiglu_limit,
            expert_cache_slots=expert_cache_slots, device=cache_dev, compute_dtype=compute_dtype,
            cpu_backend=backend, policy=cache_policy,
        )
    return _traced(backend, trace_path, model_name=model_name, n_layers=n_layers, n_experts=n_experts, top_k=top_k)


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
    from offload.cached_backend import LayerSplitBackend, ResidentExpertBackend, build_cached_backend
    from offload.cpu_backend import HostExpertBackend

    host = None
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
        host = host or cpu_backend(ckpt, swiglu_limit=swiglu_limit, compute_dtype=compute_dtype, kind=kind, act=act)
        if spec.expert_cache_slots:
            b = build_cached_backend(ckpt.expert, offloaded, n_experts, swiglu_limit=swiglu_limit,
                                     expert_cache_slots=spec.expert_cache_slots, device=dev,
                                     compute_dtype=compute_dtype, cpu_backend=host, policy=cache_policy)
        else:
            b = HostExpertBackend(host) if dev.torch_device.type != "cpu" else host
        by_layer.update({layer: b for layer in offloaded})
    uniq = {id(b): b for b in by_layer.values()}
    backend = next(iter(uniq.values())) if len(uniq) == 1 else LayerSplitBackend(by_layer)
    return _traced(backend, trace_path, model_name=model_name, n_layers=placement.n_layers, n_experts=n_experts,
                   top_k=top_k)
