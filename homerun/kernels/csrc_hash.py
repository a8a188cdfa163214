"""The hash of the native kernels' C sources (homerun/kernels/csrc/*.c, *.h, *.inc) that a build embeds in the library
(`hr_src_hash`) and the loader compares, so a library built from other sources (a failed rebuild left the old one,
or the sources changed since) is not used silently. Standard library only: setup.py loads this file by path before
homerun or torch can be imported.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
PATTERNS = ("*.c", "*.h", "*.inc")


def source_files(csrc: Path = CSRC) -> list[Path]:
    return sorted({p for pat in PATTERNS for p in csrc.glob(pat)}, key=lambda p: p.name)


def source_hash(csrc: Path = CSRC) -> str | None:
    """sha256 (first 16 hex digits) over each source's name and bytes, in name order; None without sources (a wheel
    installed without them: nothing to compare)."""
    files = source_files(csrc)
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]
