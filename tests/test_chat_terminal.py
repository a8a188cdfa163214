"""A real `homerun chat` session in a pseudo-terminal (pexpect) against a tiny official-format checkpoint: turns,
multi-line input, a mode switch, Ctrl-C in the middle of a generation, /save, /reset, /load, /stats, /exit, and
the history files it leaves under HOMERUN_HOME. The random tiny model writes gibberish; only structure is checked."""

import json
import os
import re
import signal
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

TIMEOUT_S = 120  # generous: the CI machine is shared; timing never decides pass/fail
LIVE_REFRESH = "\x1b[2K"  # rich.live clears the line on every refresh after the first: text is streaming


def _spawn(ckpt, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    # A pytest started with SIGINT ignored (nohup, some CI shells) would pass SIG_IGN on through exec: Python then
    # installs no KeyboardInterrupt handler and the Ctrl-C tests would wait out TIMEOUT_S. The child gets the default.
    child = pexpect.spawn(sys.executable, ["-m", "homerun", "chat", str(ckpt), *args], env=env,
                          encoding="utf-8", timeout=TIMEOUT_S, dimensions=(30, 100), preexec_fn=_default_sigint)
    child.transcript = []
    child.logfile_read = _Collect(child.transcript)
    return child


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Collect:
    def __init__(self, sink):
        self.sink = sink

    def write(self, data):
        self.sink.append(data)

    def flush(self):
        pass


def _turn(child, *lines):
    for line in lines:
        child.sendline(line)
    child.expect(r"\d+ tokens?")
    child.expect_exact(">>> ")


def _history_files():
    return sorted((Path(os.environ["HOMERUN_HOME"]) / "chats").glob("*.json"), key=lambda p: p.stat().st_mtime)


def test_terminal_session(tiny_checkpoint, tmp_path):
    saved = tmp_path / "saved.json"
    child = _spawn(tiny_checkpoint, "--max-new-tokens", "100000", "--seed", "3")
    child.expect_exact(">>> ")
    # Turn 1: a long generation, stopped with Ctrl-C once text is streaming.
    child.sendline("hello there")
    child.expect_exact(LIVE_REFRESH)
    child.sendintr()
    child.expect_exact("[interrupted]")
    child.expect_exact(">>> ")
    child.sendline("/set max-new-tokens 4")
    child.expect_exact("max_new_tokens = 4")
    # Mode switch, then turn 2 with a backslash continuation and turn 3 with a """ block.
    child.sendline("/think high")
    child.expect_exact("Thinking: high")
    mark = len(child.transcript)
    _turn(child, "line one \\", "line two")
    thinking_output = "".join(child.transcript[mark:])
    _turn(child, '"""', "block a", "block b", '"""')
    child.sendline(f"/save {saved}")
    child.expect_exact("Saved 6 messages")
    child.sendline("/reset")
    child.expect_exact("Conversation reset")
    child.sendline(f"/load {saved}")
    child.expect_exact("Loaded 6 messages")
    child.sendline("/think off")
    child.expect_exact("Thinking: off")
    _turn(child, "fourth")
    child.sendline("/stats")
    child.expect(r"decode: .* tok/s")
    child.expect(r"context: [\d,]+ / ")
    child.sendline("/exit")
    child.expect_exact("History:")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    transcript = "".join(child.transcript)
    assert transcript.count(">>> ") >= 10
    assert "\x1b[2;3m" in thinking_output  # reasoning streams dim italic in thinking mode
    assert re.search(r"\.\.\. ", transcript)  # continuation prompt

    data = json.loads(saved.read_text(encoding="utf-8"))
    msgs = data["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3
    assert [m["content"] for m in msgs[0::2]] == ["hello there", "line one \nline two", "block a\nblock b"]
    first, second, third = msgs[1::2]
    assert first["finish_reason"] == "interrupted" and first["think"] == "off"
    assert first["content"]  # stopped mid-generation: the partial answer is kept
    assert second["think"] == third["think"] == "high"
    assert second["finish_reason"] in ("eos", "length") and third["finish_reason"] in ("eos", "length")
    assert data["sampling"]["max_new_tokens"] == 4 and data["sampling"]["seed"] == 3

    # Autosave: the first conversation (6 messages) and, after /reset + /load, the continued one (8 messages).
    before, after = _history_files()
    assert len(json.loads(before.read_text(encoding="utf-8"))["messages"]) == 6
    continued = json.loads(after.read_text(encoding="utf-8"))
    assert continued["messages"][:6] == msgs and len(continued["messages"]) == 8
    assert continued["messages"][6]["content"] == "fourth" and continued["messages"][7]["think"] == "off"
    assert not list(before.parent.glob(".*.tmp"))  # no temp files left by the atomic writes


def test_ctrl_c_at_prompt_keeps_session_and_ctrl_d_exits(tiny_checkpoint):
    child = _spawn(tiny_checkpoint)
    child.expect_exact(">>> ")
    child.sendintr()
    child.expect_exact("(Ctrl-D or /exit to leave)")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert _history_files() == []  # nothing said, nothing saved


def test_killed_mid_generation_keeps_the_saved_history(tiny_checkpoint):
    child = _spawn(tiny_checkpoint, "--max-new-tokens", "3")
    child.expect_exact(">>> ")
    _turn(child, "first")
    child.sendline("/set max-new-tokens 100000")
    child.expect_exact(">>> ")
    child.sendline("second")
    child.expect_exact(LIVE_REFRESH)
    child.kill(signal.SIGKILL)
    child.close(force=True)
    (history,) = _history_files()
    data = json.loads(history.read_text(encoding="utf-8"))  # complete, valid JSON: the last atomic write
    users = [m["content"] for m in data["messages"] if m["role"] == "user"]
    # Killed while "second" streams, the file holds the first turn; if the tiny model hit EOS before the kill
    # landed (decode is fast), it holds the whole second turn too, never a partial one.
    assert users in (["first"], ["first", "second"])
    if users == ["first", "second"]:
        assert data["messages"][-1]["role"] == "assistant"
        assert data["messages"][-1]["finish_reason"] in ("eos", "length")
    assert not list(history.parent.glob(".*.tmp"))
