"""Top-p's host path (`sampling._top_p_on_host`: numpy sorts the values alone, no argsort of the vocabulary) keeps
exactly the tokens the full-sort formulation keeps. The reference below is `filter_logits` as it was before the host
path (a full `torch.sort` of the vocabulary), with the sort made stable: the old unstable sort left the choice among
tokens tied where the kept set ends to the sort's implementation, so the stable order (lowest ids first) is the one
choice that both paths, and a device, can make alike. Against the unstable original, the kept sets agree except
within that one tied group, from which both keep the same number."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homerun.engine import sampling
from homerun.engine.sampling import SamplingParams, filter_logits, make_generator, sample, sample_tensor

V4_VOCAB = 129280


def _reference(logits: torch.Tensor, params: SamplingParams, *, stable: bool = True) -> torch.Tensor:
    """filter_logits before the host path, verbatim but for `stable`."""
    x = logits.float() / max(params.temperature, 1e-8)
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True, stable=stable)
        probs = torch.softmax(sorted_x, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return x


def _check(logits: torch.Tensor, params: SamplingParams) -> None:
    got = filter_logits(logits, params)
    assert torch.equal(got, _reference(logits, params)), params
    # the device path (a full stable sort) is the reference itself
    assert torch.equal(sampling._top_p_sorted(_reference(logits, SamplingParams(params.temperature, 1.0,
                                                                                params.top_k)), params.top_p), got)
    # the unstable original: the same set but within the tied group where it ends, of which as many stay
    old = _reference(logits, params, stable=False)
    kept, kept_old = torch.isfinite(got), torch.isfinite(old)
    if not torch.equal(kept, kept_old):
        last = got[kept].min()
        assert torch.equal(kept & (got != last), kept_old & (old != last))
        assert int(kept.sum()) == int(kept_old.sum())


# Few distinct values (many ties), -inf, and bf16-rounded ones (what the model's head returns).
_values = st.one_of(st.sampled_from([0.0, -0.0, 1.0, 1.5, -2.0, 3.0, float("-inf")]),
                    st.floats(-30, 30, width=32).map(lambda v: float(torch.tensor(v).bfloat16())))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(_values, min_size=1, max_size=200),
       temperature=st.sampled_from([0.05, 0.3, 0.6, 0.8, 1.0, 1.7]),
       top_k=st.integers(0, 210),
       top_p=st.one_of(st.sampled_from([0.5, 0.9, 0.95, 0.999, 1e-6]), st.floats(1e-6, 1.0, exclude_max=True)))
def test_host_top_p_keeps_what_the_full_sort_keeps(values, temperature, top_k, top_p):
    _check(torch.tensor(values), SamplingParams(temperature=temperature, top_k=top_k or None, top_p=top_p))


@pytest.mark.parametrize("temperature", [0.6, 0.8, 1.0])
@pytest.mark.parametrize("top_k", [None, 50])
def test_at_v4_vocabulary_size(temperature, top_k):
    """V4's vocabulary of bf16 logits (ties everywhere in the tail), several draws each."""
    g = torch.Generator().manual_seed(int(temperature * 10) + (top_k or 0))
    for _ in range(4):
        logits = (torch.randn(V4_VOCAB, generator=g) * 2.5).bfloat16()
        logits[torch.randint(0, V4_VOCAB, (20,), generator=g)] += 12  # a peaked head, as a trained model's
        for top_p in (0.5, 0.9, 0.95):
            _check(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))


def test_cpu_top_p_does_not_sort_the_vocabulary(monkeypatch):
    """The point of the host path: no torch.sort (the argsort of the whole vocabulary) for host logits."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 3
    want = _reference(logits, SamplingParams(top_p=0.9))

    def no_sort(*a, **k):
        raise AssertionError("top-p sorted the whole vocabulary")

    monkeypatch.setattr(torch, "sort", no_sort)
    assert torch.equal(filter_logits(logits, SamplingParams(top_p=0.9)), want)


def test_nan_or_no_numpy_take_the_full_sort(monkeypatch):
    logits = torch.tensor([1.0, 2.0, 2.0, 0.5])
    assert sampling._top_p_on_host(torch.tensor([1.0, float("nan")]), 0.9) is None
    monkeypatch.setitem(__import__("sys").modules, "numpy", None)  # `import numpy` raises ImportError
    assert sampling._top_p_on_host(logits, 0.5) is None
    assert torch.equal(filter_logits(logits, SamplingParams(top_p=0.5)), _reference(logits, SamplingParams(top_p=0.5)))


def test_seeded_draws_are_unchanged_by_the_host_path():
    """sample and sample_tensor draw from the same filtered distribution (the generator state is all that varies)."""
    logits = (torch.randn(5000, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    for params in (SamplingParams(temperature=0.7, top_p=0.95), SamplingParams(temperature=1.0, top_k=50, top_p=0.9)):
        probs = torch.softmax(_reference(logits, params), dim=-1)
        for seed in range(5):
            g1, g_ref = make_generator(seed), make_generator(seed)
            a = [sample(logits, params, g1) for _ in range(4)]
            assert a == [int(torch.multinomial(probs, 1, generator=g_ref)) for _ in range(4)]
            g2 = make_generator(seed)
            assert a == [int(sample_tensor(logits, params, g2)) for _ in range(4)]
