"""The disaggregated driver (a request's path, DESIGN.md):

1. pick a decode worker D (least loaded: the router's in-flight count, free blocks, batch) and Reserve
   there; a refusal moves on to the next D; when every D refuses, retry until reserve_timeout_s, then
   raise NoCapacity (the app answers 503 with Retry-After); a prompt larger than a decode worker's
   whole cache is NeverFits (400). Prefill never runs for a request that has nowhere to decode;
2. pick a prefill worker P (the routing policy) and call Prefill with D's blocks as the destination;
   P returns the first token once D's cache is complete. A P that fails before answering is retried
   on another P (bounded), on a fresh reservation; a failed transfer avoids that D. A request that
   finished at its first token (max_tokens 1, EOS, a stop token) ends there: D's reservation is
   released and the first token is the whole answer;
3. stream D's tokens (Generate, through the shared relay); the first token from P is yielded before
   that stream opens;
4. whatever ends the request early (client gone, stop string, error, timeout) sends Abort to D and P,
   so every block on both sides is freed.

Each segment carries a StageClock: the marks around Reserve, Prefill and Generate plus the prefill
worker's own times (PrefillResult queue/prefill/transfer seconds) become the per-stage histograms of
stage_metrics.py (`self.stages`, a collector the router's registry adds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from splitserve.engine.sampling_params import SamplingParams
from splitserve.protos import worker_pb2 as pb
from splitserve.protos.convert import sampling_params_to_proto
from splitserve.protos.tensors import logprobs_from_proto

from .backend import GenerationDelta, NeverFits, Unavailable
from .cluster_backend import ClusterBackend, NoCapacity
from .membership import WorkerInfo
from .relay import FINISH, StreamRelay
from .stage_metrics import StageClock

log = logging.getLogger(__name__)

# prefill errors answered before a single block was written to the destination
_BEFORE_ANY_WRITE = {pb.ERROR_CODE_INCOMPATIBLE, pb.ERROR_CODE_INVALID_ARGUMENT, pb.ERROR_CODE_UNAVAILABLE}
_RETRYABLE_PREFILL = {pb.ERROR_CODE_UNAVAILABLE, pb.ERROR_CODE_TRANSFER_FAILED, pb.ERROR_CODE_DEADLINE_EXCEEDED}


@dataclass
class _Held:
    """What one segment holds on the workers, for its cleanup."""

    request_id: str
    d: WorkerInfo | None = None  # decode worker whose reservation is live (None: released)
    epoch: int = 0
    p: WorkerInfo | None = None  # prefill worker that may still hold the request
    counted: str = ""  # decode worker whose in-flight count this segment holds
    finished: bool = False
    clock: StageClock = field(default_factory=StageClock)  # the segment's stage marks (stage_metrics.py)


class DisaggBackend(ClusterBackend):
    mode = "disaggregated"

    def _decode_order(self, avoid: set[str]) -> list[WorkerInfo]:
        ds = [w for w in self.directory.serving("decode") if w.transfer_metadata]
        ds = [w for w in ds if w.worker_id not in avoid] or ds
        req = self.inflight.requests
        return sorted(
            ds,
            key=lambda w: (
                bool(w.failures),
                req.get(w.worker_id, 0),
                -w.free_blocks,
                w.running + w.waiting,
                w.worker_id,
            ),
        )

    def _prefill_order(self, prompt: list[int]) -> list[WorkerInfo]:
        pending = self.inflight.prompt_tokens
        return self.policy.rank(
            self.directory.serving("prefill"),
            prompt,
            load=lambda w: (pending.get(w.worker_id, 0), w.queued_prefill_tokens + w.running, w.worker_id),
            backlog=lambda w: pending.get(w.worker_id, 0) + w.queued_prefill_tokens,
        )

    async def _reserve_once(
        self, d: WorkerInfo, request_id: str, prompt_len: int, max_tokens: int, deadline: float, clock: StageClock
    ) -> pb.ReserveReply | str:
        """One Reserve on d; counted in d's in-flight requests when it succeeds (the caller's then)."""
        counts = self.inflight.requests
        self.inflight.add(counts, d.worker_id, 1)  # before the call: a burst sees each other's choice
        clock.mark("reserve_start")  # the one that admits it is the last: the time before is router_queue
        try:
            rep = await self.clients.decode(d).Reserve(
                pb.ReserveRequest(
                    request_id=request_id,
                    prompt_len=prompt_len,
                    max_tokens=max_tokens,
                    lease_ms=int(self.lease_s * 1000),
                ),
                timeout=max(0.1, min(5.0, deadline - time.monotonic())),
            )
        except BaseException as e:
            self.inflight.add(counts, d.worker_id, -1)
            if isinstance(e, grpc.aio.AioRpcError):
                return f"{d.worker_id}: {e.code().name}"
            raise
        if not rep.HasField("reservation"):
            self.inflight.add(counts, d.worker_id, -1)
            self.reserve_refusals += 1
        else:
            clock.mark("reserve_end")
        return rep

    async def _reserve(
        self, request_id: str, prompt_len: int, max_tokens: int, avoid: set[str], clock: StageClock
    ) -> tuple[WorkerInfo, pb.Reservation]:
        deadline = time.monotonic() + self.reserve_timeout_s
        delay = 0.01
        last = "no decode worker is serving"
        while True:
            for d in self._decode_order(avoid):
                rep = await self._reserve_once(d, request_id, prompt_len, max_tokens, deadline, clock)
                if isinstance(rep, str):
                    last = rep
                    continue
                if rep.HasField("reservation"):
                    return d, rep.reservation
                last = f"{d.worker_id}: {pb.RefusalReason.Name(rep.refusal.reason)} {rep.refusal.message}"
                if rep.refusal.reason == pb.REFUSAL_REASON_TOO_LONG:
                    raise NeverFits(
                        f"the prompt of {prompt_len} tokens does not fit a decode worker's cache "
                        f"({rep.refusal.message})"
                    )
            if time.monotonic() + delay > deadline:
                raise NoCapacity(
                    f"no decode worker could take the request within {self.reserve_timeout_s:.0f} s ({last})"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)

    async def _prefill_once(
        self, h: _Held, p: WorkerInfo, res: pb.Reservation, prompt: list[int], sampling: pb.SamplingParams
    ) -> pb.PrefillReply | str:
        assert h.d is not None
        dest = pb.Destination(
            decode_worker_id=h.d.worker_id,
            decode_address=h.d.address,
            agent_name=res.agent_name,
            block_ids=res.block_ids,
            epoch=res.epoch,
            peer_metadata=h.d.transfer_metadata,
        )
        pending = self.inflight.prompt_tokens
        self.inflight.add(pending, p.worker_id, len(prompt))
        h.p = p
        try:
            h.clock.mark("prefill_start")
            rep = await self.clients.prefill(p).Prefill(
                pb.PrefillRequest(
                    request_id=h.request_id, prompt_token_ids=prompt, sampling=sampling, destination=dest
                ),
                timeout=self.first_token_timeout_s,
            )
            h.clock.mark("prefill_end")
            return rep
        except grpc.aio.AioRpcError as e:
            return f"prefill worker {p.worker_id}: {e.code().name} {e.details() or ''}".strip()
        finally:
            self.inflight.add(pending, p.worker_id, -len(prompt))

    async def _release_d(self, h: _Held, reason: str, nothing_written: bool = False) -> None:
        if h.d is not None:
            await self.clients.abort(self.clients.decode(h.d), h.request_id, h.epoch, reason, nothing_written)
            h.d = None

    async def _prefill(self, h: _Held, prompt: list[int], params: SamplingParams, avoid: set[str]) -> pb.PrefillResult:
        """Reserve + Prefill, retried on another P (or D after a failed transfer); raises when it
        cannot be served now (Unavailable) or ever (NeverFits), or returns the failure as data."""
        sampling = sampling_params_to_proto(params)
        error, code = "no prefill worker is serving", pb.ERROR_CODE_UNAVAILABLE
        failed_p: set[str] = set()
        for _attempt in range(self.prefill_attempts):
            d, res = await self._reserve(h.request_id, len(prompt), params.max_tokens, avoid, h.clock)
            self._count_d(h, d)
            h.d, h.epoch = d, res.epoch
            order = [w for w in self._prefill_order(prompt) if w.worker_id not in failed_p]
            if not order:
                await self._release_d(h, "no prefill worker", nothing_written=True)
                break
            p = order[0]
            rep = await self._prefill_once(h, p, res, prompt, sampling)
            if not isinstance(rep, str) and rep.HasField("prefill"):
                return rep.prefill
            if isinstance(rep, str):  # the call itself failed: P may hold the request
                error, code = rep, pb.ERROR_CODE_INTERNAL
                await self._release_d(h, "prefill failed")
                await self.clients.abort(self.clients.prefill(p), h.request_id, 0, "prefill failed")
                failed_p.add(p.worker_id)
            else:
                error, code = f"prefill worker {p.worker_id}: {rep.error.message}", rep.error.code
                await self._release_d(h, "prefill failed", nothing_written=code in _BEFORE_ANY_WRITE)
                if code == pb.ERROR_CODE_TRANSFER_FAILED:
                    avoid.add(d.worker_id)  # the destination failed, not the prefill worker
                else:
                    failed_p.add(p.worker_id)
                if code not in _RETRYABLE_PREFILL:
                    break
            h.p = None
            self.prefill_retries += 1
        raise _PrefillFailed(error, code)

    def _count_d(self, h: _Held, d: WorkerInfo) -> None:
        """The segment holds one in-flight count, on its latest reservation's worker (_reserve counted it)."""
        if h.counted:
            self.inflight.add(self.inflight.requests, h.counted, -1)
        h.counted = d.worker_id

    def _first_delta(self, result: pb.PrefillResult, params: SamplingParams) -> GenerationDelta:
        first = GenerationDelta([result.first_token])
        if result.HasField("first_token_logprobs") and params.logprobs is not None:
            first.logprobs = [logprobs_from_proto(result.first_token_logprobs)]
        if params.prompt_logprobs is not None:
            first.prompt_logprobs = [None] + [logprobs_from_proto(x) for x in result.prompt_logprobs]
        return first

    async def _segment(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, avoid: set[str]
    ) -> AsyncIterator[GenerationDelta]:
        h = _Held(request_id)
        try:
            try:
                result = await self._prefill(h, prompt_token_ids, params, avoid)
            except _PrefillFailed as f:
                h.finished = True
                if f.code == pb.ERROR_CODE_TOO_LONG:
                    raise NeverFits(f.message) from None
                if f.code == pb.ERROR_CODE_UNAVAILABLE:
                    raise Unavailable(f.message) from None  # no prefill worker serving, or all draining
                yield GenerationDelta([], finish_reason="abort", error=f.message)
                return
            self.transfer_bytes += result.transfer_bytes
            self.transfer_seconds += result.transfer_seconds
            first = self._first_delta(result, params)
            self.stages.observe_first_token(
                h.clock, result.queue_seconds, result.prefill_seconds, result.transfer_seconds
            )
            h.p = None  # P answered: it holds nothing any more
            if result.finish_reason:  # finished at its first token: a normal end; give D's blocks back
                await self._release_d(h, "finished at its first token", nothing_written=result.blocks_written == 0)
                h.finished = True
                first.finish_reason = FINISH.get(result.finish_reason, "abort")
                yield first
                return
            yield first
            async for delta in self._generate(h, prompt_token_ids, params, result):
                yield delta
        finally:
            await self._cleanup(h)

    async def _generate(
        self, h: _Held, prompt: list[int], params: SamplingParams, result: pb.PrefillResult
    ) -> AsyncIterator[GenerationDelta]:
        assert h.d is not None
        h.clock.mark("generate_start")
        relay = StreamRelay(
            h.d.worker_id, params, self.first_token_timeout_s, self.idle_stream_timeout_s, got_first=True
        )
        call = self.clients.decode(h.d).Generate(
            pb.GenerateRequest(
                request_id=h.request_id,
                epoch=h.epoch,
                prompt_token_ids=prompt,
                sampling=sampling_params_to_proto(params),
                first_token=result.first_token,
                first_token_logprobs=result.first_token_logprobs if result.HasField("first_token_logprobs") else None,
                mtp_hidden=result.mtp_hidden if result.HasField("mtp_hidden") else None,
                generator_state=result.generator_state,
            )
        )
        try:
            async for delta in relay.deltas(call):
                self._observe_decode(h.clock, delta, relay)
                yield delta
        finally:
            h.finished = relay.finished
            call.cancel()

    def _observe_decode(self, clock: StageClock, delta: GenerationDelta, relay: StreamRelay) -> None:
        """The decode stages: Generate sent -> first token (first_decode_step), -> finished (stream)."""
        if delta.token_ids and "first_decode" not in clock.marks:
            self.stages.observe_first_decode(clock)
        elif delta.finish_reason and relay.finished and delta.error is None:
            self.stages.observe_end(clock)

    async def _cleanup(self, h: _Held) -> None:
        if h.counted:
            self.inflight.add(self.inflight.requests, h.counted, -1)
        if h.finished:
            return
        aborts = []
        if h.d is not None:
            aborts.append(self.clients.abort(self.clients.decode(h.d), h.request_id, h.epoch, "request ended early"))
        if h.p is not None:
            aborts.append(self.clients.abort(self.clients.prefill(h.p), h.request_id, 0, "request ended early"))
        if aborts:  # shielded: the caller may be cancelled, the workers must still hear of it
            await asyncio.shield(asyncio.gather(*aborts, return_exceptions=True))


class _PrefillFailed(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.message, self.code = message, code
