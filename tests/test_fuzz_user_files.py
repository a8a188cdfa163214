"""Property-based fuzzing (issue 15) of parsers that read user files: whatever bytes a profile TOML, a routing trace,
a chat history, `measured.json` or a checkpoint's `config.json` holds, only HomerunError subclasses may escape.
HOMERUN_FUZZ_EXAMPLES sets the examples per parser (default 25 to keep the suite fast; the issue's goal is 10,000)."""

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homerun.errors import HomerunError

EXAMPLES = int(os.environ.get("HOMERUN_FUZZ_EXAMPLES", "25"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                       max_size=4), max_leaves=12)
# Raw bytes, JSON-ish text, and near-valid documents: each parser sees garbage and plausible-but-wrong input.
raw = st.binary(max_size=300)


def _write(tmp_path_factory, name, data):
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    return path


def _only_homerun_errors(fn, *args):
    try:
        fn(*args)
    except HomerunError:
        pass


def _toml_like():
    from profiles import profile_path

    base = profile_path("rtx5090-192gb").read_text()
    lines = base.splitlines()
    return st.one_of(raw.map(bytes), st.text(max_size=200),
                     st.lists(st.sampled_from(lines), max_size=len(lines)).map("\n".join),
                     st.tuples(st.sampled_from(lines), json_values).map(lambda t: base + f"\n{t[0].split('=')[0]}= "
                                                                           f"{json.dumps(t[1])}\n"))


@fuzz
@given(data=st.data())
def test_profile_toml(tmp_path_factory, data):
    from profiles import load_profile_file

    path = _write(tmp_path_factory, "p.toml", data.draw(_toml_like()))
    _only_homerun_errors(load_profile_file, path)


@fuzz
@given(body=st.one_of(raw, st.lists(json_values.map(json.dumps), max_size=5).map("\n".join),
                      st.lists(st.fixed_dictionaries({"token": json_values, "layer": json_values,
                                                      "experts": json_values}).map(json.dumps), max_size=4)
                      .map(lambda ls: "\n".join(['{"model": "m", "n_layers": 2, "n_experts": 4, "top_k": 2}', *ls]))))
def test_routing_trace(tmp_path_factory, body):
    from offload.trace import read_trace

    _only_homerun_errors(read_trace, _write(tmp_path_factory, "t.jsonl", body))


@fuzz
@given(body=st.one_of(raw, json_values.map(json.dumps),
                      st.fixed_dictionaries({"format": st.just("homerun-chat"), "messages": json_values,
                                             "think": json_values, "system": json_values}).map(json.dumps)))
def test_chat_history(tmp_path_factory, body):
    from homerun.chat.session import is_history_file, load_history

    path = _write(tmp_path_factory, "h.json", body)
    is_history_file(path)
    _only_homerun_errors(load_history, path)


@fuzz
@given(body=st.one_of(raw, json_values.map(json.dumps),
                      st.fixed_dictionaries({"schema_version": st.just(1)},
                                            optional={"bandwidth_gbps": json_values, "efficiency": json_values,
                                                      "expert_cache_hit_rate": json_values}).map(json.dumps)))
def test_measured_json(tmp_path_factory, body):
    from homerun.plan.hardware import load_measured

    _only_homerun_errors(load_measured, _write(tmp_path_factory, "measured.json", body))


@fuzz
@given(body=st.one_of(raw, json_values.map(json.dumps)))
def test_checkpoint_config_precheck(tmp_path_factory, body):
    from homerun.cli.checks import check_checkpoint_dir

    path = _write(tmp_path_factory, "config.json", body)
    _only_homerun_errors(lambda: check_checkpoint_dir(str(path.parent), need_tokenizer=True))
