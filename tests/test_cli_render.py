"""Output that reads well (issue 15): data text is never taken as rich markup, values print as values (not Python
reprs), and tables never cut a value at 80 columns (they fold prose, switch to blocks when narrow, and print at
their natural width into a pipe); help shows no `<bool>` and states the sampling ranges; `--version`; progress
bars with rate and ETA on stderr only."""

import io
import re
import time

import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

from homerun.cli.app import app


def terminal(width=80):
    return Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None, record=True,
                   highlight=False, legacy_windows=False)


def pipe(width=80):
    return Console(file=io.StringIO(), width=width, record=True, highlight=False)


def text_of(console):
    return console.export_text()


def flat(text):
    """Whitespace-collapsed text with table borders removed, to find prose that wrapped between words."""
    return " ".join(re.sub(r"[│┃┏┓┗┛┡┩┠┨━─┃╇╈┳┻┼╋┬┴├┤└┘┌┐═║╭╮╰╯]", " ", text).split())


def lines_have(text, value):
    """`value` appears whole on one line."""
    return any(value in line for line in text.splitlines())


# ------------------------------------------------------------------------------------------------ profiles


def test_profiles_show_keeps_toml_tables_and_prints_values_not_reprs():
    from homerun.cli.commands.profiles import _render_one
    from profiles import load_profile

    doc = {"profile": load_profile("rtx5090-192gb").to_dict()}
    console = terminal()
    _render_one(console, doc)
    text = text_of(console)
    for header in ("[cpu]", "[memory]", "[disk]", "[policy]", "[[gpus]]"):
        assert header in text, header
    assert "[] #0" not in text
    assert 'flags = ["avx2", "avx512f", "avx512_vnni", "avx512vbmi", "avx512_bf16"]' in text and "clock_ghz = 4.3" in text
    assert "('avx2'" not in text and "None" not in text and "True" not in text and "False" not in text
    assert "unified = false" in text and "fp8 = true" in text


def test_profile_text_is_not_markup(tmp_path):
    from homerun.cli.commands.profiles import _render_list, _render_one, _summary
    from profiles import load_profile, profile_path

    src = tmp_path / "rig.toml"
    toml = profile_path("rtx5090-192gb").read_text()
    toml = re.sub(r'^name = ".*"$', 'name = "[bold]my[/bold] rig [cpu]"', toml, count=1, flags=re.M)
    toml = re.sub(r'^description = ".*"$', 'description = "box [red]x[/red] [/]"', toml, count=1, flags=re.M)
    src.write_text(toml)
    prof = load_profile(str(src))
    console = terminal()
    _render_one(console, {"profile": prof.to_dict()})
    _render_list(console, [_summary(prof)])
    out = text_of(console)
    assert "[bold]my[/bold] rig [cpu]" in out and "box [red]x[/red] [/]" in out


@pytest.mark.parametrize("make", [terminal, pipe], ids=["terminal", "pipe"])
def test_profiles_list_keeps_every_value_at_80_columns(make):
    from homerun.cli.commands.profiles import _render_list, _summary
    from profiles import list_profiles, load_profile

    rows = [_summary(load_profile(n)) for n in list_profiles()]
    console = make(80)
    _render_list(console, rows)
    text = text_of(console)
    if make is terminal:
        assert max(len(line) for line in text.splitlines()) <= 80
    for r in rows:
        assert lines_have(text, r["name"]), r["name"]
        assert " ".join(r["description"].split()) in flat(text), r["description"]


# ------------------------------------------------------------------------------------------------ bench


def _bench_doc(**kw):
    doc = {
        "model": "deepseek-ai/DeepSeek-V4-Flash (synthetic, 2L)", "model_size": 7.5 * 2**30, "model_n_params": 9.1e9,
        "backend": "cpu-avx512-int8", "profile": "rtx5090-192gb", "gpu_experts": 0, "test": "tg128 @ d4096",
        "cache": "warm", "avg_ts": 12.345, "stddev_ts": 0.5, "hit_rate": None,
        "links": {"dram": {"gbps": 41.2, "ratio": 0.71}, "vram": {"gbps": 0.0, "ratio": None}},
        "predicted_ts": 13.0, "prediction_ratio": 0.95, "correctness": {"ok": True, "max_rel_err": 1e-3, "tol": 3e-2},
        "extrapolated": False, "notes": [], "build_commit": "abc1234", "homerun_version": "0.1.0",
        "torch_version": "2.13.0", "cpu_info": "AMD Ryzen 9 7950X 16-Core Processor", "gpu_info": "none",
        "kernel_path": "avx512", "limits": {"dram_read_gbps": 58.0},
    }
    doc.update(kw)
    return doc


@pytest.mark.parametrize("width", [80, 140])
@pytest.mark.parametrize("make", [terminal, pipe], ids=["terminal", "pipe"])
def test_bench_table_never_truncates_values(width, make):
    from homerun.bench.report import table_row
    from homerun.cli.commands.bench import render_table

    docs = [_bench_doc(), _bench_doc(test="pp512", cache="cold", extrapolated=True)]
    console = make(width)
    render_table(console, docs)
    text = text_of(console)
    assert "…" not in text
    for d in docs:
        for value in table_row(d):
            assert lines_have(text, value), (value, text)
    if make is terminal:
        assert max(len(line) for line in text.splitlines()) <= width


# ------------------------------------------------------------------------------------------------ plan


def test_piped_plan_output_keeps_every_value_on_one_line():
    from homerun.cli.commands.plan import build_plan, render_plan

    doc, _ = build_plan("v4-flash", hw="rtx5090-192gb")
    console = pipe(80)
    render_plan(console, doc)
    text = text_of(console)
    assert lines_have(text, doc["verdict"])
    for row in doc["placement"]:
        assert lines_have(text, row["what"]) and lines_have(text, row["reason"]), row
    for note in doc.get("notes", []):
        assert lines_have(text, note)


def test_plan_at_80_columns_on_a_terminal_keeps_values_whole():
    from homerun.cli.commands.plan import build_plan, render_plan

    doc, _ = build_plan("v4-flash", hw="rtx5090-192gb")
    console = terminal(80)
    render_plan(console, doc)
    text = text_of(console)
    assert max(len(line) for line in text.splitlines()) <= 80
    words = set(flat(text).split())
    for row in doc["placement"]:  # prose cells wrap between words, never inside one
        for word in (row["what"] + " " + row["reason"]).split():
            assert word in words, (word, row)
    assert "…" not in text


# ------------------------------------------------------------------------------------------------ help


def _paths():
    root = typer.main.get_command(app)
    return [(name,) for name in root.commands]


@pytest.mark.parametrize("path", [()] + _paths(), ids=lambda p: " ".join(p) or "homerun")
def test_help_shows_no_bool_type_on_flags(path):
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output


@pytest.mark.parametrize("command", ["run", "chat"])
def test_help_states_the_sampling_ranges(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    out = " ".join(result.output.split())
    for needle in (">= 0; 0 = greedy", "in (0, 1]", "K >= 0", "0 to 2**64-1", ">= 1"):
        assert needle in out, needle


def test_version():
    from homerun.version import __version__

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"homerun {__version__}"


# ------------------------------------------------------------------------------------------------ progress


def test_byte_progress_shows_rate_and_eta_on_stderr_only(capsys):
    from homerun.cli.output import Output
    from homerun.cli.progress import byte_progress

    out = Output(json_mode=True)
    out.err = terminal(120)
    with byte_progress(out, "writing synthetic weights") as bar:
        bar.update(10**9, 8 * 10**9, "layers.0.ffn.experts")
        time.sleep(0.05)
        bar.update(2 * 10**9, 8 * 10**9, "layers.1.ffn.experts")
        bar.refresh()
    text = text_of(out.err)
    assert "writing synthetic weights" in text and "2.0/8.0 GB" in text and "GB/s" in text
    assert re.search(r"ETA \d+:\d\d:\d\d", text)  # the ETA column
    assert capsys.readouterr().out == ""


def test_synthetic_write_progress_is_a_bar():
    from homerun.cli.commands.bench import _write_progress
    from homerun.cli.output import Output

    out = Output(json_mode=False)
    out.err = terminal(120)
    with _write_progress(out) as progress:
        for done in range(0, 11):
            progress(done * 10**8, 10**9, f"layers.{done}")
    assert "writing synthetic weights: " not in text_of(out.err)  # no more one line per 10 %


# ------------------------------------------------------------------------------------------------ chat and run text


def test_control_characters_are_rendered_visibly():
    from homerun.cli.chat_view import printable

    assert printable("a\x13b\x7fc\x1b[31m\x85\tx\ny") == "a\u2413b\u2421c\u241b[31m\ufffd\tx\ny"


def test_the_banner_states_the_basis_of_its_prediction():
    from homerun.cli.commands.chat import plan_summary
    from homerun.cli.commands.plan import build_plan

    _, plan = build_plan("v4-flash", hw="rtx5090-192gb")
    line = plan_summary(plan)
    assert "predicted decode ~" in line and "GB/token over" in line and "homerun bench" in line
