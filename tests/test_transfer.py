import threading

import torch

from offload.devices import StandInDevice
from offload.transfer import CpuTransferEngine, make_transfer_engine, measure_h2d_gbps


class _Sink:
    def __init__(self):
        self.copies, self.stalls = [], []

    def on_copy(self, tag, nbytes, seconds):
        self.copies.append((tag, nbytes, seconds))

    def on_stall(self, tag, seconds):
        self.stalls.append((tag, seconds))


def test_copies_land_and_are_reported_once_each():
    dev = StandInDevice("gpu0", 1 << 30)
    sink = _Sink()
    eng = make_transfer_engine(dev, max_in_flight=2)
    eng.sink = sink
    srcs = [torch.full((1000 + i,), i, dtype=torch.uint8) for i in range(6)]
    dsts = [torch.zeros_like(s) for s in srcs]
    handles = [eng.copy(d, s, tag=("L", i)) for i, (d, s) in enumerate(zip(dsts, srcs))]
    for h in handles:
        eng.wait(h)
    eng.drain()
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs))
    assert sorted(t for t, _, _ in sink.copies) == [("L", i) for i in range(6)]
    assert [n for _, n, _ in sorted(sink.copies)] == [1000 + i for i in range(6)]
    st = eng.stats()
    assert st.n_copies == 6 and st.bytes_moved == sum(1000 + i for i in range(6))
    assert st.busy_s > 0 and st.achieved_gbps > 0
    eng.close()


def test_in_flight_is_bounded():
    dev = StandInDevice("gpu0", 1 << 30)
    gate = threading.Event()
    eng = CpuTransferEngine(dev, max_in_flight=3)
    peak = 0
    # Hold the worker on the first copy, so the queue fills up and back-pressure must kick in.
    eng._pool.submit(gate.wait)
    srcs = [torch.ones(64, dtype=torch.uint8) for _ in range(3)]
    for s in srcs:
        eng.copy(torch.zeros_like(s), s)
        peak = max(peak, len(eng._in_flight))
    assert peak == 3
    threading.Timer(0.05, gate.set).start()
    eng.copy(torch.zeros(64, dtype=torch.uint8), srcs[0])  # blocks until the oldest copy retires
    assert len(eng._in_flight) <= 3
    assert eng.stats().backpressure_s > 0
    eng.close()


def test_copies_into_one_slot_land_in_issue_order():
    eng = CpuTransferEngine(StandInDevice("gpu0", 1 << 30), max_in_flight=4)
    dst = torch.zeros(1 << 16, dtype=torch.uint8)
    for v in range(1, 5):
        last = eng.copy(dst, torch.full((1 << 16,), v, dtype=torch.uint8))
    eng.wait(last)
    assert int(dst[0]) == 4 and int(dst[-1]) == 4
    eng.close()


def test_wait_on_an_unfinished_copy_is_a_measured_stall():
    sink = _Sink()
    eng = CpuTransferEngine(StandInDevice("gpu0", 1 << 30), max_in_flight=2, link_gbps=0.01, sink=sink)
    src = torch.ones(200_000, dtype=torch.uint8)  # 20 ms at the throttled 0.01 GB/s
    h = eng.copy(torch.zeros_like(src), src, tag=(0, 1))
    eng.wait(h)
    assert len(sink.stalls) == 1 and sink.stalls[0][0] == (0, 1) and sink.stalls[0][1] > 0
    assert eng.stats().stall_s == sink.stalls[0][1]
    eng.close()


def test_measure_h2d_gbps_is_a_positive_measurement():
    assert measure_h2d_gbps(StandInDevice("gpu0", 1 << 30), nbytes=1 << 20, repeats=2) > 0
