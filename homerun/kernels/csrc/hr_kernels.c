/* homerun native CPU expert kernels: FP4 (e2m1 + e8m0 1x32) and FP8 (e4m3 + e8m0 128x128) GEMV/GEMM and a fused
 * routed-expert op, parallel on a persistent pthread pool, with paths picked at run time by CPU feature:
 * AVX-512 (F/BW/VL), AVX2+FMA+F16C, and portable C (ARM, Apple, anything else).
 *
 * Numerics: activations stay fp32 by default. FP4 codes are decoded through a 16-entry fp32 table (vpermps), with
 * the block's power-of-two scale added to the table's exponents where that stays exact; FP8 bytes are rebuilt as
 * fp16 bit patterns and widened with vcvtph2ps (exact, subnormals included). Products and sums are fp32, so results
 * equal fp32 dequantize-then-matmul up to summation order. Optional (HR_ACT_BF16, AVX512-BF16 CPUs): FP4 batches
 * round activations to bf16 and use vdpbf16ps on exactly decoded bf16 weights (~1.5x batch throughput, ~2e-3 error).
 *
 * Activation layout for FP4: each 32-column block is stored as its 16 even columns then its 16 odd columns, so the
 * low and high nibbles of 16 packed bytes meet contiguous activations. Public entry points take natural order and
 * reorder internally; the fused op writes its hidden activations directly in that order.
 *
 * Optional (HR_ACT_INT8, every path): FP4 weights meet int8 activations quantized per 32-column block; exact int8
 * weights from a nibble table, vpdpbusd (AVX512-VNNI) or vpmaddubsw (AVX2) integer dots, one fp32 scale step per
 * block (see the int8 section and hr_kernels.h for the exact rounding).
 *
 * Not here: NEON intrinsics (the
 * portable path is plain C the compiler may vectorize), MSVC support (the build then fails and Python falls back to
 * torch).
 */
#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE
#endif
#include "hr_kernels.h"

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* HR_NO_X86 builds the portable paths alone on x86 too (tests compile it to check non-x86 builds). */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(HR_NO_X86)
#define HR_X86 1
#include <immintrin.h>
#define HR_AVX2 __attribute__((target("avx2,fma,f16c")))
#define HR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define HR_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#else
#define HR_X86 0
#endif

#define HR_MAX_THREADS 256
#define HR_Q8T_TT 16 /* tokens per call of the AVX2 int8 rows and per tile of the one-row VNNI batch kernel q8t */
/* Tokens per call of the VNNI batch rows (hr_int8_batch.inc): a call decodes its rows once, so a per-expert batch of
 * up to 64 tokens pays one decode (16: four; benchmarks/prefill_cpu.md, session 5). Any size >= HR_Q8T_TT is exact:
 * each output is the same sequence of operations whatever the call's other tokens. */
#ifndef HR_Q8P_TT
#define HR_Q8P_TT 64
#endif
#define HR_TT 8      /* tokens per register tile */
#define HR_RC 64     /* rows per task chunk */
#define HR_FP8_BLOCK 128
#ifndef HR_TBL
#define HR_TBL 1
#endif
/* Software prefetch distance in each weight row stream: the hardware prefetchers alone left DRAM-resident GEMV
 * ~30% slower than 4 KiB ahead on Zen 4 (1 KiB: no gain; 8-16 KiB: same as 4). */
#ifndef HR_PF_BYTES
#define HR_PF_BYTES 4096
#endif
/* FP8 rows of >= HR_PF_WIDE_K columns prefetch into L2 (T1) instead: their fp32 activations (>= 8 KiB) share L1 with
 * the weight lines a T0 prefetch brings in, and at 8192 columns (32 KiB, V4's wo_b) no longer stay there; measured
 * on two Zen 4 cores, 8 KiB ahead into L2: 15 -> 25 GB/s at K = 8192, 21 -> 27 at 4096, no gain at 1024. */
#ifndef HR_PF_WIDE_K
#define HR_PF_WIDE_K 2048
#endif
#define HR_PF_WIDE_BYTES 8192
#define HR_FP8_PREFETCH(p, wide)                                                                                   \
    do {                                                                                                         \
        if (wide)                                                                                                \
            _mm_prefetch((const char *)(p) + HR_PF_WIDE_BYTES, _MM_HINT_T1);                                     \
        else                                                                                                     \
            _mm_prefetch((const char *)(p) + HR_PF_BYTES, _MM_HINT_T0);                                          \
    } while (0)

#include "hr_tables.inc"
#include "hr_pool.inc"
#include "hr_rows_portable.inc"
#if HR_X86
#include "hr_rows_avx2.inc"
#include "hr_rows_avx512.inc"
#endif /* HR_X86 */
#include "hr_int8.inc"
#include "hr_int8_batch.inc" /* the int8 batch kernels (prefill experts): predecoded rows, 4-row x 3-token tiles */
#include "hr_dispatch.inc"
#include "hr_gemm.inc"
#include "hr_moe_avx512.inc" /* the fused op's AVX-512 SwiGLU and batch-layout quantizer of h */
#include "hr_moe.inc"
#include "hr_read.inc"

/* BF16 dense weights x fp32 activations (head, compressors, routers), mHC, norm+RoPE and multi-GEMM for decode;
 * shares the pool above. */
#include "hr_dense.inc"
/* Attention: one query (decode), and prefill queries over the sliding window and the compressed rows, on the pool. */
#include "hr_attend.inc"
/* Prefill-sized mHC and norm+RoPE: the per-token kernels of hr_dense.inc over tokens on the pool. */
#include "hr_mix.inc"
/* The lightning indexer's prefill top-k: scores per page of compressed keys, running top-k per query. */
#include "hr_index.inc"

/* Prefill-sized dense support: FP8 -> bf16 weight blocks for the bf16 GEMM, measured unit peaks. */
#include "hr_prefill.inc"
