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
 * weights from a nibble table, vpdpbusd (AVX512-VNNI) or vpmaddubsw (AVX2) integer dots, one fp32 scale multiply per
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

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define HR_X86 1
#include <immintrin.h>
#define HR_AVX2 __attribute__((target("avx2,fma,f16c")))
#define HR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define HR_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#else
#define HR_X86 0
#endif

#define HR_MAX_THREADS 256
#define HR_Q8T_TT 16 /* tokens per call of the int8 batch kernel (one decoded weight chunk feeds 16 dot products) */
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

/* ------------------------------------------------------------------------------------------------ tables */

static const float FP4_LUT[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                  -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
static float g_e8m0[256]; /* ue8m0 byte -> 2^(b-127); b = 0 is the subnormal 2^-127 */
static float g_fp8[256];  /* e4m3fn byte -> value (0x7f/0xff are NaN, never valid weights) */
static int32_t g_exp_delta[256]; /* e8m0 byte -> (b - 127) << 23, the fp32 exponent-field offset of its scale */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static void pool_atfork_child(void);

static void init_tables(void) {
    for (int b = 0; b < 256; b++) {
        g_e8m0[b] = bits_to_float(b ? (uint32_t)b << 23 : 1u << 22);
        g_exp_delta[b] = (int32_t)((uint32_t)(b - 127) << 23);
        int e = (b >> 3) & 15, m = b & 7;
        float v = e == 0 ? ldexpf((float)m, -9) : ldexpf(1.0f + m / 8.0f, e - 7);
        if ((b & 0x7f) == 0x7f) v = NAN;
        g_fp8[b] = (b & 0x80) ? -v : v;
    }
    pthread_atfork(NULL, NULL, pool_atfork_child);
}

static void hr_init(void) { pthread_once(&g_once, init_tables); }

/* ------------------------------------------------------------------------------------------- thread pool */

typedef void (*hr_task_fn)(void *ctx, int64_t task);

static struct {
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    pthread_t th[HR_MAX_THREADS];
    int nworkers, started, stop, nthreads;
    atomic_uint gen;
    atomic_int pending;
    hr_task_fn fn;
    void *ctx;
    int64_t ntasks;
    atomic_llong next;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};
static pthread_mutex_t g_run_mu = PTHREAD_MUTEX_INITIALIZER; /* one parallel region at a time */

static int default_threads(void) {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n < HR_MAX_THREADS ? n : HR_MAX_THREADS;
    }
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1) n = 1;
    return n < HR_MAX_THREADS ? (int)n : HR_MAX_THREADS;
}

static void run_tasks(void) {
    int64_t i;
    while ((i = atomic_fetch_add(&P.next, 1)) < P.ntasks) P.fn(P.ctx, i);
}

/* Back-to-back kernel calls (a decode step's GEMVs) hand work over by a short spin instead of a futex wake-up, which
 * cost ~10-50 us per call on a VM. The spin is bounded in time (hr_set_spin_us): short by default, so idle threads
 * leave the cores to the rest of the process; the runtime lengthens it for decode steps whose torch ops run on one
 * thread, where the workers would otherwise sleep through every gap between two kernels. */
#ifndef HR_SPIN_US
#define HR_SPIN_US 50
#endif
static atomic_int g_spin_us = HR_SPIN_US;
static inline void hr_pause(void) {
#if HR_X86
    _mm_pause();
#endif
}
static inline int64_t hr_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
/* Spin while *word != 0 (an atomic counter, or with is_gen the generation still equal to val) for at most the
 * configured time; the caller then sleeps on its condition variable if it still has to wait. */
static void spin_while(void *word, int is_gen, unsigned val) {
    int us = atomic_load_explicit(&g_spin_us, memory_order_relaxed);
    if (us <= 0) return;
    int64_t end = hr_now_ns() + (int64_t)us * 1000;
    for (unsigned i = 1;; i++) {
        if (is_gen ? atomic_load_explicit((atomic_uint *)word, memory_order_acquire) != val
                   : atomic_load_explicit((atomic_int *)word, memory_order_acquire) <= 0)
            return;
        hr_pause();
        if (!(i & 31) && hr_now_ns() > end) return;
    }
}

int hr_set_spin_us(int us) {
    return atomic_exchange(&g_spin_us, us < 0 ? 0 : (us > 1000000 ? 1000000 : us));
}

static void *worker_main(void *arg) {
    (void)arg;
    unsigned seen = 0;
    pthread_mutex_lock(&P.mu);
    for (;;) {
        if (P.gen == seen && !P.stop) {
            pthread_mutex_unlock(&P.mu);
            spin_while(&P.gen, 1, seen);
            pthread_mutex_lock(&P.mu);
        }
        while (P.gen == seen && !P.stop) pthread_cond_wait(&P.work_cv, &P.mu);
        if (P.stop) break;
        seen = P.gen;
        pthread_mutex_unlock(&P.mu);
        run_tasks();
        pthread_mutex_lock(&P.mu);
        if (--P.pending == 0) pthread_cond_signal(&P.done_cv);
    }
    pthread_mutex_unlock(&P.mu);
    return NULL;
}

static void pool_stop_locked(void) { /* caller holds g_run_mu */
    if (!P.started) return;
    pthread_mutex_lock(&P.mu);
    P.stop = 1;
    pthread_cond_broadcast(&P.work_cv);
    pthread_mutex_unlock(&P.mu);
    for (int i = 0; i < P.nworkers; i++) pthread_join(P.th[i], NULL);
    P.nworkers = 0;
    P.started = 0;
    P.stop = 0;
}

static void pool_start_locked(void) {
    if (P.started) return;
    if (P.nthreads <= 0) P.nthreads = default_threads();
    P.nworkers = 0;
    for (int i = 0; i < P.nthreads - 1; i++) {
        if (pthread_create(&P.th[P.nworkers], NULL, worker_main, NULL) != 0) break;
        P.nworkers++;
    }
    P.started = 1;
}

static void pool_atfork_child(void) {
    /* Worker threads do not survive fork(); the child starts a fresh pool on first use. */
    pthread_mutex_init(&P.mu, NULL);
    pthread_cond_init(&P.work_cv, NULL);
    pthread_cond_init(&P.done_cv, NULL);
    pthread_mutex_init(&g_run_mu, NULL);
    P.started = 0;
    P.nworkers = 0;
    P.stop = 0;
}

static void hr_parallel(hr_task_fn fn, void *ctx, int64_t ntasks) {
    if (ntasks <= 0) return;
    pthread_mutex_lock(&g_run_mu);
    if (P.nthreads <= 0) P.nthreads = default_threads();
    if (P.nthreads == 1 || ntasks == 1) {
        for (int64_t i = 0; i < ntasks; i++) fn(ctx, i);
        pthread_mutex_unlock(&g_run_mu);
        return;
    }
    pool_start_locked();
    pthread_mutex_lock(&P.mu);
    P.fn = fn;
    P.ctx = ctx;
    P.ntasks = ntasks;
    atomic_store(&P.next, 0);
    P.pending = P.nworkers;
    P.gen++;
    pthread_cond_broadcast(&P.work_cv);
    pthread_mutex_unlock(&P.mu);
    run_tasks();
    spin_while(&P.pending, 0, 0);
    pthread_mutex_lock(&P.mu);
    while (P.pending > 0) pthread_cond_wait(&P.done_cv, &P.mu);
    pthread_mutex_unlock(&P.mu);
    pthread_mutex_unlock(&g_run_mu);
}

int hr_get_threads(void) {
    pthread_mutex_lock(&g_run_mu);
    if (P.nthreads <= 0) P.nthreads = default_threads();
    int n = P.nthreads;
    pthread_mutex_unlock(&g_run_mu);
    return n;
}

int hr_set_threads(int n) {
    hr_init();
    pthread_mutex_lock(&g_run_mu);
    pool_stop_locked();
    P.nthreads = n <= 0 ? default_threads() : (n < HR_MAX_THREADS ? n : HR_MAX_THREADS);
    int r = P.nthreads;
    pthread_mutex_unlock(&g_run_mu);
    return r;
}

/* ------------------------------------------------------------------------------------ row kernel contract */

/* out[t * ldo + (r - r0)] = dot(row r of W, X[t]) for r in [r0, r1), t < nt (1 <= nt <= HR_TT).
 * FP4: X[t] in the even/odd block layout; ks = K/32 scales per row.
 * FP8: X[t] in natural order; ks = ceil(K/128) scales per 128-row block. */
typedef void (*rows_fn)(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0, int64_t r1,
                        const float *const *x, int nt, float *out, int64_t ldo);

/* ---------------------------------------------------------------------------------------- portable paths */

static void fp4_rows_portable(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0, int64_t r1,
                              const float *const *x, int nt, float *out, int64_t ldo) {
    const int64_t nb = k / 32, kb2 = k / 2;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * kb2, *sr = s + r * ks;
        for (int t = 0; t < nt; t++) {
            const float *xt = x[t];
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *wb = wr + b * 16;
                const float *xb = xt + b * 32;
                float blk = 0.0f;
                for (int j = 0; j < 16; j++) blk += FP4_LUT[wb[j] & 15] * xb[j] + FP4_LUT[wb[j] >> 4] * xb[16 + j];
                acc += blk * g_e8m0[sr[b]];
            }
            out[t * ldo + (r - r0)] = acc;
        }
    }
}

static void fp8_rows_portable(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0, int64_t r1,
                              const float *const *x, int nt, float *out, int64_t ldo) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * k, *sr = s + (r / HR_FP8_BLOCK) * ks;
        for (int t = 0; t < nt; t++) {
            const float *xt = x[t];
            float acc = 0.0f;
            for (int64_t kb = 0; kb * HR_FP8_BLOCK < k; kb++) {
                int64_t c0 = kb * HR_FP8_BLOCK, c1 = c0 + HR_FP8_BLOCK < k ? c0 + HR_FP8_BLOCK : k;
                float blk = 0.0f;
                for (int64_t c = c0; c < c1; c++) blk += g_fp8[wr[c]] * xt[c];
                acc += blk * g_e8m0[sr[kb]];
            }
            out[t * ldo + (r - r0)] = acc;
        }
    }
}

static uint64_t read_sum_portable(const uint8_t *p, int64_t n) {
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, v[4];
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        memcpy(v, p + i, 32);
        a0 += v[0];
        a1 += v[1];
        a2 += v[2];
        a3 += v[3];
    }
    for (; i < n; i++) a0 += p[i];
    return a0 ^ a1 ^ a2 ^ a3;
}

#if HR_X86
/* ------------------------------------------------------------------------------------------- AVX2 paths */

HR_AVX2 static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 packed bytes -> 8 low-nibble values (lo) and 8 high-nibble values (hi): |value| by permute, sign by xor. */
#define HR_AVX2_DECODE8(ptr, lo, hi)                                                                         \
    do {                                                                                                     \
        __m256i v_ = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(ptr)));                          \
        lo = _mm256_xor_ps(_mm256_permutevar8x32_ps(lut8, v_),                                               \
                           _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v_, 28), sgn)));           \
        hi = _mm256_xor_ps(_mm256_permutevar8x32_ps(lut8, _mm256_srli_epi32(v_, 4)),                         \
                           _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(v_, 24), sgn)));           \
    } while (0)

static int scales_foldable(const uint8_t *s, int64_t n) {
    /* the scale can be added to the table's exponents exactly for bytes 2..252 */
    for (int64_t i = 0; i < n; i++)
        if (s[i] < 2 || s[i] > 252) return 0;
    return 1;
}

/* One row x nt tokens, rows [ra, rb) (out indexed from rbase); any scale bytes. */
HR_AVX2 static void fp4_rows1_avx2(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t ra, int64_t rb,
                                   int64_t rbase, const float *const *x, int nt, float *out, int64_t ldo) {
    const __m256 lut8 = _mm256_loadu_ps(FP4_LUT);
    const __m256i sgn = _mm256_set1_epi32((int)0x80000000u);
    const int64_t nb = k / 32, kb2 = k / 2;
    for (int64_t r = ra; r < rb; r++) {
        const uint8_t *wr = w + r * kb2, *sr = s + r * ks;
        __m256 acc[HR_TT];
        for (int t = 0; t < HR_TT; t++) acc[t] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            __m256 l0, h0, l1, h1;
            HR_AVX2_DECODE8(wr + b * 16, l0, h0);
            HR_AVX2_DECODE8(wr + b * 16 + 8, l1, h1);
            __m256 sc = _mm256_set1_ps(g_e8m0[sr[b]]);
            l0 = _mm256_mul_ps(l0, sc);
            h0 = _mm256_mul_ps(h0, sc);
            l1 = _mm256_mul_ps(l1, sc);
            h1 = _mm256_mul_ps(h1, sc);
            for (int t = 0; t < nt; t++) {
                const float *xb = x[t] + b * 32;
                __m256 a = _mm256_fmadd_ps(l0, _mm256_loadu_ps(xb), acc[t]);
                a = _mm256_fmadd_ps(l1, _mm256_loadu_ps(xb + 8), a);
                a = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xb + 16), a);
                acc[t] = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xb + 24), a);
            }
        }
        for (int t = 0; t < nt; t++) out[t * ldo + (r - rbase)] = hsum256(acc[t]);
    }
}

/* Two rows x NT (<= 4) tokens, half a block (8 packed bytes) at a time so that 8 accumulators, 4 decoded vectors
 * and the activations fit in 16 ymm registers; the block scale is folded into the magnitude table. */
HR_AVX2 static inline __attribute__((always_inline)) void
fp4_tile2_avx2(const int NT, const uint8_t *w0, const uint8_t *s0, int64_t kb2, int64_t ks, int64_t nb,
               const float *const *x, float *out, int64_t ldo) {
    const __m256i lutb = _mm256_castps_si256(_mm256_loadu_ps(FP4_LUT)); /* magnitudes 0, 0.5 .. 6 */
    const __m256i nz = _mm256_setr_epi32(0, -1, -1, -1, -1, -1, -1, -1); /* entry 0 is zero: keep its exponent */
    const __m256i sgn = _mm256_set1_epi32((int)0x80000000u);
    __m256 acc[2][4];
    for (int q = 0; q < 2; q++)
        for (int t = 0; t < NT; t++) acc[q][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256 lutq[2];
        for (int q = 0; q < 2; q++)
            lutq[q] = _mm256_castsi256_ps(
                _mm256_add_epi32(lutb, _mm256_and_si256(_mm256_set1_epi32(g_exp_delta[s0[q * ks + b]]), nz)));
        for (int half = 0; half < 2; half++) {
            __m256 lo[2], hi[2];
            for (int q = 0; q < 2; q++) {
                const __m256 lut8 = lutq[q];
                HR_AVX2_DECODE8(w0 + q * kb2 + b * 16 + half * 8, lo[q], hi[q]);
            }
#pragma GCC unroll 4
            for (int t = 0; t < NT; t++) {
                const float *xb = x[t] + b * 32 + half * 8;
                __m256 xe = _mm256_loadu_ps(xb), xo = _mm256_loadu_ps(xb + 16);
                acc[0][t] = _mm256_fmadd_ps(hi[0], xo, _mm256_fmadd_ps(lo[0], xe, acc[0][t]));
                acc[1][t] = _mm256_fmadd_ps(hi[1], xo, _mm256_fmadd_ps(lo[1], xe, acc[1][t]));
            }
        }
    }
    for (int t = 0; t < NT; t++) {
        out[t * ldo] = hsum256(acc[0][t]);
        out[t * ldo + 1] = hsum256(acc[1][t]);
    }
}

HR_AVX2 static void fp4_rows_avx2(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0, int64_t r1,
                                  const float *const *x, int nt, float *out, int64_t ldo) {
    const __m256 lut8 = _mm256_loadu_ps(FP4_LUT);
    const __m256i sgn = _mm256_set1_epi32((int)0x80000000u);
    const int64_t nb = k / 32, kb2 = k / 2;
    if (nt == 1) {
        const float *xt = x[0];
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *wr = w + r * kb2, *sr = s + r * ks;
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                __m256 l0, h0, l1, h1;
                if (!(b & 3)) _mm_prefetch((const char *)(wr + b * 16 + HR_PF_BYTES), _MM_HINT_T0);
                HR_AVX2_DECODE8(wr + b * 16, l0, h0);
                HR_AVX2_DECODE8(wr + b * 16 + 8, l1, h1);
                const float *xb = xt + b * 32;
                __m256 p = _mm256_mul_ps(l0, _mm256_loadu_ps(xb));
                __m256 q = _mm256_mul_ps(l1, _mm256_loadu_ps(xb + 8));
                p = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xb + 16), p);
                q = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xb + 24), q);
                __m256 sc = _mm256_set1_ps(g_e8m0[sr[b]]);
                if (b & 1)
                    acc1 = _mm256_fmadd_ps(_mm256_add_ps(p, q), sc, acc1);
                else
                    acc0 = _mm256_fmadd_ps(_mm256_add_ps(p, q), sc, acc0);
            }
            out[r - r0] = hsum256(_mm256_add_ps(acc0, acc1));
        }
        return;
    }
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) {
        const uint8_t *wr = w + r * kb2, *sr = s + r * ks;
        if (!scales_foldable(sr, 2 * ks)) {
            fp4_rows1_avx2(w, s, k, ks, r, r + 2, r0, x, nt, out, ldo);
            continue;
        }
        float *o = out + (r - r0);
        for (int t0 = 0; t0 < nt; t0 += 4) {
            int n = nt - t0 < 4 ? nt - t0 : 4;
            switch (n) {
            case 1: fp4_tile2_avx2(1, wr, sr, kb2, ks, nb, x + t0, o + t0 * ldo, ldo); break;
            case 2: fp4_tile2_avx2(2, wr, sr, kb2, ks, nb, x + t0, o + t0 * ldo, ldo); break;
            case 3: fp4_tile2_avx2(3, wr, sr, kb2, ks, nb, x + t0, o + t0 * ldo, ldo); break;
            default: fp4_tile2_avx2(4, wr, sr, kb2, ks, nb, x + t0, o + t0 * ldo, ldo); break;
            }
        }
    }
    if (r < r1) fp4_rows1_avx2(w, s, k, ks, r, r1, r0, x, nt, out, ldo);
}

/* 8 e4m3 bytes -> 8 floats equal to value / 256: the byte is rebuilt as an fp16 bit pattern (bias 15 vs 7). */
HR_AVX2 static inline __m256 fp8_decode8_avx2(const uint8_t *p) {
    __m128i t = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)p));
    t = _mm_and_si128(_mm_srai_epi16(_mm_slli_epi16(t, 8), 1), _mm_set1_epi16((short)0xBFFF));
    return _mm256_cvtph_ps(t);
}

HR_AVX2 static void fp8_rows_avx2(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0, int64_t r1,
                                  const float *const *x, int nt, float *out, int64_t ldo) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * k, *sr = s + (r / HR_FP8_BLOCK) * ks;
        __m256 acc[HR_TT];
        float tail[HR_TT];
        for (int t = 0; t < HR_TT; t++) {
            acc[t] = _mm256_setzero_ps();
            tail[t] = 0.0f;
        }
        for (int64_t kb = 0; kb * HR_FP8_BLOCK < k; kb++) {
            int64_t c0 = kb * HR_FP8_BLOCK, c1 = c0 + HR_FP8_BLOCK < k ? c0 + HR_FP8_BLOCK : k;
            float scf = g_e8m0[sr[kb]];
            __m256 sc = _mm256_set1_ps(scf);
            int64_t c = c0;
            if (nt == 1) {
                __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
                for (; c + 16 <= c1; c += 16) {
                    if (!(c & 63)) HR_FP8_PREFETCH(wr + c, k >= HR_PF_WIDE_K);
                    b0 = _mm256_fmadd_ps(fp8_decode8_avx2(wr + c), _mm256_loadu_ps(x[0] + c), b0);
                    b1 = _mm256_fmadd_ps(fp8_decode8_avx2(wr + c + 8), _mm256_loadu_ps(x[0] + c + 8), b1);
                }
                for (; c + 8 <= c1; c += 8)
                    b0 = _mm256_fmadd_ps(fp8_decode8_avx2(wr + c), _mm256_loadu_ps(x[0] + c), b0);
                acc[0] = _mm256_fmadd_ps(_mm256_add_ps(b0, b1), sc, acc[0]);
            } else {
                for (; c + 8 <= c1; c += 8) {
                    __m256 f = _mm256_mul_ps(fp8_decode8_avx2(wr + c), sc);
                    for (int t = 0; t < nt; t++) acc[t] = _mm256_fmadd_ps(f, _mm256_loadu_ps(x[t] + c), acc[t]);
                }
            }
            for (; c < c1; c++)
                for (int t = 0; t < nt; t++) tail[t] += g_fp8[wr[c]] * scf * x[t][c];
        }
        for (int t = 0; t < nt; t++) out[t * ldo + (r - r0)] = hsum256(acc[t]) * 256.0f + tail[t];
    }
}

HR_AVX2 static uint64_t read_sum_avx2(const uint8_t *p, int64_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 128 <= n; i += 128) {
        a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i *)(p + i)));
        a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i *)(p + i + 32)));
        a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i *)(p + i + 64)));
        a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i *)(p + i + 96)));
    }
    __m256i a = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
    uint64_t v[4];
    _mm256_storeu_si256((__m256i *)v, a);
    return (v[0] ^ v[1] ^ v[2] ^ v[3]) + read_sum_portable(p + i, n - i);
}

/* ----------------------------------------------------------------------------------------- AVX-512 paths */

/* 16 packed bytes -> 16 low-nibble and 16 high-nibble values; vpermps reads only the low 4 index bits. */
#define HR_AVX512_DECODE16(ptr, lo, hi)                                                                      \
    do {                                                                                                     \
        __m512i v_ = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(ptr)));                          \
        lo = _mm512_permutexvar_ps(v_, lut);                                                                 \
        hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v_, 4), lut);                                           \
    } while (0)

/* Per-block scale folded into the table: adding (b - 127) << 23 to the exponent of the nonzero entries gives
 * lut * 2^(b-127) exactly while the result stays a normal float, i.e. for scale bytes 2..252 (checked per row). */
#define HR_FOLD_OK(b) ((b) >= 2 && (b) <= 252)
#define HR_NZ_MASK ((__mmask16)0xFEFE) /* table entries 0 and 8 are +-0 and keep a zero exponent */

HR_AVX512 static inline int scales_foldable_avx512(const uint8_t *s, int64_t n) {
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512i v = _mm512_loadu_si512((const void *)(s + i));
        if (_mm512_cmplt_epu8_mask(v, _mm512_set1_epi8(2)) | _mm512_cmpgt_epu8_mask(v, _mm512_set1_epi8((char)252)))
            return 0;
    }
    for (; i < n; i++)
        if (!HR_FOLD_OK(s[i])) return 0;
    return 1;
}

HR_AVX512 static inline __m512 fold_lut_avx512(__m512i lut_bits, uint8_t b) {
#if HR_TBL
    /* broadcast from a table: a load, where computing the offset would cost a GPR-to-vector move */
    return _mm512_castsi512_ps(_mm512_mask_add_epi32(lut_bits, HR_NZ_MASK, lut_bits, _mm512_set1_epi32(g_exp_delta[b])));
#else
    return _mm512_castsi512_ps(_mm512_mask_add_epi32(lut_bits, HR_NZ_MASK, lut_bits, _mm512_set1_epi32(((int)b - 127) << 23)));
#endif
}

/* One row (or two) times one token: 4 independent accumulators per row hide the FMA latency. */
HR_AVX512 static inline void fp4_gemv2_avx512(const uint8_t *w0, const uint8_t *s0, int64_t kb2, int64_t ks,
                                               int64_t nb, const float *xt, float *o0, float *o1, int two) {
    const __m512 lut = _mm512_loadu_ps(FP4_LUT);
    const __m512i lutb = _mm512_castps_si512(lut);
    const uint8_t *w1 = w0 + kb2, *s1 = s0 + ks;
    int fold = scales_foldable_avx512(s0, nb) && (!two || scales_foldable_avx512(s1, nb));
    if (!fold || (nb & 1)) {
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, c0 = a0, c1 = a0;
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = xt + b * 32;
            __m512 xe = _mm512_loadu_ps(xb), xo = _mm512_loadu_ps(xb + 16), l, h;
            HR_AVX512_DECODE16(w0 + b * 16, l, h);
            __m512 p = _mm512_fmadd_ps(h, xo, _mm512_mul_ps(l, xe));
            if (b & 1)
                c0 = _mm512_fmadd_ps(p, _mm512_set1_ps(g_e8m0[s0[b]]), c0);
            else
                a0 = _mm512_fmadd_ps(p, _mm512_set1_ps(g_e8m0[s0[b]]), a0);
            if (two) {
                HR_AVX512_DECODE16(w1 + b * 16, l, h);
                __m512 q = _mm512_fmadd_ps(h, xo, _mm512_mul_ps(l, xe));
                if (b & 1)
                    c1 = _mm512_fmadd_ps(q, _mm512_set1_ps(g_e8m0[s1[b]]), c1);
                else
                    a1 = _mm512_fmadd_ps(q, _mm512_set1_ps(g_e8m0[s1[b]]), a1);
            }
        }
        *o0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, c0));
        if (two) *o1 = _mm512_reduce_add_ps(_mm512_add_ps(a1, c1));
        return;
    }
    __m512 a0 = _mm512_setzero_ps(), b0 = a0, c0 = a0, d0 = a0, a1 = a0, b1 = a0, c1 = a0, d1 = a0;
    for (int64_t b = 0; b < nb; b += 2) {
        if ((b & 3) == 0) {
            _mm_prefetch((const char *)(w0 + b * 16 + HR_PF_BYTES), _MM_HINT_T0);
            if (two) _mm_prefetch((const char *)(w1 + b * 16 + HR_PF_BYTES), _MM_HINT_T0);
        }
        const float *xb = xt + b * 32;
        __m512 xe = _mm512_loadu_ps(xb), xo = _mm512_loadu_ps(xb + 16);
        __m512 ye = _mm512_loadu_ps(xb + 32), yo = _mm512_loadu_ps(xb + 48);
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w0 + b * 16)));
        __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w0 + b * 16 + 16)));
        __m512 lt = fold_lut_avx512(lutb, s0[b]), mt = fold_lut_avx512(lutb, s0[b + 1]);
        a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, lt), xe, a0);
        b0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lt), xo, b0);
        c0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(u, mt), ye, c0);
        d0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), mt), yo, d0);
        if (two) {
            v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w1 + b * 16)));
            u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w1 + b * 16 + 16)));
            lt = fold_lut_avx512(lutb, s1[b]);
            mt = fold_lut_avx512(lutb, s1[b + 1]);
            a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(v, lt), xe, a1);
            b1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lt), xo, b1);
            c1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(u, mt), ye, c1);
            d1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), mt), yo, d1);
        }
    }
    *o0 = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, b0), _mm512_add_ps(c0, d0)));
    if (two) *o1 = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a1, b1), _mm512_add_ps(c1, d1)));
}

/* Two rows x NT tokens; NT is a compile-time constant after inlining so the accumulators stay in registers. */
HR_AVX512 static inline __attribute__((always_inline)) void
fp4_tile_avx512(const int NT, const uint8_t *w0, const uint8_t *s0, int64_t kb2, int64_t ks, int64_t nb,
                const float *const *x, float *out, int64_t ldo, int two) {
    const __m512 lut = _mm512_loadu_ps(FP4_LUT);
    const uint8_t *w1 = two ? w0 + kb2 : w0, *s1 = two ? s0 + ks : s0;
    __m512 acc0[HR_TT], acc1[HR_TT];
    for (int t = 0; t < NT; t++) acc0[t] = acc1[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 l0, h0, l1, h1;
        HR_AVX512_DECODE16(w0 + b * 16, l0, h0);
        HR_AVX512_DECODE16(w1 + b * 16, l1, h1);
        __m512 sc0 = _mm512_set1_ps(g_e8m0[s0[b]]), sc1 = _mm512_set1_ps(g_e8m0[s1[b]]);
        l0 = _mm512_mul_ps(l0, sc0);
        h0 = _mm512_mul_ps(h0, sc0);
        l1 = _mm512_mul_ps(l1, sc1);
        h1 = _mm512_mul_ps(h1, sc1);
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) {
            const float *xb = x[t] + b * 32;
            __m512 xe = _mm512_loadu_ps(xb), xo = _mm512_loadu_ps(xb + 16);
            acc0[t] = _mm512_fmadd_ps(h0, xo, _mm512_fmadd_ps(l0, xe, acc0[t]));
            acc1[t] = _mm512_fmadd_ps(h1, xo, _mm512_fmadd_ps(l1, xe, acc1[t]));
        }
    }
    for (int t = 0; t < NT; t++) {
        out[t * ldo] = _mm512_reduce_add_ps(acc0[t]);
        if (two) out[t * ldo + 1] = _mm512_reduce_add_ps(acc1[t]);
    }
}

#ifndef HR_F32_R
#define HR_F32_R 4 /* rows per register tile of the fp32 batch kernel */
#endif
#ifndef HR_F32_TT
#define HR_F32_TT 4 /* tokens per register tile */
#endif

/* R rows x NT tokens with the scale folded into the table: each decoded row block feeds 2*NT FMAs. */
HR_AVX512 static inline __attribute__((always_inline)) void
fp4_tileR_avx512(const int R, const int NT, const uint8_t *w0, const uint8_t *s0, int64_t kb2, int64_t ks, int64_t nb,
                 const float *const *x, float *out, int64_t ldo) {
    const __m512i lutb = _mm512_castps_si512(_mm512_loadu_ps(FP4_LUT));
    __m512 acc[4][HR_TT];
    for (int q = 0; q < R; q++)
        for (int t = 0; t < NT; t++) acc[q][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 lo[4], hi[4];
#pragma GCC unroll 4
        for (int q = 0; q < R; q++) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w0 + q * kb2 + b * 16)));
            __m512 lt = fold_lut_avx512(lutb, s0[q * ks + b]);
            lo[q] = _mm512_permutexvar_ps(v, lt);
            hi[q] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lt);
        }
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) {
            const float *xb = x[t] + b * 32;
            __m512 xe = _mm512_loadu_ps(xb), xo = _mm512_loadu_ps(xb + 16);
#pragma GCC unroll 4
            for (int q = 0; q < R; q++) acc[q][t] = _mm512_fmadd_ps(hi[q], xo, _mm512_fmadd_ps(lo[q], xe, acc[q][t]));
        }
    }
    for (int t = 0; t < NT; t++)
        for (int q = 0; q < R; q++) out[t * ldo + q] = _mm512_reduce_add_ps(acc[q][t]);
}

HR_AVX512 static void fp4_rows2_avx512(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0,
                                       int64_t r1, int64_t rbase, const float *const *x, int nt, float *out,
                                       int64_t ldo) {
    /* rows [r0, r1) in pairs; out is indexed from rbase */
    const int64_t nb = k / 32, kb2 = k / 2;
    for (int64_t r = r0; r < r1; r += 2) {
        int two = r + 1 < r1;
        const uint8_t *wr = w + r * kb2, *sr = s + r * ks;
        float *o = out + (r - rbase);
        switch (nt) {
        case 1: fp4_gemv2_avx512(wr, sr, kb2, ks, nb, x[0], o, o + 1, two); break;
        case 2: fp4_tile_avx512(2, wr, sr, kb2, ks, nb, x, o, ldo, two); break;
        case 3: fp4_tile_avx512(3, wr, sr, kb2, ks, nb, x, o, ldo, two); break;
        case 4: fp4_tile_avx512(4, wr, sr, kb2, ks, nb, x, o, ldo, two); break;
        case 5: fp4_tile_avx512(5, wr, sr, kb2, ks, nb, x, o, ldo, two); break;
        case 6: fp4_tile_avx512(6, wr, sr, kb2, ks, nb, x, o, ldo, two); break;
        case 7: fp4_tile_avx512(7, wr, sr, kb2, ks, nb, x, o, ldo, two); break;
        default: fp4_tile_avx512(8, wr, sr, kb2, ks, nb, x, o, ldo, two); break;
        }
    }
}

HR_AVX512 static void fp4_rows_avx512(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0,
                                      int64_t r1, const float *const *x, int nt, float *out, int64_t ldo) {
    if (nt == 1) {
        fp4_rows2_avx512(w, s, k, ks, r0, r1, r0, x, nt, out, ldo);
        return;
    }
    const int64_t nb = k / 32, kb2 = k / 2;
    const int R = HR_F32_R;
    int64_t r = r0;
    for (; r + R <= r1; r += R) {
        const uint8_t *wr = w + r * kb2, *sr = s + r * ks;
        if (!scales_foldable_avx512(sr, R * ks)) { /* rows are contiguous in the scale tensor */
            fp4_rows2_avx512(w, s, k, ks, r, r + R, r0, x, nt, out, ldo);
            continue;
        }
        float *o = out + (r - r0);
        for (int t0 = 0; t0 < nt; t0 += HR_F32_TT) {
            int n = nt - t0 < HR_F32_TT ? nt - t0 : HR_F32_TT;
            const float *const *xt = x + t0;
            float *ot = o + t0 * ldo;
            switch (n) {
            case 1: fp4_tileR_avx512(R, 1, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            case 2: fp4_tileR_avx512(R, 2, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            case 3: fp4_tileR_avx512(R, 3, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
#if HR_F32_TT > 4
            case 4: fp4_tileR_avx512(R, 4, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            case 5: fp4_tileR_avx512(R, 5, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            case 6: fp4_tileR_avx512(R, 6, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            case 7: fp4_tileR_avx512(R, 7, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
#endif
            default: fp4_tileR_avx512(R, HR_F32_TT, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            }
        }
    }
    if (r < r1) fp4_rows2_avx512(w, s, k, ks, r, r1, r0, x, nt, out, ldo);
}

/* ---- bf16-activation FP4 path (AVX512-BF16, batches only): activations rounded to bf16, weights decoded to exact
 * bf16 (table value with the block scale added to its exponent), vdpbf16ps accumulating in fp32. Two columns per
 * fp32 lane, so activations stay in natural order: the pair (2i, 2i+1) is byte i's (low, high) nibble. */
static const uint16_t FP4_LUT_BF16[32] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                          0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};

static float bf16_to_float(uint16_t h) { return bits_to_float((uint32_t)h << 16); }

static void fp4_row_bf16_scalar(const uint8_t *wr, const uint8_t *sr, int64_t nb, const uint16_t *const *x, int nt,
                                float *out, int64_t ldo) {
    /* rows whose scales cannot be folded into bf16 exponents (bytes 0, 1, 253, 254) */
    for (int t = 0; t < nt; t++) {
        float acc = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            float blk = 0.0f;
            for (int j = 0; j < 16; j++)
                blk += FP4_LUT[wr[b * 16 + j] & 15] * bf16_to_float(x[t][b * 32 + 2 * j]) +
                       FP4_LUT[wr[b * 16 + j] >> 4] * bf16_to_float(x[t][b * 32 + 2 * j + 1]);
            acc += blk * g_e8m0[sr[b]];
        }
        out[t * ldo] = acc;
    }
}

#ifndef HR_BF16_R
#define HR_BF16_R 2 /* rows per register tile */
#endif
#ifndef HR_BF16_TT
#define HR_BF16_TT 8 /* tokens per register tile: R x TT accumulators */
#endif

/* R rows x NT tokens; fewer rows and more tokens per tile spread each row's decode over more dot products. */
HR_AVX512BF16 static inline __attribute__((always_inline)) void
fp4_tile_bf16(const int R, const int NT, const uint8_t *w0, const uint8_t *s0, int64_t kb2, int64_t ks, int64_t nb,
              const uint16_t *const *x, float *out, int64_t ldo) {
    const __m512i lutw = _mm512_loadu_si512((const void *)FP4_LUT_BF16);
    const __m512i nib = _mm512_set1_epi32(0x000F000F);
    __m512 acc[4][HR_TT];
    for (int q = 0; q < R; q++)
        for (int t = 0; t < NT; t++) acc[q][t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i wq[4];
#pragma GCC unroll 4
        for (int q = 0; q < R; q++) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(w0 + q * kb2 + b * 16)));
            /* word 2i = low nibble, word 2i+1 = high nibble of byte i: (v | v << 12) & 0x000F000F */
            __m512i idx = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 12), nib, 0xA8);
            __m512i lt = _mm512_mask_add_epi16(lutw, (__mmask32)0xFEFE, lutw,
                                               _mm512_set1_epi16((short)(((int)s0[q * ks + b] - 127) << 7)));
            wq[q] = _mm512_permutexvar_epi16(idx, lt);
        }
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) {
            __m512i xv = _mm512_loadu_si512((const void *)(x[t] + b * 32));
#pragma GCC unroll 4
            for (int q = 0; q < R; q++) acc[q][t] = _mm512_dpbf16_ps(acc[q][t], (__m512bh)wq[q], (__m512bh)xv);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int q = 0; q < R; q++) out[t * ldo + q] = _mm512_reduce_add_ps(acc[q][t]);
}

HR_AVX512BF16 static void fp4_rows_bf16_avx512(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0,
                                               int64_t r1, const float *const *xf, int nt, float *out, int64_t ldo) {
    const uint16_t *const *x = (const uint16_t *const *)xf; /* bf16 activations, natural order */
    const int64_t nb = k / 32, kb2 = k / 2;
    const int R = HR_BF16_R;
    for (int64_t r = r0; r < r1; r += R) {
        int64_t nr = r1 - r < R ? r1 - r : R;
        const uint8_t *wr = w + r * kb2, *sr = s + r * ks;
        float *o = out + (r - r0);
        if (nr < R || !scales_foldable_avx512(sr, R * ks)) {
            for (int64_t q = 0; q < nr; q++) fp4_row_bf16_scalar(wr + q * kb2, sr + q * ks, nb, x, nt, o + q, ldo);
            continue;
        }
        for (int t0 = 0; t0 < nt; t0 += HR_BF16_TT) {
            int n = nt - t0 < HR_BF16_TT ? nt - t0 : HR_BF16_TT;
            const uint16_t *const *xt = x + t0;
            float *ot = o + t0 * ldo;
            switch (n) {
            case 1: fp4_tile_bf16(R, 1, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            case 2: fp4_tile_bf16(R, 2, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            case 3: fp4_tile_bf16(R, 3, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
#if HR_BF16_TT > 4
            case 4: fp4_tile_bf16(R, 4, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            case 5: fp4_tile_bf16(R, 5, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            case 6: fp4_tile_bf16(R, 6, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            case 7: fp4_tile_bf16(R, 7, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
#endif
            default: fp4_tile_bf16(R, HR_BF16_TT, wr, sr, kb2, ks, nb, xt, ot, ldo); break;
            }
        }
    }
}

/* 16 e4m3 bytes (masked) -> 16 floats equal to value / 256 (fp16 rebuild, see fp8_decode8_avx2). */
HR_AVX512 static inline __m512 fp8_decode16_avx512(const uint8_t *p, __mmask16 m) {
    __m256i t = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(m, p));
    t = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(t, 8), 1), _mm256_set1_epi16((short)0xBFFF));
    return _mm512_cvtph_ps(t);
}

HR_AVX512 static inline __attribute__((always_inline)) void
fp8_tile_avx512(const int NT, const uint8_t *w0, const uint8_t *s0, int64_t k, const float *const *x, float *out,
                int64_t ldo) {
    __m512 acc[HR_TT];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t kb = 0; kb * HR_FP8_BLOCK < k; kb++) {
        int64_t c0 = kb * HR_FP8_BLOCK, c1 = c0 + HR_FP8_BLOCK < k ? c0 + HR_FP8_BLOCK : k;
        __m512 sc = _mm512_set1_ps(g_e8m0[s0[kb]]);
        if (NT == 1) {
            __m512 b0 = _mm512_setzero_ps(), b1 = b0;
            int64_t c = c0;
            for (; c + 32 <= c1; c += 32) {
                if (!((c + 32) & 63)) HR_FP8_PREFETCH(w0 + c, k >= HR_PF_WIDE_K);
                b0 = _mm512_fmadd_ps(fp8_decode16_avx512(w0 + c, 0xFFFF), _mm512_loadu_ps(x[0] + c), b0);
                b1 = _mm512_fmadd_ps(fp8_decode16_avx512(w0 + c + 16, 0xFFFF), _mm512_loadu_ps(x[0] + c + 16), b1);
            }
            for (; c < c1; c += 16) {
                __mmask16 m = c + 16 <= c1 ? (__mmask16)0xFFFF : (__mmask16)((1u << (c1 - c)) - 1);
                b0 = _mm512_fmadd_ps(fp8_decode16_avx512(w0 + c, m), _mm512_maskz_loadu_ps(m, x[0] + c), b0);
            }
            acc[0] = _mm512_fmadd_ps(_mm512_add_ps(b0, b1), sc, acc[0]);
        } else {
            for (int64_t c = c0; c < c1; c += 16) {
                __mmask16 m = c + 16 <= c1 ? (__mmask16)0xFFFF : (__mmask16)((1u << (c1 - c)) - 1);
                __m512 f = _mm512_mul_ps(fp8_decode16_avx512(w0 + c, m), sc);
#pragma GCC unroll 8
                for (int t = 0; t < NT; t++) acc[t] = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, x[t] + c), acc[t]);
            }
        }
    }
    for (int t = 0; t < NT; t++) out[t * ldo] = _mm512_reduce_add_ps(acc[t]) * 256.0f;
}

HR_AVX512 static void fp8_rows_avx512(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0,
                                      int64_t r1, const float *const *x, int nt, float *out, int64_t ldo) {
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * k, *sr = s + (r / HR_FP8_BLOCK) * ks;
        float *o = out + (r - r0);
        switch (nt) {
        case 1: fp8_tile_avx512(1, wr, sr, k, x, o, ldo); break;
        case 2: fp8_tile_avx512(2, wr, sr, k, x, o, ldo); break;
        case 3: fp8_tile_avx512(3, wr, sr, k, x, o, ldo); break;
        case 4: fp8_tile_avx512(4, wr, sr, k, x, o, ldo); break;
        case 5: fp8_tile_avx512(5, wr, sr, k, x, o, ldo); break;
        case 6: fp8_tile_avx512(6, wr, sr, k, x, o, ldo); break;
        case 7: fp8_tile_avx512(7, wr, sr, k, x, o, ldo); break;
        default: fp8_tile_avx512(8, wr, sr, k, x, o, ldo); break;
        }
    }
}

/* One token, activations in the "p64" order (fp8_p64_order): 64 weight bytes are widened by two byte unpacks
 * (each byte the high half of a 16-bit lane), one shift and one mask, then four fp16 -> fp32 conversions: ~25%
 * fewer decode operations per byte than the 16-byte path, which on two Zen 4 cores was compute-bound near the
 * DRAM rate (14.6 -> 17.1 GB/s at K = 4096 with the memory bus shared). Needs k % 64 == 0. */
HR_AVX512 static void fp8_rows_p64_avx512(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0,
                                          int64_t r1, const float *const *x, int nt, float *out, int64_t ldo) {
    (void)nt;
    (void)ldo;
    const __m512i z = _mm512_setzero_si512(), m = _mm512_set1_epi16((short)0xBFFF);
    const float *xp = x[0];
    const int wide = k >= HR_PF_WIDE_K;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * k, *sr = s + (r / HR_FP8_BLOCK) * ks;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t kb = 0; kb * HR_FP8_BLOCK < k; kb++) {
            int64_t c0 = kb * HR_FP8_BLOCK, c1 = c0 + HR_FP8_BLOCK < k ? c0 + HR_FP8_BLOCK : k;
            __m512 b0 = _mm512_setzero_ps(), b1 = b0, b2 = b0, b3 = b0;
            for (int64_t c = c0; c < c1; c += 64) {
                HR_FP8_PREFETCH(wr + c, wide);
                __m512i v = _mm512_loadu_si512((const void *)(wr + c));
                __m512i lo = _mm512_and_si512(_mm512_srai_epi16(_mm512_unpacklo_epi8(z, v), 1), m);
                __m512i hi = _mm512_and_si512(_mm512_srai_epi16(_mm512_unpackhi_epi8(z, v), 1), m);
                b0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(lo)), _mm512_loadu_ps(xp + c), b0);
                b1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(lo, 1)), _mm512_loadu_ps(xp + c + 16), b1);
                b2 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(hi)), _mm512_loadu_ps(xp + c + 32), b2);
                b3 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(hi, 1)), _mm512_loadu_ps(xp + c + 48), b3);
            }
            __m512 b = _mm512_add_ps(_mm512_add_ps(b0, b1), _mm512_add_ps(b2, b3));
            acc = _mm512_fmadd_ps(b, _mm512_set1_ps(g_e8m0[sr[kb]]), acc);
        }
        out[r - r0] = _mm512_reduce_add_ps(acc) * 256.0f;
    }
}

HR_AVX512 static uint64_t read_sum_avx512(const uint8_t *p, int64_t n) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 256 <= n; i += 256) {
        a0 = _mm512_add_epi64(a0, _mm512_load_si512((const void *)(p + i)));
        a1 = _mm512_add_epi64(a1, _mm512_load_si512((const void *)(p + i + 64)));
        a2 = _mm512_add_epi64(a2, _mm512_load_si512((const void *)(p + i + 128)));
        a3 = _mm512_add_epi64(a3, _mm512_load_si512((const void *)(p + i + 192)));
    }
    __m512i a = _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3));
    return (uint64_t)_mm512_reduce_add_epi64(a) + read_sum_portable(p + i, n - i);
}
#endif /* HR_X86 */

/* ---------------------------------------------------------------------- int8-activation FP4 path (HR_ACT_INT8)
 * Activations are quantized per 32-column block: d = amax / 127, q = round-half-even(x * (1 / d)) clamped to
 * [-127, 127] (d = 0 -> q = 0), each step one fp32 rounding, so the scalar and SIMD quantizers and the torch mirror
 * in offload/cpu_experts.py give identical bytes. FP4 values
 * x2 are the integers {0, 1, 2, 3, 4, 6, 8, 12} with sign, so a nibble table gives exact int8 weights; VNNI needs
 * u8 x s8, so the table stores w + 12 and each dword's 12 * sum(q) is subtracted through a precomputed correction
 * (the accumulator starts at it). A block contributes float(S) * (weight scale * d / 2), S the exact int32 dot.
 *
 * Per-token layout (q8_stride(K) bytes; ngrp = ceil(K / 128) groups of 4 blocks, blocks past K are zero):
 *   int8  q[ngrp][128]  : group g = 64 even-column values (blocks 4g..4g+3, 16 each), then the 64 odd-column ones,
 *                         so a 64-byte load of packed weights meets them nibble for nibble;
 *   int32 nc[ngrp][16]  : dword lane i = -12 * (sum of bytes 4i..4i+3 of both halves);
 *   float dh[ngrp][16]  : lane i = d(block 4g + i/4) / 2. */
/* int8 kernels compute ~2x faster than fp32 ones, so DRAM latency dominates: prefetching 32 KiB ahead into L2 took
 * one thread's DRAM-resident GEMV from 11 to 23 GB/s on Zen 4 (4 KiB into L1: 11; 16 KiB into L2: 22). */
#ifndef HR_Q8_PF
#define HR_Q8_PF 32768
#endif
#ifndef HR_Q8_HINT
#define HR_Q8_HINT _MM_HINT_T1
#endif
static const int8_t FP4_I8[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
static const uint8_t FP4_U8[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0}; /* FP4_I8 + 12 */

static inline int64_t q8_ngrp(int64_t k) { return (k + 127) / 128; }
static inline int64_t q8_stride(int64_t k) { return q8_ngrp(k) * 256; }

static inline int8_t q8_round(float v, float id) {
    float r = v * id;
    r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
    return (int8_t)nearbyintf(r); /* the default rounding mode: half to even */
}

static void q8_quantize_scalar(const float *x, int64_t k, uint8_t *dst) {
    const int64_t ng = q8_ngrp(k);
    int8_t *q = (int8_t *)dst;
    int32_t *nc = (int32_t *)(dst + ng * 128);
    float *dh = (float *)(dst + ng * 192);
    memset(dst, 0, (size_t)(ng * 256));
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        const int64_t g = b >> 2, bl = b & 3;
        int8_t *qe = q + g * 128 + bl * 16, *qo = qe + 64;
        for (int j = 0; j < 16; j++) {
            qe[j] = q8_round(xb[2 * j], id);
            qo[j] = q8_round(xb[2 * j + 1], id);
        }
        for (int i = 0; i < 4; i++) {
            int32_t sum = 0;
            for (int m = 0; m < 4; m++) sum += qe[4 * i + m] + qo[4 * i + m];
            nc[g * 16 + bl * 4 + i] = -12 * sum;
            dh[g * 16 + bl * 4 + i] = 0.5f * d;
        }
    }
}

#if HR_X86
/* The same bytes as q8_quantize_scalar with AVX2: even/odd columns split in float, rounded by cvtps (MXCSR default:
 * half to even), packed to int8 and put back in [16 even][16 odd] order with one dword permute. */
HR_AVX2 static void q8_quantize_avx2(const float *x, int64_t k, uint8_t *dst) {
    const int64_t ng = q8_ngrp(k);
    int8_t *q = (int8_t *)dst;
    int32_t *nc = (int32_t *)(dst + ng * 128);
    float *dh = (float *)(dst + ng * 192);
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    memset(dst, 0, (size_t)(ng * 256));
    for (int64_t b = 0; b < k / 32; b++) {
        const float *xb = x + b * 32;
        __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
        __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(x0, absm), _mm256_and_ps(x1, absm)),
                                 _mm256_max_ps(_mm256_and_ps(x2, absm), _mm256_and_ps(x3, absm)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4), d = amax / 127.0f, idf = d > 0.0f ? 1.0f / d : 0.0f;
        const __m256 id = _mm256_set1_ps(idf);
        /* columns 0,2..14 / 16..30 (even) and 1..15 / 17..31 (odd), each 8 in order */
        __m256 e0 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x0, x1, 0x88)), 0xD8));
        __m256 e1 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x2, x3, 0x88)), 0xD8));
        __m256 o0 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x0, x1, 0xDD)), 0xD8));
        __m256 o1 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(x2, x3, 0xDD)), 0xD8));
#define HR_Q8_CVT(v) _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(v, id), lo), hi))
        __m256i ie0 = HR_Q8_CVT(e0), ie1 = HR_Q8_CVT(e1), io0 = HR_Q8_CVT(o0), io1 = HR_Q8_CVT(o1);
#undef HR_Q8_CVT
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(ie0, ie1), _mm256_packs_epi32(io0, io1));
        const int64_t g = b >> 2, bl = b & 3;
        int8_t *qe = q + g * 128 + bl * 16;
        __m256i r = _mm256_permutevar8x32_epi32(p, order); /* [16 even][16 odd] */
        _mm_storeu_si128((__m128i *)qe, _mm256_castsi256_si128(r));
        _mm_storeu_si128((__m128i *)(qe + 64), _mm256_extracti128_si256(r, 1));
        int32_t sums[16];
        _mm256_storeu_si256((__m256i *)sums, _mm256_add_epi32(ie0, io0));
        _mm256_storeu_si256((__m256i *)(sums + 8), _mm256_add_epi32(ie1, io1));
        for (int i = 0; i < 4; i++) {
            nc[g * 16 + bl * 4 + i] = -12 * (sums[4 * i] + sums[4 * i + 1] + sums[4 * i + 2] + sums[4 * i + 3]);
            dh[g * 16 + bl * 4 + i] = 0.5f * d;
        }
    }
}
#endif

static void q8_quantize(int path, const float *x, int64_t k, uint8_t *dst) {
#if HR_X86
    if ((path & 0xFF) == HR_PATH_AVX2 || (path & 0xFF) == HR_PATH_AVX512) {
        q8_quantize_avx2(x, k, dst);
        return;
    }
#endif
    (void)path;
    q8_quantize_scalar(x, k, dst);
}

static uint8_t *q8_alloc(int64_t rows, int64_t k) {
    size_t n = (size_t)(rows * q8_stride(k));
    return (uint8_t *)aligned_alloc(64, n ? n : 64);
}

static void fp4_rows_q8_portable(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0, int64_t r1,
                                 const float *const *x, int nt, float *out, int64_t ldo) {
    const int64_t nb = k / 32, kb2 = k / 2, ng = q8_ngrp(k);
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * kb2, *sr = s + r * ks;
        for (int t = 0; t < nt; t++) {
            const int8_t *q = (const int8_t *)x[t];
            const float *dh = (const float *)((const uint8_t *)x[t] + ng * 192);
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const int8_t *qe = q + (b >> 2) * 128 + (b & 3) * 16, *qo = qe + 64;
                const uint8_t *wb = wr + b * 16;
                int32_t sum = 0;
                for (int j = 0; j < 16; j++) sum += FP4_I8[wb[j] & 15] * qe[j] + FP4_I8[wb[j] >> 4] * qo[j];
                acc += (float)sum * (g_e8m0[sr[b]] * dh[(b >> 2) * 16 + (b & 3) * 4]);
            }
            out[t * ldo + (r - r0)] = acc;
        }
    }
}

#if HR_X86
/* AVX2: half a group (2 blocks, 32 packed bytes) per step; maddubs pairs (<= 2 * 24 * 127) and their sum over the
 * even and odd halves (<= 12192) fit int16, madd with ones widens each dword's 8 products to int32. */
HR_AVX2 static inline __attribute__((always_inline)) void
q8_tile_avx2(const int R, const int NT, const uint8_t *w0, const uint8_t *s0, int64_t kb2, int64_t ks, int64_t nb,
             const float *const *x, float *out, int64_t ldo) {
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)FP4_U8));
    const __m256i m0f = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const int64_t ng = q8_ngrp(2 * kb2), nh = (nb + 1) / 2;
    __m256 acc[4][8];
    for (int q = 0; q < R; q++)
        for (int t = 0; t < NT; t++) acc[q][t] = _mm256_setzero_ps();
    for (int64_t h = 0; h < nh; h++) {
        const int64_t off = h * 32, g = h >> 1, half = h & 1;
        const int full = 2 * h + 2 <= nb;
        __m256i lo[4], hi[4];
        __m256 ws[4];
#pragma GCC unroll 4
        for (int q = 0; q < R; q++) {
            const uint8_t *wp = w0 + q * kb2 + off;
            _mm_prefetch((const char *)(wp + HR_Q8_PF), HR_Q8_HINT);
            __m256i v = full ? _mm256_loadu_si256((const __m256i *)wp)
                             : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)wp));
            lo[q] = _mm256_shuffle_epi8(lut, _mm256_and_si256(v, m0f));
            hi[q] = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), m0f));
            const uint8_t *sp = s0 + q * ks + 2 * h;
            ws[q] = _mm256_set_m128(_mm_set1_ps(full ? g_e8m0[sp[1]] : 0.0f), _mm_set1_ps(g_e8m0[sp[0]]));
        }
#pragma GCC unroll 8
        for (int t = 0; t < NT; t++) {
            const uint8_t *xb = (const uint8_t *)x[t];
            const __m256i xe = _mm256_loadu_si256((const __m256i *)(xb + g * 128 + half * 32));
            const __m256i xo = _mm256_loadu_si256((const __m256i *)(xb + g * 128 + 64 + half * 32));
            const __m256i nc = _mm256_loadu_si256((const __m256i *)(xb + ng * 128 + g * 64 + half * 32));
            const __m256 dh = _mm256_loadu_ps((const float *)(xb + ng * 192 + g * 64 + half * 32));
#pragma GCC unroll 4
            for (int q = 0; q < R; q++) {
                __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[q], xe), _mm256_maddubs_epi16(hi[q], xo));
                __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(p, ones), nc);
                acc[q][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(ws[q], dh), acc[q][t]);
            }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int q = 0; q < R; q++) out[t * ldo + q] = hsum256(acc[q][t]);
}

#define HR_Q8_TILES(KERNEL, R, nt, wr, sr, kb2, ks, nb, xt, ot, ldo)                                                \
    switch (nt) {                                                                                                   \
    case 1: KERNEL(R, 1, wr, sr, kb2, ks, nb, xt, ot, ldo); break;                                                  \
    case 2: KERNEL(R, 2, wr, sr, kb2, ks, nb, xt, ot, ldo); break;                                                  \
    case 3: KERNEL(R, 3, wr, sr, kb2, ks, nb, xt, ot, ldo); break;                                                  \
    case 4: KERNEL(R, 4, wr, sr, kb2, ks, nb, xt, ot, ldo); break;                                                  \
    case 5: KERNEL(R, 5, wr, sr, kb2, ks, nb, xt, ot, ldo); break;                                                  \
    case 6: KERNEL(R, 6, wr, sr, kb2, ks, nb, xt, ot, ldo); break;                                                  \
    case 7: KERNEL(R, 7, wr, sr, kb2, ks, nb, xt, ot, ldo); break;                                                  \
    default: KERNEL(R, 8, wr, sr, kb2, ks, nb, xt, ot, ldo); break;                                                 \
    }

/* GEMV: 4 rows share each activation load; batches: 2 rows x up to TT tokens per register tile (TT = 4 for the 16
 * ymm registers of AVX2, 8 for the 32 zmm of AVX-512). */
#define HR_Q8_ROWS_BODY(KERNEL, TT)                                                                                 \
    const int64_t nb = k / 32, kb2 = k / 2;                                                                         \
    const int64_t R = nt == 1 ? 4 : 2;                                                                              \
    for (int64_t r = r0; r < r1;) {                                                                                 \
        const int64_t left = r1 - r, rr = left >= R ? R : (left >= 2 ? 2 : 1);                                     \
        const uint8_t *wr = w + r * kb2, *sr = s + r * ks;                                                          \
        for (int t0 = 0; t0 < nt; t0 += TT) {                                                                       \
            const int n = nt - t0 < TT ? nt - t0 : TT;                                                              \
            const float *const *xt = x + t0;                                                                        \
            float *ot = out + (r - r0) + t0 * ldo;                                                                  \
            if (rr == 4) {                                                                                          \
                KERNEL(4, 1, wr, sr, kb2, ks, nb, xt, ot, ldo);                                                     \
            } else if (rr == 2) {                                                                                   \
                HR_Q8_TILES(KERNEL, 2, n, wr, sr, kb2, ks, nb, xt, ot, ldo)                                         \
            } else {                                                                                                \
                HR_Q8_TILES(KERNEL, 1, n, wr, sr, kb2, ks, nb, xt, ot, ldo)                                         \
            }                                                                                                       \
        }                                                                                                           \
        r += rr;                                                                                                    \
    }

HR_AVX2 static void fp4_rows_q8_avx2(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0,
                                     int64_t r1, const float *const *x, int nt, float *out, int64_t ldo) {
    HR_Q8_ROWS_BODY(q8_tile_avx2, 4)
}

#if defined(__clang__) || __GNUC__ >= 9
#define HR_Q8_VNNI 1
#define HR_AVX512VNNI \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,avx2,fma,f16c")))
static const uint8_t FP4_U8_X4[64] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                      12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                      12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                      12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};
/* AVX512-VNNI (+VBMI): one group (4 blocks, 64 packed bytes) per step, scales loaded per 16 blocks (512 weights).
 * vpermb reads the low 6 bits of each index byte, and the 64-entry table repeats the 16 nibble values, so neither
 * nibble needs masking: 3 decode instructions per 64 bytes. */
HR_AVX512VNNI static inline __attribute__((always_inline)) void
q8_tile_vnni(const int R, const int NT, const uint8_t *w0, const uint8_t *s0, int64_t kb2, int64_t ks, int64_t nb,
             const float *const *x, float *out, int64_t ldo) {
    const __m512i lut = _mm512_loadu_si512((const void *)FP4_U8_X4);
    const __m512i quad = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512 tiny = _mm512_set1_ps(0x1p-127f); /* e8m0 byte 0 */
    const int64_t ng = q8_ngrp(2 * kb2);
    __m512 acc[4][8];
    for (int q = 0; q < R; q++)
        for (int t = 0; t < NT; t++) acc[q][t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < ng; c += 4) {
        const int64_t nbl = nb - 4 * c < 16 ? nb - 4 * c : 16;
        const __mmask16 sm = (__mmask16)((1u << nbl) - 1);
        __m512 wsc[4];
#pragma GCC unroll 4
        for (int q = 0; q < R; q++) {
            __m512i e = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(sm, s0 + q * ks + 4 * c));
            __m512 f = _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
            wsc[q] = _mm512_mask_mov_ps(f, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), tiny);
        }
        const int64_t gend = c + 4 < ng ? c + 4 : ng;
        for (int64_t g = c; g < gend; g++) {
            const int64_t off = g * 64;
            const __m512i idx = _mm512_add_epi32(quad, _mm512_set1_epi32((int)(4 * (g - c))));
            __m512i lo[4], hi[4];
            __m512 wsv[4];
#pragma GCC unroll 4
            for (int q = 0; q < R; q++) {
                const uint8_t *wp = w0 + q * kb2 + off;
                _mm_prefetch((const char *)(wp + HR_Q8_PF), HR_Q8_HINT);
                __m512i v = off + 64 <= kb2 ? _mm512_loadu_si512((const void *)wp)
                                            : _mm512_maskz_loadu_epi8((__mmask64)((1ull << (kb2 - off)) - 1), wp);
                lo[q] = _mm512_permutexvar_epi8(v, lut);
                hi[q] = _mm512_permutexvar_epi8(_mm512_srli_epi16(v, 4), lut);
                wsv[q] = _mm512_permutexvar_ps(idx, wsc[q]);
            }
#pragma GCC unroll 8
            for (int t = 0; t < NT; t++) {
                const uint8_t *xb = (const uint8_t *)x[t];
                const __m512i xe = _mm512_loadu_si512((const void *)(xb + g * 128));
                const __m512i xo = _mm512_loadu_si512((const void *)(xb + g * 128 + 64));
                const __m512i nc = _mm512_loadu_si512((const void *)(xb + ng * 128 + g * 64));
                const __m512 dh = _mm512_loadu_ps((const float *)(xb + ng * 192 + g * 64));
#pragma GCC unroll 4
                for (int q = 0; q < R; q++) {
                    __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(nc, lo[q], xe), hi[q], xo);
                    acc[q][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(wsv[q], dh), acc[q][t]);
                }
            }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int q = 0; q < R; q++) out[t * ldo + q] = _mm512_reduce_add_ps(acc[q][t]);
}

HR_AVX512VNNI static void fp4_rows_q8_vnni(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0,
                                           int64_t r1, const float *const *x, int nt, float *out, int64_t ldo) {
    HR_Q8_ROWS_BODY(q8_tile_vnni, 8)
}

/* ---- batch layout ("chunk-transposed", AVX512-VNNI GEMM with >= HR_Q8T_MIN tokens): per 16-block chunk c,
 * vector m (0..3) holds in dword lane i the 4 packed bytes m of block 16c + i, after an in-register transpose of the
 * row's 256 packed bytes. Then all 16 lanes of the 8 dot products (low/high nibbles x 4) belong to the same block,
 * they accumulate in one int32 vector, and the scale work is one convert, multiply and FMA per 512 weights per token
 * (the per-group layout needs that per 128). Weight-side transposes are shared by the tile's tokens.
 * Per-token layout (q8t_stride(K) bytes, nch = ceil(K / 512) chunks of 640 bytes):
 *   int8 e[m][16][4], o[m][16][4] interleaved as [m][even 64 | odd 64]: lane i byte cc = column 8m + 2cc (+1) of
 *   block 16c + i; then int32 nc[16] = -12 * sum(q of block 16c + i); then float dh[16] = d(block 16c + i) / 2. */
#define HR_Q8T_MIN 4
static inline int64_t q8t_nch(int64_t k) { return (k + 511) / 512; }
static inline int64_t q8t_stride(int64_t k) { return q8t_nch(k) * 640; }

/* Layout A (one token, q8_quantize) -> layout B. */
static void q8t_from_q8(const uint8_t *a, int64_t k, uint8_t *bq) {
    const int64_t ng = q8_ngrp(k), nb = k / 32;
    const int8_t *qa = (const int8_t *)a;
    const int32_t *nca = (const int32_t *)(a + ng * 128);
    const float *dha = (const float *)(a + ng * 192);
    memset(bq, 0, (size_t)q8t_stride(k));
    for (int64_t b = 0; b < nb; b++) {
        const int64_t g = b >> 2, bl = b & 3, c = b >> 4, i = b & 15;
        const int8_t *qe = qa + g * 128 + bl * 16, *qo = qe + 64;
        int8_t *dst = (int8_t *)(bq + c * 640);
        for (int u = 0; u < 16; u++) { /* packed byte u: columns 2u (even) and 2u + 1 (odd) */
            const int m = u >> 2, cc = u & 3;
            dst[m * 128 + 4 * i + cc] = qe[u];
            dst[m * 128 + 64 + 4 * i + cc] = qo[u];
        }
        int32_t *nc = (int32_t *)(bq + c * 640 + 512);
        float *dh = (float *)(bq + c * 640 + 576);
        nc[i] = nca[g * 16 + bl * 4] + nca[g * 16 + bl * 4 + 1] + nca[g * 16 + bl * 4 + 2] + nca[g * 16 + bl * 4 + 3];
        dh[i] = dha[g * 16 + bl * 4];
    }
}

HR_AVX512VNNI static inline __attribute__((always_inline)) void
q8t_tile_vnni(const int NT, const uint8_t *w0, const uint8_t *s0, int64_t kb2, int64_t nb, const float *const *x,
              float *out, int64_t ldo) {
    const __m512i lut = _mm512_loadu_si512((const void *)FP4_U8_X4);
    const __m512i tr = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512 tiny = _mm512_set1_ps(0x1p-127f);
    const int64_t nch = q8t_nch(2 * kb2);
    __m512 acc[HR_Q8T_TT];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nch; c++) {
        const int64_t nbl = nb - 16 * c < 16 ? nb - 16 * c : 16;
        __m512i e = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8((__mmask16)((1u << nbl) - 1), s0 + 16 * c));
        __m512 ws = _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
        ws = _mm512_mask_mov_ps(ws, _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()), tiny);
        __m512i L[4];
        const uint8_t *wp = w0 + c * 256;
        for (int j = 0; j < 4; j++) {
            const int64_t off = c * 256 + j * 64;
            _mm_prefetch((const char *)(wp + j * 64 + HR_Q8_PF), HR_Q8_HINT);
            L[j] = off + 64 <= kb2 ? _mm512_loadu_si512((const void *)(wp + j * 64))
                   : off < kb2     ? _mm512_maskz_loadu_epi8((__mmask64)((1ull << (kb2 - off)) - 1), wp + j * 64)
                                   : _mm512_setzero_si512();
            L[j] = _mm512_permutexvar_epi32(tr, L[j]);
        }
        __m512i U0 = _mm512_shuffle_i32x4(L[0], L[1], _MM_SHUFFLE(1, 0, 1, 0));
        __m512i U1 = _mm512_shuffle_i32x4(L[0], L[1], _MM_SHUFFLE(3, 2, 3, 2));
        __m512i U2 = _mm512_shuffle_i32x4(L[2], L[3], _MM_SHUFFLE(1, 0, 1, 0));
        __m512i U3 = _mm512_shuffle_i32x4(L[2], L[3], _MM_SHUFFLE(3, 2, 3, 2));
        __m512i P[4] = {_mm512_shuffle_i32x4(U0, U2, _MM_SHUFFLE(2, 0, 2, 0)),
                        _mm512_shuffle_i32x4(U0, U2, _MM_SHUFFLE(3, 1, 3, 1)),
                        _mm512_shuffle_i32x4(U1, U3, _MM_SHUFFLE(2, 0, 2, 0)),
                        _mm512_shuffle_i32x4(U1, U3, _MM_SHUFFLE(3, 1, 3, 1))};
        __m512i lo[4], hi[4];
        for (int m = 0; m < 4; m++) {
            lo[m] = _mm512_permutexvar_epi8(P[m], lut);
            hi[m] = _mm512_permutexvar_epi8(_mm512_srli_epi16(P[m], 4), lut);
        }
#pragma GCC unroll 16
        for (int t = 0; t < NT; t++) {
            const uint8_t *xb = (const uint8_t *)x[t] + c * 640;
            __m512i sum = _mm512_loadu_si512((const void *)(xb + 512));
#pragma GCC unroll 4
            for (int m = 0; m < 4; m++) {
                sum = _mm512_dpbusd_epi32(sum, lo[m], _mm512_loadu_si512((const void *)(xb + m * 128)));
                sum = _mm512_dpbusd_epi32(sum, hi[m], _mm512_loadu_si512((const void *)(xb + m * 128 + 64)));
            }
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(ws, _mm512_loadu_ps((const float *)(xb + 576))),
                                     acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t * ldo] = _mm512_reduce_add_ps(acc[t]);
}

HR_AVX512VNNI static void fp4_rows_q8t_vnni(const uint8_t *w, const uint8_t *s, int64_t k, int64_t ks, int64_t r0,
                                            int64_t r1, const float *const *x, int nt, float *out, int64_t ldo) {
    const int64_t nb = k / 32, kb2 = k / 2;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *wr = w + r * kb2, *sr = s + r * ks;
        for (int t0 = 0; t0 < nt; t0 += HR_Q8T_TT) {
            const int n = nt - t0 < HR_Q8T_TT ? nt - t0 : HR_Q8T_TT;
            const float *const *xt = x + t0;
            float *ot = out + (r - r0) + t0 * ldo;
#define HR_Q8T_CASE(N) case N: q8t_tile_vnni(N, wr, sr, kb2, nb, xt, ot, ldo); break;
            switch (n) {
            HR_Q8T_CASE(1) HR_Q8T_CASE(2) HR_Q8T_CASE(3) HR_Q8T_CASE(4) HR_Q8T_CASE(5) HR_Q8T_CASE(6)
            HR_Q8T_CASE(7) HR_Q8T_CASE(8) HR_Q8T_CASE(9) HR_Q8T_CASE(10) HR_Q8T_CASE(11) HR_Q8T_CASE(12)
            HR_Q8T_CASE(13) HR_Q8T_CASE(14) HR_Q8T_CASE(15)
            default: q8t_tile_vnni(HR_Q8T_TT, wr, sr, kb2, nb, xt, ot, ldo); break;
            }
#undef HR_Q8T_CASE
        }
    }
}
#endif
#endif /* HR_X86 */

/* ------------------------------------------------------------------------------------------------ dispatch */

int hr_abi_version(void) { return HR_ABI_VERSION; }

int hr_path_supported(int path) {
    hr_init();
    if ((path & HR_ACT_BF16) && (path & HR_ACT_INT8)) return 0;
    if (path & HR_ACT_INT8) {
        int base = path & 0xFF;
        return base != HR_PATH_AUTO && hr_path_supported(base);
    }
    if (path & HR_ACT_BF16) {
#if HR_X86 && (defined(__clang__) || __GNUC__ >= 11)
        __builtin_cpu_init();
        return (path & 0xFF) == HR_PATH_AVX512 && hr_path_supported(HR_PATH_AVX512) &&
               __builtin_cpu_supports("avx512bf16");
#else
        return 0;
#endif
    }
    switch (path) {
    case HR_PATH_PORTABLE: return 1;
#if HR_X86
    case HR_PATH_AVX2:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case HR_PATH_AVX512:
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    default: return 0;
    }
}

int hr_best_path(void) {
    for (int p = HR_PATH_AVX512; p >= HR_PATH_PORTABLE; p--)
        if (hr_path_supported(p)) return p;
    return HR_PATH_PORTABLE;
}

static int resolve(int path) {
    hr_init();
    int act = path & (HR_ACT_BF16 | HR_ACT_INT8), base = path & 0xFF;
    if (base == HR_PATH_AUTO) base = (act & HR_ACT_BF16) ? HR_PATH_AVX512 : hr_best_path();
    return hr_path_supported(base | act) ? (base | act) : -1;
}

static uint16_t float_to_bf16(float f) { /* round to nearest even; weights and activations are finite */
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFF + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

static rows_fn pick_bf16_rows(int path, int fmt) {
#if HR_X86 && (defined(__clang__) || __GNUC__ >= 11)
    if ((path & HR_ACT_BF16) && fmt == HR_FMT_FP4) return fp4_rows_bf16_avx512;
#endif
    (void)path;
    (void)fmt;
    return NULL;
}

int hr_int8_impl(int path) {
    path = resolve(path | HR_ACT_INT8);
    if (path < 0) return 0;
#if HR_X86
    if ((path & 0xFF) == HR_PATH_AVX512) {
#ifdef HR_Q8_VNNI
        if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi")) return HR_INT8_VNNI;
#endif
        return HR_INT8_AVX2;
    }
    if ((path & 0xFF) == HR_PATH_AVX2) return HR_INT8_AVX2;
#endif
    return HR_INT8_PORTABLE;
}

/* int8-activation FP4 rows for a resolved path, or NULL when the path/format does not take int8 activations. */
static rows_fn pick_q8_rows(int path, int fmt) {
    if (!(path & HR_ACT_INT8) || fmt != HR_FMT_FP4) return NULL;
    switch (hr_int8_impl(path)) {
#if HR_X86
#ifdef HR_Q8_VNNI
    case HR_INT8_VNNI: return fp4_rows_q8_vnni;
#endif
    case HR_INT8_AVX2: return fp4_rows_q8_avx2;
#endif
    default: return fp4_rows_q8_portable;
    }
}

/* x [k] -> the p64 order of fp8_rows_p64_avx512: per 64 columns, [0-7, 16-23, 32-39, 48-55, 8-15, 24-31, 40-47,
 * 56-63] (the lane order two byte unpacks of a 512-bit register produce). */
static void fp8_p64_order(const float *x, float *y, int64_t k) {
    static const int src[8] = {0, 16, 32, 48, 8, 24, 40, 56};
    for (int64_t b = 0; b < k; b += 64)
        for (int q = 0; q < 8; q++) memcpy(y + b + 8 * q, x + b + src[q], 8 * sizeof(float));
}

/* The one-token FP8 rows that read activations in the p64 order, or NULL where the plain order is used. */
static rows_fn pick_fp8_p64(int path, int64_t k, int64_t t) {
#if HR_X86
    if ((path & 0xFF) == HR_PATH_AVX512 && t == 1 && k % 64 == 0) return fp8_rows_p64_avx512;
#endif
    (void)path;
    (void)k;
    (void)t;
    return NULL;
}

static rows_fn pick_rows(int path, int fmt) {
    path &= 0xFF;
#if HR_X86
    if (path == HR_PATH_AVX512) return fmt == HR_FMT_FP4 ? fp4_rows_avx512 : fp8_rows_avx512;
    if (path == HR_PATH_AVX2) return fmt == HR_FMT_FP4 ? fp4_rows_avx2 : fp8_rows_avx2;
#endif
    return fmt == HR_FMT_FP4 ? fp4_rows_portable : fp8_rows_portable;
}

/* Natural order -> per 32-block [even columns, odd columns], the FP4 kernels' activation layout. */
static void fp4_reorder(const float *x, float *y, int64_t k) {
    for (int64_t b = 0; b < k; b += 32)
        for (int j = 0; j < 16; j++) {
            y[b + j] = x[b + 2 * j];
            y[b + 16 + j] = x[b + 2 * j + 1];
        }
}

static inline int64_t fp4_pos(int64_t c) { return (c & ~(int64_t)31) + ((c & 1) ? 16 : 0) + ((c & 31) >> 1); }

static int64_t row_chunk(int64_t n, int64_t row_bytes) {
    /* Enough chunks to balance the threads; each chunk's weights fit in L2 so token tiles re-read them cheaply. */
    int64_t nt = hr_get_threads();
    int64_t rc = (n + 4 * nt - 1) / (4 * nt);
    int64_t cap = (256 * 1024) / (row_bytes > 0 ? row_bytes : 1);
    if (rc > cap) rc = cap;
    if (rc > HR_RC) rc = HR_RC;
    if (rc < 2) rc = 2;
    return rc + (rc & 1);
}

/* ---------------------------------------------------------------------------------------------- GEMM API */

typedef struct {
    rows_fn fn;
    const uint8_t *w, *s;
    int64_t n, k, ks, t, rc;
    const char *x;     /* [T, K], already in the kernel's layout (fp32, or bf16 for the bf16 rows) */
    int64_t x_row_bytes;
    float *y;          /* [T, N] */
    int tt; /* tokens per rows_fn call (0: HR_TT) */
    int64_t groups, per; /* block-diagonal: rows [g*per, (g+1)*per) read x[t, g, :] of x [T, groups, K] */
} gemm_ctx;

static void gemm_task(void *vctx, int64_t task) {
    gemm_ctx *c = (gemm_ctx *)vctx;
    int64_t r0 = task * c->rc, r1 = r0 + c->rc < c->n ? r0 + c->rc : c->n;
    const float *xp[HR_Q8T_TT];
    const int tt = c->tt ? c->tt : HR_TT;
    for (int64_t t0 = 0; t0 < c->t; t0 += tt) {
        int nt = c->t - t0 < tt ? (int)(c->t - t0) : tt;
        const int64_t g = r0 / c->per;
        for (int j = 0; j < nt; j++) xp[j] = (const float *)(c->x + ((t0 + j) * c->groups + g) * c->x_row_bytes);
        c->fn(c->w, c->s, c->k, c->ks, r0, r1, xp, nt, c->y + t0 * c->n + r0, c->n);
    }
}

typedef struct {
    int path, transposed; /* transposed: write the batch layout (q8t) */
    const float *x;
    int64_t k;
    uint8_t *xq;
    int rc;
} q8_ctx;

static void q8_task(void *vctx, int64_t task) {
    q8_ctx *c = (q8_ctx *)vctx;
    if (!c->transposed) {
        q8_quantize(c->path, c->x + task * c->k, c->k, c->xq + task * q8_stride(c->k));
        return;
    }
#ifdef HR_Q8_VNNI
    uint8_t *tmp = q8_alloc(1, c->k);
    if (!tmp) {
        c->rc = HR_E_NOMEM;
        return;
    }
    q8_quantize(c->path, c->x + task * c->k, c->k, tmp);
    q8t_from_q8(tmp, c->k, c->xq + task * q8t_stride(c->k));
    free(tmp);
#endif
}

static int gemm(int path, int fmt, const uint8_t *w, const uint8_t *s, int64_t n, int64_t k, const float *x,
                int64_t t, int64_t groups, float *y) {
    path = resolve(path);
    if (path < 0) return HR_E_PATH;
    if (n <= 0 || k <= 0 || t <= 0 || (fmt == HR_FMT_FP4 && k % 32)) return HR_E_SHAPE;
    /* Grouped (block-diagonal) FP8 only: whole 128-row scale blocks per group, activations used in place. */
    if (groups < 1 || (groups > 1 && (fmt != HR_FMT_FP8 || n % groups || (n / groups) % HR_FP8_BLOCK))) return HR_E_SHAPE;
    rows_fn bf = t > 1 ? pick_bf16_rows(path, fmt) : NULL; /* bf16 activations only pay off for batches */
    rows_fn q8 = pick_q8_rows(path, fmt);
    void *buf = NULL;
    gemm_ctx c = {bf ? bf : (q8 ? q8 : pick_rows(path, fmt)), w, s, n, k, 0, t, 0, (const char *)x, k * 4, y, 0,
                  groups, n / groups};
    if (q8) {
        int transposed = 0;
#ifdef HR_Q8_VNNI
        if (t >= HR_Q8T_MIN && q8 == fp4_rows_q8_vnni) { /* batches: the chunk-transposed layout and kernel */
            transposed = 1;
            c.fn = fp4_rows_q8t_vnni;
            c.tt = HR_Q8T_TT;
        }
#endif
        int64_t stride = q8_stride(k);
#ifdef HR_Q8_VNNI
        if (transposed) stride = q8t_stride(k);
#endif
        uint8_t *xq = (uint8_t *)aligned_alloc(64, (size_t)(t * stride));
        if (!xq) return HR_E_NOMEM;
        q8_ctx qc = {path, transposed, x, k, xq, HR_OK};
        hr_parallel(q8_task, &qc, t);
        if (qc.rc != HR_OK) {
            free(xq);
            return qc.rc;
        }
        buf = xq;
        c.x_row_bytes = stride;
    } else if (bf) {
        uint16_t *xb = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(t * k));
        if (!xb) return HR_E_NOMEM;
        for (int64_t i = 0; i < t * k; i++) xb[i] = float_to_bf16(x[i]);
        buf = xb;
        c.x_row_bytes = k * 2;
    } else if (fmt == HR_FMT_FP4) {
        float *xr = (float *)malloc(sizeof(float) * (size_t)(t * k));
        if (!xr) return HR_E_NOMEM;
        for (int64_t i = 0; i < t; i++) fp4_reorder(x + i * k, xr + i * k, k);
        buf = xr;
    } else if (pick_fp8_p64(path, k, t)) { /* one token (one row per group): the p64 activation order */
        float *xr = (float *)malloc(sizeof(float) * (size_t)(groups * k));
        if (!xr) return HR_E_NOMEM;
        for (int64_t i = 0; i < groups; i++) fp8_p64_order(x + i * k, xr + i * k, k);
        buf = xr;
        c.fn = pick_fp8_p64(path, k, t);
    }
    if (buf) c.x = (const char *)buf;
    c.ks = fmt == HR_FMT_FP4 ? k / 32 : (k + HR_FP8_BLOCK - 1) / HR_FP8_BLOCK;
    c.rc = row_chunk(n, fmt == HR_FMT_FP4 ? k / 2 : k);
    c.rc += (4 - c.rc % 4) % 4; /* whole 4-row tiles */
    if (groups > 1) /* a chunk never straddles two groups (per is a multiple of 128, rc of 4) */
        while (c.per % c.rc) c.rc -= 4;
    hr_parallel(gemm_task, &c, (n + c.rc - 1) / c.rc);
    free(buf);
    return HR_OK;
}

int hr_fp4_gemm(int path, const uint8_t *w, const uint8_t *s, int64_t n, int64_t k, const float *x, int64_t t,
                float *y) {
    return gemm(path, HR_FMT_FP4, w, s, n, k, x, t, 1, y);
}

int hr_fp8_gemm(int path, const uint8_t *w, const uint8_t *s, int64_t n, int64_t k, const float *x, int64_t t,
                float *y) {
    return gemm(path, HR_FMT_FP8, w, s, n, k, x, t, 1, y);
}

int hr_fp8_gemm_grouped(int path, const uint8_t *w, const uint8_t *s, int64_t n, int64_t k, const float *x, int64_t t,
                        int64_t groups, float *y) {
    return gemm(path, HR_FMT_FP8, w, s, n, k, x, t, groups, y);
}

/* ---------------------------------------------------------------------------------------- fused MoE op */

typedef struct {
    rows_fn fn, bf; /* bf: bf16-activation rows for tiles of >= 2 tokens, or NULL */
    int fmt;
    const int64_t *table;
    int64_t d, i, ks1, ks2, rc1, rc2, nch1, ngroups;
    float limit;
    const float *x;     /* [T, D] in the kernel layout */
    const int64_t *gstart; /* group g = entries [gstart[g], gstart[g+1]) of one expert */
    const int64_t *ent_e, *ent_t;
    const float *ent_w;
    float *h; /* [n_entries, I] in the kernel layout of w2 */
    const uint16_t *xb; /* bf16 mode: x [T, D] and h [n_entries, I] as bf16, natural order */
    uint16_t *hb;
    const uint8_t *xq; /* int8 mode: x [T] and h [n_entries] quantized, rows of xq_stride / hq_stride bytes */
    uint8_t *hq;
    int64_t xq_stride, hq_stride;
    float *hres; /* int8 mode: [n_entries, I] scratch for the residuals */
    int path;
    float *out;
} moe_ctx;

static void moe_up_task(void *vctx, int64_t task) {
    /* gate/up rows [r0, r1) of one expert for all of its tokens, then the clamped SwiGLU into h */
    moe_ctx *c = (moe_ctx *)vctx;
    int64_t g = task / c->nch1, ch = task % c->nch1;
    int64_t r0 = ch * c->rc1, r1 = r0 + c->rc1 < c->i ? r0 + c->rc1 : c->i, nr = r1 - r0;
    const int64_t *p = c->table + c->ent_e[c->gstart[g]] * 6;
    const uint8_t *w1 = (const uint8_t *)(intptr_t)p[0], *s1 = (const uint8_t *)(intptr_t)p[1];
    const uint8_t *w3 = (const uint8_t *)(intptr_t)p[2], *s3 = (const uint8_t *)(intptr_t)p[3];
    float gb[HR_TT * HR_RC], ub[HR_TT * HR_RC];
    const float *xp[HR_TT];
    const float lim = c->limit;
    for (int64_t j0 = c->gstart[g]; j0 < c->gstart[g + 1]; j0 += HR_TT) {
        int nt = c->gstart[g + 1] - j0 < HR_TT ? (int)(c->gstart[g + 1] - j0) : HR_TT;
        rows_fn fn = c->bf && nt > 1 ? c->bf : c->fn;
        for (int j = 0; j < nt; j++)
            xp[j] = c->xq ? (const float *)(c->xq + c->ent_t[j0 + j] * c->xq_stride)
                    : fn == c->bf ? (const float *)(c->xb + c->ent_t[j0 + j] * c->d)
                                  : c->x + c->ent_t[j0 + j] * c->d;
        fn(w1, s1, c->d, c->ks1, r0, r1, xp, nt, gb, HR_RC);
        fn(w3, s3, c->d, c->ks1, r0, r1, xp, nt, ub, HR_RC);
        for (int j = 0; j < nt; j++) {
            float *hj = c->h + (j0 + j) * c->i;
            for (int64_t r = 0; r < nr; r++) {
                float gv = gb[j * HR_RC + r], uv = ub[j * HR_RC + r];
                gv = gv < lim ? gv : lim;
                uv = uv < -lim ? -lim : (uv > lim ? lim : uv);
                float hv = gv / (1.0f + expf(-gv)) * uv;
                int64_t col = r0 + r;
                hj[c->fmt == HR_FMT_FP4 && !c->hq ? fp4_pos(col) : col] = hv; /* int8 mode quantizes it later */
                if (c->hb) c->hb[(j0 + j) * c->i + col] = float_to_bf16(hv);
            }
        }
    }
}

/* x - dequant(row q) in fp32, natural order: the residual left by quantizing x into q. */
static void q8_residual(const float *x, int64_t k, const uint8_t *qrow, float *r) {
    const int64_t ng = q8_ngrp(k);
    const int8_t *q = (const int8_t *)qrow;
    const float *dh = (const float *)(qrow + ng * 192);
    for (int64_t b = 0; b < k / 32; b++) {
        const int64_t g = b >> 2, bl = b & 3;
        const float d = 2.0f * dh[g * 16 + bl * 4];
        const int8_t *qe = q + g * 128 + bl * 16, *qo = qe + 64;
        for (int j = 0; j < 16; j++) {
            float pe = (float)qe[j] * d, po = (float)qo[j] * d; /* separate roundings, as the torch mirror */
            r[b * 32 + 2 * j] = x[b * 32 + 2 * j] - pe;
            r[b * 32 + 2 * j + 1] = x[b * 32 + 2 * j + 1] - po;
        }
    }
}

static void moe_quant_task(void *vctx, int64_t task) {
    /* int8 mode: entry `task`'s hidden activation (natural order) -> two quantized rows, the value and its residual,
     * which the down projection runs as two tokens through the same decoded weights and sums: the SwiGLU product is
     * heavy-tailed, and one int8 rounding of it would add about as much error as the input's (fused ~1.1e-2). */
    moe_ctx *c = (moe_ctx *)vctx;
    const float *h = c->h + task * c->i;
    uint8_t *q1 = c->hq + 2 * task * c->hq_stride;
    float *r = c->hres + task * c->i;
    q8_quantize(c->path, h, c->i, q1);
    q8_residual(h, c->i, q1, r);
    q8_quantize(c->path, r, c->i, q1 + c->hq_stride);
}

static void moe_down_task(void *vctx, int64_t task) {
    /* down rows [r0, r1) for every expert and token: this task owns out[:, r0:r1], so no write races */
    moe_ctx *c = (moe_ctx *)vctx;
    int64_t r0 = task * c->rc2, r1 = r0 + c->rc2 < c->d ? r0 + c->rc2 : c->d, nr = r1 - r0;
    float yb[HR_TT * HR_RC];
    const float *xp[HR_TT];
    for (int64_t g = 0; g < c->ngroups; g++) {
        const int64_t *p = c->table + c->ent_e[c->gstart[g]] * 6;
        const uint8_t *w2 = (const uint8_t *)(intptr_t)p[4], *s2 = (const uint8_t *)(intptr_t)p[5];
        const int per = c->hq ? 2 : 1; /* int8: value and residual rows per entry */
        for (int64_t j0 = c->gstart[g]; j0 < c->gstart[g + 1]; j0 += HR_TT / per) {
            int nt = c->gstart[g + 1] - j0 < HR_TT / per ? (int)(c->gstart[g + 1] - j0) : HR_TT / per;
            rows_fn fn = c->bf && nt > 1 ? c->bf : c->fn;
            for (int j = 0; j < nt * per; j++)
                xp[j] = c->hq ? (const float *)(c->hq + (2 * j0 + j) * c->hq_stride)
                        : fn == c->bf ? (const float *)(c->hb + (j0 + j) * c->i)
                                      : c->h + (j0 + j) * c->i;
            fn(w2, s2, c->i, c->ks2, r0, r1, xp, nt * per, yb, HR_RC);
            for (int j = 0; j < nt; j++) {
                float wj = c->ent_w[j0 + j], *o = c->out + c->ent_t[j0 + j] * c->d + r0;
                if (per == 2) {
                    for (int64_t r = 0; r < nr; r++) o[r] += wj * (yb[2 * j * HR_RC + r] + yb[(2 * j + 1) * HR_RC + r]);
                } else {
                    for (int64_t r = 0; r < nr; r++) o[r] += wj * yb[j * HR_RC + r];
                }
            }
        }
    }
}

int hr_moe_forward(int path, int fmt, const int64_t *table, int64_t n_table, int64_t d, int64_t i, const float *x,
                   int64_t t, const int64_t *ids, const float *wts, int64_t k, float limit, float *out) {
    path = resolve(path);
    if (path < 0) return HR_E_PATH;
    if (d <= 0 || i <= 0 || t <= 0 || k <= 0 || (fmt != HR_FMT_FP4 && fmt != HR_FMT_FP8)) return HR_E_SHAPE;
    if (fmt == HR_FMT_FP4 && (d % 32 || i % 32)) return HR_E_SHAPE;
    int64_t n = t * k;
    for (int64_t j = 0; j < n; j++) {
        if (ids[j] < 0 || ids[j] >= n_table) return HR_E_IDS;
        for (int q = 0; q < 6; q++)
            if (!table[ids[j] * 6 + q]) return HR_E_IDS;
    }
    /* group the (token, slot) entries by expert with a counting sort; token order is kept inside a group */
    int64_t *cnt = (int64_t *)calloc((size_t)n_table + 1, sizeof(int64_t));
    int64_t *ent_e = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    int64_t *ent_t = (int64_t *)malloc(sizeof(int64_t) * (size_t)n);
    float *ent_w = (float *)malloc(sizeof(float) * (size_t)n);
    int64_t *gstart = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n + 1));
    float *h = (float *)malloc(sizeof(float) * (size_t)(n * i));
    float *xr = fmt == HR_FMT_FP4 ? (float *)malloc(sizeof(float) * (size_t)(t * d)) : NULL;
    rows_fn bf = n > 1 ? pick_bf16_rows(path, fmt) : NULL;
    rows_fn q8 = pick_q8_rows(path, fmt);
    uint16_t *xb = bf ? (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(t * d)) : NULL;
    uint16_t *hb = bf ? (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(n * i)) : NULL;
    uint8_t *xq = q8 ? q8_alloc(t, d) : NULL, *hq = q8 ? q8_alloc(2 * n, i) : NULL;
    float *hres = q8 ? (float *)malloc(sizeof(float) * (size_t)(n * i)) : NULL;
    int rc = HR_OK;
    if (!cnt || !ent_e || !ent_t || !ent_w || !gstart || !h || (fmt == HR_FMT_FP4 && !xr) || (bf && (!xb || !hb)) ||
        (q8 && (!xq || !hq || !hres))) {
        rc = HR_E_NOMEM;
        goto done;
    }
    for (int64_t j = 0; j < n; j++) cnt[ids[j] + 1]++;
    for (int64_t e = 0; e < n_table; e++) cnt[e + 1] += cnt[e];
    int64_t ngroups = 0;
    for (int64_t e = 0; e < n_table; e++)
        if (cnt[e + 1] > cnt[e]) gstart[ngroups++] = cnt[e];
    gstart[ngroups] = n;
    for (int64_t j = 0; j < n; j++) {
        int64_t pos = cnt[ids[j]]++;
        ent_e[pos] = ids[j];
        ent_t[pos] = j / k;
        ent_w[pos] = wts[j];
    }
    if (xr)
        for (int64_t q = 0; q < t; q++) fp4_reorder(x + q * d, xr + q * d, d);
    if (xb)
        for (int64_t q = 0; q < t * d; q++) xb[q] = float_to_bf16(x[q]);
    if (xq)
        for (int64_t q = 0; q < t; q++) q8_quantize(path, x + q * d, d, xq + q * q8_stride(d));
    moe_ctx c;
    memset(&c, 0, sizeof(c));
    c.fn = q8 ? q8 : pick_rows(path, fmt);
    c.xq = xq;
    c.hq = hq;
    c.path = path;
    c.hres = hres;
    c.xq_stride = q8_stride(d);
    c.hq_stride = q8_stride(i);
    c.bf = bf;
    c.xb = xb;
    c.hb = hb;
    c.fmt = fmt;
    c.table = table;
    c.d = d;
    c.i = i;
    c.ks1 = fmt == HR_FMT_FP4 ? d / 32 : (d + HR_FP8_BLOCK - 1) / HR_FP8_BLOCK;
    c.ks2 = fmt == HR_FMT_FP4 ? i / 32 : (i + HR_FP8_BLOCK - 1) / HR_FP8_BLOCK;
    c.rc1 = HR_RC;
    c.rc2 = HR_RC;
    c.nch1 = (i + c.rc1 - 1) / c.rc1;
    c.ngroups = ngroups;
    c.limit = limit;
    c.x = xr ? xr : x;
    c.gstart = gstart;
    c.ent_e = ent_e;
    c.ent_t = ent_t;
    c.ent_w = ent_w;
    c.h = h;
    c.out = out;
    hr_parallel(moe_up_task, &c, ngroups * c.nch1);
    if (hq) hr_parallel(moe_quant_task, &c, n);
    memset(out, 0, sizeof(float) * (size_t)(t * d));
    hr_parallel(moe_down_task, &c, (d + c.rc2 - 1) / c.rc2);
done:
    free(cnt);
    free(ent_e);
    free(ent_t);
    free(ent_w);
    free(gstart);
    free(h);
    free(xr);
    free(xb);
    free(hb);
    free(xq);
    free(hq);
    free(hres);
    return rc;
}

/* ------------------------------------------------------------------------------------------ read bandwidth */

typedef struct {
    int path;
    const uint8_t *p;
    int64_t n, chunk;
    atomic_ullong sum;
} read_ctx;

static void read_task(void *vctx, int64_t task) {
    read_ctx *c = (read_ctx *)vctx;
    int64_t a = task * c->chunk, len = a + c->chunk < c->n ? c->chunk : c->n - a;
    uint64_t v;
#if HR_X86
    if (c->path == HR_PATH_AVX512)
        v = read_sum_avx512(c->p + a, len);
    else if (c->path == HR_PATH_AVX2)
        v = read_sum_avx2(c->p + a, len);
    else
#endif
        v = read_sum_portable(c->p + a, len);
    atomic_fetch_xor(&c->sum, v);
}

uint64_t hr_read_sum(int path, const void *buf, int64_t nbytes) {
    path = resolve(path);
    if (path < 0 || nbytes <= 0) return 0;
    path &= 0xFF;
    /* 1 MiB chunks keep the streams long for the prefetchers; the pointer must be 64-byte aligned for the SIMD
     * loads, so the unaligned head is read by the portable loop. */
    const uint8_t *p = (const uint8_t *)buf;
    uint64_t head = 0;
    int64_t mis = (int64_t)((64 - ((uintptr_t)p & 63)) & 63);
    if (mis > nbytes) mis = nbytes;
    head = read_sum_portable(p, mis);
    read_ctx c;
    c.path = path;
    c.p = p + mis;
    c.n = nbytes - mis;
    c.chunk = 1 << 20;
    atomic_init(&c.sum, 0);
    hr_parallel(read_task, &c, (c.n + c.chunk - 1) / c.chunk);
    return atomic_load(&c.sum) ^ head;
}

/* BF16 dense weights x fp32 activations (head, compressors, routers); shares the pool above. */
#include "hr_dense.inc"
