"""Co-located mode on real worker processes (real gRPC, no Ray): decode workers that prefill their own
requests (PrefillAndGenerate) behind the router's `ColocatedBackend`. Outputs equal the single-process
engine and the disaggregated path for the same prompts; aborts, disconnects and a killed worker leave
no block in use on any live worker."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.runtime import WorkerSpec
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import load
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.protos.convert import sampling_params_to_proto
from splitserve.router.cluster_backend import ColocatedBackend, DisaggBackend

from .harness import WorkerProc, directory_of, start_workers, tcp_spec, wait_for

pytestmark = pytest.mark.timeout(180)

# chunk_size 16 < the longer prompts: co-located prefill runs in chunks batched with running decodes
ENGINE = EngineConfig(num_blocks=128, block_size=8, chunk_size=16, max_batch_tokens=64, mtp_draft_tokens=1)


def spec(ckpt, wid: str, role: str) -> WorkerSpec:
    return tcp_spec(ckpt, wid, role, ENGINE)


@pytest.fixture(scope="module")
def workers(tiny_checkpoint):
    ws = start_workers(
        [
            spec(tiny_checkpoint, "decode-0", "decode"),
            spec(tiny_checkpoint, "decode-1", "decode"),
            spec(tiny_checkpoint, "prefill-0", "prefill"),
        ]
    )
    yield ws
    for w in ws:
        w.stop()


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    net = load(tiny_checkpoint)
    return lambda: Engine(net, ENGINE)


def decode_workers(workers: list[WorkerProc]) -> list[WorkerProc]:
    return [w for w in workers if w.spec.role == "decode"]


def stats(w: WorkerProc) -> pb.StatsReply:
    with grpc.insecure_channel(w.info["address"]) as ch:
        stub = pbg.DecodeWorkerStub(ch) if w.spec.role == "decode" else pbg.PrefillWorkerStub(ch)
        return stub.Stats(pb.StatsRequest(), timeout=5)


def assert_all_free(workers: list[WorkerProc], timeout_s: float = 15.0) -> None:
    for w in workers:
        if w.proc.is_alive():
            wait_for(lambda: stats(w).blocks_used == 0, timeout_s, f"{w.spec.worker_id} to free every block")


async def collect(backend, rid: str, prompt: list[int], params: SamplingParams, on_delta=None):
    toks: list[int] = []
    lps: list = []
    prompt_lps = reason = err = None
    async for d in backend.generate(rid, prompt, params):
        toks += d.token_ids
        lps += d.logprobs or []
        prompt_lps = d.prompt_logprobs if d.prompt_logprobs is not None else prompt_lps
        reason, err = d.finish_reason or reason, d.error or err
        if on_delta is not None:
            await on_delta(len(toks))
    return toks, reason, err, lps, prompt_lps


async def with_backend(kind, directory, fn, **options):
    b = kind(directory, **options)
    await b.start()
    try:
        return await fn(b)
    finally:
        await b.close()


PROMPTS = [[3 + (i * 37 + j * 11) % 1000 for j in range(n)] for i, n in enumerate((5, 17, 40, 63))]
CASES = [
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True),
]


def test_colocated_equals_the_engine_and_the_disaggregated_path(workers, engine) -> None:
    jobs = [(f"r{i}-{k}", p, sp) for i, p in enumerate(PROMPTS) for k, sp in enumerate(CASES)]

    async def run_all(b):
        return await asyncio.gather(*(collect(b, rid, p, sp) for rid, p, sp in jobs))

    colocated = asyncio.run(with_backend(ColocatedBackend, directory_of(decode_workers(workers)), run_all))
    disagg_dir = directory_of([w for w in workers if w.spec.worker_id in ("prefill-0", "decode-0")])
    disagg = asyncio.run(with_backend(DisaggBackend, disagg_dir, run_all))
    for (rid, p, sp), (c_toks, c_reason, c_err, _, _), (d_toks, _, d_err, _, _) in zip(jobs, colocated, disagg):
        ref = engine().generate([p], sp)[0].token_ids
        assert c_err is None and c_reason == "length", rid
        assert c_toks == ref, rid
        assert d_err is None and d_toks == ref, rid
    # both co-located workers took requests (least loaded by the router's own in-flight count)
    assert all(stats(w).requests_done > 0 for w in decode_workers(workers))
    assert_all_free(workers)


def test_colocated_logprobs_and_prompt_logprobs_match_the_engine(workers, engine) -> None:
    prompt, params = (
        PROMPTS[2],
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2, prompt_logprobs=1),
    )
    toks, reason, err, lps, prompt_lps = asyncio.run(
        with_backend(
            ColocatedBackend, directory_of(decode_workers(workers)), lambda b: collect(b, "lp", prompt, params)
        )
    )
    ref = engine().generate([prompt], params)[0]
    assert err is None and toks == ref.token_ids
    assert [x.token_id for x in lps] == ref.token_ids
    assert [x.logprob for x in lps] == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    assert [[t for t, _ in x.top] for x in lps] == [[t for t, _ in x.top] for x in ref.logprobs]
    assert len(prompt_lps) == len(prompt) and prompt_lps[0] is None
    assert [x.logprob for x in prompt_lps[1:]] == pytest.approx([x.logprob for x in ref.prompt_logprobs[1:]], abs=1e-5)


def test_logit_bias_reaches_the_prefill_sampled_first_token_and_the_decode_tokens(workers, engine) -> None:
    """logit_bias travels in the wire SamplingParams: +100 on one token makes every token that token, the
    first (sampled by the prefill worker, or by a co-located decode worker) and the rest (decode, MTP on);
    a sampled request with bans and smaller biases equals the engine, logprobs (after the bias) included."""
    prompt = PROMPTS[1]
    forced = 77
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logit_bias={forced: 100.0})
    free = engine().generate([prompt], CASES[1])[0].token_ids
    sampled = SamplingParams(
        temperature=0.9,
        top_p=0.9,
        seed=7,
        max_tokens=12,
        ignore_eos=True,
        logprobs=1,
        logit_bias={**{t: -100.0 for t in free[:3]}, **{t: 3.0 for t in range(500, 700, 7)}},
    )
    ref = engine().generate([prompt], sampled)[0]
    assert ref.token_ids[0] != free[0] and not set(ref.token_ids) & set(free[:3])

    async def run(b):
        return await asyncio.gather(collect(b, "bias-g", prompt, greedy), collect(b, "bias-s", prompt, sampled))

    disagg_dir = directory_of([w for w in workers if w.spec.worker_id in ("prefill-0", "decode-0")])
    for kind, directory in ((DisaggBackend, disagg_dir), (ColocatedBackend, directory_of(decode_workers(workers)))):
        (g_toks, _, g_err, _, _), (s_toks, _, s_err, s_lps, _) = asyncio.run(with_backend(kind, directory, run))
        assert g_err is None and g_toks == [forced] * 8, kind.__name__
        assert s_err is None and s_toks == ref.token_ids, kind.__name__
        assert [x.logprob for x in s_lps] == pytest.approx([x.logprob for x in ref.logprobs], abs=1e-5)
    assert_all_free(workers)


def test_client_disconnect_frees_the_blocks(workers) -> None:
    async def go(b):
        gen = b.generate("gone", PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True))
        n = 0
        async for d in gen:
            n += len(d.token_ids)
            if n >= 3:
                break
        assert any(stats(w).blocks_used > 0 for w in decode_workers(workers))
        await gen.aclose()

    asyncio.run(with_backend(ColocatedBackend, directory_of(decode_workers(workers)), go))
    assert_all_free(workers, 10)


def test_abort_frees_the_blocks_while_prefilling_and_while_decoding(workers) -> None:
    """Abort (what the router sends when a request ends early) stops a PrefillAndGenerate stream without a
    Finished chunk, in its chunked prefill or later, and the engine gives its blocks back."""
    w = decode_workers(workers)[0]
    long_prompt = [3 + (j * 13) % 1000 for j in range(600)]  # 38 chunks of 16: abort lands mid-prefill
    sampling = sampling_params_to_proto(SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True))
    with grpc.insecure_channel(w.info["address"]) as ch:
        stub = pbg.DecodeWorkerStub(ch)
        for rid, prompt, chunks_before_abort in (("ab-prefill", long_prompt, 0), ("ab-decode", PROMPTS[1], 3)):
            call = stub.PrefillAndGenerate(
                pb.PrefillAndGenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling), timeout=60
            )
            seen: list[pb.GenerateChunk] = []
            if chunks_before_abort:
                for chunk in call:
                    seen.append(chunk)
                    if len(seen) == chunks_before_abort:
                        break
            else:
                wait_for(
                    lambda: (s := stats(w)).blocks_used > 0 and s.queued_prefill_tokens == len(prompt),
                    20,
                    "the prefill to take blocks",
                    0.01,
                )
            dup = list(
                stub.PrefillAndGenerate(
                    pb.PrefillAndGenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling), timeout=10
                )
            )
            assert [c.WhichOneof("chunk") for c in dup] == ["error"] and "already running" in dup[0].error.message
            assert stub.Abort(pb.AbortRequest(request_id=rid, reason="test"), timeout=5).found
            rest = list(call)  # the stream ends by itself
            assert all(c.WhichOneof("chunk") == "delta" for c in seen + rest)
            wait_for(lambda: stats(w).blocks_used == 0, 10, f"{rid}'s blocks to be freed")
            assert stats(w).queued_prefill_tokens == 0
        # a bad request is refused as data, holding nothing
        bad = list(
            stub.PrefillAndGenerate(
                pb.PrefillAndGenerateRequest(request_id="bad", prompt_token_ids=[5000], sampling=sampling), timeout=10
            )
        )
        assert [c.WhichOneof("chunk") for c in bad] == ["error"]
        assert bad[0].error.code == pb.ERROR_CODE_INVALID_ARGUMENT and "vocabulary" in bad[0].error.message
    assert_all_free(workers)


def test_killed_worker_migrates_and_a_dead_one_is_skipped(workers, tiny_checkpoint, engine, caplog) -> None:
    extra = start_workers([spec(tiny_checkpoint, "decode-k", "decode")])[0]
    survivor = decode_workers(workers)[0]
    directory = directory_of([survivor, extra])
    directory.update(survivor.spec.worker_id, state="draining")  # the request lands on decode-k
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    killed = threading.Event()

    async def on_delta(n):
        if n >= 5 and not killed.is_set():
            killed.set()
            extra.kill()
            directory.update(survivor.spec.worker_id, state="serving")

    async def go(b):
        out = await collect(b, "victim", PROMPTS[2], params, on_delta)
        # decode-k is dead but still listed, and looks best: a new request skips it (refused before any token)
        directory.update(extra.spec.worker_id, state="serving", blocks_total=10**6)
        after = await collect(b, "after", PROMPTS[1], params)
        return out, after, b.migrations, await b.health()

    try:
        (toks, reason, err, _, _), after, migrations, health = asyncio.run(
            with_backend(ColocatedBackend, directory, go, poll_interval_s=60)
        )
    finally:
        extra.stop()
    assert err is None and reason == "length" and migrations == 1
    assert toks == engine().generate([PROMPTS[2]], params)[0].token_ids
    assert after[2] is None and after[0] == engine().generate([PROMPTS[1]], params)[0].token_ids
    assert "request after: decode-k did not take it (decode-k: UNAVAILABLE)" in caplog.text
    assert health["status"] == "ok" and health["mode"] == "colocated"
    assert_all_free(workers)


def test_first_token_finish_and_the_two_refusals(workers, engine) -> None:
    """max_tokens 1 ends normally with the engine's token; a prompt beyond a worker's whole cache is
    NeverFits (the app's 400), no serving worker is Unavailable (the app's 503); nothing stays held."""
    from splitserve.router.backend import NeverFits, Unavailable
    from splitserve.router.membership import Directory

    one = SamplingParams(temperature=0.0, max_tokens=1)
    toks, reason, err, _, _ = asyncio.run(
        with_backend(
            ColocatedBackend, directory_of(decode_workers(workers)), lambda b: collect(b, "one", PROMPTS[2], one)
        )
    )
    assert err is None and reason in ("length", "stop") and toks == engine().generate([PROMPTS[2]], one)[0].token_ids
    huge = [3 + i % 900 for i in range(ENGINE.num_blocks * ENGINE.block_size + 8)]
    with pytest.raises(NeverFits, match="cache blocks"):
        asyncio.run(
            with_backend(
                ColocatedBackend, directory_of(decode_workers(workers)), lambda b: collect(b, "huge", huge, one)
            )
        )
    with pytest.raises(Unavailable):
        asyncio.run(with_backend(ColocatedBackend, Directory(), lambda b: collect(b, "none", PROMPTS[0], one)))
    assert_all_free(workers)
