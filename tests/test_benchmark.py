"""`homerun bench` (homerun/bench/model_bench.py, homerun/cli/commands/bench.py, homerun/bench/synthetic.py) on tiny checkpoints:
output formats carry llama-bench's fields, the correctness gate passes on the real path and fails on a perturbed
backend, cold/warm cache records, --synthetic on a shrunken card, measured.json. Timing never decides pass/fail."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from typer.testing import CliRunner

from homerun.bench import run as bench_run
from homerun.cli.commands import bench as bc
from homerun.bench import setup as bs
from homerun.bench import model_bench as hb
from homerun.bench import records as bench_records
from homerun.errors import DoesNotFitError, UsageError
from offload.base import ExpertBackend

QUICK = ["-p", "16", "-n", "4", "-r", "2"]
LLAMA_FIELDS = ("n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts", "samples_ts", "test_time", "cpu_info",
                "gpu_info", "model_size", "model_n_params", "build_commit")
# The card's real config with tiny shapes: exercises the synthetic path in seconds instead of minutes.
TINY_SHAPES = {"vocab_size": 512, "hidden_size": 256, "num_attention_heads": 4, "head_dim": 128, "q_lora_rank": 128,
               "o_lora_rank": 128, "o_groups": 2, "moe_intermediate_size": 128, "index_n_heads": 16,
               "index_head_dim": 128, "n_routed_experts": 8, "num_experts_per_tok": 2, "index_topk": 16}


@pytest.fixture(autouse=True)
def _fast_dram(monkeypatch):
    # The real reader scans >= 256 MiB per pass; one test below runs it for real.
    monkeypatch.setattr(bs, "measure_dram_read_gbps", lambda reps=5: 10.0)


def _invoke(*args: str):
    from homerun.cli.app import app

    return CliRunner().invoke(app, ["bench", *args])


class PerturbingBackend(ExpertBackend):
    """A fast wrong build: the right experts, outputs scaled by 1.5."""

    def __init__(self, inner):
        self.inner = inner

    def forward(self, layer, x, expert_ids, expert_weights):
        return self.inner.forward(layer, x, expert_ids, expert_weights) * 1.5


@pytest.fixture(scope="module")
def records(tiny_checkpoints):
    from homerun.plan.hardware import detect

    prof, _ = detect(measure=False)
    opts = hb.BenchOptions(tests=tuple(hb.build_tests([16], [4], [0])), repetitions=2)
    return bench_run.bench_model(tiny_checkpoints["mixed"], opts, model_name="tiny", profile=prof,
                          limits=bench_records.Limits(dram_read_gbps=10.0, source="test"))


# ------------------------------------------------------------------------------------------------ test lists


def test_tests_are_the_llama_bench_product():
    tests = hb.build_tests([16, 64], [4], [0, 32])
    assert [t.name for t in tests] == ["pp16", "pp64", "tg4", "pp16 @ d32", "pp64 @ d32", "tg4 @ d32"]
    assert bc.parse_ints(["16,64", "512"], "-p") == [16, 64, 512]
    with pytest.raises(UsageError):
        bc.parse_ints(["12x"], "-p")
    with pytest.raises(UsageError):
        bc.parse_ints(["0"], "--expert-cache-slots", minimum=1)


# ----------------------------------------------------------------------------------------------------- records


def test_records_carry_fields_physics_and_gate(records, tiny_checkpoints):
    from homerun.formats.loader import open_checkpoint

    ck = open_checkpoint(tiny_checkpoints["mixed"])
    bpe = ck.expert(1, 0).nbytes
    assert [(r.test, r.cache) for r in records] == [("pp16", "warm"), ("tg4", "warm")]
    for r in records:
        d = r.to_dict()
        for key in LLAMA_FIELDS:
            assert key in d, key
        assert len(d["samples_ts"]) == 2 and d["avg_ts"] > 0
        assert d["avg_ts"] == pytest.approx(sum(d["samples_ts"]) / 2)
        assert d["correctness"]["ok"] is True and d["correctness"]["max_rel_err"] <= d["correctness"]["tol"]
        dram = d["links"]["dram"]
        assert dram["bytes"] > 0 and dram["limit_gbps"] == 10.0
        assert dram["ratio"] == pytest.approx(dram["gbps"] / 10.0)
    tg = records[1]
    # tg: each of 4 tokens x 2 repetitions reads top-k (2) distinct experts in each of the 3 MoE layers, plus weights
    assert tg.links["dram"].bytes > 4 * 2 * 3 * 2 * bpe
    assert tg.predicted_ts and tg.prediction_ratio == pytest.approx(tg.avg_ts / tg.predicted_ts)


def test_pp_records_carry_gflops_against_the_units_peak(records):
    """pp tests: the linears' GFLOP/s, the units they ran on, and the peak those units reach (between the units' own
    peaks), with peak_ratio = gflops / peak_gflops; tg tests carry none of it."""
    from homerun.bench.model_bench import combined_peak

    pp, tg = records
    d = pp.to_dict()
    assert d["gflops"] > 0 and d["units"]["experts"] in ("int8", "bf16", "fp32")
    assert d["units"]["dense"] in ("fp32", "bf16")
    assert set(d["peak_gops"]) == {"int8", "bf16", "fp32"}
    used = [d["peak_gops"][d["units"][k]] for k in ("dense", "experts")]
    if all(used):
        assert min(used) <= d["peak_gflops"] <= max(used)
        assert d["peak_ratio"] == pytest.approx(d["gflops"] / d["peak_gflops"])
    else:
        assert d["peak_gflops"] is None and d["peak_ratio"] is None
    assert tg.gflops is None and tg.units is None and tg.peak_ratio is None
    # dense 1 GFLOP at 100 GFLOP/s, experts 3 at 300: 4 GFLOP in 2 x 10 ms = 200 GFLOP/s
    assert combined_peak(1e9, 3e9, {"dense": "fp32", "experts": "int8"}, {"fp32": 100.0, "int8": 300.0}) == 200.0
    assert combined_peak(1e9, 3e9, {"dense": "bf16", "experts": "int8"}, {"bf16": None, "int8": 300.0}) is None


CPU_FIELDS = ("samples_cpu_s", "cpu_s", "tokens_per_cpu_s", "cpu_ts", "cpu_cores_used", "prediction_ratio_cpu")


def test_records_carry_cpu_time_beside_wall_time(records):
    """pp and tg records carry the process CPU time of each repetition and the figures on that basis (the steady
    ones on a shared host), in the JSON, the CSV and the table; the values' relations, not their sizes."""
    from homerun.bench.report import CSV_FIELDS, TABLE_COLUMNS, flat, table_row

    for r in records:
        d = r.to_dict()
        assert all(k in d for k in CPU_FIELDS) and all(k in CSV_FIELDS for k in CPU_FIELDS)
        assert len(d["samples_cpu_s"]) == 2 and d["cpu_s"] == pytest.approx(sum(d["samples_cpu_s"]) / 2)
        n = d["n_prompt"] or d["n_gen"]
        assert d["tokens_per_cpu_s"] == pytest.approx(2 * n / sum(d["samples_cpu_s"]))
        assert d["cpu_ts"] == pytest.approx(d["tokens_per_cpu_s"] * d["n_threads"])
        assert d["cpu_cores_used"] == pytest.approx(sum(d["samples_cpu_s"]) / (sum(d["samples_ns"]) / 1e9), rel=1e-3)
        if d["predicted_ts"]:
            assert d["prediction_ratio_cpu"] == pytest.approx(d["cpu_ts"] / d["predicted_ts"])
        assert len(flat(d)["samples_cpu_s"].split()) == 2
        row = dict(zip(TABLE_COLUMNS, table_row(d)))
        assert row["CPU-time t/s (cores used)"].startswith(f"{d['cpu_ts']:.2f} (")


def test_cpu_time_fields_from_samples_and_the_prediction():
    s = [bench_records.Sample(2.0, 0, 0, 0, 0, 1, cpu_seconds=3.0), bench_records.Sample(2.0, 0, 0, 0, 0, 1, 5.0)]
    got = bench_records.cpu_time_fields(s, n_tokens=16, n_threads=2)
    assert got == {"samples_cpu_s": [3.0, 5.0], "cpu_s": 4.0, "tokens_per_cpu_s": 4.0, "cpu_ts": 8.0,
                   "cpu_cores_used": 2.0}
    none = bench_records.cpu_time_fields([bench_records.Sample(2.0, 0, 0, 0, 0, 1)], 16, 2)
    assert none["cpu_s"] is None and none["cpu_ts"] is None and none["cpu_cores_used"] is None


def test_flops_split_adds_up(tiny_checkpoints):
    import homerun
    from homerun.bench.model_bench import linear_flops_per_token, linear_flops_split

    m = homerun.load(tiny_checkpoints["mixed"])
    dense, experts = linear_flops_split(m.net)
    a = m.net.args
    assert experts == 2.0 * len(m.net.layers) * a.n_activated_experts * 3 * a.dim * a.moe_inter_dim
    assert dense > 0 and linear_flops_per_token(m.net) == dense + experts


def test_counting_backend_counts_unique_experts_per_call():
    class Zero(ExpertBackend):
        def forward(self, layer, x, ids, w):
            return torch.zeros_like(x)

    c = hb.CountingBackend(Zero(), bytes_per_expert=100)
    c.forward(0, torch.zeros(3, 4), torch.tensor([[1, 2], [2, 3], [1, 3]]), torch.ones(3, 2))
    assert (c.calls, c.expert_loads, c.expert_bytes) == (1, 3, 300)


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "md"])
def test_output_formats_parse(records, fmt, capsys):
    docs = [r.to_dict() for r in records]
    bc.emit(bc.Output(fmt == "json"), docs, fmt)
    text = capsys.readouterr().out
    if fmt == "json":
        rows = json.loads(text)
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in text.splitlines()]
    elif fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        assert [float(x) for x in rows[0]["samples_ts"].split()] == pytest.approx(docs[0]["samples_ts"], rel=1e-5)
    else:
        lines = [ln for ln in text.splitlines() if ln.startswith("|")]
        head = [c.strip() for c in lines[0].strip("|").split("|")]
        rows = [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
        assert rows[1]["test"] == "tg4" and "±" in rows[1]["t/s"] and rows[1]["gate"] == "ok"
        return
    assert len(rows) == 2
    for key in LLAMA_FIELDS:
        assert key in rows[0], key
    assert float(rows[1]["avg_ts"]) == pytest.approx(docs[1]["avg_ts"])


# ----------------------------------------------------------------------------------------------------- the gate


def test_gate_passes_on_real_path_and_fails_on_a_wrong_backend(tiny_checkpoint):
    from offload.base import ReferenceExpertBackend

    ref, label = hb.load_reference(tiny_checkpoint, resident_bytes=0)
    assert isinstance(ref.net.experts, ReferenceExpertBackend) and "fp32" in label  # whatever the runtime's default
    for act in ("fp32", "auto"):  # exact kernels, then the default mode (int8 blocks where a SIMD kernel exists)
        target, _, _ = bs.open_target(tiny_checkpoint, kind="native", act=act)
        good = hb.correctness_gate(target.model, ref, act=target.act)
        assert good["ok"] is True and good["tol"] == (hb.GATE_TOL_INT8 if target.act == "int8" else 1e-3)
        target.model.net.experts = PerturbingBackend(target.model.net.experts)
        bad = hb.correctness_gate(target.model, ref, act=target.act)
        assert bad["ok"] is False and bad["max_rel_err"] > bad["tol"]


def test_cli_gate_failure_is_loud_and_exits_1(tiny_checkpoint, monkeypatch):
    real = bs.make_expert_backend

    def wrong(*args, **kwargs):
        factory, label, notes = real(*args, **kwargs)
        return (lambda: PerturbingBackend(factory())), label, notes

    monkeypatch.setattr(bs, "make_expert_backend", wrong)
    r = _invoke(str(tiny_checkpoint), "-p", "0", "-n", "2", "-r", "1", "--json")
    assert r.exit_code == 1 and isinstance(r.exception, bc.GateFailed)
    docs = json.loads(r.stdout)
    assert docs and all(d["correctness"]["ok"] is False for d in docs)
    from rich.console import Console

    console = Console(record=True, width=300)
    bc.render_table(console, docs)
    text = console.export_text()
    assert "CORRECTNESS GATE FAILED" in text
    assert any("tg2" in line and "FAIL" in line for line in text.splitlines())  # the row itself says FAIL


# ------------------------------------------------------------------------------------------------- CLI runs


def test_cli_json_with_expert_cache_cold_and_warm(tiny_checkpoint):
    r = _invoke(str(tiny_checkpoint), "-p", "16", "-n", "4", "-r", "2", "--expert-cache-slots", "4", "--json")
    assert r.exit_code == 0, r.output
    docs = json.loads(r.stdout)
    assert [(d["test"], d["cache"]) for d in docs] == [("pp16", "cold"), ("pp16", "warm"), ("tg4", "cold"),
                                                         ("tg4", "warm")]
    for d in docs:
        assert d["expert_cache_slots"] == 4 and 0.0 <= d["hit_rate"] <= 1.0
        assert set(d["links"]) == {"dram", "vram", "pcie"} and d["correctness"]["ok"] is True
    assert len(docs[0]["samples_ts"]) == 1 and len(docs[1]["samples_ts"]) == 2


def test_cli_holds_records_to_the_better_dram_measurement(tiny_checkpoint, monkeypatch):
    """DRAM read is measured before and after the run; the records use the better figure (a shared machine's
    bandwidth drifts), say so, and on this machine's profile the prediction follows it."""
    figures = iter([10.0, 20.0])
    monkeypatch.setattr(bs, "measure_dram_read_gbps", lambda reps=5: next(figures))
    r = _invoke(str(tiny_checkpoint), "-p", "0", "-n", "4", "-r", "2", "--json")
    assert r.exit_code == 0, r.output
    (doc,) = json.loads(r.stdout)
    dram = doc["links"]["dram"]
    assert dram["limit_gbps"] == 20.0 and dram["ratio"] == pytest.approx(dram["gbps"] / 20.0)
    assert doc["limits"]["dram_read_gbps"] == 20.0 and "10.0 GB/s before and 20.0 after" in doc["limits"]["source"]
    figures = iter([10.0, 20.0])
    slow = _invoke(str(tiny_checkpoint), "-p", "0", "-n", "4", "-r", "2", "--json")
    monkeypatch.setattr(bs, "measure_dram_read_gbps", lambda reps=5: 10.0)  # the same before and after
    same = _invoke(str(tiny_checkpoint), "-p", "0", "-n", "4", "-r", "2", "--json")
    (a,), (b,) = json.loads(slow.stdout), json.loads(same.stdout)
    assert b["links"]["dram"]["limit_gbps"] == 10.0
    assert a["predicted_ts"] > b["predicted_ts"]  # twice the bandwidth: a faster plan


def test_cli_save_measured_feeds_the_planner(tiny_checkpoint, tmp_path):
    from homerun.plan.hardware import efficiency_from, load_measured

    r = _invoke(str(tiny_checkpoint), "-p", "0", "-n", "2", "-r", "1", "--save-measured", "-o", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert rows[0]["test"] == "tg2" and rows[0]["correctness_ok"] == "True"
    m = load_measured()  # validates the schema
    assert m is not None and m.bandwidth_gbps["dram_read"] == 10.0
    assert 0 < m.efficiency["dram"] <= 1 and efficiency_from(m).dram == m.efficiency["dram"]


def test_cli_usage_errors(tiny_checkpoint):
    assert isinstance(_invoke().exception, UsageError)
    assert isinstance(_invoke(str(tiny_checkpoint), "--kernels").exception, UsageError)
    assert isinstance(_invoke(str(tiny_checkpoint), "-o", "xml").exception, UsageError)


def test_plot_needs_matplotlib(tiny_checkpoint, monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    r = _invoke(str(tiny_checkpoint), *QUICK, "--plot", str(tmp_path / "x.png"))
    assert isinstance(r.exception, UsageError) and "matplotlib" in r.exception.message


def test_plot_writes_png(records, tmp_path):
    pytest.importorskip("matplotlib")
    docs = [r.to_dict() for r in records]
    out = tmp_path / "b.png"
    bc.render_plot(docs, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dram_reader_measures_something(monkeypatch):
    monkeypatch.undo()  # the real STREAM-like reader, once
    assert bs.measure_dram_read_gbps(reps=1) > 0


# ---------------------------------------------------------------------------------------------------- synthetic


def test_layer_mix_follows_the_card():
    from homerun.bench.synthetic import card_config, layer_mix, layers_that_fit

    for card in ("deepseek-ai/DeepSeek-V4-Flash", "v4-pro"):
        _, cfg = card_config(card)
        assert layer_mix(cfg, 1) == [4]  # CSA first on the tie
        mix = layer_mix(cfg, 6)
        assert mix.count(4) == 3 and mix.count(128) == 3
    _, flash = card_config("v4-flash")
    n, why = layers_that_fit(flash, None, avail_ram_bytes=21 * 2**30, free_disk_bytes=70 * 2**30)
    assert n >= 1 and "per layer" in why
    n_small, _ = layers_that_fit(flash, None, avail_ram_bytes=1 * 2**30, free_disk_bytes=70 * 2**30)
    assert n_small == 1  # at least one layer even when RAM is short
    with pytest.raises(DoesNotFitError):
        layers_that_fit(flash, None, avail_ram_bytes=21 * 2**30, free_disk_bytes=2**30)
    with pytest.raises(UsageError):
        card_config("qwen3-30b")


def test_synthetic_write_reuse_and_real_shapes(tmp_path):
    from homerun.formats.loader import open_checkpoint
    from homerun.bench.synthetic import build_synthetic

    a = build_synthetic("v4-flash", n_layers=2, root=tmp_path, overrides=TINY_SHAPES)
    assert not a.reused and a.compress_ratios == (4, 128) and a.card_layers == 43
    ck = open_checkpoint(a.path)  # complete official layout
    assert ck.config["num_hidden_layers"] == 2 and ck.config["num_hash_layers"] == 0 and not ck.has_mtp
    b = build_synthetic("v4-flash", n_layers=2, root=tmp_path, overrides=TINY_SHAPES)
    assert b.reused and b.path == a.path
    # a same-named directory whose marker names another writer is written again: into a temporary directory renamed
    # into place, so a reader's mapped files (unlinked, not truncated) keep their bytes
    marker = a.path / "homerun-synthetic.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "writer"}))
    shard = next(a.path.glob("*.safetensors"))
    with open(shard, "rb") as fh:
        head = fh.read(64)
        c = build_synthetic("v4-flash", n_layers=2, root=tmp_path, overrides=TINY_SHAPES)
        fh.seek(0)
        assert fh.read(64) == head
    assert not c.reused and c.path == a.path and json.loads(marker.read_text())["writer"] >= 2
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [a.path.name]  # no tmp/old left behind
    # without overrides the card's real per-layer shapes are kept (the config only; nothing is written here)
    from homerun.bench.synthetic import card_config, synthetic_config

    real = synthetic_config(card_config("v4-pro")[1], 1)
    assert (real["hidden_size"], real["n_routed_experts"], real["moe_intermediate_size"]) == (7168, 384, 3072)


def test_cli_synthetic_extrapolates_through_the_plan(tmp_path):
    r = _invoke("v4-flash", "--synthetic", "--synthetic-layers", "2", "--synthetic-dir", str(tmp_path),
                "--synthetic-overrides", json.dumps(TINY_SHAPES), "-p", "16", "-n", "2", "-r", "1", "--json")
    assert r.exit_code == 0, r.output
    docs = json.loads(r.stdout)
    measured = [d for d in docs if not d["extrapolated"]]
    extra = [d for d in docs if d["extrapolated"]]
    assert len(measured) == len(extra) == 2
    for m, e in zip(measured, extra):
        assert m["n_layers"] == 2 and m["synthetic"]["card"] == "deepseek-ai/DeepSeek-V4-Flash"
        assert e["model"] == "deepseek-ai/DeepSeek-V4-Flash" and e["n_layers"] == 43 and e["cache"] == "extrapolated"
        assert e["extrapolation"] and e["links"] == {} and e["model_size"] > 100e9
        assert m["correctness"]["ok"] is True
    tg_m, tg_e = measured[1], extra[1]
    assert "through the plan" in tg_e["extrapolation"]
    assert tg_e["prediction_ratio"] == pytest.approx(tg_m["prediction_ratio"])
    assert tg_e["prediction_ratio_cpu"] == pytest.approx(tg_m["prediction_ratio_cpu"])
    from homerun.kernels import cpu_gemm

    if cpu_gemm.available():  # the detected profile's prefill estimate comes from the peaks measured here
        pp_m, pp_e = measured[0], extra[0]
        assert pp_m["predicted_ts"] and "through the plan" in pp_e["extrapolation"]
        assert pp_e["prediction_ratio"] == pytest.approx(pp_m["prediction_ratio"])
        assert pp_e["prediction_ratio_cpu"] == pytest.approx(pp_m["prediction_ratio_cpu"])
        assert pp_e["cpu_ts"] / pp_m["cpu_ts"] == pytest.approx(pp_e["avg_ts"] / pp_m["avg_ts"])


def test_a_pp_test_is_planned_for_its_whole_prompt():
    """A pp test compares against the plan's prefill estimate for the prompt it runs. It was planned at half its
    prompt (the tg rule, the context in a test's middle), which predicted a prompt half as long: at 32K, a prefill
    estimate 1.05x the right one on Genoa. A tg test keeps the middle of its context."""
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import PlanOptions, plan
    from profiles import load_profile

    prof = load_profile("epyc-genoa-768gb")  # CPU only: its prefill estimate is the depth-dependent CPU one
    pp, tg = bench_records.BenchTest(32768, 0), bench_records.BenchTest(0, 128, 4096)
    at = bs.plan_predictions("deepseek-ai/DeepSeek-V4-Flash", prof, [pp, tg])
    spec, inv = resolve_model("deepseek-ai/DeepSeek-V4-Flash")

    def direct(**kw):
        return plan(spec, inv, prof, PlanOptions(context_tokens=32769, **kw)).predicted

    want = direct(decode_depth_tokens=32768, prefill_prompt_tokens=32768)
    half = direct(decode_depth_tokens=16384, prefill_prompt_tokens=16384)
    assert want["prefill_tok_s"] < half["prefill_tok_s"] * 0.98  # the two readings differ: the test can tell them apart
    assert at(pp)["prefill_tok_s"] == pytest.approx(want["prefill_tok_s"], rel=1e-9)
    assert at(tg)["decode_tok_s"] == pytest.approx(direct(decode_depth_tokens=4096 + 64)["decode_tok_s"], rel=1e-9)


def test_cli_plans_prefill_with_the_better_unit_peaks(tiny_checkpoint, monkeypatch):
    """The CPU unit peaks (the plan's prefill calibration) are measured before and after the run and the pp
    prediction uses each unit's better figure: a ~0.15 s measurement caught under a neighbour's burst read half."""
    from homerun.plan import hardware

    low, high = {"int8": 100.0, "bf16": None, "fp32": 50.0}, {"int8": 200.0, "bf16": None, "fp32": 100.0}

    def run(*figures):
        it = iter(figures)
        monkeypatch.setattr(hardware, "measure_cpu_peaks", lambda: dict(next(it)))
        r = _invoke(str(tiny_checkpoint), "-p", "16", "-n", "0", "-r", "1", "--json")
        assert r.exit_code == 0, r.output
        (doc,) = json.loads(r.stdout)
        return doc["predicted_ts"]

    slow_first, slow_after, steady = run(low, high), run(high, low), run(low, low)
    assert slow_first and steady and slow_first > steady * 1.5  # twice the peaks: a faster prefill plan
    assert slow_first == pytest.approx(slow_after, rel=1e-9)
    assert bc._better_peaks(low, low) is low and bc._better_peaks(low, None) is low
    assert bc._better_peaks(low, {"int8": 300.0, "fp32": 10.0})["fp32"] == 50.0


def test_synthetic_writer_version_is_a_new_directory(tmp_path, monkeypatch):
    """A newer writer writes its own directory and never rewrites an older one's, which another process (an older
    homerun, a running bench) may have mapped."""
    import homerun.formats.checkpoint as ckpt
    from homerun.bench.synthetic import build_synthetic

    a = build_synthetic("v4-flash", n_layers=1, root=tmp_path, overrides=TINY_SHAPES)
    before = {p.name: p.stat().st_mtime_ns for p in a.path.iterdir()}
    monkeypatch.setattr(ckpt, "WRITER_VERSION", ckpt.WRITER_VERSION + 1)
    b = build_synthetic("v4-flash", n_layers=1, root=tmp_path, overrides=TINY_SHAPES)
    assert not b.reused and b.path != a.path
    assert {p.name: p.stat().st_mtime_ns for p in a.path.iterdir()} == before


def test_synthetic_concurrent_builders_write_once(tmp_path):
    """Two processes building one checkpoint at once: one writes it, the other waits on the lock and reuses it."""
    import subprocess
    import sys

    code = ("import json, sys; from homerun.bench.synthetic import build_synthetic; "
            f"m = build_synthetic('v4-flash', n_layers=1, root=sys.argv[1], overrides={TINY_SHAPES!r}); "
            "print(json.dumps([str(m.path), m.reused]))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0][0] == outs[1][0] and sorted(o[1] for o in outs) == [False, True]
