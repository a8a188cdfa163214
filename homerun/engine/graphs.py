"""One-token decode replayed from captured graphs (issue 13): CUDA graphs on a GPU, their CPU stand-in elsewhere.

A decode step launches ~30 kernels per layer, and on a GPU each launch costs the host several microseconds of Python
and driver work: at 43 layers that is the token's whole budget at 30 tok/s. Two layouts:

Whole step (every layer's experts resident; any kv_dtype, fp8 with its pages on the device): the step is one graph.
The attention cores run over static capacities with their lengths read on the device
(homerun.models.deepseek_v4.static_decode: the window in a fixed buffer, compressor closes computed always and kept
by a device-side slot, the CSA top-k over the capacity, masked), so the graph depends on the context only through
its capacity bucket (a power of two of the tokens, from MIN_BUCKET_TOKENS): it is captured at a bucket's first step
and again when the context crosses into the next one. The static state is the sequence's state while the graphs hold
it; each step hands back LayerStates that view one copy of its small tensors (windows, open windows, overlaps) and
share its entry stores, and a step from any other state (another session, an earlier state) copies that state in
first. Around the replay: the token id's copy, the position's fill and that copy (one launch per dtype).

Piecewise (a layer whose experts are cached, fp8 KV pages off the device, or `whole_step` off): everything in a layer
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
eagerly between two segments. The choice is per layer (`eager_routed`): a model whose layers are partly resident,
partly cached replays n_layers + 1 + n_cached segments (2 n_layers + 1 when every layer is cached):

  segment i.in   layer i's attention output -> the MoE's router (ids, weights), input, shared-expert projections
  (eager)        backend.forward(layer, input, ids, weights), copied into a static buffer
  segment i.out  the shared expert's down projection + the routed sum -> layer i+1's pre-attention (or the hidden)

A redo from layer r (the backend's end_token, after a missed speculation) replays from r's routed call; with static
cores, the layers after r are first reloaded from the step's input states, since their cores run again. The token id
and the position live in two static device tensors written before the replays. The piecewise segments are captured
once per model (with static cores, once per bucket), at the first decode step that uses them; valid for every later
position and session.

`EmulatedGraphs` is the CPU stand-in with a CUDA graph's semantics: capture records every ATen op and Triton launch
with the tensors it reads and writes, replay re-runs them on those same tensors, so whatever the captured code took
from the host at capture time (a Python int, a tensor made from one) replays as it was, as on CUDA. A host sync
during capture raises, as CUDA's capture does. Tests run the graphed decode against the eager one on stand-ins.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from homerun.kernels.counting import SYNC_OPS, launches_kernel, note_graph_replay
from homerun.engine.options import GRAPH_MODES
from homerun.kernels.dispatch import for_act, kernels_for
from homerun.models.deepseek_v4.static_decode import StaticDecodeKV, bucket_tokens
from homerun.models.kv import Fp8PagedRows, PagedRows

# The smallest context capacity of a whole-step graph (tokens): the buckets double from here, so a sequence of L
# tokens is captured about log2(L / 256) + 1 times and pads its compressed rows at most twofold.
MIN_BUCKET_TOKENS = 256


class GraphCaptureError(RuntimeError):
    """The captured code did something a graph cannot replay (a host sync)."""


# ----------------------------------------------------------------------------------------------- the graph APIs


class CudaGraphs:
    """torch.cuda.CUDAGraph per segment, every segment in one memory pool (their outputs stay alive between replays,
    so the pool holds one step's activations once)."""

    name = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def capture(self, fn: Callable[[], Any], reset: Callable[[], None] | None = None) -> tuple[Any, Any]:
        # One warm-up run on a side stream first (libraries create their handles and workspaces lazily, which a
        # capture must not do); the capture itself only records, so one replay computes this step's values.
        # reset: undoes the warm-up's writes to state the step advances in place (the whole-step graph's).
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            fn()
        cur.wait_stream(self.stream)
        if reset is not None:
            reset()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = fn()
        g.replay()
        return g, out

    def replay(self, g: Any) -> None:
        note_graph_replay()
        g.replay()


class _Recorder(TorchDispatchMode):
    """Records ATen ops (not views, metadata or bare allocations) as replayable steps; Triton launches come through
    `LaunchCounter.recorder`."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[Callable[[], None]] = []
        self._paused = 0

    @contextlib.contextmanager
    def kernel(self, run, args, kwargs) -> Iterator[None]:
        self.steps.append(lambda: run(*args, **kwargs))
        self._paused += 1  # the interpreter's own tensor work inside the launch is not part of the graph
        try:
            yield
        finally:
            self._paused -= 1

    def on_host_wait(self) -> None:  # homerun.kernels.counting.note_host_wait: an event wait, as CUDA refuses it
        raise GraphCaptureError("host sync (event wait) during graph capture")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            raise GraphCaptureError(f"host sync ({name}) during graph capture")
        if not launches_kernel(func, args, kwargs, out):  # views and aliases: the recorded tensor already is it
            return out
        self.steps.append(_aten_step(func, args, kwargs, out))
        return out


def _aten_step(func, args, kwargs, out) -> Callable[[], None]:
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]

    def step() -> None:
        res = [t for t in tree_leaves(func(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        for o, r in zip(outs, res):
            if o is not r and not (o.data_ptr() == r.data_ptr() and o.stride() == r.stride()):
                o.copy_(r)  # the op's result lands where the captured one did, as a graph's kernel writes

    return step


class EmulatedGraphs:
    """The CPU stand-in for CudaGraphs (see the module docstring). Capture runs the code twice, as CudaGraphs does: a
    warm-up, then once while recording it (its values are this step's)."""

    name = "emulated"

    def capture(self, fn: Callable[[], Any], reset: Callable[[], None] | None = None) -> tuple[Any, Any]:
        from homerun.kernels.triton import load

        common = load().common if load() is not None else None
        fn()  # the warm-up run CudaGraphs makes: a memo it fills must not leak into the recording unseen
        if reset is not None:
            reset()
        rec = _Recorder()
        old = common.LaunchCounter.recorder if common is not None else None
        if common is not None:
            common.LaunchCounter.recorder = rec.kernel
        try:
            with rec:
                out = fn()
        finally:
            if common is not None:
                common.LaunchCounter.recorder = old
        return rec.steps, out

    def replay(self, steps: list[Callable[[], None]]) -> None:
        note_graph_replay()
        with _disable_current_modes():  # a counting mode sees one graph launch, not the ops inside
            for step in steps:
                step()


# ----------------------------------------------------------------------------------------------- the decode runner


def unsupported_reason(net) -> str | None:
    """Why `net`'s decode step can't be captured (None when it can): one device running every layer and the head
    on the GPU kernel set. Any expert backend qualifies: one that is not graph-safe runs between the segments."""
    dev = net.device
    if any((lay.device or dev) != dev for lay in net.layers) or (net.head_device or dev) != dev:
        return "the layers span several devices"
    if net.embed_flavor != "gpu" or net.head_flavor != "gpu" or any(lay.flavor != "gpu" for lay in net.layers):
        return "not every layer runs the GPU kernel set"
    return None


def eager_routed_layers(backend, layers: Sequence[int]) -> list[bool]:
    """Per layer (model order): whether decode graphs run its routed-expert call eagerly between two segments. A layer
    the backend does not declare graph-safe (offload.base.ExpertBackend.graph_safe_layer) may sync, read the routing
    on the host, compute on the CPU or stream, so its call cannot be replayed."""
    return [not backend.graph_safe_layer(layer) for layer in layers]


def whole_step_reason(net, states: Sequence[Any]) -> str | None:
    """Why decode from `states` can't run as one whole-step graph (None when it can): every entry store must be of a
    format the static core mirrors (homerun.models.kv's PagedRows in any dtype, or Fp8PagedRows with its pages on
    the compute device: it quantizes where its pages lie, and the static core's lie on the device)."""
    for st in states:
        for c in (st.comp, st.index_comp):
            if c is None:
                continue
            if type(c.store) not in (PagedRows, Fp8PagedRows):
                return f"entries kept as {type(c.store).__name__}"
            if type(c.store) is Fp8PagedRows and c.store.device != net.device:
                return f"fp8 entries quantized on {c.store.device}, the static core's on {net.device}"
    return None


def layout_reason(backend, layers: Sequence[int]) -> str:
    """How decode graphs run with `backend`, for the runner's reason string (`homerun bench`'s decode_runner)."""
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
    captured with the rest of its MoE site (one segment "out"; when the next layer's call runs eagerly, the segment
    also holds the router's guess at it, issued after the replay); any other runs eagerly between two segments:
    segment "in" ends at the router's (ids, weights) and the experts' input, plus the next layer's router guess when
    the backend prefetches speculatively; the routed call reads those static buffers and its output is copied into
    one the segment "out" reads (the shared expert's down projection, the routed sum, the next layer's
    pre-attention). With any eager layer (`split`) the backend's token hooks (begin_token, the hash layers'
    prefetches, end_token and its redo from a missed layer) run as in net.forward: a redo replays the segments from
    that layer, whose inputs are still in their static buffers."""

    def __init__(self, net, graphs: CudaGraphs | EmulatedGraphs) -> None:
        reason = unsupported_reason(net)
        if reason is not None:
            raise ValueError(f"decode graphs unsupported: {reason}")
        self.net, self.graphs = net, graphs
        self.backend = net.experts  # the expert backend the graphs serve (whose launches they hold when graph-safe)
        self.eager_routed = eager_routed_layers(self.backend, [lay.index for lay in net.layers])
        self.k = kernels_for(net.device, net.compute_dtype, 1, net.embed_flavor)
        self.kl = for_act(self.k, net.experts.act)
        self.segments: dict[tuple, Any] = {}
        self._outs: dict[tuple, Any] = {}  # each segment's outputs: static buffers the later segments read
        self.core_out: dict[int, torch.Tensor] = {}  # layer position -> its core's output
        self.routed: dict[int, torch.Tensor] = {}  # eager routed calls (by layer position): sums copied in after each
        self._guesses: dict[int, torch.Tensor | None] = {}  # graph-safe layer -> its captured guess at the next one
        self.replays = 0  # decode steps served from the graphs (the capture step included)
        self.min_bucket_tokens = MIN_BUCKET_TOKENS
        self.whole_step = True  # False: the piecewise layout even where the whole step could be one graph
        self.static: StaticDecodeKV | None = None  # the whole-step graph's attention state (its bucket's)
        self._mine: tuple[int, list] | None = None  # (position, states) the static state holds: the last step's
        self.step_captures = 0  # whole-step graphs captured (one per bucket reached)
        self._sk: tuple = ()  # ("static",) while the segments hold static attention cores

    @property
    def captured(self) -> bool:
        return bool(self.segments)

    @property
    def split(self) -> bool:
        """Whether any layer's routed call runs eagerly (and the backend's token hooks run around the step)."""
        return any(self.eager_routed)

    def forward(self, ids: torch.Tensor, start_pos: int, states: Sequence[Any]) -> tuple[torch.Tensor, list]:
        net = self.net
        if not self.segments:
            dev = net.device
            self.ids_buf = ids.reshape(1).to(dev, torch.int64).clone()
            self.pos_buf = torch.full((1,), start_pos, dtype=torch.int64, device=dev)
        else:
            self.ids_buf.copy_(ids.reshape(1), non_blocking=True)
            self.pos_buf.fill_(start_pos)
        static = self.whole_step and whole_step_reason(net, states) is None
        self._sk = ("static",) if static else ()  # segment keys: those with static cores inside are apart
        if static:
            self._static_for(start_pos, states)
            if not self.split:
                return self._forward_whole(start_pos)
        if self.split:  # the token hooks, as net.forward calls them (a graph-safe backend's are no-ops)
            net._begin_token(ids.reshape(1))
        self._segment(("embed",) + self._sk, self._embed)
        first, new_states = 0, []
        while True:
            new_states[first:] = self._layers(first, start_pos, states)
            redo = self.backend.end_token() if self.split else None
            if redo is None:
                break
            first = next(i for i, lay in enumerate(net.layers) if lay.index == redo)
            if static:  # the cores after the redone layer's call run again: from the step's input state
                self.static.load(states, start_pos, range(first + 1, len(net.layers)))
        self.replays += 1
        if static:
            new_states = self.static.states(start_pos + 1)
            self._mine = (start_pos + 1, new_states)
        return self._outs[("out", len(net.layers) - 1) + self._sk], new_states

    def _static_for(self, start_pos: int, states: Sequence[Any]) -> None:
        """The static attention state of start_pos's bucket holding `states` (new buffers when the bucket changes:
        the graphs holding the old ones are dropped)."""
        cap = bucket_tokens(start_pos, self.min_bucket_tokens)
        kv = self.static
        if kv is None or kv.ctx_tokens != cap:
            for key in [k for k in self.segments if k[-1] in ("static", "step")]:
                del self.segments[key], self._outs[key]
            self.static = None  # the old buffers live on only in the states that view them
            self.static = StaticDecodeKV(self.net, cap, _accounts(states), like=states)
            self.static.load(states, start_pos)
        elif not self._holds(start_pos, states):  # another sequence, or this one from an earlier state
            kv.load(states, start_pos)

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
        (homerun.models.deepseek_v4.static_decode), captured at the bucket's first step."""
        key = ("step",)
        self.step_captures += key not in self.segments
        out = self._segment(key, self._step)
        new_states = self.static.states(start_pos + 1)
        self._mine = (start_pos + 1, new_states)
        self.replays += 1
        return out, new_states

    def _holds(self, start_pos: int, states: Sequence[Any]) -> bool:
        """Whether the static state is `states` at start_pos: the ones the last whole step returned."""
        if self._mine is None or self._mine[0] != start_pos or len(states) != len(self._mine[1]):
            return False
        return all(a is b for a, b in zip(states, self._mine[1]))

    def _step(self) -> torch.Tensor:
        """The whole decode step (captured): embedding, every layer with its static attention core and its routed
        call, the final hidden."""
        net, kl, kv = self.net, self.kl, self.static
        net.__dict__.pop("_rope_memo", None)  # see _embed: each run computes the position's RoPE tables
        kv.begin_step(self.pos_buf)
        x = net._embed(self.ids_buf)
        for i, layer in enumerate(net.layers):
            pa = net._pre_attention(layer, x, self.pos_buf, kl)
            out = kv.core(i, pa, kl)
            mi = net._moe_in(layer, net._attn_out(layer, x, pa, out, kl), self.ids_buf, kl)
            x = net._moe_out(layer, mi, self.backend.forward(layer.index, mi.h, mi.idx, mi.w), kl)
        return net._final(x, self.k)

    def _segment(self, key: tuple, fn: Callable[[], Any]) -> Any:
        """Capture `fn` as segment `key` at its first use (its outputs are this step's), replay it afterwards."""
        seg = self.segments.get(key)
        if seg is None:
            reset = self._static_reset() if key[-1] in ("static", "step") else None  # warm-ups advance static state
            seg, self._outs[key] = self.graphs.capture(fn, reset)
            self.segments[key] = seg
        else:
            self.graphs.replay(seg)
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

    def _layers(self, first: int, start_pos: int, states: Sequence[Any]) -> list:
        """Layers first.. of the step: each core eagerly, then the layer's segments (and routed call)."""
        net, kl, layers, sk = self.net, self.kl, self.net.layers, self._sk
        new_states = []
        for i in range(first, len(layers)):
            layer = layers[i]
            x, pa, buf = self._outs[("embed",) + sk if i == 0 else ("out", i - 1) + sk]
            if buf is None:  # the core runs eagerly (with static cores it ran inside the segment before)
                out, st = net._attention_core(layer, pa, start_pos, states[i], kl)
                new_states.append(st)
                buf = _into_static(self.core_out, i, out)
            if not self.eager_routed[i]:
                self._segment(("out", i) + sk, lambda: self._whole(i, x, pa, buf))
                guess = self._guesses.get(i)
                if guess is not None and self.backend.wants_speculation_for(layer.index + 1):
                    self.backend.prefetch_speculative(layer.index + 1, guess)
                continue
            mi, guess = self._segment(("in", i) + sk, lambda: self._moe_in(i, x, pa, buf))
            if guess is not None and self.backend.wants_speculation_for(layer.index + 1):
                self.backend.prefetch_speculative(layer.index + 1, guess)
            res = _into_static(self.routed, i, self.backend.forward(layer.index, mi.h, mi.idx, mi.w))
            self._segment(("out", i) + sk, lambda: self._after(i, net._moe_out(layer, mi, res, kl)))
        return new_states

    def _whole(self, i: int, x, pa, core_out):
        """A graph-safe layer's post-attention, its routed call inside (net._post_attention's math). When the next
        layer's call runs eagerly, the router's guess at it is made here too and kept for after the replay: inside a
        capture the backend's prefetch hook would run only once."""
        net, layer, kl = self.net, self.net.layers[i], self.kl
        mi = net._moe_in(layer, net._attn_out(layer, x, pa, core_out, kl), self.ids_buf, kl)
        nxt = i + 1 < len(self.eager_routed) and self.eager_routed[i + 1]
        self._guesses[i] = net._next_layer_guess(layer, mi.h, self.ids_buf) if nxt else None
        return self._after(i, net._moe_out(layer, mi, self.backend.forward(layer.index, mi.h, mi.idx, mi.w), kl))

    def _moe_in(self, i: int, x, pa, core_out):
        net, layer = self.net, self.net.layers[i]
        mi = net._moe_in(layer, net._attn_out(layer, x, pa, core_out, self.kl), self.ids_buf, self.kl)
        # The guess costs a router pass per layer; it is made whether or not this step prefetches, since a backend's
        # wish to (wants_speculation) changes from token to token.
        return mi, net._next_layer_guess(layer, mi.h, self.ids_buf)

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


def _into_static(bufs: dict[int, torch.Tensor], i: int, t: torch.Tensor) -> torch.Tensor:
    """t copied into the i-th static buffer of `bufs` (made from t at the capture step), which later segments read."""
    if i not in bufs:
        bufs[i] = t.clone()
    else:
        bufs[i].copy_(t)
    return bufs[i]


def decode_graphs_for(net, mode: str) -> tuple[DecodeGraphs | None, str]:
    """The decode runner `mode` asks for ("auto": on a CUDA device when supported; "on": also on CUDA stand-ins,
    through EmulatedGraphs; "off"), and the reason for the choice."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"unknown graph mode {mode!r}")
    if mode == "off":
        return None, "off by request"
    reason = unsupported_reason(net)
    if reason is not None:
        return None, reason
    layout = layout_reason(net.experts, [lay.index for lay in net.layers])
    if net.device.type == "cuda":
        return DecodeGraphs(net, CudaGraphs(net.device)), f"captured: CUDA graphs, {layout}"
    if mode == "on":
        return DecodeGraphs(net, EmulatedGraphs()), f"captured: emulated graphs (a CUDA stand-in), {layout}"
    return None, "a CUDA stand-in (graphs emulated only when asked for)"
