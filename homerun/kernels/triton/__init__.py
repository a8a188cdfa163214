"""Triton GPU kernels: the FP8 block-scaled linear (`fp8.fp8_linear`), the fused FP4 MoE decode over a slot cache
and the FP4 grouped GEMM for prefill (`moe.fp4_moe_decode`, `moe.fp4_grouped_gemm`), and the kernel set the model
runs on CUDA devices and on CUDA stand-ins (`kernel_set.TritonKernels`).

Triton is optional: CPU-only installs don't have it. This package imports without it; `available()` says whether
the kernels can run and `unavailable_reason()` why not, and `load()` returns the kernel modules. Without a CUDA
device the kernels can only run in Triton's interpreter on CPU tensors, so `load()` sets TRITON_INTERPRET=1 before
the first import of triton when torch sees no CUDA device (the variable is read when the kernels are decorated).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

_state: dict[str, object] = {}


def _interpret_default() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def load() -> SimpleNamespace | None:
    """The kernel modules (namespace with `fp8`, `moe`, `mhc`, `norm`, `attention`, `decode`, `kv_fp8`, `common`), or
    None when triton can't be imported; resolved once."""
    if "mods" not in _state:
        _state["mods"] = None
        try:
            _interpret_default()
            from homerun.kernels.triton import attention, common, decode, fp8, kv_fp8, mhc, moe, norm

            _state["mods"] = SimpleNamespace(common=common, fp8=fp8, moe=moe, mhc=mhc, norm=norm,
                                             attention=attention, decode=decode, kv_fp8=kv_fp8)
        except Exception as exc:  # noqa: BLE001 - no triton (or a broken one): the torch kernels serve instead
            _state["reason"] = f"{type(exc).__name__}: {exc}"
    return _state["mods"]  # type: ignore[return-value]


def available() -> bool:
    return load() is not None


def unavailable_reason() -> str | None:
    """Why the Triton kernels can't run here (None when they can)."""
    return None if available() else str(_state.get("reason"))


def interpreting() -> bool:
    """Whether the kernels run in Triton's interpreter (CPU tensors) rather than compiled for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launches() -> int:
    """Kernel launches made so far through this package (0 without triton)."""
    mods = load()
    return mods.common.LaunchCounter.n if mods is not None else 0
