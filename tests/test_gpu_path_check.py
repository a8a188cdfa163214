"""The device check's Python half (homerun.bench.device_check) runs and records here; its shell half parses."""

import json
import subprocess
from pathlib import Path

from homerun.bench import device_check

ROOT = Path(__file__).resolve().parents[1]


def test_steps_merge_into_one_json(tmp_path):
    out = tmp_path / "dc.json"
    assert device_check.run_step("env", out, tiny=True)["ok"]
    assert device_check.run_step("offload", out, tiny=True)["ok"]
    doc = json.loads(out.read_text())
    assert set(doc["steps"]) == {"env", "offload"}
    assert doc["steps"]["env"]["torch"] and "seconds" in doc["steps"]["env"]


def test_a_failing_step_is_recorded_not_raised(tmp_path, monkeypatch):
    def boom(tiny):
        raise RuntimeError("no GPU here")

    monkeypatch.setitem(device_check.STEPS, "kernels", boom)
    rec = device_check.run_step("kernels", tmp_path / "dc.json", tiny=True)
    assert rec["ok"] is False and "no GPU here" in rec["error"]


def test_device_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "device-check.sh")], check=True)


def test_every_device_check_step_writes_its_tiny_model_one_way():
    """device_check's steps and graph_check's (which device_check runs) write their tiny checkpoint through one
    helper, in the lower module (graph_check): the preset as written is the preset asked for."""
    from homerun.bench import graph_check
    from homerun.formats.checkpoint import tiny_config
    from homerun.formats.loader import open_checkpoint

    assert device_check.tiny_checkpoint is graph_check.tiny_checkpoint
    path, args = graph_check._checkpoint("csa")
    assert path.name == "csa" and open_checkpoint(path).config == tiny_config("csa")
    assert args.n_layers == tiny_config("csa")["num_hidden_layers"]
