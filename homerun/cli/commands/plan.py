"""`homerun plan MODEL --hw PROFILE`: will it fit, where every byte goes, how fast, how long a context.

Resolves the model (shipped card, local directory or Hub headers), loads or detects the hardware profile, runs the
pure planner and renders the Plan. Exit code 3 (after rendering) when the model does not fit.
"""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from homerun.errors import DoesNotFitError, UsageError


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(
        model: Annotated[str | None, typer.Argument(help="HF repo id or alias of a shipped card, a local checkpoint "
                                                         "directory, or a config.json path.")] = None,
        hw: Annotated[str, typer.Option("--hw", help="Profile name (see `homerun profiles`), a .toml path, or "
                                                     "'auto' to detect this machine.")] = "auto",
        context: Annotated[int | None, typer.Option("--context", min=1, help="Context to reserve KV for "
                                                    "(default: the model's maximum).")] = None,
        kv_dtype: Annotated[str, typer.Option("--kv-dtype", help="KV cache dtype: bf16 or fp8.")] = "bf16",
        prefill_chunk: Annotated[Optional[int], typer.Option("--prefill-chunk", min=1, help="Prefill chunk in tokens "
                                 "(default: the runtime's, 2048 where a GPU runs prefill; on the CPU 512-2048 by the "
                                 "routed experts per token, 1024 for V4-Flash).")] = None,
        depth: Annotated[int, typer.Option("--depth", min=0, help="Context depth for the decode prediction.")] = 4096,
        mtp: Annotated[bool, typer.Option("--mtp", help="Keep the MTP block resident (speculative decoding).")] = False,
        allow_disk: Annotated[bool, typer.Option("--allow-disk", help="Page experts from disk when RAM is short "
                                                                      "(slow).")] = False,
        hit_rate: Annotated[float | None, typer.Option("--hit-rate", min=0.0, max=1.0, help="Override the assumed "
                                                       "GPU expert-cache hit rate.")] = None,
        n_cpu_moe: Annotated[int | None, typer.Option("--n-cpu-moe", help="Impose llama.cpp's placement: the routed "
                                                      "experts of the first N layers on the CPU, the rest in VRAM.")] = None,
        gpu_experts: Annotated[int | None, typer.Option("--gpu-experts", help="Impose KTransformers' placement "
                                                        "(--kt-num-gpu-experts): N experts per MoE layer in VRAM, the "
                                                        "rest on the CPU.")] = None,
        hub: Annotated[bool, typer.Option("--hub", help="Read the real safetensors headers from the Hub (network; "
                                                        "no weights are downloaded).")] = False,
        revision: Annotated[str | None, typer.Option("--revision", help="Hub revision for --hub.")] = None,
        no_measure: Annotated[bool, typer.Option("--no-measure", help="With --hw auto: skip the ~2 s bandwidth "
                                                                      "measurement.")] = False,
        json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
        validate: Annotated[bool, typer.Option("--validate", help="Plan every published measurement "
                                               "(benchmarks/published.json) and print planned vs measured.")] = False,
    ) -> None:
        """Plan MODEL on a hardware profile: placement, memory map, context length and speed.

        Examples:
          homerun plan deepseek-ai/DeepSeek-V4-Flash --hw rtx5090-192gb
          homerun plan v4-pro --hw m3-ultra-512gb --kv-dtype fp8 --json
          homerun plan ./DeepSeek-V4-Flash --hw auto
          homerun plan openai/gpt-oss-120b --hw rtx3090-64gb --n-cpu-moe 26
        """
        from homerun.cli.output import Output

        out = Output(json_out)
        if validate:
            doc = validation_doc()
            out.result(doc, lambda console: render_validation(console, doc))
            return
        if model is None:
            raise UsageError("homerun plan needs a MODEL (or --validate)", hint="e.g. homerun plan v4-flash --hw auto")
        doc, p = build_plan(model, hw=hw, context=context, kv_dtype=kv_dtype, prefill_chunk=prefill_chunk,
                            depth=depth, mtp=mtp, allow_disk=allow_disk, hit_rate=hit_rate, hub=hub,
                            revision=revision, measure=not no_measure, n_cpu_moe=n_cpu_moe, gpu_experts=gpu_experts)
        out.result(doc, lambda console: render_plan(console, doc))
        if not p.fits:
            raise DoesNotFitError(p.remedy or "does not fit", hint=_no_fit_hint(doc))


def build_plan(model: str, *, hw: str, context: int | None = None, kv_dtype: str = "bf16",
               prefill_chunk: int | None = None,
               depth: int = 4096, mtp: bool = False, allow_disk: bool = False, hit_rate: float | None = None,
               hub: bool = False, revision: str | None = None, measure: bool = True, n_cpu_moe: int | None = None,
               gpu_experts: int | None = None) -> tuple[dict[str, Any], Any]:
    """Resolve, plan, and return (JSON document, Plan). Shared by the command and by tests. `n_cpu_moe` /
    `gpu_experts` impose a peer runtime's expert placement (homerun.plan.records.ExpertPlacement)."""
    from dataclasses import replace

    from homerun.plan.hardware import cpu_peaks_option, efficiency_from, load_measured
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import ExpertPlacement, PlanOptions, distributed_launch, plan, with_distributed
    from profiles import list_profiles, load_profile

    from homerun.cli.checks import check_depth, check_plan_model

    if kv_dtype not in ("bf16", "fp8"):
        raise UsageError(f"--kv-dtype must be bf16 or fp8, got {kv_dtype!r}", hint="use --kv-dtype fp8 to halve KV")
    if n_cpu_moe is not None and gpu_experts is not None:
        raise UsageError("--n-cpu-moe and --gpu-experts both impose the expert placement: give one",
                         hint="--n-cpu-moe N as in llama.cpp, or --gpu-experts N as KTransformers' --kt-num-gpu-experts")
    spec, inv = resolve_model(check_plan_model(model, hub=hub), hub=hub, revision=revision)
    check_depth(depth, context, spec.max_position_embeddings)
    placement = None
    if n_cpu_moe is not None or gpu_experts is not None:
        placement = ExpertPlacement(cpu_moe_layers=n_cpu_moe, gpu_experts_per_layer=gpu_experts)
        bad = placement.problem(spec)
        if bad:
            raise UsageError(bad, hint=f"{spec.name} has {spec.num_layers} layers of {spec.n_routed_experts} routed "
                                       "experts; leave both flags out to let the planner choose")
    measured = load_measured()
    detection = None
    kernel = None
    if hw == "auto":
        from homerun.plan.hardware import cpu_kernel_info, detect

        prof, detection = detect(measure=measure, measured=measured)
        kernel = cpu_kernel_info()
    else:
        prof = load_profile(hw)
    if hit_rate is None and measured is not None:
        hit_rate = measured.expert_cache_hit_rate.get(spec.name)
    opts = PlanOptions(context_tokens=context, kv_dtype=kv_dtype, prefill_chunk_tokens=prefill_chunk,
                       decode_depth_tokens=depth, include_mtp=mtp, allow_disk=allow_disk, hit_rate=hit_rate,
                       efficiency=efficiency_from(measured), cpu_kernel=kernel, expert_placement=placement,
                       cpu_peaks=cpu_peaks_option(detection))
    p = plan(spec, inv, prof, opts)
    doc_extra: dict[str, Any] = {}
    if not p.fits:
        # "In reach" = any shipped single-machine profile; if none holds the model, size a distributed launch.
        reach = [n for n in list_profiles() if plan(spec, inv, load_profile(n), replace(opts, cpu_kernel=None)).fits]
        doc_extra["fits_profiles"] = reach
        if not reach:
            p = with_distributed(p, distributed_launch(spec, inv))
        if not allow_disk:
            disk = plan(spec, inv, prof, replace(opts, allow_disk=True))
            if disk.fits:
                doc_extra["with_allow_disk"] = {"decode_tok_s": disk.predicted.get("decode_tok_s"),
                                                "decode_tok_s_upper_bound": disk.predicted.get("decode_tok_s_upper_bound")}
    doc = p.to_dict()
    doc.update(doc_extra)
    if detection is not None:
        doc["detection"] = detection.to_dict()
    if measured is not None:
        doc["measured_file"] = measured.path
    return doc, p


def _no_fit_hint(doc: dict[str, Any]) -> str:
    parts = []
    disk = doc.get("with_allow_disk")
    if disk and disk.get("decode_tok_s"):
        parts.append(f"--allow-disk pages experts from disk (about {disk['decode_tok_s']:.1f} tok/s)")
    if doc.get("fits_profiles"):
        parts.append("profiles that fit: " + ", ".join(doc["fits_profiles"]))
    elif doc.get("distributed"):
        opt = doc["distributed"]["options"][0]
        parts.append(f"no single machine in reach; e.g. {opt['gpus']}x {opt['gpu']}: {opt['vllm']}")
    return "; ".join(parts) or "try --kv-dtype fp8, a shorter --context, or a bigger profile"


# ---- human rendering ---------------------------------------------------------------------------------------------


def _gib(n: float | int | None) -> str:
    return "-" if n is None else f"{n / 2**30:,.1f} GiB"


def _bar(used: int, capacity: int, margins: int, width: int = 40) -> str:
    if capacity <= 0:
        return ""
    content = max(used - margins, 0)
    c = min(width, round(width * content / capacity))
    m = min(width - c, round(width * margins / capacity))
    over = used > capacity
    color = "red" if over else "green"
    return f"[{color}]{'█' * c}[/{color}][yellow]{'▒' * m}[/yellow][dim]{'·' * (width - c - m)}[/dim]"


def _markup_safe(value: Any) -> Any:
    """The plan document with every string escaped, so data text (names, reasons, notes) is never read as markup."""
    from rich.markup import escape

    if isinstance(value, str):
        return escape(value)
    if isinstance(value, dict):
        return {k: _markup_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_markup_safe(v) for v in value]
    return value


def render_plan(console: Any, doc: dict[str, Any]) -> None:
    from homerun.cli.tables import print_table

    if not console.is_terminal:
        console.soft_wrap = True  # a pipe or a file: long lines stay whole instead of wrapping mid-value
    raw, doc = doc, _markup_safe(doc)
    m, ctx, pred = doc["model"], doc["context"], doc["predicted"]
    style = "bold green" if doc["fits"] else "bold red"
    console.print(f"[{style}]{'FITS' if doc['fits'] else 'DOES NOT FIT'}[/{style}]  {m['name']} on "
                  f"{doc['hardware']['profile']} ({doc['hardware']['description']})")
    console.print(f"  {doc['verdict']}")
    console.print(f"  model: {_gib(m['total_bytes'])} total ({m['source']}); routed experts "
                  f"{_gib(m['routed_expert_bytes'])} = {m['routed_experts']:,} x {m['bytes_per_expert']:,} B; "
                  f"non-expert {_gib(m['non_expert_bytes'])}; MTP {_gib(m['mtp_bytes'])} "
                  f"({'resident' if m['mtp_resident'] else 'skipped'})")
    console.print("\n[bold]Memory[/bold]  [green]█[/green] contents  [yellow]▒[/yellow] margins  [dim]·[/dim] free")
    for d in doc["devices"]:
        margins = sum(d["margins"].values())
        console.print(f"  {d['name']:<28} {_bar(d['used_bytes'], d['capacity_bytes'], margins)} "
                      f"{_gib(d['used_bytes'])} / {_gib(d['capacity_bytes'])}"
                      + (f"  (margins: {', '.join(f'{k} {_gib(v)}' for k, v in d['margins'].items())})" if margins else ""))
    print_table(console, "Placement", [("what", "left"), ("device", "left"), ("bytes", "right"), ("reason", "left")],
                [[r["what"], r["device"], _gib(r["bytes"]), r["reason"]] for r in raw["placement"]],
                prose=("what", "reason"))
    ramp = "  ".join(f"{r['tokens'] // 1024}K {'[green]✓[/green]' if r['fits'] else '[red]✗[/red]'}" for r in ctx["ramp"])
    console.print(f"[bold]Context[/bold]  max {ctx['max_tokens']:,} tokens (KV {ctx['kv_bytes_per_token']:,} B/token "
                  f"{ctx['kv_dtype']}; model max {ctx['model_max_tokens']:,})")
    console.print(f"  {ramp}")
    if m["arch"] == "deepseek_v4":
        console.print(f"  Think Max (needs >= 384K): {'available' if ctx['think_max_available'] else 'not available'}")
    _render_speed(console, pred, doc)


def _render_speed(console: Any, pred: dict[str, Any], doc: dict[str, Any]) -> None:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:,.1f}"

    console.print("[bold]Speed[/bold]")
    if pred.get("decode_tok_s") is None:
        console.print(f"  {pred.get('reason', 'not predicted')}")
    else:
        console.print(f"  decode  {f(pred['decode_tok_s'])} tok/s estimated, <= {f(pred['decode_tok_s_upper_bound'])} "
                      f"tok/s bound (at depth {pred['decode_depth_tokens']:,}; bottleneck: {pred['bottleneck']}; "
                      f"expert-cache hit rate {pred['expert_cache_hit_rate']:.2f}, {pred['hit_rate_source']})")
        for link in pred["links"]:
            console.print(f"    {link['name']:<8} {link['bytes_per_token'] / 1e9:8.3f} GB/token at {link['gbps']:,.1f} GB/s"
                          f" = {link['seconds_per_token'] * 1e3:7.2f} ms")
        console.print(f"  prefill {f(pred.get('prefill_tok_s'))} tok/s estimated (chunk {pred.get('prefill_chunk_tokens')})"
                      + ("" if pred.get("prefill_tok_s") else f": {pred.get('prefill_reason', '')}"))
        if "cpu_prefill_reason" in pred:
            _render_cpu_prefill(console, pred)
        eff = pred["efficiency"]
        console.print(f"  efficiency ({eff['source']}): vram {eff['vram']}, dram {eff['dram']}, pcie {eff['pcie']}, "
                      f"gpu compute {eff['gpu_compute']}, per-layer overhead {eff['per_layer_overhead_s'] * 1e6:.0f} µs")
    k = doc["cpu_kernel"]
    console.print(f"  CPU expert kernel: {k.get('path')} ({k.get('reason', '')})")
    for note in doc.get("notes", []):
        console.print(f"  [dim]note: {note}[/dim]")
    if doc.get("remedy"):
        console.print(f"[bold red]Remedy:[/bold red] {doc['remedy']}")
    dist = doc.get("distributed")
    if dist:
        console.print("[bold]Distributed launch[/bold] (no single machine in reach holds this model):")
        for opt in dist["options"]:
            console.print(f"  {opt['gpus']}x {opt['gpu']} ({opt['nodes']} node(s), TP {opt['tensor_parallel']}, "
                          f"PP {opt['pipeline_parallel']}, EP {opt['expert_parallel']}):")
            console.print(f"    {opt['vllm']}")
            console.print(f"    {opt['sglang']}")


def _render_cpu_prefill(console: Any, pred: dict[str, Any]) -> None:
    """The CPU prefill estimate: tok/s, and per token each part's ms at its unit (or why there is none)."""
    tok_s = pred.get("cpu_prefill_tok_s")
    if tok_s is None:
        console.print(f"  CPU prefill -: {pred['cpu_prefill_reason']}")
        return
    units = pred["cpu_prefill_units"]
    parts = ", ".join(f"{k.replace('_', ' ')} {v * 1e3:.1f}" + (f" ({units[k]})" if k in units else "")
                      for k, v in pred["cpu_prefill_seconds_per_token"].items() if v * 1e3 >= 0.05)
    peaks = pred["cpu_peak_gops"]
    console.print(f"  CPU prefill {tok_s:,.2f} tok/s estimated at a {pred['cpu_prefill_prompt_tokens']:,}-token prompt "
                  f"(ms/token: {parts}; peaks GOP/s int8 {peaks['int8']:,.0f}, fp32 {peaks['fp32']:,.0f}"
                  + (f", bf16 {peaks['bf16']:,.0f}" if peaks.get("bf16") else "") + f"; {pred['cpu_peak_source']}; "
                  f"efficiencies: the {pred['cpu_prefill_fit']} fit, {pred['cpu_prefill_fit_reason']})")


def validation_doc() -> dict[str, Any]:
    """The published-measurement table planned row by row (homerun.plan.validate), with the issue-17 summary."""
    from homerun.plan.validate import compare_table, excluded, load_table, summarize

    rows = load_table()
    results = compare_table(rows)
    return {"rows": [c.to_dict() for c in results], "summary": summarize(results),
            "excluded": [{"id": e["id"], "reason": e["reason"]} for e in excluded(rows)]}


def render_validation(console: Any, doc: dict[str, Any]) -> None:
    from rich.table import Table

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    table = Table(title="Planned vs published decode tok/s (benchmarks/published.json)", title_justify="left")
    for col in ("row", "mode plan/stated", "placement", "measured", "bound", "estimate", "est/meas", "bound ok", "hit"):
        table.add_column(col, justify="left" if col in ("row", "mode plan/stated", "placement") else "right")
    for r in doc["rows"]:
        meas = f(r["measured"]) if r["measured"] == r["measured_high"] else f"{r['measured']:g}-{r['measured_high']:g}"
        table.add_row(r["id"], f"{r['planned_mode']}/{r['stated_mode']}", r["placement"], meas, f(r["upper_bound"]),
                      f(r["estimate"]), f(r["ratio"]), "yes" if r["bound_ok"] else "[red]NO[/red]", f(r["hit_rate"]))
    console.print(table)
    s = doc["summary"]
    frac = s["hybrid_within_2x_fraction"]
    console.print(f"bound >= measured: {s['bound_holds']}/{s['rows']} rows; hybrid within 0.5x-2x: "
                  f"{s['hybrid_within_2x']}/{s['hybrid_rows']}" + (f" ({frac:.0%})" if frac is not None else "")
                  + f"; hybrid beyond 3x: {', '.join(s['hybrid_beyond_3x']) or 'none'}; "
                  f"{len(doc['excluded'])} rows excluded (see --json)")
