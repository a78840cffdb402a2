"""TextDecoder (incremental detokenization) and stop-string handling."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders

from splitserve.model.tokenizer import StopStringMatcher, TextDecoder, apply_stop_strings, make_tokenizer

from .conftest import VOCAB

SETTINGS = settings(max_examples=200, deadline=None, database=None)


def _chunks(draw: st.DrawFn, items: list[int]) -> list[list[int]]:
    out, i = [], 0
    while i < len(items):
        k = draw(st.integers(1, 4))
        out.append(items[i : i + k])
        i += k
    return out


@st.composite
def id_stream(draw: st.DrawFn) -> list[list[int]]:
    """Arbitrary ids (specials, reserved, pieces of multi-byte characters) in arbitrary chunks."""
    ids = draw(st.lists(st.integers(0, VOCAB - 1), max_size=40))
    return _chunks(draw, ids)


@st.composite
def text_stream(draw: st.DrawFn, tok: Tokenizer) -> tuple[str, list[list[int]]]:
    text = draw(st.text(max_size=60))
    return text, _chunks(draw, tok.encode(text).ids)


def _stream(dec: TextDecoder, chunks: list[list[int]]) -> list[str]:
    return [dec.add(c) for c in chunks] + [dec.finish()]


@SETTINGS
@given(chunks=id_stream(), skip=st.booleans())
def test_deltas_concatenate_to_full_decode(tok: Tokenizer, chunks: list[list[int]], skip: bool) -> None:
    dec = TextDecoder(tok, skip_special_tokens=skip)
    deltas = _stream(dec, chunks)
    ids = [t for c in chunks for t in c]
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
    assert dec.text == "".join(deltas) and dec.token_ids == ids


@SETTINGS
@given(data=st.data())
def test_no_replacement_chars_mid_stream_for_valid_text(tok: Tokenizer, data: st.DataObject) -> None:
    text, chunks = data.draw(text_stream(tok))
    dec = TextDecoder(tok)
    seen = ""
    for c in chunks:
        seen += dec.add(c)
        assert text.startswith(seen)  # every delta is whole characters of the real text
    seen += dec.finish()
    assert seen == text


@pytest.fixture(scope="module")
def generic_tok() -> Tokenizer:
    """The same tokenizer behind a decoder TextDecoder does not recognise: exercises the generic path."""
    t = make_tokenizer(VOCAB)
    t.decoder = decoders.Sequence([decoders.ByteLevel()])
    return t


@SETTINGS
@given(chunks=id_stream())
def test_generic_path_concatenates_to_full_decode(generic_tok: Tokenizer, chunks: list[list[int]]) -> None:
    dec = TextDecoder(generic_tok)
    deltas = _stream(dec, chunks)
    ids = [t for c in chunks for t in c]
    assert "".join(deltas) == generic_tok.decode(ids, skip_special_tokens=True)


def test_multibyte_character_split_across_tokens(tok: Tokenizer) -> None:
    # '🙂' is 4 UTF-8 bytes; feed its byte tokens one at a time: nothing comes out until the last one
    ids = tok.encode("a🙂b").ids
    dec = TextDecoder(tok)
    outs = [dec.add([i]) for i in ids] + [dec.finish()]
    assert "".join(outs) == "a🙂b"
    assert all("\ufffd" not in o for o in outs)
    assert "" in outs  # held back while incomplete


def test_incomplete_tail_becomes_replacement_on_finish(tok: Tokenizer) -> None:
    ids = tok.encode("🙂").ids
    dec = TextDecoder(tok)
    assert dec.add(ids[:-1]) == ""
    assert dec.finish() == tok.decode(ids[:-1])


# ---- stop strings ---------------------------------------------------------------------------------


def test_apply_stop_strings_examples() -> None:
    assert apply_stop_strings("hello world", ["wor"]) == ("hello ", True)
    assert apply_stop_strings("hello world", ["xyz"]) == ("hello world", False)
    assert apply_stop_strings("abcabc", ["c", "b"]) == ("a", True)  # earliest match wins
    assert apply_stop_strings("abc", []) == ("abc", False)
    assert apply_stop_strings("stop at start", ["stop"]) == ("", True)
    # the first stop string to complete wins, not the one that starts first
    assert apply_stop_strings("x🙂\n🙂", ["\n", "🙂\n🙂"]) == ("x🙂", True)
    assert apply_stop_strings("xab", ["b", "ab"]) == ("x", True)  # same end: the longer one


def _reference_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Check after every character; stop at the first stop string to complete."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if text[:end].endswith(s)]
        if starts:
            return text[: min(starts)], True
    return text, False


@SETTINGS
@given(
    pieces=st.lists(st.text(alphabet="abc🙂\n", max_size=5), max_size=12),
    stops=st.lists(st.text(alphabet="abc🙂\n", min_size=1, max_size=4), max_size=3),
)
def test_stop_matcher_streaming_equals_reference(pieces: list[str], stops: list[str]) -> None:
    full = "".join(pieces)
    expected, expected_stopped = _reference_stop(full, stops)
    m = StopStringMatcher(stops)
    out = ""
    for p in pieces:
        emitted, stopped = m.feed(p)
        out += emitted
        assert expected.startswith(out)  # never emits text that a stop string later removes
        if stopped:
            break
    if not m.stopped:
        out += m.flush()
    assert (out, m.stopped) == (expected, expected_stopped)
    assert m.text == expected


def test_stop_matcher_holds_back_only_possible_prefixes() -> None:
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)  # "ST" might begin "STOP"
    assert m.feed("ART") == ("START", False)
    assert m.feed(" and STO") == (" and ", False)
    assert m.feed("P tail") == ("", True)
    assert m.text == "abc START and "


def test_decoders_share_one_byte_table_per_tokenizer() -> None:
    """A request's decoder reuses its tokenizer's special ids and byte table (reading 128k added tokens per
    request cost ~0.2 s of TTFT); tokenizers with different special tokens never share them."""
    from splitserve.model.tokenizer import TokenBytes, special_token_ids

    small, other = make_tokenizer(VOCAB), make_tokenizer(VOCAB + 64)  # `other` has 64 more reserved specials
    assert TokenBytes.shared(small) is TokenBytes.shared(small)
    assert TokenBytes.shared(small) is not TokenBytes.shared(small, skip_special_tokens=False)
    assert special_token_ids(other) - special_token_ids(small)
    for tok in (small, other):
        ids = list(range(tok.get_vocab_size()))
        dec = TextDecoder(tok)
        assert "".join(dec.add([i]) for i in ids) + dec.finish() == tok.decode(ids, skip_special_tokens=True)


def test_the_shared_tables_do_not_keep_a_tokenizer_alive() -> None:
    import gc
    import weakref

    tok = make_tokenizer(VOCAB)
    alive = weakref.ref(tok)
    dec = TextDecoder(tok)
    assert dec.add(list(range(2, 40))) + dec.finish() == tok.decode(list(range(2, 40)))
    del dec, tok
    gc.collect()
    assert alive() is None
