"""Continuous batching: which requests run this step, and how many tokens each computes.

Each step has a token budget (max_batch_tokens). Running requests go first, oldest first: a
request in decode computes its last token plus its k MTP drafts (1 + k rows); a request still
catching up (prefill, or recompute after preemption) computes its next chunk (<= chunk_size).
Then waiting requests are admitted, oldest first, while budget, max_running and free blocks allow;
admission takes the blocks for every known token at once (so chunks never wait for space) after
matching the prefix cache. When a running request needs a block and none is left, the newest
running request is preempted: its blocks are freed and it recomputes later from its tokens (its
generated tokens are kept), so the engine never deadlocks on cache space.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager, block_hash
from .config import EngineConfig
from .request import Request, Status

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledItem:
    req: Request
    num_tokens: int  # rows this step: a prefill chunk, or 1 + k for a decode step
    decode: bool


class Scheduler:
    def __init__(self, cfg: EngineConfig, blocks: BlockManager, mtp_k: int, mtp_cache: bool) -> None:
        self.cfg = cfg
        self.blocks = blocks
        self.mtp_k = mtp_k
        self.mtp_cache = mtp_cache  # MTP-layer entries are part of a block's content
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.finished: list[Request] = []  # finished by the scheduler itself (cache exhausted)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.cfg.block_size)

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def adopt(self, req: Request) -> None:
        """A request whose cache is already in its blocks (decode side of disaggregation)."""
        req.status = Status.RUNNING
        self.running.append(req)

    def remove(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    # ---- prefix cache -----------------------------------------------------------------------
    def _prefix_hashes(self, req: Request, limit_tokens: int, known: list[bytes] | None = None) -> list[bytes]:
        """Keys of req's full blocks within its first limit_tokens tokens (MTP: +1 lookahead token).
        `known`: keys already computed for its first blocks (only the blocks after them are hashed)."""
        bs, ids = self.cfg.block_size, req.all_ids
        extra = 1 if self.mtp_cache else 0
        out: list[bytes] = list(known or [])
        parent = out[-1] if out else None
        j = len(out)
        while (j + 1) * bs <= limit_tokens and (j + 1) * bs + extra <= len(ids):
            parent = block_hash(parent, ids[j * bs : (j + 1) * bs + extra])
            out.append(parent)
            j += 1
        return out

    def register_full_blocks(self, req: Request) -> None:
        """Publish req's blocks that are now complete (main and MTP entries final) to the prefix cache."""
        if not self.blocks.prefix_cache or req.params.prompt_logprobs is not None:
            return
        done = min(req.num_computed, req.mtp_computed) if self.mtp_cache else req.num_computed
        if (len(req.block_hashes) + 1) * self.cfg.block_size > done:
            return  # no block completed since the last call (the common decode step)
        hashes = self._prefix_hashes(req, done, req.block_hashes)
        for j in range(len(req.block_hashes), len(hashes)):
            self.blocks.register(req.block_table[j], hashes[j])
            req.block_hashes.append(hashes[j])

    def _match_prefix(self, req: Request) -> None:
        if req.params.prompt_logprobs is not None or req.num_computed or req.block_table:
            return
        hashes = self._prefix_hashes(req, req.num_tokens - 1)  # at least one token left to compute
        hit = self.blocks.lookup(hashes)
        if hit:
            self.blocks.acquire(hit)
            req.block_table = list(hit)
            req.block_hashes = hashes[: len(hit)]
            req.num_computed = req.mtp_computed = len(hit) * self.cfg.block_size
            req.num_cached_prompt = min(req.num_computed, len(req.prompt_ids))

    # ---- preemption -------------------------------------------------------------------------
    def preempt(self, req: Request) -> None:
        log.info(
            "request %s: preempted (out of cache blocks), will recompute %d tokens", req.request_id, req.num_tokens
        )
        self.running.remove(req)
        self.blocks.free(req.block_table)
        req.block_table, req.block_hashes = [], []
        req.num_computed = req.mtp_computed = 0
        req.pending_hidden, req.drafts, req.draft_probs = None, [], None
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def grow(self, req: Request, num_tokens: int) -> bool:
        need = self.blocks_for(num_tokens) - len(req.block_table)
        if need <= 0:
            return True
        if not self.blocks.can_allocate(need):
            return False
        last = req.block_table[-1] if req.block_table else None
        req.block_table += self.blocks.allocate(need, after=last)
        return True

    # ---- the step -----------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledItem]:
        budget = self.cfg.max_batch_tokens
        items: list[ScheduledItem] = []
        i = 0
        while i < len(self.running):
            req = self.running[i]
            decode = req.in_decode
            if req.is_finished:
                i += 1  # prefilled (prefill_only), its blocks wait for the owner to take the cache
                continue
            n = 1 + self.mtp_k if decode else min(req.num_tokens - req.num_computed, self.cfg.chunk_size, budget)
            if n <= 0 or n > budget:
                i += 1
                continue
            grown = self.grow(req, req.num_computed + n)
            while not grown:
                # a prefilled request (prefill_only, finished) is never a victim: its blocks may be on
                # their way to a decode worker right now, and they come back once sent
                movable = [r for r in self.running if not r.is_finished]
                victim = movable[-1]
                if victim is req and len(movable) == 1 and len(self.running) == 1:
                    # alone and still out of space: the cache cannot hold this request any longer
                    self.running.remove(req)
                    req.status, req.finish_reason = Status.FINISHED, "length"
                    self.finished.append(req)
                    log.warning(
                        "request %s: cache full at %d tokens, finishing with 'length'", req.request_id, req.num_tokens
                    )
                    break
                self.preempt(victim)
                if victim is req:
                    break
                grown = self.grow(req, req.num_computed + n)
            if not grown:
                continue  # req itself left the running list; running[i] is now the next request
            items.append(ScheduledItem(req, n, decode))
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_running:
            req = self.waiting[0]
            self._match_prefix(req)
            # admission: blocks for every known token plus the next one
            if not self.grow(req, req.num_tokens + 1):
                self.blocks.free(req.block_table)  # give back the prefix-cache hit until admitted
                req.block_table, req.block_hashes = [], []
                req.num_computed = req.mtp_computed = req.num_cached_prompt = 0
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            n = min(req.num_tokens - req.num_computed, self.cfg.chunk_size, budget)
            items.append(ScheduledItem(req, n, False))
            budget -= n
        return items
