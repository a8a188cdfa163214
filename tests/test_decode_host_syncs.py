"""Host syncs per decode token through the generation loop (issue 13) on an all-VRAM CUDA stand-in with whole-step
graphs: the loop samples on the device and feeds the id back as a device tensor, so the sampled id read back for the
Step is the only sync. The tokens and logits must equal the host loop's (feed, logits on the host, `sample`)."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.engine.sampling import SamplingParams, make_generator, sample, sample_tensor  # noqa: E402
from homerun.kernels.counting import count_device_work  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

PROMPT = [3, 1, 4, 1, 5]
# Greedy, and a seeded draw through every filter (temperature, top-k, top-p).
PARAMS = {"greedy": dict(greedy=True), "sampled": dict(temperature=0.8, top_k=40, top_p=0.9, seed=7)}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny import make_checkpoint

    from homerun.formats.loader import open_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("syncs"), "mixed", sliding_window=8, index_topk=4)
    args = ModelArgs.from_hf_config(open_checkpoint(path).config)
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    m = load(path, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs="on")
    m.decode_graphs.min_bucket_tokens = 16
    return m


def _host_loop(model, n: int, kw: dict) -> tuple[list[int], list[torch.Tensor]]:
    """The loop as it was: logits to the host each token, `sample` there, the id fed back as a list."""
    params = SamplingParams.resolve(model.generation_config, temperature=kw.get("temperature"),
                                    top_p=kw.get("top_p"), top_k=kw.get("top_k"), greedy=kw.get("greedy", False))
    g = make_generator(kw.get("seed", 0))
    s = model.session()
    logits = s.feed(PROMPT)
    toks, seen = [], [logits]
    for i in range(n):
        if i:
            logits = s.feed([toks[-1]])
            seen.append(logits)
        toks.append(sample(logits, params, g))
    return toks, seen


@pytest.mark.parametrize("how", sorted(PARAMS))
def test_one_host_sync_per_decode_token_and_the_same_tokens(model, how):
    kw = PARAMS[how]
    ref, ref_logits = _host_loop(model, 8, kw)
    steps, syncs = [], []
    gen = model.generate(PROMPT, max_new_tokens=8, stop_ids=[], session=model.session(), **kw)
    for i in range(8):
        with count_device_work() as cw:
            steps.append(next(gen))
        if i >= 3:  # past the prefill (step 0) and the whole-step captures of steps 1-2
            syncs.append(cw.c.syncs)
            assert cw.c.syncs <= 1, (i, cw.c.sync_names)
    assert syncs == [1] * 5  # the id read back: streaming needs it
    assert [st.token_id for st in steps] == ref
    assert model.decode_graphs.replays > 0


@pytest.mark.parametrize("how", sorted(PARAMS))
def test_device_logits_equal_the_host_loops(model, how):
    """Session.decode's device logits, step by step, equal the host loop's bit for bit."""
    kw = PARAMS[how]
    ref, ref_logits = _host_loop(model, 6, kw)
    params = SamplingParams.resolve(model.generation_config, temperature=kw.get("temperature"),
                                    top_p=kw.get("top_p"), top_k=kw.get("top_k"), greedy=kw.get("greedy", False))
    g = make_generator(kw.get("seed", 0))
    s = model.session()
    logits = s.feed(PROMPT, on_device=True)
    toks, tok_t = [], None
    for i in range(6):
        if i:
            logits = s.decode(tok_t, toks[-1])
        assert torch.equal(logits.cpu(), ref_logits[i]), i
        tok_t = sample_tensor(logits, params, g)
        toks.append(int(tok_t))
    assert toks == ref and s.tokens == PROMPT + ref[:-1]
    assert torch.equal(s.last_logits, ref_logits[-1]) and s.has_logits


@pytest.mark.parametrize("how", ["greedy", "sampled", "top-p only"])
def test_nan_logits_of_a_graphed_step_stop_generation_at_its_one_sync(model, monkeypatch, how):
    """NaN in a replayed whole-step graph's logits (step 4, past the captures) ends generation with NumericError
    naming the step, and that step still makes one host sync: the check rides the sampled id's readback."""
    from homerun.errors import NumericError

    kw = {**PARAMS, "top-p only": dict(top_p=0.95, seed=3)}[how]
    real, calls = model.net.logits, []

    def logits(hidden):
        out = real(hidden)
        calls.append(1)
        if len(calls) > 4:
            out = out.clone()
            out[..., 11] = float("nan")
        return out

    monkeypatch.setattr(model.net, "logits", logits)
    r0 = model.decode_graphs.replays
    gen = model.generate(PROMPT, max_new_tokens=8, stop_ids=[], session=model.session(), **kw)
    for i in range(4):
        next(gen)
    with count_device_work() as cw, pytest.raises(NumericError, match="NaN logits at generated token 4 "):
        next(gen)
    assert cw.c.syncs == 1, cw.c.sync_names
    assert model.decode_graphs.replays > r0


def test_sample_tensor_draws_what_sample_draws():
    """Same generator state in, same ids out, generator left in the same state (the next draws agree too)."""
    logits = torch.randn(300, generator=torch.Generator().manual_seed(1)) * 3
    for params in (SamplingParams(), SamplingParams(temperature=0.5, top_k=20), SamplingParams(top_p=0.7),
                   SamplingParams(temperature=2.0, top_k=50, top_p=0.95), SamplingParams(greedy=True)):
        for seed in range(20):
            g1, g2 = make_generator(seed), make_generator(seed)
            a = [sample(logits, params, g1) for _ in range(3)]
            b = [int(sample_tensor(logits, params, g2)) for _ in range(3)]
            assert a == b, (params, seed)
    torch.manual_seed(3)
    a = [sample(logits, SamplingParams(), None) for _ in range(3)]
    torch.manual_seed(3)
    assert a == [int(sample_tensor(logits, SamplingParams(), None)) for _ in range(3)]


def test_a_blocking_device_to_host_copy_counts_as_a_sync():
    """The old loop's `.cpu()` of the logits: a sync on a GPU, invisible on a stand-in (host tensors). Checked on fake
    CUDA tensors (no CUDA needed to make them)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from homerun.kernels.counting import is_d2h_copy

    with FakeTensorMode():
        dev, host = torch.empty(3, device="cuda"), torch.empty(3)
    assert is_d2h_copy("_to_copy", (dev,), {"device": torch.device("cpu")}, host)
    assert is_d2h_copy("copy_", (host, dev), {}, host)
    assert not is_d2h_copy("_to_copy", (dev,), {"non_blocking": True}, host)  # into pinned memory: no wait
    assert not is_d2h_copy("_to_copy", (host,), {}, dev) and not is_d2h_copy("_to_copy", (host,), {}, host)
