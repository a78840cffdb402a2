"""The prefill worker: a gRPC server around an engine in prefill mode.

Life of a Prefill call (request id R, destination decode worker D with reserved blocks B_D):
1. the transport adds D as a peer on first use (handshake: compat fields checked first);
2. the engine runs R's prompt in chunks (prefill_only: it stops after sampling the first token and
   keeps R's blocks); the prefix cache may serve leading blocks;
3. after every engine step, blocks of R whose every layer (MTP layer included) is final are
   written to the matching blocks of B_D — transfer overlaps the remaining chunks' compute; runs of
   consecutive block ids travel as one descriptor per pool;
4. once the first token is sampled, the remaining blocks go out with the notification "R:epoch",
   which D sees only after those bytes landed;
5. when every write is DONE, R's blocks are freed here and the reply carries the first token, its
   logprobs, the prompt logprobs, the MTP state (main hidden state at the last prompt position) and
   the request's generator state (so seeded sampling continues exactly on D).
Abort, a failed write or a timeout frees R's blocks here and answers with an error; D's reserved
blocks are D's to free (the router aborts there).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import grpc

from splitserve.engine.engine import Engine, RequestError
from splitserve.engine.request import RequestOutput
from splitserve.engine.runtime import WorkerRuntime, WorkerServer, WorkerSpec
from splitserve.kvtransfer import HandshakeError, TransferHandle, TransferState
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.protos.convert import sampling_params_from_proto
from splitserve.protos.tensors import logprobs_to_proto, tensor_to_proto

log = logging.getLogger(__name__)


@dataclass
class _Stream:
    """Cache blocks of one request on their way to its decode worker."""

    request_id: str
    peer: str
    remote_blocks: list[int]
    epoch: int
    prompt_len: int
    sent: int = 0                      # leading blocks already handed to the transport
    handles: list[TransferHandle] = field(default_factory=list)
    final_sent: bool = False
    error: str | None = None
    bytes: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    t_first_step: float | None = None  # start of the engine step that ran its first chunk
    t_computed: float | None = None    # end of the step that sampled the first token
    finish: tuple | None = None        # (hidden, generator state, cached tokens, prompt logprobs)
    finished: threading.Event = field(default_factory=threading.Event)  # finish (or error) is set


class PrefillService(pbg.PrefillWorkerServicer):
    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.spec = rt.spec
        self.peers: dict[str, str] = {}     # agent name -> transport peer name
        self.peer_lock = threading.Lock()
        self.streams: dict[str, _Stream] = {}
        self.cancelled: set[str] = set()
        self.tombstones: dict[str, float] = {}   # aborted before they arrived: refuse them for a while
        self.draining = False
        self.requests_done = 0
        self.queued_prefill_tokens = 0
        rt.loop.after_step.append(self._after_step)

    # ---- transfer (runs in the engine loop thread) -------------------------------------------
    def _complete_blocks(self, eng: Engine, s: _Stream) -> int:
        req = eng.requests.get(s.request_id)
        if req is None:
            return s.sent
        done = min(req.num_computed, req.mtp_computed) if eng.mtp_cache else req.num_computed
        return min(done, s.prompt_len) // eng.cfg.block_size

    def _send(self, eng: Engine, s: _Stream, upto: int, notif: bytes | None) -> None:
        req = eng.requests.get(s.request_id)
        if req is None:
            s.error = "request vanished from the engine"
            return
        local = req.block_table[s.sent:upto]
        remote = s.remote_blocks[s.sent:upto]
        if not local and notif is None:
            return
        h = self.rt.transport.write_blocks(s.peer, local, remote, notif=notif)
        s.handles.append(h)
        s.bytes += h.nbytes
        s.sent = upto

    def _after_step(self, eng: Engine, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()
        prefilled = {o.request_id for o in outputs if o.finished and o.finish_reason == "prefilled"}
        for s in list(self.streams.values()):
            if s.t_first_step is None:
                req = eng.requests.get(s.request_id)
                if s.request_id in prefilled or (req is not None and req.num_computed > 0):
                    s.t_first_step = now - eng.stats.step_seconds
            if s.request_id in prefilled and not s.finished.is_set():
                # the first token is sampled: send the last blocks with the notification in this step's
                # hook, not after a round trip into the loop (which waits for the next step to end)
                if not s.error and not s.final_sent:
                    s.t_computed = now
                    try:
                        s.finish = self._finish_now(eng, s)
                    except Exception as e:  # noqa: BLE001 - the handler answers with the error
                        s.error = f"finishing the prefill failed: {e!r}"
                s.finished.set()  # the handler waits for this, error or not
                continue
            if s.final_sent or s.error:
                continue
            for h in s.handles:  # a failed write ends the request now, not after its whole prefill
                if self.rt.transport.poll(h) is TransferState.FAILED:
                    s.error = f"cache transfer failed: {self.rt.transport.error(h)}"
                    eng.abort(s.request_id)
                    break
            else:
                upto = self._complete_blocks(eng, s)
                if upto > s.sent:
                    self._send(eng, s, upto, None)

    def _finish_now(self, eng: Engine, s: _Stream) -> tuple:
        req = eng.requests[s.request_id]
        self._finish_stream(eng, s)
        hidden = req.pending_hidden[-1].float().cpu() if req.pending_hidden is not None else None
        gen = req.generator.get_state().cpu() if req.generator is not None else None
        return hidden, gen, req.num_cached_prompt, req.prompt_logprobs

    def _finish_stream(self, eng: Engine, s: _Stream) -> None:
        bs = eng.cfg.block_size
        self._send(eng, s, -(-s.prompt_len // bs), notif=f"{s.request_id}:{s.epoch}".encode())
        s.final_sent = True

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

        def error(code: int, msg: str) -> pb.PrefillReply:
            log.warning("request %s: prefill failed: %s", rid, msg)
            return pb.PrefillReply(error=pb.Error(code=code, message=msg))

        if self.draining:
            return error(pb.ERROR_CODE_UNAVAILABLE, "prefill worker is draining")
        if self.tombstones.pop(rid, None) is not None:
            return error(pb.ERROR_CODE_INVALID_ARGUMENT, "aborted before it started")  # nothing written
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return error(pb.ERROR_CODE_DEADLINE_EXCEEDED, "arrived after its deadline")
        try:
            params = sampling_params_from_proto(request.sampling)
        except ValueError as e:
            return error(pb.ERROR_CODE_INVALID_ARGUMENT, str(e))
        prompt = list(request.prompt_token_ids)
        dest = request.destination
        try:
            peer = self._peer_for(dest)
        except HandshakeError as e:
            return error(pb.ERROR_CODE_INCOMPATIBLE, f"transfer handshake with {dest.decode_worker_id} refused: {e}")
        except Exception as e:  # noqa: BLE001
            return error(pb.ERROR_CODE_TRANSFER_FAILED, f"cannot reach {dest.decode_worker_id}: {e}")
        bs = self.rt.engine.cfg.block_size
        if len(dest.block_ids) * bs < len(prompt):
            return error(pb.ERROR_CODE_INVALID_ARGUMENT,
                         f"destination has {len(dest.block_ids)} blocks for a {len(prompt)}-token prompt")

        stream = _Stream(rid, peer, list(dest.block_ids), dest.epoch, len(prompt))
        q = self.rt.loop.subscribe(rid)
        self.queued_prefill_tokens += len(prompt)
        try:
            def add(eng: Engine) -> None:
                eng.add_request(rid, prompt, params, prefill_only=True)
                self.streams[rid] = stream
            try:
                self.rt.loop.call(add)
            except RequestError as e:
                return error(pb.ERROR_CODE_INVALID_ARGUMENT, str(e))

            deadline = t_start + self.spec.first_token_timeout_s
            out = self._wait_prefilled(rid, q, deadline, context)
            if stream.error:
                self._forget_peer(dest.agent_name)
                return error(pb.ERROR_CODE_TRANSFER_FAILED, stream.error)
            if isinstance(out, str):
                return error(pb.ERROR_CODE_ABORTED if "abort" in out else pb.ERROR_CODE_DEADLINE_EXCEEDED, out)
            # the step's hook sends the last blocks and takes the state it runs right after the output
            if not stream.finished.wait(max(0.0, deadline - time.monotonic())):
                return error(pb.ERROR_CODE_DEADLINE_EXCEEDED, "the prefill did not finish in time")
            if stream.error:
                self._forget_peer(dest.agent_name)
                return error(pb.ERROR_CODE_TRANSFER_FAILED, stream.error)
            if stream.finish is None:
                return error(pb.ERROR_CODE_INTERNAL, "the prefill finished without its state")
            t_prefilled = stream.t_computed or time.monotonic()
            hidden, gen_state, cached, prompt_lps = stream.finish
            err = self._wait_transfers(stream, t_prefilled + self.spec.transfer_timeout_s, context)
            if err:
                if "transfer failed" in err:
                    self._forget_peer(dest.agent_name)
                return error(pb.ERROR_CODE_TRANSFER_FAILED, err)
            t_done = time.monotonic()
            t_first = min(stream.t_first_step or t_prefilled, t_prefilled)
            res = pb.PrefillResult(
                first_token=out.new_token_ids[0], num_cached_tokens=cached, transfer_bytes=stream.bytes,
                transfer_seconds=max(0.0, t_done - t_prefilled), queue_seconds=max(0.0, t_first - t_start),
                prefill_seconds=max(0.0, t_prefilled - t_first), handler_seconds=time.monotonic() - t_start,
                generator_state=gen_state.numpy().tobytes() if gen_state is not None else b"")
            if out.new_logprobs and out.new_logprobs[0] is not None:
                res.first_token_logprobs.CopyFrom(logprobs_to_proto(out.new_logprobs[0]))
            if prompt_lps is not None:
                res.prompt_logprobs.extend(logprobs_to_proto(lp) for lp in prompt_lps[1:])
            if hidden is not None:
                res.mtp_hidden.CopyFrom(tensor_to_proto(hidden))
            self.requests_done += 1
            log.info("request %s: prefilled %d tokens (%d cached) in %.3f s, sent %.2f MB in %.3f s",
                     rid, len(prompt), cached, t_prefilled - t_start, stream.bytes / 1e6, t_done - t_prefilled)
            return pb.PrefillReply(prefill=res)
        finally:
            self.queued_prefill_tokens -= len(prompt)
            self.rt.loop.unsubscribe(rid)
            self._cleanup(rid, stream)

    def _wait_prefilled(self, rid: str, q, deadline: float, context: grpc.ServicerContext) -> RequestOutput | str:
        while True:
            if rid in self.cancelled:
                return "aborted"
            s = self.streams.get(rid)
            if s is not None and s.error:
                return s.error
            if not context.is_active():
                return "aborted: the router went away"
            left = deadline - time.monotonic()
            if left <= 0:
                return f"no first token within {self.spec.first_token_timeout_s:.0f} s"
            try:
                out = q.get(timeout=min(left, 0.5))
            except Exception:  # queue.Empty
                continue
            if isinstance(out, BaseException):
                return f"engine failed: {out!r}"
            if out.finished:
                if out.finish_reason != "prefilled" or not out.new_token_ids:
                    return f"aborted ({out.finish_reason})"
                return out

    def _wait_transfers(self, s: _Stream, deadline: float, context: grpc.ServicerContext) -> str | None:
        t = self.rt.transport
        pending = list(s.handles)
        while pending:
            if s.request_id in self.cancelled:
                return "aborted during transfer"
            nxt = []
            for h in pending:
                st = t.poll(h)
                if st is TransferState.FAILED:
                    return f"cache transfer failed: {t.error(h)}"
                if st is not TransferState.DONE:
                    nxt.append(h)
            pending = nxt
            if pending:
                if time.monotonic() > deadline:
                    return f"cache transfer not done within {self.spec.transfer_timeout_s:.0f} s"
                time.sleep(0.0005)
        return None

    def _cleanup(self, rid: str, s: _Stream) -> None:
        delivered = s.final_sent and all(self.rt.transport.poll(h) is TransferState.DONE for h in s.handles)

        def drop(eng: Engine) -> None:
            self.streams.pop(rid, None)
            for h in s.handles:
                self.rt.transport.release(h)
            if not delivered:  # tell the decode side nothing more will be written for this epoch
                try:
                    self.rt.transport.send_notif(s.peer, f"released:{rid}:{s.epoch}".encode())
                except Exception as e:  # noqa: BLE001 - the peer may be gone; its quarantine times out
                    log.info("request %s: 'released' notification not sent: %s", rid, e)
            if rid in eng.requests:
                if eng.requests[rid].prefill_only and eng.requests[rid].is_finished:
                    eng.release_prefilled(rid)
                else:
                    eng.abort(rid)
        try:
            # not waited for when the cache was delivered: the reply (the first token) need not wait for
            # the engine's current step to end; the blocks are freed between steps all the same
            fut = self.rt.loop.submit(drop)
            if not delivered:
                fut.result(30.0)
            else:
                fut.add_done_callback(lambda f: f.exception() and log.error(
                    "request %s: cleanup failed: %r", rid, f.exception()))
        except Exception:  # noqa: BLE001 - the loop is gone; nothing left to free
            log.exception("request %s: cleanup failed", rid)
        self.cancelled.discard(rid)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        rid = request.request_id
        found = rid in self.streams
        if found:
            self.cancelled.add(rid)
        else:  # it may still be on its way: refuse it when it comes
            now = time.monotonic()
            self.tombstones[rid] = now
            for old in [k for k, t in self.tombstones.items() if t < now - 600]:
                del self.tombstones[old]
        return pb.AbortReply(found=found)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        state = pb.SERVING_STATE_DRAINING if self.draining else pb.SERVING_STATE_SERVING
        if not self.rt.loop.alive:
            state = pb.SERVING_STATE_STOPPING
        return pb.HealthReply(state=state, kind=pb.WORKER_KIND_PREFILL, worker_id=self.spec.worker_id)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        return pb.StatsReply(kind=pb.WORKER_KIND_PREFILL, worker_id=self.spec.worker_id, **self.stats())

    def stats(self) -> dict:
        eng = self.rt.engine
        return dict(blocks_used=eng.blocks_used, blocks_total=eng.blocks_total, running=len(self.streams),
                    waiting=len(eng.scheduler.waiting), requests_done=self.requests_done, pid=self.rt.pid,
                    node=self.rt.node, queued_prefill_tokens=max(0, self.queued_prefill_tokens),
                    **self.rt.warm_stats())


def serve(spec: WorkerSpec) -> WorkerServer:
    rt = WorkerRuntime(spec)
    return WorkerServer(rt, PrefillService(rt), pbg.add_PrefillWorkerServicer_to_server, "prefill")
