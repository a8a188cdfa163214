"""KV snapshots (homerun.engine.snapshot): exact logits after a restore (fp32, at awkward CSA/HCA positions), FP8 KV,
a placed model, the refusals (another model or revision, another kv_dtype, truncated, corrupt, over budget) with the
live session unchanged, atomic writes under SIGKILL, and peak extra memory during save and restore."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import homerun
from homerun.engine.placement import split_layers
from homerun.engine.snapshot import save_session, snapshot_nbytes
from homerun.engine.snapshot_read import check_snapshot, read_header, restore_session
from homerun.errors import ExitCode, SnapshotError

HERE = Path(__file__).resolve().parent


def _ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def mixed(tiny_checkpoints):
    return homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[1024, 16384], expert_act="fp32")


def _continue(sess, ids: list[int]) -> list[torch.Tensor]:
    """Logits after each of three single-token feeds, then after one chunk of the rest."""
    return [sess.feed(ids[:1]), sess.feed(ids[1:2]), sess.feed(ids[2:3]), sess.feed(ids[3:])]


# ------------------------------------------------------------------------------------------------ exactness


# 639: one before an HCA close (127 open rows) and a CSA close (3 open); 641: one after both (1 open row each).
@pytest.mark.parametrize("kind,n", [("mixed", 639), ("mixed", 641), ("hca", 383), ("csa", 257)])
def test_restore_gives_the_uninterrupted_logits_exactly(tiny_checkpoints, tmp_path, kind, n):
    model = homerun.load(tiny_checkpoints[kind], ramp_tokens=[1024, 16384], expert_act="fp32")
    ids = _ids(n + 9, seed=n)
    live = model.session()
    first = live.feed(ids[:n])
    meta = live.save(tmp_path / "s.kv.safetensors")
    assert meta["n_tokens"] == n and meta["kv_bytes"] == live.kv_bytes == model.kv_bytes_at(n)
    back = model.restore(tmp_path / "s.kv.safetensors")
    assert back.tokens == live.tokens and back.kv_bytes == live.kv_bytes and back.capacity_tokens == 1024
    assert torch.equal(back.last_logits, first)
    for a, b in zip(_continue(live, ids[n:]), _continue(back, ids[n:])):
        assert torch.equal(a, b)


def test_restore_fp8_kv_is_bit_exact_and_within_fp8_rounding(tiny_checkpoints, mixed, tmp_path):
    model = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[1024], expert_act="fp32", kv_dtype="fp8")
    ids = _ids(650, seed=1)
    live = model.session()
    live.feed(ids[:641])
    live.save(tmp_path / "f.kv.safetensors")
    back = restore_session(model, tmp_path / "f.kv.safetensors")
    got = _continue(back, ids[641:])
    assert all(torch.equal(a, b) for a, b in zip(_continue(live, ids[641:]), got))  # the stored codes, verbatim
    exact = mixed.session()
    exact.feed(ids[:641])
    ref = _continue(exact, ids[641:])[-1]
    assert (got[-1] - ref).abs().max().item() / ref.abs().max().item() < 0.1  # e4m3: 3 mantissa bits


def test_restore_onto_a_placement_and_another_page_size(tiny_checkpoints, mixed, tmp_path):
    ids = _ids(700, seed=2)
    live = mixed.session()
    live.feed(ids[:641])
    live.save(tmp_path / "p.kv.safetensors")
    pl = split_layers(3, ["standin:0", "standin:1"], [2, 1], experts="device")
    placed = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[1024, 16384], expert_act="fp32", placement=pl,
                          page_tokens=128)  # 32-row CSA pages: the file's rows land across several pages
    back = placed.restore(tmp_path / "p.kv.safetensors")
    kv = sum(d["bytes_by_class"].get("kv", 0) for d in placed.device_usage())
    assert kv > 0 and len(back._states[1].comp.store.pages) > 1
    a, b = live.feed(ids[641:]), back.feed(ids[641:])
    assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()


def test_file_layout_and_size(mixed, tmp_path):
    s = mixed.session()
    s.feed(_ids(641, seed=3))
    path = tmp_path / "x.kv.safetensors"
    meta = s.save(path)
    meta2, entries, start = read_header(path)
    assert meta2["tokens_sha256"] == meta["tokens_sha256"] and meta2["kv_devices"] == ["cpu"] * 3
    assert path.stat().st_size == start + snapshot_nbytes(s)
    assert entries["layers.1.comp.rows"]["shape"] == [160, 128] and entries["tokens"]["shape"] == [641]
    from safetensors.torch import load_file  # any safetensors reader opens it

    t = load_file(str(path))
    assert torch.equal(t["layers.1.comp.rows"], s._states[1].comp.entries())


# -------------------------------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def saved(mixed, tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "ok.kv.safetensors"
    s = mixed.session()
    s.feed(_ids(641, seed=4))
    s.save(path)
    return path


def _live(model):
    s = model.session()
    s.feed(_ids(300, seed=5))
    return s


def _assert_unchanged(model, live):
    ctrl = model.session()
    ctrl.feed(_ids(300, seed=5))
    assert live.tokens == ctrl.tokens and live.kv_bytes == ctrl.kv_bytes
    nxt = _ids(5, seed=6)
    assert torch.equal(live.feed(nxt), ctrl.feed(nxt))


def _refused(model, path, reason):
    live = _live(model)
    with pytest.raises(SnapshotError) as err:
        model.restore(path)
    assert err.value.reason == reason and err.value.exit_code == ExitCode.USAGE == 2
    _assert_unchanged(model, live)
    return err.value


def test_refuses_another_model_or_revision(tiny_checkpoints, saved, tmp_path):
    other = homerun.load(tiny_checkpoints["csa"], ramp_tokens=[16384], expert_act="fp32")
    assert "another model" in _refused(other, saved, "model").message
    from tiny import make_checkpoint

    # The same config and shapes, other weights: a retrained revision.
    revision = homerun.load(make_checkpoint(tmp_path, "mixed", seed=7), ramp_tokens=[16384], expert_act="fp32")
    assert "weights" in _refused(revision, saved, "model").message


def test_refuses_another_kv_dtype(tiny_checkpoints, saved):
    fp8 = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[16384], expert_act="fp32", kv_dtype="fp8")
    assert "kv_dtype" in _refused(fp8, saved, "kv_dtype").message


def test_refuses_truncated_and_corrupt_files(mixed, saved, tmp_path):
    data = saved.read_bytes()
    cut = tmp_path / "cut.kv.safetensors"
    for n in (0, 5, 100, len(data) - 1):
        cut.write_bytes(data[:n])
        assert "truncated" in _refused(mixed, cut, "corrupt").message or n == 100
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    bad = tmp_path / "bad.kv.safetensors"
    bad.write_bytes(bytes(flipped))
    assert "checksum" in _refused(mixed, bad, "corrupt").message
    junk = tmp_path / "junk.kv.safetensors"
    junk.write_bytes(b"\x10" + b"\0" * 7 + b"{}" + b" " * 14)
    _refused(mixed, junk, "corrupt")
    with pytest.raises(SnapshotError) as err:
        mixed.restore(tmp_path / "missing.kv.safetensors")
    assert err.value.reason == "io"


def test_refuses_over_budget_naming_both_numbers_and_the_step(tiny_checkpoints, saved):
    probe = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[384, 16384], expert_act="fp32")
    budget = probe.kv_bytes_at(384) + 1
    small = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[384, 16384], expert_act="fp32",
                         kv_budget_bytes=budget)
    msg = _refused(small, saved, "budget").message
    assert "16,384-token ramp step" in msg and f"{budget / 1e9:.3f} GB" in msg
    assert f"{probe.kv_bytes_at(16384) / 1e9:.3f} GB" in msg
    short = homerun.load(tiny_checkpoints["mixed"], ramp_tokens=[512], expert_act="fp32")
    assert "ramp ends at 512" in _refused(short, saved, "budget").message
    assert check_snapshot(probe, saved)["n_tokens"] == 641


# --------------------------------------------------------------------------------------- atomic, memory


_KILL_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    import homerun, torch
    import homerun.engine.snapshot as snap
    from test_snapshot import _ids
    m = homerun.load({ckpt!r}, ramp_tokens=[16384], expert_act="fp32")
    s = m.session()
    s.feed(_ids(700, seed=9))
    real = snap._bytes_view
    from pathlib import Path
    target = Path({path!r})
    def slow(t):  # stall once the temp file exists, so the parent kills us mid-save
        if list(target.parent.glob("." + target.name + ".*.tmp")):
            print("writing", flush=True)
            time.sleep(60)
        return real(t)
    snap._bytes_view = slow
    s.save({path!r})
""")


def test_sigkill_during_save_keeps_the_previous_snapshot(mixed, saved, tmp_path):
    path = tmp_path / "keep.kv.safetensors"
    path.write_bytes(saved.read_bytes())
    code = _KILL_CHILD.format(tests=str(HERE), ckpt=str(mixed.path), path=str(path))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "writing"
        temps = list(tmp_path.glob(".keep.kv.safetensors.*.tmp"))
        assert len(temps) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert path.read_bytes() == saved.read_bytes()
    assert mixed.restore(path).n_tokens == 641
    s = mixed.session()
    s.feed(_ids(10))
    s.save(path)  # the next save replaces it and clears the dead writer's temp file
    assert not list(tmp_path.glob(".keep.kv.safetensors.*.tmp")) and mixed.restore(path).n_tokens == 10


_MEMORY_CHILD = textwrap.dedent("""
    import json, sys, torch
    import homerun
    from homerun.models.deepseek_v4 import CompressorState, LayerState

    def hwm():  # peak RSS since the last reset, bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    def reset():
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    n = {n_tokens}
    m = homerun.load({ckpt!r}, ramp_tokens=[n], expert_act="fp32", page_tokens=8192)
    s = m.session()
    states = []
    for i, st in enumerate(s._states):  # a long context's state without running the model: random rows
        comps = []
        for c, rate in ((st.comp, m.args.rate(i)), (st.index_comp, m.args.csa_rate)):
            if c is None:
                comps.append(None)
                continue
            rows = n // rate
            for r0 in range(0, rows, 4096):
                c.store.write(r0, torch.randn(min(4096, rows - r0), c.store.width))
            comps.append(CompressorState(c.store, rows))
        states.append(LayerState(torch.randn(127, m.args.head_dim), *comps))
    s._states, s._tokens = states, [1] * n
    group = max(sum(t.numel() * t.element_size() for t in (pg if isinstance(pg, tuple) else (pg,)))
                for st in states for c in (st.comp, st.index_comp) if c is not None for pg in c.store.pages)
    kv = s.kv_bytes
    base = rss(); reset()
    s.save({path!r})
    save_extra = hwm() - base
    s._states = None
    import gc; gc.collect()
    base = rss(); reset()
    back = m.restore({path!r})
    restore_extra = hwm() - base - back.kv_allocated_bytes
    print(json.dumps(dict(kv=kv, group=group, save_extra=save_extra, restore_extra=restore_extra)))
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable VmHWM")
def test_peak_extra_memory_is_one_page_group_not_the_kv(mixed, tmp_path):
    """Measured honestly: peak RSS (VmHWM, reset before each step) in a fresh process with glibc's mmap threshold
    fixed at 64 KiB, so every large temporary is a fresh mapping that shows in RSS. Save: peak - RSS before.
    Restore: peak - RSS before - the restored KV's own allocated bytes."""
    import json

    code = _MEMORY_CHILD.format(n_tokens=1 << 18, ckpt=str(mixed.path), path=str(tmp_path / "big.kv.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["kv"] > 60e6  # ~68 MB of state, so a second full copy could not hide
    slack = 8 << 20  # interpreter noise, the 1 MiB write buffer, one 64K-token id chunk
    assert r["save_extra"] < r["group"] + slack, r
    assert r["restore_extra"] < r["group"] + slack, r
