"""Overlapped decode steps: the host plans and launches step N+1 while the device still runs step N.

A synchronous decode step reads its sampled tokens to the host (a device sync) before the next step
can be planned, so the device idles while the host appends tokens, checks stop conditions, builds the
next row plan and copies it in. Here (EngineConfig.overlap_scheduling), a decode step is launched
without waiting for it (`ModelRunner.launch_decode`, with MTP `ModelRunner.launch_spec`: its results
stay on the device, copied to pinned host memory behind an event), and the host reads step N's results
only after step N+1 is launched:

    step() call N+1:  plan N+1 -> launch N+1 (fed N's results on the device) -> wait for N -> apply N

Planning N+1 before N's tokens are known: every request of N continues, at position +1 whatever its
token is; its input id is copied on the device from N's sampled tokens (`DecodeGraphs.run`'s feed).
A request that N finishes by length (max_tokens, max_model_len) is known to finish before its token
is: it gets no row in N+1. One that N finishes by a stop token (EOS, stop_token_ids) had a row in N+1:
that row's output is discarded and its cache write lands in blocks the request still owns — they are
freed only when N+1 has completed (`InFlight.deferred`). An abort waits for the step in flight
(one step at most) and frees at once. No block is freed while a launched step can still write it:
step N's blocks are freed after N's event, and only the newest step is ever in flight.

With MTP (k drafts, R = k + 1 rows a request), steps are the fused speculative step (spec_step.py),
and how many tokens N accepts (1..R) is known only on the device. A request of N gets its row in N+1
from N's results on the device (`SpecStep._feed`, a few small index kernels before the step, no host
sync): with a accepted, N+1 catches the MTP layer up on the a + 1 positions after N's base (their ids:
N's emitted tokens, their inputs: N's verified hidden states) and verifies at the a + 1 positions
after — what the host would plan once N is read. Its blocks are grown on the host for the worst case
(R more tokens, then R rows: base + 2R positions), so whatever N accepts, N+1 writes only blocks
the request owns. A request that N surely finishes by length (max_tokens) gets no row in N+1; one
that N might take to max_model_len gets none either (its worst case could pass the context): it is
planned from the host in N+2, after N is read. A request that N finishes (stop token, or max_tokens
reached inside its accepted drafts) had a row in N+1: wasted, its blocks deferred as above. Sampling
requests draw the step's randomness from their generator at launch, a fixed amount whatever N
accepts, so the draws are the synchronous engine's.

Nothing between the launch of N+1 and the wait for N synchronises with the device: the row plan and
the small index and parameter tensors reach it through pinned memory (rows.pack, sampler.to_device),
the sampler decides its shortcuts on the host, and N's results come back by non-blocking copies into
pinned memory. Requests that join the batch (adopted from a prefill worker, or after a synchronous
step) take their inputs from the host in the same step.

Exactness: the rows, inputs and sampling of an overlapped step are those of the synchronous step
(greedy: the argmax of the biased logits; sampling: the sampler's exponential race from the request's
generator, = verification with no drafts; with MTP: the fused step's program on the same inputs);
logprobs (without MTP) are computed on the device at launch and read with the tokens. Request
counters (num_computed, mtp_computed, pending_hidden, output_ids) only ever hold what the host has
read; the rows in flight are the next plan's fed rows.

Which steps overlap (`Overlap.step` returns None for the others, which run synchronously after the
step in flight is applied): every running request decodes (no prefill chunk, nothing waiting that
could be admitted), none has penalties (they need the tokens on the host), none was adopted already
finished, one rank, paged kernels, the rows fit the token budget and the new blocks fit without
preemption; with MTP, every request is one the fused step takes (`spec_step.eligible`: no logprobs,
no logit_bias) and relaxed acceptance is off (its thinking state is tracked on the host). Prefill
chunks, preemption, tensor parallelism and MTP steps of the per-phase path are therefore synchronous.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .request import Request, RequestOutput
from .runner import Launched
from .spec_step import SpecLaunched, eligible

if TYPE_CHECKING:
    from .engine import Engine


@dataclass(slots=True)
class InFlight:
    """A launched decode step: its requests in row order, the blocks each row may write, and blocks to
    free once it has run (of requests that finished before it did)."""

    reqs: list[Request]
    writes: list[list[int]]
    launched: Launched | SpecLaunched
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
        """Where overlapped steps can run at all: single rank, paged kernels; with MTP, the fused
        speculative step without relaxed acceptance."""
        runner = engine.runner
        if engine.parallel.distributed or not runner.paged:
            return False
        return engine.mtp_k == 0 or (runner.spec is not None and runner.relaxed is None)

    def holds(self, req: Request) -> bool:
        return self.inflight is not None and id(req) in self.inflight.members

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput] | None:
        """Launch the next decode step, then apply the one before it; None: this step does not
        overlap (the caller drains and runs it synchronously)."""
        prev = self.inflight
        cur = self._launch_spec(prev) if self.eng.mtp_k else self._launch(prev)
        if cur is None:
            return None
        self.inflight = cur
        self.steps += 1
        outputs = self._apply(prev) if prev is not None else []
        if all(r.is_finished for r in cur.reqs):  # only wasted rows left: settle now
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

    # ---- planning ---------------------------------------------------------------------------
    def _rows(self, prev: InFlight | None, ok: Callable[[Request], bool]) -> list[tuple[Request, int | None]] | None:
        """The running requests of the next step, each with its row in the step in flight (None: it
        is not there, its inputs come from the host); None when the step cannot overlap."""
        sched = self.eng.scheduler
        if sched.waiting and len(sched.running) < self.eng.cfg.max_running:
            return None  # someone could be admitted: that step has a prefill chunk
        row_of = {id(r): i for i, r in enumerate(prev.reqs)} if prev is not None else {}
        out: list[tuple[Request, int | None]] = []
        for r in sched.running:
            if r.is_finished:
                if r.prefill_only:
                    continue  # its blocks wait for the owner; it has nothing to compute
                return None  # adopted and finished on its first token: the sync step reports it
            j = row_of.get(id(r))
            if not ok(r) or (j is None and not r.in_decode):
                return None  # penalties, a step MTP cannot fuse, or a prefill chunk
            out.append((r, j))
        return out

    def _grow(self, reqs: list[Request], ends: list[int], rows_each: int) -> bool:
        """Blocks for positions up to ends[i] (exclusive) of each request; False (nothing allocated)
        when they do not fit, or the rows do not fit the token budget."""
        eng = self.eng
        sched = eng.scheduler
        if not reqs or len(reqs) * rows_each > eng.cfg.max_batch_tokens:
            return False
        need = sum(max(0, sched.blocks_for(e) - len(r.block_table)) for r, e in zip(reqs, ends))
        if need and not eng.blocks.can_allocate(need):
            return False  # the scheduler preempts (or finishes) someone: a synchronous step
        for r, e in zip(reqs, ends):
            grown = sched.grow(r, e)
            assert grown
        return True

    def _launch(self, prev: InFlight | None) -> InFlight | None:
        """A decode step without MTP: one row per request, at position +1 if its token of the step in
        flight is still on the device."""
        eng = self.eng
        rows = self._rows(prev, lambda r: not r.params.has_penalties)
        if rows is None:
            return None
        reqs: list[Request] = []
        positions: list[int] = []
        ids: list[int] = []
        fed: list[tuple[int, int]] = []
        for r, j in rows:
            if j is not None:  # its token of step N is on the device; its position is +1 whatever it is
                if len(r.output_ids) + 1 >= r.params.max_tokens or r.num_tokens + 1 >= eng.max_model_len:
                    continue  # step N finishes it by length: no row here
                fed.append((len(reqs), j))
                positions.append(r.num_computed + 1)
                ids.append(0)
            else:
                positions.append(r.num_computed)
                ids.append(r.output_ids[-1])  # in decode: its last token is a sampled one
            reqs.append(r)
        if not self._grow(reqs, [p + 1 for p in positions], 1):
            return None
        tokens = None
        if prev is not None:
            assert isinstance(prev.launched, Launched)
            tokens = prev.launched.tokens
        launched = eng.runner.launch_decode(reqs, positions, ids, fed, tokens)
        bs = eng.cfg.block_size
        return InFlight(reqs, [[r.block_table[p // bs]] for r, p in zip(reqs, positions)], launched)

    def _launch_spec(self, prev: InFlight | None) -> InFlight | None:
        """A fused speculative step (MTP): R = k + 1 rows per request. A request of the step in flight
        (N) accepts 1..R tokens there, known only on the device: its row here is fed from N's results
        on the device (`SpecStep._feed`), with blocks for the worst case (R more tokens, then R rows)."""
        eng = self.eng
        r = eng.mtp_k + 1
        rows = self._rows(prev, eligible)
        if rows is None:
            return None
        reqs: list[Request] = []
        fed: list[tuple[int, int, int]] = []
        starts: list[int] = []
        ends: list[int] = []
        for q, j in rows:
            if j is not None:
                if len(q.output_ids) + 1 >= q.params.max_tokens or q.num_tokens + r >= eng.max_model_len:
                    continue  # N finishes it by length, or may bring it to the context's end: no row here
                fed.append((len(reqs), j, q.num_computed))
                starts.append(q.num_computed)
                ends.append(q.num_computed + 2 * r)
            else:
                starts.append(q.mtp_computed)
                ends.append(q.num_computed + r)
            reqs.append(q)
        if not self._grow(reqs, ends, r):
            return None
        bs = eng.cfg.block_size
        writes = [q.block_table[lo // bs : -(-hi // bs)] for q, lo, hi in zip(reqs, starts, ends)]
        before = None
        if prev is not None:
            assert isinstance(prev.launched, SpecLaunched)
            before = prev.launched
        return InFlight(reqs, writes, eng.runner.launch_spec(reqs, fed, before))

    # ---- results ----------------------------------------------------------------------------
    def _apply(self, f: InFlight) -> list[RequestOutput]:
        """Read step f's tokens (waiting for it), append them, apply stop conditions; then free the
        blocks of requests whose last row it was."""
        eng = self.eng
        st = eng.stats
        out = f.launched
        out.wait()
        k, r = eng.mtp_k, eng.mtp_k + 1
        if isinstance(out, SpecLaunched):
            spec = out.host.tolist()
        else:
            toks = out.host_tokens.tolist()
            lp_index = {row: j for j, row in enumerate(out.logprob_rows)}
        outputs: list[RequestOutput] = []
        st.steps += 1
        st.last_step_drafted = st.last_step_accepted = 0
        now = time.monotonic()
        for i, q in enumerate(f.reqs):
            if q.is_finished:
                continue  # finished by the step before or aborted: a wasted row
            lps = None
            if isinstance(out, SpecLaunched):  # as runner._spec_execute applies a step
                a = spec[i][0]
                new = spec[i][1 : a + 2]
                q.mtp_computed = q.num_computed
                q.pending_hidden = out.hidden[i * r : i * r + a + 1]
                q.draft_tokens += k
                q.accepted_draft_tokens += a
                st.last_step_drafted += k
                st.last_step_accepted += a
                st.draft_tokens += k
                st.accepted_draft_tokens += a
            else:
                a, new = 0, [toks[i]]
                j = lp_index.get(i)
                if j is not None:
                    lps = [out.logprobs(j, int(q.params.logprobs or 0))]
            q.num_computed += a + 1
            st.decode_steps += 1
            kept, reason = eng._append(q, new, lps)
            if q.first_token_time is None:  # adopted: its first token came from the prefill side
                q.first_token_time = now
            eng.scheduler.register_full_blocks(q)
            if reason is not None:
                later = self.inflight if self.inflight is not None and self.holds(q) else None
                outputs.append(eng._finish(q, kept, lps, reason, defer=later.deferred if later else None))
            else:
                outputs.append(
                    RequestOutput(
                        q.request_id,
                        kept,
                        lps,
                        False,
                        None,
                        num_prompt_tokens=len(q.prompt_ids),
                        num_output_tokens=len(q.output_ids),
                    )
                )
        if f.deferred:
            eng.blocks.free(f.deferred)
        return outputs
