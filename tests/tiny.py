"""Tiny official-format DeepSeek-V4 checkpoints for tests (random weights, a few MB each).

`make_checkpoint(tmp_path, kind, **overrides)` writes one; the session fixture `tiny_checkpoints` (conftest.py)
writes the three presets once per test session. Presets (homerun.formats.checkpoint.TINY_PRESETS), all hidden 256,
4 heads x head_dim 128 (rope 64), q/o lora 128, o_groups 2, expert width 128, FP4 experts, 16 indexer heads,
vocab 512 (= the shipped tokenizer), MTP block with a sliding layer:
  mixed: 3 layers [SWA, CSA, HCA], 1 hash layer, 8 experts top-2, index_topk 16, window 128
  csa:   2 layers [CSA, CSA],      1 hash layer, 16 experts top-4, index_topk 32, window 64, route scale 2.5
  hca:   3 layers [HCA, CSA, HCA], 2 hash layers, 8 experts top-3, index_topk 24, window 128
Use prompts of >= 600 tokens to close HCA windows several times and make the CSA top-k a strict subset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from homerun.formats.checkpoint import TINY_PRESETS, tiny_config, write_checkpoint

TINY_KINDS: tuple[str, ...] = tuple(TINY_PRESETS)
# Small enough that every tiny checkpoint spans several shards, so the index and multi-file paths are exercised.
TINY_SHARD_BYTES = 1 << 20


def make_checkpoint(
    tmp_path: Path,
    kind: str = "mixed",
    *,
    seed: int = 0,
    include_mtp: bool = True,
    max_shard_bytes: int = TINY_SHARD_BYTES,
    **overrides: Any,
) -> Path:
    """Write the `kind` preset (with config `overrides`) to tmp_path/<kind>-s<seed>[...] and return the directory."""
    name = f"{kind}-s{seed}" + ("" if include_mtp else "-nomtp") + ("-custom" if overrides else "")
    out = Path(tmp_path) / name
    n = 0
    while out.exists():  # never reuse a directory: two calls with different overrides must not collide
        n += 1
        out = Path(tmp_path) / f"{name}-{n}"
    return write_checkpoint(
        out, tiny_config(kind, **overrides), seed=seed, include_mtp=include_mtp, max_shard_bytes=max_shard_bytes
    )
