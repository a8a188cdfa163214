/* Per-stage CPU time of the fused routed-expert op, int8 activations, one thread unless told
 * (benchmarks/prefill_cpu.md, session 5): 48 FP4 experts [4096 <-> 2048] (random codes, scale bytes 118..123),
 * top-6, random routing, at per-expert batches of 8-100 tokens (8, 16, 24, 32, 48, 64, 100).
 * Build from the repository root (it includes the kernels' translation unit):
 *   gcc -O3 -std=gnu11 -pthread -I homerun/kernels/csrc benchmarks/int8_moe_stages.c -o /tmp/int8_moe_stages -lm
 *   /tmp/int8_moe_stages [path=3] [reps=5] [threads=1]   # path 3 = AVX-512 (the VNNI kernels where the CPU has them)
 * Each stage is run alone on the buffers of one set-up forward (so without first-touch page faults), CPU-ms, median
 * of `reps`; "swiglu", "h-quant" (stage 3, which runs inside stage 2's tasks) and "scatter" time stage 2's and 4's
 * other parts alone over the same amount of work;
 * "forward" is hr_moe_forward whole (its own allocations and page faults included), and "other" what it spends
 * outside the stages. GOP/s counts 2 x 3 x D x I per entry, as int8_moe_bench.py. */
#include "hr_kernels.c"
#include <stdio.h>
static double cpu_ms(void){struct timespec t;clock_gettime(CLOCK_PROCESS_CPUTIME_ID,&t);return t.tv_sec*1e3+t.tv_nsec*1e-6;}
static int cmpd(const void*a,const void*b){double x=*(double*)a,y=*(double*)b;return x<y?-1:x>y;}
#define NST 8
static const char *names[NST]={"x-quant","up+swiglu+h-quant","(swiglu)","(h-quant)","down+scatter","(scatter)","forward","other"};
int main(int argc,char**argv){
  int path=(argc>1?atoi(argv[1]):3)|HR_ACT_INT8, reps=argc>2?atoi(argv[2]):5;
  hr_init(); hr_set_threads(argc>3?atoi(argv[3]):1);
  const int64_t D=4096,I=2048,E=48,K=6; unsigned r=12345;
  int64_t *table=malloc(E*6*8);
  for(int64_t e=0;e<E;e++) for(int m=0;m<3;m++){int64_t n=m<2?I:D,k=m<2?D:I;
    uint8_t *w=malloc(n*k/2),*s=malloc(n*k/32);
    for(int64_t i=0;i<n*k/2;i++){r=r*1103515245+12345;w[i]=r>>16;}
    for(int64_t i=0;i<n*k/32;i++){r=r*1103515245+12345;s[i]=118+(r>>16)%6;}
    table[e*6+2*m]=(int64_t)(intptr_t)w; table[e*6+2*m+1]=(int64_t)(intptr_t)s;}
  int pers[]={8,16,24,32,48,64,100}; const int npers=sizeof pers/sizeof pers[0];
  printf("per-expert  %s\n","CPU-ms per stage: x-quant / up+swiglu+h-quant (swiglu) (h-quant) / down+scatter (scatter) / forward / other; GOP/s");
  for(int pi=0;pi<npers;pi++){int64_t T=pers[pi]*E/K,n=T*K;
    float *x=malloc(T*D*4),*out=malloc(T*D*4),*wts=malloc(n*4); int64_t *ids=malloc(n*8);
    for(int64_t i=0;i<T*D;i++){r=r*1103515245+12345;x[i]=((int)(r>>16)%2001-1000)/250.0f;}
    for(int64_t q=0;q<T;q++){int64_t perm[48];for(int e=0;e<E;e++)perm[e]=e;
      for(int j=0;j<K;j++){r=r*1103515245+12345;int64_t p=j+(r>>16)%(E-j),tmp=perm[j];perm[j]=perm[p];perm[p]=tmp;
        ids[q*K+j]=perm[j];r=r*1103515245+12345;wts[q*K+j]=(r>>16)%1000/1000.0f;}}
    double st[NST][64];
    hr_moe_forward(path,HR_FMT_FP4,table,E,D,I,x,T,ids,wts,K,10.0f,out);
    for(int rep=0;rep<reps;rep++){moe_ctx c; double t0;
      t0=cpu_ms(); hr_moe_forward(path,HR_FMT_FP4,table,E,D,I,x,T,ids,wts,K,10.0f,out); st[6][rep]=cpu_ms()-t0;
      if(moe_setup(&c,path,HR_FMT_FP4,table,E,D,I,x,T,ids,wts,K,10.0f,out)!=HR_OK){printf("setup failed\n");return 1;}
      hr_parallel(moe_x_task,&c,c.t); hr_parallel(moe_up_task,&c,c.ngroups*c.nch1); /* first touch */
      t0=cpu_ms(); hr_parallel(moe_x_task,&c,c.t); st[0][rep]=cpu_ms()-t0;
      t0=cpu_ms(); hr_parallel(moe_up_task,&c,c.ngroups*c.nch1); st[1][rep]=cpu_ms()-t0;
      static float gb[HR_Q8P_TT*HR_RC],ub[HR_Q8P_TT*HR_RC];
      for(int i=0;i<HR_Q8P_TT*HR_RC;i++){gb[i]=(i%97-48)/8.0f;ub[i]=(i%89-44)/8.0f;}
      t0=cpu_ms(); for(int64_t j0=0;j0<n;j0+=HR_Q8P_TT){int nt=n-j0<HR_Q8P_TT?(int)(n-j0):HR_Q8P_TT;
        for(int64_t r0=0;r0<I;r0+=HR_RC) moe_hidden(&c,gb,ub,nt,j0,r0,HR_RC,ub);} st[2][rep]=cpu_ms()-t0;
      t0=cpu_ms(); for(int64_t j0=0;j0<n;j0+=HR_Q8P_TT){int nt=n-j0<HR_Q8P_TT?(int)(n-j0):HR_Q8P_TT;
        for(int64_t r0=0;r0<I;r0+=HR_RC) moe_quant_h(&c,gb,nt,j0,r0,HR_RC,1);} st[3][rep]=cpu_ms()-t0;
      memset(out,0,T*D*4);
      t0=cpu_ms(); hr_parallel(moe_down_task,&c,((D+c.rc2-1)/c.rc2+c.cpt2-1)/c.cpt2); st[4][rep]=cpu_ms()-t0;
      t0=cpu_ms(); for(int64_t j0=0;j0<n;j0+=HR_Q8P_TT/2){int nt=n-j0<HR_Q8P_TT/2?(int)(n-j0):HR_Q8P_TT/2;
        for(int64_t r0=0;r0<D;r0+=HR_RC) moe_scatter(&c,gb,2,nt,j0,r0,HR_RC);} st[5][rep]=cpu_ms()-t0;
      moe_free(&c);
      st[7][rep]=st[6][rep]-st[0][rep]-st[1][rep]-st[4][rep];}
    printf("%4d       ",pers[pi]);
    double med[NST]; for(int s=0;s<NST;s++){qsort(st[s],reps,8,cmpd);med[s]=st[s][reps/2];printf("%s%.1f",s?" / ":"",med[s]);}
    printf("; %.1f GOP/s\n",2.0*3*D*I*n/med[6]/1e6);
    free(x);free(out);free(wts);free(ids);}
  (void)names; return 0;
}
