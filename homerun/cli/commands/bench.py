"""`homerun bench`: llama-bench-style model benchmarks with physics, a correctness gate and `--synthetic`, plus
`--kernels` (the CPU expert kernels alone: homerun.kernels.kernel_bench).

MODEL is a checkpoint directory, or with `--synthetic` a shipped V4 card (repo id or alias): a random-weight model
with the card's real per-layer shapes is written (or reused) and measured, and the full model's figures are
extrapolated through the plan (rows marked "extrapolated"). Every run checks the benchmarked path's logits against
the plain fp32 reference path; a mismatch is flagged in the table and the JSON and exits with code 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional, Sequence

import typer

from homerun.errors import HomerunError, UsageError
from homerun.bench.report import (  # noqa: F401 - renderers; tests reach them through this module
    CSV_FIELDS, OUTPUT_FORMATS, TABLE_COLUMNS, _footer, need_matplotlib, render_csv, render_md, render_plot, table_row)
from homerun.cli.output import Output



class GateFailed(HomerunError):
    """The benchmarked path's logits differ from the reference: its speed means nothing (exit code 1)."""


def parse_ints(values: Sequence[str] | None, flag: str, *, minimum: int = 0) -> list[int]:
    """llama-bench list syntax: repeated flags and/or comma-separated values (`-p 16,64 -p 512`)."""
    out = []
    for v in values or []:
        for part in str(v).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                n = int(part)
            except ValueError:
                raise UsageError(f"{flag}: {part!r} is not an integer", hint=f"e.g. {flag} 16,64") from None
            if n < minimum:
                raise UsageError(f"{flag}: {n} is below {minimum}", hint=f"{flag} takes token counts >= {minimum}")
            out.append(n)
    return out


# ------------------------------------------------------------------------------------------------------ command


def bench(
    model: Annotated[Optional[str], typer.Argument(help="Checkpoint directory; with --synthetic a shipped V4 card "
                                                         "(deepseek-ai/DeepSeek-V4-Flash, v4-pro, ...).")] = None,
    n_prompt: Annotated[Optional[list[str]], typer.Option("-p", "--n-prompt", help="Prompt sizes (pp tests), "
                                                          "comma-separated or repeated; 0 for none.")] = None,
    n_gen: Annotated[Optional[list[str]], typer.Option("-n", "--n-gen", help="Generated tokens (tg tests), "
                                                       "comma-separated or repeated; 0 for none.")] = None,
    depth: Annotated[Optional[list[str]], typer.Option("-d", "--depth", help="Context already filled before each "
                                                       "test, comma-separated or repeated.")] = None,
    repetitions: Annotated[int, typer.Option("-r", "--repetitions", min=1, help="Timed repetitions per test, after a "
                                             "warm-up.")] = 5,
    hw: Annotated[str, typer.Option("--hw", help="Profile for the plan's prediction: a name, a .toml path, or 'auto' "
                                    "(this machine, with the DRAM bandwidth measured here).")] = "auto",
    standin: Annotated[bool, typer.Option("--standin", help="Run the --hw profile's plan placement on CUDA "
                                          "stand-ins (the GPU code path on this CPU); records then carry "
                                          "launches_per_token, host_syncs_per_token and per-device bytes.")] = False,
    cuda_graphs: Annotated[str, typer.Option("--cuda-graphs", help="Decode from captured graphs: auto (on CUDA, and "
                                             "emulated with --standin, wherever capture is possible), on, off "
                                             "(eager: the A/B against graphs).")] = "auto",
    cache_slots: Annotated[Optional[list[str]], typer.Option("--expert-cache-slots", help="GPU expert-cache slots "
                           "(several values: one run each, for hit rate vs cache size). Default: none on CPU, the "
                           "plan's cache with --synthetic on a GPU.")] = None,
    native: Annotated[bool, typer.Option("--native/--reference", help="Expert backend: the native CPU kernels "
                                         "(default, when built) or the plain fp32 reference.")] = True,
    expert_act: Annotated[str, typer.Option("--expert-act", help="Native kernels' activations: auto (int8 blocks "
                                            "where a SIMD int8 kernel exists), fp32 (exact), int8, bf16.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: float32 or bfloat16.")] = "float32",
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="json, jsonl, csv or md (default: a table).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Same as --output json.")] = False,
    save_measured: Annotated[bool, typer.Option("--save-measured", help="Write measured bandwidths, efficiencies "
                                                "and hit rates to $HOMERUN_HOME/measured.json for `plan --hw auto`.")] = False,
    plot: Annotated[Optional[str], typer.Option("--plot", help="Write a PNG: tok/s vs depth, or hit rate vs cache "
                                                "size (needs matplotlib).")] = None,
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Measure a random-weight model with the card's real "
                                            "per-layer shapes and extrapolate to the full model.")] = False,
    synthetic_layers: Annotated[Optional[int], typer.Option("--synthetic-layers", min=1, help="Layers to write "
                                "(default: as many as free RAM and disk hold).")] = None,
    synthetic_dir: Annotated[Optional[str], typer.Option("--synthetic-dir", help="Where synthetic checkpoints live "
                             "(default: $HOMERUN_HOME/synthetic).")] = None,
    synthetic_overrides: Annotated[Optional[str], typer.Option("--synthetic-overrides", hidden=True,
                                   help="Test only: JSON config fields that shrink the synthetic shapes.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic weights and test tokens.")] = 0,
    kernels: Annotated[bool, typer.Option("--kernels", help="Benchmark the CPU expert kernels alone.")] = False,
    path: Annotated[str, typer.Option(help="--kernels: kernel path (auto, avx512, avx2, portable, torch).")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="--kernels: threads (default: all usable CPUs).")] = None,
    reps: Annotated[int, typer.Option(min=1, help="--kernels: repetitions per figure (best is reported).")] = 3,
    experts: Annotated[int, typer.Option(min=1, help="--kernels: distinct experts to cycle.")] = 64,
) -> None:
    """Benchmark a model like llama-bench (pp512/tg128, avg ± sd), with the physics behind the numbers.

    Examples:
      homerun bench ./DeepSeek-V4-Flash -p 512 -n 128 -d 0,4096
      homerun bench --synthetic deepseek-ai/DeepSeek-V4-Pro -p 64 -n 16 -r 2 --json
      homerun bench ./ckpt --expert-cache-slots 64,256,1024 --plot hit.png
      homerun bench --kernels
    """
    fmt = "json" if json_out else output
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise UsageError(f"--output {fmt!r} is not a format", hint=f"use one of: {', '.join(OUTPUT_FORMATS)}")
    out = Output(fmt == "json")
    if kernels:
        if model is not None:
            raise UsageError("`bench --kernels` takes no model", hint="run `homerun bench --kernels` alone")
        _bench_kernels(out, path, threads, reps, experts)
        return
    if model is None:
        raise UsageError("bench needs a MODEL (a checkpoint directory, or a V4 card with --synthetic)",
                         hint="e.g. homerun bench --synthetic deepseek-ai/DeepSeek-V4-Flash, or homerun bench --kernels")
    if plot:
        need_matplotlib()
    check_bench_model(model, synthetic)
    records = run_bench_command(
        model, out=out, prompts=parse_ints(n_prompt or ["512"], "-p"), gens=parse_ints(n_gen or ["128"], "-n"),
        depths=parse_ints(depth or ["0"], "-d"), repetitions=repetitions, hw=hw,
        cache_slots=parse_ints(cache_slots, "--expert-cache-slots", minimum=1), kind="native" if native else "reference",
        dtype=dtype, synthetic=synthetic, synthetic_layers=synthetic_layers, synthetic_dir=synthetic_dir,
        synthetic_overrides=_overrides(synthetic_overrides), seed=seed, act=expert_act, standin=standin,
        cuda_graphs=cuda_graphs)
    docs = [r.to_dict() for r in records]
    if save_measured:
        from homerun.bench.setup import save_measured as save

        where, _ = save(records, records[0].limits)
        out.plain(f"measured efficiencies written to {where}")
    if plot:
        render_plot(docs, plot)
        out.plain(f"plot written to {plot}")
    emit(out, docs, fmt)
    failed = [d for d in docs if d["correctness"].get("ok") is False]
    if failed:
        g = failed[0]["correctness"]
        raise GateFailed(f"correctness gate FAILED: logits differ from the plain fp32 reference (max relative error "
                         f"{g['max_rel_err']:.3g} > {g['tol']:.3g}); the speed figures of this path mean nothing",
                         hint="run with --reference to compare, and report the backend that fails")


def check_bench_model(model: str, synthetic: bool) -> None:
    """Fail on a bad MODEL before anything is measured or imported: a V4 card with --synthetic, else a checkpoint
    directory holding a valid config.json."""
    if synthetic:
        from homerun.bench.synthetic import card_config

        card_config(model)
        return
    from homerun.cli.checks import check_checkpoint_dir

    if check_checkpoint_dir(model, need_tokenizer=False) is None:
        raise UsageError(f"{model}: no such directory",
                         hint="bench takes a checkpoint directory, or a shipped V4 card with --synthetic")


def _overrides(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--synthetic-overrides is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError("--synthetic-overrides must be a JSON object")
    return data


def run_bench_command(model: str, *, out: Output, prompts: list[int], gens: list[int], depths: list[int],
                      repetitions: int, hw: str, cache_slots: list[int], kind: str, dtype: str, synthetic: bool,
                      synthetic_layers: int | None, synthetic_dir: str | None,
                      synthetic_overrides: dict[str, Any] | None, seed: int, act: str = "auto",
                      standin: bool = False, cuda_graphs: str = "auto") -> list[Any]:
    """Resolve the profile and limits, write the synthetic model if asked, run the benchmark, extrapolate."""
    from homerun.bench import setup as bs
    from homerun.bench import model_bench as hb
    from homerun.bench import run as bench_run

    if dtype not in ("float32", "bfloat16"):
        raise UsageError(f"--dtype {dtype!r} is not supported", hint="use float32 or bfloat16")
    from homerun.engine.options import GRAPH_MODES

    if cuda_graphs not in GRAPH_MODES:
        raise UsageError(f"--cuda-graphs {cuda_graphs!r} is not a mode", hint=f"use one of {', '.join(GRAPH_MODES)}")
    tests = hb.build_tests(prompts, gens, depths)
    if not tests:
        raise UsageError("no tests: every -p and -n value is 0", hint="e.g. -p 512 -n 128")
    out.info("measuring DRAM read bandwidth")
    prof, limits, eff, measured = _profile_and_limits(hw)
    peaks = _cpu_peaks(hw, tests)
    syn = None
    path = model
    name = Path(model).name or model
    if synthetic:
        from homerun.bench.synthetic import build_synthetic

        with _write_progress(out) as progress:
            syn = build_synthetic(model, n_layers=synthetic_layers, root=synthetic_dir, seed=seed,
                                  overrides=synthetic_overrides, progress=progress)
        verb = "reusing" if syn.reused else f"wrote in {syn.write_s:.0f} s:"
        out.plain(f"synthetic {syn.card}: {verb} {syn.path} ({syn.total_bytes / 1e9:.2f} GB; {syn.reason})")
        path, name = str(syn.path), f"{syn.card} (synthetic, {syn.n_layers}L)"
    slots: list[int | None] = list(cache_slots) or [_default_slots(syn, prof, eff) if syn else None]
    hit = measured.expert_cache_hit_rate.get(syn.card if syn else name) if measured else None
    opts = hb.BenchOptions(tests=tuple(tests), repetitions=repetitions, seed=seed, kind=kind,
                           cache_slots=tuple(slots), dtype=dtype, act=act, standin=standin,
                           cuda_graphs=cuda_graphs)
    records = bench_run.bench_model(path, opts, model_name=name, profile=prof, limits=limits, efficiency=eff, hit_rate=hit,
                                    cpu_peaks=peaks, progress=out.plain)
    records, prof, peaks = _dram_after(records, tests, out=out, hw=hw, prof=prof, limits=limits, eff=eff, hit=hit,
                                       path=path, cpu_peaks=peaks)
    if syn is None:
        return records
    from dataclasses import replace

    meta = syn.to_dict()
    records = [replace(r, synthetic=meta) for r in records]
    full = bs.plan_predictions(syn.card, prof, tests, efficiency=eff, hit_rate=hit, cpu_peaks=peaks)
    mine = bs.plan_predictions(path, prof, tests, efficiency=eff, hit_rate=hit, cpu_peaks=peaks)
    extra = [bs.extrapolate(r, measured_pred=mine(bs.test_of(r)), full_pred=full(bs.test_of(r)))
             for r in records if r.cache == "warm"]
    return records + extra


def _dram_after(records: list[Any], tests: Sequence[Any], *, out: Output, hw: str, prof: Any, limits: Any, eff: Any,
                hit: Any, path: str, cpu_peaks: dict[str, Any] | None = None) -> tuple[list[Any], Any, Any]:
    """Measure DRAM read (and, where the plan uses them, the CPU unit peaks) again after the run and hold the records
    to the better of the two figures: a shared VM's bandwidth drifts by +-20% within minutes, and a limit caught in a
    slow moment put achieved/limit above 1 (a measured 22.7 GB/s against 29.3 achieved). The unit peaks are measured
    in ~0.15 s, so a neighbour's burst halves them (240 against 839 GOP/s int8 on two cores) and the prefill
    prediction with them. On this machine's profile the prediction follows the better figures.
    Returns (records, profile, CPU peaks)."""
    from dataclasses import replace

    from homerun.bench import setup as bs
    from homerun.bench.records import with_dram_limit

    before = limits.dram_read_gbps
    if not records or not before:
        return records, prof, cpu_peaks
    out.info("measuring DRAM read bandwidth again")
    after = bs.measure_dram_read_gbps()
    best = max(before, after)
    source = f"{limits.source}; dram_read: best of {before:.1f} GB/s before and {after:.1f} after the run"
    peaks = _better_peaks(cpu_peaks, _cpu_peaks(hw, tests) if cpu_peaks else None)
    if not (hw == "auto" and (after > before or peaks != cpu_peaks)):  # the prediction stands; only link ratios change
        return [with_dram_limit(r, best, r.predicted_ts, source) for r in records], prof, cpu_peaks
    if after > before:
        prof = replace(prof, cpu=replace(prof.cpu, mem_bw_gbps=round(best, 3)))
    plans = bs.plan_predictions(path, prof, tests, efficiency=eff, hit_rate=hit, cpu_peaks=peaks)
    return [with_dram_limit(r, best, bs.predicted_for(bs.test_of(r), plans(bs.test_of(r))), source)
            for r in records], prof, peaks


def _better_peaks(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """Each unit's larger peak of two measurements (homerun.plan.hardware.best_peaks, the rule `plan --hw auto`
    applies to its rounds); `before` itself when the second measurement raised none, so that callers can tell nothing
    changed."""
    from homerun.plan.hardware import best_peaks

    if not before or not after:
        return before
    best = best_peaks(before, after)
    if best is before:
        return before
    return {**best, "source": f"{before.get('source', 'measured')}; best of before and after the run"}


def _profile_and_limits(hw: str) -> tuple[Any, Any, Any, Any]:
    from dataclasses import replace

    from homerun.bench import setup as bs
    from homerun.plan.hardware import efficiency_from, load_measured

    measured = load_measured()
    eff = efficiency_from(measured)
    if hw == "auto":
        from homerun.plan.hardware import detect

        prof, _ = detect(measure=False, measured=measured)
    else:
        from profiles import load_profile

        prof = load_profile(hw)
    limits = bs.measure_limits(vram_gbps=prof.gpu_list[0].mem_bw_gbps if prof.gpu_list else None)
    if hw == "auto":  # this machine: predict with the bandwidth just measured
        prof = replace(prof, cpu=replace(prof.cpu, mem_bw_gbps=round(limits.dram_read_gbps, 3)))
    return prof, limits, eff, measured


def _cpu_peaks(hw: str, tests: Sequence[Any]) -> dict[str, Any] | None:
    """This machine's CPU unit peaks for the plan's CPU prefill estimate, as `plan --hw auto` measures them: only on
    the detected profile (a named one states its own clock) and only when a test has a prompt to predict."""
    if hw != "auto" or not any(t.n_prompt for t in tests):
        return None
    from homerun.plan.hardware import MEASURED_PEAKS_SOURCE, measure_cpu_peaks

    peaks = measure_cpu_peaks()
    return {**peaks, "source": MEASURED_PEAKS_SOURCE} if peaks else None


def _default_slots(syn: Any, prof: Any, eff: Any) -> int | None:
    """With a GPU, the full model's placement scaled to the synthetic layers: every expert when the plan puts them
    all in VRAM, the plan's per-layer share of its expert cache in hybrid mode; none on a CPU-only machine."""
    import torch

    if not torch.cuda.is_available():
        return None
    from homerun.bench import setup as bs

    full = bs.plan_prediction(syn.card, prof, depth=4096, context_tokens=4096, efficiency=eff)
    n_experts = int(json.loads((syn.path / "config.json").read_text())["n_routed_experts"])
    if full["mode"] == "all-vram":
        return syn.n_layers * n_experts
    if full["mode"] == "hybrid" and full["cache_experts"]:
        return max(1, round(full["cache_experts"] * syn.n_layers / full["n_layers"]))
    return None


def _write_progress(out: Output):
    """A progress bar (bytes, GB/s, ETA) on stderr while the synthetic weights are written; used as
    `with _write_progress(out) as progress:`, `progress(done_bytes, total_bytes, tensor_name)`."""
    from homerun.cli.progress import byte_progress

    return byte_progress(out, "writing synthetic weights")


# ---------------------------------------------------------------------------------------------------- rendering


def emit(out: Output, docs: list[dict[str, Any]], fmt: str | None) -> None:
    if fmt == "json":
        out.result(docs)
    elif fmt == "jsonl":
        for d in docs:
            out.event(d)
    elif fmt == "csv":
        sys.stdout.write(render_csv(docs))
    elif fmt == "md":
        sys.stdout.write(render_md(docs))
    else:
        out.result(docs, lambda console: render_table(console, docs))
    sys.stdout.flush()


















def render_table(console: Any, docs: list[dict[str, Any]]) -> None:
    from rich.markup import escape
    from rich.panel import Panel

    failed = [d for d in docs if d["correctness"].get("ok") is False]
    if failed:
        g = failed[0]["correctness"]
        console.print(Panel(f"[bold]CORRECTNESS GATE FAILED[/bold]: logits differ from the plain fp32 reference "
                            f"(max relative error {g['max_rel_err']:.3g} > {g['tol']:.3g}). These numbers are the "
                            "speed of a wrong build.", style="bold red"))
    from rich.text import Text

    from homerun.cli.tables import print_table

    columns = [(col, "right" if col in ("size", "params", "t/s", "plan t/s", "ratio") else "left")
               for col in TABLE_COLUMNS]
    rows: list[list[Any]] = []
    for d in docs:
        row: list[Any] = list(table_row(d))
        ok = d["correctness"].get("ok")
        row[-1] = Text(row[-1], style="bold red" if ok is False else "green" if ok else "")
        rows.append(row)
    # llama-bench's table is wide: whole on a wide terminal and in a pipe (one line per row), blocks when narrow
    print_table(console, "homerun bench", columns, rows,
                row_styles=["italic dim" if d["extrapolated"] else None for d in docs])
    console.print(f"[dim]{escape(_footer(docs))}[/dim]")
    gpu = next((d for d in docs if d.get("launches_per_token") is not None), None)
    if gpu is not None:  # the same decode token is counted for every record of a run
        console.print(f"[dim]GPU path, per decode token: {gpu['launches_per_token']:.0f} launches, "
                      f"{gpu['host_syncs_per_token']:.0f} host syncs; decode {escape(gpu.get('decode_runner') or '?')}"
                      "[/dim]")
    for note in sorted({n for d in docs for n in d.get("notes", [])}):
        console.print(f"[dim]note: {escape(note)}[/dim]")


# --------------------------------------------------------------------------------------------------------- plot


# ------------------------------------------------------------------------------------------------- --kernels


_ROWS = (
    ("kernel path", "kernel_path", ""),
    ("activations", "activation", ""),
    ("threads", "threads", ""),
    ("CPU", "cpu_info", ""),
    ("DRAM read", "dram_read_gbps", "GB/s"),
    ("FP4 GEMV, V4-Flash experts", "fp4_gemv_gbps", "GB/s"),
    ("  ratio to DRAM read", "fp4_gemv_ratio", ""),
    ("FP4 GEMV, V4-Pro experts", "fp4_gemv_pro_gbps", "GB/s"),
    ("  ratio to DRAM read", "fp4_gemv_pro_ratio", ""),
    ("FP8 GEMV, 128x128 blocks", "fp8_gemv_gbps", "GB/s"),
    ("  ratio to DRAM read", "fp8_gemv_ratio", ""),
    ("fused experts, 1 token x 6 (Flash)", "fused_expert_ms", "ms/layer"),
    ("  effective weight bandwidth", "fused_expert_gbps", "GB/s"),
    ("FP4 GEMV per matrix", "fp4_gemv_tok_s", "tok/s"),
    ("FP4 GEMM batch 64 per matrix", "fp4_gemm_tok_s_b64", "tok/s"),
    ("  speed-up over GEMV per token", "fp4_gemm_speedup_b64", "x"),
    ("FP4 GEMM batch 64, bf16 activations", "fp4_gemm_bf16_tok_s_b64", "tok/s"),
    ("  speed-up over GEMV per token", "fp4_gemm_bf16_speedup_b64", "x"),
    ("int8 peak (VNNI or AVX2), measured", "int8_peak_gops", "GOP/s"),
    ("bf16 peak (AVX512-BF16), measured", "bf16_peak_gflops", "GFLOP/s"),
    ("FP8 dense prefill GEMM, 512 rows", "dense_prefill_gflops", "GFLOP/s"),
    ("fused experts prefill, 64 tok/expert", "expert_prefill_gops_b64", "GOP/s"),
    ("  ratio to int8 peak", "expert_prefill_peak_ratio_b64", ""),
    ("wall time", "test_time_s", "s"),
)


def _render_kernels(data: dict):
    def render(console):
        from rich.text import Text

        from homerun.cli.tables import print_table

        rows = [[label, "n/a" if data[key] is None else str(data[key]), unit] for label, key, unit in _ROWS]
        print_table(console, "CPU expert kernels", [("measure", "left"), ("value", "right"), ("unit", "left")], rows)
        console.print(Text(str(data["note"]), style="dim"))

    return render


def _bench_kernels(out: Output, path: str, threads: Optional[int], reps: int, experts: int) -> None:
    from homerun.kernels.kernel_bench import run_kernel_bench

    result = run_kernel_bench(path=path, threads=threads, reps=reps, n_experts=experts, progress=out.plain)
    data = result.to_dict()
    out.result(data, _render_kernels(data))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
