"""The CLI bad-input suite (issue 15): each command fed a bad input through the installed `homerun` entry point must
exit with the documented code, print one `Error:` line naming the file or field (plus an optional `Hint:`), and
never a traceback. Inputs that must fail before a model is loaded assert that nothing was loaded."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HOMERUN = shutil.which("homerun")
TIMEOUT_S = 60


def entry_point(*args, env=None, stdin=None):
    """Through the installed `homerun` script, as a user runs it."""
    cmd = [HOMERUN] if HOMERUN else [sys.executable, "-m", "homerun"]
    return subprocess.run([*cmd, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, **(env or {})})


def homerun(*args, env=None, stdin=None):
    """The same app in this process (the error mapping of `homerun.cli.app` included), ~50x cheaper than a process:
    the result mimics subprocess.run's. The environment is restored afterwards."""
    import contextlib
    import io

    from homerun.cli.app import app

    saved_env, saved_stdin = dict(os.environ), sys.stdin
    out, err = io.StringIO(), io.StringIO()
    os.environ.update(env or {})
    sys.stdin = io.StringIO(stdin or "")
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            app([*map(str, args)], prog_name="homerun")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        sys.stdin = saved_stdin
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def assert_clean_error(proc, code, *needles, absent=()):
    """Exit code, one `Error:` line (then at most a `Hint:` line), naming every needle; no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    assert len(errors) == 1, err
    assert lines[-1].startswith(("Error:", "Hint:")), err
    for needle in needles:
        assert needle in err, (needle, err)
    for needle in absent:
        assert needle not in err, (needle, err)
    return err


# ------------------------------------------------------------------------------------------------ bad files


def test_entry_point(tmp_path, tiny_checkpoint):
    """A few of the cases below through the installed script: same exit codes, same one-line errors."""
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    assert_clean_error(entry_point("profiles", binary), 2, "binary.toml", "UTF-8")
    assert_clean_error(entry_point("run", tiny_checkpoint, "hi", "--temperature", "nan"), 2, "temperature")
    assert_clean_error(entry_point("bench", tmp_path / "missing"), 2, "missing")


@pytest.fixture
def bad_files(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00\x01\x80\x81name")
    utf16 = tmp_path / "utf16.toml"
    utf16.write_text('name = "x"\n', encoding="utf-16")
    return {"binary": binary, "utf16": utf16}


@pytest.mark.parametrize("kind", ["binary", "utf16"])
@pytest.mark.parametrize("command", ["profiles", "plan"])
def test_profile_that_is_not_utf8(bad_files, kind, command):
    path = bad_files[kind]
    args = ["profiles", path] if command == "profiles" else ["plan", "v4-flash", "--hw", path]
    assert_clean_error(homerun(*args), 2, path.name, "UTF-8")


def test_simulate_on_a_binary_file(bad_files):
    assert_clean_error(homerun("simulate", bad_files["binary"], "--cache-slots", "4"), 2, "binary.toml")


def test_unexpected_errors_are_one_line_and_logged(tmp_path):
    """The top-level guard: a bug prints one line and where its traceback went, exit 1; --debug shows it."""
    code = ("import sys; from homerun.cli import app as m\n"
            "@m.app.command('boom')\n"
            "def boom():\n    raise RuntimeError('kaput')\n"
            "sys.argv = ['homerun', *sys.argv[1:]]; m.main()\n")
    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-c", code, "boom"], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={**os.environ, "HOMERUN_HOME": str(home)})
    err = assert_clean_error(proc, 1, "RuntimeError", "kaput", str(home / "logs"))
    logs = list((home / "logs").iterdir())
    assert len(logs) == 1 and "Traceback" in logs[0].read_text() and str(logs[0]) in err
    debug = subprocess.run([sys.executable, "-c", code, "--debug", "boom"], capture_output=True, text=True,
                           timeout=TIMEOUT_S, env={**os.environ, "HOMERUN_HOME": str(home)})
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "kaput" in debug.stderr


# ------------------------------------------------------------------------------------------------ run and chat


@pytest.fixture(scope="module")
def no_tokenizer(tiny_checkpoint, tmp_path_factory):
    target = tmp_path_factory.mktemp("no-tok") / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    (target / "tokenizer.json").unlink()
    return target


@pytest.mark.parametrize("command", ["run", "chat"])
def test_checkpoint_without_tokenizer_fails_before_loading(no_tokenizer, command):
    args = ["run", no_tokenizer, "hi"] if command == "run" else ["chat", no_tokenizer, "--json"]
    err = assert_clean_error(homerun(*args, stdin=""), 2, "tokenizer.json", str(no_tokenizer))
    assert "Loaded" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1"])
def test_bad_temperature_is_refused_before_loading(tiny_checkpoint, value):
    err = assert_clean_error(homerun("run", tiny_checkpoint, "hi", "--temperature", value), 2, "temperature",
                             absent=("--greedy", "Loaded"))
    assert "RuntimeError" not in err


@pytest.mark.parametrize("flag,value", [("--top-p", "2"), ("--top-p", "nan"), ("--top-p", "0"), ("--top-k", "-1"),
                                        ("--max-new-tokens", "0"), ("--seed", "-5")])
def test_bad_sampling_flags(tiny_checkpoint, flag, value):
    proc = homerun("run", tiny_checkpoint, "hi", flag, value)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and flag.lstrip("-").split("-")[0] in proc.stderr
    assert "Loaded" not in proc.stderr


def test_run_on_a_missing_local_path_does_not_suggest_download(tmp_path):
    missing = tmp_path / "nope"
    assert_clean_error(homerun("run", missing, "hi"), 2, str(missing), "no such", absent=("homerun download",))
    assert_clean_error(homerun("run", "./nope", "hi"), 2, "nope", absent=("homerun download ./nope",))


# ------------------------------------------------------------------------------------------------ bench


def _bench_inputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "config.json").write_text("{bad json")
    notdict = tmp_path / "listcfg"
    notdict.mkdir()
    (notdict / "config.json").write_text("[1, 2]")
    return {"missing": (tmp_path / "missing", "missing"), "empty": (empty, "config.json"),
            "invalid": (bad, "config.json"), "not-an-object": (notdict, "config.json")}


@pytest.mark.parametrize("case", ["missing", "empty", "invalid", "not-an-object"])
def test_bench_bad_model_fails_before_measuring(tmp_path, case):
    path, needle = _bench_inputs(tmp_path)[case]
    err = assert_clean_error(homerun("bench", path, "-p", "4", "-n", "2", "-r", "1"), 2, needle)
    assert "measuring" not in err


# ------------------------------------------------------------------------------------------------ plan


def test_plan_on_a_missing_local_path_does_not_talk_about_the_hub(tmp_path):
    for arg in (str(tmp_path / "does" / "not" / "exist"), "./does/not/exist", "~/no-such-homerun-model"):
        assert_clean_error(homerun("plan", arg, "--hw", "rtx5090-192gb"), 2, "no such", absent=("Hub", "hub"))


def test_plan_hub_on_an_unreachable_hub_says_so():
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    err = assert_clean_error(homerun("plan", "--hub", "V4-Flash", "--hw", "rtx5090-192gb", env=env), 2, "Hub",
                             absent=("not a shipped card", "HF_HUB_OFFLINE=1"))
    assert "drop --hub" in err
    offline = homerun("plan", "--hub", "V4-Flash", "--hw", "rtx5090-192gb", env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(offline, 2, "HF_HUB_OFFLINE", absent=("not a shipped card",))


def test_plan_depth_beyond_the_context_is_refused():
    assert_clean_error(homerun("plan", "v4-flash", "--hw", "rtx5090-192gb", "--depth", "99999999999"), 2,
                       "--depth", "99,999,999,999", "1,048,576")
    assert_clean_error(homerun("plan", "v4-flash", "--hw", "rtx5090-192gb", "--context", "8192", "--depth", "9000"),
                       2, "--depth", "8,192")
    ok = homerun("plan", "v4-flash", "--hw", "rtx5090-192gb", "--context", "8192", "--depth", "8192", "--json")
    assert ok.returncode == 0, ok.stderr
