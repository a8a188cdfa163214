"""One interface for the dense kernel families a model forward calls, chosen once per forward (and device).

A model asks `kernels_for(device, dtype, rows)` at the top of a forward and calls the returned set's methods:
`linear` / `grouped` / `project` (FP8 or dense weights kept as stored), `swiglu_down` (the shared expert's down
projection with its activation and the routed sum), the mHC family (`hc_weights`, `hc_pre`, `hc_post`),
`norm_rope`, `rope_out` (in place where the set may) and `rope_cos_sin`, `attend_one` / `attend_rows` (one query
over rows every head shares),
`attend_prefill` (consecutive queries over the window and the compressed rows), `index_scores` and `index_topk`
(the lightning indexer's scores of one page; its top-k over every page), `compress_close` (a decode step's closing
compressor window) and `route` (MoE routing). Sets:

- `TorchKernels` ("torch", `homerun.kernels.torch_set`): plain torch ops on any device, the reference every other
  set is tested against. `HOMERUN_KERNELS=torch` forces it on the CPU too (CI runs the
  model tests a second time that way, so the torch path cannot rot behind the native one).
- `CpuPrefillKernels` ("cpu"): the torch set plus the native Sinkhorn, prefill attention (`attend_prefill`), indexer
  top-k (`index_topk`), stream mixes and norm+RoPE (homerun.kernels.cpu_prefill, tokens on the pool), for CPU
  batches above `NATIVE_MAX_ROWS`.
- `NativeCpuKernels` ("cpu-native"): decode-sized fp32 rows on the CPU through the native library
  (`homerun.kernels.cpu_dense`): exact products, fp32 sums, one call where torch needs tens of tiny ops.
- `TritonKernels` ("triton", `homerun.kernels.triton.kernel_set`): CUDA devices and CUDA stand-ins (flavor "gpu"),
  when triton imports; the torch set otherwise.

The math is the same in every set (the torch set's methods are its definition); only where and how it runs changes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from homerun.kernels.torch_set import Linear, TorchKernels, apply_rope, rms_norm, sinkhorn  # noqa: F401 - re-exported

# Rows (tokens) up to which fp32 CPU work takes the native decode kernels; larger batches keep torch's batched and
# threaded ops (and the BLAS GEMM for the linears).
NATIVE_MAX_ROWS = 64
# The native decode set is used when built; False (or HOMERUN_KERNELS=torch) runs the torch set everywhere.
USE_NATIVE = os.environ.get("HOMERUN_KERNELS", "auto").lower() != "torch"


class CpuPrefillKernels(TorchKernels):
    """CPU batches above the decode size: torch's batched ops, with the native Sinkhorn (same passes in the same order
    without ~120 tiny ops per call)."""

    name = "cpu"

    def __init__(self, dense: Any):
        self._dense = dense

    def sinkhorn(self, comb: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        if comb.dtype != torch.float32:
            return super().sinkhorn(comb, iters, eps)
        return self._dense.sinkhorn_(comb.contiguous(), iters, eps)

    def attend_prefill(self, q, keys, key_pos0, window, comp, sel, q_pos0, rate, sink, scale):
        """The native prefill attention (homerun.kernels.cpu_prefill) for fp32 queries: no [T, H, rows] temporaries,
        query rows and heads on the pool."""
        pf = native_prefill()
        if pf is None or q.dtype != torch.float32:
            return super().attend_prefill(q, keys, key_pos0, window, comp, sel, q_pos0, rate, sink, scale)
        return pf.attend_prefill(q, keys, key_pos0, window, comp, sel, q_pos0, rate, sink, scale)

    def index_topk(self, iq, iw, pages, n_vis, thr, k_sel, scale):
        """The native indexer top-k (homerun.kernels.cpu_prefill) for fp32 CPU queries: per-query running candidate
        lists, no [q, Hi, page] temporaries, queries on the pool."""
        pf = native_prefill()
        if pf is None or iq.dtype != torch.float32 or iq.device.type != "cpu":
            return super().index_topk(iq, iw, pages, n_vis, thr, k_sel, scale)
        return pf.index_topk(iq, iw, pages, n_vis, thr, k_sel, scale)[0]

    def index_topk_one(self, iq, iw, pages, n_vis, k_sel, iw_scale, scale):
        """The decode step's indexer top-k on the same native kernel (its key ranges split over the pool, so one
        query uses every thread), fp32 CPU queries; the torch set's scores + top-k otherwise."""
        pf = native_prefill()
        if pf is None or iq.dtype != torch.float32 or iq.device.type != "cpu":
            return super().index_topk_one(iq, iw, pages, n_vis, k_sel, iw_scale, scale)
        return pf.index_topk(iq, iw.float() * iw_scale, pages, n_vis, None, k_sel, scale)[0]

    # Linears in fp32: QLinear's torch path's row blocks, FP8 blocks dequantized natively, every block multiplied on
    # oneDNN's fp32 GEMM (homerun.kernels.cpu_gemm.f32_linear: AVX-512, where F.linear's MKL runs AVX2 on AMD CPUs)
    def linear(self, lin: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            return lin.torch_forward(x)
        if x.shape[0] <= NATIVE_MAX_ROWS and x.dim() == 2:  # a few rows (the last layer's kept ones): the decode kernel
            b = lin.bound()
            if b is not None:
                return b(x)
        if lin.scale is None:
            return _dense_f32(lin, x)
        pf = native_prefill()
        if pf is None:
            return lin.torch_forward(x)
        return pf.fp8_linear(lin.weight, lin.scale, x, lin.row_block())

    def grouped(self, lin: Linear, x: torch.Tensor, groups: int) -> torch.Tensor:
        pf = native_prefill()
        if pf is None or lin.scale is None or x.dtype != torch.float32 or x.device.type != "cpu":
            return lin.torch_grouped(x, groups)
        return pf.fp8_grouped(lin.weight, lin.scale, x, groups)

    # fp32 stream mixes and norm+RoPE: the native per-token kernels over tokens split on the pool (torch's broadcast
    # temporaries over [T, n, D] cost 3-10x the CPU time at 512 tokens)
    def hc_weights(self, x, fn, scale, base, norm_eps, hc_eps, iters):
        """The decode kernel's mHC weights (same bits), tokens on the pool: torch's rms_norm wrote the [T, n, D]
        streams out normalized and its GEMM read them again."""
        pf = native_prefill()
        if pf is None or not pf.has_hc_weights() or x.dtype != torch.float32 or x.device.type != "cpu":
            return super().hc_weights(x, fn, scale, base, norm_eps, hc_eps, iters)
        return pf.hc_weights(x, fn, scale, base, norm_eps, hc_eps, iters)

    def hc_pre(self, pre, x):
        pf = native_prefill()
        return super().hc_pre(pre, x) if pf is None or x.dtype != torch.float32 else pf.hc_pre(pre, x)

    def hc_pre_norm(self, pre, x, weight, eps):
        pf = native_prefill()
        if pf is None or x.dtype != torch.float32 or x.device.type != "cpu":
            return super().hc_pre_norm(pre, x, weight, eps)
        return pf.hc_pre_norm(pre, x, weight, eps)

    def hc_post(self, post, y, comb, x):
        pf = native_prefill()
        if pf is None or x.dtype != torch.float32:
            return super().hc_post(post, y, comb, x)
        return pf.hc_post(post, y, comb, x)

    def norm_rope(self, x, weight, eps, cos=None, sin=None, *, norm=True, inverse=False):
        pf = native_prefill()
        if pf is None or x.dtype != torch.float32 or x.device.type != "cpu":
            return super().norm_rope(x, weight, eps, cos, sin, norm=norm, inverse=inverse)
        return pf.norm_rope(x, weight, eps, cos, sin, norm=norm, inverse=inverse)

    def rope_out(self, x, cos, sin, *, inverse=False):
        # in place: only the rope channels are read and written (1/8 of the attention output's bytes at V4's 64 of 512)
        pf = native_prefill()
        if pf is None or x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous():
            return super().rope_out(x, cos, sin, inverse=inverse)
        return pf.rope_inplace(x, cos, sin, inverse=inverse)


def _dense_f32(lin: Linear, x: torch.Tensor) -> torch.Tensor:
    """A dense (fp32 or bf16-stored) weight times fp32 CPU rows x, exactly: the weight widened to fp32 in one block
    (as QLinear.torch_forward does below its row block), multiplied on oneDNN's fp32 GEMM; larger bf16 weights keep
    the torch path's row blocks."""
    w = lin.weight
    if w.dtype != torch.float32 and (w.dtype != torch.bfloat16 or lin.row_block() < w.shape[0]):
        return lin.torch_forward(x)
    from homerun.kernels.cpu_gemm import f32_linear

    return f32_linear(x, w.float())


class NativeCpuKernels(CpuPrefillKernels):
    """Decode-sized fp32 rows on the CPU through the native library: linears bound once per weight, one call for a
    layer input's projections, mHC and norm+RoPE on the calling thread, one-query attention with heads on the pool."""

    name = "cpu-native"

    def linear(self, lin: Linear, x: torch.Tensor) -> torch.Tensor:
        b = lin.bound()
        return b(x) if b is not None else lin.torch_forward(x)

    def grouped(self, lin: Linear, x: torch.Tensor, groups: int) -> torch.Tensor:
        per = lin.weight.shape[0] // groups
        b = lin.bound() if lin.scale is not None and per % 128 == 0 else None
        # one kernel call for every group: one dispatch, threads balanced over all rows
        return b.grouped(x) if b is not None else lin.torch_grouped(x, groups)

    def project(self, lins: Sequence[Linear], x: torch.Tensor, multi: Any = None) -> list[torch.Tensor]:
        """One native call for every projection of an input when each weight binds (`multi` caches the binding)."""
        if len(lins) > 1 and multi is not None:
            m = multi.get(self._dense, [lin.bound() for lin in lins])
            if m is not None:
                return m(x)
        return [self.linear(lin, x) for lin in lins]

    def hc_weights(self, x, fn, scale, base, norm_eps, hc_eps, iters):
        return self._dense.hc_weights(x, fn, scale, base, norm_eps, hc_eps, iters)

    def hc_pre(self, pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._dense.hc_pre(pre, x)

    def hc_pre_norm(self, pre, x, weight, eps):  # the two decode kernels on the calling thread, not the pool's call
        return TorchKernels.hc_pre_norm(self, pre, x, weight, eps)

    def hc_post(self, post: torch.Tensor, y: torch.Tensor, comb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._dense.hc_post(post, y, comb, x)

    def norm_rope(self, x, weight, eps, cos=None, sin=None, *, norm=True, inverse=False):
        if x.dtype != torch.float32:
            return super().norm_rope(x, weight, eps, cos, sin, norm=norm, inverse=inverse)
        return self._dense.norm_rope(x, weight, eps, cos, sin, norm=norm, inverse=inverse)

    def attend_one(self, q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, scale: float) -> torch.Tensor:
        return self._dense.attend_one(q, kv, sink.reshape(-1), scale)


TORCH = TorchKernels()
_dense_module: Any = None


def native_dense() -> Any:
    """The `homerun.kernels.cpu_dense` module when its native kernels are built, else None (resolved once)."""
    global _dense_module
    if _dense_module is None:
        _dense_module = False
        try:
            from homerun.kernels import cpu_dense

            if cpu_dense.available():
                _dense_module = cpu_dense
        except Exception:  # noqa: BLE001 - no kernel: every family has a torch path
            _dense_module = False
    return _dense_module or None


_prefill_module: Any = None


def native_prefill() -> Any:
    """The `homerun.kernels.cpu_prefill` module when its native kernels are built, else None (resolved once)."""
    global _prefill_module
    if _prefill_module is None:
        _prefill_module = False
        try:
            from homerun.kernels import cpu_prefill

            if cpu_prefill.available():
                _prefill_module = cpu_prefill
        except Exception:  # noqa: BLE001 - no kernel: the torch set's ops run
            _prefill_module = False
    return _prefill_module or None


_SETS: dict[tuple[bool, bool], TorchKernels] = {}
# Kernel flavors: "auto" picks by the torch device (CUDA: the GPU set; CPU: the native or torch sets); "gpu" runs the
# GPU set whatever the tensors' device (a CUDA stand-in: CPU tensors, the Triton kernels under the interpreter).
FLAVORS = ("auto", "gpu")
_GPU_SET: list[TorchKernels | None] = []


def gpu_kernels() -> TorchKernels:
    """The GPU set: `homerun.kernels.triton.kernel_set.TritonKernels` when triton imports, else the torch set (also
    with HOMERUN_KERNELS=torch); resolved once."""
    if not USE_NATIVE:
        return TORCH
    if not _GPU_SET:
        from homerun.kernels import triton as hr_triton

        mods = hr_triton.load()
        if mods is None:
            _GPU_SET.append(None)
        else:
            from homerun.kernels.triton.kernel_set import TritonKernels

            _GPU_SET.append(TritonKernels(mods))
    return _GPU_SET[0] or TORCH


def kernels_for(device: torch.device | str, dtype: torch.dtype, rows: int, flavor: str = "auto") -> TorchKernels:
    """The kernel set for a forward over `rows` tokens in `dtype` on `device`; `flavor` (FLAVORS) is the device's
    kind of kernels as the placement says ("gpu" for CUDA stand-ins)."""
    dev_type = torch.device(device).type
    if flavor == "gpu" or dev_type == "cuda":
        return gpu_kernels()
    if dev_type != "cpu" or not USE_NATIVE:
        return TORCH
    dense = native_dense()
    if dense is None:
        return TORCH
    decode = dtype == torch.float32 and rows <= NATIVE_MAX_ROWS
    key = (decode, True)
    ks = _SETS.get(key)
    if ks is None:
        ks = _SETS[key] = NativeCpuKernels(dense) if decode else CpuPrefillKernels(dense)
    return ks


def set_native(enabled: bool) -> Callable[[], None]:
    """Switch the native sets on or off (tests compare both paths); returns a function that restores the setting."""
    global USE_NATIVE
    old = USE_NATIVE
    USE_NATIVE = bool(enabled)

    def restore() -> None:
        global USE_NATIVE
        USE_NATIVE = old

    return restore


class CpuBf16PrefillKernels(CpuPrefillKernels):
    """The CPU prefill set in the fast activation mode: FP8 and bf16 linears as bf16 GEMMs (activations rounded to
    bf16, weights exact, fp32 accumulation; homerun.kernels.cpu_gemm), ~3e-3 relative error per linear. Chosen by
    `for_act` when the expert kernels run int8 or bf16 activations; expert_act="fp32" keeps every linear exact."""

    name = "cpu-bf16"

    def __init__(self, dense: Any, gemm: Any):
        super().__init__(dense)
        self._gemm = gemm

    def linear(self, lin: Linear, x: torch.Tensor) -> torch.Tensor:
        w = lin.weight
        # fp32-kept weights and narrow outputs (the router: a flipped top-k pick costs more than its GEMM) stay exact
        if (lin.scale is None and w.dtype != torch.bfloat16) or w.shape[0] <= EXACT_MAX_OUT:
            return super().linear(lin, x)
        b = self._few_rows(lin, x)
        if b is not None:
            return _bf16_math(b, x)
        return self._gemm.prefill_linear(lin.weight, lin.scale, x).to(x.dtype)

    def grouped(self, lin: Linear, x: torch.Tensor, groups: int) -> torch.Tensor:
        if lin.scale is None and lin.weight.dtype != torch.bfloat16:
            return lin.torch_grouped(x, groups)
        b = self._few_rows(lin, x)
        if b is not None and (lin.weight.shape[0] // groups) % 128 == 0:
            return _bf16_math(b, x, grouped=True)
        return self._gemm.prefill_grouped(lin.weight, lin.scale, x, groups).to(x.dtype)

    @staticmethod
    def _few_rows(lin: Linear, x: torch.Tensor) -> Any:
        """The weight's native binding for a few fp32 CPU rows of an FP8 weight (the last layer's kept rows): its
        decode kernel reads the FP8 bytes once, where the GEMM path converts the whole weight to bf16 first."""
        if lin.scale is None or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[0] > NATIVE_MAX_ROWS:
            return None
        return lin.bound()


def _bf16_math(b: Any, x: torch.Tensor, grouped: bool = False) -> torch.Tensor:
    """The bf16 GEMM's numbers on the native FP8 kernel: x rounded to bf16; its products with the e4m3 x 2^e weights
    are exact in fp32 and summed in fp32, as in the GEMM; the output rounded to bf16 as the GEMM's is. Equal to
    prefill_linear up to summation order."""
    xb = x.to(torch.bfloat16).float()
    y = b.grouped(xb) if grouped else b(xb)
    return y.to(torch.bfloat16).float()


EXACT_MAX_OUT = 256  # linears with at most this many outputs stay fp32 in the fast set
FAST_ACTS = ("int8", "bf16")  # expert activation modes whose model runs the dense prefill GEMMs in bf16
_FAST_SET: list[TorchKernels | None] = []


def for_act(ks: TorchKernels, act: str | None) -> TorchKernels:
    """The kernel set `ks` in activation mode `act` (the expert backend's: "int8"/"bf16" fast, "fp32"/None exact):
    the CPU prefill set becomes CpuBf16PrefillKernels in a fast mode; every other set is returned as is."""
    if act not in FAST_ACTS or type(ks) is not CpuPrefillKernels:
        return ks
    if not _FAST_SET:
        fast = None
        try:
            from homerun.kernels import cpu_gemm

            if cpu_gemm.available() and cpu_gemm.bf16_units():  # emulated bf16 is slower than fp32
                fast = CpuBf16PrefillKernels(ks._dense, cpu_gemm)
        except Exception:  # noqa: BLE001 - no kernel: the exact set runs
            fast = None
        _FAST_SET.append(fast)
    return _FAST_SET[0] or ks
