"""Runs one scheduled step on the network: MTP drafting, the batched forward over the paged cache,
sampling, and speculative verification.

A step, for the scheduled items:
1. decode items (MTP on): the MTP layer catches up on the positions whose main hidden states are
   pending (their next tokens are known), the last of which proposes draft d_1; the same layer,
   fed its own output, proposes d_2..d_k (their MTP cache entries are provisional and are
   overwritten by the next catch-up).
2. one forward of the main model over every item's rows: prefill chunks in the decompressed MLA
   form, decode rows [last token, d_1..d_k] in the absorbed form.
3. prefill chunks that reach the end of the known tokens sample the next token; decode items
   verify their drafts (greedy: argmax agreement; sampling: rejection sampling), keep the
   accepted prefix plus one token, and roll num_computed back past the rejected rows (their cache
   entries are garbage beyond num_computed and are overwritten before being read).
4. requests still prefilling let the MTP layer catch up on their new positions right away, so a
   prefill worker hands over a complete MTP cache (minus the last position, whose next token is
   the sampled one: its main hidden state travels as the MTP state instead).

A decode-only step whose requests are all `spec_step.eligible` (no penalties, logit_bias or
logprobs) with the paged kernels on runs steps 1-3 as one tensor program instead (spec_step.py: one
CUDA graph replay and one device->host copy per step; its docstring counts what the per-phase path
above costs). A request with more pending MTP positions than k + 1 (the first decode step after a
local prefill) first catches up eagerly on all but its last one. (Single-rank workers only: its network calls
are not broadcast to tensor-parallel followers, so TP workers take the per-phase path.)

Tensor parallel (net.parallel of world size N > 1): the leader (rank 0) runs the engine and this
runner as above; before each call into the network (main forward, MTP forward, LM head) it
broadcasts that call's plan — the token runs (ids, first position, block table) and spans, and the
hidden states the call takes — and every follower rank, inside `follow()`, builds the same batch
over its own cache pool and makes the same call on its shard of the network. The collectives inside
the network pair up because every rank makes the same calls in the same order; the cache writes are
the same on every rank, so the followers' caches stay equal to the leader's. Sampling, drafting and
verification happen on the leader only (the LM head's logits are all-gathered, so it has all of them).
At world size 1 nothing is broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.kernels import argmax
from splitserve.model import DeepseekV32, ForwardBatch, SeqSpan
from splitserve.model.parallel import ParallelState

from .cache import CachePool, PagedStore
from .request import Request
from .rows import DecodeGraphs, RowPlan
from .sampler import (
    SamplingRow,
    TokenLogprobs,
    biased_logits,
    processed_probs,
    prompt_logprobs,
    sample_from_probs,
    sample_tokens,
    to_device,
    to_host,
    token_logprobs,
)
from .scheduler import ScheduledItem
from .spec_step import (
    RelaxedAcceptance,
    SpecLaunched,
    SpecStep,
    eligible,
    relaxed_accept,
    thinking_after,
    thinking_states,
)
from .speculative import VerifyResult, target_probs_for_drafts, verify_batch

Group = tuple[list[int], int, list[int]]  # a run of tokens: ids, first position, block table


@dataclass(slots=True)
class Launched:
    """A decode step launched without waiting for it (`ModelRunner.launch_decode`). Its sampled tokens
    stay on the device (`tokens`: the next step's input rows are fed from them); the host reads its
    copies (`host_tokens`, and the logprobs of the rows in `logprob_rows`) once `wait()` returns."""

    tokens: torch.Tensor  # [B] int64 on the device
    host_tokens: torch.Tensor  # [B] int64 on the host (pinned on CUDA)
    logprob_rows: list[int]
    host_chosen: torch.Tensor | None = None  # [L] the sampled tokens' logprobs
    host_top: tuple[torch.Tensor, torch.Tensor] | None = None  # [L, n] logprobs and ids of the top n
    ready: torch.cuda.Event | None = None  # None on a CPU: the step has run when launch returns

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def logprobs(self, j: int, n: int) -> TokenLogprobs:
        """The TokenLogprobs of logprob row j (as sampler.token_logprobs makes them), n alternatives."""
        assert self.host_chosen is not None
        top: list[tuple[int, float]] = []
        if n > 0 and self.host_top is not None:
            top = list(zip(self.host_top[1][j, :n].tolist(), self.host_top[0][j, :n].tolist()))
        return TokenLogprobs(int(self.host_tokens[self.logprob_rows[j]]), float(self.host_chosen[j]), top)


@dataclass(slots=True)
class StepResult:
    new_tokens: list[int]
    new_logprobs: list | None
    drafted: int = 0
    accepted: int = 0


def _row(req: Request, extra: list[int] | None = None) -> SamplingRow:
    out = req.output_ids if not extra else req.output_ids + extra
    return SamplingRow(req.params, req.generator, req.prompt_ids, out)


class ModelRunner:
    """paged: forwards go through model.attention's rows path (the kernels over the paged pools);
    graphs: decode-only steps replay CUDA graphs of the main model's forward (rows.py)."""

    def __init__(
        self,
        net: DeepseekV32,
        pool: CachePool,
        mtp_k: int,
        mtp_cache: bool,
        *,
        paged: bool = False,
        graphs: bool = False,
        max_rows: int = 64,
        max_blocks: int = 1,
        max_requests: int = 64,
        relaxed: RelaxedAcceptance | None = None,
    ) -> None:
        self.net, self.pool = net, pool
        self.parallel: ParallelState = net.parallel
        self.mtp_k, self.mtp_cache = mtp_k, mtp_cache
        self.mtp_layer = net.cfg.mtp_layer_index
        self.device = net.device
        self.paged = paged
        self.graphs = DecodeGraphs(net, pool, max_rows, max_blocks) if paged and graphs else None
        self.mtp_graphs = (
            DecodeGraphs(net, pool, max_rows, max_blocks, mtp=True) if paged and graphs and mtp_k else None
        )
        self.relaxed = relaxed
        # bench/overlap.py: (start, end) CUDA events around each decode step's forward and LM head
        self.gpu_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] | None = None
        self.spec = (
            SpecStep(net, pool, mtp_k, max_requests, max_blocks, graphs=graphs, relaxed=relaxed)
            if paged and mtp_k and mtp_cache and self.parallel.world_size == 1  # its calls are not broadcast
            else None
        )

    def _mtp(
        self, groups: list[tuple[list[int], int, list[int]]], spans: list[SeqSpan], hidden: torch.Tensor, graphed: bool
    ) -> torch.Tensor:
        """The MTP layer over these runs of rows (from a CUDA graph when `graphed` and one fits)."""
        plan = RowPlan.build(groups, self.pool.block_size) if self.paged else None
        if graphed and self.mtp_graphs is not None and plan is not None:
            out = self.mtp_graphs.run(plan, hidden)
            if out is not None:
                return out
        batch = self._batch(groups, spans, plan)
        self._announce("mtp", groups, spans, hidden)
        return self.net.mtp_forward(hidden, batch.input_ids, batch)

    # ---- tensor parallel: the leader announces each network call, followers repeat it -------------
    def _announce(
        self,
        op: str,
        groups: list[Group] | None = None,
        spans: list[SeqSpan] | None = None,
        x: torch.Tensor | None = None,
    ) -> None:
        """Leader: tell the followers the next network call (and send its input hidden states)."""
        if not self.parallel.distributed:
            return
        meta = None if x is None else (tuple(x.shape), str(x.dtype).removeprefix("torch."))
        self.parallel.broadcast_object((op, groups, spans, meta))
        if x is not None:
            self.parallel.broadcast_tensor(x.contiguous())

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self._announce("logits", x=hidden)
        return self.net.logits(hidden)

    def _forward(self, groups: list[Group], spans: list[SeqSpan], plan: RowPlan | None) -> torch.Tensor:
        batch = self._batch(groups, spans, plan)
        self._announce("forward", groups, spans)
        return self.net.forward(batch)

    def sync_blocks(self, blocks: list[int]) -> None:
        """Leader: copy these cache blocks (every pool) to the followers (a decode worker's leader
        received them from a prefill worker; the followers' caches must hold them too)."""
        if not self.parallel.distributed or not blocks:
            return
        self._announce("blocks", [(list(blocks), 0, [])])
        self._blocks(blocks)

    def _blocks(self, blocks: list[int]) -> None:
        idx = torch.tensor(blocks, dtype=torch.long, device=self.pool.latent.device)
        for t in self.pool.pools():
            part = t.index_select(0, idx)
            self.parallel.broadcast_tensor(part)
            t.index_copy_(0, idx, part)

    def stop_followers(self) -> None:
        """Leader: end the followers' `follow()` loops (returns once every follower has the message,
        so the process group can be destroyed right after)."""
        self._announce("stop")
        self.parallel.barrier()

    @torch.inference_mode()
    def follow(self) -> int:
        """Follower: repeat the leader's network calls until it says stop; returns the calls made."""
        if self.parallel.is_leader:
            raise RuntimeError("rank 0 leads: follow() runs on the other ranks")
        calls = 0
        while True:
            op, groups, spans, meta = self.parallel.broadcast_object()
            if op == "stop":
                self.parallel.barrier()
                return calls
            calls += 1
            x = None
            if meta is not None:
                shape, dtype = meta
                x = self.parallel.broadcast_tensor(torch.empty(shape, dtype=getattr(torch, dtype), device=self.device))
            if op == "blocks":
                self._blocks(groups[0][0])
                continue
            if op == "logits":
                assert x is not None
                self.net.logits(x)
                continue
            plan = RowPlan.build(groups, self.pool.block_size) if self.paged else None
            batch = self._batch(groups, spans, plan)
            if op == "forward":
                self.net.forward(batch)
            elif op == "mtp":
                assert x is not None
                self.net.mtp_forward(x, batch.input_ids, batch)
            else:
                raise RuntimeError(f"unknown tensor-parallel call {op!r} from the leader")

    def _batch(
        self, groups: list[tuple[list[int], int, list[int]]], spans: list[SeqSpan], plan: RowPlan | None
    ) -> ForwardBatch:
        """The forward batch of these runs of tokens (ids, first position, block table), one span each;
        `plan` is their row plan when the paged kernels run."""
        if plan is not None:
            return plan.to_batch(self.pool)
        store = PagedStore(
            self.pool, [t for _, _, t in groups], [p + len(ids) for ids, p, _ in groups], [p for _, p, _ in groups]
        )
        ids = torch.tensor([t for g, _, _ in groups for t in g], device=self.device)
        pos = torch.tensor([p for g, p0, _ in groups for p in range(p0, p0 + len(g))], device=self.device)
        return ForwardBatch(ids, pos, spans, store)

    # ---- MTP --------------------------------------------------------------------------------
    def _mtp_catch_up(self, reqs: list[Request], graphed: bool = False, keep: int = 0) -> dict[str, torch.Tensor]:
        """Run the MTP layer over each request's pending positions whose next token is known (all but
        the last `keep` of them).

        Returns request id -> MTP hidden of its last processed row (for drafting)."""
        groups, hid, spans, owners = [], [], [], []
        start = 0
        for req in reqs:
            if req.pending_hidden is None:
                continue
            limit = min(req.num_computed, req.num_tokens - 1)  # hidden computed, next token known
            if req.prefill_only:  # the sampled token's position is left to the decode side
                limit = min(limit, len(req.prompt_ids) - 1)
            limit -= keep
            n = limit - req.mtp_computed
            if n <= 0:
                continue
            groups.append((req.all_ids[req.mtp_computed + 1 : limit + 1], req.mtp_computed, req.block_table))
            hid.append(req.pending_hidden[:n])
            spans.append(SeqSpan(start, n, req.mtp_computed, absorbed=False))
            owners.append((req, n, limit))
            start += n
        if not owners:
            return {}
        g = self._mtp(groups, spans, torch.cat(hid), graphed)
        out = {}
        for (req, n, limit), sp in zip(owners, spans):
            req.mtp_computed = limit
            assert req.pending_hidden is not None  # it had n rows above
            rest = req.pending_hidden[n:]
            req.pending_hidden = rest if rest.shape[0] else None
            out[req.request_id] = g[sp.end - 1]
        return out

    def _draft(self, reqs: list[Request]) -> None:
        """Propose k drafts for each decode request (MTP caught up to its last position)."""
        last = self._mtp_catch_up(reqs, graphed=True)
        active = [r for r in reqs if r.request_id in last]
        for r in active:
            r.drafts, r.draft_probs = [], None
        hidden = torch.stack([last[r.request_id] for r in active]) if active else None
        probs_by_req: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in active}
        for j in range(self.mtp_k):
            if not active:
                break
            assert hidden is not None  # made for the active requests
            if j > 0:  # recursive step: the MTP layer on its own output and previous draft
                groups = [([r.drafts[-1]], r.num_computed + j - 1, r.block_table) for r in active]
                spans = [SeqSpan(i, 1, p, absorbed=True) for i, (_, p, _) in enumerate(groups)]
                hidden = self._mtp(groups, spans, hidden, graphed=True)
            logits = self._logits(hidden)
            greedy_rows = [i for i, r in enumerate(active) if r.params.greedy]
            if greedy_rows:  # one argmax and one host copy for every greedy request
                # Drafts see the request's logit_bias too (so do sampled drafts, through processed_probs):
                # the target they are verified against is biased, and unbiased drafts would be rejected.
                lg = biased_logits(logits[greedy_rows], [active[i].params for i in greedy_rows])
                for i, t in zip(greedy_rows, argmax(lg).tolist()):
                    active[i].drafts.append(int(t))
            sampling = [i for i, r in enumerate(active) if not r.params.greedy]
            if sampling:
                rows = [_row(active[i], active[i].drafts) for i in sampling]
                q = processed_probs(logits[sampling], rows)
                toks = sample_from_probs(q, [active[i].generator for i in sampling])
                for qi, i, t in zip(q, sampling, toks.tolist()):
                    active[i].drafts.append(int(t))
                    probs_by_req[active[i].request_id].append(qi)
        for r in active:
            if probs_by_req[r.request_id]:
                r.draft_probs = torch.stack(probs_by_req[r.request_id])

    def _relaxed_ok(self, req: Request, lg: torch.Tensor) -> list[bool]:
        """Per draft of a greedy request: accepted by the relaxed rule (spec_step.RelaxedAcceptance) in
        the thinking phase. lg: the (biased) target logits at the k draft positions, [k, V]."""
        rx = self.relaxed
        assert rx is not None
        d = torch.tensor(req.drafts, dtype=torch.long, device=lg.device)[None]
        state0 = torch.tensor([req.thinking], device=lg.device)
        think = thinking_states(d, state0, rx.think_start, rx.think_end)
        return (relaxed_accept(lg[None], d, rx.topk, rx.delta) & think)[0].tolist()

    def _update_thinking(self, reqs: list[Request]) -> None:
        rx = self.relaxed
        if rx is None:
            return
        for q in reqs:
            ids = q.all_ids
            q.thinking = thinking_after(ids[q.think_scanned :], rx.think_start, rx.think_end, q.thinking)
            q.think_scanned = len(ids)

    def _verify(
        self, items: list[tuple[ScheduledItem, SeqSpan]], logits: torch.Tensor, row_of: dict[int, int]
    ) -> list[VerifyResult]:
        """Verdicts for decode items. Plain greedy requests (no penalties) need only the argmax of each
        (biased, when the request has a logit_bias) row: one kernel and one host copy for all of them,
        then the longest agreeing draft prefix (or relaxed-accepted draft, with relaxed acceptance on).
        The others go through processed distributions and verify_batch (rejection sampling)."""
        verdicts: list[VerifyResult | None] = [None] * len(items)
        plain = [i for i, (it, _) in enumerate(items) if it.req.params.greedy and not it.req.params.has_penalties]
        if plain:
            rows = [row_of[r] for i in plain for r in range(items[i][1].start, items[i][1].end)]
            params = [items[i][0].req.params for i in plain for _ in range(items[i][1].length)]
            best = argmax(biased_logits(logits[rows], params)).tolist()
            j = 0
            for i in plain:
                drafts, n = items[i][0].req.drafts, items[i][1].length
                t = best[j : j + n]
                j += n
                ok = [False] * len(drafts)
                if self.relaxed is not None and drafts:
                    req, sp = items[i][0].req, items[i][1]
                    rows_i = [row_of[r] for r in range(sp.start, sp.start + len(drafts))]
                    ok = self._relaxed_ok(req, biased_logits(logits[rows_i], [req.params] * len(drafts)))
                a = 0
                while a < len(drafts) and (drafts[a] == t[a] or ok[a]):
                    a += 1
                verdicts[i] = VerifyResult(a, list(drafts[:a]) + [t[a]])
        rest = [i for i in range(len(items)) if verdicts[i] is None]
        if rest:
            target, drafts_probs, gens, greedy, draft_ids = [], [], [], [], []
            for i in rest:
                req, sp = items[i][0].req, items[i][1]
                lg = logits[[row_of[r] for r in range(sp.start, sp.end)]]
                target.append(target_probs_for_drafts(lg, _row(req), req.drafts))
                drafts_probs.append(req.draft_probs)
                gens.append(req.generator)
                greedy.append(req.params.greedy)
                draft_ids.append(req.drafts)
            for i, v in zip(rest, verify_batch(draft_ids, drafts_probs, target, gens, greedy)):
                verdicts[i] = v
        return verdicts  # type: ignore[return-value]

    @staticmethod
    def _wants_prompt_logits(req: Request) -> bool:
        return (
            req.params.prompt_logprobs is not None
            and req.prompt_logprobs is None
            and req.num_computed < len(req.prompt_ids)
        )

    # ---- the fused speculative step ---------------------------------------------------------
    def _spec_execute(self, items: list[ScheduledItem]) -> dict[str, StepResult] | None:
        """A decode-only step through spec_step.SpecStep; None when some request is not eligible."""
        assert self.spec is not None
        reqs = [it.req for it in items]
        if not all(eligible(r) for r in reqs):
            return None
        self._update_thinking(reqs)
        out = self.launch_spec(reqs, [], None)
        out.wait()
        host = out.host.tolist()  # the step's one device->host copy: accepted count, then the tokens
        r = self.mtp_k + 1
        results: dict[str, StepResult] = {}
        for i, (req, row) in enumerate(zip(reqs, host)):
            a, toks = row[0], row[1 : row[0] + 2]
            req.mtp_computed = req.num_computed
            req.pending_hidden = out.hidden[i * r : i * r + a + 1]
            req.num_computed += a + 1
            req.draft_tokens += self.mtp_k
            req.accepted_draft_tokens += a
            req.drafts, req.draft_probs = [], None
            results[req.request_id] = StepResult(toks, None, self.mtp_k, a)
        return results

    # ---- overlapped decode (engine/overlap.py) ------------------------------------------------
    def _event(self) -> torch.cuda.Event | None:
        if self.gpu_events is None or self.device.type != "cuda":
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _timed(self, start: torch.cuda.Event | None) -> None:
        end = self._event() if start is not None else None
        if start is not None and end is not None and self.gpu_events is not None:
            self.gpu_events.append((start, end))

    @torch.inference_mode()
    def launch_decode(
        self,
        reqs: list[Request],
        positions: list[int],
        ids: list[int],
        fed: list[tuple[int, int]],
        prev: torch.Tensor | None,
    ) -> Launched:
        """One decode row per request (row i: token ids[i] at positions[i] through reqs[i]'s block
        table), sampled on the device, its results copied to the host without waiting: nothing here
        synchronises with the device. fed: (row, j) pairs whose input token is prev[j], a token that a
        step still in flight samples (copied on the device; ids[row] is only a placeholder).
        Single rank, paged kernels, no MTP (launch_spec), no penalties (engine/overlap.py checks)."""
        dev = self.device
        plan = RowPlan.build([([t], p, r.block_table) for r, p, t in zip(reqs, positions, ids)], self.pool.block_size)
        feed = None
        if fed:
            assert prev is not None
            idx = to_device(torch.tensor([r for r, _ in fed] + [j for _, j in fed], dtype=torch.long), dev)
            feed = (idx[: len(fed)], prev.index_select(0, idx[len(fed) :]))
        timed = self._event()
        hidden = self.graphs.run(plan, feed=feed) if self.graphs is not None else None
        if hidden is None:
            batch = plan.to_batch(self.pool)
            if feed is not None:
                batch.input_ids.index_copy_(0, feed[0], feed[1])
            hidden = self.net.forward(batch)
        logits = self.net.logits(hidden)
        self._timed(timed)
        params = [r.params for r in reqs]
        if all(p.greedy for p in params):  # the sync path's argmax of the biased logits
            tokens = argmax(biased_logits(logits, params))
        else:  # = verification with no drafts (speculative.py): the sampler's exponential race
            tokens = sample_tokens(logits, [_row(r) for r in reqs])
        out = Launched(tokens, to_host(tokens), [i for i, p in enumerate(params) if p.logprobs is not None])
        if out.logprob_rows:  # as sampler.token_logprobs computes them, left on the device until read
            w = to_device(torch.tensor(out.logprob_rows, dtype=torch.long), dev)
            lg = biased_logits(logits.index_select(0, w), [params[i] for i in out.logprob_rows])
            lp = torch.log_softmax(lg.to(torch.float32), dim=-1)
            out.host_chosen = to_host(lp.gather(1, tokens.index_select(0, w)[:, None]).squeeze(1))
            n = min(max(int(params[i].logprobs or 0) for i in out.logprob_rows), lp.shape[1])
            if n > 0:
                top_lp, top_id = torch.topk(lp, n, dim=-1)
                out.host_top = (to_host(top_lp), to_host(top_id))
        if dev.type == "cuda":
            out.ready = torch.cuda.Event()
            out.ready.record()
        return out

    @torch.inference_mode()
    def launch_spec(
        self, reqs: list[Request], fed: list[tuple[int, int, int]], prev: SpecLaunched | None
    ) -> SpecLaunched:
        """The fused speculative step (spec_step.py) launched without waiting for it: nothing here
        synchronises with the device. fed: (row, j, num_computed) for rows that continue row j of
        `prev`, a step still in flight whose accepted tokens and hidden states feed them on the device
        (engine/overlap.py); the other rows are planned from the host, a request more than R positions
        behind (its first decode step after a local prefill) first catching the MTP layer up eagerly.
        Single rank, paged kernels, `eligible` requests; with fed rows, no relaxed acceptance (the
        thinking state is the host's)."""
        assert self.spec is not None
        fed_rows = {row for row, _, _ in fed}
        behind = [
            q for i, q in enumerate(reqs) if i not in fed_rows and q.num_computed - q.mtp_computed > self.mtp_k + 1
        ]
        if behind:
            self._mtp_catch_up(behind, graphed=True, keep=1)
        timed = self._event()
        out = self.spec.launch(reqs, fed, prev)
        self._timed(timed)
        return out

    # ---- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, items: list[ScheduledItem]) -> dict[str, StepResult]:
        if self.spec is not None and items and all(it.decode for it in items):
            res = self._spec_execute(items)
            if res is not None:
                return res
        if self.mtp_k:
            need = [it.req for it in items if it.decode]
            if need:
                self._draft(need)
        groups, spans = [], []
        start = 0
        for it in items:
            req, nc = it.req, it.req.num_computed
            if it.decode:
                toks = [req.all_ids[-1]] + req.drafts
            else:
                toks = req.all_ids[nc : nc + it.num_tokens]
            groups.append((toks, nc, req.block_table))
            spans.append(SeqSpan(start, len(toks), nc, absorbed=it.decode))
            start += len(toks)
        plan = RowPlan.build(groups, self.pool.block_size) if self.paged else None
        hidden = None
        timed = self._event() if all(it.decode for it in items) else None
        if self.graphs is not None and plan is not None and all(it.decode for it in items):
            hidden = self.graphs.run(plan)
        if hidden is None:
            hidden = self._forward(groups, spans, plan)

        # rows whose logits are needed
        want: list[int] = []
        for it, sp in zip(items, spans):
            req = it.req
            if it.decode:
                want.extend(range(sp.start, sp.end))
            else:
                if self._wants_prompt_logits(req):
                    want.extend(range(sp.start, sp.end))
                elif req.num_computed + sp.length == req.num_tokens:
                    want.append(sp.end - 1)
        row_of = {r: i for i, r in enumerate(want)}
        logits = self._logits(hidden[want]) if want else None
        self._timed(timed)

        results: dict[str, StepResult] = {}
        sample_items: list[tuple[ScheduledItem, int]] = []
        verify_items: list[tuple[ScheduledItem, SeqSpan]] = []
        for it, sp in zip(items, spans):
            req = it.req
            if it.decode:
                verify_items.append((it, sp))
                continue
            if self._wants_prompt_logits(req):
                assert logits is not None
                req._prompt_logits.append(logits[[row_of[r] for r in range(sp.start, sp.end)]].cpu())
            if self.mtp_cache:
                h = hidden[sp.start : sp.end]
                req.pending_hidden = h if req.pending_hidden is None else torch.cat([req.pending_hidden, h])
            req.num_computed += sp.length
            if req.num_computed == req.num_tokens:
                sample_items.append((it, row_of[sp.end - 1]))
            else:
                results[req.request_id] = StepResult([], None)

        if sample_items:
            assert logits is not None
            rows = [_row(it.req) for it, _ in sample_items]
            lg = logits[[r for _, r in sample_items]]
            toks = sample_tokens(lg, rows).tolist()
            for (it, _), t, lrow in zip(sample_items, toks, lg):
                req = it.req
                lp = None
                if req.params.logprobs is not None:  # reported after the logit_bias, as OpenAI does
                    lp = token_logprobs(biased_logits(lrow[None], [req.params]), [t], [req.params.logprobs])
                if req.params.prompt_logprobs is not None and req._prompt_logits:
                    plog = torch.cat(req._prompt_logits)[: len(req.prompt_ids)]
                    req.prompt_logprobs = prompt_logprobs(plog, req.prompt_ids, req.params.prompt_logprobs)
                    req._prompt_logits = []
                results[req.request_id] = StepResult([int(t)], lp)

        if verify_items:
            assert logits is not None
            self._update_thinking([it.req for it, _ in verify_items])
            verdicts = self._verify(verify_items, logits, row_of)
            for (it, sp), v in zip(verify_items, verdicts):
                req = it.req
                a = v.num_accepted
                lp = None
                if req.params.logprobs is not None:
                    lg = biased_logits(
                        logits[[row_of[r] for r in range(sp.start, sp.start + a + 1)]], [req.params] * (a + 1)
                    )
                    lp = token_logprobs(lg, v.tokens, [req.params.logprobs] * (a + 1))
                if self.mtp_cache:
                    h = hidden[sp.start : sp.start + a + 1]
                    req.pending_hidden = h if req.pending_hidden is None else torch.cat([req.pending_hidden, h])
                req.num_computed += a + 1
                results[req.request_id] = StepResult(list(v.tokens), lp, len(req.drafts), a)
                req.draft_tokens += len(req.drafts)
                req.accepted_draft_tokens += a
                req.drafts, req.draft_probs = [], None

        if self.mtp_cache:  # requests still prefilling: MTP catches up on positions with a known next token
            prefilling = [
                it.req
                for it in items
                if not it.decode and (it.req.num_computed < it.req.num_tokens or it.req.prefill_only)
            ]
            if prefilling:
                self._mtp_catch_up(prefilling)
        return results
