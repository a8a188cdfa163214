"""Every benchmark script imports homerun before torch. `import homerun` sets OMP_WAIT_POLICY=PASSIVE, which libgomp
(torch's intra-op pool) reads once, when torch loads. A script that imports torch first keeps libgomp's default
spin-wait, and then torch's idle workers spin through the native kernels' calls: the bf16 dense path read 1.2-3.1x
the CPU-s on 2 threads as on 1 that way, against 1.00-1.03x with PASSIVE (benchmarks/prefill_cpu.md, "Two-thread
scaling of the dense prefill path"). The runtime itself imports homerun first."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_import_lines(path: Path) -> dict[str, int]:
    """The line of each top-level package's first module-level import (torch, homerun) in a script."""
    first: dict[str, int] = {}
    for node in ast.parse(path.read_text()).body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        for name in names:
            first.setdefault(name.split(".")[0], node.lineno)
    return first


def torch_first(path: Path) -> bool:
    first = first_import_lines(path)
    return "torch" in first and first.get("homerun", 1 << 30) > first["torch"]


def test_benchmark_scripts_import_homerun_before_torch():
    bad = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py")) if torch_first(p)]
    assert not bad, f"these import torch before homerun, so torch's OpenMP workers spin: {bad}"


def test_the_rule_catches_a_script_that_imports_torch_first(tmp_path):
    p = tmp_path / "bench.py"
    p.write_text("import os\nimport torch\n\nimport homerun\n")
    assert torch_first(p)
    p.write_text("import os\nimport homerun  # noqa\nimport torch\n")
    assert not torch_first(p)


def test_importing_homerun_first_makes_libgomp_passive():
    """The policy is what the rule protects: set by `import homerun` when torch is not loaded yet, kept when the user
    set one, and missed when torch came first."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(ROOT)
    code = "import {}, {}, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    run = lambda c, e=env: subprocess.run([sys.executable, "-c", c], env=e, capture_output=True, text=True,  # noqa: E731
                                          cwd=ROOT).stdout.strip()
    assert run(code.format("homerun", "torch")) == "PASSIVE"
    assert run(code.format("torch", "homerun")) == "None"
    assert run(code.format("homerun", "torch"), {**env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
