/* The predecoded int8 batch rows (fp4_rows_q8p_vnni, shift and float-scale tiles) against the inline-decode 2x4 tile
 * (fp4_rows_q8t2_vnni), bit for bit, on AVX512-VNNI: 37 rows whose exponents span 15 (shift rows), 16 or 4, some with
 * scale bytes 0 (float scales) or up to 253, K = 1568 (49 blocks: a partial 16-block chunk), 1-16, 24, 37 and 64
 * tokens per call (HR_Q8P_TT: the GEMM and the fused op call it with up to 64).
 * benchmarks/prefill_cpu.md, session 4. Build from the repository root; exit status 1 on any differing output:
 *   gcc -O3 -std=gnu11 -pthread -I homerun/kernels/csrc benchmarks/int8_batch_equal.c -o /tmp/int8_batch_equal -lm */
#include "hr_kernels.c"
#include <stdio.h>
int main(void){ hr_init();
  if(hr_int8_impl(HR_PATH_AVX512)!=HR_INT8_VNNI){printf("no AVX512-VNNI here\n");return 0;}
  const int64_t n=37,k=1568;
  uint8_t *w=malloc(n*k/2),*s=malloc(n*k/32); unsigned r=7;
  for(int64_t i=0;i<n*k/2;i++){r=r*1103515245+12345;w[i]=r>>16;}
  for(int64_t row=0;row<n;row++){int base=row%5==4?0:(row%7==6?237:100+(row%20)), span=(row%3==0)?15:(row%3==1?16:4);
    for(int64_t b=0;b<k/32;b++){r=r*1103515245+12345;s[row*(k/32)+b]=base+(int)((r>>16)%(span+1));}
    s[row*(k/32)+row%(k/32)]=base+span;}
  int nt=64; uint8_t *xq=aligned_alloc(64,nt*q8t_stride(k)); float *x=malloc(k*4);
  const float *xp[64];
  for(int t=0;t<nt;t++){for(int64_t i=0;i<k;i++){r=r*1103515245+12345;x[i]=((int)(r>>16)%2001-1000)/(37.0f+t);}
    uint8_t *tmp=q8_alloc(1,k); q8_quantize(HR_PATH_AVX512,x,k,tmp); q8t_from_q8(tmp,k,xq+t*q8t_stride(k)); free(tmp); xp[t]=(const float*)(xq+t*q8t_stride(k));}
  float *a=calloc(n*nt,4),*b=calloc(n*nt,4); int bad=0;
  for(int nn=1;nn<=64;nn=nn<16?nn+1:(nn==16?24:(nn==24?37:(nn==37?64:65)))){
    fp4_rows_q8t2_vnni(w,s,k,k/32,0,n,xp,nn,a,n); fp4_rows_q8p_vnni(w,s,k,k/32,0,n,xp,nn,b,n);
    for(int i=0;i<n*nn;i++) if(memcmp(&a[i],&b[i],4)){ if(bad<5) printf("nt=%d i=%d %g %g\n",nn,i,a[i],b[i]); bad++;}
  }
  printf("mismatches %d\n",bad); return bad!=0;
}
