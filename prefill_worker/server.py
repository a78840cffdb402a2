"""The prefill worker: a gRPC server around an engine in prefill mode.

Life of a Prefill call (request id R, destination decode worker D with reserved blocks B_D; the
stream's states are in stream.py):
1. the transport adds D as a peer on first use (handshake: compat fields checked first);
2. the engine runs R's prompt in chunks (prefill_only: it stops after sampling the first token and
   keeps R's blocks); the prefix cache may serve leading blocks;
3. after every engine step, blocks of R whose every layer (MTP layer included) is final are
   written to the matching blocks of B_D — transfer overlaps the remaining chunks' compute; runs of
   consecutive block ids travel as one descriptor per pool;
4. once the first token is sampled, the remaining blocks go out with R's DATA notice, which D sees
   only after those bytes landed — in the after_step hook of the step that sampled it (not after a
   round trip into the loop, which would wait for the next step to end), which also takes R's state
   for the reply; a request that finished at its first token (max_tokens 1, EOS, a stop token) sends
   nothing more: D is told RELEASED and the reply says how it finished;
5. when every write is DONE, the reply carries the first token, its logprobs, the prompt logprobs,
   the MTP state (main hidden state at the last prompt position), the request's generator state (so
   seeded sampling continues exactly on D) and the times of its stages (queue, compute, transfer,
   the whole handler); R's blocks are freed here between two steps, without the reply waiting.
Abort, a failed write or a timeout frees R's blocks here and answers with an error code; D's
reserved blocks are D's to free (the router aborts there; the RELEASED notice lets D free them at
once instead of after its quarantine).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from splitserve.engine.engine import Engine, RequestError
from splitserve.engine.loop import CallTimeout
from splitserve.engine.request import RequestOutput
from splitserve.engine.runtime import WorkerRuntime, WorkerServer, WorkerSpec
from splitserve.kvtransfer import HandshakeError
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.protos.convert import request_error_code, sampling_params_from_proto
from splitserve.protos.tensors import logprobs_to_proto, tensor_to_proto

from .stream import PrefillStream, StreamState

if TYPE_CHECKING:
    import torch

    from splitserve.engine.sampling_params import TokenLogprobs

log = logging.getLogger(__name__)

# a request that finished at its first token ("prefilled": it goes on at the decode worker)
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH}


def _log_cleanup_failure(rid: str, fut: Future) -> None:
    if fut.exception() is not None:
        log.error("request %s: cleanup failed: %r", rid, fut.exception())


@dataclass(frozen=True)
class _Failure:
    code: pb.ErrorCode
    message: str


@dataclass(frozen=True)
class _Prefilled:
    """What the step that sampled the first token leaves for the reply (taken in its after_step hook)."""

    hidden: torch.Tensor | None  # main hidden state at the last prompt position (MTP)
    gen_state: torch.Tensor | None  # the request's torch.Generator state
    cached: int  # prompt tokens the prefix cache served
    prompt_logprobs: list[TokenLogprobs | None] | None
    t_computed: float  # end of that step


@dataclass
class _Call:
    """One Prefill call: its cache stream and what the engine thread hands its handler. The engine
    thread writes t_first_step, then `prefilled` or `error`, then sets `ready`; the handler reads them
    after `ready` (the Event orders them)."""

    stream: PrefillStream
    prompt_len: int
    ended: pb.FinishReason = pb.FINISH_REASON_UNSPECIFIED  # when it finished at its first token
    t_first_step: float | None = None  # start of the engine step that ran its first chunk
    prefilled: _Prefilled | None = None
    error: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class PrefillService(pbg.PrefillWorkerServicer):
    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.spec = rt.spec
        self.peers: dict[str, str] = {}  # agent name -> transport peer name
        self.peer_lock = threading.Lock()
        self.lock = threading.Lock()  # guards calls, tombstones, queued_prefill_tokens
        self.calls: dict[str, _Call] = {}
        self.tombstones: dict[str, float] = {}  # aborted before they arrived: refuse them for a while
        self.draining = False
        self.requests_done = 0
        self.queued_prefill_tokens = 0
        rt.loop.after_step.append(self._after_step)

    # ---- transfer (runs in the engine loop thread) -------------------------------------------
    @staticmethod
    def _complete_blocks(eng: Engine, rid: str, prompt_len: int) -> int:
        req = eng.requests[rid]
        done = min(req.num_computed, req.mtp_computed) if eng.mtp_cache else req.num_computed
        return min(done, prompt_len) // eng.cfg.block_size

    def _after_step(self, eng: Engine, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        ended = {o.request_id: o for o in outputs if o.finished}
        with self.lock:
            calls = list(self.calls.items())
        for rid, c in calls:
            req = eng.requests.get(rid)
            if c.t_first_step is None and req is not None and (rid in ended or req.num_computed > 0):
                c.t_first_step = now - eng.stats.step_seconds
            if rid in ended:
                self._finish(eng, c, ended[rid], now)
            elif req is not None and not req.is_finished:
                s = c.stream
                s.send_ready(req.block_table, self._complete_blocks(eng, rid, len(req.prompt_ids)))
                if s.state is StreamState.LOST:  # a failed write ends the request now, not after its prefill
                    eng.abort(rid)

    def _finish(self, eng: Engine, c: _Call, out: RequestOutput, now: float) -> None:
        """This step sampled the first token: the last blocks go out with the DATA notice now (nothing
        more when it finished at its first token: the writes under way settle, then _cleanup tells D
        it may free the reservation), and the request's state is taken for the reply. `ready` is set
        whatever happens: the handler never waits for a stream that failed here."""
        try:
            if out.new_token_ids and out.finish_reason in ("prefilled", *_FINISH):
                req = eng.requests[out.request_id]
                c.ended = _FINISH.get(out.finish_reason or "", pb.FINISH_REASON_UNSPECIFIED)
                if c.ended:
                    c.stream.stop("finished at its first token")
                else:
                    c.stream.send_last(req.block_table, -(-c.prompt_len // eng.cfg.block_size))
                c.prefilled = _Prefilled(
                    hidden=req.pending_hidden[-1].float().cpu() if req.pending_hidden is not None else None,
                    gen_state=req.generator.get_state().cpu() if req.generator is not None else None,
                    cached=req.num_cached_prompt,
                    prompt_logprobs=req.prompt_logprobs,
                    t_computed=now,
                )
        except Exception as e:  # noqa: BLE001 - the handler answers with the error
            log.exception("request %s: finishing the prefill failed", out.request_id)
            c.error = f"finishing the prefill failed: {e!r}"
        finally:
            c.ready.set()

    def _peer_for(self, dest: pb.Destination) -> str:
        with self.peer_lock:
            p = self.peers.get(dest.agent_name)
            if p is None:
                p = self.rt.transport.add_peer(dest.peer_metadata)
                self.peers[dest.agent_name] = p
            return p

    def _forget_peer(self, agent_name: str) -> None:
        """After a failed write the connection may be broken: the next request handshakes afresh."""
        with self.peer_lock:
            peer = self.peers.pop(agent_name, None)
        if peer is not None:
            try:
                self.rt.transport.remove_peer(peer)
            except Exception as e:  # noqa: BLE001 - already gone is fine
                log.info("removing peer %s: %s", agent_name, e)

    # ---- RPCs ---------------------------------------------------------------------------------
    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext) -> pb.PrefillReply:
        rid = request.request_id
        t_start = time.monotonic()
        checked = self._admit(request, context)
        if isinstance(checked, _Failure):
            return self._error(rid, checked)
        params, c = checked
        prompt = list(request.prompt_token_ids)
        q = self.rt.loop.subscribe(rid)
        with self.lock:
            self.queued_prefill_tokens += len(prompt)
        try:
            out = self._run(rid, prompt, params, c, q, t_start, context)
            if isinstance(out, _Failure):
                if c.stream.state is StreamState.LOST or c.error:
                    self._forget_peer(request.destination.agent_name)
                return self._error(rid, out)
            self.requests_done += 1
            return pb.PrefillReply(prefill=out)
        finally:
            with self.lock:
                self.queued_prefill_tokens -= len(prompt)
            self.rt.loop.unsubscribe(rid)
            self._cleanup(rid, c)

    @staticmethod
    def _error(rid: str, f: _Failure) -> pb.PrefillReply:
        log.warning("request %s: prefill failed: %s", rid, f.message)
        return pb.PrefillReply(error=pb.Error(code=f.code, message=f.message))

    def _admit(self, request: pb.PrefillRequest, context: grpc.ServicerContext):
        """(params, call) for a request this worker takes, or the _Failure that says why not."""
        rid, dest = request.request_id, request.destination
        if self.draining:
            return _Failure(pb.ERROR_CODE_UNAVAILABLE, "prefill worker is draining")
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return _Failure(pb.ERROR_CODE_DEADLINE_EXCEEDED, "arrived after its deadline")
        try:
            params = sampling_params_from_proto(request.sampling)
        except ValueError as e:
            return _Failure(pb.ERROR_CODE_INVALID_ARGUMENT, str(e))
        try:
            peer = self._peer_for(dest)
        except HandshakeError as e:
            return _Failure(pb.ERROR_CODE_INCOMPATIBLE, f"transfer handshake with {dest.decode_worker_id} refused: {e}")
        except Exception as e:  # noqa: BLE001
            return _Failure(pb.ERROR_CODE_TRANSFER_FAILED, f"cannot reach {dest.decode_worker_id}: {e}")
        bs = self.rt.engine.cfg.block_size
        if len(dest.block_ids) * bs < len(request.prompt_token_ids):
            return _Failure(
                pb.ERROR_CODE_INVALID_ARGUMENT,
                f"destination has {len(dest.block_ids)} blocks for a {len(request.prompt_token_ids)}-token prompt",
            )
        stream = PrefillStream(self.rt.transport, rid, peer, list(dest.block_ids), dest.epoch)
        c = _Call(stream, len(request.prompt_token_ids))
        with self.lock:  # an Abort from here on finds the stream
            aborted = self.tombstones.pop(rid, None) is not None
            duplicate = rid in self.calls
            if not (aborted or duplicate):
                self.calls[rid] = c
        if duplicate:
            return _Failure(pb.ERROR_CODE_INVALID_ARGUMENT, f"request id {rid} is already prefilling here")
        if aborted:  # nothing was written: D may free the reservation now
            stream.release()
            return _Failure(pb.ERROR_CODE_ABORTED, "aborted before it started")
        return params, c

    def _run(
        self, rid: str, prompt: list[int], params, c: _Call, q, t_start: float, context: grpc.ServicerContext
    ) -> pb.PrefillResult | _Failure:
        try:
            self.rt.loop.call(
                lambda eng: eng.add_request(rid, prompt, params, prefill_only=True), undo=lambda eng, _: eng.abort(rid)
            )
        except RequestError as e:
            return _Failure(request_error_code(e), str(e))
        except CallTimeout as e:
            return _Failure(pb.ERROR_CODE_UNAVAILABLE, f"engine busy: {e}")
        deadline = t_start + self.spec.first_token_timeout_s
        out = self._wait_prefilled(c.stream, q, deadline, context)
        if isinstance(out, _Failure):
            return out
        done = self._wait_ready(c, deadline)  # the step's hook sent the last blocks and took the state
        if isinstance(done, _Failure):
            return done
        t_prefilled = done.t_computed
        err = self._wait_transfers(c.stream, t_prefilled + self.spec.transfer_timeout_s, bool(c.ended), context)
        if err:
            return err
        return self._result(rid, out, c, done, t_start)

    def _wait_ready(self, c: _Call, deadline: float) -> _Prefilled | _Failure:
        """The after_step hook of the step that sampled the first token has run (right after that step's
        outputs were delivered; only a dead loop or a failure in the hook keeps it from answering)."""
        while not c.ready.wait(0.05):
            if not self.rt.loop.alive:
                return _Failure(pb.ERROR_CODE_INTERNAL, f"engine loop died: {self.rt.loop.error!r}")
            if time.monotonic() > deadline:
                c.stream.stop("first-token deadline")
                return _Failure(pb.ERROR_CODE_DEADLINE_EXCEEDED, "the prefill did not finish in time")
        if c.error:
            return _Failure(pb.ERROR_CODE_TRANSFER_FAILED, c.error)
        if c.prefilled is None:
            return _Failure(pb.ERROR_CODE_INTERNAL, "the prefill finished without its state")
        return c.prefilled

    def _result(self, rid: str, out: RequestOutput, c: _Call, done: _Prefilled, t_start: float) -> pb.PrefillResult:
        """The reply, with the stages' times: queue (to the start of the step that ran its first chunk),
        compute (to the end of the step that sampled the first token), the transfer not hidden behind
        compute (to the last write's completion) and the whole handler."""
        t_done = time.monotonic()
        t_prefilled = done.t_computed
        t_first = min(c.t_first_step or t_prefilled, t_prefilled)
        gen_state = done.gen_state
        res = pb.PrefillResult(
            first_token=out.new_token_ids[0],
            num_cached_tokens=done.cached,
            transfer_bytes=c.stream.nbytes,
            transfer_seconds=max(0.0, t_done - t_prefilled),
            queue_seconds=max(0.0, t_first - t_start),
            prefill_seconds=max(0.0, t_prefilled - t_first),
            generator_state=gen_state.numpy().tobytes() if gen_state is not None else b"",
            finish_reason=c.ended,
            blocks_written=c.stream.sent,
        )
        if out.new_logprobs and out.new_logprobs[0] is not None:
            res.first_token_logprobs.CopyFrom(logprobs_to_proto(out.new_logprobs[0]))
        if done.prompt_logprobs is not None:
            # entry 0 is None (no prefix), every later one is set (engine.sampler.prompt_logprobs)
            res.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in done.prompt_logprobs[1:] if lp is not None)
        if done.hidden is not None:
            res.mtp_hidden.CopyFrom(tensor_to_proto(done.hidden))
        log.info(
            "request %s: prefilled %d tokens (%d cached) in %.3f s (queued %.3f s), sent %.2f MB in %.3f s",
            rid,
            c.prompt_len,
            done.cached,
            t_prefilled - t_first,
            t_first - t_start,
            c.stream.nbytes / 1e6,
            t_done - t_prefilled,
        )
        res.handler_seconds = time.monotonic() - t_start
        return res

    def _wait_prefilled(
        self, s: PrefillStream, q, deadline: float, context: grpc.ServicerContext
    ) -> RequestOutput | _Failure:
        """The output that sampled the first token. Read before the stream's state: the step's hook may
        already have stopped the stream of a request that finished at its first token."""
        while True:
            try:
                out = q.get(timeout=max(0.0, min(deadline - time.monotonic(), 0.5)))
            except queue.Empty:
                out = None
            if isinstance(out, BaseException):
                return _Failure(pb.ERROR_CODE_INTERNAL, f"engine failed: {out!r}")
            if out is not None and out.finished:
                if out.finish_reason in ("prefilled", *_FINISH) and out.new_token_ids:
                    return out
                if s.check() is not StreamState.LOST:
                    return _Failure(pb.ERROR_CODE_ABORTED, f"aborted in the engine ({out.finish_reason})")
            state = s.check()
            if state is StreamState.LOST:
                return _Failure(pb.ERROR_CODE_TRANSFER_FAILED, s.why)
            if state is StreamState.STOPPING:
                return _Failure(pb.ERROR_CODE_ABORTED, f"aborted ({s.why})")
            if not context.is_active():
                s.stop("the router went away")
                return _Failure(pb.ERROR_CODE_ABORTED, "aborted: the router went away")
            if time.monotonic() >= deadline:
                s.stop("first-token deadline")
                return _Failure(
                    pb.ERROR_CODE_DEADLINE_EXCEEDED, f"no first token within {self.spec.first_token_timeout_s:.0f} s"
                )

    def _wait_transfers(
        self, s: PrefillStream, deadline: float, ended: bool, context: grpc.ServicerContext
    ) -> _Failure | None:
        """Until the cache is DELIVERED (or, for a request that ended at its first token, until the
        writes under way settled)."""
        while True:
            state = s.check()
            if state is StreamState.DELIVERED:
                return None
            if state is StreamState.LOST:
                return _Failure(pb.ERROR_CODE_TRANSFER_FAILED, s.why)
            if state is StreamState.STOPPING and not ended:
                return _Failure(pb.ERROR_CODE_ABORTED, f"aborted during transfer ({s.why})")
            if ended and s.settled():
                return None
            if time.monotonic() > deadline:
                s.stop("transfer deadline")
                return _Failure(
                    pb.ERROR_CODE_DEADLINE_EXCEEDED,
                    f"cache transfer not done within {self.spec.transfer_timeout_s:.0f} s",
                )
            time.sleep(0.0005)

    def _cleanup(self, rid: str, c: _Call) -> None:
        s = c.stream
        delivered = s.check() is StreamState.DELIVERED

        def drop(eng: Engine) -> None:
            with self.lock:
                self.calls.pop(rid, None)
            s.release()  # handles forgotten; the decode side told RELEASED unless delivered
            req = eng.requests.get(rid)
            if req is not None:
                if req.prefill_only and req.is_finished:
                    eng.release_prefilled(rid)
                else:
                    eng.abort(rid)

        try:
            # not waited for when the cache was delivered: the reply (the first token) need not wait for
            # the engine's current step to end; the blocks are freed between two steps all the same
            fut = self.rt.loop.submit(drop)
            if delivered:
                fut.add_done_callback(lambda f: _log_cleanup_failure(rid, f))
            else:
                fut.result(30.0)
        except Exception:  # noqa: BLE001 - the loop is gone; nothing left to free
            log.exception("request %s: cleanup failed", rid)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        rid = request.request_id
        now = time.monotonic()
        with self.lock:
            c = self.calls.get(rid)
            stream = c.stream if c is not None else None
            if stream is None:  # it may still be on its way: refuse it when it comes
                self.tombstones[rid] = now
                for old in [k for k, t in self.tombstones.items() if t < now - 600]:
                    del self.tombstones[old]
        if stream is not None:
            stream.stop(request.reason or "aborted")  # its Prefill sees it and answers ABORTED
        return pb.AbortReply(found=stream is not None)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        state = pb.SERVING_STATE_DRAINING if self.draining else pb.SERVING_STATE_SERVING
        if not self.rt.loop.alive:
            state = pb.SERVING_STATE_STOPPING
        return pb.HealthReply(state=state, kind=pb.WORKER_KIND_PREFILL, worker_id=self.spec.worker_id)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        return pb.StatsReply(kind=pb.WORKER_KIND_PREFILL, worker_id=self.spec.worker_id, **self.stats())

    def stats(self) -> dict:
        eng = self.rt.engine
        with self.lock:
            running, queued = len(self.calls), self.queued_prefill_tokens
        return dict(
            blocks_used=eng.blocks_used,
            blocks_total=eng.blocks_total,
            running=running,
            waiting=len(eng.scheduler.waiting),
            requests_done=self.requests_done,
            pid=self.rt.pid,
            node=self.rt.node,
            queued_prefill_tokens=max(0, queued),
            weight_bytes=eng.weight_bytes,
            **self.rt.warm_stats(),
        )


def serve(spec: WorkerSpec) -> WorkerServer:
    rt = WorkerRuntime(spec)
    return WorkerServer(rt, PrefillService(rt), pbg.add_PrefillWorkerServicer_to_server, "prefill")
