"""SSE keep-alives: while a streamed request waits for its first token, the router sends comment lines
(`: keep-alive`) every `sse_keepalive_s`, and clients still parse the stream."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
import openai

from splitserve.router.testing import ReferenceBackend

from .conftest import MODEL, VOCAB

BODY = {"model": MODEL, "prompt": "hello there", "max_tokens": 4, "stream": True, "ignore_eos": True}


def _raw_stream(url: str, body: dict) -> list[tuple[float, str]]:
    """(seconds since the request, line) of every non-empty line of the response body."""
    lines = []
    with httpx.Client(base_url=url, timeout=30) as http:
        t0 = time.monotonic()
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    lines.append((time.monotonic() - t0, line))
    return lines


def test_keepalives_while_the_first_token_is_slow(start_server: Callable) -> None:
    delay, interval = 1.5, 0.3
    backend = ReferenceBackend(VOCAB, first_token_delay_s=delay)
    url, _ = start_server(backend, sse_keepalive_s=interval)
    lines = _raw_stream(url, BODY)
    first_data = next(i for i, (_, line) in enumerate(lines) if line.startswith("data:"))
    pings = [t for t, line in lines[:first_data] if line.startswith(":")]
    assert all(line == ": keep-alive" for _, line in lines[:first_data])
    # about delay / interval of them, none sooner than the interval after the previous one
    assert int(delay / interval) - 2 <= len(pings) <= int(delay / interval), pings
    assert pings[0] >= interval * 0.9
    assert all(b - a >= interval * 0.9 for a, b in zip(pings, pings[1:], strict=False))
    assert lines[first_data][0] >= delay
    # the rest is the ordinary stream: the tokens, then [DONE]
    data = [line.removeprefix("data: ") for _, line in lines[first_data:] if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    assert sum(len(json.loads(d)["choices"][0]["text"]) > 0 for d in data[:-1]) >= 1
    assert backend.finished and not backend.cancelled


def test_openai_client_reads_a_stream_with_keepalives(start_server: Callable) -> None:
    url, _ = start_server(ReferenceBackend(VOCAB, first_token_delay_s=0.8), sse_keepalive_s=0.2)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    chunks = list(
        client.completions.create(
            model=MODEL, prompt="hello there", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_no_keepalive_when_tokens_keep_coming(start_server: Callable) -> None:
    url, _ = start_server(ReferenceBackend(VOCAB, token_delay_s=0.01), sse_keepalive_s=5.0)
    lines = _raw_stream(url, BODY)
    assert not [line for _, line in lines if line.startswith(":")]
    assert lines[-1][1] == "data: [DONE]"
