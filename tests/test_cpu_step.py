"""Per-step thread settings: decode steps on a CPU run torch single-threaded with spinning kernel workers; prefill,
long contexts and GPU steps keep the defaults, and every setting is restored after the step."""

from __future__ import annotations

import pytest
import torch

from homerun.kernels import cpu_step


def test_decode_settings_only_for_short_cpu_decode_steps():
    assert cpu_step.decode_settings(1, 100, on_cpu=True) == (1, cpu_step.DECODE_SPIN_US)
    assert cpu_step.decode_settings(cpu_step.DECODE_MAX_TOKENS, 0, on_cpu=True) is not None
    assert cpu_step.decode_settings(cpu_step.DECODE_MAX_TOKENS + 1, 0, on_cpu=True) is None  # prefill
    assert cpu_step.decode_settings(1, cpu_step.ONE_THREAD_MAX_CTX_TOKENS, on_cpu=True) is None  # long context
    assert cpu_step.decode_settings(1, 100, on_cpu=False) is None  # GPU step


def test_cpu_step_applies_and_restores(monkeypatch):
    from homerun.kernels import cpu_experts as ce
    spins = []
    monkeypatch.setattr(ce, "set_spin_us", lambda us: spins.append(us) or 50)
    before = torch.get_num_threads()
    with cpu_step.cpu_step(1, 10, on_cpu=True):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    assert spins == [cpu_step.DECODE_SPIN_US, 50]
    with pytest.raises(RuntimeError):
        with cpu_step.cpu_step(1, 10, on_cpu=True):
            raise RuntimeError("a failed step still restores")
    assert torch.get_num_threads() == before and spins[-1] == 50
    spins.clear()
    with cpu_step.cpu_step(512, 0, on_cpu=True):  # prefill: untouched
        assert torch.get_num_threads() == before
    assert spins == []


def test_native_spin_setting_round_trips():
    from homerun.kernels import cpu_experts as ce
    prev = ce.set_spin_us(1234)
    if prev is None:
        pytest.skip("native kernels not built")
    assert ce.set_spin_us(prev) == 1234


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


def test_cpu_prefill_steps_run_under_the_heap_policy(monkeypatch):
    """A CPU prefill step raises glibc's mmap/trim thresholds once and trims the heap after every step, failed ones
    included; decode and GPU steps leave the heap alone."""
    from homerun.kernels import cpu_heap

    fake = _FakeLibc()
    monkeypatch.setattr(cpu_heap, "_state", {"libc": fake})
    for _ in range(2):
        with cpu_step.cpu_step(512, 0, on_cpu=True):
            pass
    raised = [("mallopt", cpu_heap.M_MMAP_THRESHOLD, cpu_heap.PREFILL_MMAP_THRESHOLD_BYTES),
              ("mallopt", cpu_heap.M_TRIM_THRESHOLD, cpu_heap.PREFILL_TRIM_THRESHOLD_BYTES)]
    assert fake.calls == raised + [("trim", 0), ("trim", 0)]
    with pytest.raises(RuntimeError):
        with cpu_step.cpu_step(512, 0, on_cpu=True):
            raise RuntimeError("a failed step still trims")
    assert fake.calls[-1] == ("trim", 0) and len(fake.calls) == 5
    with cpu_step.cpu_step(1, 10, on_cpu=True), cpu_step.cpu_step(512, 0, on_cpu=False):
        pass
    assert len(fake.calls) == 5


def test_heap_policy_leaves_a_users_malloc_settings(monkeypatch):
    from homerun.kernels import cpu_heap

    monkeypatch.setattr(cpu_heap, "_state", {})
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not cpu_heap.applies()
    monkeypatch.setattr(cpu_heap, "_state", {})
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    assert not cpu_heap.applies()
