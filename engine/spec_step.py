"""The whole MTP speculative decode step as one tensor program: one CUDA graph on GPU, the same code
run eagerly on CPU.

Where it runs: a decode-only step (every scheduled item is a decode item) with the paged kernels on,
whose requests sample without penalties, logit_bias or logprobs (`eligible`). Other steps run the
per-phase path of runner.py (its module docstring), which stays the reference.

What the per-phase path costs (runner.py; k drafts, CUDA graphs on, a decode-only step of greedy
requests): the MTP catch-up is one graph replay (its row plan built on the host and copied in: 5-6
host->device copies per replay); each draft j is an eager LM-head GEMM + argmax ending in a
device->host copy of the draft ids (a host sync), and drafts 2..k each need one more MTP graph replay
built from those host ids; the verify forward is one graph replay, then eager gathers, LM head and
argmax end in a device->host copy (a sync), and the acceptance is computed on the host. Per step:
k + 1 graph replays and k + 1 host syncs, with about 3k + 3 eager kernels and 6(k + 1) small copies
between them:

    k = 1: 2 replays, 2 syncs;   k = 2: 3 replays, 3 syncs;   k = 3: 4 replays, 4 syncs.

Sampling requests add, per draft and for the verification, the sampler pipeline eagerly with its own
syncs (bool(...) checks, .tolist() of the drawn tokens, per-row random draws).

This step instead (`SpecStep`): the host copies one packed int64 plan, the block tables and the
pending hidden states into static buffers (plus, only when some request samples, its sampling
parameters and its random draws, drawn from the request's own generator), replays ONE graph and
copies one [B, 1 + (k + 1)] int64 tensor back (accepted count, then the tokens to emit): 1 replay and
1 host sync at every k. Inside the graph, for a padded batch of B requests and R = k + 1:

1. catch-up: the MTP layer over B x R rows, each request's pending positions right-aligned in its R
   slots (1..R of them: what the previous step accepted, plus one); its padding slots replicate its
   first pending row (so they select the same experts and add no weight bytes) but write the scratch
   block; padding requests are rows at position 0 of the scratch block;
   the last slot's output proposes draft 1;
2. drafts: d_j = argmax (greedy) or an exponential-race draw (sampling) of the MTP logits, processed as
   the sampler does (temperature, top-k, top-p, min-p); drafts 2..k run the MTP layer on B rows fed its
   own output and the previous draft (provisional cache entries, overwritten by the next catch-up);
3. verification: the main model over B x R rows [last token, d_1..d_k], LM head;
4. acceptance: greedy requests accept while d_i equals the target argmax (optionally relaxed inside
   <think>...</think>: `RelaxedAcceptance`); sampling requests use the rejection rule of speculative.py
   (accept iff u_i * q_i(d_i) < p_i(d_i); the correction token is drawn from norm(max(0, p - q)), the
   bonus from p_{k+1}), which keeps the output distribution exact.

Randomness: a sampling request consumes its generator in the order of the per-phase path (k times V
exponentials for the drafts, then k uniforms, then V exponentials for the correction / bonus), drawn
before the replay into static buffers; greedy requests consume nothing.

Overlapped scheduling (engine/overlap.py) launches the step without waiting for it (`launch`: the
packed result and the verified hidden states stay on the device, copied to pinned host memory behind
an event); the next step's rows of the same requests are then planned on the device from them
(`_feed`: positions, slots, catch-up ids and hidden states from the accepted count), not on the host.

Graphs are keyed by (padded request count, sampling): `capture_sizes(max_requests)` sizes, each once
with the greedy program (no sampler pipeline) and once with the sampling one; `capture_all()` takes
them all before the worker is ready and `seal()` forbids captures after (a step with no graph runs
eagerly and counts in misses_after_ready). A failed capture turns the graphs off (eager from then on;
a failure of the sampling program only turns off the sampling graphs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from splitserve.model import DeepseekV32, ForwardBatch
from splitserve.model.batch import PagedRows

from .cache import CachePool
from .request import Request
from .rows import _pad_to, capture_sizes, pack
from .sampler import to_device, to_host

log = logging.getLogger(__name__)

_NEG = float("-inf")
_TINY = torch.finfo(torch.float32).tiny


@dataclass(frozen=True, slots=True)
class RelaxedAcceptance:
    """Relaxed acceptance of greedy drafts in the reasoning phase (as TensorRT-LLM offers for
    DeepSeek-R1): inside <think>...</think>, draft d_i is accepted when fewer than `topk` tokens have a
    strictly higher target log-probability than d_i (it is among the target's top-N) and
    ``logp(d_i) >= max logp - delta``. Outside the thinking phase, and for sampling requests, acceptance
    is exact. runner.py's per-phase path applies the same rule to its plain greedy requests. A draft
    position is in the thinking phase when the last of think_start / think_end among
    the tokens before it is think_start."""

    topk: int
    delta: float
    think_start: int
    think_end: int

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"relaxed acceptance needs topk >= 1, got {self.topk}")
        if not self.delta >= 0.0:
            raise ValueError(f"relaxed acceptance needs delta >= 0, got {self.delta}")
        if self.think_start == self.think_end:
            raise ValueError("think_start and think_end must be different token ids")


def thinking_after(ids: Sequence[int], start: int, end: int, state: bool = False) -> bool:
    """The thinking state after `ids`, starting from `state`: the last of start / end decides."""
    for t in reversed(ids):
        if t == start:
            return True
        if t == end:
            return False
    return state


def eligible(req: Request) -> bool:
    """Whether a decode request can run in the fused step: no penalties, no logit_bias, no logprobs,
    and MTP state to catch up from."""
    p = req.params
    return (
        not p.has_penalties
        and not p.logit_bias
        and p.logprobs is None
        and req.pending_hidden is not None
        and req.num_computed - req.mtp_computed >= 1
    )


# ----------------------------------------------------------------------------------------------
# the tensor program (no host sync anywhere below)
# ----------------------------------------------------------------------------------------------
def processed_probs_static(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> torch.Tensor:
    """sampler.processed_probs for rows without penalties or bias, with per-row parameters as tensors
    and no data-dependent branch (graph-safe): temperature, top-k then top-p over one stable
    descending sort, min-p, softmax; greedy rows are one-hot at the argmax (lowest id among ties).
    logits [N, V]; greedy [N] bool; temperature, top_p, min_p [N] float; top_k [N] int64."""
    x = logits.to(torch.float32)
    n, v = x.shape
    t = temperature[:, None]
    samp = ~greedy[:, None]
    x = x / torch.where(samp & (t > 0), t, torch.ones_like(t))
    sorted_x, idx = torch.sort(x, dim=-1, descending=True, stable=True)
    pos = torch.arange(v, device=x.device)[None, :]
    k = top_k[:, None]
    k = torch.where(samp & (k > 0) & (k <= v), k, torch.full_like(k, v))
    sorted_x = sorted_x.masked_fill(pos >= k, _NEG)
    probs = torch.softmax(sorted_x, dim=-1)
    mass_before = torch.nn.functional.pad(torch.cumsum(probs, dim=-1)[:, :-1], (1, 0))
    p = top_p[:, None]
    sorted_x = sorted_x.masked_fill(samp & (mass_before >= p) & (p < 1.0), _NEG)
    x = torch.empty_like(x).scatter_(1, idx, sorted_x)
    pr = torch.softmax(x, dim=-1)
    mp = torch.where(samp, min_p[:, None], torch.zeros_like(min_p[:, None]))
    x = x.masked_fill(pr < mp * pr.max(dim=-1, keepdim=True).values, _NEG)
    probs = torch.softmax(x, dim=-1)
    onehot = torch.zeros_like(probs).scatter_(1, logits.to(torch.float32).argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy[:, None], onehot, probs)


def relaxed_accept(target_logits: torch.Tensor, drafts: torch.Tensor, topk: int, delta: float) -> torch.Tensor:
    """[B, K] bool: d is among the target's top `topk` (fewer than topk tokens strictly above it) and
    within `delta` of the best log-probability. target_logits [B, K, V] (the K draft positions)."""
    lp = torch.log_softmax(target_logits.to(torch.float32), dim=-1)
    lp_d = lp.gather(2, drafts[..., None])  # [B, K, 1]
    above = (lp > lp_d).sum(dim=-1)
    return (above < topk) & (lp_d.squeeze(-1) >= lp.max(dim=-1).values - delta)


def thinking_states(drafts: torch.Tensor, state0: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """[B, K] bool: whether draft position i is in the thinking phase, given the state after the last
    known token (state0 [B] bool) and the drafts d_1..d_{i-1} before it."""
    cols = [state0]
    s = state0
    for j in range(drafts.shape[1] - 1):
        d = drafts[:, j]
        s = torch.where(d == start, torch.ones_like(s), torch.where(d == end, torch.zeros_like(s), s))
        cols.append(s)
    return torch.stack(cols, dim=1)


# ----------------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------------
# int64 plan fields, field-major, each b * R long (per-request fields use the first b entries)
_F_C_IDS, _F_C_POS, _F_C_SLOT, _F_V_IDS0, _F_V_POS, _F_V_SLOT, _F_GREEDY, _F_TOPK, _F_THINK = range(9)
_NF_BASE = 9  # then, per extra draft j = 2..k: positions and slots


@dataclass(slots=True)
class SpecLaunched:
    """A speculative step launched without waiting for it (`SpecStep.launch`): its results stay on the
    device (the next step is fed from them, `SpecStep.launch`'s fed rows), the host reads `host` once
    `wait()` returns."""

    packed: torch.Tensor  # [B, 1 + R] int64 on the device: accepted count, then the tokens (-1 after)
    hidden: torch.Tensor  # [B * R, hidden] the main model's states at the verified rows (a copy)
    host: torch.Tensor  # packed's host copy (pinned on CUDA)
    ready: torch.cuda.Event | None = None  # None on a CPU: the step has run when launch returns

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()


class SpecStep:
    """Static buffers and graphs of the fused speculative step for up to `max_requests` requests."""

    def __init__(
        self,
        net: DeepseekV32,
        pool: CachePool,
        k: int,
        max_requests: int,
        max_blocks: int,
        *,
        graphs: bool,
        relaxed: RelaxedAcceptance | None = None,
    ) -> None:
        if k < 1:
            raise ValueError("the speculative step needs k >= 1 drafts")
        self.net, self.pool, self.k, self.r = net, pool, k, k + 1
        self.relaxed = relaxed
        self.use_graphs = graphs
        self.sizes = capture_sizes(max(1, max_requests))
        self.max_requests = self.sizes[-1]
        self.max_blocks = max_blocks
        self.dev = pool.latent.device
        self.vocab = net.cfg.vocab_size
        self.nf = _NF_BASE + 2 * (k - 1)
        bmax, r, h = self.max_requests, self.r, net.cfg.hidden_size
        self.scratch_slot = pool.scratch_block * pool.block_size
        # static inputs
        self.plan = torch.zeros(self.nf * bmax * r, dtype=torch.long, device=self.dev)
        self.tables = torch.full((bmax, max_blocks), pool.scratch_block, dtype=torch.int32, device=self.dev)
        self.hidden_in = torch.zeros(bmax * r, h, dtype=net.dtype, device=self.dev)
        self.fparams = torch.zeros(3 * bmax, dtype=torch.float32, device=self.dev)  # temperature, top_p, min_p
        # random draws of sampling requests: allocated on the first sampling step or capture (a prefill
        # worker, which never decodes, never holds them)
        self.draft_noise = self.uniforms = self.bonus_noise = torch.empty(0, device=self.dev)
        self.zero_rows = torch.zeros(r, h, dtype=net.dtype, device=self.dev)
        # graphs
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.disabled = not graphs
        self.sampling_disabled = False  # a capture of the sampling program failed: sampling steps run eagerly
        self.sealed = False
        self.captures = 0
        self.misses_after_ready = 0
        self.capture_seconds = 0.0
        self.steps = 0  # steps run (replayed or eager)
        self.mempool = torch.cuda.graph_pool_handle() if graphs else None

    # ---- the program --------------------------------------------------------------------------
    def _field(self, f: int, b: int, n: int | None = None) -> torch.Tensor:
        off = f * b * self.r
        return self.plan[off : off + (b * self.r if n is None else n)]

    def _rows(self, tables: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor) -> PagedRows:
        return PagedRows(self.pool, tables, (pos + 1).to(torch.int32), slots)

    @torch.inference_mode()
    def compute(self, b: int, sampling: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The step over the first b requests of the static buffers. Returns (packed [b, 1 + R] int64:
        accepted count then the tokens to emit, -1 after them; hidden [b * R, H] of the verified rows)."""
        net, k, r = self.net, self.k, self.r
        nr = b * r
        tables = self.tables[:b]
        tables_rows = tables[:, None, :].expand(b, r, tables.shape[1]).reshape(nr, -1)  # no host sync
        greedy = self._field(_F_GREEDY, b, b) != 0
        # 1. catch-up of the MTP layer (right-aligned pending rows; padding rows on the scratch block)
        c_ids, c_pos, c_slot = (self._field(f, b) for f in (_F_C_IDS, _F_C_POS, _F_C_SLOT))
        batch = ForwardBatch(c_ids, c_pos, [], None, self._rows(tables_rows, c_pos, c_slot))
        h = net.mtp_forward(self.hidden_in[:nr], c_ids, batch).view(b, r, -1)[:, -1].contiguous()
        if sampling:
            fp = self.fparams
            temp, top_p, min_p = fp[:b], fp[self.max_requests : self.max_requests + b], fp[2 * self.max_requests :][:b]
            top_k = self._field(_F_TOPK, b, b)
        # 2. drafts
        drafts: list[torch.Tensor] = []
        qs: list[torch.Tensor] = []
        for j in range(k):
            if j > 0:
                pos = self._field(_NF_BASE + 2 * (j - 1), b, b)
                slot = self._field(_NF_BASE + 2 * (j - 1) + 1, b, b)
                ids = drafts[-1]
                h = net.mtp_forward(h, ids, ForwardBatch(ids, pos, [], None, self._rows(tables, pos, slot)))
            logits = net.logits(h)
            if sampling:
                q = processed_probs_static(logits, greedy, temp, top_k, top_p, min_p)
                noise = self.draft_noise[:b, j].clamp_min(_TINY)
                drafts.append((q / noise).argmax(dim=-1))
                qs.append(q)
            else:
                drafts.append(logits.argmax(dim=-1))
        d = torch.stack(drafts, dim=1)  # [b, k]
        # 3. verification by the main model
        v_pos, v_slot = self._field(_F_V_POS, b), self._field(_F_V_SLOT, b)
        v_ids = torch.cat([self._field(_F_V_IDS0, b, b)[:, None], d], dim=1).reshape(nr)
        hidden = net.forward(ForwardBatch(v_ids, v_pos, [], None, self._rows(tables_rows, v_pos, v_slot)))
        tl = net.logits(hidden).view(b, r, -1)
        # 4. acceptance
        if sampling:
            rep = lambda x: x[:, None].expand(b, r).reshape(nr)  # noqa: E731 - per-row params of the b * r rows
            p = processed_probs_static(tl.view(nr, -1), rep(greedy), rep(temp), rep(top_k), rep(top_p), rep(min_p))
            p = p.view(b, r, -1)
            q_all = torch.stack(qs, dim=1)  # [b, k, V]
            p_d = p[:, :k].gather(2, d[..., None]).squeeze(2)
            q_d = q_all.gather(2, d[..., None]).squeeze(2)
            accept = torch.where(greedy[:, None], d == p[:, :k].argmax(dim=2), self.uniforms[:b] * q_d < p_d)
        else:
            t_best = tl.argmax(dim=2)  # [b, r]
            accept = d == t_best[:, :k]
        if self.relaxed is not None:
            rx = self.relaxed
            think = thinking_states(d, self._field(_F_THINK, b, b) != 0, rx.think_start, rx.think_end)
            relaxed = relaxed_accept(tl[:, :k], d, rx.topk, rx.delta) & think & greedy[:, None]
            accept = accept | relaxed
        n = torch.cumprod(accept.to(torch.long), dim=1).sum(dim=1)  # [b]
        rows = torch.arange(b, device=d.device)
        if sampling:
            p_n = p[rows, n]
            n_q = n.clamp(max=k - 1)
            residual = (p_n - q_all[rows, n_q]).clamp_min(0.0)
            residual = torch.where(residual.sum(dim=1, keepdim=True) > 0, residual, p_n)
            weights = torch.where((n < k)[:, None], residual, p_n)
            sampled = (weights / self.bonus_noise[:b].clamp_min(_TINY)).argmax(dim=1)
            bonus = torch.where(greedy, p_n.argmax(dim=1), sampled)
        else:
            bonus = t_best[rows, n]
        col = torch.arange(k, device=d.device)[None, :]
        toks = torch.cat([torch.where(col < n[:, None], d, torch.full_like(d, -1)), torch.full_like(n, -1)[:, None]], 1)
        toks = toks.scatter(1, n[:, None], bonus[:, None])
        return torch.cat([n[:, None], toks], dim=1), hidden

    # ---- host side --------------------------------------------------------------------------
    def _random_buffers(self) -> None:
        if self.draft_noise.numel() == 0:
            bmax, k, v = self.max_requests, self.k, self.vocab
            self.draft_noise = torch.ones(bmax, k, v, dtype=torch.float32, device=self.dev)
            self.uniforms = torch.zeros(bmax, k, dtype=torch.float32, device=self.dev)
            self.bonus_noise = torch.ones(bmax, v, dtype=torch.float32, device=self.dev)

    def _fill(self, reqs: list[Request], b: int, sampling: bool, fed: frozenset[int] = frozenset()) -> None:
        """Write the plan of these requests (padded to b) into the static buffers. Rows in `fed` get
        only their block table and sampling parameters: `_feed` writes the rest on the device."""
        k, r, bs = self.k, self.r, self.pool.block_size
        nreq = len(reqs)
        plan = np.zeros((self.nf, b * r), np.int64)
        plan[[_F_C_SLOT, _F_V_SLOT]] = self.scratch_slot
        for f in range(k - 1):
            plan[_NF_BASE + 2 * f + 1, :b] = self.scratch_slot
        tables = np.full((b, self.max_blocks), self.pool.scratch_block, np.int32)
        pieces: list[torch.Tensor] = []
        for i, req in enumerate(reqs):
            t = np.asarray(req.block_table, np.int64)
            if len(t) > self.max_blocks:
                raise RuntimeError(f"request {req.request_id}: block table wider than the step's buffers")
            tables[i, : len(t)] = t
            plan[_F_GREEDY, i] = req.params.greedy
            plan[_F_TOPK, i] = req.params.top_k
            plan[_F_THINK, i] = req.thinking
            if i in fed:
                pieces.append(self.zero_rows)
                continue
            nc, m0 = req.num_computed, req.mtp_computed
            n = nc - m0
            ids = req.all_ids
            lo = i * r + (r - n)
            cpos = np.arange(m0, nc, dtype=np.int64)
            plan[_F_C_IDS, lo : (i + 1) * r] = ids[m0 + 1 : nc + 1]
            plan[_F_C_POS, lo : (i + 1) * r] = cpos
            plan[_F_C_SLOT, lo : (i + 1) * r] = t[cpos // bs] * bs + cpos % bs
            if n < r:  # padding slots replicate the first pending row (same experts), writing the scratch block
                plan[_F_C_IDS, i * r : lo] = ids[m0 + 1]
                plan[_F_C_POS, i * r : lo] = m0
            vpos = np.arange(nc, nc + r, dtype=np.int64)
            plan[_F_V_POS, i * r : (i + 1) * r] = vpos
            plan[_F_V_SLOT, i * r : (i + 1) * r] = t[vpos // bs] * bs + vpos % bs
            plan[_F_V_IDS0, i] = ids[-1]
            for j in range(1, k):
                p = nc + j - 1
                plan[_NF_BASE + 2 * (j - 1), i] = p
                plan[_NF_BASE + 2 * (j - 1) + 1, i] = t[p // bs] * bs + p % bs
            assert req.pending_hidden is not None  # eligible()
            if n < r:
                pieces.append(req.pending_hidden[:1].expand(r - n, -1))
            pieces.append(req.pending_hidden[:n])
        plan[_F_GREEDY, nreq:b] = 1
        if nreq < b:
            pieces.append(self.zero_rows[:1].expand((b - nreq) * r, -1))
        arrays: tuple[np.ndarray, ...] = (plan.reshape(-1), tables)
        dsts = [self.plan[: self.nf * b * r], self.tables[:b]]
        if sampling:
            bm = self.max_requests
            fp = np.zeros(3 * bm, np.float32)
            for i, req in enumerate(reqs):
                fp[i], fp[bm + i], fp[2 * bm + i] = req.params.temperature, req.params.top_p, req.params.min_p
            fp[bm + nreq : bm + b] = 1.0
            arrays += (fp,)
            dsts.append(self.fparams)
        # through one pinned buffer on CUDA: copies that do not wait for the step still running
        srcs = pack(arrays, pin=True) if self.dev.type == "cuda" else [torch.from_numpy(a) for a in arrays]
        for dst, src in zip(dsts, srcs):
            dst.copy_(src, non_blocking=True)
        torch.cat(pieces, out=self.hidden_in[: b * r])
        if sampling:
            self._random_buffers()
            self.draft_noise[:b].fill_(1.0)
            self.uniforms[:b].zero_()
            self.bonus_noise[:b].fill_(1.0)
            v = self.vocab
            for i, req in enumerate(reqs):  # the per-phase path's order: drafts, uniforms, correction
                if req.params.greedy:
                    continue
                g = req.generator
                if g is None:
                    raise ValueError(f"request {req.request_id} samples but has no generator")
                for j in range(k):
                    self.draft_noise[i, j].copy_(torch.empty(v, device=self.dev).exponential_(generator=g))
                self.uniforms[i].copy_(torch.rand(k, generator=g, device=self.dev))
                self.bonus_noise[i].copy_(torch.empty(v, device=self.dev).exponential_(generator=g))

    @torch.inference_mode()
    def _feed(self, b: int, fed: Sequence[tuple[int, int, int]], prev: SpecLaunched) -> None:
        """Plan the fed rows on the device from the step before (engine/overlap.py): for each (row, its
        row in prev, its num_computed before prev), prev accepted a drafts and emitted a + 1 tokens, so
        this step catches the MTP layer up on those a + 1 positions (right-aligned in the R slots, the
        padding slots replicating the first, on the scratch block) with prev's verified hidden states,
        and verifies at the a + 1 positions after: what `_fill` computes on the host once prev's
        results are read. Nothing here waits for the device."""
        r, k, bs, h = self.r, self.k, self.pool.block_size, self.hidden_in.shape[1]
        idx = to_device(torch.tensor(fed, dtype=torch.long).T.contiguous(), self.dev)
        rows, src, base = idx[0], idx[1], idx[2]
        got = prev.packed.index_select(0, src)
        a, toks = got[:, 0], got[:, 1:]
        s = torch.arange(r, device=self.dev)[None, :]
        first = (r - 1 - a)[:, None]  # the first of the a + 1 pending slots
        off = (s - first).clamp_min(0)  # [F, R]: the pending position each slot holds (padding: the first)
        tables = self.tables.index_select(0, rows).long()

        def slot(p: torch.Tensor) -> torch.Tensor:
            return tables.gather(1, p // bs) * bs + p % bs

        c_pos = base[:, None] + off
        v_pos = c_pos[:, -1:] + 1 + s  # the last pending position is the last known token's
        v_slot = slot(v_pos)
        plan = self.plan[: self.nf * b * r].view(self.nf, b, r)
        plan[_F_C_IDS].index_copy_(0, rows, toks.gather(1, off))
        plan[_F_C_POS].index_copy_(0, rows, c_pos)
        plan[_F_C_SLOT].index_copy_(0, rows, torch.where(s >= first, slot(c_pos), self.scratch_slot))
        plan[_F_V_POS].index_copy_(0, rows, v_pos)
        plan[_F_V_SLOT].index_copy_(0, rows, v_slot)
        flat = plan.view(self.nf, b * r)
        flat[_F_V_IDS0].index_copy_(0, rows, toks.gather(1, a[:, None])[:, 0])
        for j in range(1, k):  # draft j + 1 runs at the position of verification row j - 1
            flat[_NF_BASE + 2 * (j - 1)].index_copy_(0, rows, v_pos[:, j - 1])
            flat[_NF_BASE + 2 * (j - 1) + 1].index_copy_(0, rows, v_slot[:, j - 1])
        hid = prev.hidden.view(-1, r, h).index_select(0, src).gather(1, off[..., None].expand(-1, -1, h))
        self.hidden_in[: b * r].view(b, r, h).index_copy_(0, rows, hid)

    @torch.inference_mode()
    def launch(
        self, reqs: list[Request], fed: Sequence[tuple[int, int, int]] = (), prev: SpecLaunched | None = None
    ) -> SpecLaunched:
        """One speculative step for these decode requests, launched without waiting for it. Rows not
        in `fed` are eligible requests planned on the host (1..R pending positions each); fed rows,
        (row, row in prev, num_computed before prev), continue from `prev`, a step that may still be
        running: their inputs come from its results on the device (`_feed`)."""
        nreq = len(reqs)
        self.steps += 1
        sampling = any(not r.params.greedy for r in reqs)
        b = nreq
        key = None
        if not self.disabled and not (sampling and self.sampling_disabled):
            pad = _pad_to(nreq, self.sizes)
            if pad is not None:
                key = (pad, sampling)
                b = pad
                if key not in self.graphs:
                    if self.sealed:
                        self.misses_after_ready += 1
                        key, b = None, nreq
        self._fill(reqs, b, sampling, frozenset(row for row, _, _ in fed))
        if fed:
            assert prev is not None
            self._feed(b, fed, prev)
        if key is not None and key not in self.graphs and not self._try_capture(*key):
            key = None
        if key is not None:
            graph, (packed, hidden) = self.graphs[key]
            graph.replay()
        else:
            packed, hidden = self.compute(b, sampling)
        packed = packed[:nreq].clone()  # the graph's outputs are overwritten by its next replay
        out = SpecLaunched(packed, hidden[: nreq * self.r].clone(), to_host(packed))
        if self.dev.type == "cuda":
            out.ready = torch.cuda.Event()
            out.ready.record()
        return out

    # ---- graphs -----------------------------------------------------------------------------
    def _padding_plan(self, b: int) -> None:
        """Every request a padding request (scratch block), for captures."""
        self.plan.zero_()
        for f in (_F_C_SLOT, _F_V_SLOT):
            self._field(f, b).fill_(self.scratch_slot)
        for j in range(1, self.k):
            self._field(_NF_BASE + 2 * (j - 1) + 1, b, b).fill_(self.scratch_slot)
        self._field(_F_GREEDY, b, b).fill_(1)
        self.tables.fill_(self.pool.scratch_block)
        self.hidden_in.zero_()
        self.fparams.zero_()

    @torch.inference_mode()
    def capture_all(self) -> int:
        t0, n = time.perf_counter(), 0
        for size in self.sizes:
            for sampling in (False, True):
                if self.disabled or (sampling and self.sampling_disabled):
                    continue
                if (size, sampling) not in self.graphs:
                    if sampling:
                        self._random_buffers()
                    self._padding_plan(size)
                    n += self._try_capture(size, sampling)
        if self.dev.type == "cuda":
            torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - t0
        return n

    def seal(self) -> None:
        self.sealed = True

    def _try_capture(self, b: int, sampling: bool) -> bool:
        try:
            self.graphs[b, sampling] = self._capture(b, sampling)
            self.captures += 1
            return True
        except Exception:  # noqa: BLE001 - serving goes on eagerly rather than failing requests
            what = "sampling" if sampling else "every"
            log.exception(
                "capturing the speculative step for %d requests failed: %s step runs eagerly from now on", b, what
            )
            if sampling:  # the greedy program keeps its graphs
                self.sampling_disabled = True
                self.graphs = {key: g for key, g in self.graphs.items() if not key[1]}
            else:
                self.disabled = True
                self.graphs.clear()
            return False

    def _capture(self, b: int, sampling: bool) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, torch.Tensor]]:
        # the warm-up run writes the cache entries of the plan's rows, which the replay writes again
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, allocator settles
            self.compute(b, sampling)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self.compute(b, sampling)
        return graph, out
