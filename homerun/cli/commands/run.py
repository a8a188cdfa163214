"""`homerun run MODEL "prompt"`: one-shot generation for scripts.

Stdout carries the answer only (streamed as it comes); reasoning goes to stderr, dimmed, and only when stderr is a
terminal. `--json` prints JSONL events instead: `reasoning`, `content`, one `tool_call` per parsed call, then `done`
with the finish reason, the parsed message and the stats (with `--hw`, `stats.placement`: devices and layers per
device). No history file is written.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from typing_extensions import Annotated

from homerun.chat.events import turn_events  # noqa: F401 - the JSONL schema, also used by chat --json
from homerun.chat.session import ChatSession, TurnDone
from homerun.cli.commands.chat import (  # noqa: F401 - the aliases are resolved from this module's globals by typer
    CacheSlotsOpt, ExpertActOpt, ExpertsOpt, HwOpt, SeedOpt, StandinOpt, SystemOpt, TemperatureOpt, ThinkingOpt,
    TopKOpt, TopPOpt, TraceOpt,
    load_options_from, start_session,
)
from homerun.errors import ExitCode
from homerun.cli.output import Output




def _run_plain(chat: ChatSession, prompt: str, out: Output) -> TurnDone | None:
    from homerun.cli.chat_view import printable

    show_reasoning = sys.stderr.isatty()
    # On a terminal, control characters are shown, not obeyed; a pipe or a file gets the answer byte for byte.
    shown = printable if sys.stdout.isatty() else str
    done, wrote_reasoning = None, False
    for ev in chat.turn(prompt):
        if isinstance(ev, TurnDone):
            done = ev
        elif ev.kind == "content":
            sys.stdout.write(shown(ev.text))
            sys.stdout.flush()
        elif show_reasoning:
            out.err.print(printable(ev.text), style="dim", end="", markup=False, highlight=False)
            wrote_reasoning = True
    if wrote_reasoning:
        out.err.print()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return done


def _run_json(chat: ChatSession, prompt: str, out: Output) -> TurnDone | None:
    done = None
    for ev in chat.turn(prompt):
        done = ev if isinstance(ev, TurnDone) else done
        for record in turn_events(ev, chat):
            out.event(record)
    return done


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        model: Annotated[str, typer.Argument(help="Checkpoint directory (or Hub repo id the runtime can resolve).")],
        prompt: Annotated[str, typer.Argument(help="The user message; '-' reads it from stdin.")],
        thinking: ThinkingOpt = "off",
        system: SystemOpt = None,
        temperature: TemperatureOpt = None,
        top_p: TopPOpt = None,
        top_k: TopKOpt = None,
        seed: SeedOpt = None,
        max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate, >= 1.")] = 4096,
        hw: HwOpt = None,
        standin: StandinOpt = False,
        json_out: Annotated[bool, typer.Option("--json", help="JSONL events: reasoning, content, tool_call, done.")] = False,
        experts: ExpertsOpt = "auto",
        expert_act: ExpertActOpt = "auto",
        expert_cache_slots: CacheSlotsOpt = None,
        trace: TraceOpt = None,
        prompt_cache: Annotated[Optional[Path], typer.Option("--prompt-cache", help="KV snapshot of the prompt up "
                                "to the user's message (system prompt included): restored when this prompt starts "
                                "with it, else written. Put a long shared document in --system.")] = None,
    ) -> None:
        """Answer one prompt and exit.

        Examples:
          homerun run ./DeepSeek-V4-Flash "Why is the sky blue?"
          homerun run ./DeepSeek-V4-Flash "Plan a trip" --thinking high --json
          cat question.txt | homerun run ./DeepSeek-V4-Flash -
          homerun run ./tiny "hi" --hw 3xh100 --standin --json   # a 3-GPU placement on CPU stand-ins
          homerun run ./DeepSeek-V4-Flash "Q1" --system "$(cat doc.txt)" --prompt-cache doc.kv
        """
        out = Output(json_out)
        text = sys.stdin.read() if prompt == "-" else prompt
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens)
        chat = start_session(model, hw=hw, think=thinking, system=system, sampling=sampling, out=out, autosave=False,
                             load_options=load_options_from(experts, expert_cache_slots, trace, expert_act), standin=standin)
        if prompt_cache is not None:
            from homerun.chat.kv_files import use_prompt_cache

            note = use_prompt_cache(chat, prompt_cache, text)
            if note:
                out.info(f"[dim]{escape(note)}[/dim]")
        # Ctrl-C ends the generation after the step in flight; the partial answer is flushed, then exit code 130.
        previous = signal.signal(signal.SIGINT, lambda *_: chat.request_stop())
        try:
            done = _run_json(chat, text, out) if json_out else _run_plain(chat, text, out)
        finally:
            signal.signal(signal.SIGINT, previous)
        if done is not None and done.stats.finish_reason == "interrupted":
            raise typer.Exit(int(ExitCode.INTERRUPTED))
