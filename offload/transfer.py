"""Host-to-device expert copies with a bounded number in flight, timed by the copy engine itself.

`CudaTransferEngine` issues every copy on one dedicated CUDA stream between two timing events; consumers make their
stream wait on the copy's end event (a device-side wait), so the per-token path never calls
`torch.cuda.synchronize()`. The only host block is back-pressure: when `max_in_flight` copies are queued, the host
waits for the oldest one's event. `CpuTransferEngine` is the stand-in with the same interface: one worker thread
plays the DMA engine (FIFO, so copies into one slot land in issue order), optionally throttled to a link speed.
Both report every finished copy and every consumer stall to a `TransferSink` (the cache's per-layer counters),
with durations measured by events (CUDA) or the wall clock (CPU). This module does not decide what to copy.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Hashable, Protocol

import torch

from offload.devices import Device


class TransferSink(Protocol):
    def on_copy(self, tag: Hashable, nbytes: int, seconds: float) -> None: ...
    def on_stall(self, tag: Hashable, seconds: float) -> None: ...


class _NullSink:
    def on_copy(self, tag, nbytes, seconds):
        pass

    def on_stall(self, tag, seconds):
        pass


@dataclass(frozen=True)
class TransferStats:
    n_copies: int
    bytes_moved: int
    busy_s: float  # sum of copy durations; copies are serialized on one stream/worker, so this is link-busy time
    stall_s: float
    backpressure_s: float  # host time spent waiting for a free in-flight slot

    @property
    def achieved_gbps(self) -> float:
        return self.bytes_moved / self.busy_s / 1e9 if self.busy_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"n_copies": self.n_copies, "bytes_moved": self.bytes_moved, "busy_s": self.busy_s,
                "stall_s": self.stall_s, "backpressure_s": self.backpressure_s, "achieved_gbps": self.achieved_gbps}


@dataclass
class Transfer:
    """A handle on one issued copy. `payload` is engine-specific (a Future, or the CUDA start/end events)."""

    tag: Hashable
    nbytes: int
    payload: Any
    retired: bool = False
    seconds: float = field(default=0.0)


class _EngineBase:
    def __init__(self, device: Device, max_in_flight: int, sink: TransferSink | None) -> None:
        self.device = device
        self.max_in_flight = max(1, int(max_in_flight))
        self.sink: TransferSink = sink or _NullSink()
        self._in_flight: deque[Transfer] = deque()
        self._n = 0
        self._bytes = 0
        self._busy_s = 0.0
        self._stall_s = 0.0
        self._backpressure_s = 0.0

    def _retire(self, t: Transfer, seconds: float) -> None:
        t.retired, t.seconds = True, seconds
        self._n += 1
        self._bytes += t.nbytes
        self._busy_s += seconds
        self.sink.on_copy(t.tag, t.nbytes, seconds)

    def _make_room(self) -> None:
        self.poll()
        if len(self._in_flight) >= self.max_in_flight:
            t0 = time.perf_counter()
            self._block_on(self._in_flight[0])
            self._backpressure_s += time.perf_counter() - t0
            self.poll()

    def in_flight(self) -> int:
        self.poll()
        return len(self._in_flight)

    def stats(self) -> TransferStats:
        self.poll()
        return TransferStats(self._n, self._bytes, self._busy_s, self._stall_s, self._backpressure_s)


class CpuTransferEngine(_EngineBase):
    """Stand-in DMA engine: copies run on one worker thread (torch's copy releases the GIL, so they overlap with
    compute on the main thread). `link_gbps` throttles each copy to that speed to emulate a PCIe link."""

    def __init__(self, device: Device, *, max_in_flight: int = 4, link_gbps: float | None = None,
                 sink: TransferSink | None = None) -> None:
        super().__init__(device, max_in_flight, sink)
        self.link_gbps = link_gbps
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="homerun-h2d")

    def _run(self, dst: torch.Tensor, src: torch.Tensor) -> float:
        t0 = time.perf_counter()
        dst.copy_(src)
        if self.link_gbps:
            target_s = src.numel() * src.element_size() / (self.link_gbps * 1e9)
            remaining = target_s - (time.perf_counter() - t0)
            if remaining > 0:
                time.sleep(remaining)
        return time.perf_counter() - t0

    def record_use(self) -> None:
        """Compute on the stand-in is synchronous, so a slot is free to overwrite as soon as the call returns."""
        return None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, tag: Hashable = None, after: Any = None) -> Transfer:
        self._make_room()
        fut: Future = self._pool.submit(self._run, dst, src)
        t = Transfer(tag, src.numel() * src.element_size(), fut)
        self._in_flight.append(t)
        return t

    def _block_on(self, t: Transfer) -> None:
        t.payload.result()

    def wait(self, t: Transfer) -> None:
        """Block the consumer until the copy has landed; the blocked time is a stall."""
        if not t.payload.done():
            t0 = time.perf_counter()
            t.payload.result()
            stall = time.perf_counter() - t0
            self._stall_s += stall
            self.sink.on_stall(t.tag, stall)
        self.poll()

    def poll(self) -> None:
        while self._in_flight and self._in_flight[0].payload.done():
            t = self._in_flight.popleft()
            self._retire(t, t.payload.result())

    def drain(self) -> None:
        """Wait for every queued copy (tests, shutdown; not the per-token path)."""
        while self._in_flight:
            self._block_on(self._in_flight[0])
            self.poll()

    def close(self) -> None:
        self.drain()
        self._pool.shutdown(wait=True)


class CudaTransferEngine(_EngineBase):
    """H2D copies on a dedicated stream. A copy into a slot first waits (on the device) for the event recorded
    after the slot's last use, so compute never reads a half-overwritten expert."""

    def __init__(self, device: Device, *, max_in_flight: int = 4, sink: TransferSink | None = None) -> None:
        super().__init__(device, max_in_flight, sink)
        self.stream = torch.cuda.Stream(device=device.torch_device)
        self._stalls: deque[tuple[Hashable, torch.cuda.Event, torch.cuda.Event]] = deque()

    def record_use(self) -> torch.cuda.Event:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device.torch_device))
        return ev

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, tag: Hashable = None, after: Any = None) -> Transfer:
        self._make_room()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            end.record(self.stream)
        t = Transfer(tag, src.numel() * src.element_size(), (start, end))
        self._in_flight.append(t)
        return t

    def _block_on(self, t: Transfer) -> None:
        t.payload[1].synchronize()  # an event wait, only when max_in_flight copies are queued

    def wait(self, t: Transfer) -> None:
        """Make the current (compute) stream wait for the copy, on the device. If the copy may not be done yet,
        bracket the wait with timing events; the stall is read later, once those events complete."""
        end = t.payload[1]
        if t.retired or end.query():
            self.poll()
            return
        cur = torch.cuda.current_stream(self.device.torch_device)
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(cur)
        cur.wait_event(end)
        after.record(cur)
        self._stalls.append((t.tag, before, after))

    def poll(self) -> None:
        while self._in_flight and self._in_flight[0].payload[1].query():
            t = self._in_flight.popleft()
            start, end = t.payload
            self._retire(t, start.elapsed_time(end) / 1e3)
        while self._stalls and self._stalls[0][2].query():
            tag, before, after = self._stalls.popleft()
            stall = before.elapsed_time(after) / 1e3
            self._stall_s += stall
            self.sink.on_stall(tag, stall)

    def drain(self) -> None:
        while self._in_flight:
            self._block_on(self._in_flight[0])
            self.poll()
        for _, _, after in list(self._stalls):
            after.synchronize()
        self.poll()

    def close(self) -> None:
        self.drain()


def make_transfer_engine(device: Device, *, max_in_flight: int = 4, link_gbps: float | None = None,
                         sink: TransferSink | None = None):
    """The CUDA engine for CUDA devices, the thread stand-in otherwise."""
    if device.is_cuda:
        return CudaTransferEngine(device, max_in_flight=max_in_flight, sink=sink)
    return CpuTransferEngine(device, max_in_flight=max_in_flight, link_gbps=link_gbps, sink=sink)


def measure_h2d_gbps(device: Device, *, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Peak host-to-device bandwidth from a pinned buffer (pageable on CPU stand-ins): best of `repeats` copies.
    A measurement tool for bench/device-check, not for the per-token path (it drains the engine)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.is_cuda)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device.torch_device)
    engine = make_transfer_engine(device, max_in_flight=1)
    best_s = float("inf")
    for _ in range(repeats):
        t = engine.copy(dst, src)
        engine.drain()
        best_s = min(best_s, t.seconds)
    engine.close()
    return nbytes / best_s / 1e9
