"""A logits row holding NaN (a broken model, kernel or device) stops generation with NumericError (exit 1) naming
the step, greedy or sampled, without a host sync of its own: `sample_tensor` marks the row on the device
(NAN_TOKEN) and the one readback of the id raises. (tests/test_decode_host_syncs.py counts 1 sync per token.)"""

from __future__ import annotations

import pytest
import torch

import homerun
from homerun.engine.sampling import (NAN_TOKEN, SamplingParams, filter_logits, make_generator, read_token, sample,
                                     sample_tensor, sampling_draw)
from homerun.errors import ExitCode, NumericError

MODES = {"greedy": dict(greedy=True), "sampled": dict(temperature=0.8, top_k=40, top_p=0.9, seed=3),
         "top-p only": dict(temperature=1.0, top_p=0.95, seed=3)}
PARAMS = {"greedy": SamplingParams(greedy=True), "sampled": SamplingParams(temperature=0.8, top_k=40, top_p=0.9),
          "top-p only": SamplingParams(top_p=0.95)}


def _row(nan_at: int | None) -> torch.Tensor:
    x = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 3
    if nan_at is not None:
        x[nan_at] = float("nan")
    return x


@pytest.mark.parametrize("how", sorted(PARAMS))
@pytest.mark.parametrize("nan_at", [0, 7, 499])
def test_sample_tensor_marks_a_nan_row_and_the_readback_raises(how, nan_at):
    t = sample_tensor(_row(nan_at), PARAMS[how], make_generator(1))
    assert t.shape == (1,) and t.dtype == torch.int64 and int(t) == NAN_TOKEN
    with pytest.raises(NumericError, match="NaN logits at step 5") as e:
        read_token(t, "step 5")
    assert e.value.exit_code == ExitCode.RUNTIME
    with pytest.raises(NumericError, match="NaN logits"):
        sample(_row(nan_at), PARAMS[how], make_generator(1))


@pytest.mark.parametrize("how", sorted(PARAMS))
def test_a_finite_row_reads_back_its_id(how):
    g1, g2 = make_generator(4), make_generator(4)
    assert read_token(sample_tensor(_row(None), PARAMS[how], g1), "x") == sample(_row(None), PARAMS[how], g2)


class _Ops:
    """The ATen ops that would launch a kernel (homerun.kernels.counting's rule), each with whether it touches a
    tensor of `n` elements (a pass over the logits row)."""

    def __init__(self, n: int) -> None:
        self.n, self.ops = n, []

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        from homerun.kernels.counting import launches_kernel

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if launches_kernel(func, args, kwargs, out):
                    row = any(isinstance(t, torch.Tensor) and t.numel() == outer.n
                              for t in tree_leaves((args, kwargs, out)))
                    outer.ops.append((func.overloadpacket.__name__, row))
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    @property
    def row_passes(self) -> int:
        return sum(row for _, row in self.ops)


@pytest.mark.parametrize("how", sorted(PARAMS))
def test_the_nan_check_makes_no_pass_over_the_row(how):
    """The NaN check rides the choice (`torch.max`'s value is NaN exactly when its input holds one): against the
    same choice without a check, no op more touches the row and at most 2 more launch (isnan and where, on one
    element). The check it replaced (isnan of the row, any, masked_fill) made 2 passes and 3 launches a token."""
    params, x = PARAMS[how], _row(None)
    with _Ops(x.numel()) as checked:
        token = sample_tensor(x, params, make_generator(1))
    g = make_generator(1)
    with _Ops(x.numel()) as bare:
        if params.is_greedy:
            want = torch.argmax(x)
        else:
            want = torch.argmax(torch.softmax(filter_logits(x, params), dim=-1) / sampling_draw(x, params, g))
    assert int(token) == int(want)
    assert checked.row_passes == bare.row_passes, (checked.ops, bare.ops)
    assert len(checked.ops) - len(bare.ops) <= 2, (checked.ops, bare.ops)


@pytest.mark.parametrize("nan_at", [0, 7, 499])
def test_a_nan_survives_every_filter_to_the_choice(nan_at):
    """What the check relies on, sampled: the NaN logit stays NaN through temperature, top-k, top-p (both paths)
    and the softmax, so the drawn quotient's max is NaN; a +inf logit (softmax inf - inf) is caught too."""
    from homerun.engine.sampling import _top_p_sorted

    x = _row(nan_at)
    for params in (PARAMS["sampled"], PARAMS["top-p only"], SamplingParams(temperature=0.3, top_k=5)):
        assert torch.isnan(filter_logits(x, params)[nan_at])
    assert torch.isnan(_top_p_sorted(x, 0.5)[nan_at])
    x[nan_at] = float("inf")
    assert int(sample_tensor(x, PARAMS["sampled"], make_generator(2))) == NAN_TOKEN


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return homerun.load(tiny_checkpoints["mixed"], expert_act="fp32")


@pytest.mark.parametrize("how", sorted(MODES))
@pytest.mark.parametrize("bad_step", [0, 2])
def test_generation_stops_at_the_step_whose_logits_are_nan(model, monkeypatch, how, bad_step):
    """NaN from the bad_step-th logits on (0: the prefill's): the steps before come out, then NumericError names the
    step; the session holds the prompt and every token yielded (the last was fed by the step that went wrong)."""
    real = model.net.logits
    calls = []

    def logits(hidden):
        out = real(hidden)
        calls.append(1)
        if len(calls) > bad_step:
            out = out.clone()
            out[..., 3] = float("nan")  # one NaN in the row
        return out

    monkeypatch.setattr(model.net, "logits", logits)
    prompt = [5, 9, 2, 7]
    sess = model.session()
    got = []
    with pytest.raises(NumericError, match=f"NaN logits at generated token {bad_step} ") as e:
        for step in model.generate(prompt, max_new_tokens=6, stop_ids=[], session=sess, **MODES[how]):
            got.append(step.token_id)
    assert len(got) == bad_step and e.value.exit_code == ExitCode.RUNTIME
    assert sess.tokens == prompt + got


def test_session_decode_refuses_the_nan_mark(model):
    sess = model.session()
    logits = sess.feed([5, 9, 2], on_device=True)
    with pytest.raises(NumericError, match="NaN logits"):
        sess.decode(torch.tensor([NAN_TOKEN]), NAN_TOKEN)
    assert sess.tokens == [5, 9, 2] and torch.equal(sess.feed([], on_device=True), logits)


class _Chat:
    """A chat whose turn raises `exc` before any delta."""

    stop_requested = False

    def __init__(self, exc):
        self.exc = exc

    def request_stop(self):
        self.stop_requested = True

    def turn(self, text):
        raise self.exc
        yield  # a generator, as ChatSession.turn is


def test_chat_exits_on_nan_logits_and_goes_on_after_other_errors(monkeypatch):
    """The terminal and --json chat report a full context and keep reading, but NaN logits end the chat (the CLI
    turns the NumericError into exit 1 with its message)."""
    import io

    from rich.console import Console

    from homerun.cli import chat_view
    from homerun.errors import ContextFullError

    console = Console(file=io.StringIO())
    nan = NumericError("NaN logits at generated token 2 (after 9 context tokens)")
    with pytest.raises(NumericError, match="generated token 2"):
        chat_view._stream_turn(console, _Chat(nan), "hi")
    chat_view._stream_turn(console, _Chat(ContextFullError("context full: growing")), "hi")
    assert "context full" in console.file.getvalue()

    events = []
    out = type("Out", (), {"event": lambda self, e: events.append(e)})()
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nagain\n"))
    chat_view.json_lines(_Chat(ContextFullError("context full: growing")), out)
    assert [e["event"] for e in events] == ["error", "error"]  # both lines read
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nagain\n"))
    with pytest.raises(NumericError):
        chat_view.json_lines(_Chat(nan), out)
    assert len(events) == 2
