"""Request validation and the request -> (prompts, SamplingParams) step, without HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest
from tokenizers import Tokenizer

from splitserve.router.chat import encode_messages
from splitserve.router.openai_api import (
    ApiError,
    ApiLimits,
    parse_chat_request,
    parse_completion_request,
    prepare_chat,
    prepare_completion,
)

from .conftest import VOCAB

LIMITS = ApiLimits(vocab_size=VOCAB, max_context_len=64, max_n=4, max_stop_strings=2, max_stop_len=8)


def _completion(tok: Tokenizer, **body: Any):  # noqa: ANN202
    req = parse_completion_request(json.dumps({"model": "m", **body}).encode())
    return prepare_completion(req, tok, LIMITS)


def _error(fn, *args, **kwargs) -> ApiError:  # noqa: ANN001
    with pytest.raises(ApiError) as info:
        fn(*args, **kwargs)
    return info.value


def test_prompt_forms(tok: Tokenizer) -> None:
    ids = tok.encode("hello world").ids
    assert _completion(tok, prompt="hello world").prompts == [ids]
    assert _completion(tok, prompt=["hello world", "x"]).prompts == [ids, tok.encode("x").ids]
    assert _completion(tok, prompt=[5, 6, 7]).prompts == [[5, 6, 7]]
    p = _completion(tok, prompt=[[5, 6], [7]])
    assert p.prompts == [[5, 6], [7]] and p.prompt_texts == [None, None]


def test_sampling_params_mapping(tok: Tokenizer) -> None:
    p = _completion(
        tok,
        prompt="a",
        max_tokens=5,
        temperature=0,
        top_p=0.5,
        top_k=-1,
        min_p=0.1,
        seed=7,
        n=3,
        stop=["x", "x", "y"],
        stop_token_ids=[3],
        presence_penalty=1,
        frequency_penalty=-1,
        repetition_penalty=1.2,
        ignore_eos=True,
        logprobs=2,
        echo=True,
    )
    sp = p.params
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p, sp.seed) == (5, 0.0, 0.5, 0, 0.1, 7)
    assert sp.stop == ("x", "y") and sp.stop_token_ids == (3,) and sp.ignore_eos
    assert (sp.presence_penalty, sp.frequency_penalty, sp.repetition_penalty) == (1.0, -1.0, 1.2)
    assert sp.logprobs == 2 and sp.prompt_logprobs == 2 and p.echo and p.n == 3
    assert [p.params_for(0, i).seed for i in range(3)] == [7, 8, 9]
    defaults = _completion(tok, prompt="a").params
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.max_tokens, defaults.logprobs) == (
        1.0,
        1.0,
        0,
        16,
        None,
    )


def test_max_tokens_none_uses_rest_of_context(tok: Tokenizer) -> None:
    p = _completion(tok, prompt=[1, 2, 3, 4], max_tokens=None)
    assert p.params.max_tokens == 60


def test_echo_with_zero_max_tokens_is_prompt_only(tok: Tokenizer) -> None:
    p = _completion(tok, prompt=[1, 2, 3], max_tokens=0, echo=True, logprobs=1)
    assert p.prompt_only and p.params.max_tokens == 1 and p.params.prompt_logprobs == 1
    assert _error(_completion, tok, prompt=[1, 2, 3], max_tokens=0).param == "max_tokens"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [VOCAB]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": list(range(64))}, "prompt"),
        ({"prompt": [1, 2], "max_tokens": 63}, "max_tokens"),
        ({"prompt": "a", "n": 5}, "n"),
        ({"prompt": "a", "stop": ["a", "b", "c"]}, "stop"),
        ({"prompt": "a", "stop": "123456789"}, "stop"),
        ({"prompt": "a", "stop": [""]}, "stop"),
        ({"prompt": "a", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
        ({"prompt": "a", "logit_bias": {str(VOCAB): 5}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"-1": 5}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"abc": 5}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"1.5": 5}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {" 7": 5}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {"7": 1, "07": 2}}, "logit_bias"),
        ({"prompt": "a", "logit_bias": {str(t): 1 for t in range(301)}}, "logit_bias"),
        ({"prompt": "a", "suffix": "z"}, "suffix"),
        ({"prompt": "a", "best_of": 3}, "best_of"),
    ],
)
def test_limit_errors_name_the_param(tok: Tokenizer, body: dict, param: str) -> None:
    err = _error(_completion, tok, **body)
    assert err.status == 400 and err.param == param and err.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{", None),
        (b"[1, 2]", None),
        (b'{"prompt": "a"}', "model"),
        (b'{"model": "m", "prompt": "a", "max_tokens": "5"}', "max_tokens"),
        (b'{"model": "m", "prompt": "a", "max_tokens": -1}', "max_tokens"),
        (b'{"model": "m", "prompt": "a", "temperature": 2.5}', "temperature"),
        (b'{"model": "m", "prompt": "a", "top_p": 0}', "top_p"),
        (b'{"model": "m", "prompt": "a", "logprobs": 21}', "logprobs"),
        (b'{"model": "m", "prompt": "a", "echo": 1}', "echo"),
        (b'{"model": "m", "prompt": "a", "presence_penalty": 3}', "presence_penalty"),
        (b'{"model": "m", "prompt": "a", "seed": 18446744073709551616}', "seed"),
        (b'{"model": "m", "prompt": [1.5]}', "prompt"),
        (b'{"model": "m", "prompt": "a", "stream_options": {"include_usage": "yes"}}', "stream_options.include_usage"),
    ],
)
def test_schema_errors(body: bytes, param: str | None) -> None:
    err = _error(parse_completion_request, body)
    assert err.status == 400 and err.param == param
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_prepare(tok: Tokenizer) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_completion_tokens": 7,
        "max_tokens": 3,
        "logprobs": True,
        "top_logprobs": 2,
        "chat_template_kwargs": {"thinking": True},
    }
    p = prepare_chat(parse_chat_request(json.dumps(body).encode()), tok, LIMITS)
    text = encode_messages([{"role": "user", "content": "hi"}], thinking=True)
    assert p.prompts == [tok.encode(text).ids] and p.prompts[0][0] == 0
    assert p.params.max_tokens == 7 and p.params.logprobs == 2 and p.logprobs == 2
    assert p.params.prompt_logprobs is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "bogus", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        (
            {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"thinking": "yes"}},
            "chat_template_kwargs",
        ),
        ({"messages": [{"role": "user", "content": "x" * 200}]}, "messages"),
    ],
)
def test_chat_errors(tok: Tokenizer, body: dict, param: str) -> None:
    def run() -> None:
        prepare_chat(parse_chat_request(json.dumps({"model": "m", **body}).encode()), tok, LIMITS)

    err = _error(run)
    assert err.status == 400 and err.param == param


def test_logit_bias_maps_to_sampling_params(tok: Tokenizer) -> None:
    """OpenAI's map of token id strings -> bias becomes (id, bias) pairs sorted by id; values at the range
    ends and 300 entries are accepted; absent, null and {} mean no bias."""
    p = _completion(tok, prompt="a", logit_bias={"17": -100, "3": 100, "5": 0.5})
    assert p.params.logit_bias == ((3, 100.0), (5, 0.5), (17, -100.0))
    full = {str(t): (t % 201) - 100 for t in range(300)}
    assert _completion(tok, prompt="a", logit_bias=full).params.logit_bias == tuple(
        (t, float((t % 201) - 100)) for t in range(300)
    )
    for none in ({}, None):
        assert _completion(tok, prompt="a", logit_bias=none).params.logit_bias == ()
    assert _completion(tok, prompt="a").params.logit_bias == ()
    chat = prepare_chat(
        parse_chat_request(
            json.dumps(
                {"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"9": 2.5}}
            ).encode()
        ),
        tok,
        LIMITS,
    )
    assert chat.params.logit_bias == ((9, 2.5),)


@pytest.mark.parametrize(
    ("bias", "param"),
    [
        ({"5": 100.5}, "logit_bias.5"),
        ({"5": -101}, "logit_bias.5"),
        ({"5": "1"}, "logit_bias.5"),
        ({"5": True}, "logit_bias.5"),
        ([[5, 1]], "logit_bias"),
        ("x", "logit_bias"),
    ],
)
def test_logit_bias_schema_errors(bias: Any, param: str) -> None:
    for body in ({"prompt": "a"}, {"messages": [{"role": "user", "content": "x"}]}):
        parse = parse_completion_request if "prompt" in body else parse_chat_request
        err = _error(parse, json.dumps({"model": "m", **body, "logit_bias": bias}).encode())
        assert err.status == 400 and err.param == param, err.message


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        ApiLimits(vocab_size=0)
    with pytest.raises(ValueError):
        ApiLimits(vocab_size=10, max_context_len=8, max_prompt_tokens=8)
    assert ApiLimits(vocab_size=10, max_context_len=8).prompt_token_limit == 7


def test_tiny_temperature_is_clamped(tok: Tokenizer) -> None:
    assert _completion(tok, prompt="a", temperature=5e-324).params.temperature == 0.01
    assert _completion(tok, prompt="a", temperature=0).params.temperature == 0.0
    assert _completion(tok, prompt="a", temperature=0.5).params.temperature == 0.5
