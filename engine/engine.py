"""The engine: one network, one paged cache, one scheduler. The loop is

    items = scheduler.schedule(); results = runner.execute(items); outputs = postprocess(results)

Both worker kinds run it: a prefill worker adds requests with prefill_only=True (they stop after
the first token and keep their blocks until the cache is sent); a decode worker reserves blocks,
receives the cache into them and adopts the request (`adopt_prefilled`). On its own it is an
offline generator (`generate`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from splitserve.kernels.moe import LARGE_TILES_PER_EXPERT
from splitserve.model import DeepseekV32

from .block_manager import BlockManager
from .cache import CachePool, block_bytes, blocks_for_memory
from .config import EngineConfig
from .overlap import Overlap
from .request import Request, RequestOutput, Status
from .runner import ModelRunner
from .sampler import TokenLogprobs, make_generator
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .spec_step import RelaxedAcceptance

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request the engine cannot run (empty prompt, unknown token ids, too long...)."""


class TooLong(RequestError):
    """The prompt can never fit: the model's context or this engine's whole cache."""


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    requests_done: int = 0
    last_step_drafted: int = 0
    last_step_accepted: int = 0
    step_seconds: float = 0.0


@dataclass
class GenerationResult:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    num_cached_prompt: int = 0


class Engine:
    def __init__(self, net: DeepseekV32, cfg: EngineConfig) -> None:
        self.net, self.cfg = net, cfg
        net.fuse_weights()
        self.weight_bytes = net.weight_bytes()["total"]  # memory the weights hold (FP8 values + scales + the rest)
        mcfg = net.cfg
        self.mtp_k = cfg.mtp_draft_tokens if net.has_mtp else 0
        if cfg.mtp_draft_tokens and not net.has_mtp:
            log.warning(
                "mtp_draft_tokens=%d but the checkpoint has no MTP layer: decoding without drafts", cfg.mtp_draft_tokens
            )
        self.mtp_cache = self.mtp_k > 0
        num_layers = mcfg.num_hidden_layers + (1 if net.has_mtp else 0)
        if cfg.cache_memory_fraction is not None:
            cfg = self.cfg = self._size_cache(cfg, num_layers)
        self.parallel = net.parallel
        if self.parallel.distributed:  # every rank holds the same cache: the smallest fits them all
            n = self.parallel.all_min(cfg.num_blocks)
            if n != cfg.num_blocks:
                cfg = self.cfg = dataclasses.replace(cfg, num_blocks=n)
        self.pool = CachePool(
            mcfg,
            num_layers,
            cfg.num_blocks,
            cfg.block_size,
            net.dtype,
            net.device,
            net.indexer_fp8,
            cfg.latent_fp8,
            staging_blocks=cfg.staging_blocks,
        )
        self.blocks = BlockManager(cfg.num_blocks, cfg.prefix_cache)
        self.scheduler = Scheduler(cfg, self.blocks, self.mtp_k, self.mtp_cache)
        self.max_model_len = cfg.max_model_len or mcfg.max_position_embeddings
        paged = cfg.paged_kernels if cfg.paged_kernels is not None else self.pool.latent.is_cuda
        relaxed = None
        if cfg.mtp_relaxed_topk and self.mtp_k:
            if cfg.think_token_ids is None:
                raise ValueError("mtp_relaxed_topk needs think_token_ids (the ids of <think> and </think>)")
            relaxed = RelaxedAcceptance(cfg.mtp_relaxed_topk, cfg.mtp_relaxed_delta, *cfg.think_token_ids)
        self.runner = ModelRunner(
            net,
            self.pool,
            self.mtp_k,
            self.mtp_cache,
            paged=paged,
            # not yet under tensor parallelism: the followers would have to replay the same graphs
            graphs=cfg.cuda_graphs and self.pool.latent.is_cuda and not self.parallel.distributed,
            max_rows=cfg.max_running * (self.mtp_k + 1),
            max_blocks=self.scheduler.blocks_for(self.max_model_len + self.mtp_k + 1),
            max_requests=cfg.max_running,
            relaxed=relaxed,
        )
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        # overlapped decode steps (overlap.py): on CUDA unless the config says otherwise; never where
        # unsupported (tensor parallel, no paged kernels, relaxed MTP acceptance): every step synchronous
        want = cfg.overlap_scheduling if cfg.overlap_scheduling is not None else self.pool.latent.is_cuda
        self.overlap = Overlap(self) if want and Overlap.supported(self) else None

    def _size_cache(self, cfg: EngineConfig, num_layers: int) -> EngineConfig:
        """num_blocks from cache_memory_fraction of the GPU memory free after the weights."""
        if self.net.device.type != "cuda":
            raise ValueError("cache_memory_fraction needs the network on a CUDA device")
        per_block = block_bytes(
            self.net.cfg, num_layers, cfg.block_size, self.net.dtype, self.net.indexer_fp8, cfg.latent_fp8
        )
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.net.device)
        n = blocks_for_memory(free, cfg.cache_memory_fraction or 1.0, per_block)
        log.info(
            "cache: %d blocks of %d tokens (%.1f MiB each, %.1f GiB) = %.0f%% of the %.1f GiB free of %.1f GiB",
            n,
            cfg.block_size,
            per_block / 2**20,
            n * per_block / 2**30,
            100 * (cfg.cache_memory_fraction or 1.0),
            free / 2**30,
            total / 2**30,
        )
        return dataclasses.replace(cfg, num_blocks=n)

    # ---- tensor parallel ---------------------------------------------------------------------
    def follow(self) -> int:
        """A follower rank (not rank 0): run the leader's network calls until `stop_followers()`
        (engine/runner.py). Its scheduler is never used: the leader plans every step."""
        return self.runner.follow()

    def stop_followers(self) -> None:
        """The leader: release the followers from `follow()` (no-op at world size 1)."""
        self.runner.stop_followers()

    def sync_blocks(self, blocks: list[int]) -> None:
        """The leader: copy these cache blocks to every follower (they arrived on the leader only)."""
        self.runner.sync_blocks(blocks)

    # ---- admission -------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        vocab = self.net.cfg.vocab_size
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise TooLong(f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_model_len}")
        need = self.scheduler.blocks_for(len(prompt_ids) + 1 + self.mtp_k)
        if need > self.cfg.num_blocks:
            raise TooLong(f"the prompt needs {need} cache blocks; this worker has {self.cfg.num_blocks}")
        if params.logprobs is not None and params.logprobs > vocab or (params.prompt_logprobs or 0) > vocab:
            raise RequestError("more logprobs requested than the vocabulary has tokens")
        self._check_logit_bias(params)

    def _check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.net.cfg.vocab_size
        bad = [t for t, _ in params.logit_bias if t >= vocab]
        if bad:
            raise RequestError(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, prefill_only: bool = False
    ) -> Request:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already running")
        self.validate(prompt_ids, params)
        req = Request(
            request_id,
            list(prompt_ids),
            params,
            make_generator(params.seed, self.net.device),
            prefill_only=prefill_only,
        )
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    # ---- disaggregation hooks ---------------------------------------------------------------
    def reserve(self, num_tokens: int) -> list[int] | None:
        """Blocks for a request whose cache will arrive from a prefill worker (None: no space)."""
        n = self.scheduler.blocks_for(num_tokens)
        if not self.blocks.can_allocate(n):
            return None
        return self.blocks.allocate(n)

    def release_blocks(self, blocks: list[int]) -> None:
        self.blocks.free(blocks)

    def adopt_prefilled(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        blocks: list[int],
        first_token: int,
        first_logprobs: TokenLogprobs | None,
        mtp_hidden: torch.Tensor | None,
        generator_state: torch.Tensor | None = None,
    ) -> Request:
        """Join the running batch with a cache that is already in `blocks` (prompt fully computed,
        the first token sampled by the prefill side). mtp_hidden: the main model's hidden state at
        the last prompt position, [hidden], which the MTP layer needs next."""
        self._check_logit_bias(params)
        self.sync_blocks(blocks)  # tensor parallel: the cache arrived on this rank only; the others get a copy
        req = Request(request_id, list(prompt_ids), params, make_generator(params.seed, self.net.device))
        if generator_state is not None and req.generator is not None:
            req.generator.set_state(generator_state)
        req.block_table = list(blocks)
        req.output_ids = [first_token]
        if first_logprobs is not None:
            req.output_logprobs = [first_logprobs]
        req.num_computed = len(prompt_ids)
        if self.mtp_cache and mtp_hidden is not None:
            req.mtp_computed = len(prompt_ids) - 1
            req.pending_hidden = mtp_hidden.to(self.net.device, self.net.dtype).reshape(1, -1)
        elif self.mtp_cache:
            raise RequestError("MTP is on but the prefill side sent no MTP state")
        self.requests[request_id] = req
        self.scheduler.adopt(req)  # RUNNING; finished at once when its first token ends it (the next step reports it)
        reason = self._finish_reason(req, [first_token])
        if reason is not None:
            req.status, req.finish_reason = Status.FINISHED, reason
        return req

    def release_prefilled(self, request_id: str) -> None:
        """A prefill_only request's owner is done with its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self.scheduler.remove(req)
        self.blocks.free(req.block_table)
        req.block_table = []

    # ---- the loop ---------------------------------------------------------------------------
    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        if self.overlap is not None and self.overlap.holds(req):
            self.overlap.wait()  # its row in the step in flight writes its blocks: let that step end first
        self.scheduler.remove(req)
        self.blocks.free(req.block_table)
        req.block_table = []
        req.status, req.finish_reason = Status.FINISHED, "abort"
        return True

    @property
    def has_work(self) -> bool:
        if self.overlap is not None and self.overlap.inflight is not None:
            return True
        return any(not (r.prefill_only and r.is_finished) for r in self.scheduler.running) or bool(
            self.scheduler.waiting
        )

    def _finish_reason(self, req: Request, new: list[int]) -> str | None:
        p = req.params
        last = new[-1]
        if last in p.stop_token_ids:
            return "stop"
        if not p.ignore_eos and last == self.net.cfg.eos_token_id:
            return "stop"
        if len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return "length"
        return None

    def step(self) -> list[RequestOutput]:
        """One engine step; its outputs. With overlapped steps on (overlap.py), a decode step's outputs
        come from the step() call after the one that launched it."""
        t0 = time.perf_counter()
        if self.overlap is None:
            return self._step(t0, [])
        outputs = self.overlap.step()
        if outputs is not None:
            self.stats.step_seconds = time.perf_counter() - t0
            return outputs
        return self._step(t0, self.overlap.drain())  # not overlapped: apply the step in flight first

    def _step(self, t0: float, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """A synchronous step (nothing in flight): schedule, execute, read the tokens, apply them."""
        items = self.scheduler.schedule()
        for req in self.scheduler.finished:
            outputs.append(self._finish(req, [], None))
        self.scheduler.finished.clear()
        # adopted requests that finished on their first token (a prefill_only request that finished
        # keeps its blocks for its owner and was reported when it finished)
        for req in [r for r in self.scheduler.running if r.status is Status.FINISHED and not r.prefill_only]:
            outputs.append(self._finish(req, [], None))
        if not items:
            return outputs
        results = self.runner.execute(items)
        self.stats.steps += 1
        self.stats.last_step_drafted = self.stats.last_step_accepted = 0
        for it in items:
            req = it.req
            res = results[req.request_id]
            if it.decode:
                self.stats.decode_steps += 1
                self.stats.last_step_drafted += res.drafted
                self.stats.last_step_accepted += res.accepted
                self.stats.draft_tokens += res.drafted
                self.stats.accepted_draft_tokens += res.accepted
            else:
                self.stats.prefill_tokens += it.num_tokens
            new, lps = res.new_tokens, res.new_logprobs
            kept, reason = self._append(req, new, lps)
            if kept and req.first_token_time is None:
                req.first_token_time = time.monotonic()
            self.scheduler.register_full_blocks(req)
            klps = lps[: len(kept)] if lps is not None else None
            if reason is not None or (req.prefill_only and kept):
                outputs.append(self._finish(req, kept, klps, reason or "prefilled"))
            else:
                outputs.append(
                    RequestOutput(
                        req.request_id,
                        kept,
                        klps,
                        False,
                        None,
                        num_prompt_tokens=len(req.prompt_ids),
                        num_output_tokens=len(req.output_ids),
                    )
                )
            if kept and req.prompt_logprobs is not None and len(req.output_ids) == len(kept):
                outputs[-1].prompt_logprobs = req.prompt_logprobs
        self.stats.step_seconds = time.perf_counter() - t0
        return outputs

    def _append(self, req: Request, new: list[int], lps: list | None) -> tuple[list[int], str | None]:
        """Append a step's new tokens (and logprobs) to req up to the first that finishes it; returns
        the tokens kept and the finish reason (None: it goes on)."""
        reason = None
        kept: list[int] = []
        for i, t in enumerate(new):  # truncate at the first finishing token
            kept.append(t)
            req.output_ids.append(t)
            if lps is not None and lps[i] is not None:
                req.output_logprobs.append(lps[i])
            reason = self._finish_reason(req, kept)
            if reason is not None:
                break
        if len(kept) < len(new):
            req.num_computed = min(req.num_computed, req.num_tokens - 1)
        return kept, reason

    def _finish(
        self,
        req: Request,
        new: list[int],
        lps: list | None,
        reason: str | None = None,
        defer: list[int] | None = None,
    ) -> RequestOutput:
        """defer: a list to put req's blocks in instead of freeing them (a step in flight writes them)."""
        reason = reason or req.finish_reason
        req.status, req.finish_reason = Status.FINISHED, reason
        if reason == "prefilled" or (req.prefill_only and reason != "abort" and req.output_ids):
            # the prompt's cache is complete (the first token was sampled, maybe finishing the request
            # at once: "length", "stop"): its blocks stay with the request until release_prefilled()
            pass
        else:
            self.scheduler.remove(req)
            if defer is not None:
                defer.extend(req.block_table)
            else:
                self.blocks.free(req.block_table)
            req.block_table = []
            self.requests.pop(req.request_id, None)
            self.stats.requests_done += 1
        return RequestOutput(
            req.request_id,
            new,
            lps,
            True,
            reason,
            prompt_logprobs=None,
            num_prompt_tokens=len(req.prompt_ids),
            num_output_tokens=len(req.output_ids),
            num_cached_prompt=req.num_cached_prompt,
            draft_tokens=req.draft_tokens,
            accepted_draft_tokens=req.accepted_draft_tokens,
        )

    # ---- offline ----------------------------------------------------------------------------
    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerationResult]:
        """Run prompts to completion (continuous batching); results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        base = f"gen-{time.monotonic_ns()}"
        reqs = [self.add_request(f"{base}-{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, plist))]
        pending = {r.request_id for r in reqs}
        while pending:
            for out in self.step():
                if out.finished:
                    pending.discard(out.request_id)
            if pending and not self.has_work:
                raise RuntimeError(f"engine idle with unfinished requests {sorted(pending)}")
        return [
            GenerationResult(
                r.request_id,
                r.prompt_ids,
                r.output_ids,
                r.finish_reason,
                r.output_logprobs,
                r.prompt_logprobs,
                r.draft_tokens,
                r.accepted_draft_tokens,
                r.num_cached_prompt,
            )
            for r in reqs
        ]

    # ---- warm start ---------------------------------------------------------------------------
    def warm_up_lengths(self) -> list[int]:
        """Prompt lengths the warm-up prefills, one request at a time: on CUDA they cover the fused MoE's
        tile configurations (by tokens per expert), Triton's divisibility-by-16 specialisations, a full
        chunk, and a chunk with earlier context; on CPU (reference kernels, nothing to compile) one
        short prompt runs the path."""
        limit = min(
            self.max_model_len - 4 - self.mtp_k, (self.cfg.num_blocks - 1) * self.cfg.block_size - 2 - self.mtp_k
        )
        if not self.pool.latent.is_cuda:
            return [max(1, min(17, limit))]
        mcfg = self.net.cfg
        per_expert = max(1, mcfg.num_experts_per_tok) / max(1, mcfg.n_routed_experts or 1)
        want = {1, 7, 16, 17, 64, 65, self.cfg.chunk_size, self.cfg.chunk_size + self.cfg.block_size + 1}
        for tokens_per_expert in (16, 48, 49, LARGE_TILES_PER_EXPERT):  # _block_m's edges and the 128x128 tiles
            want.add(max(1, int(tokens_per_expert / per_expert) + 1))
        return sorted(n for n in want if 1 <= n <= limit)

    def warm_up(self, capture_graphs: bool = True) -> dict:
        """Before the worker reports ready: run the prompt lengths of warm_up_lengths() through the
        engine (eager prefill + sampling + decode steps: every kernel compiles) and capture a CUDA graph
        for every batch size of the decode and MTP graphs; then seal the graphs (nothing is captured
        while serving) and leave the engine as it was (no requests, no blocks, no cached prefixes,
        counters at zero). Returns what it took: seconds, graphs, GPU memory. capture_graphs=False (a
        prefill worker, which never runs a decode step): no graph is captured at all."""
        import random

        t0 = time.perf_counter()
        cuda = self.pool.latent.is_cuda
        if cuda:
            torch.cuda.synchronize()
            free0 = torch.cuda.mem_get_info(self.pool.latent.device)[0]
        graphs = [g for g in self._graph_sets() if g is not None]
        if not capture_graphs:
            for g in graphs:
                g.seal()
        captured = sum(g.capture_all() for g in graphs) if capture_graphs else 0
        t_graphs = time.perf_counter() - t0
        rng = random.Random(0)
        vocab = self.net.cfg.vocab_size
        lengths = self.warm_up_lengths()
        params = SamplingParams(temperature=0.0, max_tokens=2 + self.mtp_k, ignore_eos=True)
        for n in lengths:
            self.generate([[rng.randrange(vocab) for _ in range(n)]], params)
        for g in graphs:
            g.seal()
            g.misses_after_ready = 0  # the warm-up's own eager steps (no graphs captured) do not count
        self.blocks.clear_cache()
        self.stats = EngineStats()
        seconds = time.perf_counter() - t0
        gpu_bytes = 0
        if cuda:
            torch.cuda.synchronize()
            gpu_bytes = max(0, free0 - torch.cuda.mem_get_info(self.pool.latent.device)[0])
        out = {
            "seconds": seconds,
            "graph_seconds": t_graphs,
            "graphs": captured,
            "prefill_lengths": lengths,
            "gpu_bytes": gpu_bytes,
        }
        log.info(
            "warm-up: %.2f s (%d CUDA graphs in %.2f s, prefills of %s tokens), %.0f MiB of GPU memory",
            seconds,
            captured,
            t_graphs,
            lengths,
            gpu_bytes / 2**20,
        )
        return out

    def _graph_sets(self) -> list:
        """The runner's graph sets: decode and MTP forwards, and the fused speculative step (graphs on)."""
        spec = self.runner.spec if self.runner.spec is not None and self.runner.spec.use_graphs else None
        return [self.runner.graphs, self.runner.mtp_graphs, spec]

    @property
    def graph_stats(self) -> dict[str, int]:
        """CUDA graphs captured, and decode steps after ready that found no graph (ran eagerly)."""
        gs = [g for g in self._graph_sets() if g is not None]
        return {
            "graph_captures": sum(g.captures for g in gs),
            "graph_misses_after_ready": sum(g.misses_after_ready for g in gs),
        }

    # ---- introspection ----------------------------------------------------------------------
    @property
    def blocks_used(self) -> int:
        return self.blocks.num_used

    @property
    def blocks_total(self) -> int:
        return self.cfg.num_blocks
