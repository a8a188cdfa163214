"""homerun.formats.tokenizer: ids by text, atomic special tokens, round trips, and streaming decode of split UTF-8."""

from __future__ import annotations

import json
import shutil

import pytest

from homerun.errors import CheckpointError
from homerun.formats.tokenizer import BOS_TEXT, EOS_TEXT, SPECIAL_TOKENS, Tokenizer, build_tiny_tokenizer

TEXT = "Hello, world! Café 你好，世界 😀🚀 — “quotes” ∑ ∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢"


@pytest.fixture(scope="module")
def tok(tiny_checkpoints):
    return Tokenizer.from_dir(tiny_checkpoints["mixed"])


def test_special_ids_and_atomic_specials(tok):
    assert (tok.bos_id, tok.eos_id) == (0, 1) and tok.vocab_size == 512
    for s in SPECIAL_TOKENS:
        tid = tok.token_to_id(s)
        assert tid is not None and tok.encode(s) == [tid], s
    ids = tok.encode(f"{BOS_TEXT}<｜User｜>hi<｜Assistant｜><think>hmm</think>ok{EOS_TEXT}")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    for s in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"):
        assert tok.token_to_id(s) in ids
    assert tok.encode("hi")[0] != tok.bos_id  # no BOS added


def test_round_trip_and_skip_special(tok):
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    full = f"{BOS_TEXT}<｜User｜>{TEXT}<｜Assistant｜></think>fine{EOS_TEXT}"
    assert tok.decode(tok.encode(full)) == full
    assert tok.decode(tok.encode(full), skip_special_tokens=True) == TEXT + "fine"
    assert len(tok.encode("the capital of France")) < len("the capital of France")  # merges were learned


def test_stream_decoder_handles_split_utf8(tok):
    ids = tok.encode(TEXT)
    # Multi-byte characters really are split across byte-level tokens here.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # held back at least once while a character was incomplete
    assert dec.flush() == ""


def test_stream_decoder_specials_and_flush(tok):
    dec = tok.stream_decoder(skip_special_tokens=True)
    out = "".join(dec.push(i) for i in tok.encode(f"<think>a😀b</think>{EOS_TEXT}"))
    assert out == "a😀b"
    partial = tok.encode("😀")[:-1]  # an emoji cut short at the end of generation
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in partial) == ""
    assert dec.flush() == "\ufffd"


def test_bos_eos_are_looked_up_by_text(tmp_path, tiny_checkpoints):
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy(tiny_checkpoints["mixed"] / "tokenizer.json", d / "tokenizer.json")
    cfg = json.loads((tiny_checkpoints["mixed"] / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<｜User｜>"  # a plain string form, and a different token
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = Tokenizer.from_dir(d)
    assert t.eos_id == t.token_to_id("<｜User｜>") != 1 and t.bos_id == 0
    (d / "tokenizer_config.json").unlink()  # without the config: DeepSeek's strings
    assert Tokenizer.from_dir(d).eos_id == 1
    cfg["bos_token"] = "<nope>"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="<nope>"):
        Tokenizer.from_dir(d)


def test_missing_or_corrupt_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_build_is_deterministic():
    assert build_tiny_tokenizer().to_str() == build_tiny_tokenizer().to_str()


def test_transformers_reads_the_same_ids(tok, tiny_checkpoints):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_checkpoints["mixed"]))
    text = f"{BOS_TEXT}<｜User｜>{TEXT}<｜Assistant｜><think>"
    assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (hf.bos_token_id, hf.eos_token_id) == (tok.bos_id, tok.eos_id)
