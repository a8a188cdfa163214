"""The Typer app. It registers commands and maps HomerunError to a one-line message, a hint and an exit code.
Each command lives in homerun/cli/commands/<name>.py and exposes `register(app)`; no logic here.

Any other exception is a bug: it prints one line naming the file under `$HOMERUN_HOME/logs/` that holds the full
traceback, and exits 1 (`--debug` or `HOMERUN_DEBUG=1` shows the traceback instead)."""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import pkgutil
import sys
import tempfile
import traceback
from pathlib import Path
import typer
import typer.core
from typing_extensions import Annotated

from homerun.cli import commands
from homerun.errors import ExitCode, HomerunError

_DEBUG_ENV = "HOMERUN_DEBUG"


def _no_type_on_flags() -> None:
    """Typer's rich help shows a value type for every option, `<bool>` on flags (even --help) included. A flag takes
    no value, so it shows none."""
    original = typer.core.TyperOption.display_type_rich
    if getattr(original, "_homerun_flags", False):
        return

    def display_type_rich(self, ctx):  # type: ignore[no-untyped-def]
        if getattr(self, "is_flag", False) and not getattr(self, "count", False):
            return None
        return original(self, ctx)

    display_type_rich._homerun_flags = True  # type: ignore[attr-defined]
    typer.core.TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_no_type_on_flags()


def _debug() -> bool:
    return os.environ.get(_DEBUG_ENV) == "1"


class _App(typer.Typer):
    """Typer app that turns HomerunError into `Error: ...` + `Hint: ...` on stderr and a defined exit code, and any
    other exception into one line plus the path of its logged traceback (exit 1)."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except HomerunError as exc:
            if _debug():
                raise
            sys.exit(report_error(exc))
        except KeyboardInterrupt:
            sys.exit(int(ExitCode.INTERRUPTED))
        except Exception as exc:  # noqa: BLE001 - the one top-level guard: never a bare traceback
            if _debug():
                raise
            sys.exit(report_bug(exc))


app = _App(
    name="homerun",
    help="Run DeepSeek-V4-class MoE models on a home rig: plan, chat, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from homerun.version import __version__

        typer.echo(f"homerun {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks of unexpected errors (same as "
                                        "HOMERUN_DEBUG=1).")] = False,
) -> None:
    """Run DeepSeek-V4-class MoE models on a home rig: plan, chat, bench."""
    if debug:
        os.environ[_DEBUG_ENV] = "1"


def _register_all() -> None:
    for mod in sorted(m.name for m in pkgutil.iter_modules(commands.__path__)):
        module = importlib.import_module(f"homerun.cli.commands.{mod}")
        if hasattr(module, "register"):
            module.register(app)


def _err_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def report_error(exc: HomerunError) -> int:
    from rich.markup import escape

    err = _err_console()
    err.print(f"[bold red]Error:[/bold red] {escape(exc.message)}")
    if exc.hint:
        err.print(f"[dim]Hint:[/dim] {escape(exc.hint)}")
    return int(exc.exit_code)


def write_bug_log(exc: BaseException) -> Path | None:
    """The full traceback in $HOMERUN_HOME/logs/ (or the temp directory when that is not writable); None if neither."""
    from homerun.chat.session import homerun_home

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = f"homerun {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(exc))
    for folder in (homerun_home() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=f"homerun-crash-{stamp}-", suffix=".log", dir=folder)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            return Path(name)
        except OSError:
            continue
    return None


def report_bug(exc: BaseException) -> int:
    from rich.markup import escape

    log = write_bug_log(exc)
    where = f"the traceback is in {log}" if log else "the traceback could not be written"
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    err = _err_console()
    err.print(f"[bold red]Error:[/bold red] unexpected {type(exc).__name__}" + (f": {escape(first)}" if first else ""))
    err.print(f"[dim]Hint:[/dim] this is a bug in homerun; {escape(where)} (--debug shows it here); please report it")
    return int(ExitCode.RUNTIME)


_register_all()


def main() -> None:
    app()
