"""Running the backend generations of one HTTP request: detokenization, stop strings, n > 1.

One `ChoiceRunner` drives one backend generation (one choice). It detokenizes the deltas incrementally,
applies stop strings and, when one matches, closes the backend iterator so the backend aborts the
request. `run_choices` runs all choices of a request, cancelling every one of them (and so closing every
backend iterator) when one fails or when the caller is cancelled (client disconnect).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from splitserve.engine.sampling_params import SamplingParams
from splitserve.model.tokenizer import StopStringMatcher, TextDecoder
from splitserve.router.backend import GenerationBackend, NeverFits, TokenLogprobs, Unavailable
from splitserve.router.metrics import RequestTimer

logger = logging.getLogger(__name__)


class BackendFailure(Exception):
    """The backend reported an error, raised, aborted, or broke the protocol.

    `status` is the HTTP status it maps to: 500, or 503 (`Unavailable`: `retry_after_s` set) and 400
    (`NeverFits`) for the backend's two client-facing refusals; `code` the OpenAI-style error code.
    """

    def __init__(
        self, message: str, status: int = 500, code: str = "backend_error", retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after_s = status, code, retry_after_s


@dataclass(slots=True)
class Piece:
    """One generated token as reported to the client."""

    token_id: int
    logprobs: TokenLogprobs | None
    offset: int  # character offset in the choice's generated text where the token's text starts


@dataclass(slots=True)
class ChoiceEvent:
    """What one backend delta adds to a choice (streaming)."""

    index: int
    text: str
    pieces: list[Piece]
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    first: bool = False


@dataclass(slots=True)
class ChoiceResult:
    index: int
    text: str = ""
    pieces: list[Piece] = field(default_factory=list)
    finish_reason: str | None = None
    num_generated: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None


Emit = Callable[[ChoiceEvent], Awaitable[None]]


class ChoiceRunner:
    def __init__(
        self,
        *,
        index: int,
        request_id: str,
        backend: GenerationBackend,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        params: SamplingParams,
        eos_token_id: int | None,
        timer: RequestTimer | None = None,
        prompt_only: bool = False,
    ) -> None:
        self.index = index
        self.request_id = request_id
        self._backend = backend
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
        self._params = params
        self._timer = timer
        self._prompt_only = prompt_only
        stop_ids = set(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            stop_ids.add(eos_token_id)
        self._stop_ids = frozenset(stop_ids)

    async def run(self, emit: Emit | None = None) -> ChoiceResult:
        params = self._params
        result = ChoiceResult(index=self.index)
        decoder = TextDecoder(self._tokenizer, skip_special_tokens=True)
        matcher = StopStringMatcher(params.stop)
        first = True
        agen: Any = self._backend.generate(self.request_id, list(self._prompt_ids), params)
        if inspect.isawaitable(agen):  # tolerate `async def generate` returning an iterator
            agen = await agen
        try:
            try:
                async for delta in agen:
                    if delta.error is not None:
                        raise BackendFailure(delta.error)
                    if first and delta.prompt_logprobs is not None:
                        result.prompt_logprobs = list(delta.prompt_logprobs)
                    finish = delta.finish_reason
                    ids = list(delta.token_ids)
                    lps = delta.logprobs
                    if params.logprobs is not None and ids and (lps is None or len(lps) != len(ids)):
                        raise BackendFailure("backend returned no logprobs for some tokens")
                    room = params.max_tokens - result.num_generated
                    if len(ids) >= room:  # never report more than max_tokens, whatever the backend sends
                        if len(ids) > room or finish is None:
                            finish = "length"
                        ids = ids[:room]
                    if finish == "abort":
                        raise BackendFailure("the backend aborted the request")
                    if self._timer is not None:
                        self._timer.tokens(self.index, len(ids))
                    n_text = len(ids)
                    if finish == "stop" and ids and ids[-1] in self._stop_ids:
                        n_text -= 1  # the stopping token (EOS / a stop token id) is not part of the text
                    pieces = []
                    text = ""
                    for j, tok in enumerate(ids):
                        offset = len(decoder.text)
                        if j < n_text:
                            text += decoder.add([tok])
                        pieces.append(Piece(tok, lps[j] if lps is not None else None, offset))
                    result.num_generated += len(ids)
                    if finish is not None:
                        text += decoder.finish()
                    out, stopped = matcher.feed(text)
                    if stopped:
                        finish = "stop"
                    elif finish is not None:
                        out += matcher.flush()
                    if self._prompt_only:
                        out, pieces = "", []
                        result.num_generated = 0
                    result.text += out
                    result.pieces.extend(pieces)
                    if emit is not None and (out or pieces or finish is not None or first):
                        await emit(
                            ChoiceEvent(
                                index=self.index,
                                text=out,
                                pieces=pieces,
                                finish_reason=finish,
                                prompt_logprobs=result.prompt_logprobs if first else None,
                                first=first,
                            )
                        )
                    first = False
                    if finish is not None:
                        result.finish_reason = finish
                        if stopped:
                            logger.debug("request %s: stop string matched, closing the backend stream", self.request_id)
                        break
            except (BackendFailure, asyncio.CancelledError):
                raise
            except Unavailable as e:
                raise BackendFailure(str(e), 503, "no_capacity", e.retry_after_s) from e
            except NeverFits as e:
                raise BackendFailure(str(e), 400, "context_length_exceeded") from e
            except Exception as e:
                logger.exception("request %s: backend raised", self.request_id)
                raise BackendFailure(f"backend error: {type(e).__name__}") from e
            if result.finish_reason is None:
                raise BackendFailure("the backend ended the stream without a finish_reason")
            return result
        finally:
            await _aclose(agen, self.request_id)


async def _aclose(agen: AsyncIterator[object], request_id: str) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("request %s: closing the backend stream failed", request_id)


async def run_choices(runners: Sequence[ChoiceRunner], emit: Emit | None = None) -> list[ChoiceResult]:
    """Runs all choices concurrently; the first failure (or a cancel) cancels all of them."""
    if len(runners) == 1:
        return [await runners[0].run(emit)]
    tasks = [asyncio.create_task(r.run(emit), name=f"{r.request_id}") for r in runners]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ChoiceStream:
    """Async iterator over the `ChoiceEvent`s of all choices; `results` is set once it is exhausted.

    Closing it early (``aclose``, or cancelling the task iterating it) cancels every choice.
    """

    _DONE = object()

    def __init__(self, runners: Sequence[ChoiceRunner]) -> None:
        self._runners = runners
        self.results: list[ChoiceResult] | None = None

    async def events(self) -> AsyncGenerator[ChoiceEvent, None]:
        queue: asyncio.Queue[object] = asyncio.Queue()

        async def emit(ev: ChoiceEvent) -> None:
            queue.put_nowait(ev)

        task = asyncio.create_task(run_choices(self._runners, emit))
        task.add_done_callback(lambda _t: queue.put_nowait(self._DONE))
        try:
            while True:
                item = await queue.get()
                if item is self._DONE:
                    break
                assert isinstance(item, ChoiceEvent)
                yield item
            self.results = task.result()  # re-raises a BackendFailure
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
