"""Tokenizer for splitserve: a small deterministic byte-level BPE with the DeepSeek-V3.2 special tokens,
loading a checkpoint's own ``tokenizer.json``, incremental detokenization and stop strings.

Vocabulary layout of `make_tokenizer(vocab_size)` (every id in ``[0, vocab_size)`` is used exactly once):

* id 0 ``<｜begin▁of▁sentence｜>`` (BOS) and id 1 ``<｜end▁of▁sentence｜>`` (EOS), as in the real config.
* ``<think>`` 128798, ``</think>`` 128799, ``<｜User｜>`` 128803, ``<｜Assistant｜>`` 128804 (the ids the
  V3.2 spec confirms, §12.1) when the vocabulary is large enough to hold them there; otherwise they sit,
  in that order, just before the extra special tokens at the end of the vocabulary.
* the extra special tokens whose real ids are unverified (FIM, ``<|EOT|>``, the V3.1 tool tokens and the
  V3.2 DSML marker ``｜DSML｜``) occupy the last ids.
* ids from 2 upwards: the 256 byte symbols and the merges learned on `_CORPUS`; whatever is left over
  is padded with ``<｜reserved_{id}｜>`` special tokens, so the total is exactly ``vocab_size``.

BOS, EOS and the reserved tokens are *special* (dropped by ``decode(..., skip_special_tokens=True)``); the
chat / thinking / tool / DSML tokens are added tokens that are not special, so they survive decoding and a
reasoning or tool-call parser can see them (the convention of DeepSeek's own tokenizer files).
No BOS is added by the tokenizer itself: the chat encoder writes the BOS string.
"""

from __future__ import annotations

import codecs
import functools
import json
import logging
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
THINK_START_TOKEN = "<think>"
THINK_END_TOKEN = "</think>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
DSML_TOKEN = "｜DSML｜"

BOS_TOKEN_ID = 0
EOS_TOKEN_ID = 1

#: Special tokens with ids confirmed by the V3.2 README (spec §12.1), other than BOS/EOS.
CONFIRMED_TOKEN_IDS: dict[str, int] = {
    THINK_START_TOKEN: 128798,
    THINK_END_TOKEN: 128799,
    USER_TOKEN: 128803,
    ASSISTANT_TOKEN: 128804,
}

#: Special tokens whose real ids are unverified; they take the last ids of the vocabulary, in this order.
EXTRA_SPECIAL_TOKENS: tuple[str, ...] = (
    "<｜fim▁hole｜>",
    "<｜fim▁begin｜>",
    "<｜fim▁end｜>",
    "<|EOT|>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁outputs▁begin｜>",
    "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>",
    "<｜tool▁output▁end｜>",
    DSML_TOKEN,
)

MIN_VOCAB_SIZE = 512
MAX_VOCAB_SIZE = 129280


def reserved_token(token_id: int) -> str:
    """The padding token that fills an otherwise unused id."""
    return f"<｜reserved_{token_id}｜>"


# A few KB of varied English prose and Python code; the BPE merges are learned from this text only.
_CORPUS = r'''
The router accepts a request, checks it, turns the prompt into tokens and hands it to a worker.
A prefill worker reads the whole prompt at once; a decode worker then writes one token after another.
When the cache of a long prompt moves between machines, the layout of its blocks decides the speed.
Every block is freed exactly once: on completion, on cancel, when the client goes away, or on a timeout.

It was a bright cold day in April, and the clocks were striking thirteen. She opened the window,
looked at the river and counted the boats: one, two, three... forty-two! "Why so many?" he asked.
"Because the market opens at 6:30 a.m. on Saturdays," she said, "and everybody wants the best fish."
The weather report promised rain (about 12 mm) for Tuesday, sunshine on Wednesday and wind after that.
Prices rose by 3.5% last year; the committee expects 2.1% in 2025 and 1.9% in 2026.
Dear Sir or Madam, thank you for your letter of 14 March. We are pleased to confirm your booking.
Questions? Write to support@example.com or call +1 (555) 010-0199 between 9:00 and 17:00.
A café in the old town serves crème brûlée, naïve art hangs on the walls, and the façade is pink.
Zürich, São Paulo, Kraków, Москва, 東京, 서울 and Αθήνα are cities; 北京 and 杭州 are in China.
Mathematics: x² + y² = z², ∑ᵢ aᵢ ≤ ∞, π ≈ 3.14159, √2 ≈ 1.41421, and ½ + ¼ = ¾.
Emoji appear in chat text too 🙂 👍 🚀 — and so do “curly quotes”, ‘single ones’, and dashes – like this.

In the beginning the model knows nothing. It reads a sentence, guesses the next word, and learns from
its mistakes. After many such steps it can summarise a report, translate a note, or write a small
program. Good answers are short, correct and polite; bad answers are long, wrong or rude.
Question: What is the capital of France? Answer: Paris.
Question: How many legs does a spider have? Answer: Eight.
Question: Which number is larger, 9.11 or 9.9? Answer: 9.9 is larger.

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    """Settings of one worker."""

    name: str = "worker-0"
    block_size: int = 64
    max_batch: int = 256
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.free = list(range(num_blocks))
        self.ref_count = [0] * num_blocks

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError("out of blocks")
        block = self.free.pop()
        self.ref_count[block] = 1
        return block

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            self.free.append(block)


async def main(path: str) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    counts: dict[str, int] = {}
    for key, value in data.items():
        if isinstance(value, str) and value.strip():
            counts[key] = counts.get(key, 0) + len(value)
        elif value is None:
            continue
        else:
            logger.warning("skipping %s=%r", key, value)
    await asyncio.sleep(0.1)
    return counts


if __name__ == "__main__":
    print(fib(10), sorted({3, 1, 2}), [x * x for x in range(5) if x % 2 == 0])
    print({"a": 1, "b": [True, False, None]}, 0x1F, 1e-6, 'single', "double", f"{fib(5):>4}")
'''


def _byte_level_alphabet() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


@functools.lru_cache(maxsize=8)
def _tokenizer_json(vocab_size: int) -> str:
    """Builds the tokenizer for `vocab_size` and returns its JSON (cached; `make_tokenizer` parses a fresh copy)."""
    return train_tokenizer(vocab_size, [_CORPUS]).to_str()


def train_tokenizer(vocab_size: int, texts: Iterable[str], min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE with exactly `vocab_size` tokens whose merges are learned on `texts`, in this
    module's vocabulary layout (BOS 0, EOS 1, the chat / thinking / tool / DSML tokens where the module
    docstring puts them, reserved tokens filling unused ids). Deterministic for the same texts."""
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}], got {vocab_size}")

    # Where the special tokens go.
    special_ids: dict[str, int] = {BOS_TOKEN: BOS_TOKEN_ID, EOS_TOKEN: EOS_TOKEN_ID}
    tail_start = vocab_size - len(EXTRA_SPECIAL_TOKENS)
    for i, content in enumerate(EXTRA_SPECIAL_TOKENS):
        special_ids[content] = tail_start + i
    if max(CONFIRMED_TOKEN_IDS.values()) < tail_start:
        special_ids.update(CONFIRMED_TOKEN_IDS)
    else:
        start = tail_start - len(CONFIRMED_TOKEN_IDS)
        for i, content in enumerate(CONFIRMED_TOKEN_IDS):
            special_ids[content] = start + i
    taken = set(special_ids.values())
    free_ids = [i for i in range(vocab_size) if i not in taken]

    # Learn merges on the corpus, then renumber the learned tokens onto the lowest free ids.
    alphabet = _byte_level_alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(free_ids),
        min_frequency=min_frequency,
        special_tokens=[],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    base.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(base.to_str())["model"]
    learned: dict[str, int] = trained["vocab"]
    merges: list[tuple[str, str]] = []
    for m in trained["merges"]:  # "a b" strings (old format) or [a, b] pairs
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merges.append((a, b))
    ordered = sorted(learned.items(), key=lambda kv: kv[1])
    if len(ordered) > len(free_ids):  # pragma: no cover - the trainer respects vocab_size
        raise RuntimeError("BPE trainer produced more tokens than requested")

    vocab: dict[str, int] = {}
    for (token, _), new_id in zip(ordered, free_ids, strict=False):
        vocab[token] = new_id
    for content, tid in special_ids.items():
        if content in vocab:  # pragma: no cover - the corpus contains none of the special strings
            raise RuntimeError(f"special token {content!r} was learned as a regular token")
        vocab[content] = tid
    reserved_ids = free_ids[len(ordered) :]
    for tid in reserved_ids:
        vocab[reserved_token(tid)] = tid

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Added tokens whose content is already in the model vocabulary keep that id.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN)]
        + [AddedToken(reserved_token(t), special=True, normalized=False) for t in reserved_ids]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in (*CONFIRMED_TOKEN_IDS, *EXTRA_SPECIAL_TOKENS)]
    )
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:  # pragma: no cover - layout invariant
        raise RuntimeError(f"built {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    for t, tid in special_ids.items():
        if tok.token_to_id(t) != tid:  # pragma: no cover - layout invariant
            raise RuntimeError(f"{t!r} got id {tok.token_to_id(t)}, wanted {tid}")
    logger.debug("built byte-level BPE: vocab %d, %d learned, %d reserved", vocab_size, len(ordered), len(reserved_ids))
    return tok


def make_tokenizer(vocab_size: int) -> Tokenizer:
    """A deterministic byte-level BPE with exactly `vocab_size` tokens (512 <= vocab_size <= 129280).

    The same `vocab_size` always gives the same tokenizer (same ids, merges and JSON).
    """
    return Tokenizer.from_str(_tokenizer_json(vocab_size))


def load_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    """Loads ``tokenizer.json`` from a checkpoint directory (its special ids read now, not by a first request)."""
    path = Path(checkpoint_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {checkpoint_dir}")
    tokenizer = Tokenizer.from_file(str(path))
    special_token_ids(tokenizer)
    return tokenizer


# Per-tokenizer caches (a loaded tokenizer is never changed afterwards): reading the added tokens costs
# ~0.1-0.2 s for a vocabulary padded with 128k reserved tokens (the bench preset), far too much per request.
_SPECIAL_IDS: weakref.WeakKeyDictionary[Tokenizer, frozenset[int]] = weakref.WeakKeyDictionary()
_TOKEN_BYTES: weakref.WeakKeyDictionary[Tokenizer, dict[bool, TokenBytes]] = weakref.WeakKeyDictionary()


def special_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of the tokens that ``decode(..., skip_special_tokens=True)`` drops (computed once per tokenizer)."""
    ids = _SPECIAL_IDS.get(tokenizer)
    if ids is None:
        ids = frozenset(tid for tid, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)
        _SPECIAL_IDS[tokenizer] = ids
    return ids


# --------------------------------------------------------------------------------------------------
# Incremental detokenization


@functools.lru_cache(maxsize=1)
def _byte_level_char_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table (what the ByteLevel decoder uses)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table: dict[str, int] = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table


class TokenBytes:
    """Maps token ids to the raw bytes they decode to, for tokenizers whose decoder is ByteLevel.

    Mirrors the ``tokenizers`` ByteLevel decoder: a token whose characters are all byte symbols decodes to
    those bytes; any other token (e.g. an added token such as ``<｜User｜>``) to its UTF-8 text. Ids the
    tokenizer does not know decode to nothing, as in ``Tokenizer.decode``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = special_token_ids(tokenizer) if skip_special_tokens else frozenset()
        self._cache: dict[int, bytes] = {}

    @staticmethod
    def supports(tokenizer: Tokenizer) -> bool:
        return isinstance(tokenizer.decoder, decoders.ByteLevel)

    @staticmethod
    def shared(tokenizer: Tokenizer, skip_special_tokens: bool = True) -> TokenBytes:
        """The one instance (and byte cache) for this tokenizer, so a request does not build its own."""
        per = _TOKEN_BYTES.setdefault(tokenizer, {})
        tb = per.get(skip_special_tokens)
        if tb is None:
            tb = TokenBytes(tokenizer, skip_special_tokens)
            tb._tokenizer = weakref.proxy(tokenizer)  # a cache entry must not keep its own key alive
            per[skip_special_tokens] = tb
        return tb

    def __call__(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._compute(token_id)
            self._cache[token_id] = b
        return b

    def raw(self, token_id: int) -> bytes:
        """The token's bytes even if it is a special token."""
        if token_id in self._skip:
            return self._compute(token_id, skip=False)
        return self(token_id)

    def _compute(self, token_id: int, skip: bool = True) -> bytes:
        if skip and token_id in self._skip:
            return b""
        token = self._tokenizer.id_to_token(token_id) if token_id >= 0 else None
        if token is None:
            return b""
        table = _byte_level_char_to_byte()
        out = bytearray()
        for ch in token:
            v = table.get(ch)
            if v is None:
                return token.encode("utf-8")
            out.append(v)
        return bytes(out)


class TextDecoder:
    """Turns a stream of token ids into text deltas.

    The concatenation of all deltas (including the one `finish` returns) equals
    ``tokenizer.decode(all_ids, skip_special_tokens=...)``. Incomplete UTF-8 sequences at the end of the
    stream are held back until the bytes that complete them arrive, so no replacement character is ever
    emitted for a character that is merely split across tokens.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._byte_level = TokenBytes.supports(tokenizer)
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far
        if self._byte_level:
            self._bytes = TokenBytes.shared(tokenizer, skip_special_tokens)
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        else:
            # Generic fallback: decode a sliding window and emit when it does not end mid-character.
            self._prefix_offset = 0
            self._read_offset = 0

    def add(self, token_ids: Sequence[int]) -> str:
        """Feeds new tokens; returns the text they complete (possibly "")."""
        if not token_ids:
            return ""
        self.token_ids.extend(token_ids)
        if self._byte_level:
            delta = self._utf8.decode(b"".join(self._bytes(t) for t in token_ids), final=False)
        else:
            delta = self._generic_step(final=False)
        self.text += delta
        return delta

    def finish(self) -> str:
        """Flushes whatever is held back (an incomplete character becomes U+FFFD, as in a full decode)."""
        if self._byte_level:
            delta = self._utf8.decode(b"", final=True)
        else:
            delta = self._generic_step(final=True)
        self.text += delta
        return delta

    def _generic_step(self, final: bool) -> str:
        ids = self.token_ids
        prefix_text = self._tokenizer.decode(
            ids[self._prefix_offset : self._read_offset], skip_special_tokens=self._skip
        )
        new_text = self._tokenizer.decode(ids[self._prefix_offset :], skip_special_tokens=self._skip)
        if final or (len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd")):
            if not new_text.startswith(prefix_text):  # pragma: no cover - non-concatenative decoders
                full = self._tokenizer.decode(ids, skip_special_tokens=self._skip)
                delta = full[len(self.text) :]
            else:
                delta = new_text[len(prefix_text) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(ids)
            return delta
        return ""


def token_text(tokenizer: Tokenizer, token_bytes: TokenBytes | None, token_id: int) -> tuple[str, bytes]:
    """The display string and raw bytes of one token (OpenAI logprobs style).

    A token whose bytes are not valid UTF-8 on their own (a piece of a multi-byte character) is shown as
    ``bytes:\\xe2\\x82`` so that distinct tokens never share a display string.
    """
    if token_bytes is not None:
        raw = token_bytes.raw(token_id)
    else:
        raw = tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw


# --------------------------------------------------------------------------------------------------
# Stop strings


def apply_stop_strings(text: str, stop: Sequence[str], search_from: int = 0) -> tuple[str, bool]:
    """Truncates `text` before the first stop string to *complete* (smallest end; on a tie, earliest start).

    Returns (truncated text, True) on a match, else (text, False); the stop string itself is not part of the
    returned text (OpenAI semantics). Choosing by end position makes the result the same however the text
    was split into chunks, as if it were checked after every character. `search_from` lets a caller that
    appends to a text already known to contain no stop string re-scan only where a new match could be.
    """
    if not stop:
        return text, False
    longest = max(len(s) for s in stop)
    start = max(0, search_from - longest + 1)
    best: tuple[int, int] | None = None  # (end, start)
    for s in stop:
        if not s:
            continue
        pos = text.find(s, start)
        if pos != -1 and (best is None or (pos + len(s), pos) < best):
            best = (pos + len(s), pos)
    if best is None:
        return text, False
    return text[: best[1]], True


class StopStringMatcher:
    """Applies stop strings to streamed text, holding back only text that might begin a stop string.

    ``feed(delta)`` returns (text safe to emit now, stopped). Once stopped, everything after the stop
    string is dropped. ``flush()`` returns the held-back tail at the end of the stream.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = tuple(s for s in stop if s)
        self._text = ""  # all text fed so far
        self._emitted = 0  # len of the prefix of _text already returned
        self.stopped = False

    @property
    def text(self) -> str:
        """The output text so far (truncated at the stop string once one matched)."""
        return self._text

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped or not delta:
            return "", self.stopped
        old_len = len(self._text)
        self._text += delta
        truncated, matched = apply_stop_strings(self._text, self._stop, search_from=old_len)
        if matched:
            self._text = truncated
            self.stopped = True
            out = self._text[self._emitted :]
            self._emitted = len(self._text)
            return out, True
        safe = len(self._text) - self._partial_match_len()
        out = self._text[self._emitted : safe] if safe > self._emitted else ""
        self._emitted = max(self._emitted, safe)
        return out, False

    def flush(self) -> str:
        out = self._text[self._emitted :]
        self._emitted = len(self._text)
        return out

    def _partial_match_len(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        best = 0
        text = self._text
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
