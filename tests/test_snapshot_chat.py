"""KV snapshots in chats and one-shot runs (homerun.chat.kv_files): /save writes the snapshot next to the history,
/load and --resume restore it (the next turn continues exactly as the live chat would), a snapshot that does not
match falls back to a re-prefill, --no-kv-save and the size limit, and `run --prompt-cache`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import homerun
from homerun.chat.kv_files import resolve_history, snapshot_path, use_prompt_cache
from homerun.chat.session import ChatSession, SamplingSettings, TurnDone

GREEDY = SamplingSettings(temperature=0.0, greedy=True, max_new_tokens=5)
DOC = "A long shared document. " * 40


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[16384], expert_act="fp32")


def _chat(model, **kw) -> ChatSession:
    return ChatSession(model, sampling=GREEDY, autosave=False, **kw)


def _turn(chat: ChatSession, text: str) -> TurnDone:
    return [ev for ev in chat.turn(text) if isinstance(ev, TurnDone)][0]


def test_save_then_load_restores_the_kv_and_continues_identically(model, tmp_path):
    live = _chat(model, system="Be brief.")
    _turn(live, "Hello there, who are you?")
    path = tmp_path / "c.json"
    res = live.handle_command(f"/save {path}")
    assert res.kind == "info" and "KV snapshot" in res.text and snapshot_path(path).is_file()
    assert snapshot_path(path).name == "c.kv.safetensors"

    back = _chat(model)
    res = back.handle_command(f"/load {path}")
    assert "Restored" in res.text, res.text
    assert back._kv.tokens == live._kv.tokens and back._seen == live._seen
    a, b = _turn(live, "And then?"), _turn(back, "And then?")
    assert a.message == b.message and a.stats.n_cached == b.stats.n_cached > 0


def test_a_snapshot_that_does_not_match_re_prefills(tiny_checkpoints, model, tmp_path):
    live = _chat(model)
    _turn(live, "First question")
    path = tmp_path / "m.json"
    live.handle_command(f"/save {path}")
    fp8 = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[16384], expert_act="fp32", kv_dtype="fp8")
    other = _chat(fp8)
    res = other.handle_command(f"/load {path}")
    assert "not used" in res.text and "kv_dtype" in res.text and "re-prefilled" in res.text, res.text
    n = other._kv.n_tokens
    assert n > 0 and _turn(other, "Second").stats.n_cached == n  # the turn feeds only the new message

    edited = _chat(model)  # the history changed after the snapshot was taken: its tokens no longer match
    edited.handle_command(f"/load {path}")
    edited.messages[0]["content"] = "Another first question"
    from homerun.chat.kv_files import resume_chat_kv

    assert "does not match" in resume_chat_kv(edited, path)


def test_no_kv_save_and_size_limit(model, tmp_path):
    chat = _chat(model)
    _turn(chat, "Hi")
    chat.kv_save = False
    chat.handle_command(f"/save {tmp_path / 'a.json'}")
    assert (tmp_path / "a.json").is_file() and not snapshot_path(tmp_path / "a.json").exists()
    chat.kv_save, chat.kv_save_max_bytes = True, 1000
    res = chat.handle_command(f"/save {tmp_path / 'b.json'}")
    assert "not written" in res.text
    assert not snapshot_path(tmp_path / "b.json").exists()


def test_resolve_history(tmp_path):
    chats = Path(os.environ["HOMERUN_HOME"]) / "chats"
    chats.mkdir(parents=True)
    (chats / "old.json").write_text("{}")
    os.utime(chats / "old.json", (1, 1))
    (chats / "new.json").write_text("{}")
    assert resolve_history(None, chats) == resolve_history("last", chats) == chats / "new.json"
    assert resolve_history("old", chats) == chats / "old.json"


def test_prompt_cache_written_then_reused(model, tmp_path):
    cache = tmp_path / "doc.kv"
    plain = _chat(model, system=DOC)
    want = _turn(plain, "Question one?").message

    first = _chat(model, system=DOC)
    assert "written" in use_prompt_cache(first, cache, "Question one?")
    assert _turn(first, "Question one?").message == want

    second = _chat(model, system=DOC)
    note = use_prompt_cache(second, cache, "Question one?")
    assert "restored" in note and second._kv.n_tokens > 200
    done = _turn(second, "Question one?")
    assert done.message == want and done.stats.n_cached > 200

    third = _chat(model, system="Another document entirely.")
    assert "rebuilt" in use_prompt_cache(third, cache, "Question one?")


def test_run_prompt_cache_cli(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from homerun.cli.app import app

    cache = tmp_path / "p.kv"
    args = ["run", str(tiny_checkpoint), "Q?", "--system", DOC, "--max-new-tokens", "3", "--temperature", "0",
            "--prompt-cache", str(cache)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert cache.is_file() and "Prompt cache written" in first.stderr
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "restored" in second.stderr and second.stdout == first.stdout
