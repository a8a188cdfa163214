"""One-token decode replayed from captured graphs (issue 13): CUDA graphs on a GPU, their CPU stand-in elsewhere.

A decode step launches ~30 kernels per layer, and on a GPU each launch costs the host several microseconds of Python
and driver work: at 43 layers that is the token's whole budget at 30 tok/s. Two layouts:

Whole step (every layer's experts resident; any kv_dtype, its pages on the device): the step is one graph.
The attention cores run over static capacities with their lengths read on the device
(homerun.models.deepseek_v4.static_decode: the window in a fixed buffer, compressor closes computed always and kept
by a device-side slot, the CSA top-k over the capacity, masked), so the graph depends on the context only through
its capacity bucket (a power of two of the tokens, from MIN_BUCKET_TOKENS): it is captured at a bucket's first step
and again when the context crosses into the next one. The static state is the sequence's state while the graphs hold
it; each step hands back LayerStates that view one copy of its small tensors (windows, open windows, overlaps) and
share its entry stores, and a step from any other state (another session, an earlier state) copies that state in
first. Around the replay: the token id's copy, the position's fill and that copy (one launch per dtype).

Across devices (a pipeline split: the placement's device names, stand-ins included, homerun.engine.graph_sites): the
step is cut into runs of consecutive parts on one device (embedding, layers, head), each run one whole-step graph
captured on its device (its own graph API: a CUDA graph on that device's stream and pool), over its device's shard
of the static attention state; between the replays the residual streams are copied into the next run's static
input (one launch per hop), and the token id and position are written on every device. Layouts that run anything
eagerly between segments (cached experts, KV pages off the device, `whole_step` off) are one-device only: across
devices those steps run the eager forward.

Piecewise (a layer whose experts are cached, KV pages off the device, or `whole_step` off): everything in a layer
except its attention core and its routed call depends on the token only through device tensors (the streams, the
token id, the RoPE tables of the position), so it is captured once and replayed:

  segment 0      embed(token) -> layer 0's pre-attention
  segment i      layer i-1's post-attention (output projections, MoE) -> layer i's pre-attention
  segment n      layer n-1's post-attention -> final hidden

Where the static core mirrors the KV stores (`whole_step_reason`) the static cores go into the segments too (layer
i's at the end of the segment that makes its pre-attention; keys carry "static"); otherwise the eager cores, which
size their work from the context, run between the replays, their outputs copied into static buffers. That layout
holds the routed experts' launches, so it needs a layer whose expert backend declares it graph-safe (all its experts
resident: offload.base.ExpertBackend.graph_safe_layer). The hybrid backend (a device cache over the host store)
reads each layer's routing on the host, serves misses on the CPU or streams them, so a cached layer's call runs
eagerly between two segments. The choice is per layer (`eager_routed`): with eager cores a model whose layers are
partly resident, partly cached replays n_layers + 1 + n_cached segments (2 n_layers + 1 when every layer is cached):

  segment i.in   layer i's attention output -> the MoE's router (ids, weights), input, shared-expert projections
  (eager)        backend.forward(layer, input, ids, weights), copied into a static buffer
  segment i.out  the shared expert's down projection + the routed sum -> layer i+1's pre-attention (or the hidden)

With static cores nothing runs on the host between a segment "out" and the next "in" (the core between them is
captured), so the step is one segment per stretch between two eager routed calls: n_cached + 1 replays, every
graph-safe layer in between captured whole (keys ("run", j): the stretch after layer j's call, -1 from the
embedding). A router guess at the next layer, where the backend may read one, is a segment of its own, replayed only
on the tokens that read it (not a speculated one).

A redo from layer r (the backend's end_token, after a missed speculation) replays from r's routed call; with static
cores, the layers after r are first reloaded from the step's input states, since their cores run again. The token id
and the position live in two static device tensors written before the replays. The piecewise segments are captured
once per model (with static cores, once per bucket), at the first decode step that uses them; valid for every later
position and session.

The graphs are CUDA graphs, or on a CUDA stand-in `EmulatedGraphs` (homerun.engine.graph_api), which replay with a
CUDA graph's semantics; tests run the graphed decode against the eager one on stand-ins.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch

from homerun.engine.graph_api import CudaGraphs, EmulatedGraphs, GraphCaptureError  # noqa: F401 - re-exported
from homerun.engine.graph_sites import ShardedStaticKV, step_runs
from homerun.engine.options import GRAPH_MODES
from homerun.kernels.device_guard import on_device
from homerun.kernels.dispatch import for_act, kernels_for
from homerun.models.decode_bytes import MIN_BUCKET_TOKENS
from homerun.models.deepseek_v4.static_decode import StaticDecodeKV, bucket_for
from homerun.models.kv import Fp8PagedRows, PagedRows
from homerun.models.speculation import DeferredEnd, end_or_defer
from homerun.plan.records import graphs_across_devices_reason


# ----------------------------------------------------------------------------------------------- the decode runner


def unsupported_reason(net, sites: Sequence[str] | None = None) -> str | None:
    """Why `net`'s decode step can't be captured (None when it can): every layer and the head on the GPU kernel set.
    On one device any expert backend qualifies (one that is not graph-safe runs between the segments); across
    devices (`sites`: the placement's device names, homerun.engine.graph_sites) the step is one graph per device,
    which holds every routed call."""
    if net.embed_flavor != "gpu" or net.head_flavor != "gpu" or any(lay.flavor != "gpu" for lay in net.layers):
        return "not every layer runs the GPU kernel set"
    runs = step_runs(net, sites)
    if len(runs) > 1:
        eager = sum(eager_routed_layers(net.experts, [lay.index for lay in net.layers]))
        return graphs_across_devices_reason(len({r.site for r in runs}), eager)
    return None


def eager_routed_layers(backend, layers: Sequence[int]) -> list[bool]:
    """Per layer (model order): whether decode graphs run its routed-expert call eagerly between two segments. A layer
    the backend does not declare graph-safe (offload.base.ExpertBackend.graph_safe_layer) may sync, read the routing
    on the host, compute on the CPU or stream, so its call cannot be replayed."""
    return [not backend.graph_safe_layer(layer) for layer in layers]


def whole_step_reason(net, states: Sequence[Any]) -> str | None:
    """Why decode from `states` can't run as one whole-step graph (None when it can): every entry store must be of a
    format the static core mirrors (homerun.models.kv's PagedRows in any dtype, or Fp8PagedRows) with its pages on
    the layer's device: the static core adopts the stores (its buffers become their pages), and a copy of KV kept
    elsewhere (host RAM when the device has no room for it) would put the whole bucket on the device, uncharged."""
    for i, st in enumerate(states):
        for c in (st.comp, st.index_comp):
            if c is None:
                continue
            if type(c.store) not in (PagedRows, Fp8PagedRows):
                return f"entries kept as {type(c.store).__name__}"
            dev = net.layers[i].device or net.device
            if c.store.device != dev or c.store.compute_device != dev:
                return f"entries kept on {c.store.device}, the static core's on {dev}"
    return None


def layout_reason(backend, layers: Sequence[int], runs: Sequence[Any] = ()) -> str:
    """How decode graphs run with `backend`, for the runner's reason string (`homerun bench`'s decode_runner)."""
    if len(runs) > 1:
        return (f"one graph per device and step ({len(runs)} graphs on {len({r.site for r in runs})} devices, "
                f"streams copied between them), else eager")
    eager = eager_routed_layers(backend, layers)
    if not any(eager):
        return "one graph per step, else experts in the segments"
    if all(eager):
        return "experts eager between segments"
    return f"experts in the segments, eager between segments in {sum(eager)} of {len(eager)} layers"


class DecodeGraphs:
    """The model's one-token forward as captured segments with eager attention cores between them (module
    docstring). `forward` has net.forward's contract for T == 1, except that the returned hidden is a static
    buffer, valid until the next decode step.

    Two layouts per layer, chosen by the expert backend (`eager_routed`): a graph-safe layer's routed call is
    captured with the rest of its MoE site (one segment "out"); any other runs eagerly between two segments:
    segment "in" ends at the router's (ids, weights) and the experts' input; the routed call reads those static
    buffers and its output is copied into one the segment "out" reads (the shared expert's down projection, the
    routed sum, the next layer's pre-attention). The router's guess at the next layer, where the backend may read
    one (`guesses_layer`), is a segment "guess" of its own after the layer's, replayed only on tokens whose backend
    reads it (`wants_speculation_for`: not a speculated one) and handed to the prefetch hook before the next call.
    With static cores the segments between two eager calls are one ("run", module docstring). With any eager layer
    (`split`) the backend's token hooks (begin_token, the hash layers' prefetches, end_token and its redo from a
    missed layer) run as in net.forward: a redo replays the segments from that layer, whose inputs are still in
    their static buffers."""

    def __init__(self, net, graphs: CudaGraphs | EmulatedGraphs | dict, sites: Sequence[str] | None = None) -> None:
        """graphs: the graph API, or one per site (a dict by site name: a CUDA graph is captured on its device's
        stream). sites: the placement's device names for [embedding, layers.., head] (homerun.engine.graph_sites)."""
        reason = unsupported_reason(net, sites)
        if reason is not None:
            raise ValueError(f"decode graphs unsupported: {reason}")
        self.runs = step_runs(net, sites)
        self.multi = len(self.runs) > 1  # across devices: whole steps, one graph per run, else the eager forward
        self.graphs_by_site = graphs if isinstance(graphs, dict) else {r.site: graphs for r in self.runs}
        self.net, self.graphs = net, self.graphs_by_site[self.runs[0].site]
        self.backend = net.experts  # the expert backend the graphs serve (whose launches they hold when graph-safe)
        self.eager_routed = eager_routed_layers(self.backend, [lay.index for lay in net.layers])
        self.k = kernels_for(net.device, net.compute_dtype, 1, net.embed_flavor)
        self.kl = for_act(self.k, net.experts.act)
        self.segments: dict[tuple, Any] = {}
        self._outs: dict[tuple, Any] = {}  # each segment's outputs: static buffers the later segments read
        self.core_out: dict[int, torch.Tensor] = {}  # layer position -> its core's output
        self.routed: dict[int, torch.Tensor] = {}  # eager routed calls (by layer position): sums copied in after each
        self._hops: dict[int, torch.Tensor] = {}  # across devices: run j's input streams, copied from run j-1's
        # Per layer position: whether a router guess at the next layer may be read (the backend's static answer,
        # guesses_layer; none before a hash layer or after the last). The guess is its own segment, replayed only
        # on the tokens whose backend wants it (wants_speculation_for), reading the layer's MoE input (_guess_h).
        lays = net.layers
        self.guess_at = [i + 1 < len(lays) and lays[i + 1].moe.tid2eid is None
                          and self.backend.guesses_layer(lays[i + 1].index) for i in range(len(lays))]
        self._guess_h: dict[int, torch.Tensor] = {}
        self.replays = 0  # decode steps served from the graphs (the capture step included)
        self.min_bucket_tokens = MIN_BUCKET_TOKENS
        self.whole_step = True  # False: the piecewise layout even where the whole step could be one graph
        self.static: StaticDecodeKV | None = None  # the whole-step graph's attention state (its bucket's)
        # (position, weak references to the states) the static state holds: the last step's (weak: a dropped
        # session's states die, so the static state copies nothing for them, StaticDecodeKV._detach)
        self._mine: tuple[int, list] | None = None
        self.step_captures = 0  # whole-step graphs captured (one per bucket reached)
        self._sk: tuple = ()  # ("static",) while the segments hold static attention cores

    @property
    def captured(self) -> bool:
        return bool(self.segments)

    @property
    def split(self) -> bool:
        """Whether any layer's routed call runs eagerly (and the backend's token hooks run around the step)."""
        return any(self.eager_routed)

    def forward(self, ids: torch.Tensor, start_pos: int, states: Sequence[Any], *,
                defer_end: bool = False) -> tuple[torch.Tensor, list, DeferredEnd | None]:
        """net.forward_step's: (hidden, states, the DeferredEnd of a speculated step with `defer_end`, else None).
        With the first run's device current (on one device, every eager part between the segments needs it; across
        devices each run's part enters its own)."""
        with self._on(self.runs[0]):
            return self._forward(ids, start_pos, states, defer_end)

    @staticmethod
    def _on(run) -> on_device:
        return on_device(run.device, run.site)

    def _forward(self, ids: torch.Tensor, start_pos: int, states: Sequence[Any], defer_end: bool):
        net = self.net
        static = self.whole_step and whole_step_reason(net, states) is None
        if self.multi and not static:  # across devices only whole steps are captured
            return net.forward_step(ids, start_pos, states, defer_end=defer_end)
        if not self.segments:  # the token id and the position in static tensors, one pair per device
            self._bufs = {r.site: (ids.reshape(1).to(r.device, torch.int64).clone(),
                                   torch.full((1,), start_pos, dtype=torch.int64, device=r.device))
                          for r in self.runs}
            self.ids_buf, self.pos_buf = self._bufs[self.runs[0].site]
        else:
            for ids_buf, pos_buf in self._bufs.values():
                ids_buf.copy_(ids.reshape(1), non_blocking=True)
                pos_buf.fill_(start_pos)
        self._sk = ("static",) if static else ()  # segment keys: those with static cores inside are apart
        if static:
            self._static_for(start_pos, states)
            if not self.split:
                return (*self._forward_whole(start_pos), None)
        spec = net._begin_token(ids.reshape(1)) if self.split else False  # the token hooks, as net.forward's
        if static:
            self._stretches(None)
            new_states = []
        else:
            self._segment(("embed",), self._embed)
            new_states = self._layers(0, start_pos, states)

        def redo(layer_index: int) -> tuple[torch.Tensor, list]:  # may run after forward returned (a deferred end)
            first = next(i for i, lay in enumerate(net.layers) if lay.index == layer_index)
            with self._on(self.runs[0]):
                if static:  # the cores after the redone layer's call run again: from the step's input state
                    self.static.load(states, start_pos, range(first + 1, len(net.layers)))
                    self._stretches(first)
                    tail = []
                else:
                    tail = self._layers(first, start_pos, states)
            self.backend.end_token()  # the exact rerun's end: it stands
            return self._stand(start_pos, static, new_states[:first] + tail)

        self.replays += 1
        return end_or_defer(self.backend, spec, defer_end, lambda: self._stand(start_pos, static, new_states), redo,
                            end=self.split)

    def _stand(self, start_pos: int, static: bool, new_states: list) -> tuple[torch.Tensor, list]:
        """The step's final hidden (a static buffer) and its states (with static cores: views of the static state)."""
        if not static:
            return self._outs[("out", len(self.net.layers) - 1)], new_states
        return self._hidden, self._static_states(start_pos)

    def _static_states(self, start_pos: int) -> list:
        """The static state after the step at start_pos as LayerStates, remembered (weakly) as the ones it holds."""
        new_states = self.static.states(start_pos + 1)
        self._mine = (start_pos + 1, [weakref.ref(st) for st in new_states])
        return new_states

    def _static_for(self, start_pos: int, states: Sequence[Any]) -> None:
        """The static attention state of start_pos's bucket holding `states` (new buffers when the bucket changes:
        the graphs holding the old ones are dropped)."""
        cap = bucket_for(self.net, states, start_pos, self.min_bucket_tokens)  # holds every row the stores hand out
        if self.static is None or self.static.ctx_tokens != cap:
            for key in [k for k in self.segments if k[-1] in ("static", "step")]:
                del self.segments[key], self._outs[key]
            # No reference to the old state may outlive this line: its arena, row numbers and reservation go back to
            # the budget before the new one's are charged (the plan charges one state), its stores live on only in
            # the states that view them, which the new state adopts.
            self.static = None
            self.static = (ShardedStaticKV(self.net, self.runs, cap, _accounts(states), like=states) if self.multi
                           else StaticDecodeKV(self.net, cap, _accounts(states), like=states))
            self.static.load(states, start_pos)
        elif not self._holds(start_pos, states):  # another sequence, or this one from an earlier state
            self.static.load(states, start_pos)

    def _static_reset(self) -> Callable[[], None]:
        """Undoes a capture's warm-up run, which advanced the static state in place: back to the state before."""
        kv = self.static
        saved = kv.arena.snapshot()

        def reset() -> None:
            for dt, t in kv.arena.bufs.items():
                t.copy_(saved[dt])

        return reset

    def _forward_whole(self, start_pos: int) -> tuple[torch.Tensor, list]:
        """Every layer resident: the step as one graph over the static attention state of the context's bucket
        (homerun.models.deepseek_v4.static_decode), captured at the bucket's first step. Across devices, one graph
        per run of the step on one device (keys (j, "step")), the streams copied eagerly into the next run's
        static input between the replays."""
        if not self.multi:
            self.step_captures += ("step",) not in self.segments
            out = self._segment(("step",), lambda: self._step(self.runs[0], None))
        else:
            self.step_captures += (0, "step") not in self.segments
            out = None
            for j, run in enumerate(self.runs):
                if j:
                    out = _into_static(self._hops, j, out, run.device)
                with self._on(run):
                    out = self._segment((j, "step"), lambda run=run, x=out: self._step(run, x), run.site)
        self.replays += 1
        return out, self._static_states(start_pos)

    def _holds(self, start_pos: int, states: Sequence[Any]) -> bool:
        """Whether the static state is `states` at start_pos: the ones the last whole step returned."""
        if self._mine is None or self._mine[0] != start_pos or len(states) != len(self._mine[1]):
            return False
        return all(a is b() for a, b in zip(states, self._mine[1]))

    def _step(self, run, x: torch.Tensor | None) -> torch.Tensor:
        """The whole decode step's part on one device (captured; on one device, the whole step): the embedding (the
        first run), its layers with their static attention cores and routed calls from the streams x, the final
        hidden (the last run; else the streams)."""
        net, kl, kv = self.net, self.kl, self.static
        ids, pos = self._bufs[run.site]
        net.__dict__.pop("_rope_memo", None)  # see _embed: each run computes the position's RoPE tables
        if len(run.layers):
            (kv.shard_of_run(run) if self.multi else kv).begin_step(pos)
        if run.embed:
            x = net._embed(ids)
        for i in run.layers:
            layer = net.layers[i]
            pa = net._pre_attention(layer, x, pos, kl)
            out = kv.core(i, pa, kl)
            mi = net._moe_in(layer, net._attn_out(layer, x, pa, out, kl), ids, kl)
            x = net._moe_out(layer, mi, self.backend.forward(layer.index, mi.h, mi.idx, mi.w), kl)
        return net._final(x, self.k) if run.head else x

    def _segment(self, key: tuple, fn: Callable[[], Any], site: str | None = None) -> Any:
        """Capture `fn` as segment `key` at its first use (its outputs are this step's), replay it afterwards; on
        `site`'s graphs (default: the first device's)."""
        graphs = self.graphs if site is None else self.graphs_by_site[site]
        seg = self.segments.get(key)
        if seg is None:
            reset = self._static_reset() if key[-1] in ("static", "step") else None  # warm-ups advance static state
            seg, self._outs[key] = graphs.capture(fn, reset)
            self.segments[key] = seg
        else:
            graphs.replay(seg)
        return self._outs[key]

    def _embed(self):
        net = self.net
        # The RoPE tables of the position, computed here once per step: the model memoizes them per positions
        # tensor, and a memo filled by a capture's warm-up run would be read, never recomputed, by the replays.
        net.__dict__.pop("_rope_memo", None)
        net._rope(net.freqs_main, self.pos_buf, self.kl)
        net._rope(net.freqs_compress, self.pos_buf, self.kl)
        x = net._embed(self.ids_buf)
        pa = net._pre_attention(net.layers[0], x, self.pos_buf, self.kl)
        if not self._sk:
            return x, pa, None
        self.static.begin_step(self.pos_buf)
        return x, pa, self.static.core(0, pa, self.kl)

    def _stretches(self, redo: int | None) -> None:
        """With static cores: the step (or its redo from the eager layer at position `redo`, whose MoE input is still
        in its segment's buffers) as one segment per stretch between two eager routed calls, n_eager + 1 replays:
        nothing runs on the host between one call's output and the next call's input. Each stretch's guesses are
        issued after its replay, before the next routed call."""
        n, sk = len(self.net.layers), self._sk
        if redo is None:
            lo, out = 0, self._segment(("run", -1) + sk, lambda: self._stretch(-1))
        else:  # the stretch that ended at the redone layer's MoE input, not replayed again
            lo, out = redo, self._outs[("run", max((j for j in range(redo) if self.eager_routed[j]), default=-1)) + sk]
        while True:
            end, mi = out
            for p in range(lo, min(end, n - 1) + 1):
                self._guess(p)
            if end == n:
                self._hidden = mi
                return
            layer = self.net.layers[end]
            res = _into_static(self.routed, end, self.backend.forward(layer.index, mi.h, mi.idx, mi.w))
            out = self._segment(("run", end) + sk, lambda: self._stretch(end, mi, res))
            lo = end + 1

    def _stretch(self, start: int, mi=None, routed=None) -> tuple[int, Any]:
        """A stretch (captured): layer `start`'s MoE output from its routed sum (start -1: the embedding), then every
        layer up to the next eager one, whose MoE input ends it -> (its position, its _MoEIn), or (n, final hidden)."""
        net, kl, n = self.net, self.kl, len(self.net.layers)
        cur = self._embed() if start < 0 else self._after(start, net._moe_out(net.layers[start], mi, routed, kl))
        for i in range(start + 1, n):  # cur: layer i's (streams, pre-attention, core output)
            if self.eager_routed[i]:
                mi = self._moe_in(i, *cur)
                self._guess_h[i] = mi.h
                return i, mi
            cur = self._whole(i, *cur)
        return n, cur

    def _layers(self, first: int, start_pos: int, states: Sequence[Any]) -> list:
        """Eager cores: layers first.. of the step, each core eagerly, then the layer's segments (and routed call)."""
        net, kl, layers = self.net, self.kl, self.net.layers
        new_states = []
        for i in range(first, len(layers)):
            layer = layers[i]
            x, pa, _ = self._outs[("embed",) if i == 0 else ("out", i - 1)]
            out, st = net._attention_core(layer, pa, start_pos, states[i], kl)
            new_states.append(st)
            buf = _into_static(self.core_out, i, out)
            if not self.eager_routed[i]:
                self._segment(("out", i), lambda: self._whole(i, x, pa, buf))
                self._guess(i)
                continue
            mi = self._segment(("in", i), lambda: self._moe_in(i, x, pa, buf))
            self._guess_h[i] = mi.h
            self._guess(i)
            res = _into_static(self.routed, i, self.backend.forward(layer.index, mi.h, mi.idx, mi.w))
            self._segment(("out", i), lambda: self._after(i, net._moe_out(layer, mi, res, kl)))
        return new_states

    def _whole(self, i: int, x, pa, core_out):
        """A graph-safe layer's post-attention, its routed call inside (net._post_attention's math). Its MoE input is
        kept for the guess segment when the next layer's guess may be read."""
        net, layer, kl = self.net, self.net.layers[i], self.kl
        mi = net._moe_in(layer, net._attn_out(layer, x, pa, core_out, kl), self.ids_buf, kl)
        if self.guess_at[i]:
            self._guess_h[i] = mi.h
        return self._after(i, net._moe_out(layer, mi, self.backend.forward(layer.index, mi.h, mi.idx, mi.w), kl))

    def _moe_in(self, i: int, x, pa, core_out):
        net, layer = self.net, self.net.layers[i]
        return net._moe_in(layer, net._attn_out(layer, x, pa, core_out, self.kl), self.ids_buf, self.kl)

    def _guess(self, i: int) -> None:
        """The router's guess at layer i+1 from layer i's MoE input, handed to the backend's prefetch hook: replayed
        only on a token whose backend reads it (a speculated token reads none), in a segment of its own, since the
        layout is captured once and the wish changes from token to token."""
        layer = self.net.layers[i]
        if not self.guess_at[i] or not self.backend.wants_speculation_for(layer.index + 1):
            return
        guess = self._segment(("guess", i) + self._sk,
                              lambda: self.net._next_layer_guess(layer, self._guess_h[i], self.ids_buf))
        self.backend.prefetch_speculative(layer.index + 1, guess)

    def _after(self, i: int, y: torch.Tensor):
        """Layer i's output streams y -> the next layer's (streams, pre-attention), or the final hidden."""
        net = self.net
        if i + 1 < len(net.layers):
            pa = net._pre_attention(net.layers[i + 1], y, self.pos_buf, self.kl)
            return y, pa, (self.static.core(i + 1, pa, self.kl) if self._sk else None)
        return net._final(y, self.k)


def _accounts(states: Sequence[Any]) -> list:
    """Per layer, the budgeted device its KV pages are charged to (None: not a placed model's)."""
    out = []
    for st in states:
        c = st.comp if st.comp is not None else st.index_comp
        out.append(c.store.account if c is not None else None)
    return out


def _into_static(bufs: dict[int, torch.Tensor], i: int, t: torch.Tensor,
                 device: torch.device | None = None) -> torch.Tensor:
    """t copied into the i-th static buffer of `bufs` (made from t at the capture step, on `device`: default t's),
    which later segments read."""
    if i not in bufs:
        bufs[i] = t.to(device or t.device, copy=True)
    else:
        bufs[i].copy_(t)
    return bufs[i]


def decode_graphs_for(net, mode: str, sites: Sequence[str] | None = None) -> tuple[DecodeGraphs | None, str]:
    """The decode runner `mode` asks for ("auto": on CUDA devices when supported; "on": also on CUDA stand-ins,
    through EmulatedGraphs; "off"), and the reason for the choice. sites: the placement's device names for
    [embedding, layers.., head] (homerun.engine.graph_sites), one graph API per device."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"unknown graph mode {mode!r}")
    if mode == "off":
        return None, "off by request"
    reason = unsupported_reason(net, sites)
    if reason is not None:
        return None, reason
    runs = step_runs(net, sites)
    layout = layout_reason(net.experts, [lay.index for lay in net.layers], runs)
    devices = {r.site: r.device for r in runs}
    kinds = {d.type for d in devices.values()}
    if kinds == {"cuda"}:
        graphs = {site: CudaGraphs(d) for site, d in devices.items()}
        return DecodeGraphs(net, graphs, sites), f"captured: CUDA graphs, {layout}"
    if "cuda" in kinds:
        return None, "the step spans CUDA devices and CUDA stand-ins"
    if mode == "on":
        graphs = {site: EmulatedGraphs() for site in devices}
        return DecodeGraphs(net, graphs, sites), f"captured: emulated graphs (a CUDA stand-in), {layout}"
    return None, "a CUDA stand-in (graphs emulated only when asked for)"
