"""`--help` for the app and for every registered command, discovered from the Typer app (so commands added later
are covered without editing this file)."""

import pytest
import typer
from typer.testing import CliRunner

from homerun.cli.app import app


def _command_paths() -> list[tuple[str, ...]]:
    root = typer.main.get_command(app)
    paths: list[tuple[str, ...]] = []

    def walk(cmd, prefix: tuple[str, ...]) -> None:
        if hasattr(cmd, "commands"):  # a group (typer vendors its own click, so duck-type it)
            for name, sub in cmd.commands.items():
                paths.append((*prefix, name))
                walk(sub, (*prefix, name))

    walk(root, ())
    return paths


PATHS = _command_paths()


def test_app_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    for path in PATHS:
        if len(path) == 1:
            assert path[0] in result.output


def test_the_planner_commands_are_registered():
    assert {("plan",), ("profiles",)} <= set(PATHS)


@pytest.mark.parametrize("path", PATHS, ids=[" ".join(p) for p in PATHS])
def test_command_help(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    if not hasattr(cmd, "commands"):
        # Every command offers --json (one JSON document on stdout).
        assert any("--json" in p.opts for p in cmd.params), f"{' '.join(path)} has no --json"
