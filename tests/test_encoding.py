"""Each rule of the DeepSeek-V4 chat encoding, the parser, and DeepSeek's four official vectors (when present)."""

import json

import pytest

from conftest import REFERENCE
from homerun.chat.encoding import (
    ASSISTANT,
    BOS,
    EOS,
    LATEST_REMINDER,
    REASONING_EFFORT_MAX_PROMPT,
    THINK_END,
    THINK_START,
    USER,
    CompletionFormatError,
    encode_messages,
    parse_message_from_completion_text,
)

VECTORS = REFERENCE / "encoding-tests"
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}},
}


def call(name, arguments, call_id=None):
    out = {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    if call_id:
        out["id"] = call_id
    return out


# ---------------------------------------------------------------- official vectors


def _vector(i):
    data = json.loads((VECTORS / f"test_input_{i}.json").read_text(encoding="utf-8"))
    if isinstance(data, dict):  # case 1: tools go on the first message
        messages = data["messages"]
        messages[0]["tools"] = data["tools"]
    else:
        messages = data
    return messages, (VECTORS / f"test_output_{i}.txt").read_text(encoding="utf-8")


@pytest.mark.skipif(not VECTORS.exists(), reason="../shared/reference/deepseek-v4/encoding-tests not present")
@pytest.mark.parametrize("case,mode", [(1, "thinking"), (2, "thinking"), (3, "thinking"), (4, "chat")])
def test_official_vector_byte_for_byte(case, mode):
    messages, expected = _vector(case)
    assert encode_messages(messages, thinking_mode=mode).encode("utf-8") == expected.encode("utf-8")


def _assistant_spans(prompt):
    """Each generated span: after `<｜Assistant｜><think>` up to the next `<｜User｜>` (or the end)."""
    spans = []
    for chunk in prompt.split(ASSISTANT + THINK_START)[1:]:
        spans.append(chunk.split(USER)[0])
    return spans


@pytest.mark.skipif(not VECTORS.exists(), reason="../shared/reference/deepseek-v4/encoding-tests not present")
def test_official_vector_1_parses_back():
    messages, expected = _vector(1)
    first, last = [parse_message_from_completion_text(s, "thinking") for s in _assistant_spans(expected)]
    assert first["reasoning_content"] == messages[2]["reasoning_content"]
    assert first["content"] == ""
    assert [c["function"]["name"] for c in first["tool_calls"]] == ["get_weather"]
    assert json.loads(first["tool_calls"][0]["function"]["arguments"]) == {"location": "Beijing", "unit": "celsius"}
    assert last["reasoning_content"] == messages[4]["reasoning_content"]
    assert "22°C" in last["content"] and last["tool_calls"] == []


@pytest.mark.skipif(not VECTORS.exists(), reason="../shared/reference/deepseek-v4/encoding-tests not present")
def test_official_vector_2_drops_earlier_reasoning_and_parses_back():
    messages, expected = _vector(2)
    assert messages[2]["reasoning_content"] not in expected
    (last,) = [parse_message_from_completion_text(s, "thinking") for s in _assistant_spans(expected)]
    assert last["reasoning_content"] == messages[4]["reasoning_content"]
    assert last["content"] == messages[4]["content"]


# ---------------------------------------------------------------- prompt start, system


def test_bos_first_and_optional():
    msgs = [{"role": "user", "content": "hi"}]
    assert encode_messages(msgs, "chat").startswith(BOS + USER)
    assert encode_messages(msgs, "chat", add_default_bos_token=False).startswith(USER)


def test_context_is_not_rendered_and_gets_no_bos():
    context = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"}]
    out = encode_messages([{"role": "user", "content": "second"}], "chat", context=context)
    assert out == USER + "second" + ASSISTANT + THINK_END
    full = encode_messages(context + [{"role": "user", "content": "second"}], "chat")
    assert full.endswith(out) and full.startswith(BOS)


def test_system_verbatim_without_role_token():
    out = encode_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}], "chat")
    assert out == BOS + "Be brief." + USER + "x" + ASSISTANT + THINK_END


def test_system_tools_block():
    out = encode_messages([{"role": "system", "content": "S", "tools": [WEATHER_TOOL]}], "chat")
    assert out.startswith(BOS + "S\n\n## Tools\n\n")
    # One JSON schema per line: the `function` object only, non-ASCII kept.
    assert "\n" + json.dumps(WEATHER_TOOL["function"], ensure_ascii=False) + "\n" in out
    assert out.endswith("You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n")


def test_system_response_format():
    schema = {"type": "json_schema", "name": "é"}
    out = encode_messages([{"role": "system", "content": "S", "response_format": schema}], "chat")
    assert out == BOS + "S\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n" + \
        json.dumps(schema, ensure_ascii=False)


# ---------------------------------------------------------------- user suffixes and thinking modes


@pytest.mark.parametrize("mode,effort,tail", [
    ("chat", None, THINK_END), ("thinking", None, THINK_START), ("thinking", "high", THINK_START),
    ("thinking", "max", THINK_START),
])
def test_last_user_suffix_per_mode(mode, effort, tail):
    out = encode_messages([{"role": "user", "content": "q"}], mode, reasoning_effort=effort)
    assert out.endswith(USER + "q" + ASSISTANT + tail)


def test_reasoning_effort_max_prompt_after_bos_before_system():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}]
    out = encode_messages(msgs, "thinking", reasoning_effort="max")
    assert out.startswith(BOS + REASONING_EFFORT_MAX_PROMPT + "S" + USER)
    assert REASONING_EFFORT_MAX_PROMPT.startswith("Reasoning Effort: Absolute maximum with no shortcuts permitted.\n")
    assert REASONING_EFFORT_MAX_PROMPT.endswith("\n\n") and REASONING_EFFORT_MAX_PROMPT.count("\n") == 4


def test_high_equals_none_and_chat_ignores_effort():
    msgs = [{"role": "user", "content": "q"}]
    assert encode_messages(msgs, "thinking", reasoning_effort="high") == encode_messages(msgs, "thinking")
    assert encode_messages(msgs, "chat", reasoning_effort="max") == encode_messages(msgs, "chat")


@pytest.mark.parametrize("kwargs", [{"thinking_mode": "deep"}, {"thinking_mode": "thinking", "reasoning_effort": "low"}])
def test_invalid_modes_rejected(kwargs):
    with pytest.raises(ValueError):
        encode_messages([{"role": "user", "content": "q"}], **kwargs)


def test_consecutive_users_merge_without_suffix():
    out = encode_messages([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "chat")
    assert out == BOS + USER + "a\n\nb" + ASSISTANT + THINK_END


# ---------------------------------------------------------------- assistant turns and drop-thinking


def _two_turns(**extra):
    return [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "reasoning_content": "r1", "content": "a1", **extra},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "reasoning_content": "r2", "content": "a2"},
    ]


def test_drop_thinking_rule():
    out = encode_messages(_two_turns(), "thinking")
    assert out == (BOS + USER + "u1" + ASSISTANT + THINK_END + "a1" + EOS
                   + USER + "u2" + ASSISTANT + THINK_START + "r2" + THINK_END + "a2" + EOS)


def test_drop_thinking_off_keeps_all_reasoning():
    out = encode_messages(_two_turns(), "thinking", drop_thinking=False)
    assert out == (BOS + USER + "u1" + ASSISTANT + THINK_START + "r1" + THINK_END + "a1" + EOS
                   + USER + "u2" + ASSISTANT + THINK_START + "r2" + THINK_END + "a2" + EOS)


def test_tools_anywhere_disable_drop_thinking():
    msgs = [{"role": "system", "content": "S", "tools": [WEATHER_TOOL]}] + _two_turns()
    out = encode_messages(msgs, "thinking")
    assert THINK_START + "r1" + THINK_END + "a1" in out


def test_chat_mode_never_emits_reasoning():
    out = encode_messages(_two_turns(), "chat")
    assert "r1" not in out and "r2" not in out
    assert out.endswith(USER + "u2" + ASSISTANT + THINK_END + "a2" + EOS)


def test_wo_eos_leaves_the_turn_open():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "partial", "wo_eos": True}]
    assert encode_messages(msgs, "chat").endswith(ASSISTANT + THINK_END + "partial")


# ---------------------------------------------------------------- tools, tool results, DSML


def test_tool_calls_render_as_dsml_with_string_flags():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call("f", {"s": "x y", "n": 3, "l": [1, "a"]})]}]
    out = encode_messages(msgs, "chat")
    assert out.endswith(
        ASSISTANT + THINK_END + "\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
        '<｜DSML｜parameter name="s" string="true">x y</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">3</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="l" string="false">[1, "a"]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)


def test_non_json_arguments_kept_under_one_key():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "raw"}}]}]
    assert '<｜DSML｜parameter name="arguments" string="true">raw</｜DSML｜parameter>' in encode_messages(msgs, "chat")


def test_tool_results_merge_into_user_in_call_order():
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [call("a", {}, "id_a"), call("b", {}, "id_b")]},
        {"role": "tool", "tool_call_id": "id_b", "content": "B"},
        {"role": "tool", "tool_call_id": "id_a", "content": "A"},
        {"role": "user", "content": "and?"},
    ]
    out = encode_messages(msgs, "chat")
    assert out.endswith(EOS + USER + "<tool_result>A</tool_result>\n\n<tool_result>B</tool_result>\n\nand?"
                        + ASSISTANT + THINK_END)


# ---------------------------------------------------------------- latest_reminder, developer, tasks


def test_latest_reminder_before_user_turn():
    msgs = [{"role": "system", "content": "S"}, {"role": "latest_reminder", "content": "2026-01-01"},
            {"role": "user", "content": "q"}]
    assert encode_messages(msgs, "chat") == BOS + "S" + LATEST_REMINDER + "2026-01-01" + USER + "q" + ASSISTANT + THINK_END


def test_user_followed_by_latest_reminder_gets_suffix():
    msgs = [{"role": "user", "content": "q"}, {"role": "latest_reminder", "content": "R"}]
    assert encode_messages(msgs, "chat") == BOS + USER + "q" + ASSISTANT + THINK_END + LATEST_REMINDER + "R"


def test_developer_renders_like_user_with_tools_and_is_dropped_before_last_user():
    dev = {"role": "developer", "content": "do it", "tools": [WEATHER_TOOL]}
    out = encode_messages([dev], "thinking")
    assert out.startswith(BOS + USER + "do it\n\n## Tools\n\n") and out.endswith(ASSISTANT + THINK_START)
    msgs = [{"role": "developer", "content": "old"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "new"}]
    assert "old" not in encode_messages(msgs, "thinking")
    assert USER + "old" in encode_messages(msgs, "chat")


def test_developer_without_content_rejected():
    with pytest.raises(ValueError):
        encode_messages([{"role": "developer", "content": ""}], "chat")


def test_task_tokens():
    action = encode_messages([{"role": "user", "content": "q", "task": "action"}], "thinking")
    assert action.endswith(USER + "q" + ASSISTANT + THINK_START + "<｜action｜>")
    title = encode_messages([{"role": "user", "content": "q", "task": "title"}], "chat")
    assert title.endswith(USER + "q<｜title｜>")
    # The answer to a task never carries reasoning, even in thinking mode.
    answered = encode_messages([{"role": "user", "content": "q", "task": "action"},
                                {"role": "assistant", "content": "Search", "reasoning_content": "r"}], "thinking")
    assert answered.endswith("<｜action｜>Search" + EOS)


# ---------------------------------------------------------------- parser


def test_parse_thinking_and_chat():
    msg = parse_message_from_completion_text("why" + THINK_END + "**answer**" + EOS, "thinking")
    assert (msg["reasoning_content"], msg["content"], msg["tool_calls"]) == ("why", "**answer**", [])
    msg = parse_message_from_completion_text("plain" + EOS, "chat")
    assert (msg["role"], msg["reasoning_content"], msg["content"]) == ("assistant", "", "plain")


def test_parse_tool_calls_rebuilds_arguments_json():
    text = ("r" + THINK_END + "let me check\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
            '<｜DSML｜parameter name="s" string="true">a "q"</｜DSML｜parameter>\n'
            '<｜DSML｜parameter name="o" string="false">{"k": [1, 2]}</｜DSML｜parameter>\n'
            "</｜DSML｜invoke>\n<｜DSML｜invoke name=\"g\">\n</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS)
    msg = parse_message_from_completion_text(text, "thinking")
    assert msg["content"] == "let me check"
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["f", "g"]
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"s": 'a "q"', "o": {"k": [1, 2]}}
    assert json.loads(msg["tool_calls"][1]["function"]["arguments"]) == {}


BAD_COMPLETIONS = [
    ("thinking", "no end of thinking" + EOS),
    ("chat", "no eos"),
    ("chat", "done" + EOS + "more"),
    ("thinking", "r" + THINK_END + "a" + THINK_START + "b" + EOS),
    ("chat", "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
             '<｜DSML｜parameter name="a" string="true">1</｜DSML｜parameter>\n'
             '<｜DSML｜parameter name="a" string="true">2</｜DSML｜parameter>\n'
             "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS),
    ("chat", "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n"
             '<｜DSML｜parameter name="a" string="maybe">1</｜DSML｜parameter>\n'
             "</｜DSML｜invoke>\n</｜DSML｜tool_calls>" + EOS),
    ("chat", "x\n\n<｜DSML｜tool_calls>\n<｜DSML｜invoke name=\"f\">\n</｜DSML｜invoke>\n"),
    ("chat", "x\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>trailing" + EOS),
]


@pytest.mark.parametrize("mode,text", BAD_COMPLETIONS)
def test_parse_rejects_malformed(mode, text):
    with pytest.raises(CompletionFormatError):
        parse_message_from_completion_text(text, mode)
