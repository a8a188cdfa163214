/* The int8 FP4 expert GEMM against the int8 peak of its units, one thread (benchmarks/prefill_cpu.md, issue 19):
 *   gcc -O3 -std=gnu11 -pthread -I homerun/kernels/csrc benchmarks/int8_tile_bench.c -o /tmp/int8_tile_bench -lm
 *   /tmp/int8_tile_bench 2        # path 2 = AVX2, against the AVX2 int8 peak
 *   /tmp/int8_tile_bench 3        # path 3 = AVX-512 (the VNNI kernel where the CPU has it), against the VNNI peak
 *   /tmp/int8_tile_bench 2 g      # GEMV: [16384, 4096] x one token
 *   /tmp/int8_tile_bench 3 16     # one batch size only
 * Per round: the int8 peak loop (cpu_gemm.unit_peak's, short), then hr_fp4_gemm(path | HR_ACT_INT8) on [2048, 4096]
 * (random FP4 codes, scale bytes 118..123) for >= 0.3 CPU-s; GOP per CPU-second; medians of 5 rounds, and the median
 * of the per-round ratios (each round's GEMM over the same round's peak, so host-wide slowdowns cancel).
 * It includes the kernels' translation unit to reach the static peak loop; build it from the repository root. */
#include "hr_kernels.c"
#include <stdio.h>
static double cpu_s(void){struct timespec t;clock_gettime(CLOCK_PROCESS_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static int cmpd(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
int main(int argc,char**argv){
  int path = argc>1? atoi(argv[1]) : 2; int gemv = argc>2 && argv[2][0]=='g';
  int vnni = path==3 && hr_int8_impl(path)==HR_INT8_VNNI;
  hr_set_threads(1);
  const int64_t n=gemv?16384:2048,k=4096;
  uint8_t *w=malloc(n*k/2),*s=malloc(n*k/32);
  unsigned r=12345; for(int64_t i=0;i<n*k/2;i++){r=r*1103515245+12345;w[i]=r>>16;}
  for(int64_t i=0;i<n*k/32;i++){r=r*1103515245+12345;s[i]=118+(r>>16)%6;}
  float *x=malloc(100*k*4),*y=malloc(100*n*4);
  for(int64_t i=0;i<100*k;i++){r=r*1103515245+12345;x[i]=((int)(r>>16)%2001-1000)/500.0f;}
  int ts[]={8,16,32,64,100}; int nts=5; if(gemv){ts[0]=1;nts=1;} else if(argc>2){ts[0]=atoi(argv[2]);nts=1;}
  for(int i=0;i<nts;i++){int t=ts[i];double v[5],pk[5],ra[5];
    for(int rep=0;rep<5;rep++){
      double c0=cpu_s(); volatile float sk=vnni?peak_vnni(300000):peak_avx2_int8(300000); (void)sk; pk[rep]=(vnni ? 128.0 * PEAK_CHAINS : 1024.0)*300000/(cpu_s()-c0)/1e9;
      c0=cpu_s(); int reps=0; do{hr_fp4_gemm(path|HR_ACT_INT8,w,s,n,k,x,t,y);reps++;}while(cpu_s()-c0<0.3);
      v[rep]=2.0*n*k*t*reps/(cpu_s()-c0)/1e9; ra[rep]=v[rep]/pk[rep];}
    qsort(v,5,8,cmpd);qsort(pk,5,8,cmpd);qsort(ra,5,8,cmpd); printf("t=%d gops %.1f peak %.1f ratio %.3f\n",t,v[2],pk[2],ra[2]);}
}
