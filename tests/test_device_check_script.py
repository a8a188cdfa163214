"""scripts/device-check.sh names what it runs explicitly: every GPU test ID must collect and every step must exist,
since a wrong name found on the device costs a device session."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from homerun.bench import device_check

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = (ROOT / "scripts" / "device-check.sh").read_text()


def _test_ids() -> list[str]:
    ids: list[str] = []
    for name in ("KERNEL_TESTS", "DECODE_OP_TESTS", "OFFLOAD_TESTS"):
        m = re.search(rf"^{name}=\((.*?)\)", SCRIPT, re.S | re.M)
        assert m, name
        ids += m.group(1).split()
    return ids


def test_every_step_the_script_runs_exists():
    steps = re.findall(r"^run_step (\w+) \d+$", SCRIPT, re.M)
    assert steps and set(steps) <= set(device_check.STEPS)
    assert {"graphs", "graphs_hybrid", "mixed_spec", "capped", "kernels", "offload"} <= set(steps)


def test_every_gpu_test_id_collects():
    ids = _test_ids()
    assert len(ids) >= 5 and all(Path(ROOT, i.split("::")[0]).exists() for i in ids)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                        "-o", "addopts=", *ids], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    for i in ids:
        if "::" in i:
            assert i in r.stdout, i
