"""The HTTP layer: `create_app(engine, settings)` builds the FastAPI app; `run_server(...)` runs it under uvicorn
with homerun's shutdown rules (SIGTERM/SIGINT: stop accepting, cancel what waits, let the request in flight finish
for `shutdown_timeout` seconds, then cancel it; exit normally).

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, `GET /health` (no key needed),
`GET /metrics` (Prometheus text). Every error is OpenAI's error JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from homerun.chat.encoding import encode_messages
from homerun.chat.session import check_think_max, encoding_mode
from homerun.serve.engine import Delta, Done, Engine, Failed, Job, NotReady, QueueFull
from homerun.serve.protocol import (
    APIError,
    bad,
    chat_chunk,
    chat_completion,
    context_error,
    new_id,
    parse_chat,
    parse_completion,
    text_chunk,
    text_completion,
    tool_call_deltas,
)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


@dataclass
class Settings:
    """Server options. Sampling fields are server-wide defaults (None: the model's generation_config.json); a
    request's own values win. `allow_special`: tokenize special-token strings in message content as control tokens
    (unsafe: a user can forge turns)."""

    model_name: str = "model"
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    default_think: str = "off"
    default_max_tokens: int = 4096
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    allow_special: bool = False


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _sse(obj: Any) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(engine: Engine, settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="homerun", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))

    # ------------------------------------------------------------ helpers

    def authorize(request: Request) -> None:
        key = settings.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode("utf-8"), key.encode("utf-8")):
            raise APIError(401, "Incorrect API key provided.", param=None, code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> Any:
        limit = settings.max_body_bytes
        too_big = APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise too_big
            except ValueError:
                raise bad("invalid Content-Length header") from None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_big
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise bad(f"the request body is not valid JSON: {exc}") from None

    def unavailable(exc: NotReady) -> APIError:
        return APIError(503, exc.message, type="server_error", code=f"model_{exc.state}", headers={"Retry-After": "2"})

    def ready() -> None:
        try:
            engine.check_ready()
        except NotReady as exc:
            raise unavailable(exc) from None

    def budget(n_prompt: int, requested: int | None) -> int:
        cap = engine.context_capacity()
        if cap is None:
            return requested or settings.default_max_tokens
        if requested is not None and n_prompt + requested > cap:
            raise context_error(cap, n_prompt, requested)
        if n_prompt >= cap:
            raise context_error(cap, n_prompt, None)
        return requested or min(settings.default_max_tokens, cap - n_prompt)

    def sampling(req: Any) -> dict[str, Any]:
        pick = lambda mine, default: mine if mine is not None else default  # noqa: E731
        return {"temperature": pick(req.temperature, settings.temperature), "top_p": pick(req.top_p, settings.top_p),
                "top_k": pick(req.top_k, settings.top_k), "seed": pick(req.seed, settings.seed)}

    def submit(job: Job, stream: bool) -> asyncio.Queue:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def sink(event: Any) -> None:
            if stream or not isinstance(event, Delta):
                loop.call_soon_threadsafe(events.put_nowait, event)

        job.sink = sink
        try:
            engine.submit(job)
        except QueueFull as exc:
            raise APIError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except NotReady as exc:
            raise unavailable(exc) from None
        return events

    async def wait_done(request: Request, job: Job, events: asyncio.Queue) -> Done | Failed | None:
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        result: Done | Failed | None = None
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                finished, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in finished:  # the client went away
                    getter.cancel()
                    return None
                event = getter.result()
                if isinstance(event, (Done, Failed)):
                    result = event
                    return result
        finally:
            watcher.cancel()
            if result is None:
                engine.cancel(job)  # disconnected, or the handler itself was cancelled

    def failed(event: Failed) -> APIError:
        return APIError(event.status, event.message, type=event.type, code=event.code)

    def stream_response(gen: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------ endpoints

    @app.get("/health")
    async def health() -> JSONResponse:
        status = {"ready": "ok"}.get(engine.state, engine.state)
        body = {"status": status, "model": settings.model_name}
        if engine.state == "failed":
            body["error"] = str(engine.load_error)
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse({"object": "list", "data": [_model_card(settings.model_name)]})

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> JSONResponse:
        authorize(request)
        if model_id != settings.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist", type="invalid_request_error",
                           param="model", code="model_not_found")
        return JSONResponse(_model_card(settings.model_name))

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        authorize(request)
        return PlainTextResponse(prometheus_text(engine.metrics()), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await read_json(request)
        ready()
        req = parse_chat(body, default_think=settings.default_think)
        ids, thinking = await run_in_threadpool(_prepare_chat, engine, settings, req)
        max_tokens = budget(len(ids), req.max_tokens)
        job = Job(ids=ids, max_tokens=max_tokens, sink=lambda e: None, chat=True, thinking=thinking, stop=req.stop,
                  **sampling(req))
        events = submit(job, req.stream)
        rid, name = new_id("chatcmpl"), settings.model_name
        if not req.stream:
            event = await wait_done(request, job, events)
            if event is None:
                return Response(status_code=499)
            if isinstance(event, Failed):
                raise failed(event)
            return JSONResponse(chat_completion(rid, name, event, thinking=thinking))

        async def sse() -> AsyncIterator[str]:
            created, finished = int(time.time()), False
            try:
                yield _sse(chat_chunk(rid, name, created, {"role": "assistant", "content": ""}))
                while True:
                    event = await events.get()
                    if isinstance(event, Delta):
                        key = "reasoning_content" if event.kind == "reasoning" else "content"
                        yield _sse(chat_chunk(rid, name, created, {key: event.text}))
                        continue
                    finished = True
                    if isinstance(event, Failed):
                        yield _sse(failed(event).body())
                        break
                    if event.tool_calls:
                        yield _sse(chat_chunk(rid, name, created, {"tool_calls": tool_call_deltas(event.tool_calls)}))
                    yield _sse(chat_chunk(rid, name, created, {}, event.finish_reason))
                    if req.include_usage:
                        yield _sse(chat_chunk(rid, name, created, None, usage=event.usage.to_dict()))
                    break
                yield "data: [DONE]\n\n"
            finally:
                if not finished:
                    engine.cancel(job)  # the client went away

        return stream_response(sse())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body = await read_json(request)
        ready()
        req = parse_completion(body, getattr(getattr(engine.model, "args", None), "vocab_size", None))
        tok = engine.model.tokenizer
        ids = list(req.prompt) if isinstance(req.prompt, list) else await run_in_threadpool(tok.encode, req.prompt)
        if not ids:
            raise bad("'prompt' encodes to no tokens", "prompt")
        max_tokens = budget(len(ids), req.max_tokens)
        job = Job(ids=ids, max_tokens=max_tokens, sink=lambda e: None, chat=False, stop=req.stop, **sampling(req))
        events = submit(job, req.stream)
        rid, name = new_id("cmpl"), settings.model_name
        if not req.stream:
            event = await wait_done(request, job, events)
            if event is None:
                return Response(status_code=499)
            if isinstance(event, Failed):
                raise failed(event)
            return JSONResponse(text_completion(rid, name, event))

        async def sse() -> AsyncIterator[str]:
            created, finished = int(time.time()), False
            try:
                while True:
                    event = await events.get()
                    if isinstance(event, Delta):
                        yield _sse(text_chunk(rid, name, created, event.text))
                        continue
                    finished = True
                    if isinstance(event, Failed):
                        yield _sse(failed(event).body())
                        break
                    yield _sse(text_chunk(rid, name, created, "", event.finish_reason))
                    if req.include_usage:
                        yield _sse(text_chunk(rid, name, created, None, usage=event.usage.to_dict()))
                    break
                yield "data: [DONE]\n\n"
            finally:
                if not finished:
                    engine.cancel(job)

        return stream_response(sse())

    return app


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "homerun"}


def _prepare_chat(engine: Engine, settings: Settings, req: Any) -> tuple[list[int], bool]:
    """Encode and tokenize (on a worker thread: long conversations take a while); Think Max is checked here."""
    mode, effort = encoding_mode(req.think)
    if req.think == "max":
        allowed, reason = check_think_max(engine.context_capacity())
        probe = getattr(engine.model, "think_max_available", None)
        if allowed and callable(probe):
            allowed, reason = probe()
        if not allowed:
            raise bad(f"Think Max is not available: {reason}", "reasoning_effort")
    try:
        prompt = encode_messages(req.messages, mode, reasoning_effort=effort)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise bad(f"the messages cannot be encoded: {exc}", "messages") from None
    ids = engine.model.tokenizer.encode(prompt, allow_special=True if settings.allow_special else None)
    return list(ids), mode == "thinking"


# ---------------------------------------------------------------------------------------------- metrics

_METRICS = (
    # (key, type, help)
    ("requests_total", "counter", "Requests accepted into the queue."),
    ("requests_completed_total", "counter", "Requests that finished generating."),
    ("requests_cancelled_total", "counter", "Requests cancelled (client gone, or shutdown)."),
    ("requests_failed_total", "counter", "Requests that failed while generating."),
    ("requests_rejected_total", "counter", "Requests refused with 429 because the queue was full."),
    ("prompt_tokens_total", "counter", "Prompt tokens of started requests."),
    ("prompt_cached_tokens_total", "counter", "Prompt tokens reused from the live state (not prefilled)."),
    ("generated_tokens_total", "counter", "Generated tokens."),
    ("time_to_first_token_seconds_sum", "counter", "Sum of times to first token."),
    ("decode_seconds_total", "counter", "Time spent decoding after the first token."),
    ("decode_tokens_per_second", "gauge", "Decode speed of the last request."),
    ("prefill_tokens_per_second", "gauge", "Prefill speed of the last request (new tokens / time to first token)."),
    ("queue_depth", "gauge", "Requests waiting in the queue."),
    ("requests_running", "gauge", "Requests generating now (0 or 1)."),
    ("expert_cache_hit_rate", "gauge", "Expert-cache hit rate (absent without an expert cache)."),
    ("context_used_tokens", "gauge", "Tokens in the live KV state."),
    ("context_capacity_tokens", "gauge", "Most tokens one sequence may hold."),
)


def prometheus_text(values: dict[str, Any]) -> str:
    lines = []
    for key, kind, help_text in _METRICS:
        value = values.get(key)
        if value is None:
            continue
        name = f"homerun_{key}"
        number = float(value)
        text = str(int(number)) if number.is_integer() else repr(number)
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {text}"]
    state = values.get("state", "loading")
    lines += ["# HELP homerun_model_ready 1 when the model is loaded and requests are served.",
              "# TYPE homerun_model_ready gauge", f"homerun_model_ready {1 if state == 'ready' else 0}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- uvicorn


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket (raises OSError: address in use, no such address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run_server(app: FastAPI, *, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
               on_listening: Callable[[str, int], None] | None = None, log_level: str = "warning") -> None:
    """Serve until SIGTERM/SIGINT (or the model fails to load); returns normally after a clean shutdown."""
    import uvicorn

    engine: Engine = app.state.engine

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:  # noqa: D401 - uvicorn's hook
            engine.begin_shutdown(shutdown_timeout)
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(shutdown_timeout) + 5)
    server = _Server(config)
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    if on_listening is not None:
        on_listening(bound_host, bound_port)

    def watch_load() -> None:  # a model that cannot load ends the server (the caller reports load_error)
        while not server.should_exit:
            if engine.state == "failed":
                server.should_exit = True
                return
            if engine.state in ("ready", "stopping"):
                return
            time.sleep(0.05)

    threading.Thread(target=watch_load, name="homerun-load-watch", daemon=True).start()
    # uvicorn re-raises the signal that stopped it once it has restored the previous handlers; with these no-op
    # handlers in place that is harmless, and the process exits 0 after a clean shutdown.
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
