"""Faults injected into a real cluster (worker processes, real gRPC, TCP transfer): every request
ends (no hang), every live worker returns to blocks_used == 0, the next requests succeed."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.runtime import WorkerSpec
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import load
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.router.cluster_backend import DisaggBackend

from .harness import WorkerProc, directory_of, start_workers, started_backend, wait_for

pytestmark = pytest.mark.timeout(300)

# 256 blocks: a killed prefill worker's half-written reservation (76 blocks) stays quarantined
# while the retry reserves again on the same decode worker.
ENGINE = EngineConfig(num_blocks=256, block_size=8, chunk_size=16, max_batch_tokens=64)
SLOW_PREFILL = EngineConfig(num_blocks=256, block_size=8, chunk_size=4, max_batch_tokens=4)


def spec(ckpt, wid: str, role: str, engine: EngineConfig = ENGINE) -> WorkerSpec:
    return WorkerSpec(
        wid,
        role,
        str(ckpt),
        engine,
        transfer_backend="tcp",
        transfer_timeout_s=3.0,
        first_token_timeout_s=8.0,
        reserve_lease_s=5.0,
    )


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    workers = start_workers(
        [spec(tiny_checkpoint, "prefill-0", "prefill"), spec(tiny_checkpoint, "decode-0", "decode")]
    )
    yield workers
    for w in workers:
        w.stop()


def stats(w: WorkerProc) -> pb.StatsReply:
    ch = grpc.insecure_channel(w.info["address"])
    try:
        stub = pbg.DecodeWorkerStub(ch) if w.spec.role == "decode" else pbg.PrefillWorkerStub(ch)
        return stub.Stats(pb.StatsRequest(), timeout=5)
    finally:
        ch.close()


def assert_all_free(workers: list[WorkerProc], timeout_s: float = 30.0) -> None:
    for w in workers:
        if w.proc.is_alive():
            wait_for(lambda: stats(w).blocks_used == 0, timeout_s, f"{w.spec.worker_id} to free every block")


def reference(ckpt, prompt: list[int], params: SamplingParams) -> list[int]:
    return Engine(load(ckpt), ENGINE).generate([prompt], params)[0].token_ids


async def run(
    backend: DisaggBackend, rid: str, prompt: list[int], params: SamplingParams, on_delta=None
) -> tuple[list[int], str | None, str | None]:
    toks: list[int] = []
    reason = err = None
    async for d in backend.generate(rid, prompt, params):
        toks += d.token_ids
        if on_delta is not None:
            await on_delta(len(toks))
        reason, err = d.finish_reason or reason, d.error or err
    return toks, reason, err


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
PROMPT = list(range(3, 40))


def test_requests_succeed_and_free_everything(cluster, tiny_checkpoint) -> None:
    async def go():
        async with started_backend(directory_of(cluster)) as b:
            outs = await asyncio.gather(*(run(b, f"ok-{i}", PROMPT[: 10 + i], GREEDY) for i in range(6)))
        return outs

    outs = asyncio.run(go())
    for i, (toks, reason, err) in enumerate(outs):
        assert err is None and reason == "length"
        assert toks == reference(tiny_checkpoint, PROMPT[: 10 + i], GREEDY)
    assert_all_free(cluster)


def test_client_disconnect_frees_both_sides(cluster) -> None:
    async def go():
        async with started_backend(directory_of(cluster)) as b:
            gen = b.generate("gone-1", PROMPT, SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True))
            n = 0
            async for d in gen:
                n += len(d.token_ids)
                if n >= 3:
                    break
            await gen.aclose()

    asyncio.run(go())
    assert_all_free(cluster, 10)


def test_abort_before_the_cache_arrives_is_released_without_waiting_out_the_quarantine(cluster) -> None:
    d, p = cluster[1], cluster[0]
    dch, pch = grpc.insecure_channel(d.info["address"]), grpc.insecure_channel(p.info["address"])
    try:
        ds, ps = pbg.DecodeWorkerStub(dch), pbg.PrefillWorkerStub(pch)
        res = ds.Reserve(pb.ReserveRequest(request_id="early", prompt_len=30, max_tokens=4), timeout=5).reservation
        assert stats(d).blocks_used == len(res.block_ids) > 0
        ps.Abort(pb.AbortRequest(request_id="early"), timeout=5)  # router's abort reaches P first...
        ds.Abort(pb.AbortRequest(request_id="early", epoch=res.epoch, nothing_written=True), timeout=5)
        assert stats(d).blocks_used == 0
        # ...and the Prefill that was still on its way is refused, writing nothing
        hs = ds.Handshake(pb.HandshakeRequest(), timeout=5)
        rep = ps.Prefill(
            pb.PrefillRequest(
                request_id="early",
                prompt_token_ids=PROMPT[:30],
                destination=pb.Destination(
                    decode_worker_id="decode-0",
                    agent_name=res.agent_name,
                    block_ids=res.block_ids,
                    epoch=res.epoch,
                    peer_metadata=hs.peer.transfer.agent_metadata,
                ),
            ),
            timeout=10,
        )
        assert rep.HasField("error") and "aborted" in rep.error.message
        # an abandoned reservation with no word from the prefill side stays quarantined (not reused)
        res2 = ds.Reserve(pb.ReserveRequest(request_id="late", prompt_len=30, max_tokens=4), timeout=5).reservation
        ds.Abort(pb.AbortRequest(request_id="late", epoch=res2.epoch), timeout=5)
        assert stats(d).blocks_used == len(res2.block_ids)
        assert stats(d).blocks_reserved == len(res2.block_ids)
    finally:
        dch.close()
        pch.close()
    assert_all_free(cluster, 30)  # quarantine_s = 8 + 3 + 5 s


def test_decode_worker_killed_mid_stream_migrates(cluster, tiny_checkpoint) -> None:
    extra = start_workers([spec(tiny_checkpoint, "decode-k", "decode")])[0]
    directory = directory_of(cluster + [extra])
    directory.update("decode-0", state="draining")  # the request lands on decode-k
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def on_delta(n):
        if n >= 5 and extra.proc.is_alive():
            extra.kill()
            directory.update("decode-0", state="serving")

    async def go():
        async with started_backend(directory) as b:
            t0 = time.monotonic()
            out = await run(b, "victim", PROMPT, params, on_delta)
            return out, time.monotonic() - t0, b.migrations

    (toks, reason, err), took, migrations = asyncio.run(go())
    assert err is None and reason == "length" and migrations == 1
    assert toks == reference(tiny_checkpoint, PROMPT, params)
    assert took < 30
    assert_all_free(cluster)

    # the next request goes to the live worker and succeeds
    async def after():
        async with started_backend(directory) as b:
            return await run(b, "after-kill", PROMPT, GREEDY)

    toks, reason, err = asyncio.run(after())
    assert err is None and toks == reference(tiny_checkpoint, PROMPT, GREEDY)


def test_prefill_worker_killed_mid_prefill_is_retried(cluster, tiny_checkpoint) -> None:
    slow = start_workers([spec(tiny_checkpoint, "prefill-k", "prefill", SLOW_PREFILL)])[0]
    directory = directory_of(cluster + [slow])
    directory.update("prefill-0", state="draining")
    long_prompt = [3 + (i * 7) % 900 for i in range(600)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def killer():
        wait_for(lambda: stats(slow).queued_prefill_tokens > 0, 30, "the prefill to start", 0.01)
        directory.update("prefill-0", state="serving")
        slow.kill()

    t = threading.Thread(target=killer)
    t.start()

    async def go():
        # poll_interval_s=60: the router learns of the death from the failed call, not from its poller
        async with started_backend(directory, poll_interval_s=60) as b:
            return await run(b, "prefill-victim", long_prompt, params), b.prefill_retries

    (toks, reason, err), retries = asyncio.run(go())
    t.join(30)
    assert err is None and reason == "length" and retries >= 1
    assert toks == reference(tiny_checkpoint, long_prompt, params)
    assert_all_free(cluster, 30)  # decode's first reservation: quarantined, then freed


def test_handshake_mismatch_is_refused_with_a_clear_error(cluster, tiny_checkpoint) -> None:
    odd = start_workers([spec(tiny_checkpoint, "decode-odd", "decode", EngineConfig(num_blocks=64, block_size=16))])[0]
    try:
        directory = directory_of([cluster[0], odd])

        async def go():
            async with started_backend(directory) as b:
                return await run(b, "mismatch", PROMPT, GREEDY)

        toks, reason, err = asyncio.run(go())
        assert reason == "abort" and "block_size" in err and "refused" in err
        wait_for(lambda: stats(odd).blocks_used == 0, 5, "the refused reservation to be freed at once")
    finally:
        odd.stop()
    assert_all_free(cluster)


ROUTER_SCRIPT = """
import asyncio, sys
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.cluster_backend import DisaggBackend
from splitserve.router.membership import Directory, WorkerInfo
d = Directory()
for wid, role, addr in (("prefill-0", "prefill", sys.argv[1]), ("decode-0", "decode", sys.argv[2])):
    d.add(WorkerInfo(wid, role, addr))
async def main():
    b = DisaggBackend(d)
    await b.start()
    async for delta in b.generate("orphan", list(range(3, 40)), SamplingParams(temperature=0.0, max_tokens=100000,
                                                                             ignore_eos=True)):
        if delta.token_ids:
            print("token", flush=True)
asyncio.run(main())
"""


def test_router_killed_mid_stream_frees_both_sides(cluster) -> None:
    """A router process that dies (SIGKILL) with a request streaming: the workers notice nobody listens
    (the gRPC stream is cancelled), abort the request and free its blocks."""
    import subprocess
    import sys

    p, d = cluster
    proc = subprocess.Popen(
        [sys.executable, "-c", ROUTER_SCRIPT, p.info["address"], d.info["address"]], stdout=subprocess.PIPE, text=True
    )
    try:
        for _ in range(5):  # the request is streaming
            assert proc.stdout.readline().strip() == "token"
        assert stats(d).blocks_used > 0
        proc.kill()
    finally:
        proc.kill()
        proc.wait(10)
    assert_all_free(cluster, 10)


def test_decode_worker_killed_during_the_transfer_frees_the_prefill_side(cluster, tiny_checkpoint) -> None:
    """The decode worker dies while the prefill worker streams a long prompt's cache to it: the prefill
    side's writes fail, it frees the request's blocks, and the router retries on a live decode worker."""
    extra = start_workers([spec(tiny_checkpoint, "decode-k2", "decode")])[0]
    slow = start_workers([spec(tiny_checkpoint, "prefill-s", "prefill", SLOW_PREFILL)])[0]
    directory = directory_of([slow, cluster[1], extra])
    directory.update("decode-0", state="draining")
    long_prompt = [3 + (i * 11) % 900 for i in range(600)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def killer():
        wait_for(lambda: stats(slow).running > 0 and stats(extra).blocks_used > 0, 30, "the transfer to start", 0.01)
        time.sleep(0.3)  # some blocks are on their way
        directory.update("decode-0", state="serving")
        extra.kill()

    t = threading.Thread(target=killer)
    t.start()
    try:

        async def go():
            async with started_backend(directory) as b:
                return await run(b, "transfer-victim", long_prompt, params), b.prefill_retries

        (toks, reason, err), retries = asyncio.run(go())
        t.join(30)
        assert err is None and reason == "length" and retries >= 1
        assert toks == reference(tiny_checkpoint, long_prompt, params)
        wait_for(lambda: stats(slow).blocks_used == 0, 10, "the prefill side to free the dead peer's request")
    finally:
        slow.stop()
        extra.stop()
    assert_all_free(cluster, 30)
