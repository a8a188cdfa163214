"""One-token decode replayed from captured graphs (issue 13): CUDA graphs on a GPU, their CPU stand-in elsewhere.

A decode step launches ~30 kernels per layer, and on a GPU each launch costs the host several microseconds of Python
and driver work: at 43 layers that is the token's whole budget at 30 tok/s. Everything in a layer except its
attention core depends on the token only through device tensors (the streams, the token id, the RoPE tables of the
position), so it is captured once and replayed; the core's sizes grow with the context (window rows, compressed
entries, closing windows), so it runs eagerly between the replays. This is the piecewise capture vLLM uses: the
step runs as n_layers + 1 graph launches plus the cores' own launches.

  segment 0      embed(token) -> layer 0's pre-attention
  segment i      layer i-1's post-attention (output projections, MoE) -> layer i's pre-attention
  segment n      layer n-1's post-attention -> final hidden

The token id and the position live in two static device tensors written before the replays; each core's output is
copied into a static buffer the next segment reads. Captured once per model, at the first decode step that uses
them; valid for every later position and session (the cores carry all per-sequence state).

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

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        # One warm-up run on a side stream first (libraries create their handles and workspaces lazily, which a
        # capture must not do); the capture itself only records, so one replay computes this step's values.
        cur = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            fn()
        cur.wait_stream(self.stream)
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
    """The CPU stand-in for CudaGraphs (see the module docstring). Capture runs the code once (its values are this
    step's) while recording it."""

    name = "emulated"

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        from homerun.kernels.triton import load

        common = load().common if load() is not None else None
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
    on the GPU kernel set, and an expert backend that declares itself graph-safe (offload.base.ExpertBackend)."""
    dev = net.device
    if any((lay.device or dev) != dev for lay in net.layers) or (net.head_device or dev) != dev:
        return "the layers span several devices"
    if net.embed_flavor != "gpu" or net.head_flavor != "gpu" or any(lay.flavor != "gpu" for lay in net.layers):
        return "not every layer runs the GPU kernel set"
    if not getattr(net.experts, "graph_safe", False):
        return f"the expert backend ({type(net.experts).__name__}) is not graph-safe (it syncs or keeps host state)"
    return None


class DecodeGraphs:
    """The model's one-token forward as captured segments with eager attention cores between them (module
    docstring). `forward` has net.forward's contract for T == 1, except that the returned hidden is a static
    buffer, valid until the next decode step."""

    def __init__(self, net, graphs: CudaGraphs | EmulatedGraphs) -> None:
        reason = unsupported_reason(net)
        if reason is not None:
            raise ValueError(f"decode graphs unsupported: {reason}")
        self.net, self.graphs = net, graphs
        self.backend = net.experts  # the expert backend whose launches the graphs hold
        self.k = kernels_for(net.device, net.compute_dtype, 1, net.embed_flavor)
        self.kl = for_act(self.k, net.experts.act)
        self.segments: list[Any] = []
        self.replays = 0  # decode steps served from the graphs (the capture step included)

    @property
    def captured(self) -> bool:
        return bool(self.segments)

    def forward(self, ids: torch.Tensor, start_pos: int, states: Sequence[Any]) -> tuple[torch.Tensor, list]:
        if not self.segments:
            return self._capture(ids, start_pos, states)
        net, kl = self.net, self.kl
        self.ids_buf.copy_(ids.reshape(1), non_blocking=True)
        self.pos_buf.fill_(start_pos)
        self.graphs.replay(self.segments[0])
        new_states = []
        for i, layer in enumerate(net.layers):
            out, st = net._attention_core(layer, self.pre[i], start_pos, states[i], kl)
            self.core_out[i].copy_(out)
            new_states.append(st)
            self.graphs.replay(self.segments[i + 1])
        self.replays += 1
        return self.hidden, new_states

    def _capture(self, ids: torch.Tensor, start_pos: int, states: Sequence[Any]) -> tuple[torch.Tensor, list]:
        net, k, kl, g = self.net, self.k, self.kl, self.graphs
        dev = net.device
        self.ids_buf = ids.reshape(1).to(dev, torch.int64).clone()
        self.pos_buf = torch.full((1,), start_pos, dtype=torch.int64, device=dev)
        layers = net.layers
        first = layers[0]

        def seg0():
            x = net._embed(self.ids_buf)
            return x, net._pre_attention(first, x, self.pos_buf, kl)

        seg, (x, pa) = g.capture(seg0)
        segments, xs, pres, outs, new_states = [seg], [x], [pa], [], []
        hidden = None
        for i, layer in enumerate(layers):
            out, st = net._attention_core(layer, pres[i], start_pos, states[i], kl)
            buf = out.clone()  # the static buffer this layer's core writes into at every later step
            outs.append(buf)
            new_states.append(st)
            if i + 1 < len(layers):
                nxt = layers[i + 1]

                def mid(layer=layer, i=i, buf=buf, nxt=nxt):
                    y = net._post_attention(layer, xs[i], pres[i], buf, self.ids_buf, kl)
                    return y, net._pre_attention(nxt, y, self.pos_buf, kl)

                seg, (x, pa) = g.capture(mid)
                xs.append(x)
                pres.append(pa)
            else:
                def last(layer=layer, i=i, buf=buf):
                    return net._final(net._post_attention(layer, xs[i], pres[i], buf, self.ids_buf, kl), k)

                seg, hidden = g.capture(last)
            segments.append(seg)
        self.segments, self.pre, self.core_out, self.hidden = segments, pres, outs, hidden
        self._xs = xs  # the segments read them: they live as long as the graphs
        self.replays += 1
        return hidden, new_states


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
    if net.device.type == "cuda":
        return DecodeGraphs(net, CudaGraphs(net.device)), "captured: CUDA graphs"
    if mode == "on":
        return DecodeGraphs(net, EmulatedGraphs()), "captured: emulated graphs (a CUDA stand-in)"
    return None, "a CUDA stand-in (graphs emulated only when asked for)"
