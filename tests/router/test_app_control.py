"""Admission (429), API keys (401), and cancellation of the backend when the client goes away."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
import pytest

from splitserve.router.testing import ReferenceBackend

from .conftest import MODEL, VOCAB

SLOW = dict(token_delay_s=0.05)
LONG = {"model": MODEL, "prompt": "a", "max_tokens": 200, "ignore_eos": True}


def _wait_for(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def test_admission_limit_gives_429_with_retry_after(start_server) -> None:  # noqa: ANN001
    url, be = start_server(ReferenceBackend(VOCAB, **SLOW), max_queued=2, retry_after_s=3)
    with httpx.Client(base_url=url, timeout=20) as http:
        with (
            http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r1,
            http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r2,
        ):
            assert r1.status_code == r2.status_code == 200
            r3 = http.post("/v1/completions", json={**LONG, "max_tokens": 1})
            assert r3.status_code == 429 and r3.headers["retry-after"] == "3"
            err = r3.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["code"] == "rate_limit_exceeded"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).completions.create(
                    model=MODEL, prompt="a", max_tokens=1
                )
        # both streams were dropped: their places come back
        _wait_for(lambda: not be.active)
        assert http.post("/v1/completions", json={**LONG, "max_tokens": 1}).status_code == 200
        assert "splitserve_router_rejected_requests_total 2.0" in http.get("/metrics").text


def test_api_key(start_server) -> None:  # noqa: ANN001
    url, _ = start_server(api_key="s3cret")
    with httpx.Client(base_url=url, timeout=20) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "a"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200  # probes need no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=20)
    assert good.completions.create(model=MODEL, prompt="a", max_tokens=2).usage.completion_tokens <= 2


def test_stream_disconnect_cancels_backend(start_server) -> None:  # noqa: ANN001
    url, be = start_server(ReferenceBackend(VOCAB, **SLOW))
    with httpx.Client(base_url=url, timeout=20) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            _wait_for(lambda: len(be.started) == 1)
            rid = be.started[-1]
            assert rid in be.active
        # leaving the block closes the connection mid-stream
        _wait_for(lambda: rid in be.cancelled and not be.active)
        assert len(be.requests[rid][0]) == 1
        _wait_for(lambda: "splitserve_router_requests_in_flight 0.0" in http.get("/metrics").text)


def test_non_stream_disconnect_cancels_backend(start_server) -> None:  # noqa: ANN001
    url, be = start_server(ReferenceBackend(VOCAB, **SLOW))
    with httpx.Client(base_url=url, timeout=httpx.Timeout(20, read=0.3)) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/chat/completions", json={**LONG, "messages": [{"role": "user", "content": "x"}], "n": 2})
    _wait_for(lambda: len(be.cancelled) == 2 and not be.active)


def test_slow_backend_not_waited_for_after_stop_string(start_server, tok) -> None:  # noqa: ANN001
    be = ReferenceBackend(VOCAB, **SLOW)
    url, _ = start_server(be)
    prompt = next(p for p in range(2, VOCAB) if len(tok.decode(be.greedy_continuation([p], 6))) >= 3)
    text = tok.decode(be.greedy_continuation([prompt], 6))
    with httpx.Client(base_url=url, timeout=20) as http:
        t0 = time.monotonic()
        r = http.post("/v1/completions", json={**LONG, "prompt": [prompt], "temperature": 0, "stop": text[1:3]})
        assert r.json()["choices"][0]["finish_reason"] == "stop"
        assert time.monotonic() - t0 < 2.0  # 200 tokens would take 10 s
    assert be.started[-1] in be.cancelled


def test_disconnect_detected_while_backend_is_silent(start_server) -> None:  # noqa: ANN001
    # each token takes 3 s: the cancel must come from watching the connection, not from a failed send
    url, be = start_server(ReferenceBackend(VOCAB, token_delay_s=3.0))
    body = {**LONG, "messages": [{"role": "user", "content": "x"}], "stream": True}
    with httpx.Client(base_url=url, timeout=20) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert next(r.iter_lines()).startswith("data: ")  # the role chunk comes before any token
            _wait_for(lambda: len(be.started) == 1)
            rid = be.started[-1]
        t0 = time.monotonic()
        _wait_for(lambda: rid in be.cancelled, timeout_s=2.5)
        assert time.monotonic() - t0 < 2.5


def test_max_running_queues_instead_of_rejecting(start_server) -> None:  # noqa: ANN001
    url, be = start_server(ReferenceBackend(VOCAB, token_delay_s=0.01), max_queued=4, max_running=1)
    body = {**LONG, "max_tokens": 5}
    with httpx.Client(base_url=url, timeout=20) as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r1:
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r2:
                t1, t2 = r1.read().decode(), r2.read().decode()
        r3 = http.post("/v1/completions", json={**body, "n": 2})
    assert t1.endswith("data: [DONE]\n\n") and t2.endswith("data: [DONE]\n\n")
    assert r3.status_code == 200 and len(r3.json()["choices"]) == 2
    assert be.peak_active == 2  # the n=2 request; the two streams never ran together


def test_large_body_is_validated_too(start_server) -> None:  # noqa: ANN001
    from splitserve.router.openai_api import ApiLimits

    url, be = start_server(limits=ApiLimits(vocab_size=VOCAB, max_context_len=256, max_body_bytes=1 << 20))
    with httpx.Client(base_url=url, timeout=20) as http:
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 40000})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "a", "user": "u" * 200000, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
    assert len(be.started) == 1
