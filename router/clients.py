"""gRPC clients of the workers: one channel per worker address, stubs on demand, and Abort.

The router's only way to talk to a worker. Channels are created on first use and closed together.
"""

from __future__ import annotations

import logging

import grpc

from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.protos.auth import GrpcTls, aio_channel

from .membership import WorkerInfo

log = logging.getLogger(__name__)

_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


class WorkerClients:
    def __init__(self, cluster_secret: str | None = None, grpc_tls: GrpcTls | None = None) -> None:
        self.cluster_secret, self.grpc_tls = cluster_secret, grpc_tls  # presented on every call to a worker
        self._channels: dict[str, grpc.aio.Channel] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = aio_channel(address, self.cluster_secret, self.grpc_tls, options=_OPTIONS)
        return ch

    def decode(self, w: WorkerInfo) -> pbg.DecodeWorkerStub:
        return pbg.DecodeWorkerStub(self.channel(w.address))

    def prefill(self, w: WorkerInfo) -> pbg.PrefillWorkerStub:
        return pbg.PrefillWorkerStub(self.channel(w.address))

    def of(self, w: WorkerInfo):
        return self.decode(w) if w.role == "decode" else self.prefill(w)

    @staticmethod
    async def abort(stub, request_id: str, epoch: int, reason: str, nothing_written: bool = False) -> None:
        """Tell a worker to drop a request (best effort: a worker that is gone has nothing to free)."""
        try:
            await stub.Abort(
                pb.AbortRequest(request_id=request_id, epoch=epoch, reason=reason, nothing_written=nothing_written),
                timeout=2.0,
            )
        except grpc.aio.AioRpcError as e:
            log.info("request %s: abort (%s) not delivered: %s", request_id, reason, e.code().name)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
