"""`homerun run` (one-shot; plain and --json JSONL events) and `homerun chat --json` (line protocol) as real
processes on a tiny official-format checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT_S = 180
EVENTS = {"reasoning", "content", "tool_call", "done"}


def homerun(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "homerun", *args], input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env=os.environ.copy())


def jsonl(stdout):
    return [json.loads(line) for line in stdout.splitlines()]


def test_run_json_events_and_plain_answer(tiny_checkpoint):
    args = ["run", str(tiny_checkpoint), "Say hi", "--max-new-tokens", "6", "--seed", "11"]
    proc = homerun(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    events = jsonl(proc.stdout)
    assert {e["event"] for e in events} <= EVENTS and events[-1]["event"] == "done"
    assert [e["event"] for e in events].count("done") == 1
    done = events[-1]
    stats = done["stats"]
    assert stats["n_gen"] == 6 or done["finish_reason"] == "eos"
    # One-shot: nothing is reused, and the KV holds the prompt and every generated token but the last (never fed).
    assert stats["n_cached"] == 0 and stats["n_prompt"] > 0
    assert stats["context_used_tokens"] == stats["n_prompt"] + stats["n_gen"] - 1
    for key in ("decode_tok_s", "prefill_tok_s", "expert_cache_hit_rate", "context_used_tokens",
                "context_capacity_tokens", "finish_reason"):
        assert key in stats
    streamed = "".join(e["text"] for e in events if e["event"] == "content")
    assert streamed == done["message"]["content"]
    assert done["message"]["think"] == "off" and "history_file" not in done
    assert not list((Path(os.environ["HOMERUN_HOME"]) / "chats").glob("*.json"))  # one-shot keeps no history

    plain = homerun(*args)  # same seed, same tokens: stdout is the answer and nothing else
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == done["message"]["content"] + "\n"


def test_run_thinking_max_refused_when_the_plan_is_short(tmp_path):
    from tiny import make_checkpoint

    short = make_checkpoint(tmp_path, "mixed", max_position_embeddings=65536)
    proc = homerun("run", str(short), "Think", "--thinking", "max", "--max-new-tokens", "2")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "Think Max refused" in proc.stderr and "65,536" in proc.stderr and "393,216" in proc.stderr


def test_bad_thinking_flag_is_a_usage_error(tiny_checkpoint):
    proc = homerun("run", str(tiny_checkpoint), "x", "--thinking", "deep")
    assert proc.returncode == 2 and "Error:" in proc.stderr and proc.stdout == ""


def test_chat_json_line_protocol(tiny_checkpoint):
    stdin = "hello\nmore\n/think max\nagain\n/stats\n/exit\nnever read\n"
    proc = homerun("chat", str(tiny_checkpoint), "--json", "--max-new-tokens", "3", "--seed", "1", stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    events = jsonl(proc.stdout)
    dones = [e for e in events if e["event"] == "done"]
    commands = [e for e in events if e["event"] == "command"]
    # The plan of the tiny model reaches 1M tokens, so Think Max is allowed without a warning.
    assert len(dones) == 3 and [d["message"]["think"] for d in dones] == ["off", "off", "max"]
    # Same mode, growing history: the KV session keeps at least the first prompt, only the rest is fed.
    assert dones[1]["stats"]["n_cached"] >= dones[0]["stats"]["n_prompt"]
    assert [c["kind"] for c in commands] == ["info", "stats", "exit"]
    assert commands[1]["data"]["context_capacity_tokens"] >= 393216
    for done in dones:  # content deltas add up to the answer, also when a raw completion was kept
        turn = events[: events.index(done)]
        turn = turn[max((i for i, e in enumerate(turn) if e["event"] in ("done", "command")), default=-1) + 1:]
        assert "".join(e["text"] for e in turn if e["event"] == "content") == done["message"]["content"]
    history = json.loads(Path(dones[-1]["history_file"]).read_text(encoding="utf-8"))
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"] * 3
    assert [m["content"] for m in history["messages"][0::2]] == ["hello", "more", "again"]
