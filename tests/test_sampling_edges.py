"""Sampling at its boundaries, as users see it: the exact distribution `sample` draws from for small hand-made logits
(expected probabilities computed by hand below), the order of temperature and the filters, and the range checks.
Companion of tests/test_sampling.py; these pin what mutation testing found unpinned (benchmarks/mutation.md)."""

from __future__ import annotations

import math

import pytest
import torch

from homerun.engine.sampling import (
    SEED_MAX, SamplingParams, check_sampling, filter_logits, make_generator, sample,
)
from homerun.errors import UsageError


def _probs(logits: torch.Tensor, params: SamplingParams) -> list[float]:
    return torch.softmax(filter_logits(logits, params), dim=-1).tolist()


def _normalized(weights: list[float]) -> list[float]:
    s = sum(weights)
    return [w / s for w in weights]


def _draw_counts(logits, params, n, seed) -> list[int]:
    g = make_generator(seed)
    counts = [0] * logits.shape[-1]
    for _ in range(n):
        counts[sample(logits, params, g)] += 1
    return counts


def _assert_frequencies(counts: list[int], expected: list[float]) -> None:
    n = sum(counts)
    for tok, (c, p) in enumerate(zip(counts, expected)):
        if p == 0.0:
            assert c == 0, f"token {tok} is filtered out but was drawn {c} times"
        else:
            assert abs(c / n - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9, (tok, c / n, p)


# --- top-k -----------------------------------------------------------------------------------------------------


def test_top_k_keeps_exactly_k_tokens_the_kth_included():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])  # ranks: 1 > 3 > 2 > 0 > 4
    for k, kept in ((1, {1}), (2, {1, 3}), (3, {1, 3, 2}), (4, {1, 3, 2, 0})):
        finite = torch.isfinite(filter_logits(logits, SamplingParams(top_k=k)))
        assert {i for i, f in enumerate(finite.tolist()) if f} == kept, k
    # k = 2: softmax over logits 3 and 2 only: e^3 / (e^3 + e^2) = e / (e + 1)
    expected = [0.0, math.e / (math.e + 1), 0.0, 1 / (math.e + 1), 0.0]
    assert _probs(logits, SamplingParams(top_k=2)) == pytest.approx(expected, abs=1e-6)
    _assert_frequencies(_draw_counts(logits, SamplingParams(top_k=2), 2000, seed=4), expected)


def test_top_k_of_the_whole_vocabulary_or_more_is_off():
    logits = torch.tensor([0.5, -0.5, 1.5])
    for k in (3, 4, 0, None):
        assert torch.equal(filter_logits(logits, SamplingParams(top_k=k)), logits)


def test_top_k_keeps_every_token_tied_with_the_kth():
    # As transformers' TopKLogitsWarper: tokens equal to the k-th largest logit all stay.
    logits = torch.tensor([2.0, 1.0, 1.0, 0.0])
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_k=2))).tolist() == [True, True, True, False]


def test_top_k_is_applied_to_the_temperature_scaled_logits():
    logits = torch.tensor([2.0, 0.0, 1.0])
    # temperature 0.5 doubles the logits; top-2 keeps logits 4 and 2 -> e^4 / (e^4 + e^2) = e^2 / (e^2 + 1)
    e2 = math.exp(2.0)
    assert _probs(logits, SamplingParams(temperature=0.5, top_k=2)) == pytest.approx(
        [e2 / (e2 + 1), 0.0, 1 / (e2 + 1)], abs=1e-6)


# --- temperature ---------------------------------------------------------------------------------------------------


def test_temperature_divides_the_logits():
    logits = torch.tensor([1.0, 0.0, -1.0])
    for t in (0.5, 1.0, 2.0, 3.0):
        w = [math.exp(1 / t), 1.0, math.exp(-1 / t)]
        assert _probs(logits, SamplingParams(temperature=t)) == pytest.approx(_normalized(w), abs=1e-6), t
    assert torch.equal(filter_logits(logits, SamplingParams(temperature=2.0)), logits / 2)


def test_filter_returns_fp32_for_low_precision_logits():
    logits = torch.tensor([1.0, 0.0], dtype=torch.bfloat16)
    assert filter_logits(logits, SamplingParams()).dtype == torch.float32


# --- top-p -----------------------------------------------------------------------------------------------------


P4 = [0.5, 0.3, 0.15, 0.05]


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) for p in probs])


def test_top_p_alone_renormalizes_the_kept_tokens():
    # cumulative mass before each token: 0, 0.5, 0.8, 0.95. top_p 0.7 drops tokens whose predecessors cover 0.7.
    assert _probs(_logits(P4), SamplingParams(top_p=0.7)) == pytest.approx([0.5 / 0.8, 0.3 / 0.8, 0, 0], abs=1e-6)
    assert _probs(_logits(P4), SamplingParams(top_p=0.96)) == pytest.approx(P4, abs=1e-6)
    assert _probs(_logits(P4), SamplingParams(top_p=0.94)) == pytest.approx(_normalized(P4[:3]) + [0], abs=1e-6)


def test_temperature_is_applied_before_top_p_when_it_flattens():
    # temperature 2: p_i^(1/2), normalized: [0.379, 0.294, 0.208, 0.120]. Mass before token 2 is 0.673 < 0.7, so
    # top_p 0.7 keeps 3 tokens (the untempered distribution would keep 2: mass before token 2 is 0.8).
    w = [math.sqrt(p) for p in P4]
    expected = _normalized(w[:3]) + [0.0]
    params = SamplingParams(temperature=2.0, top_p=0.7)
    assert _probs(_logits(P4), params) == pytest.approx(expected, abs=1e-6)
    _assert_frequencies(_draw_counts(_logits(P4), params, 3000, seed=7), expected)


def test_temperature_is_applied_before_top_p_when_it_sharpens():
    # temperature 0.5: p_i^2, normalized: [0.685, 0.247, 0.062, 0.007]. Token 0 alone covers 0.6, so top_p 0.6
    # keeps one token (the untempered distribution would keep 2).
    params = SamplingParams(temperature=0.5, top_p=0.6)
    assert _probs(_logits(P4), params) == pytest.approx([1.0, 0, 0, 0], abs=1e-6)
    assert _draw_counts(_logits(P4), params, 50, seed=2) == [50, 0, 0, 0]
    # top_p 0.7: tokens 0 and 1 stay, renormalized p^2: 0.25 / 0.34 and 0.09 / 0.34
    assert _probs(_logits(P4), SamplingParams(temperature=0.5, top_p=0.7)) == pytest.approx(
        [0.25 / 0.34, 0.09 / 0.34, 0, 0], abs=1e-6)


def test_top_k_then_top_p_with_temperature():
    # temperature 2 then top_k 3 leaves sqrt-weights of tokens 0..2; top_p over those renormalized:
    # [0.431, 0.334, 0.236] -> mass before token 2 is 0.764 >= 0.75: token 2 goes too.
    w = [math.sqrt(p) for p in P4]
    kept = _normalized(w[:3])
    assert kept[0] + kept[1] == pytest.approx(0.7641, abs=1e-4)
    params = SamplingParams(temperature=2.0, top_k=3, top_p=0.75)
    assert _probs(_logits(P4), params) == pytest.approx(_normalized(w[:2]) + [0, 0], abs=1e-6)


def test_top_p_one_is_off_even_for_tokens_below_fp32_rounding():
    # e^-30 / (1 + e^-30) ~ 9e-14: the mass before the last token rounds to 1.0 in fp32, yet top_p 1 drops nothing
    logits = torch.tensor([0.0, -30.0, -40.0])
    assert torch.equal(filter_logits(logits, SamplingParams(top_p=1.0)), logits)


def test_top_p_keeps_the_most_likely_token_even_when_it_alone_exceeds_top_p():
    logits = torch.tensor([5.0, 0.0, 0.0])
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.01))).tolist() == [True, False, False]
    # unsorted input: the kept token is found wherever it is
    logits = torch.tensor([0.0, 0.0, 5.0, 1.0])
    assert torch.isfinite(filter_logits(logits, SamplingParams(top_p=0.01))).tolist() == [False, False, True, False]


# --- sample ---------------------------------------------------------------------------------------------------


def test_seeded_draws_follow_the_filtered_distribution_and_repeat():
    params = SamplingParams(temperature=2.0, top_p=0.7)
    logits = _logits(P4)
    a = [sample(logits, params, make_generator(123)) for _ in range(3)]
    g1, g2 = make_generator(99), make_generator(99)
    assert [sample(logits, params, g1) for _ in range(40)] == [sample(logits, params, g2) for _ in range(40)]
    assert len(set(a)) == 1  # a fresh generator with the same seed gives the same first draw
    assert make_generator(None).initial_seed() != make_generator(None).initial_seed()  # OS entropy


def test_sample_without_a_generator_uses_the_global_one():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    torch.manual_seed(0)
    assert {sample(logits, SamplingParams(top_k=2)) for _ in range(20)} <= {1, 2}


def test_greedy_ignores_temperature_and_filters():
    logits = torch.tensor([0.0, 0.1, 3.0, 2.9])
    for p in (SamplingParams(temperature=0.0, top_p=0.5), SamplingParams(greedy=True, temperature=5.0),
              SamplingParams(top_k=1, temperature=50.0)):
        assert p.is_greedy and sample(logits, p) == 2
    assert not SamplingParams(top_k=2).is_greedy and not SamplingParams(temperature=0.01).is_greedy


def test_sample_takes_exactly_one_row():
    for bad in (torch.zeros(1, 3), torch.zeros(())):
        with pytest.raises(UsageError, match="one logits row"):
            sample(bad, SamplingParams(greedy=True))


# --- the settings' ranges ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,value", [
    ("temperature", 0), ("temperature", 0.0), ("temperature", 1e9), ("top_p", 1.0), ("top_p", 1e-9), ("top_k", 0),
    ("top_k", 5), ("max_new_tokens", 1), ("seed", 0), ("seed", SEED_MAX), ("temperature", None),
])
def test_values_in_range_pass(name, value):
    check_sampling(**{name: value})


@pytest.mark.parametrize("name,value", [
    ("temperature", -1e-9), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.0000001), ("top_p", math.nan), ("top_p", "0.5"), ("top_k", -1), ("top_k", 2.0),
    ("max_new_tokens", 0), ("max_new_tokens", 1.0), ("seed", -1), ("seed", SEED_MAX + 1), ("seed", 1.0),
])
def test_values_out_of_range_name_the_setting(name, value):
    with pytest.raises(UsageError) as err:
        check_sampling(**{name: value})
    flag = name.replace("_", "-")
    assert str(err.value).startswith(f"{flag} must be ") and f"got {value!r}" in str(err.value)
    assert (err.value.hint == "temperature 0 means greedy (argmax)") == (name == "temperature")


def test_the_first_bad_setting_is_named_and_unknown_ones_are_a_bug():
    with pytest.raises(UsageError, match="^top-p"):
        check_sampling(temperature=1.0, top_p=2.0, top_k=-1)
    with pytest.raises(KeyError, match="temprature"):
        check_sampling(temprature=1.0)


def test_resolve_edges():
    gc = {"do_sample": False, "temperature": 0.6, "top_p": 0.9, "top_k": 40}
    assert SamplingParams.resolve(gc).is_greedy
    p = SamplingParams.resolve(gc, temperature=0.7)  # an explicit temperature overrides do_sample: false
    assert (p.temperature, p.top_p, p.top_k, p.greedy) == (0.7, 0.9, 40, False)
    assert SamplingParams.resolve(gc, top_p=1.0, top_k=0) == SamplingParams(0.6, 1.0, None, True)
    assert SamplingParams.resolve({"top_k": 0}).top_k is None  # 0 = off, stored as None
    assert SamplingParams.resolve(None, top_k=3).top_k == 3
    assert isinstance(SamplingParams.resolve({"top_k": 3.0}).top_k, int)
    assert isinstance(SamplingParams.resolve({"temperature": 1}).temperature, float)
    assert SamplingParams(0.5, 0.9, 3).to_dict() == {"temperature": 0.5, "top_p": 0.9, "top_k": 3, "greedy": False}
