"""homerun.engine.sampling: greedy, temperature, top-k, top-p, seeds and generation_config defaults."""

from __future__ import annotations

import math

import pytest
import torch

from homerun.errors import UsageError
from homerun.engine.sampling import SamplingParams, filter_logits, make_generator, sample


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def _draw(logits, params, n, seed=0) -> list[int]:
    g = make_generator(seed)
    return [sample(logits, params, g) for _ in range(n)]


def test_greedy_variants_are_argmax():
    logits = torch.tensor([0.1, 2.0, 1.9, -3.0])
    for params in (SamplingParams(greedy=True), SamplingParams(temperature=0.0), SamplingParams(top_k=1)):
        assert params.is_greedy
        assert _draw(logits, params, 5) == [1] * 5


def test_top_k_limits_support():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    top = set(torch.topk(logits, 5).indices.tolist())
    drawn = set(_draw(logits, SamplingParams(top_k=5, temperature=2.0), 300))
    assert drawn <= top and len(drawn) > 1


def test_top_p_keeps_the_smallest_covering_set():
    logits = _logits([0.5, 0.3, 0.15, 0.05])
    assert set(_draw(logits, SamplingParams(top_p=0.6), 200)) == {0, 1}
    assert set(_draw(logits, SamplingParams(top_p=0.5), 50)) == {0}
    assert set(_draw(logits, SamplingParams(top_p=0.9), 400)) == {0, 1, 2}
    kept = torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.81)))
    assert kept.tolist() == [True, True, True, False]


def test_sampling_follows_the_distribution():
    probs = [0.6, 0.3, 0.1]
    n = 3000
    drawn = _draw(_logits(probs), SamplingParams(), n, seed=3)
    for tok, p in enumerate(probs):
        freq = drawn.count(tok) / n
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_temperature_sharpens_and_flattens():
    logits = _logits([0.7, 0.2, 0.1])
    cold = _draw(logits, SamplingParams(temperature=0.2), 500, seed=1).count(0)
    hot = _draw(logits, SamplingParams(temperature=5.0), 500, seed=1).count(0)
    assert cold > 450 and hot < 300


def test_seed_reproducible():
    logits = torch.zeros(1000)
    p = SamplingParams()
    assert _draw(logits, p, 20, seed=5) == _draw(logits, p, 20, seed=5)
    assert _draw(logits, p, 20, seed=5) != _draw(logits, p, 20, seed=6)


def test_resolve_from_generation_config():
    gc = {"do_sample": True, "temperature": 0.6, "top_p": 0.95}
    p = SamplingParams.resolve(gc)
    assert (p.temperature, p.top_p, p.top_k, p.is_greedy) == (0.6, 0.95, None, False)
    assert SamplingParams.resolve(gc, temperature=1.0, top_k=20) == SamplingParams(1.0, 0.95, 20, False)
    assert SamplingParams.resolve({}) == SamplingParams(1.0, 1.0, None, False)
    assert SamplingParams.resolve({"do_sample": False}).is_greedy
    assert SamplingParams.resolve(gc, greedy=True).is_greedy


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -2}])
def test_invalid_params(kwargs):
    with pytest.raises(UsageError):
        SamplingParams(**kwargs)


def test_sample_needs_one_row():
    with pytest.raises(UsageError):
        sample(torch.zeros(2, 3), SamplingParams())
