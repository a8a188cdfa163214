"""One model, one engine: a worker thread runs jobs one at a time from a bounded FIFO queue.

`Engine.submit(job)` queues a `Job` (a tokenized prompt plus its sampling and text options) or raises `QueueFull`
/ `NotReady`; the worker sends the job's events to its `sink` (a callable, called from the worker thread):
`Delta(kind, text)` pieces ("reasoning", "content" or "text"), then exactly one `Done` or `Failed`. `cancel(job)`
stops a queued job at once and a running one within one token (prefill is checked after every committed chunk).

Each job first restores the longest state of the live session that is a prefix of its prompt (see
`homerun.serve.prefix`): the next turn of a conversation prefills only what is new. No job can stop the worker: a
failure becomes a `Failed` event (the session is reset when the failure was not a clean HomerunError).
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import Any, Callable

from homerun.chat.encoding import THINK_END, TOOL_CALLS_START, EOS, CompletionFormatError
from homerun.chat.encoding import parse_message_from_completion_text
from homerun.chat.stream import StreamSplitter
from homerun.errors import ContextFullError, HomerunError
from homerun.serve.jobs import (  # noqa: F401 - the events and jobs, imported from here by callers
    Counters, Delta, Done, Failed, Job, NotReady, QueueFull, StopFilter, Usage, _Cancelled)
from homerun.serve.prefix import PrefixCache



# ---------------------------------------------------------------------------------------------- events




# ---------------------------------------------------------------------------------------------- engine


class Engine:
    """The serving engine. Give it a loaded `model`, or a `loader` (called on a thread by `start()`; requests see
    NotReady("loading") until it returns)."""

    def __init__(self, model: Any = None, *, loader: Callable[[], Any] | None = None, max_queue: int = 16,
                 max_context: int | None = None, name: str = "model", state_path: str | Path | None = None) -> None:
        if model is None and loader is None:
            raise ValueError("Engine needs a model or a loader")
        self.name = name
        self.max_queue = max_queue
        self._max_context = max_context
        self._loader = loader
        self.model: Any = None
        self.state = "loading"
        self.load_error: BaseException | None = None
        self.load_s: float | None = None
        self._lock = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._stop = False
        self._worker: threading.Thread | None = None
        self._loader_thread: threading.Thread | None = None
        self._prefix: PrefixCache | None = None
        self.counters = Counters()
        self._settled = threading.Event()  # set once loading succeeded or failed
        self._prompt_logits: Any = None  # what the first token was sampled from, where the model left it
        # The live state persists across restarts here (a KV snapshot, homerun.engine.snapshot): restored at load
        # when it matches the model, written at stop. `state_note` says what happened, for /metrics and the CLI.
        self.state_path = Path(state_path) if state_path is not None else None
        self.state_note: str | None = None
        if model is not None:
            self._set_model(model)

    @property
    def last_prompt_logits(self) -> Any:
        """The float32 logits the last request's first token was sampled from, on the host (tests check prefix reuse
        with them); None before a request or where the session keeps no points. Copied on this read only."""
        lg = self._prompt_logits
        return None if lg is None else lg.cpu()

    # ------------------------------------------------------------ lifecycle

    def _set_model(self, model: Any) -> None:
        self.model = model
        self._prefix = PrefixCache(self._restored_session(model) or model.session())
        self._prefix.mark()  # a restored conversation is a reuse point like any other
        self.state = "ready"
        self._settled.set()

    def _restored_session(self, model: Any) -> Any:
        """The session saved at the last stop, when there is one and it belongs to this model; else None."""
        if self.state_path is None or not self.state_path.is_file():
            return None
        try:
            sess = model.restore(self.state_path)
        except HomerunError as exc:  # another model, kv_dtype or budget, or a damaged file: start fresh
            self.state_note = f"not restored: {exc.message}"
            return None
        self.state_note = f"restored {sess.n_tokens} tokens from {self.state_path}"
        return sess

    def persist(self) -> None:
        """Write the live session to `state_path` (atomic; a failure is noted, never raised: shutdown goes on)."""
        if self.state_path is None or self._prefix is None or self.model is None:
            return
        sess = self._prefix.session
        if not sess.n_tokens or not sess.has_logits:
            return
        try:
            sess.save(self.state_path)
            self.state_note = f"saved {sess.n_tokens} tokens to {self.state_path}"
        except (HomerunError, OSError) as exc:
            self.state_note = f"not saved: {exc}"

    def start(self) -> "Engine":
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="homerun-engine", daemon=True)
            self._worker.start()
        if self.model is None and self._loader_thread is None:
            self._loader_thread = threading.Thread(target=self._load, name="homerun-load", daemon=True)
            self._loader_thread.start()
        return self

    def _load(self) -> None:
        t0 = time.perf_counter()
        try:
            model = self._loader()
        except BaseException as exc:  # noqa: BLE001 - reported through state/load_error, the CLI exits with it
            self.load_error = exc
            self.state = "failed"
            self._settled.set()
            return
        self.load_s = time.perf_counter() - t0
        with self._lock:
            if self.state == "loading":
                self._set_model(model)
            else:
                self.model = model
                self._settled.set()
            self._lock.notify_all()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait until loading has succeeded or failed; True when a model is loaded."""
        self._settled.wait(timeout)
        return self.model is not None and self.load_error is None

    def begin_shutdown(self, grace_s: float = 30.0) -> None:
        """Stop accepting; cancel every queued job now and the running one after `grace_s` seconds."""
        with self._lock:
            if self.state == "stopping":
                return
            self.state = "stopping"
            queued = list(self._queue)
            self._queue.clear()
            running = self._running
            self._lock.notify_all()
        for job in queued:
            job.cancel_reason = "shutdown"
            job.cancelled.set()
            job.state = "done"
            job.send(Failed(503, "the server is shutting down", "server_error", "shutting_down"))
        if running is not None:
            def later() -> None:
                running.cancel_reason = "shutdown"
                running.cancelled.set()
            timer = threading.Timer(grace_s, later)
            timer.daemon = True
            timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.begin_shutdown(0.0)
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)
        if self._worker is None or not self._worker.is_alive():
            self.persist()  # the worker is idle: the session is consistent

    # ------------------------------------------------------------ queue

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return 1 if self._running is not None else 0

    def check_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "loading":
            raise NotReady("loading", "the model is still loading; retry in a moment")
        if self.state == "failed":
            raise NotReady("failed", f"the model failed to load: {self.load_error}")
        raise NotReady("stopping", "the server is shutting down")

    def submit(self, job: Job) -> None:
        with self._lock:
            self.check_ready()
            if len(self._queue) >= self.max_queue:
                self.counters.rejected_queue_full += 1
                raise QueueFull(f"the queue is full ({self.max_queue} waiting); retry later")
            job.state = "queued"
            self._queue.append(job)
            self.counters.requests += 1
            self._lock.notify_all()

    def cancel(self, job: Job) -> None:
        """Cancel a queued job now (it sends nothing more), a running one within one token."""
        job.cancelled.set()
        with self._lock:
            if job.state == "queued":
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                job.state = "done"
                self.counters.cancelled += 1

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._queue:
                    self._lock.wait()
                if self._stop and not self._queue:
                    return
                job = self._queue.popleft()
                if job.cancelled.is_set():
                    continue
                job.state = "running"
                self._running = job
            try:
                self._run(job)
            finally:
                with self._lock:
                    self._running = None
                    job.state = "done"

    # ------------------------------------------------------------ context

    def context_capacity(self) -> int | None:
        """The most tokens one sequence may hold: --max-context, else the model's own limit."""
        probe = getattr(self.model, "max_context_tokens", None)
        model_cap = None
        if callable(probe):
            try:
                model_cap = int(probe()) or None
            except Exception:  # noqa: BLE001 - informational
                model_cap = None
        caps = [c for c in (self._max_context, model_cap) if c]
        return min(caps) if caps else None

    def context_used(self) -> int:
        sess = self._prefix.session if self._prefix is not None else None
        return int(getattr(sess, "n_tokens", 0) or 0) if sess is not None else 0

    # ------------------------------------------------------------ one job

    def _stop_ids(self) -> list[int]:
        ids = set(getattr(self.model, "eos_ids", ()) or ())
        eos = getattr(self.model.tokenizer, "eos_id", None)
        if eos is not None:
            ids.add(int(eos))
        return sorted(ids)

    def _run(self, job: Job) -> None:
        c = self.counters
        try:
            done = self._generate(job)
        except _Cancelled:
            c.cancelled += 1
            if job.cancel_reason == "shutdown":
                job.send(Failed(503, "the server is shutting down; the generation was cancelled", "server_error",
                                "shutting_down"))
            return
        except ContextFullError as exc:  # nothing fed is lost: the session stays usable
            c.failed += 1
            job.send(Failed(400, exc.message, "invalid_request_error", "context_length_exceeded"))
            return
        except HomerunError as exc:
            c.failed += 1
            self._safe_reset()
            job.send(Failed(500, exc.message, "server_error", None))
            return
        except Exception as exc:  # noqa: BLE001 - no request may take the server down
            c.failed += 1
            self._safe_reset()
            job.send(Failed(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", None))
            return
        if done is None:  # cancelled by its client after the first token
            c.cancelled += 1
            return
        c.completed += 1
        job.send(done)

    def _safe_reset(self) -> None:
        try:
            self._prefix.reset()
        except Exception:  # noqa: BLE001
            self._prefix = PrefixCache(self.model.session())

    def _generate(self, job: Job) -> Done | None:
        model, prefix = self.model, self._prefix
        sess = prefix.session
        ids = job.ids
        t0 = time.perf_counter()
        if job.cancelled.is_set():
            raise _Cancelled()
        cached = prefix.reuse(ids)

        def on_progress(done: int, total: int) -> None:
            if job.cancelled.is_set() and done < total:
                raise _Cancelled()  # after a committed chunk: consistent state, no stale logits (Session.feed)

        previous_hook = getattr(sess, "on_progress", None)
        if prefix.rollback_supported:
            sess.on_progress = on_progress
        try:
            if prefix.rollback_supported and len(ids) - 1 > sess.n_tokens:
                # Everything but the last prompt token first: the state there is where a thinking conversation's
                # next turn diverges (</think> replaces <think>), so it is kept as a point.
                sess.feed(ids[sess.n_tokens: len(ids) - 1], on_device=True)  # logits unused: left on the device
                prefix.mark()
            gen = model.generate(ids, max_new_tokens=job.max_tokens, temperature=job.temperature, top_p=job.top_p,
                                 top_k=job.top_k, seed=job.seed, session=sess, stop_ids=self._stop_ids())
            return self._decode_loop(job, gen, cached, t0)
        finally:
            if prefix.rollback_supported:
                sess.on_progress = previous_hook

    def _decode_loop(self, job: Job, gen: Any, cached: int, t0: float) -> Done | None:
        tok, prefix, c = self.model.tokenizer, self._prefix, self.counters
        stop_ids = set(self._stop_ids())
        decoder = tok.stream_decoder()
        splitter = StreamSplitter(job.thinking) if job.chat else None
        stops = StopFilter(job.stop)
        pieces: list[str] = []
        content: list[str] = []
        reasoning: list[str] = []
        gen_ids: list[int] = []
        ttft = 0.0
        t_first = None
        finish = "length"

        def emit(kind: str, text: str) -> None:
            if kind in ("content", "text"):
                text = stops.push(text)
            if not text:
                return
            (reasoning if kind == "reasoning" else content).append(text)
            job.send(Delta(kind, text))

        try:
            for step in gen:
                tid = int(step.token_id)
                gen_ids.append(tid)
                if t_first is None:
                    t_first = time.perf_counter()
                    ttft = t_first - t0
                    # The state after the whole prompt; its logits are kept by reference (a read of the session's
                    # last_logits would copy them to the host, a wait and V floats, per request, for tests only).
                    point = prefix.mark()
                    self._prompt_logits = point.last_logits if point is not None else None
                    c.prompt_tokens += len(job.ids)
                    c.cached_tokens += cached
                    c.ttft_sum_s += ttft
                    fed = len(job.ids) - cached
                    c.last_prefill_tok_s = fed / ttft if ttft > 0 and fed > 0 else c.last_prefill_tok_s
                c.generated_tokens += 1
                if job.chat or tid not in stop_ids:
                    text = decoder.push(tid)
                    pieces.append(text)
                    if splitter is None:
                        emit("text", text)
                    else:
                        for d in splitter.push(text):
                            emit(d.kind, d.text)
                if stops.hit:
                    finish = "stop"
                    break
                if step.finish_reason is not None:
                    finish = "stop" if step.finish_reason == "eos" else "length"
                    break
                if job.cancelled.is_set():
                    break
        finally:
            gen.close()
        if job.cancelled.is_set() and finish == "length" and not stops.hit:
            if job.cancel_reason == "shutdown":
                raise _Cancelled()
            return None
        if not stops.hit:
            tail = decoder.flush()
            pieces.append(tail)
            if splitter is None:
                emit("text", tail)
            else:
                for d in splitter.push(tail) + splitter.finish():
                    emit(d.kind, d.text)
        tool_calls: list[dict[str, Any]] = []
        if splitter is not None and splitter.state == "tools" and not stops.hit:
            tool_calls = self._tool_calls(job, "".join(pieces), finish)
            if not tool_calls:  # not a well-formed block: it is part of the answer
                raw = "".join(pieces)
                after = raw.find(THINK_END) + len(THINK_END) if job.thinking and THINK_END in raw else 0
                block = raw[raw.find(TOOL_CALLS_START, after):]
                block = block[: -len(EOS)] if block.endswith(EOS) else block
                emit("content", block)
        tail = stops.flush()
        if tail:
            (content).append(tail)
            job.send(Delta("text" if splitter is None else "content", tail))
        if stops.hit:
            finish = "stop"
        if tool_calls:
            finish = "tool_calls"
        n = len(gen_ids)
        decode_s = time.perf_counter() - t_first if t_first is not None else 0.0
        decode_tok_s = (n - 1) / decode_s if n > 1 and decode_s > 0 else None
        c.decode_s += decode_s
        if decode_tok_s:
            c.last_decode_tok_s = decode_tok_s
        think_end = tok.token_to_id(THINK_END) if job.thinking else None
        reasoning_tokens = gen_ids.index(think_end) if think_end in gen_ids else (n if job.thinking else 0)
        usage = Usage(prompt_tokens=len(job.ids), completion_tokens=n, cached_tokens=cached,
                      reasoning_tokens=reasoning_tokens)
        return Done(finish_reason=finish, text="".join(content),
                    reasoning="".join(reasoning) if (job.chat and job.thinking) else None,
                    tool_calls=tool_calls, usage=usage, ttft_s=ttft, decode_tok_s=decode_tok_s)

    @staticmethod
    def _tool_calls(job: Job, completion: str, finish: str) -> list[dict[str, Any]]:
        text = completion if completion.endswith(EOS) or finish != "stop" else completion + EOS
        try:
            parsed = parse_message_from_completion_text(text, "thinking" if job.thinking else "chat")
        except CompletionFormatError:
            return []
        return [{"id": f"call_{job.id}_{i}", "type": "function", "function": dict(call["function"])}
                for i, call in enumerate(parsed.get("tool_calls") or [])]

    # ------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, Any]:
        c = self.counters
        from homerun.chat.session import call_stats, expert_hit_rate

        hit = expert_hit_rate(call_stats(self.model)) if self.model is not None else None
        return {
            "state": self.state,
            "requests_total": c.requests,
            "requests_completed_total": c.completed,
            "requests_cancelled_total": c.cancelled,
            "requests_failed_total": c.failed,
            "requests_rejected_total": c.rejected_queue_full,
            "prompt_tokens_total": c.prompt_tokens,
            "prompt_cached_tokens_total": c.cached_tokens,
            "generated_tokens_total": c.generated_tokens,
            "time_to_first_token_seconds_sum": c.ttft_sum_s,
            "decode_seconds_total": c.decode_s,
            "decode_tokens_per_second": c.last_decode_tok_s,
            "prefill_tokens_per_second": c.last_prefill_tok_s,
            "queue_depth": self.queue_depth,
            "requests_running": self.running,
            "expert_cache_hit_rate": hit,
            "context_used_tokens": self.context_used() if self.model is not None else 0,
            "context_capacity_tokens": self.context_capacity() if self.model is not None else None,
        }
