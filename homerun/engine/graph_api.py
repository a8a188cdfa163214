"""The graph APIs under homerun.engine.graphs' decode runner: CUDA graphs on a GPU, and `EmulatedGraphs`, their CPU
stand-in with a CUDA graph's semantics: capture records every ATen op and Triton launch with the tensors it reads and
writes, replay re-runs them on those same tensors, so whatever the captured code took from the host at capture time
(a Python int, a tensor made from one) replays as it was, as on CUDA. A host sync during capture raises, as CUDA's
capture does.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

from homerun.kernels.counting import SYNC_OPS, launches_kernel, note_graph_replay
from homerun.kernels.device_guard import on_device


class GraphCaptureError(RuntimeError):
    """The captured code did something a graph cannot replay (a host sync)."""


# ----------------------------------------------------------------------------------------------- the graph APIs


class CudaGraphs:
    """torch.cuda.CUDAGraph per segment of one device, every segment in one memory pool (their outputs stay alive
    between replays, so the pool holds one step's activations once). Capture and replay run with the device
    current: Triton launches, torch.cuda.graph's capture stream and a replay all take the current device's."""

    name = "cuda"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with on_device(device):
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream(device)

    def capture(self, fn: Callable[[], Any], reset: Callable[[], None] | None = None) -> tuple[Any, Any]:
        # One warm-up run on a side stream first (libraries create their handles and workspaces lazily, which a
        # capture must not do); the capture itself only records, so one replay computes this step's values.
        # reset: undoes the warm-up's writes to state the step advances in place (the whole-step graph's).
        with on_device(self.device):
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
        with on_device(self.device):
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
        note_graph_replay(len(steps))
        with _disable_current_modes():  # a counting mode sees one graph launch, not the ops inside
            for step in steps:
                step()
