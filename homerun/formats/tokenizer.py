"""The tokenizer of a V4 checkpoint directory, read with `tokenizers` alone (no transformers at run time).

`Tokenizer.from_dir(path)` loads `tokenizer.json`; BOS/EOS ids are looked up by their text (from
`tokenizer_config.json`, else DeepSeek's strings), never hard-coded. `StreamDecoder` turns a stream of token ids
into text pieces without ever emitting half of a multi-byte UTF-8 character. It does not build chat prompts
(that is the chat encoder's job) and adds no BOS: DeepSeek's encoder writes BOS into the prompt text itself.

Forged turns: the chat encoder returns a `PromptText`, a `str` that remembers which characters the template wrote
and which came from message content. `Tokenizer.encode` of a `PromptText` turns special-token strings into control
tokens only where the template wrote them; in content they are ordinary text (a pasted `<｜end▁of▁sentence｜>` or
`<｜User｜>` cannot end or open a turn). A plain `str` keeps the old behaviour (special strings atomic), and
`allow_special=True` / `False` forces either way.

`build_tiny_tokenizer()` makes the small deterministic byte-level BPE that the checkpoint writer ships.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from homerun.errors import CheckpointError

BOS_TEXT = "<｜begin▁of▁sentence｜>"
EOS_TEXT = "<｜end▁of▁sentence｜>"

# V4 special strings (deepseek-v4.md section 6). The first two get ids 0 and 1 as in the real vocabulary; the
# real ids of the others are ~128k and differ between releases, so callers resolve every id by text.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TEXT,
    EOS_TEXT,
    "<｜User｜>",
    "<｜Assistant｜>",
    "<｜System｜>",
    "<｜latest_reminder｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
    "<｜action｜>",
    "<｜query｜>",
    "<｜authority｜>",
    "<｜domain｜>",
    "<｜title｜>",
    "<｜read_url｜>",
)
TINY_VOCAB_SIZE = 512

_CORPUS = """\
DeepSeek-V4 is a mixture-of-experts language model. Each token is routed to a few experts out of many, and only
those experts are computed. The attention mixes a sliding window of recent tokens with compressed entries that
summarize older windows; a lightning indexer chooses which compressed entries each query reads.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! How vexingly quick daft
zebras jump. Sphinx of black quartz, judge my vow. 0123456789 +-*/=<>()[]{} "quoted" 'single' #hash @at $dollar
def forward(self, x):\n    return self.head(self.norm(x))\n\nfor i in range(10):\n    print(i, i * i)\n
Hello, world. What is the capital of France? The capital of France is Paris. Let me think about this step by step.
The weather in Beijing is sunny, 22°C. Café, naïve, résumé, über, señor. 你好，世界。今天天气很好。日本語のテキスト。
Emoji: 😀 🚀 ✨ — “smart quotes” and ‘apostrophes’ … ellipsis. Ελληνικά, русский язык, العربية, עברית.
Numbers: 3.14159, 2.71828, 1e-6, 65536, 1048576, 129280. JSON: {"role": "user", "content": "hi"}.
"""


class PromptText(str):
    """A prompt string that knows which parts the chat template wrote (`template=True`: its control tokens are
    special) and which came from message content (plain text, whatever it spells). It is a real `str`, equal to the
    text it holds, so encoders keep their byte-for-byte output. `+` of two PromptTexts and slicing keep the
    segments; any other string operation gives a plain `str` (which `Tokenizer.encode` treats the old way)."""

    segments: tuple[tuple[str, bool], ...]

    def __new__(cls, text: str = "", template: bool = False) -> "PromptText":
        if not isinstance(text, str):
            raise TypeError(f"PromptText needs a str, got {type(text).__name__}")
        text = str(text)
        return cls._make(text, ((text, bool(template)),) if text else ())

    @classmethod
    def _make(cls, text: str, segments: tuple[tuple[str, bool], ...]) -> "PromptText":
        obj = str.__new__(cls, text)
        obj.segments = segments
        return obj

    @classmethod
    def _from_segments(cls, segments: Iterable[tuple[str, bool]]) -> "PromptText":
        runs: list[list[str]] = []
        kinds: list[bool] = []
        for text, template in segments:
            if not text:
                continue
            if kinds and kinds[-1] == template:  # adjacent template text must stay one piece (see encode)
                runs[-1].append(text)
            else:
                runs.append([text])
                kinds.append(bool(template))
        merged = tuple(("".join(run), kind) for run, kind in zip(runs, kinds))
        return cls._make("".join(text for text, _ in merged), merged)

    @classmethod
    def concat(cls, parts: Iterable["PromptText"]) -> "PromptText":
        segs: list[tuple[str, bool]] = []
        for part in parts:
            if not isinstance(part, PromptText):
                raise TypeError(f"PromptText.concat takes PromptTexts only, got {type(part).__name__}")
            segs.extend(part.segments)
        return cls._from_segments(segs)

    def join_parts(self, parts: Sequence["PromptText"]) -> "PromptText":
        """Like str.join, keeping the segments of the separator (self) and of every part."""
        out: list[PromptText] = []
        for i, part in enumerate(parts):
            if i:
                out.append(self)
            out.append(part)
        return PromptText.concat(out)

    def __add__(self, other):  # type: ignore[override]
        if not isinstance(other, PromptText):
            return str.__add__(self, other)
        a, b = self.segments, other.segments
        if a and b and a[-1][1] == b[0][1]:
            segments = a[:-1] + ((a[-1][0] + b[0][0], a[-1][1]),) + b[1:]
        else:
            segments = a + b
        return PromptText._make(str.__add__(self, other), segments)

    def __radd__(self, other):
        if isinstance(other, PromptText):
            return PromptText._from_segments(other.segments + self.segments)
        return str.__add__(other, str(self)) if isinstance(other, str) else NotImplemented

    def __getitem__(self, key):  # type: ignore[override]
        if not isinstance(key, slice) or key.step not in (None, 1):
            return str.__getitem__(self, key)
        start, stop, _ = key.indices(len(self))
        out, pos = [], 0
        for text, template in self.segments:
            lo, hi = max(start - pos, 0), min(stop - pos, len(text))
            if lo < hi:
                out.append((text[lo:hi], template))
            pos += len(text)
        return PromptText._from_segments(out)

    def __reduce__(self):
        return (PromptText._from_segments, (self.segments,))

    @property
    def content_text(self) -> str:
        """Only the parts that came from message content (for tests and diagnostics)."""
        return "".join(t for t, template in self.segments if not template)


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):
    """A deterministic byte-level BPE: the special tokens (ids 0..14, all `special`, so
    decode(skip_special_tokens=True) drops them), the 256 byte symbols, then merges learned on a fixed built-in
    text up to `vocab_size` tokens. Returns a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus with a varying suffix gives enough pair statistics for a few hundred merges.
    lines = [f"{line} {i}" for i in range(4) for line in _CORPUS.splitlines()]
    tok.train_from_iterator(lines, trainer=trainer)
    return tok


class Tokenizer:
    """encode/decode over a checkpoint's tokenizer.json; special strings in text are recognized atomically."""

    def __init__(self, tok, *, bos_text: str = BOS_TEXT, eos_text: str = EOS_TEXT, source: str = "tokenizer.json"):
        self._tok = tok
        self.source = source
        self.bos_id = self._require(bos_text)
        self.eos_id = self._require(eos_text)
        self.bos_text = bos_text
        self.eos_text = eos_text

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        root = Path(path)
        tj = root / "tokenizer.json"
        if not tj.is_file():
            raise CheckpointError(f"{tj}: tokenizer.json is missing", hint="download the checkpoint's tokenizer files")
        try:
            tok = HFTokenizer.from_file(str(tj))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"{tj}: cannot be read ({exc})", hint="re-download tokenizer.json") from exc
        bos, eos = _special_texts(root / "tokenizer_config.json")
        return cls(tok, bos_text=bos, eos_text=eos, source=str(tj))

    def _require(self, text: str) -> int:
        tid = self._tok.token_to_id(text)
        if tid is None:
            raise CheckpointError(f"{self.source}: has no token {text!r}", hint="the tokenizer is not a DeepSeek-V4 one")
        return tid

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, allow_special: bool | None = None) -> list[int]:
        """Token ids of `text`; no BOS is added (V4 prompts carry BOS as text).

        Special-token strings: by default a `PromptText` (what the chat encoder returns) gets control tokens only
        where the template wrote them, and message content is encoded as text; a plain `str` gets them wherever they
        appear (a raw prompt). `allow_special=True` recognizes them everywhere (the old behaviour, an explicit opt
        out); `False` recognizes them only in a PromptText's template parts (a plain str becomes text throughout)."""
        if allow_special is None:
            allow_special = not isinstance(text, PromptText)
        if allow_special:
            return self._tok.encode(str(text), add_special_tokens=False).ids
        segments = text.segments if isinstance(text, PromptText) else ((str(text), False),)
        return self._encode_segments(segments)

    # ------------------------------------------------------------ content as text

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of every added (control) token of the vocabulary."""
        if getattr(self, "_special_ids", None) is None:
            self._special_ids = frozenset(int(i) for i in self._tok.get_added_tokens_decoder())
        return self._special_ids

    def _special_pattern(self) -> "re.Pattern[str]":
        if getattr(self, "_special_re", None) is None:
            texts = sorted({t.content for t in self._tok.get_added_tokens_decoder().values() if t.content},
                           key=len, reverse=True)  # leftmost, then longest, as the tokenizer's own matcher
            self._special_re = re.compile("|".join(re.escape(t) for t in texts)) if texts else re.compile(r"(?!)")
        return self._special_re

    def _plain_tokenizer(self):
        """The same tokenizer without its added vocabulary: special-token strings are ordinary bytes to it."""
        if getattr(self, "_plain", None) is None:
            from tokenizers import Tokenizer as HFTokenizer

            spec = json.loads(self._tok.to_str())
            spec["added_tokens"] = []
            self._plain = HFTokenizer.from_str(json.dumps(spec))
        return self._plain

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        plain = self._plain_tokenizer()
        ids = plain.encode(text, add_special_tokens=False).ids
        if self.special_ids.isdisjoint(ids):
            return ids
        # A BPE merge rebuilt a control token's id from ordinary bytes: never let content carry one.
        return [i for ch in text for i in plain.encode(ch, add_special_tokens=False).ids]

    def _encode_segments(self, segments: Iterable[tuple[str, bool]]) -> list[int]:
        """Control tokens where template segments spell them; every other character is text. The text between two
        control tokens is encoded as one piece across segment boundaries, so a prompt whose content holds no special
        strings encodes exactly as the whole string would."""
        pattern = self._special_pattern()
        ids: list[int] = []
        run: list[str] = []
        for text, template in segments:
            if not template:
                run.append(text)
                continue
            pos = 0
            for m in pattern.finditer(text):
                run.append(text[pos:m.start()])
                ids.extend(self._encode_plain("".join(run)))
                run = []
                ids.append(self._tok.token_to_id(m.group(0)))
                pos = m.end()
            run.append(text[pos:])
        ids.extend(self._encode_plain("".join(run)))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


def _special_texts(config_path: Path) -> tuple[str, str]:
    """BOS/EOS strings from tokenizer_config.json (string or AddedToken dict); DeepSeek's strings if absent."""
    if not config_path.is_file():
        return BOS_TEXT, EOS_TEXT
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc})", hint="re-download tokenizer_config.json") from exc

    def text(key: str, default: str) -> str:
        v = cfg.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        return v if isinstance(v, str) and v else default

    return text("bos_token", BOS_TEXT), text("eos_token", EOS_TEXT)


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the new text (possibly "") that these ids complete.

    Byte-level tokens can split a UTF-8 character; the decoder renders such a tail as U+FFFD, so text is held back
    while it ends in U+FFFD and released once the character completes. Only the ids since the last emitted
    boundary are re-decoded, so a push costs O(pending ids), not O(all ids)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # ids before this are fully emitted and never re-decoded
        self._read = 0  # ids before this have had their text emitted

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if full_text.endswith("\ufffd") or len(full_text) < len(prefix_text):
            return ""
        new = full_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self._ids)
        return new

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end of generation), as U+FFFD."""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        full_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text):]
