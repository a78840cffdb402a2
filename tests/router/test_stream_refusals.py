"""A streamed request the backend refuses before its first delta gets the same status code as a
non-streaming one (503 + Retry-After for `Unavailable`, 400 for `NeverFits`), not a 200 with an SSE error
event; a refusal that comes after the keep-alive bound (the stream has started) is an SSE error event."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import httpx
import openai
import pytest

from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.backend import GenerationDelta, NeverFits, Unavailable
from splitserve.router.testing import ReferenceBackend

from .conftest import MODEL, VOCAB


class RefusingBackend(ReferenceBackend):
    """Raises `refusal` (after `delay_s`) before the first delta of the first `refusals` requests."""

    def __init__(self, refusal: Exception, delay_s: float = 0.0, refusals: int = 1) -> None:
        super().__init__(VOCAB)
        self.refusal, self.delay_s, self.refusals = refusal, delay_s, refusals

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationDelta]:
        if self.refusals > 0:
            self.refusals -= 1
            await asyncio.sleep(self.delay_s)
            raise self.refusal
        async for d in super().generate(request_id, prompt_token_ids, params):
            yield d


COMPLETION = {"model": MODEL, "prompt": "hello there", "max_tokens": 4, "stream": True, "ignore_eos": True}
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hello"}],
    "max_tokens": 4,
    "stream": True,
    "ignore_eos": True,
}
PATHS = [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]


@pytest.mark.parametrize(("path", "body"), PATHS)
def test_a_stream_refused_for_no_capacity_answers_503(start_server: Callable, path: str, body: dict) -> None:
    url, be = start_server(RefusingBackend(Unavailable("all full", retry_after_s=3.0)), max_queued=1)
    with httpx.Client(base_url=url, timeout=20) as http:
        r = http.post(path, json=body)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "no_capacity"
        # the admission slot was given back: the next stream runs to the end
        r = http.post(path, json=body)
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert len(be.finished) == 1


@pytest.mark.parametrize(("path", "body"), PATHS)
def test_a_stream_that_can_never_fit_answers_400(start_server: Callable, path: str, body: dict) -> None:
    url, _ = start_server(RefusingBackend(NeverFits("prompt larger than every cache")))
    r = httpx.post(f"{url}{path}", json=body, timeout=20)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "cache" in r.json()["error"]["message"]


def test_the_openai_client_sees_the_status_codes_of_streams(start_server: Callable) -> None:
    url, _ = start_server(RefusingBackend(Unavailable("all full", retry_after_s=2.0), delay_s=0.1))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "2"
    url, _ = start_server(RefusingBackend(NeverFits("too long")))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", stream=True)


def test_a_refusal_after_the_stream_started_is_an_sse_error(start_server: Callable) -> None:
    # the refusal takes longer than the keep-alive interval: the stream has started by then
    url, _ = start_server(RefusingBackend(Unavailable("all full"), delay_s=0.8), sse_keepalive_s=0.2)
    with httpx.Client(base_url=url, timeout=20) as http:
        with http.stream("POST", "/v1/chat/completions", json=CHAT) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
    assert lines[0] == ": keep-alive"
    data = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: {")]
    assert data[-1]["error"]["code"] == "no_capacity"
    assert lines[-1] == "data: [DONE]"


def test_a_slow_first_chat_token_gets_keepalives_then_the_role_chunk(start_server: Callable) -> None:
    url, be = start_server(ReferenceBackend(VOCAB, first_token_delay_s=1.0), sse_keepalive_s=0.2)
    with httpx.Client(base_url=url, timeout=20) as http:
        with http.stream("POST", "/v1/chat/completions", json=CHAT) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert first_data >= 3 and all(line == ": keep-alive" for line in lines[:first_data])
    role = json.loads(lines[first_data].removeprefix("data: "))
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert lines[-1] == "data: [DONE]"
    assert be.finished and not be.cancelled


def test_a_fast_stream_starts_with_its_role_chunk(start_server: Callable) -> None:
    url, _ = start_server(ReferenceBackend(VOCAB), sse_keepalive_s=5.0)
    with httpx.Client(base_url=url, timeout=20) as http:
        with http.stream("POST", "/v1/chat/completions", json=CHAT) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
    assert not [line for line in lines if line.startswith(":")] and lines[-1] == "data: [DONE]"


def test_a_client_gone_while_the_response_is_held_cancels_the_generation(start_server: Callable) -> None:
    # no keep-alives: the response is held until the first token, which takes 3 s
    url, be = start_server(ReferenceBackend(VOCAB, first_token_delay_s=3.0), sse_keepalive_s=None)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=COMPLETION, timeout=httpx.Timeout(20, read=0.5))
    deadline = time.monotonic() + 2.0
    while not be.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(be.cancelled) == 1 and not be.finished
