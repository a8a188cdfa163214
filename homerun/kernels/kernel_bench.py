"""Kernel benchmark (not a test): this machine's DRAM read bandwidth and the CPU expert kernels' effective weight
bandwidth on V4-Flash and V4-Pro expert shapes, for `homerun bench --kernels`.

Method: every weight set cycles through 64 distinct random experts (hundreds of MB, many times the last-level cache)
so weights stream from DRAM. The DRAM read runs the native multi-threaded read kernel over a buffer of at least 8x
the LLC. Each figure is the best of a few short repetitions, and DRAM reads are interleaved with the kernel runs so
ratios compare like with like on a shared, noisy machine. Effective bandwidth counts packed weight bytes plus their
scales.

Activations: every mode the path offers is measured (`by_act`: "fp32", "int8", and "bf16" where the CPU has
AVX512-BF16). The headline keys (`fp4_gemv_gbps`, `fp4_gemv_ratio`, `fused_expert_ms`, `fp4_gemm_tok_s_b64`,
`gemm_b64_speedup`, ...) are for `act` = `cpu_experts.default_act()`, the mode the runtime uses. bf16 mode runs single
tokens in fp32, so its GEMV/fused figures are the fp32 ones; FP8 weights keep fp32 activations in every mode, so the
FP8 figures are one measurement. The `fp4_gemm_bf16_*` keys are kept for older readers.

Not here: model-level decode/prefill benchmarks (issue 8) and any pass/fail judgement.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from homerun.kernels import cpu_experts as ce
from homerun.formats.experts import ExpertWeights

# V4 expert shapes, logical [out, in]: w1/w3 then w2 (docs/deepseek-v4.md §4.2).
FLASH = {"dim": 4096, "inter": 2048}
PRO = {"dim": 7168, "inter": 3072}
FP4_SCALE_RANGE = (118, 127)  # e8m0 bytes of realistic weight scales (2^-9 .. 2^-1)


@dataclass(frozen=True)
class KernelBenchResult:
    kernel_path: str
    act: str  # the activation mode of the headline figures (default_act())
    acts: list
    int8_kernel: str
    threads: int
    cpu_info: str
    llc_bytes: int
    dram_buffer_bytes: int
    n_experts: int
    reps: int
    dram_read_gbps: float
    fp4_gemv_gbps: float
    fp4_gemv_ratio: float
    fp4_gemv_pro_gbps: float
    fp4_gemv_pro_ratio: float
    fp8_gemv_gbps: float
    fp8_gemv_ratio: float
    fused_expert_ms: float
    fused_expert_gbps: float
    fp4_gemv_tok_s: float
    fp4_gemm_tok_s_b64: float
    gemm_b64_speedup: float  # per-token throughput at batch 64 / GEMV's, same act
    fp4_gemm_bf16_tok_s_b64: float | None
    fp4_gemm_bf16_speedup_b64: float | None
    by_act: dict  # act -> the FP4/fused/FP8 figures above for that activation mode
    test_time_s: float
    note: str
    # Prefill (homerun.kernels.prefill_bench): measured unit peaks and what the prefill GEMMs reach against them.
    int8_peak_gops: float | None = None
    bf16_peak_gflops: float | None = None
    dense_prefill_gflops: float | None = None  # FP8 wo_b [4096, 8192] at 512 rows, on the unit the dispatcher picks
    expert_prefill_gops_b64: float | None = None  # fused experts, 64 tokens per expert, int8
    expert_prefill_peak_ratio_b64: float | None = None
    prefill: dict | None = None

    def to_dict(self) -> dict:
        # Older key names stay in the JSON, derived rather than stored twice.
        return {**asdict(self), "activation": self.act, "fp4_gemm_speedup_b64": self.gemm_b64_speedup}


def llc_bytes() -> int:
    """Last-level cache size from sysfs; 32 MiB when it cannot be read."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (idx / "size").read_text().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
            best = max(best, int(size.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def cpu_info() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def _fp4_matrix(out_f: int, in_f: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(-128, 128, (out_f, in_f // 2), dtype=torch.int8, generator=gen)
    scale = torch.randint(*FP4_SCALE_RANGE, (out_f, in_f // 32), dtype=torch.uint8, generator=gen)
    return codes, scale


def _fp8_matrix(out_f: int, in_f: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    mag = torch.randint(0, 0x7F, (out_f, in_f), dtype=torch.uint8, generator=gen)  # 0x7f would be NaN
    sign = torch.randint(0, 2, (out_f, in_f), dtype=torch.uint8, generator=gen) << 7
    scale = torch.randint(*FP4_SCALE_RANGE, (-(-out_f // 128), -(-in_f // 128)), dtype=torch.uint8, generator=gen)
    return mag | sign, scale


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _best(fn: Callable[[], None], reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


class _Linear:
    """y = x @ W^T through the chosen path, with the native call made directly (no per-call validation)."""

    def __init__(self, path: str):
        self.path = path
        self.lib = ce._native() if path != "torch" else None
        self._codes: dict[str, int] = {}  # act -> path code, resolved once (keeps Python out of the timing)

    def run(self, fmt: str, w: torch.Tensor, s: torch.Tensor, x: torch.Tensor, y: torch.Tensor, act: str = "fp32") -> None:
        n, k = y.shape[1], x.shape[1]
        if self.lib is None:
            if fmt == "fp4":
                y.copy_(ce.fp4_linear(x, w, s, path="torch", act=act))
            else:
                y.copy_(ce.fp8_linear(x, w, s, path="torch"))
            return
        code = self._codes.get(act)
        if code is None:
            code = self._codes[act] = ce._path_code(self.path, act)
        fn = self.lib.hr_fp4_gemm if fmt == "fp4" else self.lib.hr_fp8_gemm
        rc = fn(code, w.data_ptr(), s.data_ptr(), n, k, x.data_ptr(), x.shape[0], y.data_ptr())
        ce._check(rc, f"{fmt} GEMM")

    def read(self, buf: torch.Tensor) -> None:
        if self.lib is None:
            buf.view(torch.int64).sum()
        else:
            self.lib.hr_read_sum(ce._PATH_CODE[self.path], buf.data_ptr(), buf.numel())


def measure_dram_read_gbps(reps: int = 5) -> float:
    """This machine's DRAM read bandwidth: the native multi-threaded reader (torch sum where the kernels are not
    built) over a buffer of 8x the last-level cache (>= 256 MiB); best of `reps` passes. The one DRAM figure every
    ratio is taken against (`--hw auto`, bench limits)."""
    reader = _Linear(ce.resolve_path(None))
    buf = torch.ones(max(8 * llc_bytes(), 256 << 20), dtype=torch.uint8)
    reader.read(buf)  # fault the pages in
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        reader.read(buf)
        best = max(best, buf.numel() / (time.perf_counter() - t0) / 1e9)
    return best


def _dense_512(pre: dict | None) -> float | None:
    """GFLOP/s of the last dense shape at its largest row count, on the unit a prefill of that size runs on."""
    dense = (pre or {}).get("dense") or {}
    if not dense:
        return None
    by_rows = list(dense.values())[-1]
    rec = by_rows[max(by_rows, key=int)]
    return (rec.get(rec["dispatch"]) or {}).get("gflops")


def run_kernel_bench(*, path: str | None = None, threads: int | None = None, n_experts: int = 64, reps: int = 5,
                     progress: Callable[[str], None] | None = None) -> KernelBenchResult:
    """Measure DRAM read and kernel bandwidths; see the module docstring for the method."""
    t_start = time.perf_counter()
    say = progress or (lambda msg: None)
    p = ce.resolve_path(path)
    if threads is not None:
        ce.set_threads(threads)
    if p == "torch":
        n_experts = min(n_experts, 4)  # the fallback runs ~0.2 GB/s; a full sweep would take minutes
    lin = _Linear(p)
    gen = torch.Generator().manual_seed(0)
    d, i = FLASH["dim"], FLASH["inter"]
    llc = llc_bytes()
    dram_buf = torch.ones(max(8 * llc, 256 << 20), dtype=torch.uint8)
    dram_best = [0.0]

    def dram() -> None:
        dt = _best(lambda: lin.read(dram_buf), 2)
        dram_best[0] = max(dram_best[0], dram_buf.numel() / dt / 1e9)

    acts = ce.available_acts(p)
    head_act = ce.default_act(p)
    gemv_acts = [a for a in acts if a != "bf16"]  # bf16 mode runs single tokens in fp32

    def gemv_pass(fmt: str, mats: list[tuple[torch.Tensor, torch.Tensor]], act: str = "fp32") -> float:
        """Best pass time over all matrices; DRAM is re-measured before every pass."""
        xs = {m[0].shape[1] * (2 if fmt == "fp4" else 1) for m in mats}
        x = {k: torch.randn(1, k, generator=gen) for k in xs}
        ys = {m[0].shape[0]: torch.empty(1, m[0].shape[0]) for m in mats}
        best = float("inf")
        for _ in range(reps):
            dram()
            t0 = time.perf_counter()
            for w, s in mats:
                lin.run(fmt, w, s, x[w.shape[1] * (2 if fmt == "fp4" else 1)], ys[w.shape[0]], act)
            best = min(best, time.perf_counter() - t0)
        return best

    def flash_section() -> dict:
        """Per act: GEMV, batch-64 GEMM and the fused op on 64 V4-Flash experts; they are freed on return."""
        # V4-Flash experts: w1, w3 [2048, 4096], w2 [4096, 2048], FP4
        say(f"generating {n_experts} V4-Flash FP4 experts")
        experts = []
        for _ in range(n_experts):
            w1, w3, w2 = _fp4_matrix(i, d, gen), _fp4_matrix(i, d, gen), _fp4_matrix(d, i, gen)
            experts.append(ExpertWeights(w1[0], w1[1], w3[0], w3[1], w2[0], w2[1], "fp4"))
        mats = [(e.w1, e.w1_scale) for e in experts] + [(e.w3, e.w3_scale) for e in experts] + \
               [(e.w2, e.w2_scale) for e in experts]
        flash_bytes = sum(_nbytes(w, s) for w, s in mats)
        x64 = torch.randn(64, d, generator=gen)
        y64 = torch.empty(64, i)
        gemm_mats = [(e.w1, e.w1_scale) for e in experts]
        x1 = torch.randn(1, d, generator=gen)
        wts = torch.rand(1, 6, generator=gen)
        calls = max(1, min(30, n_experts // 6 * 3))
        ids = [torch.tensor([[(6 * c + j) % n_experts for j in range(6)]]) for c in range(calls)]
        fused_bytes = 6 * experts[0].nbytes
        res: dict[str, dict] = {}
        for act in acts:
            r: dict = {}
            if act in gemv_acts:
                say(f"FP4 GEMV, V4-Flash shapes, {act} activations")
                t_flash = gemv_pass("fp4", mats, act)
                r["fp4_gbps"] = flash_bytes / t_flash / 1e9
                r["gemv_tok_s"] = len(mats) / t_flash  # tokens/s through one [2048, 4096]-sized matrix
                say(f"fused expert op, 1 token x 6 experts, {act} activations")
                backend = ce.CpuMoE(lambda layer, e: experts[e], swiglu_limit=10.0, path=p, act=act)
                backend.forward(0, x1, ids[0], wts)  # caches the expert addresses
                r["t_fused"] = _best(lambda: [backend.forward(0, x1, ix, wts) for ix in ids], reps) / calls
            say(f"FP4 GEMM at batch 64, {act} activations")
            t_gemm = _best(lambda: [lin.run("fp4", w, s, x64, y64, act) for w, s in gemm_mats], min(2, reps))
            r["gemm_tok_s"] = 64 * len(gemm_mats) / t_gemm
            res[act] = r
        for act in acts:  # bf16: single tokens are the fp32 measurement
            for key in ("fp4_gbps", "gemv_tok_s", "t_fused"):
                res[act].setdefault(key, res["fp32"][key])
        return {"by_act": res, "fused_bytes": fused_bytes}

    fl = flash_section()
    fused_bytes = fl["fused_bytes"]

    # V4-Pro expert shapes, alternating w1 [3072, 7168] and w2 [7168, 3072]
    pro = [_fp4_matrix(PRO["inter"], PRO["dim"], gen) if j % 2 == 0 else _fp4_matrix(PRO["dim"], PRO["inter"], gen)
           for j in range(n_experts)]
    pro_bytes = sum(_nbytes(w, s) for w, s in pro)
    pro_gbps = {}
    for act in gemv_acts:
        say(f"FP4 GEMV, V4-Pro shapes ({n_experts} matrices), {act} activations")
        pro_gbps[act] = pro_bytes / gemv_pass("fp4", pro, act) / 1e9
    del pro

    # FP8 e4m3 with 128x128 scales, V4-Flash shared-expert shapes (fp32 activations in every mode)
    say(f"FP8 GEMV, V4-Flash shared-expert shapes ({n_experts} matrices)")
    fp8 = [_fp8_matrix(i, d, gen) if j % 2 == 0 else _fp8_matrix(d, i, gen) for j in range(n_experts)]
    t_fp8 = gemv_pass("fp8", fp8)
    fp8_gbps = sum(_nbytes(w, s) for w, s in fp8) / t_fp8 / 1e9
    del fp8

    dram()
    dram_gbps = dram_best[0]
    info = ce.backend_info()
    by_act = {}
    for act, r in fl["by_act"].items():
        pg = pro_gbps.get(act, pro_gbps["fp32"])
        by_act[act] = {
            "fp4_gemv_gbps": round(r["fp4_gbps"], 3),
            "fp4_gemv_ratio": round(r["fp4_gbps"] / dram_gbps, 3),
            "fp4_gemv_pro_gbps": round(pg, 3),
            "fp4_gemv_pro_ratio": round(pg / dram_gbps, 3),
            "fp8_gemv_gbps": round(fp8_gbps, 3),
            "fp8_gemv_ratio": round(fp8_gbps / dram_gbps, 3),
            "fused_expert_ms": round(r["t_fused"] * 1e3, 3),
            "fused_expert_gbps": round(fused_bytes / r["t_fused"] / 1e9, 3),
            "fp4_gemv_tok_s": round(r["gemv_tok_s"], 1),
            "fp4_gemm_tok_s_b64": round(r["gemm_tok_s"], 1),
            "gemm_b64_speedup": round(r["gemm_tok_s"] / r["gemv_tok_s"], 2),
            "single_token_act": "fp32" if act == "bf16" else act,
        }
    h = by_act[head_act]
    bf = by_act.get("bf16")
    pre: dict | None = None
    if p != "torch":
        from homerun.kernels.prefill_bench import run_prefill_bench

        pre = run_prefill_bench(reps=min(3, reps), say=say, n_experts=n_experts)
    b64 = (pre or {}).get("experts", {}).get("64", {})
    return KernelBenchResult(
        kernel_path=p,
        act=head_act,
        acts=list(acts),
        int8_kernel=str(info.get("int8_kernel", ce.int8_kernel(p))),
        threads=int(info["threads"]),
        cpu_info=cpu_info(),
        llc_bytes=llc,
        dram_buffer_bytes=dram_buf.numel(),
        n_experts=n_experts,
        reps=reps,
        dram_read_gbps=round(dram_gbps, 3),
        fp4_gemv_gbps=h["fp4_gemv_gbps"],
        fp4_gemv_ratio=h["fp4_gemv_ratio"],
        fp4_gemv_pro_gbps=h["fp4_gemv_pro_gbps"],
        fp4_gemv_pro_ratio=h["fp4_gemv_pro_ratio"],
        fp8_gemv_gbps=h["fp8_gemv_gbps"],
        fp8_gemv_ratio=h["fp8_gemv_ratio"],
        fused_expert_ms=h["fused_expert_ms"],
        fused_expert_gbps=h["fused_expert_gbps"],
        fp4_gemv_tok_s=h["fp4_gemv_tok_s"],
        fp4_gemm_tok_s_b64=h["fp4_gemm_tok_s_b64"],
        gemm_b64_speedup=h["gemm_b64_speedup"],
        fp4_gemm_bf16_tok_s_b64=None if bf is None else bf["fp4_gemm_tok_s_b64"],
        fp4_gemm_bf16_speedup_b64=None if bf is None else bf["gemm_b64_speedup"],
        by_act=by_act,
        test_time_s=round(time.perf_counter() - t_start, 1),
        int8_peak_gops=(pre or {}).get("peak_gops", {}).get("int8"),
        bf16_peak_gflops=(pre or {}).get("peak_gops", {}).get("bf16"),
        dense_prefill_gflops=_dense_512(pre),
        expert_prefill_gops_b64=b64.get("gops"),
        expert_prefill_peak_ratio_b64=b64.get("int8_peak_ratio"),
        prefill=pre,
        note=f"headline figures use act={head_act} (default_act); best of {reps} repetitions per figure (batch-64 "
             f"GEMM: {min(2, reps)}); DRAM read re-measured before each GEMV pass; tok/s figures are per "
             "[2048, 4096] FP4 matrix; FP8 keeps fp32 activations in every mode",
    )
