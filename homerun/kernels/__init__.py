"""Kernels: every compute kernel family behind one interface each. The native C library (csrc/, built at install)
and its ctypes binding for FP4/FP8/bf16 matrices, attention and mHC on the CPU; the CPU thread policy for a decode
step; the kernel benchmarks and the machine's measured read bandwidth. The model and offload/ call kernels through
this package and never load a library themselves.

May import: homerun.errors, homerun.formats.
"""
