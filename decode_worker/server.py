"""The decode worker: a gRPC server around an engine in decode mode.

Life of a request R on this worker (the reservation's states and who owns its blocks are in
reservation.py; every transition goes through its `ReservationTable`):
1. Reserve: blocks for R's prompt (+ the first generated token and the MTP drafts) are taken
   before any prefill runs, or the request is refused (no space); the reservation carries an epoch
   and a lease: blocks whose cache never arrives come back after the lease. The engine call that
   takes them is cancelled, or undone, if it outlives the caller's deadline;
2. a prefill worker writes R's cache into those blocks; its DATA notice (kvtransfer/notice.py)
   arrives only after the bytes landed (a background thread collects notices and expires leases);
3. Generate: waits (bounded) for that notice, adopts R into the running batch (first token and MTP
   state from the prefill side) and streams R's tokens until it finishes;
4. the blocks are freed exactly once: when R finishes, is aborted, its client goes away, the
   lease expires, or the wait for the cache times out. Blocks that may still receive a late write
   are quarantined until the prefill side's RELEASED notice (or a timeout).

Co-located mode (`router.mode: colocated`, no prefill pool): PrefillAndGenerate adds R to the engine
as a whole request: the scheduler takes its blocks as it admits the prompt, prefills it in chunks
batched with the running decodes, and R's tokens stream exactly as Generate streams them (the first
one included). No reservation and no transfer, so no quarantine: the blocks are freed by the engine
when R finishes, or by `engine.abort` when the stream ends early (Abort, client gone, error).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from splitserve.engine.engine import Engine, RequestError
from splitserve.engine.loop import CallTimeout
from splitserve.engine.request import RequestOutput
from splitserve.engine.runtime import WorkerRuntime, WorkerServer, WorkerSpec, generator_state_from_bytes
from splitserve.kvtransfer.notice import BadNotice, Notice
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.protos.convert import request_error_code, sampling_params_from_proto
from splitserve.protos.tensors import logprobs_from_proto, logprobs_to_proto, tensor_from_proto

from .reservation import Duplicate, Reservation, ReservationTable, ResState

log = logging.getLogger(__name__)

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


def _left(context: grpc.ServicerContext, default: float) -> float:
    """Seconds until the caller's deadline (a call's result is no use after it)."""
    left = context.time_remaining()
    return max(0.05, default if left is None else min(left, default))


def _error(code: pb.ErrorCode, message: str) -> pb.GenerateChunk:
    return pb.GenerateChunk(error=pb.Error(code=code, message=message))


def _release_reserved(eng: Engine, blocks: list[int] | None) -> None:
    """Undo of a reserve that ran after its call timed out: give its blocks (if it got any) back."""
    if blocks:
        eng.release_blocks(blocks)


@dataclass
class _Local:
    """A co-located request (PrefillAndGenerate)."""

    prompt_left: int  # prompt tokens not yet prefilled
    cancelled: bool = False


class DecodeService(pbg.DecodeWorkerServicer):
    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.spec = rt.spec
        self.lock = threading.Lock()  # guards `local`
        self.table = ReservationTable(self._release, rt.spec.quarantine_s)
        self.local: dict[str, _Local] = {}
        self.epochs = itertools.count(1)
        self.draining = False
        self.requests_done = 0
        self._stop = threading.Event()
        self._notif_thread = threading.Thread(target=self._collect_notifs, name="decode-notifs", daemon=True)
        self._notif_thread.start()

    # ---- background: notifications and leases -----------------------------------------------
    def _collect_notifs(self) -> None:
        while not self._stop.is_set():
            try:
                notifs = self.rt.transport.get_notifs()
            except Exception:  # noqa: BLE001 - keep collecting; a closed transport ends the loop below
                if self._stop.is_set():
                    return
                log.exception("collecting transfer notifications failed")
                time.sleep(0.1)
                continue
            for peer, msgs in notifs.items():
                for m in msgs:
                    try:
                        self.table.on_notice(Notice.from_bytes(m))
                    except BadNotice as e:
                        log.warning("dropping a notification from %s: %s", peer, e)
            for r in self.table.expire():
                log.warning(
                    "request %s: reservation epoch %d timed out (lease or quarantine): now %s",
                    r.request_id,
                    r.epoch,
                    r.state.value,
                )
            time.sleep(0.001 if notifs else 0.002)

    def _release(self, blocks: list[int]) -> None:
        try:
            self.rt.loop.call(lambda e: e.release_blocks(blocks))
        except Exception:  # noqa: BLE001
            log.exception("freeing %d blocks failed", len(blocks))

    # ---- RPCs ---------------------------------------------------------------------------------
    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeReply:
        return pb.HandshakeReply(
            peer=pb.PeerInfo(
                worker_id=self.spec.worker_id,
                transfer=pb.TransferMetadata(
                    backend=self.spec.transfer_backend, agent_name=self.spec.worker_id, agent_metadata=self.rt.metadata
                ),
            )
        )

    def Reserve(self, request: pb.ReserveRequest, context: grpc.ServicerContext) -> pb.ReserveReply:
        rid = request.request_id
        if self.draining:
            return pb.ReserveReply(refusal=pb.Refusal(reason=pb.REFUSAL_REASON_NOT_SERVING, message="draining"))
        eng = self.rt.engine
        need_tokens = request.prompt_len + 1 + eng.mtp_k
        if -(-need_tokens // eng.cfg.block_size) > eng.cfg.num_blocks:
            return pb.ReserveReply(
                refusal=pb.Refusal(
                    reason=pb.REFUSAL_REASON_TOO_LONG, message=f"{request.prompt_len} tokens exceed this worker's cache"
                )
            )
        if self.table.get(rid) is not None:
            return pb.ReserveReply(refusal=pb.Refusal(reason=pb.REFUSAL_REASON_DUPLICATE, message="already reserved"))
        try:  # a reserve that times out is cancelled, or undone once it ran: no block is left behind
            blocks = self.rt.loop.call(
                lambda e: e.reserve(need_tokens),
                timeout=_left(context, 5.0),
                undo=_release_reserved,
            )
        except CallTimeout as e:
            return pb.ReserveReply(refusal=pb.Refusal(reason=pb.REFUSAL_REASON_NO_SPACE, message=f"engine busy: {e}"))
        if blocks is None:
            free = eng.blocks.num_free
            return pb.ReserveReply(
                refusal=pb.Refusal(reason=pb.REFUSAL_REASON_NO_SPACE, free_blocks=free, message=f"{free} free blocks")
            )
        lease_s = (request.lease_ms / 1000.0) if request.lease_ms else self.spec.reserve_lease_s
        epoch = next(self.epochs)
        try:
            self.table.add(rid, epoch, blocks, lease_s)
        except Duplicate as e:  # a twin Reserve got there first
            self._release(blocks)
            return pb.ReserveReply(refusal=pb.Refusal(reason=pb.REFUSAL_REASON_DUPLICATE, message=str(e)))
        return pb.ReserveReply(
            reservation=pb.Reservation(
                block_ids=blocks,
                epoch=epoch,
                lease_ms=int(lease_s * 1000),
                block_size=eng.cfg.block_size,
                agent_name=self.spec.worker_id,
            )
        )

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        rid = request.request_id
        res = self.table.claim(rid, request.epoch)
        if res is None:
            yield _error(pb.ERROR_CODE_NOT_FOUND, f"no reservation for {rid} epoch {request.epoch} to stream")
            return
        finished = False
        try:
            try:
                params = sampling_params_from_proto(request.sampling)
            except ValueError as e:
                yield _error(pb.ERROR_CODE_INVALID_ARGUMENT, str(e))
                return
            err = self.table.wait_complete(
                res, time.monotonic() + self.spec.transfer_timeout_s, lambda: not context.is_active()
            )
            if err:
                yield _error(pb.ERROR_CODE_DEADLINE_EXCEEDED, err)
                return
            q = self.rt.loop.subscribe(rid)
            refused = self._adopt(res, request, params)
            if refused is not None:
                yield _error(
                    request_error_code(refused) if isinstance(refused, RequestError) else pb.ERROR_CODE_INTERNAL,
                    str(refused),
                )
                return
            finished = yield from self._relay(rid, q, context)
        finally:
            self.rt.loop.unsubscribe(rid)
            if not finished and res.state is ResState.ADOPTED:
                self._abort_in_engine(rid)
            self.table.end(res)
            if not finished:
                log.info("request %s: stream ended early (client gone, aborted or failed)", rid)

    def _adopt(self, res: Reservation, request: pb.GenerateRequest, params) -> Exception | None:
        """Hand the reservation's blocks to the engine (COMPLETE -> ADOPTING -> ADOPTED); why not, if not."""
        rid = request.request_id
        hidden = tensor_from_proto(request.mtp_hidden) if request.HasField("mtp_hidden") else None
        first_lp = (
            logprobs_from_proto(request.first_token_logprobs) if request.HasField("first_token_logprobs") else None
        )
        gen_state = generator_state_from_bytes(request.generator_state)

        def adopt(eng: Engine) -> RequestError | None:
            try:
                eng.adopt_prefilled(
                    rid,
                    list(request.prompt_token_ids),
                    params,
                    res.blocks,
                    request.first_token,
                    first_lp,
                    hidden,
                    gen_state,
                )
            except RequestError as e:
                return e  # the engine did not take the blocks
            return None

        def undo(eng: Engine, refused: RequestError | None) -> None:  # it ran after the call timed out
            if refused is None:
                eng.abort(rid)  # frees the blocks the engine took
            else:
                eng.release_blocks(res.blocks)

        self.table.begin_adopt(res)
        try:
            err = self.rt.loop.call(adopt, undo=undo)
        except (CallTimeout, RuntimeError) as e:
            # never ran: the blocks are still ours; ran late: its undo gives them back
            self.table.adopt_failed(res, engine_took_blocks=isinstance(e, CallTimeout) and e.ran)
            return e
        if err is not None:
            self.table.adopt_failed(res, engine_took_blocks=False)
            return err
        if not self.table.adopted(res):
            return RuntimeError("aborted while being adopted")
        return None

    def PrefillAndGenerate(self, request: pb.PrefillAndGenerateRequest, context: grpc.ServicerContext):
        """Co-located mode: the whole request on this worker's engine (module docstring)."""
        rid = request.request_id
        if self.draining:
            yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_UNAVAILABLE, message="decode worker is draining"))
            return
        try:
            params = sampling_params_from_proto(request.sampling)
        except ValueError as e:
            yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_INVALID_ARGUMENT, message=str(e)))
            return
        prompt = list(request.prompt_token_ids)
        with self.lock:
            duplicate = rid in self.local or self.table.get(rid) is not None
            if not duplicate:
                self.local[rid] = _Local(len(prompt))
        if duplicate:
            yield pb.GenerateChunk(
                error=pb.Error(code=pb.ERROR_CODE_INVALID_ARGUMENT, message=f"request id {rid} is already running here")
            )
            return
        q = self.rt.loop.subscribe(rid)
        added = finished = False
        try:
            try:
                self.rt.loop.call(lambda e: e.add_request(rid, prompt, params))
                added = True
            except RequestError as e:
                yield pb.GenerateChunk(error=pb.Error(code=request_error_code(e), message=str(e)))
                return
            finished = yield from self._relay(rid, q, context)
        finally:
            self.rt.loop.unsubscribe(rid)
            with self.lock:
                self.local.pop(rid, None)
            if added and not finished:
                self._abort_in_engine(rid)  # frees its blocks, whatever it reached
                log.info("request %s: stream ended early (client gone, aborted or failed)", rid)

    def _abort_in_engine(self, rid: str) -> None:
        try:
            self.rt.loop.call(lambda e: e.abort(rid))
        except Exception:  # noqa: BLE001
            log.exception("request %s: abort failed", rid)

    def _cancelled(self, rid: str) -> bool:
        with self.lock:
            local = self.local.get(rid)
            if local is not None:
                return local.cancelled
        return self.table.is_cancelled(rid)

    def _relay(self, rid: str, q: queue.Queue, context: grpc.ServicerContext):
        """Yield the chunks of a running request's engine outputs; returns True once it finished,
        False when it stopped early (Abort, the caller gone, the engine failed)."""
        while True:
            if self._cancelled(rid) or not context.is_active():
                return False
            try:
                out = q.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(out, BaseException):
                yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_INTERNAL, message=f"engine failed: {out!r}"))
                return False
            if out.new_token_ids:
                with self.lock:
                    if rid in self.local:
                        self.local[rid].prompt_left = 0  # its prompt is computed
            if out.finished:  # counted before the last chunk goes out: a caller that saw it sees the count
                self.requests_done += 1
            yield from self._chunks(out)
            if out.finished:
                return True

    @staticmethod
    def _chunks(out: RequestOutput):
        if out.new_token_ids:
            d = pb.TokenDelta(token_ids=out.new_token_ids)
            if out.new_logprobs:
                d.logprobs.extend(logprobs_to_proto(lp) for lp in out.new_logprobs if lp is not None)
            if out.prompt_logprobs is not None:  # only PrefillAndGenerate's first output has them
                d.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in out.prompt_logprobs[1:] if lp is not None)
            yield pb.GenerateChunk(delta=d)
        if out.finished:
            yield pb.GenerateChunk(
                finished=pb.Finished(
                    finish_reason=_FINISH.get(out.finish_reason or "abort", pb.FINISH_REASON_ABORT),
                    prompt_tokens=out.num_prompt_tokens,
                    completion_tokens=out.num_output_tokens,
                    draft_tokens=out.draft_tokens,
                    accepted_draft_tokens=out.accepted_draft_tokens,
                )
            )

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        rid = request.request_id
        with self.lock:
            local = self.local.get(rid)
            if local is not None:
                local.cancelled = True  # its PrefillAndGenerate stops and frees the blocks
                return pb.AbortReply(found=True)
        # a reservation: given up (freed, or quarantined until the writer's word), or its stream stops
        return pb.AbortReply(found=self.table.abort(rid, request.epoch, request.nothing_written))

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        state = pb.SERVING_STATE_DRAINING if self.draining else pb.SERVING_STATE_SERVING
        if not self.rt.loop.alive:
            state = pb.SERVING_STATE_STOPPING
        return pb.HealthReply(state=state, kind=pb.WORKER_KIND_DECODE, worker_id=self.spec.worker_id)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        return pb.StatsReply(kind=pb.WORKER_KIND_DECODE, worker_id=self.spec.worker_id, **self.stats())

    def stats(self) -> dict:
        eng = self.rt.engine
        reserved, pending = self.table.counts()
        with self.lock:
            queued_prefill = sum(x.prompt_left for x in self.local.values())
        return dict(
            blocks_used=eng.blocks_used,
            blocks_total=eng.blocks_total,
            running=len(eng.scheduler.running),
            waiting=len(eng.scheduler.waiting) + pending,
            requests_done=self.requests_done,
            pid=self.rt.pid,
            node=self.rt.node,
            queued_prefill_tokens=queued_prefill,
            blocks_reserved=reserved,
            draft_tokens=eng.stats.draft_tokens,
            accepted_draft_tokens=eng.stats.accepted_draft_tokens,
            weight_bytes=eng.weight_bytes,
            **self.rt.warm_stats(),
        )

    def close(self) -> None:
        self._stop.set()
        self._notif_thread.join(2)


class DecodeWorkerServer(WorkerServer):
    def stop(self, grace_s: float = 5.0) -> None:
        self.service.draining = True
        self.server.stop(grace_s).wait(grace_s + 1)
        self.service.close()
        self.rt.close()


def serve(spec: WorkerSpec) -> WorkerServer:
    rt = WorkerRuntime(spec)
    return DecodeWorkerServer(rt, DecodeService(rt), pbg.add_DecodeWorkerServicer_to_server, "decode")
