"""The router's load poller: every poll_interval_s, each worker's Stats (and a decode worker's
transfer metadata, once) into the Directory via `report`.

It reads load; it never decides liveness. A worker that does not answer gets `failures` counted up
(routing ranks it last while it looks gone) and back to 0 when it answers again; whether it is dead,
drained or replaced is the controller's call (deploy/controller.py pings every worker through Ray and
is the only writer of `state`).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from splitserve.protos import worker_pb2 as pb

from .clients import WorkerClients
from .membership import Directory, WorkerInfo

log = logging.getLogger(__name__)


class LoadPoller:
    def __init__(self, directory: Directory, clients: WorkerClients, interval_s: float = 0.5) -> None:
        self.directory, self.clients, self.interval_s = directory, clients, interval_s
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        if self._task is None:
            await self.refresh()
            self._task = asyncio.create_task(self._forever())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("worker poll failed")

    async def refresh(self) -> None:
        workers = [w for w in self.directory.all() if w.state != "starting"]
        await asyncio.gather(*(self._one(w) for w in workers))

    async def _one(self, w: WorkerInfo) -> None:
        try:
            st = await self.clients.of(w).Stats(pb.StatsRequest(), timeout=2.0)
            load: dict[str, object] = dict(
                blocks_used=st.blocks_used,
                blocks_total=st.blocks_total,
                running=st.running,
                waiting=st.waiting,
                requests_done=st.requests_done,
                queued_prefill_tokens=st.queued_prefill_tokens,
                graph_captures=st.graph_captures,
                graph_misses_after_ready=st.graph_misses_after_ready,
                last_seen=time.monotonic(),
                failures=0,
            )
            if w.role == "decode" and not w.transfer_metadata:
                hs = await self.clients.decode(w).Handshake(pb.HandshakeRequest(), timeout=5.0)
                load["transfer_metadata"] = hs.peer.transfer.agent_metadata
            self.directory.report(w.worker_id, **load)
        except grpc.aio.AioRpcError as e:
            if not w.failures:
                log.warning(
                    "worker %s (%s) does not answer its Stats (%s): ranked last until it does",
                    w.worker_id,
                    w.address,
                    e.code().name,
                )
            self.directory.report(w.worker_id, failures=w.failures + 1)
