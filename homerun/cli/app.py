"""The Typer app. It registers commands and maps HomerunError to a one-line message, a hint and an exit code.
Each command lives in homerun/cli/commands/<name>.py and exposes `register(app)`; no logic here."""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys

import typer

from homerun.cli import commands
from homerun.errors import ExitCode, HomerunError

class _App(typer.Typer):
    """Typer app that turns HomerunError into `Error: ...` + `Hint: ...` on stderr and a defined exit code."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except HomerunError as exc:
            if os.environ.get("HOMERUN_DEBUG") == "1":
                raise
            sys.exit(report_error(exc))
        except KeyboardInterrupt:
            sys.exit(int(ExitCode.INTERRUPTED))


app = _App(
    name="homerun",
    help="Run DeepSeek-V4-class MoE models on a home rig: plan, chat, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_all() -> None:
    for mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        module = importlib.import_module(f"homerun.cli.commands.{mod}")
        if hasattr(module, "register"):
            module.register(app)


def report_error(exc: HomerunError) -> int:
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[bold red]Error:[/bold red] {escape(exc.message)}")
    if exc.hint:
        err.print(f"[dim]Hint:[/dim] {escape(exc.hint)}")
    return int(exc.exit_code)


_register_all()


def main() -> None:
    app()
