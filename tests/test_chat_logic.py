"""Chat session logic against a fake model that follows the runtime contract: turns, modes, KV reuse, stop,
unparseable completions, slash commands, and atomic history files."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_model import FakeModel
from homerun.chat.session import (
    THINK_MAX_MIN_CONTEXT_TOKENS,
    ChatSession,
    Delta,
    SamplingSettings,
    StreamSplitter,
    TurnDone,
    check_think_max,
    expert_hit_rate,
    lenient_parse,
    load_history,
    save_history,
)
from homerun.cli.chat_view import HELP_TEXT, render_stats
from homerun.chat.encoding import (
    EOS,
    THINK_END,
    THINK_START,
    CompletionFormatError,
    parse_message_from_completion_text,
)
from homerun.errors import ConfigError
from homerun.formats.tokenizer import StreamDecoder, Tokenizer, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(build_tiny_tokenizer())


def run_turn(session, text, stop_after=None):
    deltas, done = [], None
    for ev in session.turn(text):
        if isinstance(ev, TurnDone):
            done = ev
        else:
            deltas.append(ev)
            if stop_after is not None and len(deltas) >= stop_after:
                session.request_stop()
    return deltas, done


def make(tok, scripts, **kw):
    model = FakeModel(tok, scripts, **{k: kw.pop(k) for k in ("capacity", "session_capacity", "stats") if k in kw})
    return model, ChatSession(model, model_name="fake", **kw)


def test_chat_turn_streams_content_and_saves_history(tok):
    model, chat = make(tok, ["Hello world" + EOS])
    deltas, done = run_turn(chat, "hi")
    assert "".join(d.text for d in deltas) == "Hello world" and {d.kind for d in deltas} == {"content"}
    assert done.parsed and done.message["content"] == "Hello world" and done.stats.finish_reason == "eos"
    assert model.calls[0]["stop_ids"] == [tok.eos_id]
    saved = load_history(chat.history_path)
    assert chat.history_path.parent == chat.history_path.parents[1] / "chats"
    assert os.environ["HOMERUN_HOME"] in str(chat.history_path)
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"]
    assert saved["messages"][1]["content"] == "Hello world" and saved["messages"][1]["think"] == "off"


def test_thinking_turn_splits_reasoning_and_drops_it_next_turn(tok):
    model, chat = make(tok, ["let me think" + THINK_END + "Paris" + EOS, "ok" + THINK_END + "yes" + EOS],
                       think="high")
    deltas, done = run_turn(chat, "capital?")
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == "let me think"
    assert "".join(d.text for d in deltas if d.kind == "content") == "Paris"
    assert done.message["reasoning_content"] == "let me think"
    assert chat.handle_command("/reasoning").text == "let me think"
    run_turn(chat, "sure?")
    assert "let me think" not in tok.decode(model.calls[1]["prompt_ids"])
    assert tok.decode(model.calls[1]["prompt_ids"]).endswith("sure?<｜Assistant｜>" + THINK_START)


def test_chat_mode_reuses_the_kv_prefix(tok):
    model, chat = make(tok, ["one" + EOS, "two" + EOS])
    run_turn(chat, "first")
    _, done = run_turn(chat, "second")
    # The first turn (prompt + answer; the final EOS was never fed) is in the session: only the rest is fed.
    assert done.stats.n_cached == len(model.calls[0]["prompt_ids"]) + len(tok.encode("one" + EOS)) - 1
    assert model.calls[1]["fed"] == done.stats.n_prompt - done.stats.n_cached
    assert chat._kv.resets == 0


def test_rewritten_history_resets_the_session(tok):
    model, chat = make(tok, ["r" + THINK_END + "a" + EOS, "b" + THINK_END + "c" + EOS], think="high")
    run_turn(chat, "first")
    _, done = run_turn(chat, "second")  # dropped reasoning changes the prefix
    assert chat._kv.resets == 1 and done.stats.n_cached == 0 and model.calls[1]["fed"] == done.stats.n_prompt


def test_unclosed_thinking_is_kept_raw_without_crashing(tok):
    model, chat = make(tok, ["rambling without end" + EOS], think="high")
    deltas, done = run_turn(chat, "q")
    assert not done.parsed
    assert done.message["content"] == "rambling without end" and done.message["reasoning_content"] == ""
    # Streamed as (dim) reasoning; then the kept-raw answer arrives as one content delta so content deltas add up.
    assert "".join(d.text for d in deltas if d.kind == "reasoning") == "rambling without end"
    assert [d for d in deltas if d.kind == "content"] == [Delta("content", "rambling without end")]


def test_stop_request_ends_generation_and_keeps_session(tok):
    model, chat = make(tok, ["word " * 50 + EOS, "fine" + EOS])
    deltas, done = run_turn(chat, "long", stop_after=3)
    assert done.stats.finish_reason == "interrupted" and done.stats.n_gen < 50 and model.closed == 1
    assert chat.messages[-1]["finish_reason"] == "interrupted" and chat.messages[-1]["content"]
    assert len(chat._kv.tokens) == len(model.calls[0]["prompt_ids"]) + done.stats.n_gen - 1
    _, done2 = run_turn(chat, "again")  # the conversation goes on
    assert done2.message["content"] == "fine" and len(chat.messages) == 4


def test_length_finish(tok):
    model, chat = make(tok, ["a b c d e f g h" + EOS], sampling=SamplingSettings(max_new_tokens=3))
    _, done = run_turn(chat, "q")
    assert done.stats.finish_reason == "length" and done.stats.n_gen == 3 and not done.parsed


def test_failed_generation_removes_the_user_message(tok):
    model, chat = make(tok, [])  # the fake raises IndexError: no script left
    with pytest.raises(IndexError):
        run_turn(chat, "q")
    assert chat.messages == []


def test_sampling_defaults_and_overrides():
    cfg = {"temperature": 1.0, "top_p": 1.0, "do_sample": True}
    s = SamplingSettings.from_generation_config(cfg)
    assert (s.temperature, s.top_p, s.top_k, s.greedy) == (1.0, 1.0, None, False)
    s = SamplingSettings.from_generation_config(cfg, temperature=0.3, top_k=5, seed=7, top_p=None)
    assert (s.temperature, s.top_p, s.top_k, s.seed) == (0.3, 1.0, 5, 7)
    assert SamplingSettings.from_generation_config(cfg, temperature=0).greedy
    assert SamplingSettings.from_generation_config({"do_sample": False}).greedy


def test_sampling_flags_reach_generate(tok):
    model, chat = make(tok, ["x" + EOS], sampling=SamplingSettings(temperature=0.5, top_p=0.8, top_k=4, seed=3,
                                                                    max_new_tokens=9))
    run_turn(chat, "q")
    call = model.calls[0]
    assert (call["temperature"], call["top_p"], call["top_k"], call["seed"], call["max_new_tokens"]) == \
        (0.5, 0.8, 4, 3, 9)


# ---------------------------------------------------------------- streaming split and lenient parse


@pytest.mark.parametrize("cut", range(1, 12))
def test_splitter_never_leaks_markers(cut):
    text = "abc" + THINK_END + "def" + "\n\n<｜DSML｜tool_calls>\n..." + EOS
    sp = StreamSplitter(thinking=True)
    out = []
    for i in range(0, len(text), cut):
        out += sp.push(text[i:i + cut])
    out += sp.finish()
    assert "".join(d.text for d in out if d.kind == "reasoning") == "abc"
    assert "".join(d.text for d in out if d.kind == "content") == "def"


@settings(max_examples=80, deadline=None)
@given(reasoning=st.text(alphabet="ab</>\n｜think", max_size=12), content=st.text(alphabet="ab</>\n｜", max_size=12),
       cuts=st.lists(st.integers(1, 6), min_size=1, max_size=8))
def test_splitter_agrees_with_the_parser(reasoning, content, cuts):
    """Any chunking of a well-formed completion streams exactly the reasoning and content the parser returns."""
    text = reasoning + THINK_END + content + EOS
    try:
        expected = parse_message_from_completion_text(text, "thinking")
    except CompletionFormatError:
        return  # generated text that is not well-formed (e.g. a </think> inside the reasoning)
    sp, out, i = StreamSplitter(thinking=True), [], 0
    for n in cuts * (len(text) // sum(cuts) + 1):
        out += sp.push(text[i:i + n])
        i += n
    out += sp.finish()
    assert "".join(d.text for d in out if d.kind == "reasoning") == expected["reasoning_content"]
    assert "".join(d.text for d in out if d.kind == "content") == expected["content"]


def test_splitter_releases_held_back_text_at_finish():
    sp = StreamSplitter(thinking=False)
    assert sp.push("x<｜end") == [Delta("content", "x")]  # might be the start of EOS: held back
    assert sp.push("ing\n\n") == [Delta("content", "<｜ending")]  # \n\n might start a tool-call block
    assert sp.finish() == [Delta("content", "\n\n")]


def test_lenient_parse():
    assert lenient_parse("a" + THINK_END + "b" + EOS, "thinking") == (
        {"role": "assistant", "content": "b", "reasoning_content": "a", "tool_calls": []}, True)
    msg, ok = lenient_parse("a" + THINK_END + "b" + THINK_END + "c", "thinking")
    assert not ok and msg["reasoning_content"] == "a" and msg["content"] == "b" + THINK_END + "c"
    msg, ok = lenient_parse("raw" + EOS, "thinking")
    assert not ok and msg["content"] == "raw"


def test_stream_decoder_contract_matches_decode(tok):
    text = "Café 你好 🚀" + THINK_END + "ok" + EOS
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in tok.encode(text)) == text


# ---------------------------------------------------------------- slash commands


def test_think_max_gate():
    assert check_think_max(None)[0] and "unknown" in check_think_max(None)[1]
    allowed, reason = check_think_max(THINK_MAX_MIN_CONTEXT_TOKENS - 1)
    assert not allowed and "393,216" in reason
    assert check_think_max(THINK_MAX_MIN_CONTEXT_TOKENS) == (True, None)


def test_think_command_modes(tok):
    _, chat = make(tok, [], capacity=4096)
    assert chat.handle_command("/think high").text == "Thinking: high" and chat.think == "high"
    res = chat.handle_command("/think max")
    assert res.kind == "error" and "4,096" in res.text and chat.think == "high"
    assert chat.handle_command("/think loud").kind == "error"
    assert chat.handle_command("/think off").text == "Thinking: off" and chat.think == "off"
    _, unknown = make(tok, [])
    res = unknown.handle_command("/think max")
    assert res.kind == "warn" and unknown.think == "max" and "unknown" in res.text
    _, big = make(tok, [], capacity=1 << 20)
    assert big.handle_command("/think max").kind == "info" and big.think == "max"
    _, growing = make(tok, [], session_capacity=1 << 20)  # what is allocated now says nothing about the maximum
    assert growing.handle_command("/think max").kind == "warn"


def test_system_reset_help_exit_unknown(tok):
    model, chat = make(tok, ["a" + EOS])
    chat.handle_command("/system Be terse.")
    assert chat.prompt_text().startswith("<｜begin▁of▁sentence｜>Be terse.")
    run_turn(chat, "q")
    old_path = chat.history_path
    assert chat.handle_command("/reset").kind == "info"
    assert chat.messages == [] and chat.system == "Be terse." and chat.history_path != old_path
    assert chat.handle_command("/system").text == "System prompt cleared" and chat.system is None
    assert chat.handle_command("/help").kind == "help"
    assert "/think off|high|max" in HELP_TEXT and '"""' in HELP_TEXT
    assert chat.handle_command("/exit").kind == "exit"
    assert chat.handle_command("/nope").kind == "error"


def test_save_and_load_round_trip(tok, tmp_path):
    model, chat = make(tok, ["r" + THINK_END + "a" + EOS], think="high", system="S")
    run_turn(chat, "q")
    target = tmp_path / "saved.json"
    assert str(target) in chat.handle_command(f"/save {target}").text
    model2, other = make(tok, ["b" + EOS])
    res = other.handle_command(f"/load {target}")
    assert res.kind == "info" and "2 messages" in res.text
    assert (other.messages, other.system, other.think) == (chat.messages, "S", "high")
    assert other.prompt_text() == chat.prompt_text()


def test_load_errors_name_the_file(tok, tmp_path):
    _, chat = make(tok, [])
    assert "no such history file" in chat.handle_command(f"/load {tmp_path / 'missing.json'}").text
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "other"}')
    res = chat.handle_command(f"/load {bad}")
    assert res.kind == "error" and "bad.json" in res.text and "format" in res.text
    with pytest.raises(ConfigError):
        load_history(bad)


def test_stats(tok):
    _, chat = make(tok, ["one two" + EOS], capacity=4000, session_capacity=1000)
    run_turn(chat, "q")
    res = chat.handle_command("/stats")
    assert res.data["expert_cache_hit_rate"] == 0.75
    assert res.data["context_used_tokens"] == len(chat._kv.tokens) and res.data["context_capacity_tokens"] == 4000
    assert res.data["context_allocated_tokens"] == 1000
    assert res.data["last_turn"]["decode_tok_s"] == pytest.approx((res.data["last_turn"]["n_gen"] - 1) / res.data["last_turn"]["decode_s"])
    assert res.data["last_turn"]["n_gen"] == len(tok.encode("one two" + EOS))
    text = render_stats(res.data)
    assert "tok/s" in text and "75.0%" in text and "4,000 tokens" in text and "1,000 allocated" in text


def test_expert_hit_rate_shapes():
    assert expert_hit_rate({"expert_cache_hit_rate": 0.5}) == 0.5
    assert expert_hit_rate({"offload": {"expert_hits": 1, "expert_misses": 3}}) == 0.25
    assert expert_hit_rate({"hits": 0, "misses": 0}) is None
    assert expert_hit_rate({}) is None


# ---------------------------------------------------------------- atomic history files


def test_save_history_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "h.json"
    save_history(path, {"format": "homerun-chat", "messages": [{"role": "user", "content": "old"}]})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", boom)
    with pytest.raises(OSError):
        save_history(path, {"format": "homerun-chat", "messages": []})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["h.json"]  # no temp file left behind


def test_set_sampling_command(tok):
    model, chat = make(tok, ["x" + EOS])
    assert chat.handle_command("/set max-new-tokens 7").text == "max_new_tokens = 7"
    assert chat.handle_command("/set temperature 0").kind == "info" and chat.sampling.greedy
    assert chat.handle_command("/set top_k none").kind == "info" and chat.sampling.top_k is None
    assert chat.handle_command("/set top-k many").kind == "error"
    assert chat.handle_command("/set colour 3").kind == "error"
    run_turn(chat, "q")
    assert model.calls[0]["max_new_tokens"] == 7 and model.calls[0]["greedy"]


# ---------------------------------------------------------------- terminal pieces that need no terminal


def _reader(lines):
    it = iter(lines)
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        return next(it)

    return read, prompts


def test_read_message_continuations_and_blocks():
    from homerun.cli.chat_view import read_message

    read, prompts = _reader(["one \\", "two\\", "three"])
    assert read_message(read) == "one \ntwo\nthree" and prompts == [">>> ", "... ", "... "]
    read, prompts = _reader(['"""', "a \\", "", "b", '"""'])
    assert read_message(read) == "a \\\n\nb" and len(prompts) == 5  # inside a block, \ is literal
    read, _ = _reader(["plain"])
    assert read_message(read) == "plain"


def test_render_done_collapses_reasoning_and_renders_markdown():
    from rich.console import Console

    from homerun.chat.session import TurnStats
    from homerun.cli.chat_view import render_done

    console = Console(record=True, width=80, force_terminal=False)
    msg = {"role": "assistant", "content": "# Title\n\n**bold** \x1b[31mred", "reasoning_content": "step one\nstep two",
           "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    stats = TurnStats(n_prompt=5, n_cached=0, n_gen=4, prefill_s=0.1, decode_s=0.3, wall_s=0.4, finish_reason="eos")
    render_done(console, TurnDone(message=msg, stats=stats, parsed=True))
    text = console.export_text()
    assert "▸ Thought (17 chars): step one step two (/reasoning shows it all)" in text
    assert "Title" in text and "**bold**" not in text and "bold" in text  # rendered as markdown
    assert "\x1b" not in text and "\u241b[31mred" in text  # control characters are shown (␛), not obeyed
    assert "Tool call: f({})" in text and "4 tokens · 10.0 tok/s · finish: eos" in text


def test_generated_ids_are_kept_when_retokenizing_would_differ(tok):
    # "The" is one BPE token of the tiny vocabulary; the "model" generates it letter by letter. The next prompt must
    # keep the generated ids (so the KV prefix is reused), not re-tokenize the text.
    word = "The"
    split = [tok.encode(ch)[0] for ch in word]
    assert tok.encode(word) != split and len(tok.encode(word)) == 1
    model, chat = make(tok, [split + [tok.eos_id], "c" + EOS])
    run_turn(chat, "x")
    _, done = run_turn(chat, "y")
    first = model.calls[0]["prompt_ids"]
    assert model.calls[1]["prompt_ids"][: len(first) + len(split) + 1] == first + split + [tok.eos_id]
    assert done.stats.n_cached == len(first) + len(split) and chat._kv.resets == 0
    # Text that no longer extends what the model saw (a new system prompt) is tokenized from scratch.
    chat.handle_command("/system S")
    assert chat.prompt_ids() == tok.encode(chat.prompt_text())
