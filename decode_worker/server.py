"""The decode worker: a gRPC server around an engine in decode mode.

Life of a request R on this worker:
1. Reserve: blocks for R's prompt (+ the first generated token and the MTP drafts) are taken
   before any prefill runs, or the request is refused (no space); the reservation carries an epoch
   and a lease: blocks whose cache never arrives come back after the lease;
2. a prefill worker writes R's cache into those blocks; its notification "R:epoch" arrives only
   after the bytes landed (a background thread collects notifications);
3. Generate: waits (bounded) for that notification, adopts R into the running batch (first token
   and MTP state from the prefill side) and streams R's tokens until it finishes;
4. the blocks are freed exactly once: when R finishes, is aborted, its client goes away, the
   lease expires, or the wait for the cache times out.

Late writes: a prefill worker writes into our memory one-sidedly, so blocks of a reservation that
ends before its cache arrived are *quarantined*, not freed: they come back when the prefill side
says it will not write any more ("released:R:epoch", sent when it drops R), when R's data
notification arrives after all, or after quarantine_s (the prefill side's own deadlines are
shorter). A reused block therefore never receives a stale write.

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
from splitserve.engine.request import RequestOutput
from splitserve.engine.runtime import WorkerRuntime, WorkerServer, WorkerSpec, generator_state_from_bytes
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.protos.convert import sampling_params_from_proto
from splitserve.protos.tensors import logprobs_from_proto, logprobs_to_proto, tensor_from_proto

log = logging.getLogger(__name__)

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}


@dataclass
class _Reservation:
    blocks: list[int]
    epoch: int
    deadline: float
    adopted: bool = False


class DecodeService(pbg.DecodeWorkerServicer):
    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.spec = rt.spec
        self.lock = threading.Lock()
        self.reservations: dict[str, _Reservation] = {}
        self.arrived: dict[str, int] = {}          # request id -> epoch whose cache has landed
        self.released: dict[str, tuple[int, float]] = {}  # prefill side dropped (epoch, when)
        self.quarantine: dict[tuple[str, int], tuple[list[int], float]] = {}  # (rid, epoch) -> blocks, deadline
        self.arrived_cv = threading.Condition(self.lock)
        self.cancelled: dict[str, float] = {}      # request id -> when an Abort asked to stop it
        self.local: dict[str, int] = {}            # co-located requests -> prompt tokens not yet prefilled
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
            if notifs:
                free: list[list[int]] = []
                with self.arrived_cv:
                    for msgs in notifs.values():
                        for m in msgs:
                            text = m.decode(errors="replace")
                            released = text.startswith("released:")
                            rid, _, epoch = text.removeprefix("released:").rpartition(":")
                            if not rid or not epoch.isdigit():
                                continue
                            key = (rid, int(epoch))
                            if key in self.quarantine:  # nothing more will be written there
                                free.append(self.quarantine.pop(key)[0])
                            elif released:
                                self.released[rid] = (int(epoch), time.monotonic())
                            else:
                                self.arrived[rid] = int(epoch)
                    self.arrived_cv.notify_all()
                for blocks in free:
                    self._release(blocks)
            self._expire_leases()
            time.sleep(0.001 if notifs else 0.002)

    def _expire_leases(self) -> None:
        now = time.monotonic()
        with self.lock:
            expired = [(rid, r) for rid, r in self.reservations.items() if not r.adopted and r.deadline < now]
            for rid, _ in expired:
                del self.reservations[rid]
            done = [k for k, (_, deadline) in self.quarantine.items() if deadline < now]
            free = [self.quarantine.pop(k)[0] for k in done]
            for rid in [r for r, (_, t) in self.released.items() if t + self.spec.quarantine_s < now]:
                del self.released[rid]
            for rid in [r for r, t in self.cancelled.items() if t + 600 < now]:  # nobody came to stop
                del self.cancelled[rid]
        for rid, r in expired:
            log.warning("request %s: reservation expired (epoch %d) with no cache", rid, r.epoch)
            self._retire(rid, r)
        for blocks in free:
            log.warning("freeing %d quarantined blocks after %.0f s without word from the prefill side",
                        len(blocks), self.spec.quarantine_s)
            self._release(blocks)

    def _retire(self, rid: str, r: _Reservation, nothing_written: bool = False) -> None:
        """Give back a reservation that never got adopted: free at once if the cache arrived, the
        prefill side released it or never wrote, else quarantine its blocks (a late write may come)."""
        with self.lock:
            landed = self.arrived.get(rid) == r.epoch or nothing_written
            released = self.released.get(rid, (None, 0))[0] == r.epoch
            self.arrived.pop(rid, None)
            if released:
                del self.released[rid]
            if not (landed or released):
                self.quarantine[(rid, r.epoch)] = (r.blocks, time.monotonic() + self.spec.quarantine_s)
                return
        self._release(r.blocks)

    def _release(self, blocks: list[int]) -> None:
        try:
            self.rt.loop.call(lambda e: e.release_blocks(blocks))
        except Exception:  # noqa: BLE001
            log.exception("freeing %d blocks failed", len(blocks))

    # ---- RPCs ---------------------------------------------------------------------------------
    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeReply:
        return pb.HandshakeReply(peer=pb.PeerInfo(
            worker_id=self.spec.worker_id,
            transfer=pb.TransferMetadata(backend=self.spec.transfer_backend, agent_name=self.spec.worker_id,
                                         agent_metadata=self.rt.metadata)))

    def Reserve(self, request: pb.ReserveRequest, context: grpc.ServicerContext) -> pb.ReserveReply:
        rid = request.request_id
        if self.draining:
            return pb.ReserveReply(refusal=pb.Refusal(reason=pb.REFUSAL_REASON_NOT_SERVING, message="draining"))
        eng = self.rt.engine
        need_tokens = request.prompt_len + 1 + eng.mtp_k
        if -(-need_tokens // eng.cfg.block_size) > eng.cfg.num_blocks:
            return pb.ReserveReply(refusal=pb.Refusal(reason=pb.REFUSAL_REASON_TOO_LONG,
                                                      message=f"{request.prompt_len} tokens exceed this worker's cache"))
        with self.lock:
            if rid in self.reservations:
                return pb.ReserveReply(refusal=pb.Refusal(reason=pb.REFUSAL_REASON_DUPLICATE, message="already reserved"))
        blocks = self.rt.loop.call(lambda e: e.reserve(need_tokens))
        if blocks is None:
            free = eng.blocks.num_free
            return pb.ReserveReply(refusal=pb.Refusal(reason=pb.REFUSAL_REASON_NO_SPACE, free_blocks=free,
                                                      message=f"{free} free blocks"))
        lease_s = (request.lease_ms / 1000.0) if request.lease_ms else self.spec.reserve_lease_s
        epoch = next(self.epochs)
        with self.lock:
            self.reservations[rid] = _Reservation(blocks, epoch, time.monotonic() + lease_s)
        return pb.ReserveReply(reservation=pb.Reservation(block_ids=blocks, epoch=epoch, lease_ms=int(lease_s * 1000),
                                                          block_size=eng.cfg.block_size, agent_name=self.spec.worker_id))

    def _wait_cache(self, rid: str, epoch: int, context: grpc.ServicerContext) -> str | None:
        deadline = time.monotonic() + self.spec.transfer_timeout_s
        with self.arrived_cv:
            while self.arrived.get(rid) != epoch:
                if rid in self.cancelled or not context.is_active():
                    return "aborted while waiting for the cache"
                left = deadline - time.monotonic()
                if left <= 0:
                    return f"the cache did not arrive within {self.spec.transfer_timeout_s:.0f} s"
                self.arrived_cv.wait(min(left, 0.2))
            del self.arrived[rid]
        return None

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        rid = request.request_id
        with self.lock:
            res = self.reservations.get(rid)
        if res is None or res.epoch != request.epoch:
            yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_NOT_FOUND,
                                                  message=f"no reservation for {rid} epoch {request.epoch}"))
            return
        finished = False
        adopted = False
        try:
            try:
                params = sampling_params_from_proto(request.sampling)
            except ValueError as e:
                yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_INVALID_ARGUMENT, message=str(e)))
                return
            err = self._wait_cache(rid, res.epoch, context)
            if err:
                yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_DEADLINE_EXCEEDED, message=err))
                return
            hidden = tensor_from_proto(request.mtp_hidden) if request.HasField("mtp_hidden") else None
            first_lp = logprobs_from_proto(request.first_token_logprobs) if request.HasField("first_token_logprobs") else None
            gen_state = generator_state_from_bytes(request.generator_state)
            q = self.rt.loop.subscribe(rid)

            def adopt(eng: Engine) -> None:
                eng.adopt_prefilled(rid, list(request.prompt_token_ids), params, res.blocks, request.first_token,
                                    first_lp, hidden, gen_state)
                res.adopted = True
            try:
                self.rt.loop.call(adopt)
                adopted = True
            except RequestError as e:
                yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_INVALID_ARGUMENT, message=str(e)))
                return
            finished = yield from self._relay(rid, q, context)
        finally:
            self.rt.loop.unsubscribe(rid)
            with self.lock:
                self.reservations.pop(rid, None)
            self.cancelled.pop(rid, None)
            if not finished:
                if adopted:
                    self._abort_in_engine(rid)
                else:
                    self._retire(rid, res)
                log.info("request %s: stream ended early (client gone, aborted or failed)", rid)

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
            duplicate = rid in self.local or rid in self.reservations
            if not duplicate:
                self.local[rid] = len(prompt)
        if duplicate:
            yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_INVALID_ARGUMENT,
                                                  message=f"request id {rid} is already running here"))
            return
        q = self.rt.loop.subscribe(rid)
        added = finished = False
        try:
            try:
                self.rt.loop.call(lambda e: e.add_request(rid, prompt, params))
                added = True
            except RequestError as e:
                yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_INVALID_ARGUMENT, message=str(e)))
                return
            finished = yield from self._relay(rid, q, context)
        finally:
            self.rt.loop.unsubscribe(rid)
            with self.lock:
                self.local.pop(rid, None)
            self.cancelled.pop(rid, None)
            if added and not finished:
                self._abort_in_engine(rid)  # frees its blocks, whatever it reached
                log.info("request %s: stream ended early (client gone, aborted or failed)", rid)

    def _abort_in_engine(self, rid: str) -> None:
        try:
            self.rt.loop.call(lambda e: e.abort(rid))
        except Exception:  # noqa: BLE001
            log.exception("request %s: abort failed", rid)

    def _relay(self, rid: str, q: queue.Queue, context: grpc.ServicerContext):
        """Yield the chunks of a running request's engine outputs; returns True once it finished,
        False when it stopped early (Abort, the caller gone, the engine failed)."""
        while True:
            if rid in self.cancelled or not context.is_active():
                return False
            try:
                out = q.get(timeout=0.5)
            except queue.Empty:
                continue
            if isinstance(out, BaseException):
                yield pb.GenerateChunk(error=pb.Error(code=pb.ERROR_CODE_INTERNAL, message=f"engine failed: {out!r}"))
                return False
            if out.new_token_ids and rid in self.local:
                with self.lock:
                    self.local[rid] = 0  # its prompt is computed
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
                d.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in out.prompt_logprobs[1:])
            yield pb.GenerateChunk(delta=d)
        if out.finished:
            yield pb.GenerateChunk(finished=pb.Finished(
                finish_reason=_FINISH.get(out.finish_reason or "abort", pb.FINISH_REASON_ABORT),
                prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens,
                draft_tokens=out.draft_tokens, accepted_draft_tokens=out.accepted_draft_tokens))

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        rid = request.request_id
        with self.lock:
            if rid in self.local:
                self.cancelled[rid] = time.monotonic()  # its PrefillAndGenerate stops and frees the blocks
                return pb.AbortReply(found=True)
            res = self.reservations.get(rid)
            if res is None:
                return pb.AbortReply(found=False)
            self.cancelled[rid] = time.monotonic()  # a Generate streaming it, or waiting for its cache, stops
            if res.adopted or (request.epoch and request.epoch != res.epoch):
                return pb.AbortReply(found=True)  # that Generate frees the blocks
            del self.reservations[rid]
        self._retire(rid, res, request.nothing_written)
        return pb.AbortReply(found=True)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        state = pb.SERVING_STATE_DRAINING if self.draining else pb.SERVING_STATE_SERVING
        if not self.rt.loop.alive:
            state = pb.SERVING_STATE_STOPPING
        return pb.HealthReply(state=state, kind=pb.WORKER_KIND_DECODE, worker_id=self.spec.worker_id)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        return pb.StatsReply(kind=pb.WORKER_KIND_DECODE, worker_id=self.spec.worker_id, **self.stats())

    def stats(self) -> dict:
        eng = self.rt.engine
        with self.lock:
            reserved = sum(len(r.blocks) for r in self.reservations.values() if not r.adopted)
            reserved += sum(len(b) for b, _ in self.quarantine.values())
            pending = sum(1 for r in self.reservations.values() if not r.adopted)
            queued_prefill = sum(self.local.values())
        return dict(blocks_used=eng.blocks_used, blocks_total=eng.blocks_total,
                    running=len(eng.scheduler.running), waiting=len(eng.scheduler.waiting) + pending,
                    requests_done=self.requests_done, pid=self.rt.pid, node=self.rt.node,
                    queued_prefill_tokens=queued_prefill,
                    blocks_reserved=reserved, draft_tokens=eng.stats.draft_tokens,
                    accepted_draft_tokens=eng.stats.accepted_draft_tokens, **self.rt.warm_stats())

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
