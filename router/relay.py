"""The stream relay both modes share: a worker's GenerateChunk stream (Generate, PrefillAndGenerate)
as the router's GenerationDeltas, with the timeouts and the error codes that decide what happens next:

* a delta -> a GenerationDelta (logprobs when asked; prompt logprobs with the first one);
* finished -> the last delta, with its finish reason;
* before the first token, ERROR_CODE_TOO_LONG -> NeverFits (the app's 400) and UNAVAILABLE, or the
  worker unreachable -> NotTaken (the caller tries another worker);
* the worker gone or silent (the stream ends, breaks, or no token for idle_timeout_s; the codes in
  DECODE_LOST) -> DecodeLost (the caller migrates the request);
* any other error, or no first token within first_token_timeout_s -> an error delta (the request fails).

`finished` says whether the worker is done with the request (nothing to abort there).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc

from splitserve.engine.sampling_params import SamplingParams
from splitserve.protos import worker_pb2 as pb
from splitserve.protos.tensors import logprobs_from_proto

from .backend import GenerationDelta, NeverFits

FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}
# stream errors that mean the decode worker lost the request (migrate it), not that the request is bad
DECODE_LOST = frozenset({pb.ERROR_CODE_INTERNAL, pb.ERROR_CODE_NOT_FOUND, pb.ERROR_CODE_DEADLINE_EXCEEDED})


class DecodeLost(RuntimeError):
    """The decode worker of a running request is gone or silent."""

    def __init__(self, worker_id: str, reason: str) -> None:
        super().__init__(f"{worker_id}: {reason}")
        self.worker_id, self.reason = worker_id, reason


class NotTaken(RuntimeError):
    """The worker refused the request before its first token (draining, unreachable)."""


class StreamRelay:
    def __init__(
        self,
        worker_id: str,
        params: SamplingParams,
        first_token_timeout_s: float,
        idle_timeout_s: float,
        *,
        got_first: bool = False,
        on_first: Callable[[], None] | None = None,
    ) -> None:
        self.worker_id, self.params = worker_id, params
        self.first_token_timeout_s, self.idle_timeout_s = first_token_timeout_s, idle_timeout_s
        self.got_first, self.on_first = got_first, on_first
        self.finished = False

    async def deltas(self, call) -> AsyncIterator[GenerationDelta]:
        it = call.__aiter__()
        while True:
            chunk = await self._next(it)
            if chunk is None:  # no first token in time
                yield GenerationDelta(
                    [],
                    finish_reason="abort",
                    error=(f"{self.worker_id}: no first token within {self.first_token_timeout_s:.0f} s"),
                )
                return
            kind = chunk.WhichOneof("chunk")
            if kind == "delta":
                yield self._delta(chunk.delta)
            elif kind == "finished":
                self.finished = True
                yield GenerationDelta([], finish_reason=FINISH.get(chunk.finished.finish_reason, "abort"))
                return
            else:
                yield self._error(chunk.error)
                return

    async def _next(self, it) -> pb.GenerateChunk | None:
        wid = self.worker_id
        try:
            return await asyncio.wait_for(
                it.__anext__(), self.idle_timeout_s if self.got_first else self.first_token_timeout_s
            )
        except StopAsyncIteration:
            raise DecodeLost(wid, "stream ended without finishing") from None
        except TimeoutError:
            if not self.got_first:
                return None
            raise DecodeLost(wid, f"no token for {self.idle_timeout_s:.0f} s") from None
        except grpc.aio.AioRpcError as e:
            self.finished = e.code() != grpc.StatusCode.DEADLINE_EXCEEDED  # gone: nothing to abort there
            if e.code() == grpc.StatusCode.UNAVAILABLE and not self.got_first:
                raise NotTaken(f"{wid}: {e.code().name}") from None
            raise DecodeLost(wid, f"{e.code().name} {e.details() or ''}".strip()) from None

    def _delta(self, d: pb.TokenDelta) -> GenerationDelta:
        delta = GenerationDelta(list(d.token_ids))
        if self.params.logprobs is not None and d.logprobs:
            delta.logprobs = [logprobs_from_proto(x) for x in d.logprobs]
        if not self.got_first:
            self.got_first = True
            if self.on_first is not None:
                self.on_first()
            if self.params.prompt_logprobs is not None:
                delta.prompt_logprobs = [None] + [logprobs_from_proto(x) for x in d.prompt_logprobs]
        return delta

    def _error(self, err: pb.Error) -> GenerationDelta:
        if not self.got_first and err.code == pb.ERROR_CODE_TOO_LONG:
            self.finished = True
            raise NeverFits(f"{self.worker_id}: {err.message}")
        if not self.got_first and err.code == pb.ERROR_CODE_UNAVAILABLE:
            self.finished = True
            raise NotTaken(f"{self.worker_id}: {err.message}")
        if err.code in DECODE_LOST:
            raise DecodeLost(self.worker_id, err.message)
        self.finished = True
        return GenerationDelta([], finish_reason="abort", error=f"decode worker: {err.message}")
