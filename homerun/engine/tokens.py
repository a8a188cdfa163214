"""Token-id sequence helpers shared by prefix reuse in chat, the server and generation (no torch: the CLI imports
this at startup)."""

from __future__ import annotations

from typing import Sequence


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two id sequences share (prefix reuse: the live state vs a new prompt)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
