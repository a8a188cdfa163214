import os

# One intra-op thread: on a shared 2-core runner OpenMP workers spin on busy cores (23 s vs 5 min measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = SHARED / "reference" / "deepseek-v4"


@pytest.fixture(autouse=True)
def _homerun_env(tmp_path, monkeypatch):
    # Tests never touch the network or the user's state directory.
    monkeypatch.setenv("HOMERUN_HOME", str(tmp_path / "homerun-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # Tiny models gain nothing from intra-op threads (see OMP_NUM_THREADS above); also covers an already-imported torch.
    import torch

    torch.set_num_threads(1)
    yield


def needs_reference():
    return pytest.mark.skipif(not REFERENCE.exists(), reason="../shared/reference not present")


# --- tiny official-format checkpoints (tests/tiny.py) ------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{"mixed" | "csa" | "hca": Path} -- the three tiny presets, written once per session. Read-only: tests
    that modify a checkpoint must write their own with tiny.make_checkpoint(tmp_path, kind)."""
    from tiny import TINY_KINDS, make_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {kind: make_checkpoint(root, kind) for kind in TINY_KINDS}


@pytest.fixture(scope="session")
def short_window_checkpoint(tmp_path_factory):
    """The "mixed" preset with an 8-token sliding window: the window's transitions within a few decode tokens (the
    compression rates stay 4 / 128). Written once per session; read-only."""
    from homerun.formats.checkpoint import tiny_config, write_checkpoint

    path = tmp_path_factory.mktemp("short-window") / "short"
    write_checkpoint(path, {**tiny_config("mixed"), "sliding_window": 8})
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints):
    """The "mixed" preset (SWA + CSA + HCA layers, hash + routed MoE)."""
    return tiny_checkpoints["mixed"]


@pytest.fixture
def cpu_dense():
    """homerun.kernels.cpu_dense with its native kernels, or a skip where they were not built."""
    from homerun.kernels import cpu_dense as mod
    if not mod.available():
        pytest.skip("native kernels not built")
    return mod


@pytest.fixture(params=("native", "torch"))
def kernel_set(request, monkeypatch):
    """Run a test once on the native CPU kernels (skipped where not built) and once on the torch set, which is
    the path CUDA takes; HOMERUN_KERNELS=torch forces the second everywhere."""
    from homerun.kernels import dispatch

    if request.param == "native":
        if not dispatch.USE_NATIVE or dispatch.native_dense() is None:
            pytest.skip("native kernels not built or switched off")
    else:
        monkeypatch.setattr(dispatch, "USE_NATIVE", False)
    return request.param
