"""`homerun serve` against a live server on the tiny checkpoint, through the real `openai` client: chat (plain and
streaming), reasoning_content by thinking mode, usage, stop strings, seeds, /v1/models, completions, the error
statuses and bodies, exact prefix reuse, and SIGTERM on the real CLI. The server runs in a thread (uvicorn on a
free 127.0.0.1 port); every wait is bounded. Tool calls, concurrency and disconnects: tests/test_serve_scripted.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import openai  # noqa: E402 - the test extra installs it: a missing one must fail, not skip
import httpx  # noqa: E402
import fastapi  # noqa: E402,F401 - a runtime dependency
import uvicorn  # noqa: E402

import homerun  # noqa: E402
from homerun.chat.encoding import encode_messages  # noqa: E402
from homerun.serve.app import Settings, bind_socket, create_app  # noqa: E402
from homerun.serve.engine import Engine  # noqa: E402
from homerun.serve.prefix import common_prefix_len  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- harness


class LiveServer:
    """uvicorn serving `create_app(engine, settings)` on a free 127.0.0.1 port, in a thread."""

    def __init__(self, engine: Engine, **settings: Any) -> None:
        settings.setdefault("model_name", "tiny")
        self.engine = engine
        self.app = create_app(engine, Settings(**settings))
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            assert self.thread.is_alive(), "server thread died"
            time.sleep(0.01)

    def client(self, api_key: str = "none", **kw: Any):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "server did not stop"


@contextlib.contextmanager
def live_server(engine: Engine, **settings: Any) -> Iterator[LiveServer]:
    srv = LiveServer(engine, **settings)
    try:
        yield srv
    finally:
        srv.close()


def extra(obj: Any, key: str) -> Any:
    """A non-standard field of an openai model object (reasoning_content), or None when absent."""
    return (getattr(obj, "model_extra", None) or {}).get(key)


def has_extra(obj: Any, key: str) -> bool:
    return key in (getattr(obj, "model_extra", None) or {})


USER = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return homerun.load(tiny_checkpoint, expert_act="fp32")


@pytest.fixture(scope="module")
def server(model):
    with live_server(Engine(model, max_queue=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


# ---------------------------------------------------------------------------------------------- basics


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    r = httpx.get(server.url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics", timeout=10).text
    for name in ("homerun_generated_tokens_total", "homerun_queue_depth", "homerun_context_used_tokens",
                 "homerun_context_capacity_tokens", "homerun_model_ready 1"):
        assert name in text


def test_chat_non_streaming_usage_and_streaming_agree(server, client, model):
    kw = dict(model="tiny", messages=USER, max_tokens=6, temperature=0.8, seed=3)
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant" and isinstance(msg.content, str)
    assert not has_extra(msg, "reasoning_content")  # non-think: absent
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt_ids = model.tokenizer.encode(encode_messages(USER, "chat"))
    u = r.usage
    assert u.prompt_tokens == len(prompt_ids) and 1 <= u.completion_tokens <= 6
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == msg.content and finish == [r.choices[0].finish_reason]  # same seed, same answer
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens
    # the whole prompt is the live state's prefix now: nothing is prefilled again
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(prompt_ids)

    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      json={**kw, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_reasoning_content_by_thinking_mode(client):
    kw = dict(model="tiny", messages=USER, max_tokens=4, seed=1)
    for how in ({"reasoning_effort": "high"}, {"extra_body": {"thinking": {"type": "enabled"}}}):
        msg = client.chat.completions.create(**kw, **how).choices[0].message
        assert isinstance(extra(msg, "reasoning_content"), str), how
        assert extra(msg, "reasoning_content") or msg.content  # random weights: never both empty
    for how in ({"reasoning_effort": "none"}, {"extra_body": {"thinking": {"type": "disabled"}}}):
        assert not has_extra(client.chat.completions.create(**kw, **how).choices[0].message, "reasoning_content")
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True, reasoning_effort="high")
              if c.choices]
    assert any(extra(d, "reasoning_content") for d in deltas)
    deltas = [c.choices[0].delta for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert not any(has_extra(d, "reasoning_content") for d in deltas)


def test_stop_strings_and_seeds(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Count to ten."}], max_tokens=16)
    full = client.chat.completions.create(**kw, temperature=0).choices[0].message.content
    printable = [i for i in range(2, len(full) - 1) if full[i:i + 2].isprintable() and full[i:i + 2].strip()]
    assert printable, f"no printable pair in {full!r}"
    stop = full[printable[0]:printable[0] + 2]
    cut = client.chat.completions.create(**kw, temperature=0, stop=["\x00never", stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.find(stop)]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**kw, temperature=0, stop=stop, stream=True) if c.choices)
    assert streamed == full[: full.find(stop)]

    kw["max_tokens"] = 6
    same = [client.chat.completions.create(**kw, temperature=1.0, seed=7).choices[0].message.content for _ in range(2)]
    assert same[0] == same[1]
    other = client.chat.completions.create(**kw, temperature=1.0, seed=8).choices[0].message.content
    assert other != same[0]  # a different seed gives a different sample


def test_completions_endpoint(client, model):
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5, seed=2)
    assert r.object == "text_completion" and isinstance(r.choices[0].text, str)
    assert r.usage.prompt_tokens == len(model.tokenizer.encode("The capital of France is"))
    assert r.usage.completion_tokens <= 5 and r.choices[0].finish_reason in ("stop", "length")
    ids = model.tokenizer.encode("Hello")
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=3, seed=2)
    assert r2.usage.prompt_tokens == len(ids)
    chunks = list(client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5, seed=2,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


# ---------------------------------------------------------------------------------------------- errors


def _error(exc_info) -> dict[str, Any]:
    body = exc_info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 2}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"reasoning_effort": "extreme"}}, "reasoning_effort"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"extra_body": {"logprobs": True}}, "logprobs"),
])
def test_bad_parameters_are_400(client, kwargs, param):
    kw = {"model": "tiny", "messages": USER, "max_tokens": 2, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    err = _error(e)
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error" and err["param"] == param


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"messages": "hi"}', b'{"messages": [null]}',
                                  b'{"messages": [{"role": "user", "content": 5}]}', "\xff".encode("latin-1"),
                                  b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1e400}',
                                  b'{"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 1}}]},'
                                  b' {"role": "user", "content": "x"}]}'])
def test_malformed_bodies_are_400_and_the_server_lives(server, body):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200


def test_unknown_route_and_context_length(model, server):
    r = httpx.get(server.url + "/v1/nope", timeout=10)
    assert r.status_code == 404 and "error" in r.json()
    n = len(model.tokenizer.encode(encode_messages(USER, "chat")))
    with live_server(Engine(model, max_context=n + 3)) as srv:
        c = srv.client()
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=USER, max_tokens=40)
        err = _error(e)
        assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
        assert f"{n + 3} tokens" in err["message"] and f"{n} in the messages, 40 in the completion" in err["message"]
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "word " * 60}])
        assert _error(e)["code"] == "context_length_exceeded"
        r = c.chat.completions.create(model="tiny", messages=USER)  # no max_tokens: what is left of the context
        assert r.usage.total_tokens <= n + 3


def test_api_key_and_body_limit(model):
    with live_server(Engine(model), api_key="sekret", max_body_bytes=4096) as srv:
        with pytest.raises(openai.AuthenticationError) as e:
            srv.client("wrong").models.list()
        assert e.value.status_code == 401 and _error(e)["code"] == "invalid_api_key"
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": USER}, timeout=10)
        assert r.status_code == 401
        assert httpx.get(srv.url + "/metrics", timeout=10).status_code == 401
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200  # health needs no key
        good = srv.client("sekret")
        assert good.chat.completions.create(model="tiny", messages=USER, max_tokens=2).usage.completion_tokens >= 1
        big = {"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}
        r = httpx.post(srv.url + "/v1/chat/completions", json=big, timeout=10,
                       headers={"authorization": "Bearer sekret"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_503_while_the_model_loads(model):
    gate = threading.Event()

    def loader():
        assert gate.wait(30)
        return model

    with live_server(Engine(loader=loader)) as srv:
        r = httpx.get(srv.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        with pytest.raises(openai.APIStatusError) as e:
            srv.client().chat.completions.create(model="tiny", messages=USER, max_tokens=2)
        assert e.value.status_code == 503 and _error(e)["code"] == "model_loading"
        gate.set()
        deadline = time.monotonic() + 20
        while httpx.get(srv.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert srv.client().chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices


# ---------------------------------------------------------------------------------------------- prefix reuse


def _rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("effort", ["high", "none"])
def test_prefix_reuse_is_exact_and_reported(model, effort):
    """Turn 2 of a conversation continues from the live state. In thinking mode the encoding drops turn 1's
    reasoning, so the state is rolled back to just before turn 1's last prompt token: the logits turn 2 samples
    from equal a fresh prefill of the same tokens (bit for bit with the same feed boundaries)."""
    import torch

    engine = Engine(model)
    thinking = effort == "high"
    mode = "thinking" if thinking else "chat"
    with live_server(engine) as srv:
        c = srv.client()
        conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour. " * 12}]
        r1 = c.chat.completions.create(model="tiny", messages=conv, max_tokens=6, seed=5, reasoning_effort=effort)
        m1 = r1.choices[0].message
        ids1 = model.tokenizer.encode(encode_messages(conv, mode))
        turn = {"role": "assistant", "content": m1.content or ""}
        if thinking:
            turn["reasoning_content"] = extra(m1, "reasoning_content")
        conv2 = conv + [turn, {"role": "user", "content": "Another one."}]
        r2 = c.chat.completions.create(model="tiny", messages=conv2, max_tokens=1, seed=5, reasoning_effort=effort)
        ids2 = model.tokenizer.encode(encode_messages(conv2, mode))
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r2.usage.prompt_tokens == len(ids2)
    lcp = common_prefix_len(ids1, ids2)
    if thinking:
        assert lcp == len(ids1) - 1 and cached == lcp  # everything but turn 1's <think>
    else:
        assert lcp == len(ids1) and len(ids1) <= cached < len(ids2)
    reused = engine.last_prompt_logits
    fresh = model.session()
    # the engine's feed boundaries: turn 1 fed ids1[:-1], then its last token; turn 2 the rest up to its last token
    for a, b in ((0, len(ids1) - 1), (len(ids1) - 1, cached), (cached, len(ids2) - 1), (len(ids2) - 1, len(ids2))):
        if b > a:
            last = fresh.feed(ids2[a:b])
    assert torch.equal(reused, last)
    assert _rel_err(reused, model.logits(ids2)[-1]) <= 1e-4  # and one full pass, to chunking rounding
    if thinking:  # reusing turn 1's state without the rollback would be a different state
        stale = model.session()
        stale.feed(ids1)
        stale.feed(ids2[len(ids1):])
        assert _rel_err(stale.last_logits, reused) > 1e-3


# ---------------------------------------------------------------------------------------------- the CLI


class _Lines:
    """A subprocess's stdout lines through a reader thread, so every wait has a deadline."""

    def __init__(self, proc) -> None:
        import queue

        self.proc = proc
        self.q: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [self.q.put(line) for line in proc.stdout], daemon=True).start()

    def event(self, timeout: float) -> dict[str, Any]:
        import queue

        try:
            return json.loads(self.q.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f"no event from homerun serve within {timeout} s (rc={self.proc.poll()})") from None


def test_cli_sigterm_finishes_the_request_in_flight_and_exits_0(tiny_checkpoint, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HOMERUN_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "homerun", "serve", str(tiny_checkpoint), "--port", "0", "--json",
                             "--name", "tiny", "--shutdown-timeout", "60", "--expert-act", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=tmp_path)
    try:
        lines = _Lines(proc)
        listening = lines.event(120)
        assert listening["event"] == "listening" and listening["host"] == "127.0.0.1"
        assert listening["api_key_required"] is False
        url = f"http://127.0.0.1:{listening['port']}"
        assert lines.event(120)["event"] == "ready"
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        stream = iter(c.chat.completions.create(model="tiny", messages=USER, max_tokens=40, stream=True, seed=1,
                                                temperature=1.0))
        assert next(stream).choices[0].delta.role == "assistant"
        # SIGTERM once a token has come out, so the request is running (queued requests are cancelled instead)
        rest = [next(stream)]
        while not (rest[-1].choices[0].delta.content or rest[-1].choices[0].finish_reason):
            rest.append(next(stream))
        proc.send_signal(signal.SIGTERM)
        rest += list(stream)  # the request in flight finishes
        assert [ch.choices[0].finish_reason for ch in rest if ch.choices and ch.choices[0].finish_reason]
        assert proc.wait(60) == 0
        assert lines.event(10)["event"] == "stopped"
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_warns_off_loopback_without_key_and_reports_bind_errors(tiny_checkpoint, capsys, monkeypatch):
    from homerun.cli.app import app

    monkeypatch.delenv("HOMERUN_API_KEY", raising=False)
    # 192.0.2.1 (TEST-NET-1) is never a local address: the warning shows, then the bind fails with exit 2
    with pytest.raises(SystemExit) as e:
        app(["serve", str(tiny_checkpoint), "--host", "192.0.2.1", "--port", "0"])
    err = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and "without an API key" in err and "cannot listen on 192.0.2.1" in err
    with pytest.raises(SystemExit) as e:
        app(["serve", str(tiny_checkpoint), "--thinking", "sometimes"])
    assert e.value.code == 2
