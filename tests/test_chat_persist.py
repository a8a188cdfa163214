"""No lost work in chat (issue 15): /save never overwrites a foreign file unless forced (`/save! FILE`), never creates
directories, reports unwritable places as an error and keeps the session; a failing autosave warns once and the
chat goes on; /set refuses out-of-range values at once."""

import json
import os
import stat

import pytest

from fake_model import FakeModel
from homerun.chat.encoding import EOS
from homerun.chat.events import turn_events
from homerun.chat.session import ChatSession, TurnDone, load_history
from homerun.formats.tokenizer import Tokenizer, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(build_tiny_tokenizer())


def make(tok, n_turns=3, **kw):
    model = FakeModel(tok, [f"answer {i}" + EOS for i in range(n_turns)])
    return ChatSession(model, model_name="fake", **kw)


def turn(chat, text="hi"):
    return [ev for ev in chat.turn(text) if isinstance(ev, TurnDone)][-1]


def test_save_refuses_to_overwrite_a_foreign_file_unless_forced(tok, tmp_path):
    chat = make(tok)
    turn(chat)
    foreign = tmp_path / "mine" / "notes.txt"
    foreign.parent.mkdir()
    foreign.write_text("my notes\n")
    foreign.chmod(0o644)
    res = chat.handle_command(f"/save {foreign}")
    assert res.kind == "error" and "notes.txt" in res.text and "/save!" in res.text
    assert foreign.read_text() == "my notes\n" and stat.S_IMODE(foreign.stat().st_mode) == 0o644
    assert [p.name for p in foreign.parent.iterdir()] == ["notes.txt"]  # no temp file left
    res = chat.handle_command(f"/save! {foreign}")
    assert res.kind == "info" and load_history(foreign)["messages"] == chat.messages
    assert stat.S_IMODE(foreign.stat().st_mode) == 0o644  # an overwritten file keeps its mode


def test_save_overwrites_its_own_history_and_keeps_its_mode(tok, tmp_path):
    chat = make(tok)
    turn(chat)
    target = tmp_path / "chat.json"
    assert chat.handle_command(f"/save {target}").kind == "info"
    target.chmod(0o640)
    turn(chat)
    assert chat.handle_command(f"/save {target}").kind == "info"
    assert len(load_history(target)["messages"]) == 4 and stat.S_IMODE(target.stat().st_mode) == 0o640


def test_save_never_creates_directories(tok, tmp_path):
    chat = make(tok)
    turn(chat)
    target = tmp_path / "no" / "such" / "dir" / "x.json"
    res = chat.handle_command(f"/save {target}")
    assert res.kind == "error" and "no such directory" in res.text and str(target.parent) in res.text
    assert not (tmp_path / "no").exists()
    res = chat.handle_command(f"/save {tmp_path}")
    assert res.kind == "error" and "directory" in res.text


@pytest.mark.parametrize("target", ["/proc/version", "/proc/no-such-file.json", "/dev/null"])
def test_save_to_an_unwritable_place_keeps_the_session(tok, target):
    chat = make(tok)
    turn(chat)
    for cmd in ("/save", "/save!"):
        res = chat.handle_command(f"{cmd} {target}")
        assert res.kind == "error" and target in res.text
    assert len(chat.messages) == 2
    assert turn(chat, "again").message["content"] == "answer 1"  # the chat goes on


@pytest.mark.parametrize("home_kind", ["file", "read-only"])
def test_unwritable_history_warns_once_and_the_chat_goes_on(tok, tmp_path, monkeypatch, home_kind):
    home = tmp_path / "home"
    if home_kind == "file":
        home.write_text("not a directory")
    else:
        home.mkdir()
        home.chmod(0o500)
        if os.access(home, os.W_OK):  # root ignores modes
            pytest.skip("running as root: a read-only directory is still writable")
    monkeypatch.setenv("HOMERUN_HOME", str(home))
    chat = make(tok)
    warnings = []
    for i in range(3):
        done = turn(chat, f"q{i}")
        assert done.message["content"] == f"answer {i}"
        warnings.append(done.warning)
    assert warnings[0] and "not saved" in warnings[0] and str(chat.history_path) in warnings[0]
    assert warnings[1:] == [None, None]
    assert len(chat.messages) == 6
    events = turn_events(TurnDone(message=done.message, stats=done.stats, parsed=True, warning="w"), chat)
    assert {"event": "warning", "message": "w"} in events


def test_autosave_recovers_when_the_place_becomes_writable(tok, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("in the way")
    monkeypatch.setenv("HOMERUN_HOME", str(home))
    chat = make(tok)
    assert turn(chat).warning
    home.unlink()
    assert turn(chat).warning is None
    assert len(load_history(chat.history_path)["messages"]) == 4


@pytest.mark.parametrize("line,field", [
    ("/set temperature -1", "temperature"), ("/set temperature nan", "temperature"),
    ("/set temperature inf", "temperature"), ("/set top-p 2", "top-p"), ("/set top-p 0", "top-p"),
    ("/set top-k -3", "top-k"), ("/set max-new-tokens -5", "max-new-tokens"), ("/set max-new-tokens 0", "max-new-tokens"),
    ("/set seed -1", "seed"),
])
def test_set_validates_ranges(tok, line, field):
    chat = make(tok)
    before = chat.sampling
    res = chat.handle_command(line)
    assert res.kind == "error" and field in res.text
    assert chat.sampling == before
    assert turn(chat).message["content"] == "answer 0"  # the next turn still works


def test_set_accepts_the_edges(tok):
    chat = make(tok)
    for line in ("/set temperature 0", "/set top-p 1", "/set top-k 0", "/set max-new-tokens 1", "/set seed 0"):
        assert chat.handle_command(line).kind == "info", line


def test_history_file_written_by_save_is_valid_json(tok, tmp_path):
    chat = make(tok)
    turn(chat)
    target = tmp_path / "h.json"
    chat.handle_command(f"/save {target}")
    assert json.loads(target.read_text())["format"] == "homerun-chat"
