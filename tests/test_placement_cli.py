"""`homerun run/chat --hw PROFILE [--standin]` as real processes on the tiny checkpoint: the checkpoint is planned on
the profile and loaded with the plan's placement (a 3-GPU pipeline on CPU stand-ins), the JSON stats report it, and
without --standin a plan that needs CUDA devices this machine lacks exits with a usage error naming the device."""

import json
import os
import subprocess
import sys

import pytest
import torch

from homerun.errors import ExitCode

TIMEOUT_S = 180


def homerun(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "homerun", *args], input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=os.environ.copy())


def _done(stdout):
    events = [json.loads(line) for line in stdout.splitlines()]
    assert [e["event"] for e in events].count("done") == 1
    return events[-1]


def test_run_on_a_3_gpu_plan_with_standins(tiny_checkpoint):
    proc = homerun("run", str(tiny_checkpoint), "Say hi", "--hw", "3xh100", "--standin", "--max-new-tokens", "4",
                   "--seed", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    stats = _done(proc.stdout)["stats"]
    assert stats["n_gen"] == 4 or _done(proc.stdout)["finish_reason"] == "eos"
    summary = stats["placement"]
    assert summary["source"].startswith("plan: 3xh100 / ")
    names = [d["name"] for d in summary["devices"]]
    assert names == ["standin:0", "standin:1", "standin:2"] and summary["embedding"] == "standin:0"
    assert summary["layer_counts"] == [d["n_layers"] for d in summary["devices"]]
    assert sum(summary["layer_counts"]) == summary["n_layers"] == 3 and min(summary["layer_counts"]) >= 1
    assert {d["experts"] for d in summary["devices"]} == {"device"}  # 3x H100 hold everything: nothing offloaded
    # The runtime's own record: each stand-in has the plan's H100 budget (capacity less margins) and holds it.
    usage = stats["model_stats"]["devices"]
    assert [d["name"] for d in usage] == names
    assert len({d["budget_bytes"] for d in usage}) == 1
    assert all(0 < d["peak_bytes"] <= d["budget_bytes"] for d in usage)
    assert stats["model_stats"]["placement"]["layer_counts"] == summary["layer_counts"]


@pytest.mark.skipif(torch.cuda.device_count() >= 3, reason="this machine has the plan's 3 GPUs")
def test_run_on_a_gpu_plan_without_gpus_names_the_device(tiny_checkpoint):
    missing = f"cuda:{torch.cuda.device_count()}"
    proc = homerun("run", str(tiny_checkpoint), "x", "--hw", "3xh100", "--max-new-tokens", "2", "--json")
    assert proc.returncode == ExitCode.USAGE and proc.stdout == ""
    err = proc.stderr.strip().splitlines()
    assert err[0].startswith("Error: the plan for 3xh100 puts ") and missing in err[0]
    assert err[1].startswith("Hint:") and "--standin" in err[1]


def test_bad_combinations_are_usage_errors(tiny_checkpoint):
    alone = homerun("run", str(tiny_checkpoint), "x", "--standin", "--max-new-tokens", "2")
    assert alone.returncode == ExitCode.USAGE and "--hw" in alone.stderr and alone.stdout == ""
    bad = homerun("run", str(tiny_checkpoint), "x", "--hw", "no-such-profile", "--standin")
    assert bad.returncode == ExitCode.USAGE and "no-such-profile" in bad.stderr


def test_chat_json_with_a_2_gpu_plan_reports_the_placement(tiny_checkpoint):
    proc = homerun("chat", str(tiny_checkpoint), "--hw", "2xh100", "--standin", "--json", "--max-new-tokens", "2",
                   stdin="hello\n/stats\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    done = next(e for e in events if e["event"] == "done")
    assert [d["name"] for d in done["stats"]["placement"]["devices"]] == ["standin:0", "standin:1"]
    stats = next(e for e in events if e["event"] == "command" and e["kind"] == "stats")
    placed = stats["data"]["model_stats"]["placement"]
    assert placed["layer_counts"] == done["stats"]["placement"]["layer_counts"] and sum(placed["layer_counts"]) == 3
