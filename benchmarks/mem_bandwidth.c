/* One core's memory bandwidth by buffer size, per CPU-second: AVX-512 loads summed (read), and a scaled copy
 * (read + write, both counted; the write-allocate reads are inside that figure). The rooflines of
 * benchmarks/prefill_elementwise.py use the 512 MiB row.
 *
 *     gcc -O3 -march=native benchmarks/mem_bandwidth.c -o /tmp/mem_bandwidth && flock /tmp/hr-bench.lock /tmp/mem_bandwidth
 */
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_PROCESS_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  size_t sizes[]={256<<10, 1<<20, 16<<20, 512<<20};
  for(int s=0;s<4;s++){
    size_t n=sizes[s]/4; float*a=aligned_alloc(64,sizes[s]); float*b=aligned_alloc(64,sizes[s]);
    for(size_t i=0;i<n;i++){a[i]=i*1e-9f;b[i]=0;}
    size_t reps = (size_t)(4e9/sizes[s]); if(reps<4) reps=4;
    double best_r=1e9,best_c=1e9;
    for(int trial=0;trial<5;trial++){
      double t0=now(); __m512 acc0=_mm512_setzero_ps(),acc1=acc0,acc2=acc0,acc3=acc0;
      for(size_t r=0;r<reps;r++) for(size_t i=0;i<n;i+=64){acc0=_mm512_add_ps(acc0,_mm512_load_ps(a+i));acc1=_mm512_add_ps(acc1,_mm512_load_ps(a+i+16));acc2=_mm512_add_ps(acc2,_mm512_load_ps(a+i+32));acc3=_mm512_add_ps(acc3,_mm512_load_ps(a+i+48));}
      double t1=now(); volatile float sink=_mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0,acc1),_mm512_add_ps(acc2,acc3)));(void)sink;
      if((t1-t0)/reps<best_r)best_r=(t1-t0)/reps;
      t0=now(); for(size_t r=0;r<reps;r++) for(size_t i=0;i<n;i+=16) _mm512_store_ps(b+i,_mm512_mul_ps(_mm512_load_ps(a+i),_mm512_set1_ps(1.0001f)));
      t1=now(); if((t1-t0)/reps<best_c)best_c=(t1-t0)/reps;
    }
    printf("size %8zu KiB: read %6.1f GB/s, read+write (scale) %6.1f GB/s (bytes moved incl. write)\n", sizes[s]>>10, sizes[s]/best_r/1e9, 2.0*sizes[s]/best_c/1e9);
    free(a);free(b);
  }
}
