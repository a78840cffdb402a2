"""Test helpers: a small deterministic reference backend, a scripted backend (known model output) and a
uvicorn server running in a thread.

`ReferenceBackend` is an honest implementation of `GenerationBackend`: a seeded bigram language model
over ``[0, vocab_size)`` whose next-token logits depend only on the previous token. It honours
max_tokens, EOS / ignore_eos, stop_token_ids, seeds, logit_bias, temperature, top-k, top-p, min-p and the
penalties, and reports logprobs (``log_softmax`` of its logits plus the request's logit_bias, before any
other processing, as the engine does) and prompt logprobs (raw, no bias, as the engine does). It records
which requests started, finished and were
cancelled, so tests can check that the router closes generators. It knows nothing of the router.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import numpy as np
import uvicorn

from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.backend import GenerationDelta, TokenLogprobs

logger = logging.getLogger(__name__)


class ReferenceBackend:
    def __init__(
        self,
        vocab_size: int,
        eos_token_id: int = 1,
        model_seed: int = 0,
        logit_scale: float = 3.0,
        eos_bias: float = 0.0,
        token_delay_s: float = 0.0,
        tokens_per_delta: int = 1,
        fail_after_tokens: int | None = None,
        first_token_delay_s: float = 0.0,
    ) -> None:
        if vocab_size < 2 or tokens_per_delta < 1:
            raise ValueError("vocab_size >= 2 and tokens_per_delta >= 1 required")
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.model_seed = model_seed
        self.logit_scale = logit_scale
        self.eos_bias = eos_bias
        self.token_delay_s = token_delay_s
        self.tokens_per_delta = tokens_per_delta
        self.fail_after_tokens = fail_after_tokens
        self.first_token_delay_s = first_token_delay_s  # a long prompt's prefill, before the first token
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.active: set[str] = set()
        self.peak_active = 0
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self._cache: dict[int, np.ndarray] = {}

    # ---- the model ------------------------------------------------------------------------------

    def logits(self, prev: int) -> np.ndarray:
        """Next-token logits after token `prev` (float64, shape [vocab_size])."""
        v = self._cache.get(prev)
        if v is None:
            rng = np.random.default_rng([self.model_seed, prev])
            v = rng.standard_normal(self.vocab_size) * self.logit_scale
            v[self.eos_token_id % self.vocab_size] += self.eos_bias
            if len(self._cache) < 65536:
                self._cache[prev] = v
        return v

    def logprobs(self, prev: int, params: SamplingParams | None = None) -> np.ndarray:
        """log_softmax of the logits after `prev`, with `params.logit_bias` added when given."""
        x = self._biased(self.logits(prev), params)
        m = x.max()
        return x - (m + np.log(np.exp(x - m).sum()))

    @staticmethod
    def _biased(logits: np.ndarray, params: SamplingParams | None) -> np.ndarray:
        if params is None or not params.logit_bias:
            return logits
        x = logits.copy()
        for t, b in params.logit_bias:
            x[t] += b
        return x

    def greedy_continuation(
        self, prompt: list[int], n: int, logit_bias: Mapping[int, float] | None = None
    ) -> list[int]:
        """What greedy decoding without penalties (with `logit_bias` added) produces (for tests)."""
        params = SamplingParams(logit_bias=tuple(logit_bias.items()) if logit_bias else ())
        out, prev = [], prompt[-1]
        for _ in range(n):
            prev = int(np.argmax(self._biased(self.logits(prev), params)))
            out.append(prev)
        return out

    def _top(self, logp: np.ndarray, k: int) -> list[tuple[int, float]]:
        if k <= 0:
            return []
        k = min(k, logp.shape[0])
        idx = np.argpartition(-logp, k - 1)[:k]
        idx = idx[np.lexsort((idx, -logp[idx]))]
        return [(int(i), float(logp[i])) for i in idx]

    def _process(
        self, logits: np.ndarray, params: SamplingParams, prompt: list[int], generated: list[int]
    ) -> np.ndarray:
        x = self._biased(logits, params).copy()
        if params.repetition_penalty != 1.0:
            seen = np.unique(np.asarray(prompt + generated, dtype=np.int64))
            vals = x[seen]
            x[seen] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
        if generated and (params.presence_penalty or params.frequency_penalty):
            counts = np.bincount(np.asarray(generated, dtype=np.int64), minlength=self.vocab_size)
            x -= params.presence_penalty * (counts > 0) + params.frequency_penalty * counts
        if params.greedy:
            return x
        x = x / params.temperature
        order = np.argsort(-x, kind="stable")
        keep = np.ones_like(x, dtype=bool)
        if params.top_k > 0:
            keep[order[params.top_k :]] = False
            x = np.where(keep, x, -np.inf)
        p = np.exp(x - x.max())
        p /= p.sum()
        if params.top_p < 1.0:
            cum = np.cumsum(p[order])
            cut = int(np.searchsorted(cum, params.top_p)) + 1
            keep[order[cut:]] = False
        if params.min_p > 0.0:
            keep &= p >= params.min_p * p.max()
        return np.where(keep, x, -np.inf)

    def _sample(self, x: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
        if params.greedy:
            return int(np.argmax(x))
        p = np.exp(x - x.max())
        p /= p.sum()
        return int(rng.choice(self.vocab_size, p=p))

    # ---- the protocol ---------------------------------------------------------------------------

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationDelta]:
        if not prompt_token_ids or any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise ValueError(f"request {request_id}: invalid prompt")
        if any(t >= self.vocab_size for t, _ in params.logit_bias):
            raise ValueError(f"request {request_id}: logit_bias token id outside the vocabulary")
        self.started.append(request_id)
        self.active.add(request_id)
        self.peak_active = max(self.peak_active, len(self.active))
        self.requests[request_id] = (list(prompt_token_ids), params)
        completed = False
        try:
            seed = params.seed & (2**64 - 1) if params.seed is not None else None
            rng = np.random.default_rng(seed)
            prompt_lps: list[TokenLogprobs | None] | None = None
            if params.prompt_logprobs is not None:
                prompt_lps = [None]
                for prev, tok in zip(prompt_token_ids, prompt_token_ids[1:], strict=False):
                    lp = self.logprobs(prev)
                    prompt_lps.append(TokenLogprobs(tok, float(lp[tok]), self._top(lp, params.prompt_logprobs)))
            generated: list[int] = []
            pending: list[int] = []
            pending_lps: list[TokenLogprobs] = []
            prev = prompt_token_ids[-1]
            first = True
            await asyncio.sleep(self.first_token_delay_s)
            while True:
                if self.fail_after_tokens is not None and len(generated) >= self.fail_after_tokens:
                    completed = True
                    yield GenerationDelta([], finish_reason="abort", error="reference backend: injected failure")
                    return
                raw = self.logits(prev)
                tok = self._sample(self._process(raw, params, prompt_token_ids, generated), params, rng)
                generated.append(tok)
                pending.append(tok)
                if params.logprobs is not None:
                    lp = self.logprobs(prev, params)
                    pending_lps.append(TokenLogprobs(tok, float(lp[tok]), self._top(lp, params.logprobs)))
                finish = None
                if (tok == self.eos_token_id and not params.ignore_eos) or tok in params.stop_token_ids:
                    finish = "stop"
                elif len(generated) >= params.max_tokens:
                    finish = "length"
                if finish is not None or len(pending) >= self.tokens_per_delta:
                    await asyncio.sleep(self.token_delay_s)
                    delta = GenerationDelta(
                        token_ids=pending,
                        logprobs=pending_lps if params.logprobs is not None else None,
                        prompt_logprobs=prompt_lps if first else None,
                        finish_reason=finish,
                    )
                    pending, pending_lps, first = [], [], False
                    if finish is not None:
                        completed = True
                    yield delta
                    if finish is not None:
                        return
                prev = tok
        finally:
            self.active.discard(request_id)
            (self.finished if completed else self.cancelled).append(request_id)
            logger.debug("request %s: %s", request_id, "finished" if completed else "cancelled")

    async def health(self) -> dict:
        return {"status": "ok", "active": len(self.active)}

    def metrics(self) -> Mapping[str, float]:
        return {
            "active_requests": float(len(self.active)),
            "started_requests_total": float(len(self.started)),
            "cancelled_requests_total": float(len(self.cancelled)),
        }


class ScriptedBackend:
    """A `GenerationBackend` whose generations write given tokens: what a real model would have decoded.

    `script` is a token sequence, or a function of (prompt ids, params) giving one. The backend follows
    the contract of `splitserve.router.backend`: it stops at EOS (unless ignore_eos) or a stop token id
    with ``finish_reason="stop"`` (that token included), at max_tokens with "length", and sends
    `tokens_per_delta` tokens per delta. A script that runs out before either is an error delta (a test
    bug, never hidden). `requests` records each request's prompt and params.
    """

    def __init__(
        self,
        script: Sequence[int] | Callable[[list[int], SamplingParams], Sequence[int]],
        eos_token_id: int = 1,
        tokens_per_delta: int = 1,
    ) -> None:
        if tokens_per_delta < 1:
            raise ValueError("tokens_per_delta >= 1 required")
        self.script = script
        self.eos_token_id = eos_token_id
        self.tokens_per_delta = tokens_per_delta
        self.requests: dict[str, tuple[list[int], SamplingParams]] = {}
        self.finished: list[str] = []

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationDelta]:
        self.requests[request_id] = (list(prompt_token_ids), params)
        script = self.script(list(prompt_token_ids), params) if callable(self.script) else self.script
        pending: list[int] = []
        for n, tok in enumerate(script, start=1):
            pending.append(tok)
            finish = None
            if (tok == self.eos_token_id and not params.ignore_eos) or tok in params.stop_token_ids:
                finish = "stop"
            elif n >= params.max_tokens:
                finish = "length"
            if finish is not None or len(pending) >= self.tokens_per_delta:
                await asyncio.sleep(0)
                yield GenerationDelta(token_ids=pending, finish_reason=finish)
                pending = []
                if finish is not None:
                    self.finished.append(request_id)
                    return
        yield GenerationDelta(pending, finish_reason="abort", error="scripted backend: the script ran out")

    async def health(self) -> dict:
        return {"status": "ok"}


class ServerThread:
    """Runs an ASGI app under uvicorn on 127.0.0.1 and a free port, in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.bind((host, 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self, timeout_s: float = 10.0) -> str:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError("uvicorn did not stop")

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
