"""Any JSON body gets a 200 or a 4xx with an OpenAI error body from the app, never a 5xx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from .conftest import MODEL, VOCAB

_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
any_json = st.recursive(
    _scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=8
)

_ids = st.lists(st.integers(-2, VOCAB + 2), min_size=0, max_size=12)
_good_ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12)

# In-range values for each field (they may still break a deployment limit, e.g. n > max_n).
_valid_common: dict[str, st.SearchStrategy[Any]] = {
    "max_tokens": st.integers(1, 12),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 50),
    "min_p": st.floats(0, 1),
    "n": st.integers(1, 4),
    "stop": st.one_of(st.text(min_size=1, max_size=4), st.lists(st.text(min_size=1, max_size=4), max_size=3)),
    "seed": st.integers(0, 2**32),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
    "user": st.text(max_size=5),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3),
}
_valid_completion = {
    **_valid_common,
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
}
_valid_chat = {
    **_valid_common,
    "max_completion_tokens": st.integers(1, 12),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "chat_template_kwargs": st.fixed_dictionaries({"thinking": st.booleans()}),
}
_prompt = st.one_of(
    st.text(min_size=1, max_size=30),
    st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3),
    _good_ids,
    st.lists(_good_ids, min_size=1, max_size=3),
)
_user = st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=20)})
_system = st.fixed_dictionaries({"role": st.just("system"), "content": st.text(max_size=20)})
_good_messages = st.tuples(st.lists(_system, max_size=1), st.lists(_user, min_size=1, max_size=2)).map(
    lambda t: t[0] + t[1]
)
_any_message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "developer", "x"]),
        "content": st.one_of(st.text(max_size=20), any_json),
    }
)


def _mixed(fields: dict[str, st.SearchStrategy[Any]]) -> dict[str, st.SearchStrategy[Any]]:
    """Each field valid or any JSON value at all."""
    return {k: st.one_of(v, any_json) for k, v in fields.items()}


def _bodies(
    valid: dict[str, st.SearchStrategy[Any]], key: str, good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    mostly_valid = st.fixed_dictionaries({"model": st.just(MODEL), key: good}, optional=valid)
    mixed = st.fixed_dictionaries(
        {"model": st.one_of(st.just(MODEL), any_json)}, optional={key: st.one_of(good, bad), **_mixed(valid)}
    )
    junk = st.dictionaries(st.text(max_size=8), any_json, max_size=5)
    return st.one_of(mostly_valid, mixed, junk)


_completion_bodies = _bodies(_valid_completion, "prompt", _prompt, st.one_of(_ids, any_json))
_chat_bodies = _bodies(_valid_chat, "messages", _good_messages, st.one_of(st.lists(_any_message, max_size=3), any_json))


@pytest.fixture(scope="module")
def http(start_server):  # noqa: ANN001, ANN201
    url, _ = start_server()
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def _check(r: httpx.Response, stream: bool) -> None:
    event(f"status {r.status_code}")
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 200:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
    elif stream:
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
    else:
        assert r.json()["choices"]


FUZZ = settings(max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=_completion_bodies)
def test_completions_never_5xx(http: httpx.Client, body: dict[str, Any]) -> None:
    r = http.post("/v1/completions", content=json.dumps(body).encode())
    _check(r, body.get("stream") is True)


@FUZZ
@given(body=_chat_bodies)
def test_chat_never_5xx(http: httpx.Client, body: dict[str, Any]) -> None:
    r = http.post("/v1/chat/completions", content=json.dumps(body).encode())
    _check(r, body.get("stream") is True)


@settings(max_examples=60, deadline=None, database=None)
@given(raw=st.binary(max_size=64) | any_json.map(lambda v: json.dumps(v).encode()))
def test_arbitrary_bytes_never_5xx(http: httpx.Client, raw: bytes) -> None:
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = http.post(path, content=raw)
        _check(r, stream=False)
