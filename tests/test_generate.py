"""Generation: greedy continuations identical to transformers' greedy; prefix reuse; early close; stop reasons."""

from __future__ import annotations

import pytest
import torch

import homerun
from homerun.errors import UsageError
from homerun.engine.generate import FINISH_EOS, FINISH_LENGTH, Step

KINDS = ("mixed", "csa", "hca")
PROMPT_LEN = 600


def _ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (n,), generator=g).tolist()  # no BOS/EOS inside the prompt


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {k: homerun.load(tiny_checkpoints[k], expert_act="fp32") for k in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers(kind, models, tiny_checkpoints):
    transformers = pytest.importorskip("transformers")
    model = models[kind]
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(
        tiny_checkpoints[kind], dtype=torch.bfloat16, device_map="cpu"
    ).float().eval()
    prompt = _ids(PROMPT_LEN, model.args.vocab_size, seed=11)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)
    ref = out[0, PROMPT_LEN:].tolist()
    mine = [s.token_id for s in model.generate(prompt, max_new_tokens=32, greedy=True)]
    assert mine == ref  # both stop after EOS if it comes first


def test_steps_and_finish_reasons(models):
    model = models["mixed"]
    prompt = _ids(50, model.args.vocab_size, seed=1)
    steps = list(model.generate(prompt, max_new_tokens=5, greedy=True, stop_ids=[]))
    assert [s.index for s in steps] == list(range(5))
    assert all(isinstance(s, Step) for s in steps)
    assert steps[0].prefill_s is not None and steps[0].prefill_tokens == 50 and steps[0].tokens_per_s is None
    assert all(s.prefill_s is None and s.tokens_per_s > 0 for s in steps[1:])
    assert [s.finish_reason for s in steps] == [None] * 4 + [FINISH_LENGTH]
    # stopping on a given id: make the first greedy token a stop id
    first = steps[0].token_id
    stopped = list(model.generate(prompt, max_new_tokens=5, greedy=True, stop_ids=[first]))
    assert len(stopped) == 1 and stopped[0].finish_reason == FINISH_EOS
    assert set(stopped[0].to_dict()) >= {"token_id", "index", "step_s", "tokens_per_s", "prefill_s", "finish_reason"}


def test_defaults_come_from_generation_config(models):
    model = models["mixed"]
    assert model.generation_config.get("temperature") == 1.0 and model.generation_config.get("top_p") == 1.0
    prompt = _ids(20, model.args.vocab_size, seed=2)
    a = [s.token_id for s in model.generate(prompt, max_new_tokens=8, seed=7, stop_ids=[])]
    b = [s.token_id for s in model.generate(prompt, max_new_tokens=8, seed=7, temperature=1.0, top_p=1.0, stop_ids=[])]
    c = [s.token_id for s in model.generate(prompt, max_new_tokens=8, seed=8, stop_ids=[])]
    assert a == b
    assert a != c  # different seed, different sample path (vocab 512 at temperature 1)


def test_prefix_reuse_feeds_only_the_remainder(models):
    model = models["csa"]
    turn1 = _ids(150, model.args.vocab_size, seed=3)
    sess = model.session()
    gen1 = [s.token_id for s in model.generate(turn1, max_new_tokens=6, greedy=True, session=sess, stop_ids=[])]
    # the session holds the prompt and every generated token but the last
    assert sess.tokens == turn1 + gen1[:-1]
    turn2 = turn1 + gen1 + _ids(40, model.args.vocab_size, seed=4)
    steps = list(model.generate(turn2, max_new_tokens=6, greedy=True, session=sess, stop_ids=[]))
    assert steps[0].reused_tokens == len(turn1) + 5 and steps[0].prefill_tokens == len(turn2) - len(turn1) - 5
    fresh = [s.token_id for s in model.generate(turn2, max_new_tokens=6, greedy=True, stop_ids=[])]
    assert [s.token_id for s in steps] == fresh
    # a session that is not a prefix is reset
    other = _ids(30, model.args.vocab_size, seed=5)
    steps = list(model.generate(other, max_new_tokens=2, greedy=True, session=sess, stop_ids=[]))
    assert steps[0].reused_tokens == 0 and sess.tokens[:30] == other


def test_closing_early_leaves_session_consistent(models):
    model = models["hca"]
    prompt = _ids(140, model.args.vocab_size, seed=6)
    sess = model.session()
    gen = model.generate(prompt, max_new_tokens=20, greedy=True, session=sess, stop_ids=[])
    got = [next(gen).token_id for _ in range(3)]
    gen.close()  # what Ctrl-C in chat does
    assert sess.tokens == prompt + got[:2]
    again = [s.token_id for s in model.generate(prompt + got, max_new_tokens=4, greedy=True, session=sess, stop_ids=[])]
    ref = [s.token_id for s in model.generate(prompt, max_new_tokens=7, greedy=True, stop_ids=[])]
    assert got + again == ref


def test_bad_arguments(models):
    model = models["mixed"]
    with pytest.raises(UsageError):
        model.generate([], max_new_tokens=3)
    with pytest.raises(UsageError):
        model.generate([5], max_new_tokens=3, top_p=0.0)
    assert list(model.generate([5], max_new_tokens=0)) == []
