"""`homerun chat MODEL`: the interactive terminal (streaming, dim reasoning collapsed when done, markdown answers,
slash commands, multi-line input, Ctrl-C stops a generation, Ctrl-D exits). Also the shared model opening with
load progress and the plan summary, used by `homerun run`.

The conversation logic lives in `homerun.chat.session`; reading input and rendering live in `homerun.cli.chat_view`.
`--json` turns the terminal into a line protocol for scripts: each stdin line is a message or a slash command, events
go out as JSONL.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typing_extensions import Annotated

from homerun.chat.session import THINK_MODES, ChatSession, SamplingSettings, check_think_max
from homerun.errors import UsageError
from homerun.cli.output import Output
from homerun.engine.options import ExpertOptions, LoadOptions
from homerun.cli.chat_view import interactive, json_lines, prefill_progress



# ---------------------------------------------------------------- model opening (shared with `run`)


def checkpoint_bytes(path: str) -> int | None:
    root = Path(path)
    if not root.is_dir():
        return None
    return sum(p.stat().st_size for p in root.glob("*.safetensors")) or None


# Loads that run longer than this get a progress bar on stderr.
LOAD_BAR_AFTER_S = 2.0


def open_model(path: str, out: Output, options: Optional[LoadOptions] = None) -> Any:
    """Load with progress on stderr (GB, GB/s, ETA when the loader reports progress)."""
    from homerun.engine.runtime import load

    total = checkpoint_bytes(path)
    total_txt = f"{total / 1e9:.2f} GB" if total else "size unknown"
    t0 = time.perf_counter()
    from homerun.cli.progress import byte_progress

    # A bar (GB, GB/s, ETA) for loads that take more than LOAD_BAR_AFTER_S; nothing in --json mode.
    bar = None if out.json_mode else byte_progress(out, f"Loading {Path(path).name} ({total_txt})",
                                                   after_s=LOAD_BAR_AFTER_S)
    progress = None
    if bar is not None:
        def progress(stage: str, done: int, total_steps: int) -> None:
            # The loader reports steps (layers); bytes are estimated pro rata from the checkpoint size.
            frac = done / total_steps if total_steps else 0.0
            bar.update(frac * total if total else done, total if total else total_steps)
        bar.__enter__()
    try:
        model = load(path, options, progress=progress)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    elapsed = time.perf_counter() - t0
    if total:
        out.info(f"[dim]Loaded {total / 1e9:.2f} GB in {elapsed:.1f} s ({total / 1e9 / max(elapsed, 1e-9):.2f} GB/s)[/dim]")
    return model


def make_plan(path: str, hw: str, out: Output) -> Any | None:
    """The planner's Plan for this checkpoint on profile `hw` (no bandwidth measurement), or None when the planner
    is missing or cannot plan it; the chat works without one."""
    try:
        from homerun.cli.commands.plan import build_plan
    except ImportError:
        return None
    try:
        _, plan = build_plan(path, hw=hw, measure=False)
    except Exception as exc:  # noqa: BLE001 - the plan is advisory here; loading decides what really runs
        out.info(f"[dim]No plan: {escape(str(exc))}[/dim]")
        return None
    return plan


def plan_summary(plan: Any) -> str | None:
    """One line: the plan's verdict and predicted decode speed, with its basis (the bytes each token reads over the
    slowest link): a bandwidth model, which small models (dominated by per-token overheads) run far below."""
    try:
        line = f"Plan ({plan.hardware.get('profile')}): {plan.verdict}"
        pred = plan.predicted
        tok_s = pred.get("decode_tok_s")
        if not tok_s:
            return line
        links = {link["name"]: link for link in pred.get("links") or []}
        slow = links.get(pred.get("bottleneck")) or {}
        basis = (f"{slow['bytes_per_token'] / 1e9:,.3f} GB/token over {slow['name']} at {slow['gbps']:,.1f} GB/s"
                 if slow.get("gbps") else f"bottleneck {pred.get('bottleneck')}")
        return line + f"; predicted decode ~{tok_s:,.1f} tok/s (bandwidth estimate: {basis}; `homerun bench` measures)"
    except (AttributeError, KeyError, TypeError):
        return None


def plan_context_tokens(plan: Any) -> int | None:
    try:
        return int(plan.context["max_tokens"]) or None
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def check_think_flag(think: str) -> None:
    """Reject an unknown --thinking value before anything is loaded."""
    if think not in THINK_MODES:
        raise UsageError(f"--thinking {think!r} is not a mode", hint="use off, high or max")


def resolve_think(think: str, chat_or_capacity: Any, out: Output) -> None:
    """Refuse --thinking max when the context cannot reach 384K; warn when its capacity is unknown."""
    check_think_flag(think)
    if think == "max":
        allowed, reason = check_think_max(chat_or_capacity.capacity_tokens())
        probe = getattr(getattr(chat_or_capacity, "model", None), "think_max_available", None)
        if allowed and callable(probe):  # the runtime also knows the KV budget and the live free memory
            allowed, why = probe()
            reason = reason if allowed else why
        if not allowed:
            raise UsageError(f"Think Max refused: {reason}", hint="use --thinking high, or a plan with more context")
        if reason:
            out.warn(escape(f"Think Max: {reason}"))


# Options shared by `chat` and `run` (and the load flags by `bench`), declared once.
ThinkingOpt = Annotated[str, typer.Option(help="Thinking mode: off, high or max (max needs 384K context).")]
SystemOpt = Annotated[Optional[str], typer.Option(help="System prompt.")]
TemperatureOpt = Annotated[Optional[float], typer.Option(help="Sampling temperature, a finite number >= 0; 0 = greedy. "
                           "Default: generation_config.json (V4: 1.0).")]
TopPOpt = Annotated[Optional[float], typer.Option(help="Nucleus sampling, in (0, 1]; 1 = off. Default: "
                    "generation_config.json (V4: 1.0).")]
TopKOpt = Annotated[Optional[int], typer.Option(help="Keep the K likeliest tokens, K >= 0; 0 = off. Default: "
                    "generation_config.json (off).")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Sampling seed, 0 to 2**64-1 (default: random). Reproducible "
                   "on one device; a GPU draws with its own generator, so it picks other tokens than the CPU.")]
HwOpt = Annotated[Optional[str], typer.Option("--hw", help="Plan the model on this hardware profile (a name, a .toml "
                  "path, or 'auto' for this machine) and load it with the plan's placement: layers, KV and expert "
                  "caches on the devices the plan names. Default: a plain load; this machine's plan only sets the "
                  "context limit.")]
StandinOpt = Annotated[bool, typer.Option("--standin", help="With --hw: run the plan's GPUs as CPU stand-in devices "
                       "with the same memory budgets (a multi-GPU placement on any machine, slowly).")]
ExpertsOpt = Annotated[str, typer.Option(help="Expert compute: auto (native CPU kernels when built), native, reference.")]
CacheSlotsOpt = Annotated[Optional[int], typer.Option(help="Force a device expert cache of N slots (a CPU stand-in without a GPU).")]
TraceOpt = Annotated[Optional[Path], typer.Option(help="Record routing (token, layer, experts) to this JSONL file.")]
ExpertActOpt = Annotated[str, typer.Option("--expert-act", help="CPU expert activations: auto (int8 blocks where a "
                                           "SIMD int8 kernel exists, ~5e-3 error), fp32 (exact), int8, bf16.")]


def load_options_from(experts: str, expert_cache_slots: Optional[int], trace: Optional[Path],
                      expert_act: str = "auto") -> LoadOptions:
    """CLI flags -> homerun.load options (shared by chat, run and serve); a bad combination exits 2 here."""
    return LoadOptions(experts=ExpertOptions(kind=experts, act=expert_act, cache_slots=expert_cache_slots,
                                             trace_path=str(trace) if trace else None))


def plan_placement(path: str, hw: str, *, standin: bool = False) -> tuple[Any, Any, list[str]]:
    """(Plan, Placement, notes) of checkpoint `path` on profile `hw` (the planner reads its config.json and
    safetensors headers, so the layer count is the checkpoint's own). Unlike the advisory plan, every failure is an
    error: an unknown profile (exit 2), a plan that does not fit (exit 3), or without `standin` a CUDA device this
    machine lacks or whose memory is under its budget (exit 2, naming the device). The notes name devices whose
    memory differs from the plan's GPUs (require_devices)."""
    from homerun.cli.commands.plan import build_plan
    from homerun.engine.placement import placement_from_plan, require_devices

    _, plan = build_plan(path, hw=hw, measure=False)
    placement = placement_from_plan(plan, standin=standin)
    notes: list[str] = []
    if not standin and any(d.kind == "cuda" for d in placement.devices):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        totals = [torch.cuda.get_device_properties(i).total_memory for i in range(count)]
        notes = require_devices(placement, count, profile=plan.hardware.get("profile"), total_bytes=totals)
    return plan, placement, notes


def start_session(path: str, *, hw: Optional[str], think: str, system: Optional[str], sampling: dict[str, Any],
                  out: Output, autosave: bool = True, load_options: Optional[LoadOptions] = None,
                  standin: bool = False) -> ChatSession:
    """Plan summary, load with progress, then a ChatSession with the checked thinking mode. With `hw` the model is
    loaded with that plan's placement (`standin`: its GPUs as CPU stand-ins); without, the plan for this machine
    is advisory (summary and context limit) and the load is plain. Flags and the checkpoint's files are checked
    first, so a bad input fails before anything slow runs."""
    from homerun.cli.checks import check_checkpoint_dir
    from homerun.engine.sampling import check_sampling

    check_think_flag(think)
    check_sampling(**sampling)
    check_checkpoint_dir(path, need_tokenizer=True)
    options = load_options or LoadOptions()
    if hw is None:
        if standin:
            raise UsageError("--standin maps a plan's GPUs to CPU stand-ins, and no plan was asked for",
                             hint="add --hw PROFILE, e.g. --hw 3xh100 --standin")
        plan = make_plan(path, "auto", out)
    else:
        plan, placement, notes = plan_placement(path, hw, standin=standin)
        for note in notes:
            out.warn(escape(note))
        options = options.replace(placement=placement)
        if any(d.kind != "host" for d in placement.devices) and options.context.kv_dtype == "auto" and \
                plan.context.get("kv_dtype"):
            # The plan sized each device's KV at its kv_dtype; the executor's default (the compute dtype) is wider.
            options = options.replace(kv_dtype=plan.context["kv_dtype"])
    summary = plan_summary(plan) if plan is not None else None
    if summary:
        out.info(f"[dim]{escape(summary)}[/dim]")
    if plan is not None and getattr(plan, "fits", True) is False:
        out.warn(escape(f"the plan says this model does not fit: {plan.remedy or plan.verdict}"))
    if options.placement.placement is not None:
        out.info(f"[dim]Placement: {escape(options.placement.placement.describe())}[/dim]")
    model = open_model(path, out, options)
    settings = SamplingSettings.from_generation_config(getattr(model, "generation_config", None), **sampling)
    chat = ChatSession(model, think="off", system=system, sampling=settings, model_name=Path(path).name,
                       autosave=autosave, context_limit_tokens=plan_context_tokens(plan))
    resolve_think(think, chat, out)
    chat.think = think
    attach_context_hooks(chat, out)
    return chat


# Long prompts whose predicted prefill takes at least this long get an ETA line before they start.
PREFILL_ETA_SHOW_S = 2.0


def attach_context_hooks(chat: ChatSession, out: Output) -> None:
    """Show each context ramp step and, before a long prompt, the prefill ETA (runtime sessions only)."""
    kv = getattr(chat, "_kv", None)
    if kv is None or not hasattr(kv, "on_capacity"):
        return

    def on_capacity(tokens: int) -> None:
        out.info(f"[dim]Context grew to {tokens:,} tokens[/dim]")

    def on_prefill(eta_s: float, n_tokens: int) -> None:
        if eta_s >= PREFILL_ETA_SHOW_S:
            out.info(f"[dim]Prefilling {n_tokens:,} tokens, about {_duration(eta_s)} left[/dim]")

    kv.on_capacity = on_capacity
    kv.on_prefill = on_prefill


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


# ---------------------------------------------------------------- input


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat_cmd(
        model: Annotated[str, typer.Argument(help="Checkpoint directory (or Hub repo id the runtime can resolve).")],
        thinking: ThinkingOpt = "off",
        system: SystemOpt = None,
        temperature: TemperatureOpt = None,
        top_p: TopPOpt = None,
        top_k: TopKOpt = None,
        seed: SeedOpt = None,
        max_new_tokens: Annotated[int, typer.Option(help="Most tokens per answer, >= 1.")] = 4096,
        hw: HwOpt = None,
        standin: StandinOpt = False,
        json_out: Annotated[bool, typer.Option("--json", help="Line protocol: stdin lines in, JSONL events out.")] = False,
        experts: ExpertsOpt = "auto",
        expert_act: ExpertActOpt = "auto",
        expert_cache_slots: CacheSlotsOpt = None,
        trace: TraceOpt = None,
        resume: Annotated[Optional[str], typer.Option("--resume", metavar="NAME|last", help="Continue a saved "
                          "chat: a history file, a name under HOMERUN_HOME/chats, or 'last' for the latest. Its KV "
                          "snapshot is restored when it matches the model, else the history is re-prefilled.")] = None,
        no_kv_save: Annotated[bool, typer.Option("--no-kv-save", help="/save and exit write the history only, no "
                              "KV snapshot.")] = False,
        kv_save_max_gb: Annotated[float, typer.Option("--kv-save-max-gb", help="Skip the KV snapshot when it "
                                  "would be larger than this.")] = 32.0,
    ) -> None:
        """Chat with a model in the terminal.

        Examples:
          homerun chat ./DeepSeek-V4-Flash
          homerun chat ./DeepSeek-V4-Flash --thinking high --system "Answer briefly."
          echo "hello" | homerun chat ./tiny --json
          homerun chat ./tiny --hw 3xh100 --standin
        """
        out = Output(json_out)
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_new_tokens)
        load_options = load_options_from(experts, expert_cache_slots, trace, expert_act)
        chat = start_session(model, hw=hw, think=thinking, system=system, sampling=sampling, out=out,
                             load_options=load_options, standin=standin)
        chat.kv_save, chat.kv_save_max_bytes = not no_kv_save, int(kv_save_max_gb * 1e9)
        if resume is not None:
            from homerun.chat.kv_files import resolve_history, resume_chat_kv
            from homerun.chat.session import homerun_home

            chat.history_path = resolve_history(resume, homerun_home() / "chats")
            chat.load(chat.history_path)
            with prefill_progress(chat, not json_out):
                kv = resume_chat_kv(chat, chat.history_path)
            out.info(escape(f"Resumed {len(chat.messages)} messages from {chat.history_path}" + (f"; {kv}" if kv else "")))
        if json_out:
            json_lines(chat, out)
        else:
            interactive(chat, Console(highlight=False))
        if chat.messages and chat.autosave:  # the KV next to the autosaved history, for --resume
            from homerun.chat.kv_files import save_chat_kv

            kv = save_chat_kv(chat, chat.history_path, max_bytes=chat.kv_save_max_bytes)
            if kv:
                out.info(f"[dim]{escape(kv)}[/dim]")
