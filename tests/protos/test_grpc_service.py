"""A real gRPC server on 127.0.0.1 (ephemeral port) with trivial servicers, called by a real client."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Iterator
from concurrent import futures

import grpc
import pytest

from splitserve.protos import PROTOCOL_VERSION
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(60)
RPC_TIMEOUT_S = 5.0


class FakeDecode(pb_grpc.DecodeWorkerServicer):
    """Health, Stats, Reserve and Generate; everything else stays UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.free_blocks = 4

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(
            state=pb.SERVING_STATE_SERVING,
            kind=pb.WORKER_KIND_DECODE,
            worker_id="decode-0",
            incarnation=1,
            protocol_version=PROTOCOL_VERSION,
        )

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        return pb.StatsReply(
            kind=pb.WORKER_KIND_DECODE,
            worker_id="decode-0",
            blocks_used=4 - self.free_blocks,
            blocks_total=4,
            running=0,
            waiting=0,
            requests_done=0,
            pid=os.getpid(),
            node="127.0.0.1",
        )

    def Reserve(self, request: pb.ReserveRequest, context: grpc.ServicerContext) -> pb.ReserveReply:
        need = -(-request.prompt_len // 64)
        if need > self.free_blocks:
            return pb.ReserveReply(refusal=pb.Refusal(reason=pb.REFUSAL_REASON_NO_SPACE, free_blocks=self.free_blocks))
        self.free_blocks -= need
        return pb.ReserveReply(reservation=pb.Reservation(block_ids=list(range(need)), epoch=1, block_size=64))

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateChunk]:
        max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else 16
        for i in range(1, max_tokens):  # the first token came from prefill
            yield pb.GenerateChunk(delta=pb.TokenDelta(token_ids=[request.first_token + i]))
        yield pb.GenerateChunk(
            finished=pb.Finished(
                finish_reason=pb.FINISH_REASON_LENGTH,
                prompt_tokens=len(request.prompt_token_ids),
                completion_tokens=max_tokens,
            )
        )


class FakePrefill(pb_grpc.PrefillWorkerServicer):
    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(state=pb.SERVING_STATE_STARTING, kind=pb.WORKER_KIND_PREFILL, worker_id="prefill-0")

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        return pb.StatsReply(
            kind=pb.WORKER_KIND_PREFILL, worker_id="prefill-0", queued_prefill_tokens=1234, pid=os.getpid()
        )


@pytest.fixture
def server() -> Iterator[str]:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_DecodeWorkerServicer_to_server(FakeDecode(), srv)
    pb_grpc.add_PrefillWorkerServicer_to_server(FakePrefill(), srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    assert port > 0
    srv.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.stop(grace=None).wait(timeout=5)


@pytest.fixture
def channel(server: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server) as ch:
        grpc.channel_ready_future(ch).result(timeout=RPC_TIMEOUT_S)
        yield ch


def test_health_and_stats(channel: grpc.Channel) -> None:
    decode = pb_grpc.DecodeWorkerStub(channel)
    health = decode.Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S)
    assert health.state == pb.SERVING_STATE_SERVING and health.kind == pb.WORKER_KIND_DECODE
    assert health.protocol_version == PROTOCOL_VERSION
    stats = decode.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S)
    assert stats.blocks_total == 4 and stats.pid == os.getpid()

    prefill = pb_grpc.PrefillWorkerStub(channel)
    assert prefill.Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S).kind == pb.WORKER_KIND_PREFILL
    assert prefill.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S).queued_prefill_tokens == 1234


def test_reserve_admits_then_refuses(channel: grpc.Channel) -> None:
    decode = pb_grpc.DecodeWorkerStub(channel)
    first = decode.Reserve(pb.ReserveRequest(request_id="a", prompt_len=130, max_tokens=8), timeout=RPC_TIMEOUT_S)
    assert first.WhichOneof("result") == "reservation" and len(first.reservation.block_ids) == 3
    second = decode.Reserve(pb.ReserveRequest(request_id="b", prompt_len=130, max_tokens=8), timeout=RPC_TIMEOUT_S)
    assert second.WhichOneof("result") == "refusal" and second.refusal.free_blocks == 1


def test_generate_streams_deltas_then_finished(channel: grpc.Channel) -> None:
    decode = pb_grpc.DecodeWorkerStub(channel)
    request = pb.GenerateRequest(
        request_id="a", epoch=1, prompt_token_ids=[1, 2, 3], first_token=100, sampling=pb.SamplingParams(max_tokens=4)
    )
    chunks = list(decode.Generate(request, timeout=RPC_TIMEOUT_S))
    assert [c.WhichOneof("chunk") for c in chunks] == ["delta"] * 3 + ["finished"]
    assert [t for c in chunks[:-1] for t in c.delta.token_ids] == [101, 102, 103]
    assert chunks[-1].finished.completion_tokens == 4 and chunks[-1].finished.prompt_tokens == 3


def test_unimplemented_methods_report_unimplemented(channel: grpc.Channel) -> None:
    decode = pb_grpc.DecodeWorkerStub(channel)
    with pytest.raises(grpc.RpcError) as info:
        decode.Abort(pb.AbortRequest(request_id="a"), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_no_server_fails_fast_with_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.DecodeWorkerStub(ch).Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_asyncio_server_and_client() -> None:
    class AsyncDecode(pb_grpc.DecodeWorkerServicer):
        async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:
            return pb.HealthReply(state=pb.SERVING_STATE_DRAINING, kind=pb.WORKER_KIND_DECODE)

        async def Generate(
            self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[pb.GenerateChunk]:
            yield pb.GenerateChunk(delta=pb.TokenDelta(token_ids=[request.first_token + 1]))
            yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_ABORTED, message=f"{request.request_id}: aborted"))

    async def main() -> None:
        srv = grpc.aio.server()
        pb_grpc.add_DecodeWorkerServicer_to_server(AsyncDecode(), srv)
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.DecodeWorkerStub(ch)
                health = await stub.Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S)
                assert health.state == pb.SERVING_STATE_DRAINING
                kinds = [
                    c.WhichOneof("chunk")
                    async for c in stub.Generate(
                        pb.GenerateRequest(request_id="r", first_token=1), timeout=RPC_TIMEOUT_S
                    )
                ]
                assert kinds == ["delta", "error"]
        finally:
            await srv.stop(grace=None)

    asyncio.run(asyncio.wait_for(main(), timeout=30))
