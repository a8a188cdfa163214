"""The C translation unit compiles for every path: the x86 SIMD build and the portable-only build that ARM, Apple and
other machines get (HR_NO_X86 forces it here), with implicit declarations as errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "homerun" / "kernels" / "csrc"


@pytest.mark.parametrize("defines", [[], ["-DHR_NO_X86"]], ids=["native", "portable"])
def test_kernels_compile(defines):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    cmd = [cc, "-fsyntax-only", "-std=gnu11", "-Werror=implicit-function-declaration", "-Werror=return-type",
           f"-I{CSRC}", *defines, str(CSRC / "hr_kernels.c")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
