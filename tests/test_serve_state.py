"""`homerun serve --state FILE`: the live conversation survives a restart as a KV snapshot (issue 18), restored only
when it belongs to the model, and a failure to persist never breaks shutdown."""

from __future__ import annotations

import torch

import homerun
from homerun.serve.engine import Engine


def _ids(n, vocab, seed=0):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_live_state_is_saved_at_stop_and_restored_at_start(tiny_checkpoints, tmp_path):
    model = homerun.load(tiny_checkpoints["mixed"], expert_act="fp32")
    path = tmp_path / "live.kv.safetensors"
    eng = Engine(model, state_path=path)
    ids = _ids(150, model.args.vocab_size)
    logits = eng._prefix.session.feed(ids)
    eng.stop()
    assert path.is_file() and eng.state_note.startswith("saved 150 tokens")

    again = Engine(homerun.load(tiny_checkpoints["mixed"], expert_act="fp32"), state_path=path)
    sess = again._prefix.session
    assert again.state_note.startswith("restored 150 tokens")
    assert sess.tokens == ids and torch.equal(sess.last_logits, logits)
    assert again._prefix.reuse(ids + [1, 2]) == 150  # the next turn continues from the restored state


def test_a_snapshot_of_another_model_is_not_restored(tiny_checkpoints, tmp_path):
    path = tmp_path / "live.kv.safetensors"
    other = homerun.load(tiny_checkpoints["hca"], expert_act="fp32")
    s = other.session()
    s.feed(_ids(20, other.args.vocab_size))
    s.save(path)
    eng = Engine(homerun.load(tiny_checkpoints["mixed"], expert_act="fp32"), state_path=path)
    assert eng._prefix.session.n_tokens == 0 and eng.state_note.startswith("not restored")


def test_an_unwritable_state_path_never_breaks_shutdown(tiny_checkpoints, tmp_path):
    model = homerun.load(tiny_checkpoints["mixed"], expert_act="fp32")
    (tmp_path / "a-file").write_text("not a folder")
    eng = Engine(model, state_path=tmp_path / "a-file" / "live.kv.safetensors")  # its folder cannot exist
    eng._prefix.session.feed(_ids(10, model.args.vocab_size))
    eng.stop()
    assert eng.state_note.startswith("not saved")


def test_presence_checks_leave_the_logits_where_they_are(tiny_checkpoints, tmp_path, monkeypatch):
    """Prefix reuse, marking a point and persisting test whether logits exist with `Session.has_logits`: reading
    `last_logits` would copy device logits to the host (a sync) just to see that they are there. Only the snapshot
    itself reads them."""
    from homerun.engine.session import Session
    from homerun.serve.prefix import PrefixCache

    model = homerun.load(tiny_checkpoints["mixed"], expert_act="fp32")
    ids = _ids(30, model.args.vocab_size)
    eng = Engine(model, state_path=tmp_path / "live.kv.safetensors")
    sess = eng._prefix.session
    sess.feed(ids, on_device=True)
    reads = []
    real = Session.last_logits
    monkeypatch.setattr(Session, "last_logits", property(lambda s: reads.append(1) or real.fget(s), real.fset))
    prefix = PrefixCache(sess)
    prefix.mark()
    assert prefix.points == [30] and prefix.reuse(ids) == 30 and prefix.reuse(ids + [1]) == 30
    assert reads == []
    monkeypatch.setattr(Session, "save", lambda s, path: None)  # the snapshot's own read is not a presence check
    eng.persist()
    assert reads == [] and eng.state_note.startswith("saved 30 tokens")


def test_a_request_leaves_the_prompt_logits_where_they_are(tiny_checkpoints, monkeypatch):
    """A request reads `Session.last_logits` nowhere (each read of device logits is a copy to the host and a wait):
    the engine keeps the logits its first token was sampled from by reference, and `last_prompt_logits` copies them
    only when asked; they are the prompt's logits (bit for bit, fed with the engine's boundaries)."""
    import threading

    from homerun.engine.session import Session
    from homerun.serve.engine import Done, Job

    model = homerun.load(tiny_checkpoints["mixed"], expert_act="fp32")
    ids = _ids(30, model.args.vocab_size, seed=3)
    reads = []
    real = Session.last_logits
    monkeypatch.setattr(Session, "last_logits", property(lambda s: reads.append(1) or real.fget(s), real.fset))
    eng = Engine(model).start()
    events, done = [], threading.Event()
    try:
        for n in (30, 24):  # a fresh prompt, then one the live state has to be rolled back for
            done.clear()
            eng.submit(Job(ids=ids[:n], max_tokens=3, chat=False,
                           sink=lambda e: (events.append(e), isinstance(e, Done) and done.set())))
            assert done.wait(120), events[-3:]
            assert reads == [], n
    finally:
        eng.stop()
    assert isinstance(events[-1], Done)
    got = eng.last_prompt_logits
    fresh = model.session()
    fresh.feed(ids[:23])
    assert torch.equal(got, fresh.feed(ids[23:24])) and got.device.type == "cpu"
