/* The predecoded VNNI batch rows (fp4_rows_q8p_vnni, hr_int8_batch.inc) in parts, one thread (issue 19;
 * benchmarks/prefill_cpu.md, session 7): the row decode alone (ns per row per 512-weight chunk), the 4-row x 3-token
 * shift tiles alone over decoded rows, and the whole rows function, against the VNNI peak loop. Build from the
 * repository root (it includes the kernels' translation unit):
 *   gcc -O3 -std=gnu11 -pthread -I homerun/kernels/csrc benchmarks/int8_q8p_parts.c -o /tmp/int8_q8p_parts -lm
 *   /tmp/int8_q8p_parts NT [ROWS=64] [K=4096]    # e.g. 63 64 4096 (activations from L2), 3 4 4096 (all in L1)
 * Random FP4 codes, scale bytes 118..123 (shift rows), random activation bytes (timing only: nothing is checked). */
#include "hr_kernels.c"
#include <stdio.h>
static double cpu_s(void){struct timespec t;clock_gettime(CLOCK_PROCESS_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec*1e-9;}
HR_AVX512VNNI __attribute__((noinline)) static void tiles(int64_t n,int nt,const uint8_t*dw,int64_t rb,int64_t nch,const float*const*xp,float*out){for(int64_t p=0;p<n;p+=4) for(int t0=0;t0+3<=nt;t0+=3) q8p_tile_vnni(4,3,1,dw+p*rb,rb,nch,xp+t0,out+p+t0*n,n);}
int main(int argc,char**argv){
  int64_t n0=argc>2?atoi(argv[2]):64; const int64_t k=argc>3?atoi(argv[3]):4096, n=n0, nb=k/32, kb2=k/2, nch=q8t_nch(k), rb=q8p_row_bytes(k);
  int nt=atoi(argv[1]);
  uint8_t *w=malloc(n*kb2),*s=malloc(n*nb);
  unsigned r=1; for(int64_t i=0;i<n*kb2;i++){r=r*1103515245+12345;w[i]=r>>16;}
  for(int64_t i=0;i<n*nb;i++){r=r*1103515245+12345;s[i]=118+(r>>16)%6;}
  uint8_t *dw=aligned_alloc(64,n*rb);
  int64_t xs=q8t_stride(k); uint8_t *xq=aligned_alloc(64,nt*xs);
  for(int64_t i=0;i<nt*xs;i++){r=r*1103515245+12345;xq[i]=(r>>16)&0x3f;}
  const float *xp[128]; for(int t=0;t<nt;t++) xp[t]=(const float*)(xq+t*xs);
  float *out=malloc(n*nt*4); int IR=(int)(20000000/(n*k*(nt+8)))+1;
  // prep alone
  double c0=cpu_s(); int reps=0; do{ for(int ir=0;ir<IR;ir++) for(int64_t q=0;q<n;q++) q8p_prep_row(w+q*kb2,s+q*nb,kb2,nb,dw+q*rb); reps++;}while(cpu_s()-c0<0.3);
  double prep_ns_row_chunk=(cpu_s()-c0)/reps/IR/n/nch*1e9;
  for(int64_t q=0;q<n;q++) q8p_prep_row(w+q*kb2,s+q*nb,kb2,nb,dw+q*rb);
  // tile alone, 4 rows x 3 tokens, shift rows, over all token tiles and all rows (pass of 4 rows)
  c0=cpu_s(); reps=0; do{ for(int ir=0;ir<IR;ir++) tiles(n,nt,dw,rb,nch,xp,out); reps++;}while(cpu_s()-c0<0.3);
  double tile_s=(cpu_s()-c0)/reps/IR; double ops=2.0*n*k*(nt/3*3);
  // whole rows fn
  c0=cpu_s(); reps=0; do{ for(int ir=0;ir<IR;ir++) fp4_rows_q8p_vnni(w,s,k,nb,0,n,xp,nt,out,n); reps++;}while(cpu_s()-c0<0.3);
  double rows_s=(cpu_s()-c0)/reps/IR;
  c0=cpu_s(); volatile float sk=peak_vnni(3000000); (void)sk; double pk_t=2048.0*3000000/(cpu_s()-c0)/1e9;
  printf("nt=%d prep %.1f ns/row/chunk; tile-only %.0f GOP/s; rows fn %.0f GOP/s; peak %.0f GOP/s\n",nt,prep_ns_row_chunk,ops/tile_s/1e9,2.0*n*k*nt/rows_s/1e9,pk_t);
}
