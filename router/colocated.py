"""The co-located driver (`router.mode: colocated`, no prefill pool): each request runs whole on one
decode worker (PrefillAndGenerate), whose engine prefills the prompt in chunks batched with its
running decodes. A segment of a request (see `ClusterBackend.generate`: a lost worker costs a
migration, not the request):

1. rank the decode workers by the routing policy (policy.py; least_loaded: fewest requests this
   router has in flight there, then fewest of their prompt tokens still waiting for a first token,
   then most free blocks);
2. PrefillAndGenerate on the first; one that is draining or unreachable before the first token
   (NotTaken) is skipped for the next; none left -> Unavailable (the app's 503); a prompt beyond a
   worker's cache -> NeverFits (400);
3. the first token must come within first_token_timeout_s (queueing and prefill included), each later
   one within idle_stream_timeout_s (past it the worker counts as lost) — the shared relay (relay.py);
4. whatever ends the request early (client gone, stop string, error, timeout) cancels the stream and
   sends Abort, so the worker aborts the request in its engine and frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from splitserve.engine.sampling_params import SamplingParams
from splitserve.protos import worker_pb2 as pb
from splitserve.protos.convert import sampling_params_to_proto

from .backend import GenerationDelta, Unavailable
from .cluster_backend import ClusterBackend
from .membership import WorkerInfo
from .relay import NotTaken, StreamRelay

log = logging.getLogger(__name__)


class ColocatedBackend(ClusterBackend):
    mode = "colocated"

    def _replica_order(self, prompt: list[int]) -> list[WorkerInfo]:
        req, pending = self.inflight.requests, self.inflight.prompt_tokens
        return self.policy.rank(
            self.directory.serving("decode"),
            prompt,
            load=lambda w: (req.get(w.worker_id, 0), pending.get(w.worker_id, 0), -w.free_blocks, w.worker_id),
            backlog=lambda w: pending.get(w.worker_id, 0),
        )

    async def _segment(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, avoid: set[str]
    ) -> AsyncIterator[GenerationDelta]:
        request = pb.PrefillAndGenerateRequest(
            request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling_params_to_proto(params)
        )
        tried: set[str] = set()
        error = "no decode worker is serving"
        while True:
            order = [w for w in self._replica_order(prompt_token_ids) if w.worker_id not in tried]
            order = [w for w in order if w.worker_id not in avoid] or order
            if not order:
                raise Unavailable(error)  # none serving, or every one draining or unreachable
            w = order[0]
            tried.add(w.worker_id)
            try:
                async for delta in self._on(w, request, params):
                    yield delta
                return
            except NotTaken as e:
                error = str(e)
                log.info(
                    "request %s: %s did not take it (%s); trying another decode worker", request_id, w.worker_id, error
                )

    async def _on(
        self, w: WorkerInfo, request: pb.PrefillAndGenerateRequest, params: SamplingParams
    ) -> AsyncIterator[GenerationDelta]:
        """The request on worker w, relayed; its in-flight counts held until it ends there."""
        wid, n_prompt = w.worker_id, len(request.prompt_token_ids)
        fl = self.inflight
        fl.add(fl.requests, wid, 1)
        fl.add(fl.prompt_tokens, wid, n_prompt)
        relay = StreamRelay(
            wid,
            params,
            self.first_token_timeout_s,
            self.idle_stream_timeout_s,
            on_first=lambda: fl.add(fl.prompt_tokens, wid, -n_prompt),
        )
        stub = self.clients.decode(w)
        call = stub.PrefillAndGenerate(request)
        try:
            async for delta in relay.deltas(call):
                yield delta
        finally:
            if not relay.got_first:
                fl.add(fl.prompt_tokens, wid, -n_prompt)
            fl.add(fl.requests, wid, -1)
            call.cancel()
            if not relay.finished:
                # shielded: the caller may be cancelled, the worker must still hear of it
                await asyncio.shield(self.clients.abort(stub, request.request_id, 0, "request ended early"))
