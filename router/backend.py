"""What the HTTP front end needs from whatever generates tokens (the disaggregated cluster, a local engine,
or the reference backend in `splitserve.router.testing`).

Contract of `GenerationBackend.generate`:

* It is an async generator of `GenerationDelta`s for one request (``async def generate(...)`` with
  ``yield``; an ``async def`` that *returns* an async iterator is tolerated too); the last delta has
  `finish_reason` set. ``params.stop`` (stop strings) may be ignored: the router applies them.
* ``token_ids`` are the new tokens of the delta (several per delta with speculative decoding).
* A stop caused by EOS (unless ``params.ignore_eos``) or by one of ``params.stop_token_ids`` ends with
  ``finish_reason == "stop"`` and the stopping token is included as the last entry of ``token_ids``
  (the router leaves it out of the text). Reaching ``params.max_tokens`` ends with "length".
* The backend knows nothing about stop *strings*: the router applies them to the detokenized text and,
  when one matches, closes the generator (``aclose()``); the backend must then abort the request and
  free its resources in the generator's ``finally``/``GeneratorExit`` handling. The same happens when
  the client disconnects.
* ``logprobs`` has one entry per new token when ``params.logprobs is not None`` (``top`` holds the
  ``params.logprobs`` most likely alternatives, best first); ``prompt_logprobs`` comes only in the first
  delta, one entry per prompt token, entry 0 being None, when ``params.prompt_logprobs is not None``.
* A failure is reported as a delta with ``error`` set (and ``finish_reason`` "abort"), or by raising;
  the router turns either into a 5xx / an error event, never into a hang. Two failures are the
  client's to act on, raised before the first delta: `Unavailable` (no worker can take the request
  now: 503 with Retry-After) and `NeverFits` (no worker could ever take it: 400).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.sampling_params import TokenLogprobs as _EngineTokenLogprobs

FINISH_REASONS = ("stop", "length", "abort")


# One type for a token's logprobs from the engine's sampler to the HTTP response.
TokenLogprobs = _EngineTokenLogprobs


@dataclass(slots=True)
class GenerationDelta:
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    finish_reason: str | None = None
    error: str | None = None


class Unavailable(Exception):
    """No worker can take the request now (every one full, or none serving); retry later."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NeverFits(Exception):
    """The request can never be served here (its prompt exceeds every worker's cache)."""


class GenerationBackend(Protocol):
    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationDelta]:
        """An async generator (``async def`` with ``yield``) of the request's deltas."""
        ...

    async def health(self) -> dict:
        """A JSON-able status; ``{"status": "ok", ...}`` when the backend can serve."""
        ...


@runtime_checkable
class SupportsMetrics(Protocol):
    """Optional: a backend with this method has its values exported on /metrics as gauges."""

    def metrics(self) -> Mapping[str, float]: ...
