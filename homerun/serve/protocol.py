"""OpenAI's wire format for homerun: request validation (every failure is an `APIError` with OpenAI's error JSON),
OpenAI messages -> DeepSeek-V4 encoder messages, and the response / stream-chunk builders. No I/O.

Thinking: `reasoning_effort` `none` (also `minimal`) = non-think, `low` / `medium` / `high` = think-high, `max` =
Think Max; or DeepSeek's `thinking: {"type": "enabled" | "disabled"}`. Reasoning comes back as `reasoning_content`
(absent in non-think). Tools go onto the first system message as the V4 encoder expects; `tool_choice: "none"`
leaves them out, a named choice keeps only that tool (V4 has no constrained decoding: `required` and a named choice
are requests to the model, not guarantees).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

EFFORT_TO_THINK = {"none": "off", "minimal": "off", "low": "high", "medium": "high", "high": "high", "max": "max"}
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 16


class APIError(Exception):
    """An error response: HTTP status + OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------- field checks


def _number(body: dict[str, Any], key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(f"'{key}' must be a finite number, got {json.dumps(v)}", key)
    if v < lo or v > hi or (lo_open and v == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad(f"'{key}' must be in {interval}, got {v}", key)
    return float(v)


def _int(body: dict[str, Any], key: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{key}' must be an integer, got {json.dumps(v)}", key)
    if v < lo or (hi is not None and v > hi):
        raise bad(f"'{key}' must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {v}", key)
    return v


def _bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean, got {json.dumps(v)}", key)
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(items) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} strings, got {len(items)}", "stop")
    return tuple(s for s in items if s)


def _common(body: dict[str, Any]) -> dict[str, Any]:
    """Fields shared by both endpoints."""
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise bad("only n = 1 is supported", "n")
    for key in ("logprobs", "top_logprobs"):
        if body.get(key) not in (None, False, 0):
            raise bad(f"'{key}' is not supported", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, -2.0, 2.0):
            raise bad(f"'{key}' is not supported (only 0)", key)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    include_usage = bool(opts and opts.get("include_usage"))
    if opts is not None and not isinstance(opts.get("include_usage", False), bool):
        raise bad("'stream_options.include_usage' must be a boolean", "stream_options")
    return {
        "temperature": _number(body, "temperature", 0.0, 2.0),
        "top_p": _number(body, "top_p", 0.0, 1.0, lo_open=True),
        "top_k": _int(body, "top_k", 0),
        "seed": _int(body, "seed", 0, 2 ** 64 - 1),
        "stop": _stop(body),
        "stream": stream,
        "include_usage": include_usage,
        "model": model,
    }


# ---------------------------------------------------------------------------------------------- chat


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]  # V4 encoder messages (tools and response format already attached)
    think: str  # off | high | max
    max_tokens: int | None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    has_tools: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _text_content(value: Any, param: str, *, allow_none: bool = False) -> str:
    """OpenAI content: a string, or a list of text parts (joined with newlines)."""
    if value is None:
        if allow_none:
            return ""
        raise bad(f"'{param}' is required", "messages")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"'{param}[{i}]': content part type {kind!r} is not supported (text only)", "messages")
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"'{param}[{i}].text' must be a string", "messages")
            parts.append(text)
        return "\n".join(parts)
    raise bad(f"'{param}' must be a string or a list of text parts", "messages")


def _tool_call(call: Any, param: str) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise bad(f"'{param}' must be an object with a 'function'", "messages")
    fn = call["function"]
    name, args = fn.get("name"), fn.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise bad(f"'{param}.function.name' must be a non-empty string", "messages")
    if isinstance(args, (dict, list)):
        args = json.dumps(args, ensure_ascii=False)
    if not isinstance(args, str):
        raise bad(f"'{param}.function.arguments' must be a JSON string", "messages")
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def convert_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages -> the V4 encoder's (system, user, assistant with reasoning_content/tool_calls, tool)."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(f"'{p}' must be an object", "messages")
        role = msg.get("role")
        if role not in ROLES:
            raise bad(f"'{p}.role' {json.dumps(role)} is not a supported role (system, developer, user, assistant, "
                      "tool)", "messages", code="invalid_role")
        if role in ("system", "developer"):
            out.append({"role": "system", "content": _text_content(msg.get("content"), f"{p}.content")})
        elif role == "user":
            out.append({"role": "user", "content": _text_content(msg.get("content"), f"{p}.content")})
        elif role == "tool":
            call_id = msg.get("tool_call_id", "")
            if not isinstance(call_id, str):
                raise bad(f"'{p}.tool_call_id' must be a string", "messages")
            out.append({"role": "tool", "tool_call_id": call_id,
                        "content": _text_content(msg.get("content"), f"{p}.content", allow_none=True)})
        else:
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise bad(f"'{p}.tool_calls' must be a list", "messages")
            item: dict[str, Any] = {
                "role": "assistant",
                "content": _text_content(msg.get("content"), f"{p}.content", allow_none=True),
            }
            reasoning = msg.get("reasoning_content")
            if reasoning is not None:
                if not isinstance(reasoning, str):
                    raise bad(f"'{p}.reasoning_content' must be a string", "messages")
                item["reasoning_content"] = reasoning
            if calls:
                item["tool_calls"] = [_tool_call(c, f"{p}.tool_calls[{j}]") for j, c in enumerate(calls)]
            out.append(item)
    if out[-1]["role"] not in ("user", "tool"):
        raise bad("the last message must be a user or tool message (the model answers it)", "messages")
    return out


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{...}}}}", "tools")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"'tools[{i}].function.name' must be a non-empty string", "tools")
        out.append({"type": "function", "function": fn})
    choice = body.get("tool_choice")
    if choice is None or choice in ("auto", "required"):
        return out
    if choice == "none":
        return []
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        chosen = [t for t in out if t["function"]["name"] == name]
        if not chosen:
            raise bad(f"'tool_choice' names {json.dumps(name)}, which is not in 'tools'", "tool_choice")
        return chosen
    raise bad("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", ...}", "tool_choice")


def _response_format(body: dict[str, Any]) -> Any:
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("'response_format.type' must be text, json_object or json_schema", "response_format")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        return {"type": "object"}
    schema = rf.get("json_schema")
    if not isinstance(schema, dict):
        raise bad("'response_format.json_schema' must be an object", "response_format")
    return schema.get("schema", schema)


def _think(body: dict[str, Any], default: str) -> str:
    effort = body.get("reasoning_effort")
    thinking = body.get("thinking")
    think = None
    if effort is not None:
        if effort not in EFFORT_TO_THINK:
            raise bad(f"'reasoning_effort' must be one of {', '.join(EFFORT_TO_THINK)}, got {json.dumps(effort)}",
                      "reasoning_effort")
        think = EFFORT_TO_THINK[effort]
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled"):
            raise bad("'thinking' must be {\"type\": \"enabled\"} or {\"type\": \"disabled\"}", "thinking")
        if kind == "disabled":
            if think not in (None, "off"):
                raise bad("'thinking' is disabled but 'reasoning_effort' asks for reasoning", "thinking")
            think = "off"
        else:
            if think == "off":
                raise bad("'thinking' is enabled but 'reasoning_effort' is none", "thinking")
            think = think or ("high" if default == "off" else default)
    return think or default


def parse_chat(body: Any, *, default_think: str = "off") -> ChatRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    common = _common(body)
    messages = convert_messages(body.get("messages"))
    tools = _tools(body)
    rf = _response_format(body)
    if tools or rf is not None:
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": ""})
        if tools:
            messages[0]["tools"] = tools
        if rf is not None:
            messages[0]["response_format"] = rf
    max_tokens = _int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    return ChatRequest(messages=messages, think=_think(body, default_think), max_tokens=max_tokens,
                       has_tools=bool(tools), **common)


# ---------------------------------------------------------------------------------------------- completions


@dataclass
class CompletionRequest:
    prompt: str | list[int]
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


def parse_completion(body: Any, vocab_size: int | None = None) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    common = _common(body)
    for key in ("suffix",):
        if body.get(key):
            raise bad(f"'{key}' is not supported", key)
    if body.get("echo"):
        raise bad("'echo' is not supported", "echo")
    if _int(body, "best_of", 1) not in (None, 1):
        raise bad("only best_of = 1 is supported", "best_of")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise bad("'prompt' must be a string, or a list of token ids (one prompt per request)", "prompt")
        if vocab_size is not None and any(t < 0 or t >= vocab_size for t in prompt):
            raise bad(f"'prompt' holds a token id outside [0, {vocab_size})", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise bad("'prompt' must be a non-empty string, or a list of token ids (one prompt per request)", "prompt")
    max_tokens = _int(body, "max_tokens", 1)
    return CompletionRequest(prompt=prompt, max_tokens=16 if max_tokens is None else max_tokens, **common)


# ---------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_message(done: Any, *, thinking: bool) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": done.text if (done.text or not done.tool_calls) else None}
    if thinking:
        msg["reasoning_content"] = done.reasoning or ""
    if done.tool_calls:
        msg["tool_calls"] = done.tool_calls
    return msg


def chat_completion(rid: str, model: str, done: Any, *, thinking: bool) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": chat_message(done, thinking=thinking), "logprobs": None,
                     "finish_reason": done.finish_reason}],
        "usage": done.usage.to_dict(),
        "system_fingerprint": "homerun",
    }


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any] | None, finish: str | None = None,
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
           "system_fingerprint": "homerun"}
    if usage is not None:
        out["usage"] = usage
    return out


def tool_call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"index": i, "id": c["id"], "type": "function",
             "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
            for i, c in enumerate(calls)]


def text_completion(rid: str, model: str, done: Any) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "text": done.text, "logprobs": None, "finish_reason": done.finish_reason}],
        "usage": done.usage.to_dict(),
        "system_fingerprint": "homerun",
    }


def text_chunk(rid: str, model: str, created: int, text: str | None, finish: str | None = None,
               usage: dict[str, Any] | None = None) -> dict[str, Any]:
    choices = [] if text is None else [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
    out = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
           "system_fingerprint": "homerun"}
    if usage is not None:
        out["usage"] = usage
    return out


def context_error(capacity: int, prompt_tokens: int, completion_tokens: int | None) -> APIError:
    if completion_tokens:
        total = prompt_tokens + completion_tokens
        msg = (f"This model's maximum context length is {capacity} tokens. However, you requested {total} tokens "
               f"({prompt_tokens} in the messages, {completion_tokens} in the completion). Please reduce the length "
               "of the messages or completion.")
    else:
        msg = (f"This model's maximum context length is {capacity} tokens. However, your messages resulted in "
               f"{prompt_tokens} tokens. Please reduce the length of the messages.")
    return APIError(400, msg, param="messages", code="context_length_exceeded")
