"""make_tokenizer / load_tokenizer: exact size, special-token ids, determinism, lossless round trip."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from splitserve.model.tokenizer import (
    ASSISTANT_TOKEN,
    BOS_TOKEN,
    CONFIRMED_TOKEN_IDS,
    DSML_TOKEN,
    EOS_TOKEN,
    EXTRA_SPECIAL_TOKENS,
    THINK_END_TOKEN,
    THINK_START_TOKEN,
    USER_TOKEN,
    load_tokenizer,
    make_tokenizer,
    special_token_ids,
)

ALL_SPECIAL = (BOS_TOKEN, EOS_TOKEN, *CONFIRMED_TOKEN_IDS, *EXTRA_SPECIAL_TOKENS)


@pytest.mark.parametrize("vocab_size", [512, 513, 777, 4096, 129280])
def test_exact_vocab_size_and_every_id_used(vocab_size: int) -> None:
    tok = make_tokenizer(vocab_size)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    vocab = tok.get_vocab(with_added_tokens=True)
    assert sorted(vocab.values()) == list(range(vocab_size))
    assert tok.id_to_token(vocab_size) is None


@pytest.mark.parametrize("vocab_size", [512, 129280])
def test_special_token_ids(vocab_size: int) -> None:
    tok = make_tokenizer(vocab_size)
    assert tok.token_to_id(BOS_TOKEN) == 0
    assert tok.token_to_id(EOS_TOKEN) == 1
    ids = [tok.token_to_id(t) for t in ALL_SPECIAL]
    assert None not in ids and len(set(ids)) == len(ids)
    n_extra = len(EXTRA_SPECIAL_TOKENS)
    assert [tok.token_to_id(t) for t in EXTRA_SPECIAL_TOKENS] == list(range(vocab_size - n_extra, vocab_size))
    if vocab_size == 129280:  # the real ids of the spec (§12.1) fit
        assert {t: tok.token_to_id(t) for t in CONFIRMED_TOKEN_IDS} == CONFIRMED_TOKEN_IDS
        assert tok.token_to_id(THINK_START_TOKEN) == 128798 and tok.token_to_id(ASSISTANT_TOKEN) == 128804
    else:
        start = vocab_size - n_extra - len(CONFIRMED_TOKEN_IDS)
        assert [tok.token_to_id(t) for t in CONFIRMED_TOKEN_IDS] == list(range(start, start + 4))
    # each special string encodes to exactly its one token
    for t in ALL_SPECIAL:
        assert tok.encode(t, add_special_tokens=False).ids == [tok.token_to_id(t)]


def test_special_flags(tok: Tokenizer) -> None:
    ids = tok.encode(
        f"{BOS_TOKEN}{USER_TOKEN}hi{ASSISTANT_TOKEN}{THINK_START_TOKEN}x{THINK_END_TOKEN}{DSML_TOKEN}{EOS_TOKEN}"
    ).ids
    assert ids[0] == 0 and ids[-1] == 1
    # BOS/EOS are dropped when skipping special tokens; the chat/think/DSML markers are kept
    assert (
        tok.decode(ids, skip_special_tokens=True)
        == f"{USER_TOKEN}hi{ASSISTANT_TOKEN}{THINK_START_TOKEN}x{THINK_END_TOKEN}{DSML_TOKEN}"
    )
    assert {0, 1} <= special_token_ids(tok)
    assert tok.token_to_id(THINK_START_TOKEN) not in special_token_ids(tok)


def test_no_bos_added(tok: Tokenizer) -> None:
    assert tok.encode("hello").ids == tok.encode("hello", add_special_tokens=False).ids
    assert 0 not in tok.encode("hello").ids


def test_learned_merges_compress_corpus_like_text(tok: Tokenizer) -> None:
    text = "def fib(n: int) -> int:\n    return n"
    assert len(tok.encode(text).ids) < len(text.encode()) / 2


def test_deterministic_in_process() -> None:
    assert make_tokenizer(600).to_str() == make_tokenizer(600).to_str()
    a, b = make_tokenizer(1000), make_tokenizer(1000)
    assert a.encode("The quick brown fox").ids == b.encode("The quick brown fox").ids


def test_deterministic_across_processes() -> None:
    code = (
        "import hashlib;from splitserve.model.tokenizer import make_tokenizer;"
        "print(hashlib.sha256(make_tokenizer(2048).to_str().encode()).hexdigest())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == hashlib.sha256(make_tokenizer(2048).to_str().encode()).hexdigest()


@pytest.mark.parametrize("bad", [0, 511, 129281])
def test_vocab_size_range(bad: int) -> None:
    with pytest.raises(ValueError):
        make_tokenizer(bad)


def test_load_tokenizer_roundtrip(tmp_path, tok: Tokenizer) -> None:  # noqa: ANN001
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    assert loaded.to_str() == tok.to_str()
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")


_special_text = st.sampled_from(ALL_SPECIAL)
_texts = st.lists(st.one_of(st.text(max_size=40), _special_text), max_size=6).map("".join)


@settings(max_examples=300, deadline=None, database=None)
@given(text=_texts)
def test_roundtrip_arbitrary_unicode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert all(0 <= i < 1024 for i in ids)
    assert tok.decode(ids, skip_special_tokens=False) == text


@pytest.fixture(scope="module")
def big_tok() -> Tokenizer:
    return make_tokenizer(129280)


@settings(max_examples=50, deadline=None, database=None)
@given(text=st.text(max_size=200))
def test_roundtrip_full_size_vocab(big_tok: Tokenizer, text: str) -> None:
    tok = big_tok
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
