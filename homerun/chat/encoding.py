"""The DeepSeek-V4 chat encoding: messages -> prompt text, and completion text -> assistant message.

DeepSeek-V4 ships no Jinja template; its prompts are built by a Python encoder (`encoding/encoding_dsv4.py` in the
model repository). This module reimplements that encoder with the same signatures and the same output byte for
byte (checked against DeepSeek's four test vectors):

- `encode_messages(messages, thinking_mode, context=None, drop_thinking=True, add_default_bos_token=True,
  reasoning_effort=None) -> str`
- `parse_message_from_completion_text(text, thinking_mode) -> dict`

It produces text only; tokenizing (BOS is already in the text) is the caller's job. The text is a
`homerun.formats.tokenizer.PromptText`: a `str` (byte-identical to DeepSeek's output) that also records which parts
the template wrote. `Tokenizer.encode` makes special-token strings control tokens only in those parts; in message
content (text, reasoning, tool schemas, tool-call arguments, tool results) they stay text, so content cannot forge a
turn. It does not repair malformed completions: parsing is strict and raises
`CompletionFormatError` (a ValueError) on anything that is not well-formed model output.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from homerun.formats.tokenizer import PromptText

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"

# Internal classification tasks; a message's `task` field selects one.
TASK_TOKENS = {
    "action": "<｜action｜>",
    "query": "<｜query｜>",
    "authority": "<｜authority｜>",
    "domain": "<｜domain｜>",
    "title": "<｜title｜>",
    "read_url": "<｜read_url｜>",
}

THINKING_MODES = ("chat", "thinking")
REASONING_EFFORTS = (None, "high", "max")

# Inserted right after BOS in thinking mode with reasoning_effort="max" ("high" and None add nothing).
REASONING_EFFORT_MAX_PROMPT = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

RESPONSE_FORMAT_HEADER = "## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"

TOOLS_HEADER = f"""## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{DSML}tool_calls>" block like the following:

<{DSML}tool_calls>
<{DSML}invoke name="$TOOL_NAME">
<{DSML}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{DSML}parameter>
...
</{DSML}invoke>
<{DSML}invoke name="$TOOL_NAME2">
...
</{DSML}invoke>
</{DSML}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside {THINK_START}...{THINK_END} BEFORE any tool calls or final response.

Otherwise, output directly after {THINK_END} with tool calls or final response.

### Available Tool Schemas

"""
TOOLS_FOOTER = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"

TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
# What the model emits before a tool-call block; content ends here.
TOOL_CALLS_START = "\n\n" + f"<{DSML}tool_calls"


def _t(text: str) -> PromptText:
    """Template text: special-token strings in it are control tokens."""
    return PromptText(text, template=True)


def _u(text: Any) -> PromptText:
    """Text from the messages (user data): always tokenized as text."""
    return PromptText(text if isinstance(text, str) else f"{text}")


class CompletionFormatError(ValueError):
    """A completion is not well-formed DeepSeek-V4 output (missing </think>, EOS, or a malformed DSML block)."""


def _to_json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (UnicodeEncodeError, ValueError):
        return json.dumps(value, ensure_ascii=True)


# ---------------------------------------------------------------- rendering pieces


def render_tools(functions: list[dict[str, Any]]) -> str:
    """The tools block appended to a system/developer message; `functions` are the `function` objects of
    OpenAI-format tools (name, description, parameters), one JSON line each."""
    return _t(TOOLS_HEADER) + _u("\n".join(_to_json(fn) for fn in functions)) + _t(TOOLS_FOOTER)


def _render_response_format(schema: Any) -> PromptText:
    return _t(RESPONSE_FORMAT_HEADER) + _u(_to_json(schema))


def _arguments_to_dsml(arguments: str) -> PromptText:
    """OpenAI `arguments` JSON -> one DSML parameter line per key (strings raw, everything else as JSON)."""
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError):
        parsed = {"arguments": arguments}  # not JSON: keep the raw text under one key, as DeepSeek does
    lines = []
    for key, value in parsed.items():
        is_str = isinstance(value, str)
        text = value if is_str else _to_json(value)
        flag = "true" if is_str else "false"
        lines.append(_t(f'<{DSML}parameter name="') + _u(key) + _t(f'" string="{flag}">') + _u(text)
                     + _t(f"</{DSML}parameter>"))
    return _t("\n").join_parts(lines)


def render_tool_calls(tool_calls: list[dict[str, Any]]) -> str:
    """OpenAI-format tool calls -> the DSML block as the model writes it (leading blank line included)."""
    invokes = []
    for call in tool_calls:
        fn = call["function"]
        invokes.append(_t(f'<{DSML}invoke name="') + _u(fn["name"]) + _t('">\n') + _arguments_to_dsml(fn["arguments"])
                       + _t(f"\n</{DSML}invoke>"))
    return _t("\n\n" + TOOL_CALLS_OPEN + "\n") + _t("\n").join_parts(invokes) + _t("\n" + TOOL_CALLS_CLOSE)


def _render_user_blocks(blocks: list[dict[str, Any]]) -> PromptText:
    parts = []
    for block in blocks:
        kind = block.get("type")
        if kind == "text":
            parts.append(_u(block.get("text", "")))
        elif kind == "tool_result":
            result = block.get("content", "")
            if isinstance(result, list):
                result = "\n\n".join(
                    b.get("text", "") if b.get("type") == "text" else f"[Unsupported {b.get('type')}]" for b in result
                )
            parts.append(_t("<tool_result>") + _u(result) + _t("</tool_result>"))
        else:
            parts.append(_t("[Unsupported ") + _u(kind) + _t("]"))
    return _t("\n\n").join_parts(parts)


def _last_user_index(messages: list[dict[str, Any]]) -> int:
    for idx in range(len(messages) - 1, -1, -1):
        if messages[idx].get("role") in ("user", "developer"):
            return idx
    return -1


def _render_body(index: int, messages: list[dict[str, Any]], thinking_mode: str, drop_thinking: bool) -> PromptText:
    """The message itself, without the transition that may follow it."""
    msg = messages[index]
    role = msg.get("role")
    content = msg.get("content")
    tools = msg.get("tools")
    response_format = msg.get("response_format")
    if role in ("system", "developer"):
        if role == "developer" and not content:
            raise ValueError(f"developer message {index} has no content")
        text = _t(USER if role == "developer" else "") + _u(content or "")
        if tools:
            text += _t("\n\n") + render_tools([tool["function"] for tool in tools])
        if response_format:
            text += _t("\n\n") + _render_response_format(response_format)
        return text
    if role == "user":
        blocks = msg.get("content_blocks")
        return _t(USER) + (_render_user_blocks(blocks) if blocks else _u(content or ""))
    if role == "latest_reminder":
        return _t(LATEST_REMINDER) + _u(content)
    if role == "tool":
        raise ValueError("tool messages must be merged into user messages first (encode_messages does this)")
    if role == "assistant":
        return _render_assistant(index, messages, thinking_mode, drop_thinking)
    raise ValueError(f"unknown message role {role!r} at index {index}")


def _render_assistant(index: int, messages: list[dict[str, Any]], thinking_mode: str,
                      drop_thinking: bool) -> PromptText:
    msg = messages[index]
    calls = render_tool_calls(msg["tool_calls"]) if msg.get("tool_calls") else _t("")
    # An assistant turn answering a task token is a bare label: never any reasoning.
    after_task = index > 0 and messages[index - 1].get("task") is not None
    reasoning = _t("")
    if thinking_mode == "thinking" and not after_task:
        if not drop_thinking or index > _last_user_index(messages):
            reasoning = _u(msg.get("reasoning_content") or "") + _t(THINK_END)
    text = reasoning + _u(msg.get("content") or "") + calls
    return text if msg.get("wo_eos", False) else text + _t(EOS)


def _render_transition(index: int, messages: list[dict[str, Any]], thinking_mode: str,
                       drop_thinking: bool) -> PromptText:
    """What follows a message when the next one is an assistant/latest_reminder turn or the prompt ends there."""
    if index + 1 < len(messages) and messages[index + 1].get("role") not in ("assistant", "latest_reminder"):
        return _t("")
    msg = messages[index]
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ValueError(f"unknown task {task!r} at message {index}; expected one of {sorted(TASK_TOKENS)}")
        if task != "action":
            return _t(TASK_TOKENS[task])
        think = THINK_START if thinking_mode == "thinking" else THINK_END
        return _t(ASSISTANT + think + TASK_TOKENS[task])
    if msg.get("role") not in ("user", "developer"):
        return _t("")
    opens_thinking = thinking_mode == "thinking" and (not drop_thinking or index >= _last_user_index(messages))
    return _t(ASSISTANT + (THINK_START if opens_thinking else THINK_END))


def render_message(
    index: int,
    messages: list[dict[str, Any]],
    thinking_mode: str,
    drop_thinking: bool = True,
    reasoning_effort: str | None = None,
) -> str:
    """One message of an already merged list, with the effort prompt (index 0) and the transition after it."""
    if not 0 <= index < len(messages):
        raise IndexError(f"message index {index} out of range for {len(messages)} messages")
    _check_modes(thinking_mode, reasoning_effort)
    prefix = _t("")
    if index == 0 and thinking_mode == "thinking" and reasoning_effort == "max":
        prefix = _t(REASONING_EFFORT_MAX_PROMPT)
    body = _render_body(index, messages, thinking_mode, drop_thinking)
    return prefix + body + _render_transition(index, messages, thinking_mode, drop_thinking)


def _check_modes(thinking_mode: str, reasoning_effort: str | None) -> None:
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {REASONING_EFFORTS}, got {reasoning_effort!r}")


# ---------------------------------------------------------------- message-list preprocessing


def merge_tool_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """V4 has no tool role: tool results and the user text after them become one user message's content blocks."""
    merged: list[dict[str, Any]] = []
    for original in messages:
        msg = copy.deepcopy(original)
        role = msg.get("role")
        prev = merged[-1] if merged else None
        joinable = prev is not None and prev.get("role") == "user" and "content_blocks" in prev
        if role == "tool":
            block = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id", ""), "content": msg.get("content", "")}
            if joinable:
                prev["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif role == "user":
            block = {"type": "text", "text": msg.get("content", "")}
            if joinable and prev.get("task") is None:
                prev["content_blocks"].append(block)
            else:
                new = {"role": "user", "content": msg.get("content", ""), "content_blocks": [block]}
                new.update({k: msg[k] for k in ("task", "wo_eos", "mask") if k in msg})
                merged.append(new)
        else:
            merged.append(msg)
    return merged


def sort_tool_results_by_call_order(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order each user message's tool results as the preceding assistant ordered its tool calls (in place)."""
    order: dict[str, int] = {}
    for msg in messages:
        if msg.get("role") == "assistant" and msg.get("tool_calls"):
            order = {}
            for pos, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    order[call_id] = pos
        elif msg.get("role") == "user" and msg.get("content_blocks"):
            results = [b for b in msg["content_blocks"] if b.get("type") == "tool_result"]
            if len(results) > 1 and order:
                ordered = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                msg["content_blocks"] = [next(ordered) if b.get("type") == "tool_result" else b
                                         for b in msg["content_blocks"]]
    return messages


def drop_thinking_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Before the last user turn: assistant reasoning is removed and developer messages are dropped."""
    last_user = _last_user_index(messages)
    kept = []
    for idx, msg in enumerate(messages):
        role = msg.get("role")
        if idx >= last_user or role in ("user", "system", "tool", "latest_reminder", "direct_search_results"):
            kept.append(msg)
        elif role == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return kept


# ---------------------------------------------------------------- public encoder


def encode_messages(
    messages: list[dict[str, Any]],
    thinking_mode: str,
    context: list[dict[str, Any]] | None = None,
    drop_thinking: bool = True,
    add_default_bos_token: bool = True,
    reasoning_effort: str | None = None,
) -> str:
    """Render `messages` as DeepSeek-V4 prompt text. `context` is earlier conversation already in the KV cache:
    it shapes the rendering of `messages` but is not itself rendered (and no BOS is added when it is given)."""
    _check_modes(thinking_mode, reasoning_effort)
    context = copy.deepcopy(context) if context else []
    messages = merge_tool_messages(messages)
    messages = sort_tool_results_by_call_order(context + messages)[len(context):]
    if context:
        context = sort_tool_results_by_call_order(merge_tool_messages(context))
    full = context + messages
    parts = [_t(BOS if add_default_bos_token and not context else "")]
    # With tools in play the reasoning that led to each call stays visible to later turns.
    drop = drop_thinking and not any(m.get("tools") for m in full)
    if thinking_mode == "thinking" and drop:
        full = drop_thinking_messages(full)
        n_render = len(full) - len(drop_thinking_messages(context))
    else:
        n_render = len(messages)
    first = len(full) - n_render
    for idx in range(first, len(full)):
        parts.append(render_message(idx, full, thinking_mode, drop_thinking=drop, reasoning_effort=reasoning_effort))
    return PromptText.concat(parts)


# ---------------------------------------------------------------- parser


def _read_until(text: str, start: int, stops: list[str]) -> tuple[int, str, str | None]:
    """Text from `start` to the earliest of `stops`: (index after the stop, text before it, the stop or None)."""
    best, hit = len(text), None
    for stop in stops:
        pos = text.find(stop, start)
        if pos != -1 and pos < best:
            best, hit = pos, stop
    if hit is None:
        return len(text), text[start:], None
    return best + len(hit), text[start:best], hit


def _arguments_from_dsml(params: dict[str, tuple[str, str]]) -> str:
    """Rebuild the OpenAI `arguments` JSON text: string params are JSON-quoted, the others are already JSON."""
    items = [f"{_to_json(k)}: {_to_json(v) if flag == 'true' else v}" for k, (v, flag) in params.items()]
    return "{" + ", ".join(items) + "}"


_INVOKE_NAME = re.compile(r'^\s*name="(.*?)">\n$', re.DOTALL)
_PARAM = re.compile(r'^ name="(.*?)" string="(true|false)">(.*?)<$', re.DOTALL)


def _parse_tool_calls(text: str, index: int) -> tuple[int, list[dict[str, Any]]]:
    """Parse invokes from just after `<｜DSML｜tool_calls` up to and including its closing tag."""
    invoke_open, invoke_close = f"<{DSML}invoke", f"</{DSML}invoke"
    param_open, param_close = f"<{DSML}parameter", f"/{DSML}parameter"
    calls: list[dict[str, Any]] = []
    while index < len(text):
        index, gap, stop = _read_until(text, index, [invoke_open, TOOL_CALLS_CLOSE])
        if gap != ">\n":
            raise CompletionFormatError(f"tool call block: expected '>\\n' before the next tag, got {gap!r}")
        if stop == TOOL_CALLS_CLOSE:
            return index, calls
        if stop is None:
            raise CompletionFormatError("tool call block is not closed")
        index, head, stop = _read_until(text, index, [param_open, invoke_close])
        name = _INVOKE_NAME.findall(head)
        if len(name) != 1:
            raise CompletionFormatError(f"tool call name is malformed: {head!r}")
        params: dict[str, tuple[str, str]] = {}
        while stop == param_open:
            index, body, _ = _read_until(text, index, [param_close])
            found = _PARAM.findall(body)
            if len(found) != 1:
                raise CompletionFormatError(f"tool call parameter is malformed: {body!r}")
            key, flag, value = found[0]
            if key in params:
                raise CompletionFormatError(f"tool call parameter {key!r} appears twice")
            params[key] = (value, flag)
            index, gap, stop = _read_until(text, index, [param_open, invoke_close])
            if gap != ">\n":
                raise CompletionFormatError(f"tool call parameter: expected '>\\n' after it, got {gap!r}")
        calls.append({"type": "function", "function": {"name": name[0], "arguments": _arguments_from_dsml(params)}})
    raise CompletionFormatError("tool call block is not closed")


def parse_message_from_completion_text(text: str, thinking_mode: str) -> dict[str, Any]:
    """Generated text (decoded with special tokens, including the final EOS) -> an OpenAI-style assistant message
    `{"role", "content", "reasoning_content", "tool_calls"}`. In thinking mode the opening <think> is in the prompt,
    so the text starts with the reasoning. Raises CompletionFormatError on anything malformed."""
    if thinking_mode not in THINKING_MODES:
        raise ValueError(f"thinking_mode must be one of {THINKING_MODES}, got {thinking_mode!r}")
    index, reasoning, calls = 0, "", []
    if thinking_mode == "thinking":
        index, reasoning, stop = _read_until(text, index, [THINK_END, TOOL_CALLS_START])
        if stop != THINK_END:
            raise CompletionFormatError("thinking completion has no </think>")
    index, content, stop = _read_until(text, index, [EOS, TOOL_CALLS_START])
    if stop == TOOL_CALLS_START:
        index, calls = _parse_tool_calls(text, index)
        index, tail, stop = _read_until(text, index, [EOS])
        if tail:
            raise CompletionFormatError(f"text after the tool call block: {tail!r}")
    elif stop != EOS:
        raise CompletionFormatError("completion does not end with the end-of-sentence token")
    if index != len(text) or stop not in (EOS, None):
        raise CompletionFormatError(f"text after the end-of-sentence token: {text[index:]!r}")
    for token in (BOS, EOS, THINK_START, THINK_END, DSML):
        if token in content or token in reasoning:
            raise CompletionFormatError(f"special token {token!r} inside the content or reasoning")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}
