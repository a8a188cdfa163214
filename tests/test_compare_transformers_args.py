"""benchmarks/compare_transformers.py's arguments: bad input is a one-line error naming the flag, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_transformers.py"


def test_a_negative_hf_chunk_is_refused_before_any_work(tmp_path):
    """--hf-chunk < 0 would leave the chunked prefill without a result; refused up front (a worker run too: the
    missing checkpoint is never opened)."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--worker", "transformers", "--checkpoint",
                        str(tmp_path / "none"), "--hf-chunk", "-1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].endswith("error: --hf-chunk must be >= 0, got -1 (0: one pass)")
