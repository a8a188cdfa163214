/* Issue 19: the per-call cost of re-quantizing an FP8 (e4m3) weight to int8 with one power-of-two scale per
 * (row, 32 columns), the weight side of an int8 x int8 dense linear (benchmarks/prefill_cpu.md, "int8 x int8 for the
 * dense FP8 linears?"). e4m3 codes are monotonic in magnitude, so a block's shift is a table lookup on its largest
 * code; each byte is then one 128-entry table lookup (vpermi2b) for its block's shift, and the sign is applied with a
 * masked subtract. Checked against a scalar reference (exit 1 on a difference); single thread; prints ms per matrix
 * and ns per weight, median of the reps.
 *
 *   gcc -O3 -march=native benchmarks/fp8_int8_requant.c -o /tmp/fp8_int8_requant && /tmp/fp8_int8_requant 20
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NSHIFT 16
static int8_t lut[NSHIFT][128] __attribute__((aligned(64)));
static uint8_t shift_of[128];

static double units(int c) { /* e4m3 magnitude code -> value / 2^-9 (integer) */
    int e = c >> 3, f = c & 7;
    return e == 0 ? f : (double)(8 + f) * (double)(1 << (e - 1));
}

static void tables(void) {
    for (int c = 0; c < 128; c++) {
        int s = 0;
        while (nearbyint(units(c) / ldexp(1.0, s)) > 127) s++;
        shift_of[c] = (uint8_t)s;
    }
    for (int s = 0; s < NSHIFT; s++)
        for (int c = 0; c < 128; c++) {
            double q = nearbyint(units(c) / ldexp(1.0, s)); /* round half even (default mode) */
            lut[s][c] = (int8_t)(q > 127 ? 127 : q);
        }
}

static void requant_ref(const uint8_t *w, size_t nk, int8_t *q, uint8_t *sh) {
    for (size_t b = 0; b < nk / 32; b++) {
        uint8_t m = 0;
        for (int i = 0; i < 32; i++) m = (w[b * 32 + i] & 0x7f) > m ? (w[b * 32 + i] & 0x7f) : m;
        int s = shift_of[m];
        sh[b] = (uint8_t)s;
        for (int i = 0; i < 32; i++) {
            uint8_t c = w[b * 32 + i];
            int v = lut[s][c & 0x7f];
            q[b * 32 + i] = (int8_t)((c & 0x80) ? -v : v);
        }
    }
}

static inline int hmax32(__m256i x) {
    x = _mm256_max_epu8(x, _mm256_permute2x128_si256(x, x, 1));
    x = _mm256_max_epu8(x, _mm256_srli_si256(x, 8));
    x = _mm256_max_epu8(x, _mm256_srli_si256(x, 4));
    x = _mm256_max_epu8(x, _mm256_srli_si256(x, 2));
    x = _mm256_max_epu8(x, _mm256_srli_si256(x, 1));
    return _mm256_extract_epi8(x, 0);
}

static void requant_avx512(const uint8_t *w, size_t nk, int8_t *q, uint8_t *sh) {
    const __m512i low7 = _mm512_set1_epi8(0x7f), zero = _mm512_setzero_si512();
    for (size_t b = 0; b < nk / 64; b++) {
        __m512i c = _mm512_loadu_si512(w + b * 64);
        __m512i a = _mm512_and_si512(c, low7);
        int s0 = shift_of[hmax32(_mm512_castsi512_si256(a))];
        int s1 = shift_of[hmax32(_mm512_extracti64x4_epi64(a, 1))];
        sh[2 * b] = (uint8_t)s0, sh[2 * b + 1] = (uint8_t)s1;
        /* both lookups always: real blocks' shifts differ often, and a branch on it would mispredict */
        __m512i r0 = _mm512_permutex2var_epi8(_mm512_load_si512(lut[s0]), a, _mm512_load_si512(lut[s0] + 64));
        __m512i r1 = _mm512_permutex2var_epi8(_mm512_load_si512(lut[s1]), a, _mm512_load_si512(lut[s1] + 64));
        __m512i r = _mm512_mask_blend_epi8(0xFFFFFFFF00000000ull, r0, r1);
        r = _mm512_mask_sub_epi8(r, _mm512_movepi8_mask(c), zero, r);
        _mm512_storeu_si512(q + b * 64, r);
    }
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int reps = argc > 1 ? atoi(argv[1]) : 20;
    if (reps < 1 || reps > 1000) {
        fprintf(stderr, "fp8_int8_requant: reps %d must be in 1..1000\n", reps);
        return 2;
    }
    tables();
    const int shapes[3][2] = {{4096, 4096}, {32768, 1024}, {4096, 1024}};
    for (int si = 0; si < 3; si++) {
        size_t nk = (size_t)shapes[si][0] * shapes[si][1];
        uint8_t *w = malloc(nk), *sh = malloc(nk / 32), *sh_ref = malloc(nk / 32);
        int8_t *q = malloc(nk), *q_ref = malloc(nk);
        srand(si + 1);
        for (size_t i = 0; i < nk; i++) { /* e4m3 codes, no NaN (0x7f / 0xff) */
            uint8_t c = (uint8_t)(rand() & 0xff);
            w[i] = (c & 0x7f) == 0x7f ? c - 1 : c;
        }
        requant_ref(w, nk, q_ref, sh_ref);
        requant_avx512(w, nk, q, sh);
        if (memcmp(q, q_ref, nk) || memcmp(sh, sh_ref, nk / 32)) {
            fprintf(stderr, "fp8_int8_requant: AVX-512 result differs from the scalar reference\n");
            return 1;
        }
        double *t = malloc(sizeof(double) * reps);
        for (int r = 0; r < reps; r++) {
            double t0 = now();
            requant_avx512(w, nk, q, sh);
            t[r] = now() - t0;
        }
        qsort(t, reps, sizeof(double), cmp);
        printf("%dx%d: %.2f ms CPU, %.3f ns per weight (median of %d)\n", shapes[si][0], shapes[si][1],
               t[reps / 2] * 1e3, t[reps / 2] * 1e9 / nk, reps);
        free(w), free(sh), free(sh_ref), free(q), free(q_ref), free(t);
    }
    return 0;
}
