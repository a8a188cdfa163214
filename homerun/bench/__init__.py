"""Bench: llama-bench-style model benchmarks (pp/tg at a depth, a correctness gate, links against measured
limits), what they run on and compare against (backends, plan predictions, measured efficiencies), and synthetic
real-shaped checkpoints.

May import: every layer below the CLI (errors, formats, kernels, models, profiles, plan, offload, engine, chat).
"""
