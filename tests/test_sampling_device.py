"""Where a sampled token's random draw happens (issue 13): `generate` makes its generator on the logits' device, so a
CUDA decode draws its Exp(1) values on the GPU. Before, the generator was the host's: every sampled token drew the
vocabulary's values on the CPU (~2 ms at V4's 129,280) and copied them to the GPU (517 KB, pageable).

On a CUDA stand-in the device is the host, so a copy between them is a no-op that no dispatch mode sees: the counting
test counts the calls that move a vocabulary-sized tensor to a device (`Tensor.to` / `.cuda` / `.cpu` naming one,
`copy_` between devices), which on a GPU are the copies, and the generator's device is checked where `generate`
makes it and where it draws."""

from __future__ import annotations

import standin_triton  # noqa: E402,F401  first: the interpreter on, or the module skipped

import pytest  # noqa: E402
import torch  # noqa: E402

from homerun.engine.placement import single_device  # noqa: E402
from homerun.engine.runtime import load  # noqa: E402
from homerun.engine.sampling import SamplingParams, make_generator, sample, sample_tensor, sampling_draw  # noqa: E402
from homerun.errors import UsageError  # noqa: E402
from homerun.models.deepseek_v4 import ModelArgs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp")

PROMPT = [3, 1, 4, 1, 5]
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9)
N_TOKENS = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny import make_checkpoint

    from homerun.formats.loader import open_checkpoint

    path = make_checkpoint(tmp_path_factory.mktemp("draw"), "mixed", sliding_window=8, index_topk=4)
    args = ModelArgs.from_hf_config(open_checkpoint(path).config)
    pl = single_device(args.n_layers, "standin:0", gpu_path=True, experts="device")
    m = load(path, dtype="bfloat16", experts="reference", placement=pl, cuda_graphs="on")
    m.decode_graphs.min_bucket_tokens = 16
    return m


def _names_a_device(args, kwargs) -> bool:
    """Whether a `Tensor.to` call moves to a device (a device, a device string, or a tensor to match), not only to
    a dtype."""
    for a in (*args, kwargs.get("device"), kwargs.get("other")):
        if isinstance(a, (torch.device, torch.Tensor)) or (isinstance(a, str) and a.split(":")[0] in ("cpu", "cuda")):
            return True
    return False


class Moves:
    """Counts the calls that would copy a vocabulary-sized tensor between the host and a GPU."""

    def __init__(self, monkeypatch, vocab: int) -> None:
        self.n = 0
        real_to, real_cuda, real_cpu, real_copy = torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu, torch.Tensor.copy_

        def big(t) -> bool:
            return isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == vocab  # rows of the vocabulary

        def to(t, *args, **kwargs):
            if big(t) and _names_a_device(args, kwargs):
                self.n += 1
            return real_to(t, *args, **kwargs)

        def cuda(t, *args, **kwargs):
            self.n += big(t)
            return real_cuda(t, *args, **kwargs)

        def cpu(t, *args, **kwargs):
            self.n += big(t)
            return real_cpu(t, *args, **kwargs)

        def copy_(t, src, *args, **kwargs):
            self.n += big(t) and t.device != src.device
            return real_copy(t, src, *args, **kwargs)

        for name, fn in (("to", to), ("cuda", cuda), ("cpu", cpu), ("copy_", copy_)):
            monkeypatch.setattr(torch.Tensor, name, fn)


def test_a_sampled_decode_token_moves_no_vocabulary_sized_tensor(model, monkeypatch):
    """No call that copies V values between host and device in a sampled decode step through `generate` (the old
    code's draw on the host generator and `.to(logits.device)`: one per token)."""
    vocab = model.args.vocab_size
    gen = model.generate(PROMPT, max_new_tokens=N_TOKENS, stop_ids=[], session=model.session(), seed=3, **SAMPLED)
    next(gen)  # the prefill
    moves = []
    for _ in range(N_TOKENS - 1):
        with monkeypatch.context() as mp:
            m = Moves(mp, vocab)
            next(gen)
        moves.append(m.n)
    assert moves == [0] * (N_TOKENS - 1)


def test_generate_draws_with_a_generator_on_the_logits_device(model, monkeypatch):
    """`generate` asks for its generator on the logits' device (a stand-in's is the host; a GPU's is cuda:N), and
    every draw uses that generator on those logits. The spy takes no default device, so a generator made without
    naming one (the host's, whatever the logits' device) fails here."""
    import homerun.engine.generate as generate_mod

    made, drawn = [], []

    def spy_make(seed, device):
        made.append(torch.device(device))
        return make_generator(seed, device)

    def spy_draw(logits, params, generator=None):
        drawn.append((logits.device, generator.device if generator is not None else None))
        return sampling_draw(logits, params, generator)

    monkeypatch.setattr(generate_mod, "make_generator", spy_make)
    monkeypatch.setattr(generate_mod, "sampling_draw", spy_draw)
    list(model.generate(PROMPT, max_new_tokens=4, stop_ids=[], session=model.session(), seed=3, **SAMPLED))
    dev = model.session().feed(PROMPT[:1], on_device=True).device
    assert made == [dev] and drawn == [(dev, dev)] * 4


def test_one_seed_reproduces_on_one_device(model):
    """The same seed gives the same tokens on the same device; another seed gives others (these ones, checked)."""
    def run(seed):
        return [s.token_id for s in model.generate(PROMPT, max_new_tokens=8, stop_ids=[], session=model.session(),
                                                   seed=seed, **SAMPLED)]

    a, b, c = run(11), run(11), run(12)
    assert a == b and a != c


def test_the_draw_refuses_a_generator_on_another_device():
    """A generator on another device than the logits would cost a copy of the draw per token: refused, naming both
    devices, in `sampling_draw` and `sample_tensor`. `sample` (the host API, which reads the id back anyway) still
    moves the probabilities to the generator."""

    class Elsewhere(torch.Generator):  # a CPU generator that says it lives on a GPU (none exists here)
        @property
        def device(self):
            return torch.device("cuda", 0)

    logits, params = torch.randn(50), SamplingParams(**SAMPLED)
    g = Elsewhere()
    g.manual_seed(1)
    for draw in (lambda: sampling_draw(logits, params, g), lambda: sample_tensor(logits, params, g)):
        with pytest.raises(UsageError, match=r"cuda:0.*cpu"):
            draw()
    assert sampling_draw(logits, SamplingParams(greedy=True), g) is None  # greedy draws nothing
    g1, g2 = make_generator(5, logits.device), make_generator(5, "cpu")
    assert sample(logits, params, g1) == int(sample_tensor(logits, params, g2))
