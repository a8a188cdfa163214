/* homerun native CPU expert kernels: the C ABI loaded by offload/cpu_experts.py through ctypes.
 *
 * Weight formats (see homerun/quant.py):
 *   FP4: uint8 codes [N, K/2] (low nibble = even column, e2m1, bit 3 = sign) + e8m0 scales [N, K/32].
 *   FP8: e4m3fn bytes [N, K] + e8m0 scales [ceil(N/128), ceil(K/128)].
 * Activations stay fp32 (exact up to summation order) unless a path carries HR_ACT_BF16 or HR_ACT_INT8.
 * Every entry point returns 0 on success or a negative HR_E* code; nothing here prints or aborts.
 */
#ifndef HR_KERNELS_H
#define HR_KERNELS_H

#include <stdint.h>

#define HR_ABI_VERSION 5

/* Code paths; HR_PATH_AUTO picks the best one this CPU supports. */
#define HR_PATH_AUTO 0
#define HR_PATH_PORTABLE 1
#define HR_PATH_AVX2 2
#define HR_PATH_AVX512 3

/* OR into a path: FP4 batches (>= 2 tokens per weight) round activations to bf16 and use vdpbf16ps; single tokens
 * and FP8 stay fp32. Needs AVX512-BF16. */
#define HR_ACT_BF16 0x100

/* OR into a path: FP4 weights take int8 activations, every token count (GEMV, GEMM and both halves of the fused op;
 * the hidden activation between up and down is re-quantized as an int8 value plus an int8 residual). Quantization:
 * per 32-column block, symmetric, d = amax / 127 (fp32), q = round-half-even(x * (1 / d)) clamped to [-127, 127],
 * q = 0 where d = 0. The dot of a block is the exact int32 sum of q times 2 * e2m1 weight, scaled by weight e8m0
 * scale * d / 2 in fp32 (AVX2 batches of >= 4 tokens: rows whose e8m0 exponents span <= 14 take the power of two
 * into the integer dot and subtract the unsigned weights' offset in fp32, ~5e-7 relative from the exact form). FP8
 * weights keep fp32 activations. Every path supports it: AVX512-VNNI+VBMI (vpdpbusd), AVX2 (vpmaddubsw; also
 * AVX-512 CPUs without VNNI/VBMI), and portable C computing the same integers. */
#define HR_ACT_INT8 0x200

/* hr_int8_impl: which int8 kernel a path runs */
#define HR_INT8_PORTABLE 1
#define HR_INT8_AVX2 2
#define HR_INT8_VNNI 3

#define HR_FMT_FP4 0
#define HR_FMT_FP8 1

#define HR_OK 0
#define HR_E_PATH (-1)  /* requested path not compiled in or not supported by this CPU */
#define HR_E_SHAPE (-2) /* K not a multiple of 32 for FP4, or a non-positive dimension */
#define HR_E_IDS (-3)   /* an expert id outside the table, or a table entry with a null pointer */
#define HR_E_NOMEM (-4)

#ifdef __cplusplus
extern "C" {
#endif

int hr_abi_version(void);
int hr_best_path(void);
int hr_path_supported(int path);
const char *hr_src_hash(void); /* the build's source hash (HR_SRC_HASH), "" when built without one */
int hr_get_threads(void);
int hr_set_threads(int n); /* n <= 0: all CPUs this process may run on */
int hr_set_spin_us(int us); /* how long idle pool threads spin before sleeping; returns the previous value */
int hr_int8_impl(int path); /* HR_INT8_* for path's int8 activations, 0 if unsupported */

/* Y[T, N] = X[T, K] @ dequant(W)^T, X and Y fp32 row-major. */
int hr_fp4_gemm(int path, const uint8_t *w, const uint8_t *s, int64_t n, int64_t k, const float *x, int64_t t,
                float *y);
int hr_fp8_gemm(int path, const uint8_t *w, const uint8_t *s, int64_t n, int64_t k, const float *x, int64_t t,
                float *y);
/* Block-diagonal FP8: X [T, G, K], rows [g*N/G, (g+1)*N/G) of W use X[t, g]; Y [T, N]. N/G a multiple of 128. */
int hr_fp8_gemm_grouped(int path, const uint8_t *w, const uint8_t *s, int64_t n, int64_t k, const float *x, int64_t t,
                        int64_t groups, float *y);

/* Fused routed experts of one layer: out[T, D] = sum_j wts[t, j] * expert_{ids[t, j]}(x[t]).
 * table[e * 6 + {0..5}] = addresses of w1, w1_scale, w3, w3_scale, w2, w2_scale of expert e (0 = not loaded).
 * w1/w3 are [I, D] and w2 is [D, I] in the format fmt. SwiGLU: g = min(g, limit), u = clamp(u, -limit, limit). */
int hr_moe_forward(int path, int fmt, const int64_t *table, int64_t n_table, int64_t d, int64_t i, const float *x,
                   int64_t t, const int64_t *ids, const float *wts, int64_t k, float limit, float *out);

/* Multi-threaded streaming read of nbytes (a STREAM-like read kernel); returns a checksum so it is not elided. */
uint64_t hr_read_sum(int path, const void *buf, int64_t nbytes);

/* Y[T, N] = X[T, K] @ W^T for bf16 W [N, K] (row-major) and fp32 X, Y: bf16 -> fp32 is exact, so only the
 * summation order differs from an fp32 matmul (hr_dense.inc). */
int hr_bf16_gemm(int path, const uint16_t *w, int64_t n, int64_t k, const float *x, int64_t t, float *y);

/* In-place Sinkhorn of t row-major n x n fp32 matrices: a column pass, then (iters - 1) x (rows, columns), each
 * dividing by (sum + eps) (mHC's residual mixing, hr_dense.inc). */
int hr_sinkhorn(float *m, int64_t t, int64_t n, int64_t iters, float eps);

/* mHC stream mixes (hr_dense.inc): out[t] = sum_i pre[t, i] x[t, i]; out[t, j] = post[t, j] y[t] + sum_i comb[t, i, j]
 * x[t, i]. fp32, contiguous, on the calling thread. */
/* mHC's per-token weights from x [T, n*D]: pre [T, n], post [T, n], comb [T, n, n] (m = (2+n)n rows of fn), or pre
 * only (m = n, the head; post and comb may be NULL). */
int hr_hc_weights(int path, const float *x, int64_t t, int64_t n, int64_t d, const float *fn, int64_t m,
                  const float *scale, const float *base, float norm_eps, float hc_eps, int64_t iters, float *pre,
                  float *post, float *comb);
/* RMSNorm (norm != 0; times w unless NULL) then interleaved RoPE of the trailing rope_dim channels of x [rows, d],
 * row r using cos/sin row r / per_token ([T, rope_dim/2]; inverse negates sin). y may alias x. */
int hr_norm_rope(int path, const float *x, float *y, int64_t rows, int64_t d, const float *w, float eps, int norm,
                 const float *cosv, const float *sinv, int64_t rope_dim, int64_t per_token, int inverse);
/* Several matrices times one input x [T, K] fp32 in one dispatch. Job j is jobs[5j..5j+4] = {fmt (1: FP8 with
 * ue8m0 128x128 scales, 7: bf16), weight, scale (FP8, else 0), n, y [T, n] fp32}; at most 16 jobs. */
int hr_multi_gemm(int path, const int64_t *jobs, int64_t njobs, int64_t k, const float *x, int64_t t);
/* One query's attention, all heads over shared rows: out[h] = softmax([scale q[h].kv[j]]_j ++ [sink[h]])[:n] @ kv.
 * q [H, D], kv [N, D], sink [H], out [H, D] fp32. */
int hr_attend_one(int path, const float *q, const float *kv, int64_t n, int64_t h, int64_t d, const float *sink,
                  float scale, float *out);
/* Prefill attention of t consecutive queries (hr_attend.inc): q [t, h, d] at absolute positions q_pos0.., over the
 * window's key rows keys [n_keys, d] at positions key_pos0.. (visible iff pos - window < kpos <= pos) and compressed
 * rows comp [n_comp, d] (entry c closed for the query at pos iff c < (pos + 1) / rate): every closed one (sel NULL)
 * or the closed ones of sel [t, k_sel] (int64); softmax with sink [h] in the denominator; out [t, h, d] fp32.
 * HR_E_IDS: a listed closed entry past n_comp. */
int hr_attend_prefill(int path, const float *q, int64_t t, int64_t h, int64_t d, const float *keys, int64_t n_keys,
                      int64_t key_pos0, int64_t window, const float *comp, int64_t n_comp, const int64_t *sel,
                      int64_t k_sel, int64_t q_pos0, int64_t rate, const float *sink, float scale, float *out);
/* The lightning indexer's prefill top-k (hr_index.inc): packed queries qt [nq, di, hp] (heads last, hp a multiple of
 * 32, padded heads zero) with head weights w [nq, hp] over keys in pages: page p holds rows [page_r0[p],
 * page_r0[p + 1]) as fp32 [rows, di] at pages[p] (n_pages + 1 bounds); key n is visible to query q iff n < thr[q]
 * (thr NULL: all). Each query's running picks are `splits` candidate lists of up to 2k entries, best_v/best_i
 * [nq, splits, 2k] and their fill best_n [nq, splits] (zero before the first call), updated in place, so the keys
 * may come over several calls. With out (the last call): each query's k_out <= k best picks, higher score first and
 * lower index first on equal scores, to out [nq, k_out] (-1, and -inf in out_v when not NULL, past the visible
 * keys). */
int hr_index_topk(int path, const float *qt, const float *w, int64_t nq, int64_t hp, int64_t di,
                  const float *const *pages, const int64_t *page_r0, int64_t n_pages, const int64_t *thr, int64_t k,
                  int64_t splits, float scale, float *best_v, int64_t *best_i, int64_t *best_n, int64_t k_out,
                  int64_t *out, float *out_v);
int hr_hc_pre(const float *pre, const float *x, float *out, int64_t t, int64_t n, int64_t d);
int hr_hc_post(const float *post, const float *y, const float *comb, const float *x, float *out, int64_t t, int64_t n,
               int64_t d);

/* The same mixes and norm+RoPE with tokens split over the pool (prefill sizes; hr_attend.inc): x [t, per_token, d]
 * for norm+RoPE, cos/sin [t, rope_dim/2]. */
int hr_hc_pre_pool(const float *pre, const float *x, float *out, int64_t t, int64_t n, int64_t d);
/* hc_pre, then RMSNorm (times w when not NULL) of each mixed row: hr_norm_rope_pool(hr_hc_pre_pool(...)) bit for bit,
 * without the [t, d] round trip between them. */
int hr_hc_pre_norm_pool(const float *pre, const float *x, const float *w, float eps, float *out, int64_t t,
                        int64_t n, int64_t d);
int hr_hc_post_pool(const float *post, const float *y, const float *comb, const float *x, float *out, int64_t t,
                    int64_t n, int64_t d);
int hr_hc_weights_pool(int path, const float *x, int64_t t, int64_t n, int64_t d, const float *fn, int64_t m,
                       const float *scale, const float *base, float norm_eps, float hc_eps, int64_t iters, float *pre,
                       float *post, float *comb);
int hr_norm_rope_pool(int path, const float *x, float *y, int64_t t, int64_t per_token, int64_t d, const float *w,
                      float eps, int norm, const float *cosv, const float *sinv, int64_t rope_dim, int inverse);

/* Prefill (hr_prefill.inc): rows [r0, r1) of an FP8 weight [N, K] (e4m3 + ue8m0 128x128 scales) -> bf16 out
 * [r1 - r0, K], exactly (e4m3 x 2^e fits bf16); path: HR_PATH_* (AUTO: the best here; AVX512: vector lookups). */
int hr_fp8_to_bf16(int path, const uint8_t *w, const uint8_t *s, int64_t n, int64_t k, int64_t r0, int64_t r1,
                   uint16_t *out);
/* The same rows -> fp32 out [r1 - r0, K]: the fp32 dequantization, bit for bit (the exact prefill GEMM's weights);
 * path as above. */
int hr_fp8_to_f32(int path, const uint8_t *w, const uint8_t *s, int64_t n, int64_t k, int64_t r0, int64_t r1,
                  float *out);
/* Measured peak of one unit over every pool thread, in operations per second (a multiply-add counts 2): kind
 * HR_PEAK_INT8 (AVX512-VNNI vpdpbusd, else the AVX2 vpmaddubsw/vpmaddwd tile), HR_PEAK_BF16_KIND (AVX512-BF16
 * vdpbf16ps), HR_PEAK_FP32 (AVX-512 FMA, else AVX2 FMA); 0 when this CPU or build lacks it. */
#define HR_PEAK_INT8 1
#define HR_PEAK_BF16_KIND 2
#define HR_PEAK_FP32 3
double hr_unit_peak(int kind, int64_t iters);

#ifdef __cplusplus
}
#endif
#endif
