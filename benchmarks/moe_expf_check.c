/* The fused MoE op's vector expf (hr_moe_avx512.inc) against this host's libm expf on every one of the 2^32 float
 * inputs, NaNs included (compared as bit patterns; benchmarks/prefill_cpu.md, h19m). Build from the repository root:
 *   gcc -O3 -std=gnu11 -pthread -I homerun/kernels/csrc benchmarks/moe_expf_check.c -o /tmp/moe_expf_check -lm
 *   /tmp/moe_expf_check          # prints the count of differing inputs (and the first few); exit 1 if any */
#include "hr_kernels.c"
#include <stdio.h>
HR_AVX512 static uint64_t check(uint32_t hi16, uint64_t *shown) {
    uint64_t bad = 0;
    for (uint32_t lo = 0; lo < 65536; lo += 16) {
        uint32_t xs[16], es[16];
        for (int l = 0; l < 16; l++) xs[l] = hi16 << 16 | (lo + l);
        __m512 x = _mm512_loadu_ps((const float *)xs);
        _mm512_storeu_ps((float *)es, moe_expf16(x));
        for (int l = 0; l < 16; l++) {
            float f, r;
            memcpy(&f, xs + l, 4);
            r = expf(f);
            uint32_t rb;
            memcpy(&rb, &r, 4);
            if (rb != es[l]) {
                if ((*shown)++ < 8) printf("x=%a (0x%08x): libm 0x%08x, vector 0x%08x\n", f, xs[l], rb, es[l]);
                bad++;
            }
        }
    }
    return bad;
}
int main(void) {
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512dq")) {
        printf("no AVX-512 here\n");
        return 2;
    }
    uint64_t bad = 0, shown = 0;
    for (uint32_t hi = 0; hi < 65536; hi++) bad += check(hi, &shown);
    printf("%llu of 4294967296 inputs differ\n", (unsigned long long)bad);
    return bad != 0;
}
