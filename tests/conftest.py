import os
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


def needs_reference():
    return pytest.mark.skipif(not REFERENCE.exists(), reason="../shared/reference not present")
