"""The public runtime: `load(path) -> Model`, `Model.session() -> Session`, logits and generation.

`load` opens an official-format checkpoint through `homerun.formats.loader` and, for the options of a `LoadOptions`
record (homerun.engine.options), runs one path: placement (a plain load is `single_device`) -> budgeted devices
(`offload.devices`) -> the routed-expert backend (`homerun.engine.backends.build_placed_backend`) -> the pure-math
model of `homerun.models.deepseek_v4` on those devices (non-expert FP8 weights stay packed unless `weights_dtype` says
otherwise; every tensor, each layer's KV pages and the expert caches charged to the device that holds them), then
attaches the tokenizer.
A `Session` owns the incremental inference state; feeding is all-or-nothing per chunk, so an interrupt (Ctrl-C, a
closed generator) leaves the session at the last completed chunk. This module does no printing; progress goes to a
callback.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from homerun.engine.options import COMPUTE_DTYPES, LoadOptions
from homerun.engine.graph_sites import placement_sites
from homerun.engine.graphs import decode_graphs_for
from homerun.engine.placement import Placement, placed_build_kwargs, single_device
from homerun.engine.session import FREE_MEMORY_SHARE, PREFILL_ETA_MIN_TOKENS, Session  # noqa: F401 - public here
from homerun.engine.session import device_kv_more_bytes
from homerun.engine.standin_bytes import StepBytes
from homerun.errors import CheckpointError, DoesNotFitError, UnknownModelError, UsageError
from homerun.models.deepseek_v4 import LAYER_CSA, LAYER_HCA, DeepseekV4, LayerState, ModelArgs, build_model
from homerun.models.decode_bytes import default_ramp, kv_page_tokens
from homerun.models.kv import fp8_row_bytes, free_memory_bytes
from homerun.plan.records import RAMP_TOKENS as DEFAULT_RAMP_TOKENS, THINK_MAX_MIN_TOKENS as THINK_MAX_MIN_CONTEXT_TOKENS
from homerun.plan.records import gpu_runs_prefill, prefill_chunk_tokens

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# progress(stage, done, total): stage is "layers" while the model is assembled.
Progress = Callable[[str, int, int], None]


def _resolve_path(path_or_repo: str | Path) -> Path:
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_repo)
    if s.count("/") == 1 and not p.exists():
        try:  # a Hub repo id already in the local cache (never downloads here)
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - any cache miss means the same thing to the user
            raise UnknownModelError(
                f"{s}: not a local directory and not in the Hugging Face cache",
                hint=f"run `homerun download {s}` first, or pass a checkpoint directory",
            ) from exc
    raise UnknownModelError(f"{s}: no such checkpoint directory", hint="pass the directory holding config.json")


class Model:
    """A loaded V4 model. Build with `homerun.load`."""

    def __init__(self, net: DeepseekV4, options: LoadOptions, *, placement: Placement, devices: dict[str, Any],
                 path: Path | None = None, checkpoint: Any = None, tokenizer: Any = None, load_s: float = 0.0):
        """`options` resolved by `load` (max_chunk_tokens and ramp_tokens set); `placement` and its budgeted
        `devices` by name (a plain load: one device)."""
        self.net = net
        self.options = options
        self.path = path
        self.checkpoint = checkpoint
        self.config: dict[str, Any] = dict(checkpoint.config) if checkpoint is not None else {}
        self.generation_config: dict[str, Any] = dict(getattr(checkpoint, "generation_config", None) or {})
        self.args: ModelArgs = net.args
        self.tokenizer = tokenizer
        ctx = options.context
        self.max_chunk_tokens = prefill_chunk_tokens(False, options.compute.max_chunk_tokens,
                                                     routed_experts=net.args.n_routed_experts,
                                                     experts_per_token=net.args.n_activated_experts)
        self.weights_dtype = options.compute.weights_dtype
        self.ramp_tokens = tuple(ctx.ramp_tokens or DEFAULT_RAMP_TOKENS)
        self.kv_budget_bytes = ctx.kv_budget_bytes
        self.load_s = load_s
        # Page size (decode_bytes.kv_page_tokens, the plan's too): at least DEFAULT_PAGE_TOKENS and 1/32 of the
        # first ramp step, a multiple of the HCA rate
        rate = max(self.args.hca_rate, self.args.csa_rate, 1)
        self.page_tokens = kv_page_tokens(rate, self.ramp_tokens[0], ctx.page_tokens)
        self.kv_dtype = ctx.kv_dtype
        self.placement = placement
        self.devices: dict[str, Any] = dict(devices)
        # One device: its KV may live elsewhere (kv_device); several: each layer's KV on its layer's device.
        self.kv_device = self._pick_kv_device(ctx.kv_device) if len(self.devices) == 1 else self.device
        # KV pages on the layers' devices, charged to their budgets (else on kv_device, uncharged).
        self.kv_on_devices = self.kv_device == self.device
        self.prefill_tok_s: float | None = None  # measured on chunks of >= 16 tokens (moving average)
        self._tokens_fed = 0
        self._forward_s = 0.0
        self._feeds = 0
        self.forwards = 0  # net.forward calls (chunks and decode steps), for activation hops
        self._unsettled = None  # the session whose last step is not settled yet (Session.decode)
        self.graph_mode = options.compute.cuda_graphs
        self.set_graph_mode(self.graph_mode)
        self._step_bytes = StepBytes(self.devices)  # what an eager step holds on CUDA stand-ins (standin_bytes)

    def set_graph_mode(self, mode: str) -> None:
        """Choose the decode runner again (auto | on | off; homerun.engine.graphs.decode_graphs_for): graphs captured
        before are dropped and recaptured at the next decode step. "on" where capture is impossible is a UsageError."""
        self.settle()
        dg, reason = decode_graphs_for(self.net, mode, placement_sites(self.placement))  # cut where devices change
        if mode == "on" and dg is None:
            raise UsageError(f"cuda_graphs=on is not possible here: {reason}", hint="use cuda_graphs auto or off")
        self.graph_mode, self.decode_graphs, self.decode_graphs_reason = mode, dg, reason

    def set_expert_backend(self, backend: Any) -> None:
        """Serve the routed experts from `backend` from now on; the decode runner is chosen again for a new backend
        (graphs captured around the old one would replay its launches)."""
        self.settle()
        self.net.experts = backend
        if self.decode_graphs is None or self.decode_graphs.backend is not backend:
            self.set_graph_mode(self.graph_mode)

    @contextlib.contextmanager
    def experts_wrapped(self, wrapper: Any) -> Iterator[Any]:
        """Serve the routed experts through `wrapper` (around net.experts: a counter, a tracer) for the block, with
        eager decode; the decode graphs stay captured for the backend itself and serve again afterwards."""
        self.settle()
        inner = self.net.experts
        self.net.experts = wrapper
        try:
            yield wrapper
        finally:
            try:  # a step deferred in the block ends (and any redo runs) through the wrapper it began with
                self.settle()
            finally:
                self.net.experts = inner

    def _forward(self, ids: torch.Tensor, start_pos: int, states, *, defer_end: bool = False,
                 out_rows: slice | None = None):
        """net.forward, with one-token steps replayed from the decode graphs when there are some. The graphs serve
        only the expert backend they were made for: with another one in net.experts (a wrapper planted for a
        counting pass, say) the step runs eagerly through it. -> (hidden, states, DeferredEnd | None): with
        `defer_end`, a speculated step's unsettled end (net.forward_step's); any session's step that was left
        unsettled is settled first. out_rows: the hidden's rows wanted (net.forward's; a one-token step has one)."""
        self.settle()
        dg = self.decode_graphs
        runner = self.net
        if dg is not None and ids.numel() == 1 and self.net.experts is dg.backend:
            runner = dg
            if dg.captured or self.graph_mode == "on":
                out = dg.forward(ids, start_pos, states, defer_end=defer_end)
            else:
                try:  # auto: a capture that fails leaves eager decode, with one warning (the states are untouched)
                    out = dg.forward(ids, start_pos, states, defer_end=defer_end)
                except Exception as exc:  # noqa: BLE001 - any capture failure: the eager forward serves
                    self.decode_graphs, self.decode_graphs_reason = None, \
                        f"capture failed: {type(exc).__name__}: {exc}"
                    warnings.warn(f"homerun: decode graphs off ({self.decode_graphs_reason})", RuntimeWarning,
                                  stacklevel=2)
                    runner = self.net
        if runner is self.net:
            with self.step_bytes(states) if ids.numel() == 1 else contextlib.nullcontext():
                out = self.net.forward_step(ids, start_pos, states, defer_end=defer_end, out_rows=out_rows)
        return out

    def step_bytes(self, states: Sequence[LayerState]) -> contextlib.AbstractContextManager:
        """Around an eager one-token step (or its deferred redo, Session.settle): on CUDA stand-ins the step's tensors
        and the small state `states` hold are charged to the devices' peaks (standin_bytes); elsewhere nothing."""
        if not self._step_bytes.devices:
            return contextlib.nullcontext()
        self._step_bytes.hold(states, [lp.device for lp in self.placement.layers])
        return self._step_bytes

    def settle(self) -> None:
        """Settle the session step left unsettled (Session.decode's deferred end), if any: with a wait of its own,
        since nothing says the host has waited since. Called before any other forward and before the expert
        backend or the decode runner changes."""
        sess, self._unsettled = self._unsettled, None
        if sess is not None:
            sess.settle(synced=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.net.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.generation_config.get("eos_token_id", self.config.get("eos_token_id"))
        if eos is None and self.tokenizer is not None:
            eos = self.tokenizer.eos_id
        if eos is None:
            return ()
        return tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))

    def _check_ids(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        return self._ids_and_list(token_ids)[0]

    def _ids_and_list(self, token_ids: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The ids as an int64 tensor [T] and as a list, range-checked. A list is checked as a list: a check on the
        tensor would read its min and max back from the device (two host syncs per decode token on a GPU path)."""
        if isinstance(token_ids, torch.Tensor):
            ids = token_ids.reshape(-1).to(torch.int64)
            vals = ids.tolist()
        else:
            vals = [int(t) for t in token_ids]
            ids = torch.tensor(vals, dtype=torch.int64)
        if vals and (min(vals) < 0 or max(vals) >= self.args.vocab_size):
            raise UsageError(
                f"token id out of range [0, {self.args.vocab_size}): min {min(vals)}, max {max(vals)}",
                hint="token ids must come from this model's tokenizer",
            )
        return ids, vals

    def _account(self, n_tokens: int, seconds: float) -> None:
        self._tokens_fed += n_tokens
        self._forward_s += seconds
        self._feeds += 1

    def session(self) -> Session:
        return Session(self)

    def restore(self, path: str | Path, **kwargs: Any) -> Session:
        """A new Session from a KV snapshot written by `Session.save` (`homerun.engine.snapshot.restore_session`);
        SnapshotError when it belongs to another model or kv_dtype, is damaged, or exceeds the KV budget."""
        from homerun.engine.snapshot_read import restore_session

        return restore_session(self, path, **kwargs)

    def _new_state(self) -> list[LayerState]:
        if self.kv_on_devices:  # each layer's pages on (and charged to) its layer's device
            accounts = [self.devices[lp.device] for lp in self.placement.layers]
            return self.net.new_state(page_tokens=self.page_tokens, kv_dtype=self.kv_dtype, accounts=accounts)
        return self.net.new_state(kv_device=self.kv_device, page_tokens=self.page_tokens, kv_dtype=self.kv_dtype)

    def device_usage(self) -> list[dict[str, Any]]:
        """Per device: its budget, accounted bytes (total, peak, and by class: weights, kv, expert_cache) and the
        layers it runs."""
        out = []
        for name, dev in self.devices.items():
            d = dev.usage().to_dict()
            d["bytes_by_class"] = dev.bytes_by_class()
            d["layers"] = self.placement.layers_on(name)
            out.append(d)
        return out

    def _pick_kv_device(self, kv_device: str | torch.device | None) -> torch.device:
        """"auto"/None: the model's device while the KV at the largest permitted step fits there (budget and free
        memory), else host RAM."""
        if kv_device not in (None, "auto"):
            d = torch.device(kv_device)  # "cuda" on a model on cuda:N means its own device
            return self.device if d.type == self.device.type and d.index is None else d
        dev = self.device
        if dev.type == "cpu":
            return dev
        free = free_memory_bytes(dev)
        need = self.kv_bytes_at(self.max_context_tokens() or self.ramp_tokens[0])
        if free is not None and need <= FREE_MEMORY_SHARE * free:
            return dev
        return torch.device("cpu")

    def free_kv_memory_bytes(self) -> int | None:
        """Free memory where the KV pages live (host RAM or CUDA memory); None when unknown, and for a model on
        several devices, whose KV is checked device by device (Session._check_device_kv)."""
        if len(self.devices) > 1:
            return None
        return free_memory_bytes(self.kv_device)

    def _measure_prefill(self, n_tokens: int, seconds: float) -> None:
        if n_tokens < 16 or seconds <= 0:
            return  # decode steps say little about prefill speed
        speed = n_tokens / seconds
        self.prefill_tok_s = speed if self.prefill_tok_s is None else 0.7 * self.prefill_tok_s + 0.3 * speed

    def think_max_available(self) -> tuple[bool, str]:
        """(available, reason): Think Max needs the ramp to reach 393216 tokens within kv_budget_bytes, and the KV at
        that size to fit in the free memory where it lives (on devices: what a new session's growth there asks)."""
        need_tokens = THINK_MAX_MIN_CONTEXT_TOKENS
        if self.ramp_tokens[-1] < need_tokens:
            return False, f"the context ramp ends at {self.ramp_tokens[-1]:,} tokens; Think Max needs {need_tokens:,}"
        need = self.kv_bytes_at(need_tokens)
        if self.kv_budget_bytes is not None and need > self.kv_budget_bytes:
            return False, (f"{need_tokens:,} tokens need {need / 1e9:.2f} GB of KV, over the budget of "
                           f"{self.kv_budget_bytes / 1e9:.2f} GB")
        for name, dev in (self.devices.items() if self.kv_on_devices else ()):  # as a new session's ramp check asks
            if (more := device_kv_more_bytes(self, name, need_tokens)[0]) > dev.free_bytes:
                return False, (f"{need_tokens:,} tokens need {more / 1e9:.2f} GB more of KV and decode graphs' static "
                               f"state on {name}, its budget has {dev.free_bytes / 1e9:.2f} GB left")
        free = self.free_kv_memory_bytes()
        if free is not None and need > FREE_MEMORY_SHARE * free:
            return False, (f"{need_tokens:,} tokens need {need / 1e9:.2f} GB of KV, only {free / 1e9:.2f} GB "
                           f"is free on {self.kv_device}")
        return True, f"{need_tokens:,} tokens need {need / 1e9:.2f} GB of KV on {self.kv_device}"

    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Full pass from position 0 (a fresh state, chunked by max_chunk_tokens): float32 logits [T, V]."""
        ids = self._check_ids(token_ids)
        if ids.numel() == 0:
            raise UsageError("logits() needs at least one token")
        states = self._new_state()
        out = []
        t0 = time.perf_counter()
        with torch.inference_mode():
            for c0 in range(0, ids.numel(), self.max_chunk_tokens):
                hidden, states = self.net.forward(ids[c0 : c0 + self.max_chunk_tokens], c0, states)
                self.forwards += 1
                out.append(self.net.logits(hidden).float().cpu())
        self._account(ids.numel(), time.perf_counter() - t0)
        return torch.cat(out)

    def generate(self, prompt_ids: Sequence[int], **kwargs: Any) -> Iterator[Any]:
        """See `homerun.engine.generate.generate`: yields one `Step` per generated token."""
        from homerun.engine.generate import generate

        return generate(self, prompt_ids, **kwargs)

    def kv_bytes_at(self, n_tokens: int, layers: Sequence[int] | None = None) -> int:
        """Bytes of inference state after n_tokens: window rows, closed entries, open-window rows and CSA overlap
        slices (the overlap gate carries the fp32 position bias). Equals `Session.kv_bytes` exactly. `layers`:
        only those layers' share (default all)."""
        a = self.args
        el = torch.empty(0, dtype=self.dtype).element_size()
        f32 = 4

        def row_bytes(width: int, rope_dim: int, scale_fp32: bool) -> int:
            if self.kv_dtype == "fp8":
                return fp8_row_bytes(width, rope_dim, scale_fp32)
            return width * (2 if self.kv_dtype == "bf16" else el)

        entry_b, index_b = row_bytes(a.head_dim, a.rope_dim, False), row_bytes(a.index_head_dim, 0, True)
        total = 0
        keep = set(range(a.n_layers)) if layers is None else set(layers)
        for i, kind in enumerate(a.layer_kinds):
            if i not in keep:
                continue
            total += min(n_tokens, a.window_size - 1) * a.head_dim * el
            if kind == LAYER_CSA:
                for hd, rb in ((a.head_dim, entry_b), (a.index_head_dim, index_b)):
                    total += (n_tokens // a.csa_rate) * rb
                    total += (n_tokens % a.csa_rate) * 2 * hd * 2 * el  # pending kv + gate, two series
                    if n_tokens >= a.csa_rate:
                        total += a.csa_rate * hd * (el + max(el, f32))  # overlap kv + gate
            elif kind == LAYER_HCA:
                total += (n_tokens // a.hca_rate) * entry_b
                total += (n_tokens % a.hca_rate) * a.head_dim * 2 * el
        return total

    def max_context_tokens(self) -> int:
        """The largest ramp step whose predicted state fits kv_budget_bytes (the last step without a budget)."""
        fits = [r for r in self.ramp_tokens if self.kv_budget_bytes is None or self.kv_bytes_at(r) <= self.kv_budget_bytes]
        return fits[-1] if fits else 0

    def stats(self) -> dict[str, Any]:
        backend = self.net.experts
        out: dict[str, Any] = {
            "path": str(self.path) if self.path else None,
            "dtype": str(self.dtype).replace("torch.", ""),
            "weights_dtype": self.weights_dtype,
            "device": str(self.device),
            "n_layers": self.args.n_layers,
            "resident_weight_bytes": self.net.resident_bytes(),
            "expert_backend": type(backend).__name__,
            "expert_act": backend.act,
            "load_s": self.load_s,
            "tokens_fed": self._tokens_fed,
            "forward_s": self._forward_s,
            "feeds": self._feeds,
            "max_chunk_tokens": self.max_chunk_tokens,
            "ramp_tokens": list(self.ramp_tokens),
            "kv_budget_bytes": self.kv_budget_bytes,
            "kv_device": str(self.kv_device),
            "kv_dtype": str(self.dtype).replace("torch.", "") if self.kv_dtype == "auto" else self.kv_dtype,
            "kv_page_tokens": self.page_tokens,
            "prefill_tok_s": self.prefill_tok_s,
            "max_context_tokens": self.max_context_tokens(),
        }
        out["placement"] = self.placement.to_dict()
        out["devices"] = self.device_usage()
        # Placement moves the layers, so it knows the device boundaries a forward crosses.
        out["activation_hops"] = self.placement.hops_per_forward() * self.forwards
        out["think_max_available"], out["think_max_reason"] = self.think_max_available()
        try:
            out["experts"] = backend.stats().to_dict()
        except Exception:  # noqa: BLE001 - a backend's stats must never break the caller
            pass
        return out


def load(path: str | Path, options: LoadOptions | None = None, *, expert_backend: Any = None,
         progress: Progress | None = None, **overrides: Any) -> Model:
    """Load an official-format DeepSeek-V4 checkpoint directory (or a cached Hub repo id) for inference.

    `options`: a `homerun.engine.options.LoadOptions` (placement, compute, experts, context; see there), with
    `overrides` in its flat keyword names on top (`load(p, dtype="bfloat16", expert_act="fp32")`). Every load is a
    placement: a plain one is `single_device(n_layers, device)`, and the same path builds the devices, the
    routed-expert backend and the model on them (each tensor charged to its device's budget; a device that runs out
    raises DoesNotFitError naming it). Routed experts are never dequantized wholesale here.
    `expert_backend`: any `offload.base.ExpertBackend` to use instead of the one the options describe.
    `progress(stage, done, total)` is called while the model is assembled.
    """
    from homerun.engine.backends import build_placed_backend
    from homerun.formats.loader import open_checkpoint
    from offload.devices import build_devices

    opts = options or LoadOptions()
    opts = opts.replace(**overrides) if overrides else opts
    t0 = time.perf_counter()
    compute = _TORCH_DTYPES[COMPUTE_DTYPES[opts.compute.dtype]]
    root = _resolve_path(path)
    ckpt = open_checkpoint(root)
    args = ModelArgs.from_hf_config(ckpt.config)
    names = set(ckpt.names)
    placement = opts.placement.placement
    if placement is None:  # a plain load: everything on one device, experts in the host store
        placement = single_device(args.n_layers, opts.placement.device_name,
                                  expert_cache_slots=opts.experts.cache_slots)
    else:
        placement.check_layers(args.n_layers)
        if opts.experts.cache_slots is not None:
            placement = placement.with_cache_slots(opts.experts.cache_slots)
    devs = build_devices(placement.devices)
    placed = placed_build_kwargs(placement, devs)
    if opts.compute.weights_dtype != "fp8":
        _check_room(ckpt, names, 4 if opts.compute.weights_dtype == "fp32" else 2, placed["device"])
    if expert_backend is None:
        expert_backend = build_placed_backend(
            ckpt, placement, devs, n_experts=args.n_routed_experts, swiglu_limit=args.swiglu_limit,
            compute_dtype=compute, kind=opts.experts.kind, cache_policy=opts.experts.cache_policy,
            trace_path=opts.experts.trace_path, top_k=args.n_activated_experts,
            model_name=str(ckpt.config.get("_name_or_path") or root.name), act=opts.experts.act,
        )

    def get(name: str) -> torch.Tensor:
        if name not in names:
            raise CheckpointError(f"{root}: tensor {name!r} is missing", hint="the checkpoint is incomplete")
        return ckpt.get(name)

    def on_layer(done: int, total: int) -> None:
        if progress is not None:
            progress("layers", done, total)

    net = build_model(
        args, get, names.__contains__, expert_backend, weights_dtype=opts.compute.weights_dtype,
        compute_dtype=compute, on_layer=on_layer, upcast_bf16=opts.compute.upcast_bf16, **placed,
    )
    tokenizer = None
    if (root / "tokenizer.json").is_file():
        from homerun.formats.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(root)
    max_pos = int(ckpt.config.get("max_position_embeddings", DEFAULT_RAMP_TOKENS[-1]))
    ramp = opts.context.ramp_tokens or default_ramp(max_pos)  # the plan's too (its KV pages: plan.specs.kv_layout)
    # prefill chunk: the planner's rule (2048 where a GPU or a CUDA stand-in runs layers, else the CPU's by the routed
    # experts' batch), or the user's
    gpu = gpu_runs_prefill(placement.device(lp.device).kind for lp in placement.layers)
    chunk = prefill_chunk_tokens(gpu, opts.compute.max_chunk_tokens, routed_experts=args.n_routed_experts,
                                 experts_per_token=args.n_activated_experts)
    resolved = opts.replace(placement=placement, device=None, ramp_tokens=ramp, max_chunk_tokens=chunk)
    return Model(net, resolved, placement=placement, devices=devs, path=root, checkpoint=ckpt, tokenizer=tokenizer,
                 load_s=time.perf_counter() - t0)


def _check_room(ckpt: Any, names: Iterable[str], bytes_per_elem: int, device: str | torch.device) -> None:
    """Refuse to dequantize FP8 weights when the copy would not fit in available host memory."""
    if torch.device(device).type != "cpu":
        return
    try:
        import psutil
    except ImportError:
        return
    need = 0
    for n in names:
        if n.endswith(".weight") and f"{n[: -len('.weight')]}.scale" in names and ".experts." not in n:
            t = ckpt.get(n)
            need += t.numel() * bytes_per_elem
    avail = psutil.virtual_memory().available
    if need > 0.9 * avail:
        raise DoesNotFitError(
            f"dequantizing the FP8 weights needs {need / 1e9:.1f} GB, only {avail / 1e9:.1f} GB of RAM is available",
            hint="use weights_dtype='fp8' (the default) to keep them packed",
        )
