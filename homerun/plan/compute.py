"""The planner's compute model: the FLOPs of one prompt token (linears split by the unit they run on, the attention
core and the V4 indexer at a prompt's depth), a CPU's unit peaks from its profile, and the efficiencies our CPU
kernels reach against those peaks. Pure functions of ModelSpec, Inventory and CpuSpec; `speed.py` turns them into
tok/s.

A multiply-add counts 2 operations everywhere (FLOPs for fp32/bf16, OPs for int8), as `hr_unit_peak` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from homerun.plan.inventory import Inventory
from homerun.plan.specs import ModelSpec
from profiles.schema import CpuSpec

# ---- FLOPs per prompt token ----------------------------------------------------------------------------------------


def linear_flops_per_token(spec: ModelSpec, inv: Inventory) -> dict[str, float]:
    """2 x the active parameters one token multiplies, split by where they run: `routed_experts` (top-k per MoE layer),
    `dense` (attention projections, compressors, indexer, router, shared experts, dense MLPs, mHC) and `lm_head`.
    The parts sum to 2 x `inv.active_params_per_token`, the GPU prefill estimate's figure."""
    n_exp = spec.routed_experts_total
    per_expert = inv.params_by_class.get("routed", 0) // n_exp if n_exp else 0
    routed = spec.active_experts_per_token * per_expert
    head = inv.params_by_class.get("head", 0)
    return {"routed_experts": 2.0 * routed, "dense": 2.0 * (inv.active_params_per_token - routed - head),
            "lm_head": 2.0 * head}


def mean_capped(prompt_tokens: int, rate: float = 1.0, cap: float | None = None) -> float:
    """Mean over a prompt's positions t in [0, P) of min(t / rate, cap): the keys (or compressed entries) a causal
    prompt token sees on average, in the continuous limit."""
    p = float(prompt_tokens)
    if cap is None or p / rate <= cap:
        return p / (2.0 * rate)
    return cap - cap * cap * rate / (2.0 * p)


def attention_keys_per_token(spec: ModelSpec, layer_type: str, prompt_tokens: int) -> float:
    """Mean keys one prompt token's attention core reads in a layer of `layer_type` (V4: the sliding window plus the
    CSA top-k of the 1/4-rate entries or all HCA 1/128-rate entries; others: all earlier tokens, or the window)."""
    window = spec.sliding_window or 0
    if layer_type in ("swa", "sliding"):
        return mean_capped(prompt_tokens, 1.0, window)
    if layer_type == "csa":
        return mean_capped(prompt_tokens, 1.0, window) + mean_capped(prompt_tokens, spec.csa_rate,
                                                                      spec.index_topk)
    if layer_type == "hca":
        return mean_capped(prompt_tokens, 1.0, window) + mean_capped(prompt_tokens, spec.hca_rate)
    return mean_capped(prompt_tokens)


def depth_flops_per_token(spec: ModelSpec, layer_type: str, prompt_tokens: int) -> dict[str, float]:
    """One layer's per-token FLOPs that grow with depth: the attention core (scores and weighted values, 2 x 2 x
    heads x head_dim per key: V4's 512-dim latent is both key and value) and, in a V4 CSA layer, the indexer's scoring
    of every earlier 1/4-rate entry (2 x index heads x index_head_dim per entry)."""
    attn = 4.0 * spec.num_heads * spec.head_dim * attention_keys_per_token(spec, layer_type, prompt_tokens)
    index = 0.0
    if layer_type == "csa":
        heads = int(spec.config.get("index_n_heads", spec.num_heads))
        index = 2.0 * heads * spec.index_head_dim * mean_capped(prompt_tokens, spec.csa_rate)
    return {"attention": attn, "indexer": index}


def last_layer_skip_per_token(spec: ModelSpec, inv: Inventory, prompt_tokens: int) -> dict[str, float]:
    """Per prompt token, the FLOPs a homerun prefill leaves out (issue 19): V4's last layer runs its queries, attention
    output and FFN for the prompt's last row alone (DeepseekV4.forward's out_rows); every row still feeds its KV
    window, compressors and indexer keys. By part as `linear_flops_per_token` and `depth_flops_per_token`: a mean
    layer's linears less the last layer's state projections (wkv, the compressors' wkv + wgate: 2 x head_dim wide
    in a CSA layer's overlapping ones), its attention core and indexer, x (P - 1) / P. Zero for other architectures."""
    if spec.arch != "deepseek_v4" or prompt_tokens <= 1 or not spec.layer_types:
        return {"routed_experts": 0.0, "dense": 0.0, "attention": 0.0, "indexer": 0.0}
    kind, d, hd = spec.layer_types[-1], spec.hidden_size, spec.head_dim
    state = d * hd + (2 * d * 2 * (hd + spec.index_head_dim) if kind == "csa" else 2 * d * hd if kind == "hca" else 0)
    lin, depth = linear_flops_per_token(spec, inv), depth_flops_per_token(spec, kind, prompt_tokens)
    share, n = (prompt_tokens - 1) / prompt_tokens, len(spec.layer_types)
    return {"routed_experts": share * lin["routed_experts"] / n,
            "dense": share * max(0.0, lin["dense"] / n - 2.0 * state),
            "attention": share * depth["attention"], "indexer": share * depth["indexer"]}


# ---- a CPU's unit peaks --------------------------------------------------------------------------------------------

# fp32 FLOPs per cycle per core by SIMD path: FMA pipes x lanes x 2. A profile's `fp32_flops_per_cycle` overrides it
# where the core differs (Zen 4 runs AVX-512 on 256-bit units: 32).
FP32_FLOPS_PER_CYCLE = {
    "avx512": 64.0,  # two 512-bit FMA pipes (Xeon Scalable server cores); assumption: Intel's core spec, not cited here
    "avx2": 32.0,  # two 256-bit FMA pipes: wlog.flatlib.jp Zen 3 vfpbench (fma x2, as Zen 2); measured here: 102.8
    #   GFLOP per CPU-second on one Zen 3 core, 32 x ~3.2 GHz (benchmarks/prefill_cpu.md)
    "neon": 16.0,  # assumption: two 128-bit FMA pipes (Cortex-A class); Apple and Neoverse-V cores have four, their
    #   profiles say so
}
# int8 OPs per fp32 FLOP on the same pipes, by the instruction homerun's expert kernels use:
INT8_PER_FP32 = {
    "avx512_vnni": 4.0,  # vpdpbusd: 4 u8 x s8 multiply-adds per 32-bit lane where an FMA does 1
    "avx2": 2.27,  # hr_prefill.inc's tile: two vpmaddubsw (32 products each) and one vpmaddwd per 64 products allow
    #   8/3 (3 multiply-pipe instructions against 64 / 8 FMAs); its peak loop measured 2.27 on Zen 3 (234 / 103 GOP/s
    #   on one core, benchmarks/prefill_cpu.md), and that measured loop is the peak our int8 efficiency is against
    "neon": 2.0,  # assumption: widening int8 multiply-accumulate (the portable C path; no NEON intrinsics yet)
}
# bf16 FLOPs per fp32 FLOP: vdpbf16ps does 2 bf16 multiply-adds per 32-bit lane; AMX-BF16 is a fixed figure.
BF16_PER_FP32_AVX512 = 2.0
AMX_BF16_FLOPS_PER_CYCLE = 1024.0  # aicassindra.com SIMD register page: AMX tile matmul, 1024 BF16 ops per cycle
AMX_FLAGS = ("amx", "amx_bf16", "amx_tile")


def simd_path(flags: tuple[str, ...]) -> str:
    f = {x.lower() for x in flags}
    return "avx512" if "avx512f" in f else "avx2" if "avx2" in f else "neon" if f & {"neon", "asimd"} else "portable"


def cpu_unit_peaks(cpu: CpuSpec) -> dict[str, Any]:
    """The profile CPU's int8 / fp32 / bf16 peaks in GOP/s over all cores: cores x clock_ghz x fp32 FLOPs per cycle
    (FP32_FLOPS_PER_CYCLE by SIMD path, or the profile's figure) x the unit's ratio to fp32. int8 is the unit homerun's
    FP4 expert kernels run (AVX512-VNNI with VBMI, else AVX2 maddubs; AMX-INT8 is not used by them); bf16 exists only with
    AVX512-BF16 or AMX-BF16 (oneDNN runs the dense GEMMs there). None where the profile lacks the clock."""
    f = {x.lower() for x in cpu.flags}
    path = simd_path(cpu.flags)
    per_cycle = cpu.fp32_flops_per_cycle or FP32_FLOPS_PER_CYCLE.get(path)
    out: dict[str, Any] = {"int8": None, "fp32": None, "bf16": None, "path": path, "int8_unit": None,
                           "bf16_unit": None, "fp32_flops_per_cycle": per_cycle}
    if not cpu.clock_ghz or not per_cycle:
        why = "no clock_ghz" if not cpu.clock_ghz else f"no fp32 FLOPs per cycle for the {path} path"
        out["source"] = f"profile: {why}, so no compute peak"
        return out
    fp32 = cpu.cores * cpu.clock_ghz * per_cycle
    vnni = path == "avx512" and {"avx512_vnni", "avx512vbmi"} <= f  # hr_dispatch.inc: the VNNI tile needs VBMI too
    int8_unit = "avx512_vnni" if vnni else "avx2" if path in ("avx512", "avx2") else "neon" if path == "neon" else None
    # the AVX2 tile's 256-bit instructions issue at most at two 256-bit pipes' rate, also on a 512-bit core
    tile_per_cycle = min(per_cycle, FP32_FLOPS_PER_CYCLE["avx2"]) if int8_unit == "avx2" else per_cycle
    base = cpu.cores * cpu.clock_ghz * tile_per_cycle
    out.update(fp32=fp32, int8_unit=int8_unit, int8=base * INT8_PER_FP32[int8_unit] if int8_unit else None)
    if f & set(AMX_FLAGS):
        out.update(bf16=cpu.cores * cpu.clock_ghz * AMX_BF16_FLOPS_PER_CYCLE, bf16_unit="amx_bf16")
    elif "avx512_bf16" in f:
        out.update(bf16=fp32 * BF16_PER_FP32_AVX512, bf16_unit="avx512_bf16")
    out["source"] = (f"profile: {cpu.cores} cores x {cpu.clock_ghz:g} GHz x {per_cycle:g} fp32 FLOPs/cycle "
                     f"({path}); int8 x{INT8_PER_FP32[int8_unit]:.2f} ({int8_unit})" if int8_unit else
                     f"profile: {cpu.cores} cores x {cpu.clock_ghz:g} GHz x {per_cycle:g} fp32 FLOPs/cycle ({path})")
    return out


# ---- what our CPU kernels reach --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuPrefillFit:
    """Fractions of a unit's peak our CPU prefill reaches, per part, measured on one host class (`source`)."""

    name: str  # "avx2" | "avx512": which kernels the fractions were measured on
    experts_int8: float  # the fused expert op (quantize, gate/up, SwiGLU, down over value + residual) of the int8 peak
    dense: float  # the dense FP8 prefill GEMMs at chunks of >= CPU_DENSE_MIN_ROWS rows, of the bf16 (else fp32) peak
    dense_small: float  # the same under CPU_DENSE_MIN_ROWS rows
    attention: float  # hr_attend_prefill, of the fp32 peak
    indexer: float  # the indexer's scoring + top-k, of the fp32 peak
    elementwise_fraction: float  # mHC, norms + RoPE, compressors' pooling, router and glue: a fraction of the linears' time
    source: str
    per_prompt_linear_tokens: float = 0.0  # a fixed cost per prompt worth this many tokens of one layer's linears
    per_layer_linear_tokens: float = 0.0  # a fixed cost per prompt and layer, in tokens of that layer's linears

    def dense_at(self, chunk_rows: int) -> float:
        return self.dense if chunk_rows >= CPU_DENSE_MIN_ROWS else self.dense_small


CPU_DENSE_MIN_ROWS = 512

# Each figure from benchmarks/prefill_cpu.md (2-core AVX2 Zen 3 host, per CPU-second against one core's peak):
AVX2_FIT = CpuPrefillFit(
    name="avx2",
    experts_int8=0.26,  # 8-100 tokens per expert: 0.25-0.27 of the int8 peak ("The GEMM goal"); in a real-shaped layer
    #   0.245-0.26 (by-depth table). Not the lone GEMM's 0.33-0.43: the fused op does a third more int8 work than counted
    dense=0.57,  # FP8 -> fp32 blocks + MKL at 512 rows: wo_b 0.57, wq_b 0.48 ("The GEMM goal"); a prefill chunk of
    #   >= 512 rows runs there. bf16 units (none on that host) are assumed to reach the same
    dense_small=0.25,  # the native FP8 kernel 0.24-0.27 at <= 64 rows, MKL 0.15-0.23 at 64-100 rows (same table); no
    #   row count between 100 and 512 was measured, so the lower figure holds there
    attention=0.5,  # hr_attend_prefill over a 4096-token prompt, CSA: 5.3 CPU-s for 4096 x 67 MFLOP at 102.8 GFLOP per
    #   CPU-s = 0.51; in the by-depth layer 0.42-0.46 of fp32 at 1K/8K/32K
    indexer=0.37,  # torch scoring + top-k: 0.36 at 8K, 0.38 at 32K of fp32 (by-depth table: 3.7 and 55.9 CPU-s over
    #   1,024 and 4,096 mean entries x 16,384 FLOPs per token); 0.30 at 1K where it is 0.5 %
    elementwise_fraction=0.07,  # 9 % at 1K, 6.9 % at 8K, 6.3 % at 32K (by-depth table, "mHC + norm+RoPE" + "other"
    #   over experts + dense)
    source="benchmarks/prefill_cpu.md (2-core AVX2 Zen 3)",
)
# Fitted on this project's 2-core AVX-512 host, an EPYC family 26 (Zen 5: two 512-bit FMA pipes; AVX-512 + VNNI +
# VBMI + BF16), refitted 2026-12-07 after the expert down projection (h19c) and the FP8 -> bf16 rewrite (h19d): one
# real-shaped V4-Flash CSA layer at 1K (x2) / 8K (x2) / 32K prompts, each part's FLOPs over its exclusive CPU-s x one
# core's measured unit peak per CPU-second (the 16-chain loops: int8 1081, bf16 541, fp32 273 GOP/s), pooled over the
# runs (benchmarks/prefill_fit.py; benchmarks/prefill_cpu.md, "The AVX-512 fit with a fixed cost per prompt"). The
# kernels: VNNI experts, oneDNN bf16 dense GEMMs on exact FP8 -> bf16 blocks, the AVX-512 attention
# tiles, the native indexer.
AVX512_FIT = CpuPrefillFit(
    name="avx512",
    experts_int8=0.38,  # per run: 0.37-0.38 at 1K, 0.39-0.40 at 8K, 0.38 at 32K (1024-token chunks: ~24 tokens per
    #   expert)
    dense=0.69,  # 0.58-0.61 at 1K (a fixed cost per prompt: below), 0.69-0.71 at 8K, 0.70 at 32K
    dense_small=0.25,  # not measured on AVX-512: the AVX2 figure (the CPU runs >= 512-row chunks, so it is not reached)
    attention=0.46,  # 0.47-0.49 at 1K, 0.50 at 8K, 0.44 at 32K
    indexer=0.65,  # 0.31 at 1K (1 % of the time there), 0.56 at 8K, 0.67 at 32K
    elementwise_fraction=0.08,  # mHC, norm+RoPE, pooling, router and glue over the linears: 0.18-0.19 at 1K, 0.09 at
    #   8K, 0.08 at 32K; the slope over prompts is 0.076, the rest is the fixed cost per prompt below
    source="benchmarks/prefill_cpu.md (2-core AVX-512 Zen 5, refitted 2026-12-07 after h19c and h19d)",
    per_prompt_linear_tokens=265.0,  # CPU-s = fixed + slope x tokens over 1K/8K/32K: 0.40 CPU-s per prompt (dense 0.16,
    #   glue + norm+RoPE 0.21, experts 0.03) over one layer's linears' 1.51 CPU-ms per token; once per prompt, not per
    #   layer: per_layer_linear_tokens below
    per_layer_linear_tokens=0.0,  # fixed(L) = a + b x L over 1- and 3-layer 48-expert checkpoints: b = -0.11 / +0.02
    #   CPU-s at 512 / 1024-token chunks (+-0.15 run to run), not a per-layer 0.40 (prefill_cpu.md, "per layer")
)
AVX512_FIT_FLAGS = ("avx512f", "avx512_vnni", "avx512vbmi", "avx512_bf16")  # the kernels the fit was measured on


def cpu_prefill_fit(flags: tuple[str, ...]) -> tuple[CpuPrefillFit, str]:
    """The fit for a CPU with `flags`, and why: AVX512_FIT needs every kernel it was measured on (VNNI experts, which
    also need VBMI; bf16 dense GEMMs; the AVX-512 attention tiles); any other CPU falls back to AVX2_FIT."""
    have = {x.lower() for x in flags}
    missing = [f for f in AVX512_FIT_FLAGS if f not in have]
    if not missing:
        return AVX512_FIT, f"the CPU has {' + '.join(AVX512_FIT_FLAGS)}: the fit measured on those kernels"
    return AVX2_FIT, (f"the AVX2 fit: the CPU lacks {', '.join(missing)} of the AVX-512 fit's "
                      f"{' + '.join(AVX512_FIT_FLAGS)}")
