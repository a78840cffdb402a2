"""The router's backends over a cluster of workers: what both modes share.

Reading order: `policy.py` (where a request goes), `clients.py` (gRPC to the workers), `poller.py`
(their load; liveness is the controller's), `relay.py` (a worker's token stream as deltas), then the
two drivers: `disagg.py` (`DisaggBackend`: reserve on a decode worker, prefill on a prefill worker,
stream from the decode worker) and `colocated.py` (`ColocatedBackend`: a decode worker that prefills
too). This module holds their common base: options, start/close, the migration loop of `generate`
(a decode worker lost mid-stream costs a migration, not the request), health and metrics.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

from splitserve.engine.sampling_params import SamplingParams
from splitserve.protos.auth import GrpcTls

from .backend import GenerationDelta, Unavailable
from .clients import WorkerClients
from .membership import Directory
from .metrics import metric_key
from .policy import InFlight, RoutingPolicy
from .poller import LoadPoller
from .relay import DecodeLost
from .stage_metrics import StageMetrics

log = logging.getLogger(__name__)

__all__ = ["ClusterBackend", "ColocatedBackend", "DecodeLost", "DisaggBackend", "NoCapacity"]


class NoCapacity(Unavailable):
    """No decode worker could take the request within the reserve timeout."""


class ClusterBackend:
    mode = ""

    def __init__(
        self,
        directory: Directory,
        *,
        policy: str = "least_loaded",
        reserve_timeout_s: float = 10.0,
        first_token_timeout_s: float = 120.0,
        idle_stream_timeout_s: float = 30.0,
        lease_s: float = 30.0,
        poll_interval_s: float = 0.5,
        prefill_attempts: int = 2,
        max_migrations: int = 2,
        cluster_secret: str | None = None,
        grpc_tls: GrpcTls | None = None,
    ) -> None:
        self.directory = directory
        self.policy = RoutingPolicy(policy)
        self.reserve_timeout_s = reserve_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.idle_stream_timeout_s = idle_stream_timeout_s
        self.lease_s = lease_s
        self.prefill_attempts = prefill_attempts
        self.max_migrations = max_migrations
        self.clients = WorkerClients(cluster_secret, grpc_tls)  # the secret goes with every call to a worker
        self.poller = LoadPoller(directory, self.clients, poll_interval_s)
        self.inflight = InFlight()
        self.migrations = 0
        self.stages = StageMetrics()  # per-stage histograms of each request (router/stage_metrics.py)
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0
        self.prefill_retries = 0
        self.reserve_refusals = 0

    def collectors(self) -> list:
        """Prometheus collectors the router's registry adds (the per-stage histograms)."""
        return [self.stages]

    async def start(self) -> None:
        await self.poller.start()

    async def refresh(self) -> None:
        await self.poller.refresh()

    async def close(self) -> None:
        self.poller.stop()
        await self.clients.close()

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationDelta]:
        """The request's deltas. A decode worker lost mid-stream (killed, unreachable, silent) costs a
        migration, not the request: the prompt plus the tokens generated so far are prefilled again
        for another decode worker, which continues (at most max_migrations times). Seeded sampling
        after a migration is reproducible but not identical to an uninterrupted run."""
        produced: list[int] = []
        avoid: set[str] = set()
        for segment in range(self.max_migrations + 1):
            seg_id = request_id if segment == 0 else f"{request_id}~m{segment}"
            seg_params = (
                params
                if not produced
                else replace(params, max_tokens=params.max_tokens - len(produced), prompt_logprobs=None)
            )
            try:
                async for delta in self._segment(seg_id, prompt_token_ids + produced, seg_params, avoid):
                    produced += delta.token_ids
                    yield delta
                return
            except DecodeLost as lost:
                avoid.add(lost.worker_id)
                self.migrations += 1
                log.warning(
                    "request %s: decode worker %s lost after %d tokens (%s)%s",
                    request_id,
                    lost.worker_id,
                    len(produced),
                    lost.reason,
                    "; migrating" if segment < self.max_migrations else "; giving up",
                )
                if segment == self.max_migrations:
                    yield GenerationDelta([], finish_reason="abort", error=f"decode worker lost: {lost.reason}")
                    return

    def _segment(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, avoid: set[str]
    ) -> AsyncIterator[GenerationDelta]:
        raise NotImplementedError

    def _serving(self) -> dict[str, int]:
        return {r: len(self.directory.serving(r)) for r in ("prefill", "decode")}

    async def health(self) -> dict:
        serving = self._serving()
        ok = serving["decode"] > 0 and (self.mode == "colocated" or serving["prefill"] > 0)
        counts = {"decode": serving["decode"]} if self.mode == "colocated" else serving
        return {
            "status": "ok" if ok else "unavailable",
            "mode": self.mode,
            "workers": {w.worker_id: w.state for w in self.directory.all()},
            **counts,
        }

    def metrics(self) -> Mapping[str, float]:
        out: dict[str, float] = {
            "transfer_bytes_total": float(self.transfer_bytes),
            "transfer_seconds_total": self.transfer_seconds,
            "prefill_retries_total": float(self.prefill_retries),
            "reserve_refusals_total": float(self.reserve_refusals),
            "decode_migrations_total": float(self.migrations),
        }
        roles: dict[str, str] = {}
        for w in self.directory.all():
            roles[w.worker_id] = w.role
            out[metric_key("worker_blocks_used", worker=w.worker_id, role=w.role)] = float(w.blocks_used)
            out[metric_key("worker_running", worker=w.worker_id, role=w.role)] = float(w.running)
            out[metric_key("worker_queue_depth", worker=w.worker_id, role=w.role)] = float(w.waiting)
            out[metric_key("worker_graph_captures", worker=w.worker_id, role=w.role)] = float(w.graph_captures)
            out[metric_key("worker_graph_misses_after_ready", worker=w.worker_id, role=w.role)] = float(
                w.graph_misses_after_ready
            )
        for wid, n in self.inflight.requests.items():
            out[metric_key("worker_router_in_flight", worker=wid, role=roles.get(wid, ""))] = float(n)
        return out


from .colocated import ColocatedBackend  # noqa: E402 - the drivers build on the base above
from .disagg import DisaggBackend  # noqa: E402
