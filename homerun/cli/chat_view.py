"""The chat terminal's view: reading a message (multi-line blocks), streaming a turn (dim reasoning collapsed when
done, markdown answers), slash-command output, the interactive loop, and the `--json` line protocol. Split from
`homerun.cli.commands.chat`, which opens the model and wires the command; the conversation logic lives in
`homerun.chat.session`: this module only reads input and renders."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.markup import escape
from rich.text import Text

from homerun.chat.events import turn_events
from homerun.chat.session import ChatSession, Delta, TurnDone
from homerun.errors import HomerunError, NumericError
from homerun.cli.output import Output

HELP_TEXT = """Commands:
  /think off|high|max   thinking mode (off = direct answer; high = reasoning; max = deepest, needs 384K context)
  /system TEXT          set the system prompt (no TEXT clears it)
  /reset                start a new conversation (keeps mode and system prompt)
  /save [FILE]          save the history (default: the autosave file under HOMERUN_HOME/chats) and its KV snapshot
  /save! FILE           the same, replacing FILE even when it is not a homerun chat history
  /load FILE            load a saved history and continue it (restores its KV snapshot, else re-prefills)
  /stats                speed, expert-cache hit rate, context used/capacity
  /set NAME VALUE       sampling: temperature, top-p, top-k, seed, max-new-tokens ("none" unsets)
  /reasoning            show the full reasoning of the last answer
  /help                 this list
  /exit                 leave (Ctrl-D too)
Input: end a line with \\ to continue it; a line holding only \"\"\" opens/closes a multi-line block.
Ctrl-C stops a generation and keeps the conversation."""

CONTINUE_PROMPT = "... "
USER_PROMPT = ">>> "
BLOCK_FENCE = '"""'


def read_message(read=input) -> str:
    """One message: a line; a line ending in \\ continues on the next; a line of just \"\"\" opens a block that
    the next such line closes."""
    line = read(USER_PROMPT)
    if line.strip() == BLOCK_FENCE:
        lines = []
        while (nxt := read(CONTINUE_PROMPT)).strip() != BLOCK_FENCE:
            lines.append(nxt)
        return "\n".join(lines)
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = read(CONTINUE_PROMPT)
    return "\n".join(parts + [line])


# ---------------------------------------------------------------- rendering

# C0/C1 control characters (except newline and tab) would drive the terminal (a random model emits ESC too): C0 and
# DEL are shown as their Unicode control pictures (\x13 as ␓, ESC as ␛, DEL as ␡), C1 (which has none) as U+FFFD.
_CONTROL = {**{c: chr(0x2400 + c) for c in [*range(0x00, 0x09), *range(0x0B, 0x20)]}, 0x7F: "\u2421",
            **{c: "\ufffd" for c in range(0x80, 0xA0)}}


def printable(text: str) -> str:
    return text.translate(_CONTROL)


class _StreamView:
    """The live view while generating: dim reasoning then the answer, showing only the tail that fits."""

    def __init__(self) -> None:
        self.reasoning: list[str] = []
        self.content: list[str] = []

    def add(self, delta: Delta) -> None:
        (self.reasoning if delta.kind == "reasoning" else self.content).append(delta.text)

    def __rich_console__(self, console: Console, options):
        height = max((options.height or console.size.height) - 2, 1)
        budget = height * options.max_width
        text = Text()
        if self.reasoning:
            text.append(printable("".join(self.reasoning)[-budget:]), style="dim italic")
        if self.content:
            if self.reasoning:
                text.append("\n\n")
            text.append(printable("".join(self.content)[-budget:]))
        lines = text.wrap(console, options.max_width)
        yield Text("\n").join(lines[-height:])


def render_done(console: Console, done: TurnDone, markdown: bool = True) -> None:
    msg, stats = done.message, done.stats
    reasoning = msg.get("reasoning_content") or ""
    if reasoning:
        flat = " ".join(reasoning.split())
        first = printable(flat[:70]) + ("…" if len(flat) > 70 else "")
        console.print(Text(f"▸ Thought ({len(reasoning)} chars): {first} (/reasoning shows it all)", style="dim"))
    if msg.get("content"):
        content = printable(msg["content"])
        console.print(Markdown(content) if markdown else Text(content))
    for call in msg.get("tool_calls") or []:
        fn = call["function"]
        console.print(Text(printable(f"Tool call: {fn['name']}({fn['arguments']})"), style="cyan"))
    notes = [f"{stats.n_gen} token{'s' if stats.n_gen != 1 else ''}"]
    if stats.decode_tok_s:
        notes.append(f"{stats.decode_tok_s:.1f} tok/s")
    if stats.finish_reason != "interrupted":
        notes.append(f"finish: {stats.finish_reason}")
    if not done.parsed:
        notes.append("kept raw (not well-formed V4 output)")
    head = "[interrupted] " if stats.finish_reason == "interrupted" else ""
    console.print(Text(head + " · ".join(notes), style="dim"))


def _stream_turn(console: Console, chat: ChatSession, text: str) -> None:
    """One turn on the terminal; Ctrl-C asks the session to stop after the step in flight."""
    def on_sigint(*_: Any) -> None:
        if chat.stop_requested:  # a second Ctrl-C does not wait for the step in flight
            raise KeyboardInterrupt
        chat.request_stop()

    previous = signal.signal(signal.SIGINT, on_sigint)
    view, done, last = _StreamView(), None, 0.0
    live = Live(view, console=console, transient=True, auto_refresh=False) if console.is_terminal else None
    try:
        if live is not None:
            live.start()
        for ev in chat.turn(text):
            if isinstance(ev, TurnDone):
                done = ev
            elif live is not None:
                view.add(ev)
                if time.perf_counter() - last > 0.05:
                    live.refresh()
                    last = time.perf_counter()
            else:
                console.print(Text(printable(ev.text), style="dim" if ev.kind == "reasoning" else ""), end="")
    except NumericError:  # a broken model or kernel: every later turn would be garbage too, so exit 1
        raise
    except HomerunError as exc:
        hint = f" [dim]({escape(exc.hint)})[/dim]" if exc.hint else ""
        console.print(f"[red]Error:[/red] {escape(exc.message)}{hint}")
    except KeyboardInterrupt:
        # The runtime feeds all-or-nothing per chunk, so the session is consistent; this turn is dropped.
        console.print(Text("[interrupted] turn dropped; the conversation is kept", style="dim"))
    finally:
        if live is not None:
            live.stop()
        signal.signal(signal.SIGINT, previous)
    if done is not None:
        if live is None:
            console.print()
        render_done(console, done, markdown=live is not None)
        if done.warning:
            console.print(Text(f"Warning: {done.warning}", style="yellow"))


def _render_command(console: Console, res) -> None:
    text = {"help": HELP_TEXT, "stats": render_stats(res.data) if res.kind == "stats" else ""}.get(res.kind, res.text)
    style = {"error": "red", "warn": "yellow", "reasoning": "dim italic"}.get(res.kind, "")
    console.print(Text(text, style=style))


def render_stats(data: dict[str, Any]) -> str:
    last = data.get("last_turn") or {}

    def fmt(v: float | None, unit: str) -> str:
        return f"{v:.1f} {unit}" if isinstance(v, (int, float)) else "n/a"

    hit = data.get("expert_cache_hit_rate")
    cap = data.get("context_capacity_tokens")
    alloc = data.get("context_allocated_tokens")
    placed = (data.get("model_stats") or {}).get("placement")  # runtime Placement.to_dict(), when loaded with one
    where = ["placement: " + ", ".join(f"{d['name']} {n} layers" for d, n in zip(placed["devices"],
                                                                             placed["layer_counts"]))] if placed else []
    return "\n".join(where + [
        f"decode: {fmt(last.get('decode_tok_s'), 'tok/s')}  prefill: {fmt(last.get('prefill_tok_s'), 'tok/s')}"
        f"  last turn: {last.get('n_gen', 0)} tokens ({last.get('finish_reason', 'n/a')})",
        f"expert cache hit rate: {f'{hit:.1%}' if hit is not None else 'n/a'}",
        f"context: {data.get('context_used_tokens', 0):,} / {f'{cap:,}' if cap else 'unknown'} tokens"
        + (f" ({alloc:,} allocated now)" if alloc else ""),
    ])


def interactive(chat: ChatSession, console: Console) -> None:
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    console.print(Text(f"Chatting with {chat.model_name} · thinking {chat.think} · history {chat.history_path}\n"
                       "/help for commands, Ctrl-D or /exit to leave", style="dim"))
    while True:
        try:
            text = read_message()
        except EOFError:
            console.print()
            break
        except KeyboardInterrupt:
            console.print(Text("\n(Ctrl-D or /exit to leave)", style="dim"))
            continue
        if not text.strip():
            continue
        if text.startswith("/"):
            with prefill_progress(chat, text.startswith("/load")):
                res = chat.handle_command(text)
            if res.kind == "exit":
                break
            _render_command(console, res)
            continue
        _stream_turn(console, chat, text)
    if chat.messages:
        console.print(Text(f"History: {chat.history_path}", style="dim"))


class prefill_progress:
    """A transient progress bar with ETA on stderr while a long feed runs (a history re-prefill on /load or
    --resume); a no-op when `on` is false or the chat has no runtime session."""

    def __init__(self, chat: ChatSession, on: bool = True) -> None:
        self.kv = getattr(chat, "_kv", None) if on else None
        self.chat = chat

    def __enter__(self) -> "prefill_progress":
        if self.kv is None or not hasattr(self.kv, "on_progress"):
            self.kv = None
            return self
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("Prefill"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=True)
        self.task = None
        self.bar.start()

        def on_progress(done: int, total: int) -> None:
            if self.task is None:
                self.task = self.bar.add_task("prefill", total=total)
            self.bar.update(self.task, completed=done, total=total)

        self.kv.on_progress = on_progress
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.kv is not None:
            self.bar.stop()
            for kv in {id(self.kv): self.kv, id(self.chat._kv): self.chat._kv}.values():
                kv.on_progress = None


def json_lines(chat: ChatSession, out: Output) -> None:
    """--json: one message or slash command per stdin line; JSONL events on stdout."""
    for line in sys.stdin:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            res = chat.handle_command(text)
            text = HELP_TEXT if res.kind == "help" else res.text
            out.event({"event": "command", "kind": res.kind, "text": text, "data": res.data})
            if res.kind == "exit":
                return
            continue
        try:
            for ev in chat.turn(text):
                for record in turn_events(ev, chat):
                    out.event(record)
        except NumericError:  # NaN logits: a bug, not a turn to report and go on from (exit 1)
            raise
        except HomerunError as exc:  # e.g. the context is full: report it and keep reading
            out.event({"event": "error", "message": exc.message, "hint": exc.hint})
