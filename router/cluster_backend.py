"""The router's backend over the disaggregated cluster (a request's path, DESIGN.md):

1. pick a decode worker D (most free blocks, fewest running) and Reserve there; a refusal moves on
   to the next D; when every D refuses, retry until reserve_timeout_s, then fail (the app answers
   503 with Retry-After): prefill never runs for a request that has nowhere to decode;
2. pick a prefill worker P (policy: least queued prefill tokens, or prefix affinity: the same
   prompt prefix goes to the same P so its prefix cache hits) and call Prefill with D's blocks as
   the destination; P returns the first token once D's cache is complete. A P that fails before
   answering is retried on another P (bounded), on a fresh reservation;
3. stream D's tokens (Generate); the first token from P is yielded before that stream opens;
4. whatever ends the request early (client gone, stop string, error, timeout) sends Abort to D
   and P, so every block on both sides is freed.

Membership comes from the `Directory` (kept by the deploy layer); a poller refreshes each worker's
load and liveness over gRPC Stats and fetches decode workers' transfer metadata (Handshake).

`ColocatedBackend` is the same router over a cluster without a prefill pool (`router.mode: colocated`):
each request runs whole on one decode worker (PrefillAndGenerate), whose engine prefills the prompt in
chunks batched with its running decodes; polling, aborts and migration are shared.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

import grpc

from splitserve.engine.sampling_params import SamplingParams
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.protos.convert import sampling_params_to_proto
from splitserve.protos.tensors import logprobs_from_proto

from .backend import GenerationDelta
from .membership import Directory, WorkerInfo
from .stage_metrics import StageClock, StageMetrics

log = logging.getLogger(__name__)

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}
# prefill errors answered before a single block was written to the destination
_BEFORE_ANY_WRITE = {pb.ERROR_CODE_INCOMPATIBLE, pb.ERROR_CODE_INVALID_ARGUMENT, pb.ERROR_CODE_UNAVAILABLE}
_RETRYABLE_PREFILL = {pb.ERROR_CODE_UNAVAILABLE, pb.ERROR_CODE_TRANSFER_FAILED, pb.ERROR_CODE_DEADLINE_EXCEEDED}
# stream errors that mean the decode worker lost the request (migrate it), not that the request is bad
_DECODE_LOST = {pb.ERROR_CODE_INTERNAL, pb.ERROR_CODE_NOT_FOUND, pb.ERROR_CODE_DEADLINE_EXCEEDED}


class NoCapacity(RuntimeError):
    """No decode worker could take the request within the reserve timeout."""


class DecodeLost(RuntimeError):
    """The decode worker of a running request is gone or silent."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"{worker_id}: {reason}")
        self.worker_id, self.reason = worker_id, reason


_lp = logprobs_from_proto


def _affinity_ranked(prompt: list[int], workers: list[WorkerInfo]) -> list[WorkerInfo]:
    """Workers in rendezvous-hash order of the prompt's first 64 tokens: the same prefix ranks the
    same worker first (its prefix cache is warm), and only a removed worker's prefixes move."""
    key = hashlib.blake2b(repr(prompt[:64]).encode(), digest_size=8).digest()
    return sorted(workers, key=lambda w: hashlib.blake2b(key + w.worker_id.encode(), digest_size=8).digest())


class DisaggBackend:
    def __init__(self, directory: Directory, *, policy: str = "least_loaded", reserve_timeout_s: float = 10.0,
                 first_token_timeout_s: float = 120.0, idle_stream_timeout_s: float = 30.0,
                 lease_s: float = 30.0, poll_interval_s: float = 0.5, prefill_attempts: int = 2,
                 dead_after_failures: int = 3, max_migrations: int = 2) -> None:
        self.directory = directory
        self.policy = policy
        self.reserve_timeout_s = reserve_timeout_s
        self.first_token_timeout_s = first_token_timeout_s
        self.idle_stream_timeout_s = idle_stream_timeout_s
        self.lease_s = lease_s
        self.poll_interval_s = poll_interval_s
        self.prefill_attempts = prefill_attempts
        self.dead_after_failures = dead_after_failures
        self.max_migrations = max_migrations
        self.migrations = 0
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._poller: asyncio.Task | None = None
        self.stages = StageMetrics()  # per-stage histograms of each request (router/stage_metrics.py)
        self._rr = 0
        self.transfer_bytes = 0
        self.transfer_seconds = 0.0
        self.prefill_retries = 0
        self.reserve_refusals = 0
        # What this router has sent and not yet seen end, per worker: fresher than the polled Stats,
        # so a burst of requests spreads over the workers instead of piling onto the one the last poll
        # showed least loaded.
        self._inflight: dict[str, int] = {}         # decode worker -> requests reserving, reserved or streaming
        self._pending_prompt: dict[str, int] = {}   # worker -> prompt tokens sent, first token not back yet

    @staticmethod
    def _count(table: dict[str, int], worker_id: str, n: int) -> None:
        """Add n to a worker's count; zero counts are dropped (no stale entries for workers that go)."""
        left = table.get(worker_id, 0) + n
        if left:
            table[worker_id] = left
        else:
            table.pop(worker_id, None)

    # ---- plumbing -----------------------------------------------------------------------------
    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20),
                                                             ("grpc.max_send_message_length", 256 << 20)])
            self._channels[address] = ch
        return ch

    def _decode(self, w: WorkerInfo) -> pbg.DecodeWorkerStub:
        return pbg.DecodeWorkerStub(self._channel(w.address))

    def _prefill(self, w: WorkerInfo) -> pbg.PrefillWorkerStub:
        return pbg.PrefillWorkerStub(self._channel(w.address))

    async def start(self) -> None:
        if self._poller is None:
            await self.refresh()
            self._poller = asyncio.create_task(self._poll_forever())

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the poller must survive anything
                log.exception("worker poll failed")

    async def refresh(self) -> None:
        """Refresh every worker's load; fetch missing transfer metadata; count failures."""
        async def one(w: WorkerInfo) -> None:
            stub = self._decode(w) if w.role == "decode" else self._prefill(w)
            try:
                st = await stub.Stats(pb.StatsRequest(), timeout=2.0)
                changes: dict[str, object] = dict(
                    blocks_used=st.blocks_used, blocks_total=st.blocks_total, running=st.running, waiting=st.waiting,
                    requests_done=st.requests_done, queued_prefill_tokens=st.queued_prefill_tokens,
                    graph_captures=st.graph_captures, graph_misses_after_ready=st.graph_misses_after_ready,
                    last_seen=time.monotonic(), failures=0)
                if w.role == "decode" and not w.transfer_metadata:
                    hs = await self._decode(w).Handshake(pb.HandshakeRequest(), timeout=5.0)
                    changes["transfer_metadata"] = hs.peer.transfer.agent_metadata
                if w.state == "dead":
                    changes["state"] = "serving"
                self.directory.update(w.worker_id, **changes)
            except grpc.aio.AioRpcError as e:
                n = w.failures + 1
                state = "dead" if n >= self.dead_after_failures and w.state != "draining" else w.state
                if state == "dead" and w.state != "dead":
                    log.warning("worker %s (%s) unreachable %d times: marked dead (%s)", w.worker_id, w.address,
                                n, e.code().name)
                self.directory.update(w.worker_id, failures=n, state=state)
        workers = [w for w in self.directory.all() if w.state != "starting"]
        await asyncio.gather(*(one(w) for w in workers))

    # ---- routing ------------------------------------------------------------------------------
    def _decode_order(self) -> list[WorkerInfo]:
        ds = [w for w in self.directory.serving("decode") if w.transfer_metadata]
        return sorted(ds, key=lambda w: (self._inflight.get(w.worker_id, 0), -w.free_blocks, w.running + w.waiting,
                                         w.worker_id))

    def _prefill_order(self, prompt: list[int]) -> list[WorkerInfo]:
        ps = self.directory.serving("prefill")
        if not ps:
            return []
        def queued(w: WorkerInfo) -> int:
            return self._pending_prompt.get(w.worker_id, 0) + w.queued_prefill_tokens
        by_load = sorted(ps, key=lambda w: (self._pending_prompt.get(w.worker_id, 0),
                                            w.queued_prefill_tokens + w.running, w.worker_id))
        if self.policy == "round_robin":
            self._rr += 1
            k = self._rr % len(ps)
            ps = sorted(ps, key=lambda w: w.worker_id)
            return ps[k:] + ps[:k]
        if self.policy == "prefix_affinity":
            home = _affinity_ranked(prompt, ps)[0]
            least = by_load[0]
            # stay with the prefix's home worker unless it is far busier than the least loaded one
            if queued(home) <= queued(least) + 4 * max(64, len(prompt)):
                return [home] + [w for w in by_load if w is not home]
        return by_load

    def collectors(self) -> list:
        """Prometheus collectors the router's registry adds (the per-stage histograms)."""
        return [self.stages]

    async def _reserve(self, request_id: str, prompt_len: int, max_tokens: int,
                       avoid: set[str] = frozenset(), clock: StageClock | None = None
                       ) -> tuple[WorkerInfo, pb.Reservation]:
        deadline = time.monotonic() + self.reserve_timeout_s
        delay = 0.01
        last = "no decode worker is serving"
        while True:
            for d in [w for w in self._decode_order() if w.worker_id not in avoid] or self._decode_order():
                # counted before the call: requests arriving together see each other's choice
                self._count(self._inflight, d.worker_id, 1)
                if clock is not None:
                    clock.mark("reserve_start")
                try:
                    rep = await self._decode(d).Reserve(pb.ReserveRequest(
                        request_id=request_id, prompt_len=prompt_len, max_tokens=max_tokens,
                        lease_ms=int(self.lease_s * 1000)), timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                except BaseException as e:
                    self._count(self._inflight, d.worker_id, -1)
                    if not isinstance(e, grpc.aio.AioRpcError):
                        raise
                    last = f"{d.worker_id}: {e.code().name}"
                    continue
                if rep.HasField("reservation"):
                    if clock is not None:
                        clock.mark("reserve_end")
                    return d, rep.reservation  # its in-flight count now belongs to the caller
                self._count(self._inflight, d.worker_id, -1)
                self.reserve_refusals += 1
                last = f"{d.worker_id}: {pb.RefusalReason.Name(rep.refusal.reason)} {rep.refusal.message}"
                if rep.refusal.reason == pb.REFUSAL_REASON_TOO_LONG:
                    raise NoCapacity(f"prompt of {prompt_len} tokens does not fit a decode worker's cache")
            if time.monotonic() + delay > deadline:
                raise NoCapacity(f"no decode worker could take the request within {self.reserve_timeout_s:.0f} s ({last})")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _abort(self, stub, request_id: str, epoch: int, reason: str, nothing_written: bool = False) -> None:
        try:
            await stub.Abort(pb.AbortRequest(request_id=request_id, epoch=epoch, reason=reason,
                                             nothing_written=nothing_written), timeout=2.0)
        except grpc.aio.AioRpcError as e:
            log.info("request %s: abort (%s) not delivered: %s", request_id, reason, e.code().name)

    # ---- the request ----------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[GenerationDelta]:
        """The request's deltas. A decode worker lost mid-stream (killed, unreachable, silent) costs a
        migration, not the request: the prompt plus the tokens generated so far are prefilled again
        for another decode worker, which continues (at most max_migrations times). Seeded sampling
        after a migration is reproducible but not identical to an uninterrupted run."""
        produced: list[int] = []
        avoid: set[str] = set()
        for segment in range(self.max_migrations + 1):
            seg_id = request_id if segment == 0 else f"{request_id}~m{segment}"
            seg_params = params if not produced else replace(
                params, max_tokens=params.max_tokens - len(produced), prompt_logprobs=None)
            try:
                async for delta in self._segment(seg_id, prompt_token_ids + produced, seg_params, avoid):
                    produced += delta.token_ids
                    yield delta
                return
            except DecodeLost as lost:
                avoid.add(lost.worker_id)
                self.migrations += 1
                log.warning("request %s: decode worker %s lost after %d tokens (%s)%s", request_id, lost.worker_id,
                            len(produced), lost.reason,
                            "; migrating" if segment < self.max_migrations else "; giving up")
                if segment == self.max_migrations:
                    yield GenerationDelta([], finish_reason="abort", error=f"decode worker lost: {lost.reason}")
                    return

    async def _segment(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       avoid: set[str]) -> AsyncIterator[GenerationDelta]:
        sampling = sampling_params_to_proto(params)
        d_stub = p_stub = None
        d_id = held = ""
        epoch = 0
        finished = False
        clock = StageClock()
        try:
            result: pb.PrefillResult | None = None
            error = "no prefill worker is serving"
            failed_p: set[str] = set()
            for _attempt in range(self.prefill_attempts):
                d, res = await self._reserve(request_id, len(prompt_token_ids), params.max_tokens, avoid, clock)
                d_stub, d_id, epoch = self._decode(d), d.worker_id, res.epoch
                if held:  # an earlier attempt's reservation (aborted)
                    self._count(self._inflight, held, -1)
                held = d.worker_id  # _reserve counted it
                order = [w for w in self._prefill_order(prompt_token_ids) if w.worker_id not in failed_p]
                if not order:
                    await self._abort(d_stub, request_id, epoch, "no prefill worker", nothing_written=True)
                    d_stub = None
                    break
                p = order[0]
                p_stub = self._prefill(p)
                dest = pb.Destination(decode_worker_id=d.worker_id, decode_address=d.address, agent_name=res.agent_name,
                                      block_ids=res.block_ids, epoch=res.epoch, peer_metadata=d.transfer_metadata)
                self._count(self._pending_prompt, p.worker_id, len(prompt_token_ids))
                try:
                    clock.mark("prefill_start")
                    rep = await p_stub.Prefill(pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                                                 sampling=sampling, destination=dest),
                                               timeout=self.first_token_timeout_s)
                    clock.mark("prefill_end")
                except grpc.aio.AioRpcError as e:
                    error = f"prefill worker {p.worker_id}: {e.code().name} {e.details() or ''}".strip()
                    await self._abort(d_stub, request_id, epoch, "prefill failed")
                    await self._abort(p_stub, request_id, 0, "prefill failed")
                    d_stub = p_stub = None
                    failed_p.add(p.worker_id)
                    self.prefill_retries += 1
                    continue
                finally:
                    self._count(self._pending_prompt, p.worker_id, -len(prompt_token_ids))
                if rep.HasField("prefill"):
                    result = rep.prefill
                    break
                error = f"prefill worker {p.worker_id}: {rep.error.message}"
                await self._abort(d_stub, request_id, epoch, "prefill failed",
                                  nothing_written=rep.error.code in _BEFORE_ANY_WRITE)
                d_stub = None
                if rep.error.code == pb.ERROR_CODE_TRANSFER_FAILED:
                    avoid.add(d.worker_id)  # the destination failed, not the prefill worker
                else:
                    failed_p.add(p.worker_id)
                if rep.error.code not in _RETRYABLE_PREFILL:
                    break
                self.prefill_retries += 1
            if result is None:
                finished = True
                yield GenerationDelta([], finish_reason="abort", error=error)
                return
            self.transfer_bytes += result.transfer_bytes
            self.transfer_seconds += result.transfer_seconds
            first = GenerationDelta([result.first_token])
            if result.HasField("first_token_logprobs") and params.logprobs is not None:
                first.logprobs = [_lp(result.first_token_logprobs)]
            if params.prompt_logprobs is not None:
                first.prompt_logprobs = [None] + [_lp(x) for x in result.prompt_logprobs]
            self.stages.observe_first_token(clock, result.queue_seconds, result.prefill_seconds,
                                            result.transfer_seconds)
            yield first

            assert d_stub is not None
            clock.mark("generate_start")
            call = d_stub.Generate(pb.GenerateRequest(
                request_id=request_id, epoch=epoch, prompt_token_ids=prompt_token_ids, sampling=sampling,
                first_token=result.first_token,
                first_token_logprobs=result.first_token_logprobs if result.HasField("first_token_logprobs") else None,
                mtp_hidden=result.mtp_hidden if result.HasField("mtp_hidden") else None,
                generator_state=result.generator_state))
            it = call.__aiter__()
            while True:
                try:
                    chunk = await asyncio.wait_for(it.__anext__(), self.idle_stream_timeout_s)
                except StopAsyncIteration:
                    raise DecodeLost(d_id, "stream ended without finishing") from None
                except asyncio.TimeoutError:
                    raise DecodeLost(d_id, f"no token for {self.idle_stream_timeout_s:.0f} s") from None
                except grpc.aio.AioRpcError as e:
                    finished = e.code() != grpc.StatusCode.DEADLINE_EXCEEDED  # gone: nothing to abort there
                    raise DecodeLost(d_id, f"{e.code().name} {e.details() or ''}".strip()) from None
                kind = chunk.WhichOneof("chunk")
                if kind == "delta":
                    if "first_decode" not in clock.marks:
                        self.stages.observe_first_decode(clock)
                    delta = GenerationDelta(list(chunk.delta.token_ids))
                    if params.logprobs is not None and chunk.delta.logprobs:
                        delta.logprobs = [_lp(x) for x in chunk.delta.logprobs]
                    yield delta
                elif kind == "finished":
                    finished = True
                    self.stages.observe_end(clock)
                    yield GenerationDelta([], finish_reason=_FINISH.get(chunk.finished.finish_reason, "abort"))
                    return
                elif chunk.error.code in _DECODE_LOST:
                    raise DecodeLost(d_id, chunk.error.message)
                else:
                    finished = True
                    yield GenerationDelta([], finish_reason="abort", error=f"decode worker: {chunk.error.message}")
                    return
        finally:
            if held:
                self._count(self._inflight, held, -1)
            if not finished:
                aborts = []
                if d_stub is not None:
                    aborts.append(self._abort(d_stub, request_id, epoch, "request ended early"))
                if p_stub is not None:
                    aborts.append(self._abort(p_stub, request_id, 0, "request ended early"))
                if aborts:
                    # shielded: the caller may be cancelled, the workers must still hear of it
                    await asyncio.shield(asyncio.gather(*aborts, return_exceptions=True))

    async def health(self) -> dict:
        ws = self.directory.all()
        serving = {r: sum(1 for w in ws if w.role == r and w.state == "serving") for r in ("prefill", "decode")}
        ok = serving["prefill"] > 0 and serving["decode"] > 0
        return {"status": "ok" if ok else "unavailable", "mode": "disaggregated",
                "workers": {w.worker_id: w.state for w in ws}, **serving}

    def metrics(self) -> Mapping[str, float]:
        out: dict[str, float] = {"transfer_bytes_total": float(self.transfer_bytes),
                                 "transfer_seconds_total": self.transfer_seconds,
                                 "prefill_retries_total": float(self.prefill_retries),
                                 "reserve_refusals_total": float(self.reserve_refusals),
                                 "decode_migrations_total": float(self.migrations)}
        for w in self.directory.all():
            out[f"worker_blocks_used:{w.worker_id}"] = float(w.blocks_used)
            out[f"worker_running:{w.worker_id}"] = float(w.running)
            out[f"worker_queue_depth:{w.worker_id}"] = float(w.waiting)
            out[f"worker_graph_captures:{w.worker_id}"] = float(w.graph_captures)
            out[f"worker_graph_misses_after_ready:{w.worker_id}"] = float(w.graph_misses_after_ready)
        for wid, n in self._inflight.items():
            out[f"worker_router_in_flight:{wid}"] = float(n)
        return out


class ColocatedBackend(DisaggBackend):
    """The router's backend over decode workers that also prefill (`router.mode: colocated`, no prefill pool).

    A segment of a request (see `DisaggBackend.generate`: a lost worker costs a migration, not the request):

    1. pick a decode worker by policy: least_loaded (fewest requests this router has in flight there, then
       fewest of their prompt tokens still waiting for a first token, then most free blocks), round_robin,
       or prefix_affinity (the prompt prefix's home worker, unless its pending prompt tokens exceed the least
       loaded one's by more than 4 prompts' worth). The router's own in-flight counts steer a burst of
       requests at once, which the 0.5 s poll of worker Stats cannot;
    2. PrefillAndGenerate there: the worker's engine queues the prompt, prefills it in chunks batched with
       its running decodes and streams every token. A worker that is draining or unreachable before the
       first token is skipped for the next one;
    3. the first token must come within first_token_timeout_s (queueing and prefill included; past it the
       request fails), each later one within idle_stream_timeout_s (past it the worker counts as lost);
    4. whatever ends the request early (client gone, stop string, error, timeout) cancels the stream and
       sends Abort, so the worker aborts the request in its engine and frees its blocks.
    """

    def _replica_order(self, prompt: list[int]) -> list[WorkerInfo]:
        ws = self.directory.serving("decode")
        if not ws:
            return []

        def pending(w: WorkerInfo) -> int:
            return self._pending_prompt.get(w.worker_id, 0)
        by_load = sorted(ws, key=lambda w: (self._inflight.get(w.worker_id, 0), pending(w), -w.free_blocks,
                                            w.worker_id))
        if self.policy == "round_robin":
            self._rr += 1
            k = self._rr % len(ws)
            return ws[k:] + ws[:k]  # Directory.serving is sorted by worker id
        if self.policy == "prefix_affinity":
            home = _affinity_ranked(prompt, ws)[0]
            if pending(home) <= pending(by_load[0]) + 4 * max(64, len(prompt)):
                return [home] + [w for w in by_load if w is not home]
        return by_load

    async def _segment(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       avoid: set[str]) -> AsyncIterator[GenerationDelta]:
        request = pb.PrefillAndGenerateRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                               sampling=sampling_params_to_proto(params))
        n_prompt = len(prompt_token_ids)
        tried: set[str] = set()
        error = "no decode worker is serving"
        while True:
            order = [w for w in self._replica_order(prompt_token_ids) if w.worker_id not in tried]
            order = [w for w in order if w.worker_id not in avoid] or order
            if not order:
                yield GenerationDelta([], finish_reason="abort", error=error)
                return
            w = order[0]
            wid = w.worker_id
            tried.add(wid)
            stub = self._decode(w)
            self._count(self._inflight, wid, 1)
            self._count(self._pending_prompt, wid, n_prompt)
            call = None
            got_first = finished = next_worker = False
            try:
                call = stub.PrefillAndGenerate(request)
                it = call.__aiter__()
                while True:
                    timeout = self.idle_stream_timeout_s if got_first else self.first_token_timeout_s
                    try:
                        chunk = await asyncio.wait_for(it.__anext__(), timeout)
                    except StopAsyncIteration:
                        raise DecodeLost(wid, "stream ended without finishing") from None
                    except asyncio.TimeoutError:
                        if got_first:
                            raise DecodeLost(wid, f"no token for {self.idle_stream_timeout_s:.0f} s") from None
                        yield GenerationDelta([], finish_reason="abort",
                                              error=f"{wid}: no first token within {self.first_token_timeout_s:.0f} s")
                        return
                    except grpc.aio.AioRpcError as e:
                        if e.code() == grpc.StatusCode.UNAVAILABLE and not got_first:
                            error = f"{wid}: {e.code().name}"
                            finished = next_worker = True  # it never took the request
                            break
                        finished = e.code() != grpc.StatusCode.DEADLINE_EXCEEDED  # gone: nothing to abort there
                        raise DecodeLost(wid, f"{e.code().name} {e.details() or ''}".strip()) from None
                    kind = chunk.WhichOneof("chunk")
                    if kind == "delta":
                        delta = GenerationDelta(list(chunk.delta.token_ids))
                        if params.logprobs is not None and chunk.delta.logprobs:
                            delta.logprobs = [_lp(x) for x in chunk.delta.logprobs]
                        if not got_first:
                            got_first = True
                            self._count(self._pending_prompt, wid, -n_prompt)
                            if params.prompt_logprobs is not None:
                                delta.prompt_logprobs = [None] + [_lp(x) for x in chunk.delta.prompt_logprobs]
                        yield delta
                    elif kind == "finished":
                        finished = True
                        yield GenerationDelta([], finish_reason=_FINISH.get(chunk.finished.finish_reason, "abort"))
                        return
                    elif chunk.error.code == pb.ERROR_CODE_UNAVAILABLE and not got_first:
                        error = f"{wid}: {chunk.error.message}"
                        finished = next_worker = True  # draining: it did not take the request
                        break
                    elif chunk.error.code in _DECODE_LOST:
                        raise DecodeLost(wid, chunk.error.message)
                    else:
                        finished = True
                        yield GenerationDelta([], finish_reason="abort", error=f"decode worker: {chunk.error.message}")
                        return
            finally:
                if not got_first:
                    self._count(self._pending_prompt, wid, -n_prompt)
                self._count(self._inflight, wid, -1)
                if call is not None:
                    call.cancel()
                if not finished:
                    # shielded: the caller may be cancelled, the worker must still hear of it
                    await asyncio.shield(self._abort(stub, request_id, 0, "request ended early"))
            if not next_worker:
                return
            log.info("request %s: %s did not take it (%s); trying another decode worker", request_id, wid, error)

    async def health(self) -> dict:
        ws = self.directory.all()
        serving = sum(1 for w in ws if w.role == "decode" and w.state == "serving")
        return {"status": "ok" if serving else "unavailable", "mode": "colocated",
                "workers": {w.worker_id: w.state for w in ws}, "decode": serving}

