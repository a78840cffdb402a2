"""Overlapped decode steps: the host plans and launches step N+1 while the device still runs step N.

A synchronous decode step reads its sampled tokens to the host (a device sync) before the next step
can be planned, so the device idles while the host appends tokens, checks stop conditions, builds the
next row plan and copies it in. Here (EngineConfig.overlap_scheduling), a decode step is launched
without waiting for it (`ModelRunner.launch_decode`: its tokens stay on the device, copied to pinned
host memory behind an event), and the host reads step N's tokens only after step N+1 is launched:

    step() call N+1:  plan N+1 -> launch N+1 (fed N's tokens on the device) -> wait for N -> apply N

Planning N+1 before N's tokens are known: every request of N continues, at position +1 whatever its
token is; its input id is copied on the device from N's sampled tokens (`DecodeGraphs.run`'s feed).
A request that N finishes by length (max_tokens, max_model_len) is known to finish before its token
is: it gets no row in N+1. One that N finishes by a stop token (EOS, stop_token_ids) had a row in N+1:
that row's output is discarded and its cache write lands in blocks the request still owns — they are
freed only when N+1 has completed (`InFlight.deferred`). An abort waits for the step in flight
(one step at most) and frees at once. No block is freed while a launched step can still write it:
step N's blocks are freed after N's event, and only the newest step is ever in flight.

Nothing between the launch of N+1 and the wait for N synchronises with the device: the row plan and
the small index and parameter tensors reach it through pinned memory (rows.pack, sampler.to_device),
the sampler decides its shortcuts on the host, and N's results come back by non-blocking copies into
pinned memory. Requests that join the batch (adopted from a prefill worker) take their input token
from the host in the same step.

Exactness: the rows, inputs and sampling of an overlapped step are those of the synchronous step
(greedy: the argmax of the biased logits; sampling: the sampler's exponential race from the request's
generator, = verification with no drafts); logprobs are computed on the device at launch and read
with the tokens. Request counters (num_computed, output_ids) only ever hold what the host has read;
the row in flight is the +1 of the next plan.

Which steps overlap (`Overlap.step` returns None for the others, which run synchronously after the
step in flight is applied): every running request decodes (no prefill chunk, nothing waiting that
could be admitted), none has penalties (they need the tokens on the host), none was adopted already
finished, no MTP, one rank, paged kernels, the rows fit the token budget and the new blocks fit
without preemption. Prefill chunks, preemption, MTP and tensor parallelism are therefore synchronous.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .request import Request, RequestOutput
from .runner import Launched

if TYPE_CHECKING:
    from .engine import Engine


@dataclass(slots=True)
class InFlight:
    """A launched decode step: its requests in row order, the block each row writes, and blocks to
    free once it has run (of requests that finished before it did)."""

    reqs: list[Request]
    writes: list[int]
    launched: Launched
    deferred: list[int] = field(default_factory=list)
    waited: bool = False  # the host waited for it: it has run (Overlap.wait)
    members: set[int] = field(default_factory=set)  # id() of its requests

    def __post_init__(self) -> None:
        self.members = {id(r) for r in self.reqs}


class Overlap:
    def __init__(self, engine: Engine) -> None:
        self.eng = engine
        self.inflight: InFlight | None = None
        self.steps = 0  # steps launched overlapped

    @staticmethod
    def supported(engine: Engine) -> bool:
        """Where overlapped steps can run at all: single rank, paged kernels, no MTP."""
        return engine.mtp_k == 0 and not engine.parallel.distributed and engine.runner.paged

    def holds(self, req: Request) -> bool:
        return self.inflight is not None and id(req) in self.inflight.members

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput] | None:
        """Launch the next decode step, then apply the one before it; None: this step does not
        overlap (the caller drains and runs it synchronously)."""
        prev = self.inflight
        plan = self._plan(prev)
        if plan is None:
            return None
        reqs, positions, ids, fed = plan
        launched = self.eng.runner.launch_decode(reqs, positions, ids, fed, prev.launched.tokens if prev else None)
        bs = self.eng.cfg.block_size
        self.inflight = InFlight(reqs, [r.block_table[p // bs] for r, p in zip(reqs, positions)], launched)
        self.steps += 1
        outputs = self._apply(prev) if prev is not None else []
        cur = self.inflight
        if cur is not None and all(r.is_finished for r in cur.reqs):  # only wasted rows left: settle now
            outputs += self.drain()
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Wait for the step in flight (if any) and apply it."""
        prev, self.inflight = self.inflight, None
        return self._apply(prev) if prev is not None else []

    def wait(self) -> None:
        """Wait for the step in flight to complete (its results stay to be applied)."""
        if self.inflight is not None:
            self.inflight.launched.wait()
            self.inflight.waited = True

    def _plan(self, prev: InFlight | None) -> tuple[list[Request], list[int], list[int], list[tuple[int, int]]] | None:
        eng = self.eng
        sched, cfg = eng.scheduler, eng.cfg
        if sched.waiting and len(sched.running) < cfg.max_running:
            return None  # someone could be admitted: that step has a prefill chunk
        row_of = {id(r): i for i, r in enumerate(prev.reqs)} if prev is not None else {}
        reqs: list[Request] = []
        positions: list[int] = []
        ids: list[int] = []
        fed: list[tuple[int, int]] = []
        for r in sched.running:
            if r.is_finished:
                if r.prefill_only:
                    continue  # its blocks wait for the owner; it has nothing to compute
                return None  # adopted and finished on its first token: the sync step reports it
            if r.params.has_penalties:
                return None
            j = row_of.get(id(r))
            if j is not None:  # its token of step N is on the device; its position is +1 whatever it is
                if len(r.output_ids) + 1 >= r.params.max_tokens or r.num_tokens + 1 >= eng.max_model_len:
                    continue  # step N finishes it by length: no row here
                fed.append((len(reqs), j))
                positions.append(r.num_computed + 1)
                ids.append(0)
            elif r.in_decode:
                positions.append(r.num_computed)
                ids.append(r.output_ids[-1])  # in decode: its last token is a sampled one
            else:
                return None  # a prefill chunk
            reqs.append(r)
        if not reqs or len(reqs) > cfg.max_batch_tokens:
            return None
        need = sum(max(0, sched.blocks_for(p + 1) - len(r.block_table)) for r, p in zip(reqs, positions))
        if need and not eng.blocks.can_allocate(need):
            return None  # the scheduler preempts (or finishes) someone: a synchronous step
        for r, p in zip(reqs, positions):
            grown = sched.grow(r, p + 1)
            assert grown
        return reqs, positions, ids, fed

    def _apply(self, f: InFlight) -> list[RequestOutput]:
        """Read step f's tokens (waiting for it), append them, apply stop conditions; then free the
        blocks of requests whose last row it was."""
        eng = self.eng
        f.launched.wait()
        toks = f.launched.host_tokens.tolist()
        lp_index = {row: j for j, row in enumerate(f.launched.logprob_rows)}
        outputs: list[RequestOutput] = []
        eng.stats.steps += 1
        now = time.monotonic()
        for i, r in enumerate(f.reqs):
            if r.is_finished:
                continue  # finished by the step before or aborted: a wasted row
            t = toks[i]
            r.num_computed += 1
            r.output_ids.append(t)
            lps = None
            j = lp_index.get(i)
            if j is not None:
                lps = [f.launched.logprobs(j, int(r.params.logprobs or 0))]
                r.output_logprobs.append(lps[0])
            eng.stats.decode_steps += 1
            if r.first_token_time is None:  # adopted: its first token came from the prefill side
                r.first_token_time = now
            eng.scheduler.register_full_blocks(r)
            reason = eng._finish_reason(r, [t])
            if reason is not None:
                later = self.inflight if self.inflight is not None and self.holds(r) else None
                outputs.append(eng._finish(r, [t], lps, reason, defer=later.deferred if later else None))
            else:
                outputs.append(
                    RequestOutput(
                        r.request_id,
                        [t],
                        lps,
                        False,
                        None,
                        num_prompt_tokens=len(r.prompt_ids),
                        num_output_tokens=len(r.output_ids),
                    )
                )
        if f.deferred:
            eng.blocks.free(f.deferred)
        return outputs
