"""Shared pieces of the Triton kernels: exact in-kernel decoders for e4m3 / e2m1 / ue8m0 bytes, the dot helper that
stays correct under the interpreter, and the launch counter the counting tests read.

Formats (homerun/formats/quant.py):
  FP8  weight [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] ue8m0 (2^(b-127), b == 0 -> 2^-127).
  FP4  codes [N, K/2] int8, two e2m1 codes per byte, LOW nibble = even column; scale [N, K/32] ue8m0.

Weights are read as raw bytes (uint8 views) and decoded with integer bit tricks, so the kernels run in the Triton
interpreter (TRITON_INTERPRET=1, CPU tensors) and on any NVIDIA arch. Accumulation is always fp32.

Interpreter caveat (Triton 3.6 .. 3.9): tl.dot on bf16 operands multiplies the raw uint16 bit patterns. Every dot
goes through `mma`, which in interpreter mode upcasts the bf16-rounded operands to fp32 first (the same products as
a GPU bf16 MMA with fp32 accumulation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from typing import Callable, ContextManager

import torch
import triton
import triton.language as tl

_P120 = tl.constexpr(2.0**120)  # e4m3 bit trick: fp32 exponent field e means 2^(e-127); e4m3 means 2^(e-7)
_P126 = tl.constexpr(2.0**126)  # e2m1 bit trick: fp32 exponent field e means 2^(e-127); e2m1 means 2^(e-1)


def round_bf16(out: torch.Tensor) -> bool:
    """The ROUND_BF16 flag of `store_rounding` for an output tensor."""
    return out.dtype == torch.bfloat16 and interpreting()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def lighten_interpreter() -> bool:
    """Make Triton's interpreter (the CUDA stand-ins' kernels) cost what the launches compute, not its bookkeeping;
    True when applied. Two costs of Triton 3.7's interpreter, each about a third of a stand-in forward (measured on
    the tiny model: a 16-row prefill 12.0 s -> 6.0 s CPU, a decode step 1.57 s -> 0.93 s):
    - every nested @jit call (e4m3_to_f32, mma, tl.sum's combine...) re-patches triton.language, an
      inspect.getmembers walk over its modules, though the enclosing launch patched them already and keeps them
      patched until it ends: skipped when the callee sees no language module the launch has not patched;
    - every integer add/sub/mul is checked for overflow (casts to int64, compares, a device assert): a GPU build
      checks only in debug mode, and no stand-in tensor comes near 2**31 elements. Off, as on a GPU.
    Leaves the interpreter as it is when its internals are not the ones this was written against."""
    try:
        from triton.runtime import interpreter as ti
    except ImportError:  # pragma: no cover - no interpreter in this triton
        return False
    if getattr(ti._patch_lang, "homerun_light", False):
        return True
    builder = getattr(ti, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not (callable(getattr(ti, "_patch_lang", None)) and dataclasses.is_dataclass(options)
            and hasattr(options, "sanitize_overflow")):
        return False
    full = ti._patch_lang
    patched: set[int] = set()  # ids of the language modules the launch in progress patched (empty: no launch)

    class _Kept:
        def restore(self) -> None:
            pass

    def _langs(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and (v is tl or v is tl.core)}

    def patch_lang(fn):
        langs = _langs(fn)
        if patched and langs <= patched:  # a nested call inside a launch that patched these modules
            return _Kept()
        scope = full(fn)
        if patched:  # a nested call reaching another module: the launch keeps it patched too
            patched.update(langs)
            return scope
        patched.update(langs)  # the launch's own patch: forgotten when the launch restores it
        restore = scope.restore

        def restore_and_forget() -> None:
            patched.clear()
            restore()

        scope.restore = restore_and_forget
        return scope

    patch_lang.homerun_light = True  # type: ignore[attr-defined]
    ti._patch_lang = patch_lang
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True


# --------------------------------------------------------------------------------------------- decode helpers


@triton.jit
def e8m0_to_f32(b):
    """ue8m0 byte (any int type) -> 2^(b-127) in fp32, exact (b == 0 -> 2^-127, an fp32 subnormal)."""
    bi = b.to(tl.uint32)
    bits = tl.where(bi > 0, bi << 23, 1 << 22).to(tl.uint32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e4m3_to_f32(b, NATIVE: tl.constexpr):
    """float8_e4m3fn bytes (uint8) -> fp32, exact. The bit path maps the 7 magnitude bits onto fp32 bits 20..26:
    normal codes become (1+m/8)*2^(e-127), subnormal ones m*2^-129 (an fp32 subnormal), and one multiplication by
    2^120 rebiases both exactly. The NaN codes (0x7F, 0xFF) decode to +-480 instead of NaN (never written by quant)."""
    if NATIVE:
        return b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        bi = b.to(tl.uint32)
        bits = ((bi & 0x80) << 24) | ((bi & 0x7F) << 20)
        return bits.to(tl.float32, bitcast=True) * _P120


@triton.jit
def e2m1_to_f32(c):
    """e2m1 code in the low 4 bits of a uint32 (bit 3 = sign) -> fp32, exact: {0,.5,1,1.5,2,3,4,6} with sign, -0 for
    code 8. Magnitude bits onto fp32 bits 22..24 ((1+m/2)*2^(e-127), or m*2^-127 for e == 0), rebiased by 2^126."""
    bits = ((c & 8) << 28) | ((c & 7) << 22)
    return bits.to(tl.float32, bitcast=True) * _P126


@triton.jit
def mma(a, b, acc, DOT_F32: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. DOT_F32: fp32 operands, exact fp32 products (no TF32). Otherwise bf16
    operands; UPCAST (interpreter only): the same bf16-rounded values, multiplied as fp32 (the interpreter's bf16
    dot is broken)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif UPCAST:
        return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), acc,
                      input_precision="ieee")
    else:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)




@triton.jit
def store_rounding(v, ROUND_BF16: tl.constexpr):
    """fp32 values about to be stored into a bf16 tensor. The interpreter's fp32 -> bf16 store truncates (a bias that
    compounds over layers); with ROUND_BF16 (set only when interpreting) round to nearest even first, as the GPU's
    conversion does, so the truncating store is exact."""
    if ROUND_BF16:
        u = v.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.to(tl.float32, bitcast=True)
    else:
        return v

def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H200; only used for the split-K heuristic


class LaunchCounter:
    """Kernel launches made through `launch` (the counting tests read `n`; a launch is one grid of programs).
    `around`, when set, is a context-manager factory entered around each launch's run (a counting test pauses its
    op counter there: the interpreter's own tensor copies are no GPU work). `recorder`, when set, is called as
    recorder(run, args, kwargs) before each launch and returns a context manager entered around it (the CPU
    stand-in of a CUDA graph records the launch to replay it, and pauses its op recorder while it runs)."""

    n = 0
    around: Callable[[], ContextManager] | None = None
    recorder: Callable[..., ContextManager] | None = None


def launch(kernel, grid):
    """kernel[grid], counted: every launcher in this package goes through here."""
    LaunchCounter.n += 1
    run = kernel[grid]
    around, recorder = LaunchCounter.around, LaunchCounter.recorder
    if around is None and recorder is None:
        return run

    def counted(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            if recorder is not None:
                stack.enter_context(recorder(run, args, kwargs))
            if around is not None:
                stack.enter_context(around())
            return run(*args, **kwargs)

    return counted


@triton.jit
def rne_bf16(v):
    """fp32 -> the nearest bf16 value (round to nearest even), kept in fp32: the rounding a bf16 tensor's values get
    between two torch ops, done in registers (finite inputs; the same bits on the GPU and in the interpreter)."""
    u = v.to(tl.uint32, bitcast=True)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.to(tl.float32, bitcast=True)


if interpreting():
    lighten_interpreter()
