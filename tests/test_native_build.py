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


def test_source_hash_follows_every_source(tmp_path):
    from homerun.kernels.csrc_hash import source_hash

    src = tmp_path / "csrc"
    shutil.copytree(CSRC, src)
    base = source_hash(src)
    assert base == source_hash(CSRC) and len(base) == 16
    inc = next(iter(sorted(src.glob("*.inc"))))
    inc.write_bytes(inc.read_bytes() + b" ")
    assert source_hash(src) != base
    assert source_hash(tmp_path / "none") is None


def test_loader_refuses_a_library_built_from_other_sources(monkeypatch):
    """A library whose recorded source hash differs from csrc/ (a failed rebuild kept it) is not loaded: one warning,
    the reason says to rebuild, and the torch fallback runs."""
    from homerun.kernels import cpu_experts as ce
    from homerun.kernels import csrc_hash

    if ce._library_file() is None:
        pytest.skip("native kernels not built")
    monkeypatch.setattr(ce, "_lib", None)
    monkeypatch.setattr(ce, "_lib_reason", None)
    assert ce._native() is not None, ce._lib_reason  # this build matches its sources
    monkeypatch.setattr(ce, "_lib", None)
    monkeypatch.setattr(ce, "_lib_reason", None)
    monkeypatch.setattr(csrc_hash, "source_hash", lambda csrc=None: "0123456789abcdef")
    with pytest.warns(RuntimeWarning, match="rebuild"):
        assert ce._native() is None
    assert "0123456789abcdef" in ce._lib_reason and "build_ext" in ce._lib_reason
    assert ce.resolve_path() == "torch"


def test_failed_build_removes_the_previous_library(tmp_path):
    """setup.py's optional build: a compile error leaves no library behind (not the old one), and says so."""
    import sys
    import sysconfig

    if (shutil.which("cc") or shutil.which("gcc")) is None:
        pytest.skip("no C compiler")
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "homerun" / "kernels").mkdir(parents=True)
    shutil.copy(root / "setup.py", tmp_path / "setup.py")
    shutil.copy(root / "homerun" / "kernels" / "csrc_hash.py", tmp_path / "homerun" / "kernels" / "csrc_hash.py")
    shutil.copytree(CSRC, tmp_path / "homerun" / "kernels" / "csrc")
    main = tmp_path / "homerun" / "kernels" / "csrc" / "hr_kernels.c"
    main.write_text("#error planted compile error\n" + main.read_text())
    old = tmp_path / "homerun" / "kernels" / ("_hr_kernels" + sysconfig.get_config_var("EXT_SUFFIX"))
    old.write_bytes(b"an old build")
    res = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]  # optional: the install still succeeds
    assert not old.exists()
    assert "removed the previous build" in res.stderr and "were not built" in res.stderr
