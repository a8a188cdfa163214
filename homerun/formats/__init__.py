"""Formats: what is on disk, read and written. The official DeepSeek-V4 tensor layout derived from config.json,
the FP8/FP4 weight formats, the checkpoint reader (validated, memory-mapped) and writer, the tokenizer of a
checkpoint directory, and the Hub download.

May import: homerun.errors. Nothing here computes a forward pass or knows about devices.
"""
