"""What `homerun bench` runs on and compares against: the expert backends and model loading, the machine's measured
limits, the planner's predictions (and the extrapolation of a few-layer synthetic model to the full one through
them), and the measured efficiencies saved to `$HOMERUN_HOME/measured.json` for `homerun plan --hw auto`.

The timing harness, records and correctness gate live in `homerun.bench.model_bench`. No printing here.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from homerun.kernels.kernel_bench import cpu_info  # noqa: F401 - one CPU description for every record
from homerun.kernels.kernel_bench import measure_dram_read_gbps  # noqa: F401 - bench limits (tests patch it here)

from homerun.bench.model_bench import BenchTarget
from homerun.engine.graph_sites import placement_sites
from homerun.engine.graphs import unsupported_reason
from homerun.bench.records import BenchRecord, BenchTest, Limits, with_prediction


# ------------------------------------------------------------------------------------------ hardware and build


def host_info() -> dict[str, Any]:
    """Hardware and build facts stamped into every record."""
    from homerun.version import __version__

    try:
        from homerun.kernels.cpu_experts import backend_info

        kernel = str(backend_info().get("path", "torch"))
    except Exception:  # noqa: BLE001 - the kernel library is optional
        kernel = "torch"
    cuda = torch.cuda.is_available()
    return {"build_commit": build_commit(), "homerun_version": __version__, "torch_version": torch.__version__,
            "cpu_info": cpu_info(), "gpu_info": gpu_info(), "n_threads": torch.get_num_threads(),
            "kernel_path": kernel, "backends": "CUDA" if cuda else "CPU"}


def build_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def gpu_info() -> str:
    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "none"


# --------------------------------------------------------------------------------------------------- limits


def measure_limits(*, vram_gbps: float | None = None) -> Limits:
    """DRAM read (measured here), pinned H2D (measured when a GPU exists), VRAM (the profile's figure)."""
    from homerun.plan.hardware import measure_h2d_gbps

    dram = measure_dram_read_gbps()
    h2d = measure_h2d_gbps(seconds=0.5) if torch.cuda.is_available() else None
    src = "dram_read: native STREAM-like reader" + ("; h2d: pinned copy" if h2d else "")
    if vram_gbps:
        src += "; vram: profile figure"
    return Limits(dram_read_gbps=dram, h2d_gbps=h2d, vram_gbps=vram_gbps, source=src)


# ------------------------------------------------------------------------------------------- plan & extrapolation


def plan_prediction(model_ref: str, prof: Any, *, depth: int, context_tokens: int, efficiency: Any = None,
                    hit_rate: float | None = None, cpu_peaks: dict[str, Any] | None = None,
                    prompt_tokens: int | None = None) -> dict[str, Any]:
    """The planner's decode/prefill tok/s for a model (path or card) on a profile. A plan that does not fit this
    profile (e.g. the full V4-Pro on a 24 GB machine) is re-planned with enough RAM at the same bandwidths and
    says so: the bandwidths, not the capacity, set the speed being extrapolated. cpu_peaks: this machine's measured
    CPU unit peaks (`PlanOptions.cpu_peaks`), which a detected profile needs for a CPU prefill estimate.
    prompt_tokens: the prompt the prefill estimate is for (`PlanOptions.prefill_prompt_tokens`; None: `depth`)."""
    from homerun.plan.inventory import resolve_model
    from homerun.plan.planner import Efficiency, PlanOptions, plan

    spec, inv = resolve_model(model_ref)
    opts = PlanOptions(context_tokens=max(context_tokens, 4096), decode_depth_tokens=max(depth, 1),
                       efficiency=efficiency or Efficiency(), hit_rate=hit_rate, cpu_peaks=cpu_peaks,
                       prefill_prompt_tokens=prompt_tokens)
    p = plan(spec, inv, prof, opts)
    note = ""
    if not p.fits:
        need_gib = (inv.total_bytes * 1.3) / 2**30 + prof.policy.host_reserve_gib + 8
        bigger = replace(prof, cpu=replace(prof.cpu, ram_gib=max(prof.cpu.ram_gib, need_gib)))
        p = plan(spec, inv, bigger, opts)
        note = (f"{prof.name} lacks the memory for {spec.name}; planned as if it had {need_gib:,.0f} GiB of RAM at "
                "the same bandwidths" if p.fits else
                f"{spec.name} does not fit {prof.name} even with more RAM ({p.remedy}); no plan estimate")
    pred = p.predicted
    return {"decode_tok_s": pred.get("decode_tok_s"), "prefill_tok_s": pred.get("prefill_tok_s"), "mode": p.mode,
            "fits": p.fits, "note": note, "model_size": inv.total_bytes - inv.mtp_bytes,
            "model_n_params": sum(v for k, v in inv.params_by_class.items() if k != "mtp"),
            "n_layers": spec.num_layers, "cache_experts": _cache_experts(p), "name": spec.name}


def _cache_experts(p: Any) -> int:
    """Expert-cache slots of the plan's GPUs, from its layout (0 without a GPU cache)."""
    if p.layout is None:
        return 0
    return sum(s.expert_cache_slots for s in p.layout.stages if s.kind == "gpu")


def plan_predictions(model_ref: str, prof: Any, tests: Sequence[BenchTest], *, efficiency: Any = None,
                     hit_rate: float | None = None, cpu_peaks: dict[str, Any] | None = None) -> Callable[[BenchTest], dict[str, Any]]:
    """plan_prediction for each test, in a context window that holds the longest test; one plan per distinct
    (depth, prompt). A tg test is planned at the context in its middle (its depth plus half its tokens): decode
    speed is a per-token figure at a depth. A pp test is planned for its whole prompt (its depth plus its tokens):
    the plan's prefill estimate is already the mean over a prompt's positions, so handing it half the prompt
    predicted a prompt half as long (at 32K, half the attention and indexer depth)."""
    ctx = max((t.n_depth + t.n_tokens for t in tests), default=0) + 1
    plans: dict[tuple[int, int | None], dict[str, Any]] = {}

    def at(test: BenchTest) -> dict[str, Any]:
        prompt = test.n_depth + test.n_prompt if test.n_prompt else None
        d = prompt if prompt else test.n_depth + test.n_tokens // 2
        if (d, prompt) not in plans:
            plans[(d, prompt)] = plan_prediction(model_ref, prof, depth=d, context_tokens=ctx, efficiency=efficiency,
                                                 hit_rate=hit_rate, cpu_peaks=cpu_peaks, prompt_tokens=prompt)
        return plans[(d, prompt)]

    return at


def predicted_for(test: BenchTest, pred: dict[str, Any]) -> float | None:
    return pred.get("prefill_tok_s") if test.n_prompt else pred.get("decode_tok_s")


def extrapolate(rec: BenchRecord, *, measured_pred: dict[str, Any], full_pred: dict[str, Any]) -> BenchRecord:
    """The full model's figure from a measured few-layer record: through the plan (measured x full/measured
    prediction) where the plan predicts this kind of test, else by layer count (time per token ~ layers)."""
    p_meas, p_full = predicted_for(test_of(rec), measured_pred), predicted_for(test_of(rec), full_pred)
    if p_meas and p_full:
        k = p_full / p_meas
        how = (f"through the plan: measured {rec.n_layers}-layer tok/s x (plan for the full model / plan for the "
               f"{rec.n_layers}-layer model) = x {k:.4f}")
    else:
        k = rec.n_layers / full_pred["n_layers"]
        how = (f"by layer count ({rec.n_layers} -> {full_pred['n_layers']} layers; the plan gives no "
               f"{'prefill' if rec.n_prompt else 'decode'} estimate on this profile)")
    notes = rec.notes + ((full_pred["note"],) if full_pred.get("note") else ())
    return with_prediction(replace(
        rec, model=full_pred["name"], cache="extrapolated", samples_ts=[t * k for t in rec.samples_ts],
        samples_ns=[int(n / k) for n in rec.samples_ns], avg_ts=rec.avg_ts * k, stddev_ts=rec.stddev_ts * k,
        avg_ns=int(rec.avg_ns / k), stddev_ns=int(rec.stddev_ns / k), ms_per_token=rec.ms_per_token / k,
        ms_per_layer=rec.ms_per_token / k / full_pred["n_layers"], model_size=full_pred["model_size"],
        model_n_params=full_pred["model_n_params"], n_layers=full_pred["n_layers"], links={}, hit_rate=None,
        extrapolated=True, extrapolation=how, notes=notes, samples_cpu_s=[c / k for c in rec.samples_cpu_s],
        cpu_s=None if rec.cpu_s is None else rec.cpu_s / k,
        tokens_per_cpu_s=None if rec.tokens_per_cpu_s is None else rec.tokens_per_cpu_s * k,
        cpu_ts=None if rec.cpu_ts is None else rec.cpu_ts * k,
    ), p_full)


def test_of(rec: BenchRecord) -> BenchTest:
    return BenchTest(rec.n_prompt, rec.n_gen, rec.n_depth)


# ------------------------------------------------------------------------------------------- measured efficiencies


def measured_efficiencies(records: Sequence[BenchRecord], *, per_layer_overhead_s: float) -> dict[str, float]:
    """Link efficiencies that make the planner reproduce the warm decode records: bytes moved over the busiest
    link / (its limit x (time - per-layer overhead)), best record per link, capped at 1."""
    eff: dict[str, float] = {}
    for rec in records:
        if rec.cache != "warm" or not rec.n_gen or rec.extrapolated:
            continue
        t_tok = rec.avg_ns / 1e9 / rec.n_gen
        busy = max(t_tok - per_layer_overhead_s * rec.n_layers, t_tok * 0.1)
        for name, link in rec.links.items():
            if link.limit_gbps and link.bytes > 0:
                per_tok = link.bytes / len(rec.samples_ns) / rec.n_gen
                e = min(1.0, per_tok / (link.limit_gbps * 1e9 * busy))
                eff[name] = max(eff.get(name, 0.0), e)
    return {k: round(v, 4) for k, v in eff.items()}


def save_measured(records: Sequence[BenchRecord], limits: Limits, *, path: Path | None = None,
                  per_layer_overhead_s: float = 1e-4) -> tuple[Path, dict[str, Any]]:
    """Merge this run's limits, efficiencies and warm hit rates into $HOMERUN_HOME/measured.json (hardware.py's
    schema), keeping keys this run did not measure. Returns (path, document)."""
    import json
    import socket

    from homerun.version import __version__
    from homerun.plan.hardware import measured_path

    path = path or measured_path()
    doc: dict[str, Any] = {}
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            doc = {}
    bw = dict(doc.get("bandwidth_gbps") or {})
    for key, value in (("dram_read", limits.dram_read_gbps), ("h2d_pinned", limits.h2d_gbps)):
        if value:
            bw[key] = round(value, 3)
    eff = dict(doc.get("efficiency") or {})
    found = measured_efficiencies(records, per_layer_overhead_s=per_layer_overhead_s)
    on_gpu = any(r.backends == "CUDA" for r in records)
    for link, value in found.items():
        if link == "dram" or (on_gpu and link in ("vram", "pcie")):  # a CPU stand-in's "vram" is not a GPU's
            eff[link] = value
    rates = dict(doc.get("expert_cache_hit_rate") or {})
    for rec in records:
        # random weights route unlike a trained model: a synthetic run's hit rate says nothing about the real one
        if rec.cache == "warm" and rec.hit_rate is not None and not rec.extrapolated and rec.synthetic is None:
            rates[rec.model] = round(rec.hit_rate, 4)
    out = {"schema_version": 1, "written_by": f"homerun bench {__version__}",
           "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
           "host": socket.gethostname()}
    if bw:
        out["bandwidth_gbps"] = bw
    if eff:
        out["efficiency"] = eff
    if rates:
        out["expert_cache_hit_rate"] = rates
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return path, out



# ------------------------------------------------------------------------------------------------ model loading


def make_expert_backend(ckpt: Any, args: Any, *, kind: str, compute_dtype: torch.dtype,
                        cache_slots: int | None = None, act: str = "auto") -> tuple[Callable[[], Any], str, list[str]]:
    """(factory of a fresh backend, label, notes) for `kind` "native" (CpuExpertBackend when the kernels are built,
    activations in mode `act`) or "reference" (ReferenceExpertBackend), optionally behind an expert cache of
    `cache_slots` slots."""
    from homerun.engine.backends import resolve_act

    from offload.base import ReferenceExpertBackend

    notes: list[str] = []
    label = "reference-fp32" if compute_dtype == torch.float32 else f"reference-{str(compute_dtype)[6:]}"

    def reference() -> Any:
        return ReferenceExpertBackend(ckpt.expert, swiglu_limit=args.swiglu_limit, compute_dtype=compute_dtype)

    def native() -> Any:
        from offload.cpu_backend import CpuExpertBackend

        return CpuExpertBackend(ckpt.expert, swiglu_limit=args.swiglu_limit, act=act)

    act = resolve_act(act)
    cpu_factory = reference
    if kind == "native":
        from homerun.kernels.cpu_experts import backend_info

        info = backend_info()
        if info.get("built") and info.get("path") != "torch":
            label = f"cpu-{info['path']}" + ("" if act == "fp32" else f"-{act}")
            cpu_factory = native
        else:
            notes.append(f"native CPU kernels unavailable ({info.get('reason')}); using the reference backend")
    elif kind != "reference":
        from homerun.errors import UsageError

        raise UsageError(f"unknown expert backend {kind!r}", hint="use --native or --reference")
    if cache_slots is None:
        return cpu_factory, label, notes
    from offload.cached_backend import CacheOptions, build_cached_backend
    from offload.devices import default_device

    moe_layers = range(args.n_layers)

    def cached() -> Any:
        return build_cached_backend(ckpt.expert, moe_layers, args.n_routed_experts, swiglu_limit=args.swiglu_limit,
                                    device=default_device(), compute_dtype=compute_dtype, cpu_backend=cpu_factory(),
                                    cache=CacheOptions(cache_slots))

    where = "cuda" if torch.cuda.is_available() else "stand-in (host RAM)"
    if not torch.cuda.is_available():
        notes.append("no GPU: the expert cache lives on a CPU stand-in device, so its 'vram' and 'pcie' links are "
                     "host memory")
    return cached, f"cache{cache_slots}@{where}+{label}", notes


def open_target(path: str | Path, *, kind: str = "native", cache_slots: int | None = None, dtype: str = "float32",
                device: str | None = None, progress: Callable[[str, int, int], None] | None = None,
                act: str = "auto", placement: Any = None, graphs: str = "auto") -> tuple[BenchTarget, str, list[str]]:
    """Load the checkpoint for benchmarking with the chosen expert backend: (target, backend label, notes). With a
    `placement` (a plan's, e.g. on CUDA stand-ins) the runtime builds the placed backend itself; no cold phase.
    `graphs`: the decode runner (homerun.engine.graphs); "auto" on stand-ins emulates graphs wherever CUDA would
    capture them, so the launch counts are CUDA's."""
    from homerun.engine.runtime import load
    from homerun.formats.loader import open_checkpoint
    from homerun.models.deepseek_v4 import ModelArgs
    from homerun.engine.backends import on_device

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = open_checkpoint(Path(path))
    args = ModelArgs.from_hf_config(ckpt.config)
    if placement is not None:
        model = load(path, dtype=dtype, placement=placement, expert_cache_slots=cache_slots, experts=kind,
                     expert_act=act, progress=progress)
        placed = model.net.experts
        first_layer = args.n_hash_layers if args.n_hash_layers < args.n_layers else 0
        bpe = ckpt.expert(first_layer, 0).nbytes
        target = BenchTarget(model, lambda: placed, bpe, has_cache=False, backend=placed)
        if graphs == "auto" and unsupported_reason(model.net, placement_sites(model.placement)) is None:
            model.set_graph_mode("on")  # stand-ins: graphs (emulated) wherever CUDA would capture them
        elif graphs != "auto":
            model.set_graph_mode(graphs)
        kinds = sorted({d.kind for d in model.devices.values()})
        return target, f"placed({'+'.join(kinds)})+{kind}", [f"plan placement on {', '.join(kinds)} devices"]
    compute = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype, torch.float32)
    factory, label, notes = make_expert_backend(ckpt, args, kind=kind, compute_dtype=compute, cache_slots=cache_slots,
                                                act=act)
    if cache_slots is None:  # the host backend serves a model on `device`
        host_factory = factory

        def factory() -> Any:
            return on_device(host_factory(), device)
    first = factory()
    model = load(path, dtype=dtype, device=device, expert_backend=first, progress=progress)
    first_layer = args.n_hash_layers if args.n_hash_layers < args.n_layers else 0
    bpe = ckpt.expert(first_layer, 0).nbytes
    target = BenchTarget(model, factory, bpe, has_cache=cache_slots is not None)
    if label.startswith("cpu-") or "+cpu-" in label:  # the native kernels run: in the resolved mode
        from homerun.engine.backends import resolve_act

        target.act = resolve_act(act)
    target.backend = first
    if graphs != "auto":
        model.set_graph_mode(graphs)
    return target, label, notes
