"""How a request ends, seen by a client, on a real cluster (worker processes, real gRPC, TCP transfer,
the router app under uvicorn, the `openai` client / httpx):

- at its first token: max_tokens 1 (plain, streamed, with echo + logprobs), prompt scoring
  (max_tokens 0 + echo + logprobs), a stop token id and a stop string matched by the first token.
  Each answers 200 with the reference engine's first token (or the prompt's logprobs) and its
  finish reason;
- no capacity: 503 with Retry-After while every decode block is taken, 400 for a prompt larger
  than a decode worker's whole cache; streamed requests (completions and chat) get the same codes.

After each, both workers have no block in use or reserved."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest

from splitserve.deploy.config import DEFAULT_CONFIG_PATH, load_config, parse_config
from splitserve.deploy.launcher import build_router_app, resolve_model
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.runtime import WorkerSpec
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import load
from splitserve.model.tokenizer import load_tokenizer
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.tests.helpers import ServeThread

from .harness import WorkerProc, directory_of, start_workers, tcp_spec, wait_for

pytestmark = pytest.mark.timeout(240)

# chunk_size 16 < the prompt: blocks are written to the decode side before the first token exists
ENGINE = EngineConfig(num_blocks=128, block_size=8, chunk_size=16, max_batch_tokens=64, mtp_draft_tokens=1)
PROMPT = [0] + list(range(7, 47))


def spec(ckpt, wid: str, role: str) -> WorkerSpec:
    return tcp_spec(ckpt, wid, role, ENGINE)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    workers = start_workers(
        [spec(tiny_checkpoint, "prefill-0", "prefill"), spec(tiny_checkpoint, "decode-0", "decode")]
    )
    try:
        data = load_config(DEFAULT_CONFIG_PATH).model_dump()
        data["model"]["path"] = str(tiny_checkpoint)
        data["model"]["name"] = "tiny"
        data["router"]["reserve_timeout_s"] = 1.0
        cfg = parse_config(data)
        app, _ = build_router_app(cfg, directory_of(workers), resolve_model(cfg))
        with ServeThread(app) as srv:
            wait_for(lambda: httpx.get(f"{srv.url}/health", timeout=5).status_code == 200, 60, "/health")
            yield workers, srv
    finally:
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def first_token(tiny_checkpoint) -> tuple[int, float]:
    """The reference engine's greedy first token for PROMPT and its logprob."""
    r = Engine(load(tiny_checkpoint), ENGINE).generate(
        [PROMPT], SamplingParams(temperature=0.0, max_tokens=1, logprobs=0, ignore_eos=True)
    )[0]
    return r.token_ids[0], r.logprobs[0].logprob


def stats(w: WorkerProc) -> pb.StatsReply:
    with grpc.insecure_channel(w.info["address"]) as ch:
        stub = pbg.DecodeWorkerStub(ch) if w.spec.role == "decode" else pbg.PrefillWorkerStub(ch)
        return stub.Stats(pb.StatsRequest(), timeout=5)


def assert_nothing_held(workers: list[WorkerProc]) -> None:
    """Every block free on both sides, the decode reservation released (not left to its lease)."""
    for w in workers:
        wait_for(
            lambda: stats(w).blocks_used == 0 and stats(w).blocks_reserved == 0,
            3.0,
            f"{w.spec.worker_id} to free every block",
        )


def client(srv: ServeThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)


def text_of(tiny_checkpoint, ids: list[int], special: bool = False) -> str:
    return load_tokenizer(tiny_checkpoint).decode(ids, skip_special_tokens=not special)


def test_max_tokens_1_returns_the_first_token(cluster, first_token, tiny_checkpoint) -> None:
    workers, srv = cluster
    r = client(srv).completions.create(
        model="tiny", prompt=PROMPT, max_tokens=1, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 1
    assert r.choices[0].text == text_of(tiny_checkpoint, [first_token[0]])
    assert_nothing_held(workers)


def test_max_tokens_1_streamed(cluster, first_token, tiny_checkpoint) -> None:
    workers, srv = cluster
    chunks = list(
        client(srv).completions.create(
            model="tiny", prompt=PROMPT, max_tokens=1, temperature=0.0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text_of(tiny_checkpoint, [first_token[0]])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert_nothing_held(workers)


def test_max_tokens_1_with_echo_and_logprobs(cluster, first_token) -> None:
    workers, srv = cluster
    r = client(srv).completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=1,
        temperature=0.0,
        echo=True,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert r.choices[0].finish_reason == "length"
    assert len(lp.tokens) == len(PROMPT) + 1 and lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert lp.token_logprobs[-1] == pytest.approx(first_token[1], abs=1e-4)
    assert_nothing_held(workers)


def test_max_tokens_0_scores_the_prompt(cluster, tiny_checkpoint) -> None:
    workers, srv = cluster
    c = client(srv)
    scored = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1, temperature=0.0)
    longer = c.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=1,
        echo=True,
        logprobs=1,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    lp = scored.choices[0].logprobs
    assert scored.usage.completion_tokens == 0 and len(lp.tokens) == len(PROMPT)
    assert scored.choices[0].text == text_of(tiny_checkpoint, PROMPT, special=True)  # echo keeps BOS
    # the prompt's logprobs do not depend on what is generated after it
    assert lp.token_logprobs == pytest.approx(longer.choices[0].logprobs.token_logprobs[:-1], abs=1e-5)
    assert_nothing_held(workers)


def test_stop_token_and_stop_string_on_the_first_token(cluster, first_token, tiny_checkpoint) -> None:
    workers, srv = cluster
    c = client(srv)
    tok = first_token[0]
    r = c.completions.create(
        model="tiny",
        prompt=PROMPT,
        max_tokens=8,
        temperature=0.0,
        extra_body={"stop_token_ids": [tok], "ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == "" and r.usage.completion_tokens == 1
    text = text_of(tiny_checkpoint, [tok])
    if text.strip():
        r = c.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=8, temperature=0.0, stop=[text], extra_body={"ignore_eos": True}
        )
        assert r.choices[0].finish_reason == "stop" and r.choices[0].text == ""
    assert_nothing_held(workers)


def test_the_cluster_still_serves_longer_requests(cluster) -> None:
    workers, srv = cluster
    r = client(srv).completions.create(
        model="tiny", prompt=PROMPT, max_tokens=6, temperature=0.0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 6
    assert_nothing_held(workers)


def test_a_full_cluster_answers_503_with_retry_after(cluster) -> None:
    workers, srv = cluster
    decode = next(w for w in workers if w.spec.role == "decode")
    with grpc.insecure_channel(decode.info["address"]) as ch:
        stub = pbg.DecodeWorkerStub(ch)
        # every block of the decode worker (128 x 8 tokens, prompt + first token + 1 MTP draft)
        rep = stub.Reserve(
            pb.ReserveRequest(request_id="hog", prompt_len=128 * 8 - 2, max_tokens=1, lease_ms=60_000), timeout=10
        )
        assert rep.HasField("reservation") and len(rep.reservation.block_ids) == 128
        try:
            r = httpx.post(
                f"{srv.url}/v1/completions", timeout=30, json={"model": "tiny", "prompt": PROMPT, "max_tokens": 4}
            )
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "no_capacity"
            # streamed: the same 503 (not a 200 with an SSE error event), completions and chat
            c = client(srv)
            with pytest.raises(openai.APIStatusError) as e:
                c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, stream=True)
            assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
            with pytest.raises(openai.APIStatusError) as e:
                c.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, stream=True
                )
            assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
            assert e.value.body["code"] == "no_capacity"
        finally:
            stub.Abort(
                pb.AbortRequest(
                    request_id="hog", epoch=rep.reservation.epoch, reason="test done", nothing_written=True
                ),
                timeout=10,
            )
    assert_nothing_held(workers)
    test_the_cluster_still_serves_longer_requests(cluster)


def test_a_prompt_larger_than_any_decode_cache_answers_400(cluster, tiny_checkpoint) -> None:
    workers, srv = cluster
    prompt = [0] + [5 + i % 900 for i in range(128 * 8 + 40)]  # within the context, beyond the cache
    r = httpx.post(f"{srv.url}/v1/completions", timeout=30, json={"model": "tiny", "prompt": prompt, "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded" and "cache" in r.json()["error"]["message"]
    # streamed: the same 400, completions and chat
    c = client(srv)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=prompt, max_tokens=4, stream=True)
    assert e.value.body["code"] == "context_length_exceeded" and "cache" in e.value.body["message"]
    content = " ".join(str(i) for i in range(600))
    assert len(load_tokenizer(tiny_checkpoint).encode(content)) > 128 * 8
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": content}], max_tokens=4, stream=True
        )
    assert e.value.body["code"] == "context_length_exceeded" and "cache" in e.value.body["message"]
    assert_nothing_held(workers)
