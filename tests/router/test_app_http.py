"""The HTTP app through the `openai` client and raw HTTP, against a real uvicorn server on 127.0.0.1.

Expected outputs come from the reference backend's own model (greedy chains, raw logprobs) and from the
tokenizer, never from the router under test.
"""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from splitserve.router.chat import encode_messages
from splitserve.router.testing import ReferenceBackend

from .conftest import MODEL, VOCAB

NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(start_server) -> tuple[str, ReferenceBackend]:  # noqa: ANN001
    return start_server()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:  # noqa: ANN001
    with httpx.Client(base_url=server[0], timeout=20) as c:
        yield c


@pytest.fixture(scope="module")
def backend(server) -> ReferenceBackend:  # noqa: ANN001
    return server[1]


@pytest.fixture(scope="module")
def chain(backend: ReferenceBackend, tok: Tokenizer) -> tuple[list[int], list[int], str]:
    """A one-token prompt whose greedy continuation decodes to a reasonably long text."""
    for first in range(2, VOCAB):
        ids = backend.greedy_continuation([first], 24)
        text = tok.decode(ids)
        if len(text) >= 12 and 1 not in ids:
            return [first], ids, text
    raise AssertionError("no suitable prompt")


def _create(create, body: dict[str, Any]):  # noqa: ANN001, ANN202
    """Calls an openai client `create` with a raw body (non-OpenAI fields go through extra_body)."""
    extra = {k: body[k] for k in ("ignore_eos", "stop_token_ids", "chat_template_kwargs") if k in body}
    return create(**{k: v for k, v in body.items() if k not in extra}, extra_body=extra or None)


def _sse_events(http: httpx.Client, path: str, body: dict[str, Any]) -> list[str]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    return [e[len("data: ") :] for e in raw.split("\n\n") if e]


def test_models_health_metrics(client: openai.OpenAI, http: httpx.Client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    text = http.get("/metrics").text
    assert "splitserve_router_time_to_first_token_seconds_count" in text
    assert 'splitserve_router_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "splitserve_backend_started_requests_total" in text


def test_greedy_completion_matches_reference(client: openai.OpenAI, chain, tok: Tokenizer) -> None:  # noqa: ANN001
    prompt, ids, _ = chain
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body=NO_EOS)
    assert r.choices[0].text == tok.decode(ids[:12])
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (1, 12, 13)


def test_string_prompt_usage(client: openai.OpenAI, tok: Tokenizer) -> None:
    r = client.completions.create(model=MODEL, prompt="def fib(n):", max_tokens=3, extra_body=NO_EOS)
    assert r.usage.prompt_tokens == len(tok.encode("def fib(n):").ids)
    assert r.usage.completion_tokens == 3


def test_n_samples_use_derived_seeds(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt="Hello", max_tokens=8, temperature=1.0, extra_body=NO_EOS)
    r = client.completions.create(n=3, seed=5, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [client.completions.create(seed=5 + i, **kw).choices[0].text for i in range(3)]
    assert [c.text for c in r.choices] == singles
    assert r.usage.completion_tokens == 24
    assert client.completions.create(seed=5, **kw).choices[0].text == singles[0]  # reproducible


def test_multiple_prompts_times_n(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["a", "b c"], n=2, max_tokens=2, extra_body=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 8


def test_streaming_completion_equals_non_streaming(client: openai.OpenAI, http: httpx.Client) -> None:
    body = dict(model=MODEL, prompt="Once upon", max_tokens=10, seed=11, n=2, **NO_EOS)
    full = _create(client.completions.create, body)
    events = _sse_events(http, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = {0: "", 1: ""}
    finish = {}
    for c in chunks[:-1]:
        assert c["object"] == "text_completion" and c["usage"] is None
        (ch,) = c["choices"]
        texts[ch["index"]] += ch["text"]
        if ch["finish_reason"]:
            finish[ch["index"]] = ch["finish_reason"]
    assert [texts[0], texts[1]] == [c.text for c in full.choices]
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full.usage.model_dump(exclude_none=True)
    # the openai client's own stream parser agrees
    streamed = "".join(
        c.choices[0].text for c in _create(client.completions.create, {**body, "n": 1, "stream": True}) if c.choices
    )
    assert streamed == full.choices[0].text


def test_chat_prompt_and_thinking(client: openai.OpenAI, backend: ReferenceBackend, tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body=NO_EOS)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str) and r.usage.completion_tokens == 4
    sent = backend.requests[backend.started[-1]][0]
    assert sent == tok.encode(encode_messages(messages)).ids and sent[0] == 0
    client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=1, extra_body={"chat_template_kwargs": {"thinking": True}}
    )
    sent = backend.requests[backend.started[-1]][0]
    assert sent == tok.encode(encode_messages(messages, thinking=True)).ids
    assert sent[-1] == tok.token_to_id("<think>")


def test_chat_streaming(client: openai.OpenAI, http: httpx.Client) -> None:
    body = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me"}], max_tokens=6, seed=3, **NO_EOS)
    full = _create(client.chat.completions.create, body)
    chunks = [json.loads(e) for e in _sse_events(http, "/v1/chat/completions", {**body, "stream": True})[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == full.choices[0].message.content
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}


def test_stop_string_truncates_and_aborts_backend(
    client: openai.OpenAI,
    http: httpx.Client,
    backend: ReferenceBackend,
    chain,  # noqa: ANN001
) -> None:
    prompt, _, text = chain
    stop = text[4:6]
    expected = text[: text.find(stop)]
    body = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop, "\x00never"], **NO_EOS)
    r = _create(client.completions.create, body)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    rid = backend.started[-1]
    assert rid in backend.cancelled and rid not in backend.active  # the router closed the generator early
    assert r.usage.completion_tokens < 24
    chunks = [json.loads(e) for e in _sse_events(http, "/v1/completions", {**body, "stream": True})[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_stop_token_ids(client: openai.OpenAI, chain, tok: Tokenizer) -> None:  # noqa: ANN001
    prompt, ids, _ = chain
    k = next(k for k in range(1, len(ids)) if ids[k] not in ids[:k])
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=20, temperature=0, extra_body={"stop_token_ids": [ids[k]], **NO_EOS}
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == k + 1  # the stop token is generated but not shown
    assert r.choices[0].text == tok.decode(ids[:k])


def test_eos_stops_unless_ignored(start_server) -> None:  # noqa: ANN001
    url, _ = start_server(ReferenceBackend(VOCAB, eos_bias=1000.0))
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=20)
    r = c.completions.create(model=MODEL, prompt="a", max_tokens=5)
    assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    r = c.completions.create(model=MODEL, prompt="a", max_tokens=5, extra_body=NO_EOS)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 5)


def test_completion_logprobs(client: openai.OpenAI, backend: ReferenceBackend, chain) -> None:  # noqa: ANN001
    prompt, ids, _ = chain
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3, extra_body=NO_EOS
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    prevs = [prompt[-1], *ids[:5]]
    for i in range(6):
        ref = backend.logprobs(prevs[i])
        assert math.isclose(lp.token_logprobs[i], float(ref[ids[i]]), rel_tol=1e-9)
        assert lp.tokens[i] in lp.top_logprobs[i] and len(lp.top_logprobs[i]) <= 4
        assert math.isclose(max(lp.top_logprobs[i].values()), lp.token_logprobs[i])  # greedy = most likely
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


@pytest.mark.parametrize("max_tokens", [1, 0])
def test_echo_logprobs_lm_eval_style(
    http: httpx.Client, backend: ReferenceBackend, tok: Tokenizer, max_tokens: int
) -> None:
    prompts = [tok.encode("The capital of France is Paris").ids, tok.encode("2 + 2 = 4").ids]
    body = {
        "model": MODEL,
        "prompt": prompts,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 1,
        "echo": True,
        "seed": 1234,
    }
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    for choice, p in zip(out["choices"], prompts, strict=True):
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(p) + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        for i in range(1, len(p)):
            assert math.isclose(lp["token_logprobs"][i], float(backend.logprobs(p[i - 1])[p[i]]), rel_tol=1e-9)
            assert len(lp["top_logprobs"][i]) <= 2
        assert choice["text"].startswith(tok.decode(p, skip_special_tokens=False))
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
        # lm-eval's local-completions reads token_logprobs[ctxlen:-1]
        assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert out["usage"]["completion_tokens"] == 2 * max_tokens
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts))


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        extra_body=NO_EOS,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert isinstance(item.token, str) and item.logprob <= 0 and all(0 <= b < 256 for b in item.bytes)
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert r.choices[0].logprobs is None


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    if param is not None:
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"model": "tiny", "prompt": ', 400, None),
        (b"not json at all", 400, None),
        (b"", 400, None),
        (b'{"model": "tiny", "prompt": 5}', 400, "prompt"),
        (b'{"model": "tiny", "prompt": "a", "max_tokens": "10"}', 400, "max_tokens"),
        (b'{"model": "tiny", "prompt": "a", "temperature": -1}', 400, "temperature"),
        (b'{"model": "tiny", "prompt": "a", "n": 0}', 400, "n"),
        (b'{"model": "tiny", "prompt": "a", "n": 5}', 400, "n"),
        (b'{"model": "nope", "prompt": "a"}', 404, "model"),
        (b'{"model": "tiny", "prompt": ""}', 400, "prompt"),
        (b'{"model": "tiny", "prompt": [[]]}', 400, "prompt"),
        (b'{"model": "tiny", "prompt": [1, 2, 99999]}', 400, "prompt"),
        (b'{"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', 400, "stop"),
        (('{"model": "tiny", "prompt": "' + "word " * 300 + '"}').encode(), 400, "prompt"),
        (b'{"model": "tiny", "prompt": "a", "max_tokens": 1000}', 400, "max_tokens"),
    ],
)
def test_completion_errors(
    http: httpx.Client, backend: ReferenceBackend, body: bytes, status: int, param: str | None
) -> None:
    before = len(backend.started)
    _assert_error(http.post("/v1/completions", content=body), status, param)
    assert len(backend.started) == before  # bad input never reaches the backend


def test_other_errors(http: httpx.Client, client: openai.OpenAI) -> None:
    err = _assert_error(http.post("/v1/completions", content=b'{"prompt": "' + b"x" * 70000 + b'"}'), 413)
    assert err["code"] == "request_too_large"
    _assert_error(http.post("/v1/chat/completions", json={"model": MODEL, "messages": "hi"}), 400, "messages")
    _assert_error(
        http.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}),
        400,
        "messages",
    )
    _assert_error(http.get("/v1/nothing"), 404)
    _assert_error(http.get("/v1/completions"), 405)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="a", top_p=1.5)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])


def test_backend_failure_is_a_clean_error(start_server) -> None:  # noqa: ANN001
    url, be = start_server(ReferenceBackend(VOCAB, fail_after_tokens=2))
    with httpx.Client(base_url=url, timeout=20) as http:
        err = _assert_error(
            http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 5, **NO_EOS}), 500
        )
        assert err["type"] == "server_error"
        events = _sse_events(
            http, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 5, "stream": True, **NO_EOS}
        )
        assert "error" in json.loads(events[-2])
    assert not be.active


def test_streamed_echo_logprobs_equal_non_streamed(http: httpx.Client, tok: Tokenizer) -> None:
    body = {"model": MODEL, "prompt": "Hello 🙂 world", "max_tokens": 5, "logprobs": 2, "echo": True, "seed": 9, "n": 2}
    full = http.post("/v1/completions", json={**body, **NO_EOS}).json()
    chunks = [json.loads(e) for e in _sse_events(http, "/v1/completions", {**body, **NO_EOS, "stream": True})[:-1]]
    for choice in full["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert choice["text"].startswith("Hello 🙂 world")
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for c in mine for x in c["logprobs"][key]] == choice["logprobs"][key]
        n_prompt = len(tok.encode("Hello 🙂 world").ids)
        assert len(choice["logprobs"]["tokens"]) == n_prompt + 5


LINE_BREAKERS = "a\u2028b\u2029c\x85d\u00e9\U0001f600"


def test_sse_events_survive_splitlines_readers(http: httpx.Client, tok: Tokenizer) -> None:
    """Text holding U+2028 / U+2029 / U+0085 (str.splitlines breaks lines there; httpx.iter_lines and
    requests do too) streams as events that every such reader parses, and the text comes back intact."""
    prompt = "x " + LINE_BREAKERS
    assert LINE_BREAKERS in tok.decode(tok.encode(prompt, add_special_tokens=False).ids)
    body = dict(model=MODEL, prompt=prompt, max_tokens=2, echo=True, stream=True, **NO_EOS)
    with http.stream("POST", "/v1/completions", json=body) as r:
        lines = [ln for ln in r.iter_lines() if ln]  # httpx's reader splits like str.splitlines
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[len("data: ") :]) for ln in lines[:-1]]  # every line is a whole event
    assert all(ln.isascii() for ln in lines)
    text = "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
    assert text.startswith(prompt)
    raw = "".join(ln + "\n\n" for ln in lines)
    assert raw.splitlines()[::2] == lines  # str.splitlines itself sees one line per event
