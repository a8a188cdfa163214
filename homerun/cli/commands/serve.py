"""`homerun serve MODEL`: the OpenAI-compatible server (homerun.serve). The model, placement and sampling flags are
`chat`'s; the model loads on a thread after the port is bound, so requests get 503 until it is ready. SIGTERM or
Ctrl-C stop it cleanly (exit 0). `--json` prints JSONL events: `listening`, `ready`, `stopped`."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from typing_extensions import Annotated

from homerun.cli.commands.chat import (  # noqa: F401 - the aliases are resolved from this module's globals by typer
    CacheSlotsOpt, ExpertActOpt, ExpertsOpt, HwOpt, SeedOpt, StandinOpt, TemperatureOpt, ThinkingOpt, TopKOpt,
    TopPOpt, TraceOpt,
    check_think_flag, load_options_from, start_session,
)
from homerun.cli.output import Output
from homerun.errors import HomerunError, UsageError


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve_cmd(
        model: Annotated[str, typer.Argument(help="Checkpoint directory (or Hub repo id the runtime can resolve).")],
        host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback exposes the model.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port to bind (0: any free port).", min=0, max=65535)] = 8000,
        api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="HOMERUN_API_KEY",
                                                       help="Require 'Authorization: Bearer KEY' (also HOMERUN_API_KEY).")] = None,
        max_queue: Annotated[int, typer.Option(help="Requests that may wait behind the one generating; more get 429.",
                                               min=0)] = 16,
        name: Annotated[Optional[str], typer.Option(help="Model id to report in /v1/models (default: the folder name).")] = None,
        state: Annotated[Optional[Path], typer.Option("--state", help="KV snapshot file that keeps the live conversation "
                         "across restarts: restored at start when it matches the model, written at shutdown.")] = None,
        max_context: Annotated[Optional[int], typer.Option(help="Most tokens per sequence (prompt + answer); default: "
                                                           "the model's limit.", min=1)] = None,
        max_body_mb: Annotated[float, typer.Option(help="Largest request body, in MiB.", min=0.001)] = 16.0,
        shutdown_timeout: Annotated[float, typer.Option(help="On SIGTERM, seconds the request in flight may take to "
                                                        "finish before it is cancelled.", min=0.0)] = 30.0,
        allow_special: Annotated[bool, typer.Option("--allow-special", help="Tokenize special-token strings in message "
                                                    "content as control tokens (unsafe: lets users forge turns).")] = False,
        thinking: ThinkingOpt = "off",
        temperature: TemperatureOpt = None,
        top_p: TopPOpt = None,
        top_k: TopKOpt = None,
        seed: SeedOpt = None,
        max_new_tokens: Annotated[int, typer.Option(help="Default max_tokens of a chat answer.", min=1)] = 4096,
        hw: HwOpt = None,
        standin: StandinOpt = False,
        json_out: Annotated[bool, typer.Option("--json", help="JSONL events on stdout: listening, ready, stopped.")] = False,
        experts: ExpertsOpt = "auto",
        expert_act: ExpertActOpt = "auto",
        expert_cache_slots: CacheSlotsOpt = None,
        trace: TraceOpt = None,
    ) -> None:
        """Serve a model over an OpenAI-compatible HTTP API (chat, completions, models, health, metrics).

        Examples:
          homerun serve ./DeepSeek-V4-Flash
          homerun serve ./DeepSeek-V4-Flash --thinking high --port 8080
          HOMERUN_API_KEY=secret homerun serve ./DeepSeek-V4-Flash --host 0.0.0.0
        """
        try:
            from homerun.serve.app import Settings, create_app, run_server
            from homerun.serve.engine import Engine
        except ImportError as exc:
            raise UsageError(f"homerun serve needs FastAPI and uvicorn ({exc.name} is missing)",
                             hint="pip install fastapi uvicorn") from None
        from homerun.engine.sampling import check_sampling

        out = Output(json_out)
        check_think_flag(thinking)
        check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                       max_new_tokens=max_new_tokens)  # bad values: exit 2 before the port opens
        if not _is_loopback(host) and not api_key:
            out.warn(f"binding {escape(host)} without an API key: anyone who can reach this port can use the model "
                     "(set --api-key or HOMERUN_API_KEY)")
        model_name = name or Path(model).name or model
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens)
        load_options = load_options_from(experts, expert_cache_slots, trace, expert_act)

        def loader():
            chat = start_session(model, hw=hw, think=thinking, system=None, sampling=sampling, out=out,
                                 autosave=False, load_options=load_options, standin=standin)
            return chat.model

        engine = Engine(loader=loader, max_queue=max_queue, max_context=max_context, name=model_name,
                        state_path=state)
        settings = Settings(model_name=model_name, api_key=api_key or None, max_body_bytes=int(max_body_mb * 2 ** 20),
                            default_think=thinking, default_max_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, seed=seed, allow_special=allow_special)
        app_ = create_app(engine, settings)

        def on_listening(bound_host: str, bound_port: int) -> None:
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            url = f"http://{shown}:{bound_port}/v1"
            if json_out:
                out.event({"event": "listening", "url": url, "host": bound_host, "port": bound_port,
                           "model": model_name, "api_key_required": bool(api_key)})
            else:
                out.err.print(f"Serving {escape(model_name)} at [bold]{url}[/bold] (OpenAI-compatible; "
                              f"{'API key required' if api_key else 'no API key'}); loading the model…")

            def when_ready() -> None:
                if engine.wait_loaded() and engine.state == "ready":
                    if json_out:
                        out.event({"event": "ready", "load_s": engine.load_s, "state": engine.state_note})
                    else:
                        out.err.print(f"Model ready ({engine.load_s or 0:.1f} s); Ctrl-C or SIGTERM stops the server")
                        if engine.state_note:
                            out.err.print(f"Live state: {escape(engine.state_note)}")

            threading.Thread(target=when_ready, name="homerun-ready", daemon=True).start()

        from homerun.serve.app import bind_socket

        try:
            bind_socket(host, port).close()  # a clear error (exit 2) before anything loads
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                             hint="pick another --port, or stop what is using it") from None
        run_server(app_, host=host, port=port, shutdown_timeout=shutdown_timeout, on_listening=on_listening)
        if engine.load_error is not None:
            err = engine.load_error
            if isinstance(err, HomerunError):
                raise err
            raise HomerunError(f"loading {model} failed: {type(err).__name__}: {err}") from err
        if json_out:
            out.event({"event": "stopped"})
        else:
            out.info("[dim]Server stopped[/dim]")
