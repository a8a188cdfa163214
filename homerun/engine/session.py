"""`Session`: the incremental inference state of one sequence over a loaded `Model`, grown through the context
ramp and fed all-or-nothing per chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from homerun.engine.graph_bytes import eager_state_bytes, held_bytes, static_state_bytes
from homerun.engine.sampling import NAN_TOKEN, nan_logits_error
from homerun.errors import ContextFullError, UsageError
from homerun.kernels.cpu_step import cpu_step
from homerun.models.deepseek_v4 import DeepseekV4, LayerState
from homerun.models.kv import free_memory_bytes

if TYPE_CHECKING:
    from homerun.engine.runtime import Model

# A ramp step may take at most this share of the free memory: the rest is for prefill transients and everyone else.
FREE_MEMORY_SHARE = 0.9
# Feeds longer than this many tokens are "long prompts": the session reports an ETA before (or after the first chunk).
PREFILL_ETA_MIN_TOKENS = 1024


def device_kv_more_bytes(model: "Model", name: str, n_tokens: int, states: Sequence = ()) -> tuple[int, int]:
    """(more, graph): the bytes a context of n_tokens needs on device `name` beyond what its sequence holds there
    (`states`: that sequence's states of the device's layers, () for a new one): its layers' KV and, with decode
    graphs, the static state of that context (graph: graph_bytes.static_state_bytes of its layers, as the plan
    charges it; without static cores the eager step's bytes, graph_bytes.eager_state_bytes), less the sequence's KV
    and the held static state, each byte once (graph_bytes.held_bytes). (0, 0) where no layers live."""
    layers = model.placement.layers_on(name)
    if not layers:
        return 0, 0
    graph = static_state_bytes(model.decode_graphs, n_tokens, model.kv_dtype, layers,
                               page_tokens=model.page_tokens)
    # no static cores: the eager step's new small state and reads beside the KV instead (not charged to the device,
    # so nothing of it is held: room kept for it)
    eager = 0 if graph else eager_state_bytes(model.net, n_tokens, model.kv_dtype, layers,
                                              page_tokens=model.page_tokens)
    have = held_bytes(model.decode_graphs, model.devices[name], states)
    return model.kv_bytes_at(n_tokens, layers=layers) + graph + eager - have, graph

@dataclass(frozen=True)
class Checkpoint:
    """A restorable point of a session: its per-layer states, tokens and last logits after one commit. States are
    functional (a feed returns new ones and only writes KV rows past the committed end), so holding them is cheap."""

    n_tokens: int
    states: tuple
    tokens: tuple[int, ...]
    last_logits: torch.Tensor | None


class Session:
    """Incremental inference state for one sequence (batch size 1).

    `feed(ids)` appends tokens and returns float32 logits [V] of the last position. `tokens` is what has been
    fed, `reset()` forgets it.

    Capacity grows through `model.ramp_tokens`. Each step up checks (1) the predicted KV bytes at the new step
    against `kv_budget_bytes` and (2) the bytes still to allocate against live free memory where the KV lives
    (available host RAM, or free CUDA memory). A step that fails either raises ContextFullError before anything of
    that feed is processed: the tokens fed so far stay, and the session stays usable. Capacity is a permission, not
    a reservation: entry pages are allocated as tokens arrive (see `homerun.models.kv`).

    Prefill runs in chunks of C = `model.max_chunk_tokens`. The activation footprint of a chunk is O(C) and does
    not grow with depth: the residual streams [C, hc_mult, dim], the projections [C, n_heads, head_dim] and the
    MoE inputs/outputs, plus attention and FP8-dequantization temporaries capped at 2^24 elements each (attention
    query blocks shrink as the context grows, the indexer scores one KV page at a time); logits are computed for
    the last position only. Measured on the tiny preset at depth 4096: about 21 / 81 / 218 MB of peak RSS above
    the steady state for C = 128 / 512 / 2048.
    """

    def __init__(self, model: "Model"):
        self.model = model
        self._net: DeepseekV4 = model.net
        self._states: list[LayerState] = model._new_state()
        self._tokens: list[int] = []
        self._last_logits: torch.Tensor | None = None
        self._cap_index = 0
        # The last decode step's unsettled end (homerun.models.speculation.DeferredEnd) with what the session was
        # before that step (states, token count, logits), to return to if settling it fails.
        self._deferred: tuple | None = None
        # Called with the new capacity (tokens) each time the ramp steps up.
        self.on_capacity: Callable[[int], None] | None = None
        # Called as on_prefill(eta_s, n_tokens) for a feed of more than PREFILL_ETA_MIN_TOKENS tokens: before it
        # starts when the prefill speed was measured already, else after its first chunk (eta_s = the remainder).
        self.on_prefill: Callable[[float, int], None] | None = None
        # Called as on_progress(done_tokens, total_tokens) after each committed chunk of a feed.
        self.on_progress: Callable[[int, int], None] | None = None

    # ------------------------------------------------------------------------------------------- properties

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    @property
    def n_tokens(self) -> int:
        return len(self._tokens)

    @property
    def last_logits(self) -> torch.Tensor | None:
        """float32 logits [V] of the last position on the host, None before the first feed. A feed with
        `on_device=True` (and `decode`) leaves them where the model computed them: they come to the host on the first
        read, so a decode loop that samples on the device pays no copy per token."""
        self.settle(synced=False)
        lg = self._last_logits
        if lg is not None and lg.device.type != "cpu":
            lg = self._last_logits = lg.cpu()
        return lg

    @last_logits.setter
    def last_logits(self, value: torch.Tensor | None) -> None:
        self._last_logits = value

    @property
    def has_logits(self) -> bool:
        """Whether last_logits exist, without bringing them to the host."""
        return self._last_logits is not None

    @property
    def capacity_tokens(self) -> int:
        return self.model.ramp_tokens[self._cap_index]

    @property
    def kv_bytes(self) -> int:
        """Bytes of live state (window rows, compressed entries, pending windows), excluding spare capacity."""
        return sum(s.nbytes for s in self._states)

    @property
    def kv_allocated_bytes(self) -> int:
        """Bytes allocated for the state: like kv_bytes, but entry stores count their whole page capacity."""
        return sum(s.allocated_bytes for s in self._states)

    # ---------------------------------------------------------------------------------------------- verbs

    def reset(self) -> None:
        self.settle(synced=False)  # the backend's token ends, even though the step is dropped
        self._states = self.model._new_state()
        self._tokens = []
        self.last_logits = None
        self._cap_index = 0

    def checkpoint(self) -> Checkpoint:
        """This session's state now, to return to with `rollback` (e.g. a server's prefix reuse)."""
        self.settle(synced=False)
        return Checkpoint(len(self._tokens), tuple(self._states), tuple(self._tokens), self._last_logits)

    def rollback(self, cp: Checkpoint) -> None:
        """Return to `cp`, a checkpoint of this session's current lineage (its tokens a prefix of the session's).
        The next feed overwrites the KV rows past it, so checkpoints taken after `cp` are invalid from then on."""
        if cp.n_tokens > len(self._tokens) or tuple(self._tokens[: cp.n_tokens]) != cp.tokens:
            raise UsageError("rollback: the checkpoint is not on this session's current lineage",
                             hint="roll back only to a point taken since the last reset, at or before now")
        self.settle(synced=False)
        self._states = list(cp.states)
        self._tokens = list(cp.tokens)
        self.last_logits = cp.last_logits

    def save(self, path, **kwargs) -> dict:
        """Write this session's whole state to a KV snapshot file (`homerun.engine.snapshot.save_session`)."""
        from homerun.engine.snapshot import save_session

        self.settle(synced=False)
        return save_session(self, path, **kwargs)

    def _ensure_capacity(self, n_total: int) -> None:
        ramp = self.model.ramp_tokens
        idx = self._cap_index
        while idx < len(ramp) and ramp[idx] < n_total:
            idx += 1
        if idx >= len(ramp):
            raise ContextFullError(
                f"context full: {n_total} tokens requested, the last ramp step is {ramp[-1]} tokens",
                hint="start a new session (/reset), or load with a larger ramp_tokens",
            )
        budget = self.model.kv_budget_bytes
        if idx != self._cap_index and budget is not None:
            need = self.model.kv_bytes_at(ramp[idx])
            if need > budget:
                raise ContextFullError(
                    f"context full: growing to {ramp[idx]} tokens needs {need / 1e9:.2f} GB of KV, "
                    f"over the budget of {budget / 1e9:.2f} GB ({self.n_tokens} tokens kept)",
                    hint="start a new session (/reset), or load with a larger kv_budget_bytes "
                         "(a plan for a bigger rig)",
                )
        if idx != self._cap_index and self.model.kv_on_devices:
            self._check_device_kv(ramp[idx])
        if idx != self._cap_index:
            more = self.model.kv_bytes_at(ramp[idx]) - self.kv_allocated_bytes
            free = self.model.free_kv_memory_bytes()
            if free is not None and more > FREE_MEMORY_SHARE * free:
                where = "RAM" if self.model.kv_device.type == "cpu" else f"{self.model.kv_device} memory"
                short = more - FREE_MEMORY_SHARE * free
                raise ContextFullError(
                    f"context full: growing to {ramp[idx]} tokens needs {more / 1e9:.2f} GB more KV, only "
                    f"{free / 1e9:.2f} GB of {where} is free ({self.n_tokens} tokens kept)",
                    hint=f"free about {short / 1e9:.2f} GB (close other programs) and send again, "
                         "or start a new session (/reset)",
                )
        while self._cap_index < idx:
            self._cap_index += 1
            if self.on_capacity is not None:
                self.on_capacity(self.capacity_tokens)

    def _check_device_kv(self, n_tokens: int) -> None:
        """KV on the layers' devices: the KV of each device's layers at the new step must fit what its budget has left (and,
        on CUDA, the device's live free memory), with decode graphs their static attention state of that context too
        (homerun.engine.graph_bytes.static_state_bytes, as the plan charges it)."""
        for name, dev in self.model.devices.items():
            layers = self.model.placement.layers_on(name)
            if not layers:
                continue
            more, graph = device_kv_more_bytes(self.model, name, n_tokens, [self._states[i] for i in layers])
            room = dev.free_bytes
            real = free_memory_bytes(dev.torch_device) if dev.is_cuda else None
            if real is not None:
                room = min(room, int(FREE_MEMORY_SHARE * real))
            if more > room:
                raise ContextFullError(
                    f"context full: growing to {n_tokens} tokens needs {more / 1e9:.3f} GB more KV on {name}"
                    + (f" ({graph / 1e9:.3f} GB of it the decode graphs' static state), " if graph else ", ") +
                    f"{room / 1e9:.3f} GB of its budget is left ({self.n_tokens} tokens kept)",
                    hint="start a new session (/reset), or plan for a shorter context or a bigger rig",
                )

    def feed(self, token_ids: Sequence[int] | torch.Tensor, *, on_device: bool = False) -> torch.Tensor:
        """Append tokens (any count) and return float32 logits [V] of the last position: on the host, or with
        `on_device` where the model computed them (no device-to-host copy)."""
        self.settle(synced=False)  # a deferred step's redo may replace the logits and states this feed starts from
        ids, vals = self.model._ids_and_list(token_ids)
        if ids.numel() == 0:
            if self._last_logits is None:
                raise UsageError("feed() needs at least one token on an empty session")
            return self._last_logits if on_device else self.last_logits
        logits = self._feed(ids, vals)
        return logits if on_device else self.last_logits

    def decode(self, token: torch.Tensor, token_id: int, *, defer: bool = False) -> torch.Tensor:
        """Append one sampled token and return float32 logits [V] on the model's device. `token` is the id as a
        tensor on that device (what `sampling.sample_tensor` returns) and `token_id` the same id read back: the step
        takes the tensor, so nothing waits on the host, and the token list takes the int. With `defer`, a speculated
        step's end is deferred (`unsettled`) and the logits are speculated: the caller reads back what it derives
        from them (the next id), then calls `settle(synced=True)`, whose check rides that one wait; anything else
        that uses the session settles it first. Without, the step is settled before it returns."""
        token_id = int(token_id)
        if token_id == NAN_TOKEN:  # sample_tensor's mark of NaN logits, read back by a caller that did not check it
            raise nan_logits_error(f"the token fed at context position {self.n_tokens}")
        if not 0 <= token_id < self.model.args.vocab_size:
            raise UsageError(f"token id out of range [0, {self.model.args.vocab_size}): {token_id}",
                             hint="token ids must come from this model's tokenizer")
        return self._feed(token.reshape(1), [token_id], defer_end=defer)

    @property
    def unsettled(self) -> bool:
        """Whether the last decode step's end is deferred (see `decode`)."""
        return self._deferred is not None

    def settle(self, synced: bool = False) -> torch.Tensor | None:
        """The deferred end of the last decode step (homerun.models.speculation). None: the step stands (or nothing
        was deferred). Else a speculated layer had missed: the step was redone from there, exactly, and these are
        its logits (on the device), which replace the old ones; what was sampled from those is void. `synced`: the
        caller has read back a value computed from the step's logits since (the sampled id), so the check makes no
        host wait of its own; False (the default) makes it wait for the step itself. If settling raises, the step
        is dropped: the session is what it was before it (states, tokens, logits)."""
        pending, self._deferred = self._deferred, None
        if pending is None:
            return None
        if self.model._unsettled is self:
            self.model._unsettled = None
        d, before = pending
        try:
            with torch.inference_mode(), self.model.step_bytes(before[0]):  # a redo is an eager step too
                got = d.settle(synced)
                if got is None:
                    return None
                hidden, states = got
                logits = self._net.logits(hidden[-1:])[0].float()
        except BaseException:
            self._states, n_tokens, self._last_logits = before
            del self._tokens[n_tokens:]
            raise
        self._states, self._last_logits = states, logits
        return logits

    def _feed(self, ids: torch.Tensor, vals: list[int], defer_end: bool = False) -> torch.Tensor:
        """The chunked forward of `ids` (whose values are `vals`): the new last logits, on the model's device.
        `defer_end`: a one-chunk step may leave its end unsettled (`decode`)."""
        self.settle(synced=False)  # before reading self._states: a pending redo replaces them
        self._ensure_capacity(self.n_tokens + ids.numel())
        n = ids.numel()
        long_prompt = n > PREFILL_ETA_MIN_TOKENS
        told = False
        if long_prompt and self.on_prefill is not None and self.model.prefill_tok_s:
            self.on_prefill(n / self.model.prefill_tok_s, n)
            told = True
        t0 = time.perf_counter()
        hidden = None
        chunk = self.model.max_chunk_tokens
        on_cpu = torch.device(self._net.device).type == "cpu"
        with torch.inference_mode(), cpu_step(n, self.n_tokens, on_cpu):
            for c0 in range(0, n, chunk):
                part = ids[c0 : c0 + chunk]
                tc = time.perf_counter()
                before = (self._states, self.n_tokens, self._last_logits)
                # only the last chunk's last row is read (its logits): the net's last layer runs that row alone
                hidden, states, deferred = self.model._forward(part, self.n_tokens, self._states, defer_end=defer_end,
                                                               out_rows=slice(-1, None) if c0 + chunk >= n else
                                                               slice(0, 0))
                # Commit point: state, a speculated step's pending end and token list change together, after the
                # whole chunk succeeded; a pending end is the model's to settle before any other forward.
                self._states, self._deferred = states, (None if deferred is None else (deferred, before))
                if deferred is not None:
                    self.model._unsettled = self
                self._tokens.extend(vals[c0 : c0 + chunk])
                self.model.forwards += 1
                self._last_logits = None  # until the last chunk's logits exist: an interrupt leaves none stale
                self.model._measure_prefill(part.numel(), time.perf_counter() - tc)
                if self.on_progress is not None:
                    self.on_progress(min(c0 + chunk, n), n)
                if long_prompt and not told and self.on_prefill is not None and self.model.prefill_tok_s:
                    self.on_prefill(max(0, n - c0 - chunk) / self.model.prefill_tok_s, n)
                    told = True
            logits = self._net.logits(hidden[-1:])[0].float()
        self._last_logits = logits
        self.model._account(n, time.perf_counter() - t0)
        return logits
