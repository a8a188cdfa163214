"""The tokenizer of a V4 checkpoint directory, read with `tokenizers` alone (no transformers at run time).

`Tokenizer.from_dir(path)` loads `tokenizer.json`; BOS/EOS ids are looked up by their text (from
`tokenizer_config.json`, else DeepSeek's strings), never hard-coded. `StreamDecoder` turns a stream of token ids
into text pieces without ever emitting half of a multi-byte UTF-8 character. It does not build chat prompts
(that is the chat encoder's job) and adds no BOS: DeepSeek's encoder writes BOS into the prompt text itself.

`build_tiny_tokenizer()` makes the small deterministic byte-level BPE that the checkpoint writer ships.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

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

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS is added (V4 prompts carry BOS as text)."""
        return self._tok.encode(text, add_special_tokens=False).ids

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
