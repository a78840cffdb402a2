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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from splitserve.model import DeepseekV32, ForwardBatch, SeqSpan

from .cache import CachePool, PagedStore
from .request import Request
from .sampler import SamplingRow, prompt_logprobs, processed_probs, sample_from_probs, sample_tokens, token_logprobs
from .scheduler import ScheduledItem
from .speculative import target_probs_for_drafts, verify_batch


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
    def __init__(self, net: DeepseekV32, pool: CachePool, mtp_k: int, mtp_cache: bool) -> None:
        self.net, self.pool = net, pool
        self.mtp_k, self.mtp_cache = mtp_k, mtp_cache
        self.mtp_layer = net.cfg.mtp_layer_index
        self.device = net.device

    # ---- MTP --------------------------------------------------------------------------------
    def _mtp_catch_up(self, reqs: list[Request]) -> dict[str, torch.Tensor]:
        """Run the MTP layer over each request's pending positions whose next token is known.

        Returns request id -> MTP hidden of its last processed row (for drafting)."""
        ids, hid, pos, spans, tables, totals, ctxs, owners = [], [], [], [], [], [], [], []
        start = 0
        for req in reqs:
            if req.pending_hidden is None:
                continue
            limit = min(req.num_computed, req.num_tokens - 1)  # hidden computed, next token known
            if req.prefill_only:  # the sampled token's position is left to the decode side
                limit = min(limit, len(req.prompt_ids) - 1)
            n = limit - req.mtp_computed
            if n <= 0:
                continue
            all_ids = req.all_ids
            ids.append(torch.tensor(all_ids[req.mtp_computed + 1: limit + 1]))
            hid.append(req.pending_hidden[:n])
            pos.append(torch.arange(req.mtp_computed, limit))
            spans.append(SeqSpan(start, n, req.mtp_computed, absorbed=False))
            tables.append(req.block_table)
            totals.append(limit)
            ctxs.append(req.mtp_computed)
            owners.append((req, n, limit))
            start += n
        if not owners:
            return {}
        store = PagedStore(self.pool, tables, totals, ctxs)
        batch = ForwardBatch(torch.cat(ids).to(self.device), torch.cat(pos).to(self.device), spans, store)
        g = self.net.mtp_forward(torch.cat(hid), batch.input_ids, batch)
        out = {}
        for (req, n, limit), sp in zip(owners, spans):
            req.mtp_computed = limit
            rest = req.pending_hidden[n:]
            req.pending_hidden = rest if rest.shape[0] else None
            out[req.request_id] = g[sp.end - 1]
        return out

    def _draft(self, reqs: list[Request]) -> None:
        """Propose k drafts for each decode request (MTP caught up to its last position)."""
        last = self._mtp_catch_up(reqs)
        active = [r for r in reqs if r.request_id in last]
        for r in active:
            r.drafts, r.draft_probs = [], None
        hidden = torch.stack([last[r.request_id] for r in active]) if active else None
        probs_by_req: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in active}
        for j in range(self.mtp_k):
            if not active:
                break
            if j > 0:  # recursive step: the MTP layer on its own output and previous draft
                positions = [r.num_computed + j - 1 for r in active]
                spans = [SeqSpan(i, 1, p, absorbed=True) for i, p in enumerate(positions)]
                store = PagedStore(self.pool, [r.block_table for r in active], [p + 1 for p in positions], positions)
                toks = torch.tensor([r.drafts[-1] for r in active], device=self.device)
                batch = ForwardBatch(toks, torch.tensor(positions, device=self.device), spans, store)
                hidden = self.net.mtp_forward(hidden, toks, batch)
            logits = self.net.logits(hidden)
            for i, r in enumerate(active):
                if r.params.greedy:
                    r.drafts.append(int(logits[i].argmax()))
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

    @staticmethod
    def _wants_prompt_logits(req: Request) -> bool:
        return (req.params.prompt_logprobs is not None and req.prompt_logprobs is None
                and req.num_computed < len(req.prompt_ids))

    # ---- the step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, items: list[ScheduledItem]) -> dict[str, StepResult]:
        if self.mtp_k:
            need = [it.req for it in items if it.decode]
            if need:
                self._draft(need)
        ids, pos, spans, tables, totals, ctxs = [], [], [], [], [], []
        start = 0
        for it in items:
            req, nc = it.req, it.req.num_computed
            if it.decode:
                toks = [req.all_ids[-1]] + req.drafts
            else:
                toks = req.all_ids[nc: nc + it.num_tokens]
            n = len(toks)
            ids.extend(toks)
            pos.extend(range(nc, nc + n))
            spans.append(SeqSpan(start, n, nc, absorbed=it.decode))
            tables.append(req.block_table)
            totals.append(nc + n)
            ctxs.append(nc)
            start += n
        store = PagedStore(self.pool, tables, totals, ctxs)
        batch = ForwardBatch(torch.tensor(ids, device=self.device), torch.tensor(pos, device=self.device), spans, store)
        hidden = self.net.forward(batch)

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
        logits = self.net.logits(hidden[want]) if want else None

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
                h = hidden[sp.start: sp.end]
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
            for (it, r), t, lrow in zip(sample_items, toks, lg):
                req = it.req
                lp = None
                if req.params.logprobs is not None:
                    lp = token_logprobs(lrow[None], [t], [req.params.logprobs])
                if req.params.prompt_logprobs is not None and req._prompt_logits:
                    plog = torch.cat(req._prompt_logits)[: len(req.prompt_ids)]
                    req.prompt_logprobs = prompt_logprobs(plog, req.prompt_ids, req.params.prompt_logprobs)
                    req._prompt_logits = []
                results[req.request_id] = StepResult([int(t)], lp)

        if verify_items:
            assert logits is not None
            target, drafts_probs, gens, greedy, drafts = [], [], [], [], []
            for it, sp in verify_items:
                req = it.req
                lg = logits[[row_of[r] for r in range(sp.start, sp.end)]]
                target.append(target_probs_for_drafts(lg, _row(req), req.drafts))
                drafts_probs.append(req.draft_probs)
                gens.append(req.generator)
                greedy.append(req.params.greedy)
                drafts.append(req.drafts)
            verdicts = verify_batch(drafts, drafts_probs, target, gens, greedy)
            for (it, sp), v in zip(verify_items, verdicts):
                req = it.req
                a = v.num_accepted
                lp = None
                if req.params.logprobs is not None:
                    lg = logits[[row_of[r] for r in range(sp.start, sp.start + a + 1)]]
                    lp = token_logprobs(lg, v.tokens, [req.params.logprobs] * (a + 1))
                if self.mtp_cache:
                    h = hidden[sp.start: sp.start + a + 1]
                    req.pending_hidden = h if req.pending_hidden is None else torch.cat([req.pending_hidden, h])
                req.num_computed += a + 1
                results[req.request_id] = StepResult(list(v.tokens), lp, len(req.drafts), a)
                req.draft_tokens += len(req.drafts)
                req.accepted_draft_tokens += a
                req.drafts, req.draft_probs = [], None

        if self.mtp_cache:  # requests still prefilling: MTP catches up on positions with a known next token
            prefilling = [it.req for it in items
                          if not it.decode and (it.req.num_computed < it.req.num_tokens or it.req.prefill_only)]
            if prefilling:
                self._mtp_catch_up(prefilling)
        return results
