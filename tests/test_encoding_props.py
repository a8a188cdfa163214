"""Round-trip property: parsing the encoding of a generated assistant turn gives back its content, reasoning and
tool calls (string and JSON parameters), in both thinking modes."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homerun.chat.encoding import BOS, DSML, EOS, THINK_END, THINK_START, encode_messages, parse_message_from_completion_text

# Characters that stress the parser (markup, quotes, newlines, the fullwidth bar of the special tokens, non-ASCII).
ALPHABET = st.sampled_from(list('ab <>/"=\n\\{}[]:,｜▁é中🙂') + ["think", "DSML", "tool_calls", "parameter"])
FORBIDDEN = (BOS, EOS, THINK_START, THINK_END, DSML)


def _clean(text):
    return not any(tok in text for tok in FORBIDDEN)


free_text = st.lists(ALPHABET, max_size=12).map("".join).filter(_clean)
identifier = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False, allow_infinity=False)
    | free_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(identifier, inner, max_size=3),
    max_leaves=6,
)
param_value = free_text | json_value.filter(lambda v: not isinstance(v, str))
tool_call = st.builds(
    lambda name, args: {"type": "function", "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}},
    identifier, st.dictionaries(identifier, param_value, max_size=4),
)
assistant_turn = st.fixed_dictionaries({
    "role": st.just("assistant"),
    "content": free_text,
    "reasoning_content": free_text,
    "tool_calls": st.lists(tool_call, max_size=3),
})


def _completion(turn, mode):
    """The text the model would have generated for `turn`: the encoding minus the prompt before it."""
    user = [{"role": "user", "content": "q"}]
    prompt = encode_messages(user, mode)
    full = encode_messages(user + [turn], mode)
    assert full.startswith(prompt)
    return full[len(prompt):]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(turn=assistant_turn, mode=st.sampled_from(["chat", "thinking"]))
def test_assistant_turn_round_trips(turn, mode):
    parsed = parse_message_from_completion_text(_completion(turn, mode), mode)
    assert parsed["content"] == turn["content"]
    assert parsed["reasoning_content"] == (turn["reasoning_content"] if mode == "thinking" else "")
    assert [c["function"]["name"] for c in parsed["tool_calls"]] == [c["function"]["name"] for c in turn["tool_calls"]]
    for got, sent in zip(parsed["tool_calls"], turn["tool_calls"]):
        assert json.loads(got["function"]["arguments"]) == json.loads(sent["function"]["arguments"])
