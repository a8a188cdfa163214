"""One checkpoint benchmarked end to end: the correctness gate first, then per cache setting a load and every
test, each record carrying the machine, the plan's prediction and the links used.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from homerun.bench.model_bench import BenchOptions, correctness_gate, reference_logits, run_test
from homerun.bench.records import BenchRecord, BenchTest, Limits, RunInfo
from homerun.bench.setup import host_info, open_target, plan_predictions, predicted_for


def bench_model(
    path: str | Path,
    opts: BenchOptions,
    *,
    model_name: str,
    profile: Any,
    limits: Limits,
    efficiency: Any = None,
    hit_rate: float | None = None,
    cpu_peaks: dict[str, Any] | None = None,
    make_backend_hook: Callable[[Any], Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BenchRecord]:
    """Benchmark one checkpoint: per cache setting, load, gate, then every test (cold/warm). `make_backend_hook`
    wraps each fresh backend (tests use it to plant a wrong backend and see the gate fail). cpu_peaks: this
    machine's measured CPU unit peaks, for the plan's CPU prefill estimate on a detected profile."""
    say = progress or (lambda msg: None)
    host = host_info()
    plans = plan_predictions(str(path), profile, opts.tests, efficiency=efficiency, hit_rate=hit_rate,
                             cpu_peaks=cpu_peaks)

    def pred(test: BenchTest) -> float | None:
        return predicted_for(test, plans(test))

    ref = None
    if opts.gate:  # first, so the reference model never sits in RAM next to the benchmarked one
        say("correctness gate: reference logits (plain fp32 path)")
        ref = reference_logits(path, _vocab(path), resident_bytes=_resident_estimate(path))
    placement, planned = _placement(path, profile) if opts.standin else (None, ())
    records: list[BenchRecord] = []
    for slots in opts.cache_slots:
        say(f"loading {path} ({opts.kind} experts{'' if slots is None else f', cache of {slots} slots'})")
        target, label, notes = open_target(path, kind=opts.kind, cache_slots=slots, dtype=opts.dtype, act=opts.act,
                                           placement=placement, graphs=opts.cuda_graphs)
        if make_backend_hook is not None:
            target.make_backend = (lambda inner: (lambda: make_backend_hook(inner())))(target.make_backend)
            target.fresh_backend()
        gate: dict[str, Any] = {"ok": None, "skipped": True}
        if ref is not None:
            say("correctness gate: benchmarked path")
            gate = correctness_gate(target.model, lambda ids: ref[0], reference_label=ref[1], act=target.act)
        info = _run_info(target.model, path, model_name=model_name, label=label, profile=profile, slots=slots,
                         limits=limits, gate=gate, notes=tuple(notes))
        info = replace(info, planned_device_bytes=planned)
        for test in opts.tests:
            say(f"{test.name}: {opts.repetitions} repetitions")
            records += run_test(target, test, repetitions=opts.repetitions, seed=opts.seed, info=info,
                                predicted_ts=pred(test), host=host)
        target.backend.close()
        del target
    return records


def _placement(path: str | Path, profile: Any) -> tuple[Any, tuple[int, ...]]:
    """The profile's plan for this checkpoint as a placement on CUDA stand-ins, and the plan's bytes per GPU."""
    from homerun.engine.placement import placement_from_plan
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import plan

    p = plan(*resolve_model(str(path)), profile)
    doc = p.to_dict()
    gpus = [st["device"] for st in doc["layout"]["stages"] if st["kind"] == "gpu"]
    planned = tuple(sum(r["bytes"] for r in doc["placement"] if r["device"] == g) for g in gpus)
    return placement_from_plan(p, standin="cuda"), planned


def _vocab(path: str | Path) -> int:
    import json

    return int(json.loads((Path(path) / "config.json").read_text())["vocab_size"])


def _resident_estimate(path: str | Path) -> int:
    """Non-expert bytes of a checkpoint from its headers (what the reference would dequantize)."""
    from homerun.formats.loader import open_checkpoint

    ckpt = open_checkpoint(Path(path))
    return sum(ckpt.stored(n).nbytes for n in ckpt.names if ".experts." not in n and not n.startswith("mtp."))


def _run_info(model: Any, path: str | Path, *, model_name: str, label: str, profile: Any, slots: int | None,
              limits: Limits, gate: dict[str, Any], notes: tuple[str, ...]) -> RunInfo:
    from homerun.plan.inventory import resolve_model

    spec, inv = resolve_model(str(path))
    n_params = sum(v for k, v in inv.params_by_class.items() if k != "mtp")
    size = inv.total_bytes - inv.mtp_bytes
    size_label = f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M"
    mtype = f"{spec.arch} {size_label} {spec.expert_format} experts"
    on_gpu = model.device.type == "cuda"
    return RunInfo(model=model_name, model_type=mtype, model_size=size, model_n_params=n_params,
                   n_layers=model.args.n_layers, backend=label, profile=getattr(profile, "name", str(profile)),
                   gpu_experts=(slots or 0) if on_gpu else 0, expert_cache_slots=slots, limits=limits,
                   correctness=gate, notes=notes)
