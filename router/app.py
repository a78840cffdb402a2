"""The router's OpenAI-compatible HTTP app.

``build_app(backend, tokenizer, model_name, limits, ...)`` serves

* ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (Bearer API key if one is
  configured; OpenAI error bodies for every 4xx/5xx);
* ``GET /health`` (200 when the backend says ``{"status": "ok"}``, else 503) and ``GET /metrics``.

Per request: authenticate, read the body (bounded), validate, tokenize, admit (bounded; 429 beyond),
then run one backend generation per (prompt, sample), applying stop strings on the detokenized text.
A client that disconnects cancels its generations.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer

from splitserve.model.tokenizer import EOS_TOKEN
from splitserve.router import responses as R
from splitserve.router.admission import Admission, AdmissionRejected
from splitserve.router.backend import GenerationBackend
from splitserve.router.chat import ChatEncoder, encode_messages
from splitserve.router.chat_output import ChatOutputOptions, ChatOutputStream, chat_message
from splitserve.router.generation import (
    BackendFailure,
    ChoiceEvent,
    ChoiceResult,
    ChoiceRunner,
    ChoiceStream,
    Piece,
    run_choices,
)
from splitserve.router.metrics import RequestTimer, RouterMetrics
from splitserve.router.openai_api import (
    ApiError,
    ApiLimits,
    PreparedRequest,
    error_body,
    parse_chat_request,
    parse_completion_request,
    prepare_chat,
    prepare_completion,
)
from splitserve.router.streaming import (
    KEEPALIVE,
    ClientDisconnected,
    DisconnectAwareStreamingResponse,
    run_until_disconnect,
    wait_for_disconnect,
)

logger = logging.getLogger(__name__)

_INLINE_BODY_BYTES = 64 * 1024  # larger bodies are validated and tokenized in a worker thread
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


class _StatusCounter:
    """Pure ASGI middleware (keeps streaming and cancellation intact) counting responses by status."""

    def __init__(self, app: ASGIApp, metrics: RouterMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 0}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in _ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"] or 499)).inc()


class _Server:
    def __init__(
        self,
        backend: GenerationBackend,
        tokenizer: Tokenizer,
        model_name: str,
        limits: ApiLimits,
        chat_encoder: ChatEncoder,
        api_key: str | None,
        admission: Admission,
        retry_after_s: int,
        add_bos: bool,
        eos_token_id: int | None,
        metrics: RouterMetrics,
    ) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.limits = limits
        self.chat_encoder = chat_encoder
        self.api_key = api_key
        self.admission = admission
        self.retry_after_s = retry_after_s
        self.add_bos = add_bos
        self.eos_token_id = eos_token_id
        self.metrics = metrics
        self.sse_keepalive_s: float | None = None
        self.strings = R.TokenStrings(tokenizer)
        self.created = int(time.time())

    # ---- checks -------------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key.", code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise ApiError(413, f"Request body exceeds {limit} bytes.", code="request_too_large")
            except ValueError:
                raise ApiError(400, "Invalid Content-Length header.") from None
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"Request body exceeds {limit} bytes.", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def admit(self, request_id: str) -> None:
        try:
            self.admission.try_enter()
        except AdmissionRejected as e:
            self.metrics.rejected.inc()
            logger.warning("request %s: rejected: %s", request_id, e)
            raise ApiError(
                429,
                "The server is overloaded; retry later.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(self.retry_after_s)},
            ) from None
        self.metrics.in_flight.inc()

    def failure_error(self, e: BackendFailure) -> ApiError:
        """503 + Retry-After (no worker can take it now), 400 (it can never fit), else 500."""
        if e.status == 400:
            return ApiError(400, str(e), code=e.code)
        headers = {}
        if e.status == 503:
            headers["Retry-After"] = str(max(1, round(e.retry_after_s or self.retry_after_s)))
        return ApiError(e.status, f"Generation failed: {e}", type="server_error", code=e.code, headers=headers)

    def _releaser(self) -> Callable[[bool], None]:
        done = False

        def release(started: bool) -> None:
            nonlocal done
            if not done:
                done = True
                self.admission.leave(started)
                self.metrics.in_flight.dec()

        return release

    # ---- running ------------------------------------------------------------------------------

    async def prepare(self, body: bytes, chat: bool) -> PreparedRequest:
        """Validates and tokenizes; big bodies are tokenized off the event loop."""

        def run() -> PreparedRequest:
            if chat:
                creq = parse_chat_request(body)
                self.check_model(creq.model)
                return prepare_chat(creq, self.tokenizer, self.limits, self.chat_encoder)
            req = parse_completion_request(body)
            self.check_model(req.model)
            return prepare_completion(req, self.tokenizer, self.limits, self.add_bos)

        if len(body) > _INLINE_BODY_BYTES:
            return await asyncio.to_thread(run)
        return run()

    def runners(self, request_id: str, prepared: PreparedRequest, timer: RequestTimer) -> list[ChoiceRunner]:
        out = []
        for p, ids in enumerate(prepared.prompts):
            for s in range(prepared.n):
                index = p * prepared.n + s
                out.append(
                    ChoiceRunner(
                        index=index,
                        request_id=f"{request_id}-{index}",
                        backend=self.backend,
                        tokenizer=self.tokenizer,
                        prompt_ids=ids,
                        params=prepared.params_for(p, s),
                        eos_token_id=self.eos_token_id,
                        timer=timer,
                        prompt_only=prepared.prompt_only,
                    )
                )
        return out

    async def handle(self, request: Request, chat: bool) -> Response:
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        start = time.monotonic()
        try:
            self.check_auth(request)
            body = await self.read_body(request)
            prepared = await self.prepare(body, chat)
            self.admit(request_id)
        except ApiError as e:
            logger.info("request %s: %d %s", request_id, e.status, e.message)
            return error_response(e)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prepared.prompts))
        logger.info(
            "request %s: %d prompt(s) x n=%d, prompt tokens %s, max_tokens %d, stream %s",
            request_id,
            len(prepared.prompts),
            prepared.n,
            [len(p) for p in prepared.prompts],
            prepared.params.max_tokens,
            prepared.stream,
        )
        timer = RequestTimer(self.metrics, start)
        release = self._releaser()
        if prepared.stream:
            return await self.start_stream(request, request_id, prepared, timer, chat, release)
        started = False

        async def work() -> list[ChoiceResult]:
            nonlocal started
            await self.admission.wait_turn()
            started = True
            return await run_choices(self.runners(request_id, prepared, timer))

        try:
            results = await run_until_disconnect(request.receive, work())
        except ClientDisconnected:
            logger.info("request %s: client disconnected, generation cancelled", request_id)
            return Response(status_code=499)
        except BackendFailure as e:
            logger.error("request %s: backend failure: %s", request_id, e)
            return error_response(self.failure_error(e))
        finally:
            release(started)
            timer.done()
        body_ = (
            self.chat_body(request_id, prepared, results)
            if chat
            else self.completion_body(request_id, prepared, results)
        )
        logger.info("request %s: done, %d completion tokens", request_id, body_["usage"]["completion_tokens"])
        return JSONResponse(body_)

    # ---- bodies -------------------------------------------------------------------------------

    def _usage(self, prepared: PreparedRequest, results: Sequence[ChoiceResult]) -> dict[str, int]:
        return R.usage(sum(len(p) for p in prepared.prompts), sum(r.num_generated for r in results))

    def _echo(self, prepared: PreparedRequest, prompt_index: int, result: ChoiceResult) -> tuple[str, list[Piece]]:
        return R.echo_prompt(
            prepared.prompts[prompt_index], prepared.prompt_texts[prompt_index], result.prompt_logprobs, self.tokenizer
        )

    def _completion_logprobs(
        self,
        echo_text: str,
        echo_pieces: list[Piece],
        gen_pieces: list[Piece],
        gen_text_len: int | None,
        gen_base: int | None = None,
    ) -> dict[str, Any]:
        """Prompt (echo) then generated tokens; generated offsets start after the echoed text."""
        lp = R.completion_logprobs(echo_pieces, self.strings, 0) if echo_pieces else None
        base = len(echo_text) if gen_base is None else gen_base
        gen = R.completion_logprobs(gen_pieces, self.strings, base, gen_text_len)
        if lp is None:
            return gen
        return {k: lp[k] + gen[k] for k in lp}

    def completion_body(
        self, request_id: str, prepared: PreparedRequest, results: list[ChoiceResult]
    ) -> dict[str, Any]:
        choices = []
        for r in results:
            echo_text, echo_pieces = "", list[Piece]()
            if prepared.echo:
                echo_text, echo_pieces = self._echo(prepared, r.index // prepared.n, r)
            logprobs = None
            if prepared.logprobs is not None:
                logprobs = self._completion_logprobs(echo_text, echo_pieces, r.pieces, len(r.text))
            choices.append(R.completion_choice(r.index, echo_text + r.text, logprobs, r.finish_reason))
        return R.completion_body(
            request_id, self.created_now(), self.model_name, choices, self._usage(prepared, results)
        )

    def chat_body(self, request_id: str, prepared: PreparedRequest, results: list[ChoiceResult]) -> dict[str, Any]:
        choices = []
        for r in results:
            logprobs = R.chat_logprobs(r.pieces, self.strings) if prepared.logprobs is not None else None
            message, finish = chat_message(r.text, r.finish_reason, prepared.chat_output or ChatOutputOptions())
            choices.append(R.chat_choice(r.index, message, logprobs, finish))
        return R.chat_body(request_id, self.created_now(), self.model_name, choices, self._usage(prepared, results))

    @staticmethod
    def created_now() -> int:
        return int(time.time())

    # ---- streaming ----------------------------------------------------------------------------

    async def start_stream(
        self,
        request: Request,
        request_id: str,
        prepared: PreparedRequest,
        timer: RequestTimer,
        chat: bool,
        release: Callable[[bool], None],
    ) -> Response:
        """Starts a streaming request, holding the HTTP response back until its first event, for a while.

        The backend refuses a request before its first delta (`Unavailable`: 503 + Retry-After,
        `NeverFits`: 400), and the backend interface has no separate "admitted / reserved" event; so the
        first event (the first delta of any choice, or the failure) is awaited before the response
        starts, and a failure by then answers the same status code as a non-streaming request.

        That wait is bounded by `sse_keepalive_s`: a prompt whose prefill takes longer gets its 200 and
        the SSE stream then, starting with a keep-alive comment and sending one every `sse_keepalive_s`
        until the first token (so proxies keep the connection), as before. A refusal after that point,
        or any failure once the stream started, is an SSE error event (as OpenAI does). With no
        keep-alives configured (None) the response waits for the first event, however long.
        A client that disconnects while the response is held cancels the generation (499).
        """
        turn = {"started": False}
        stream = ChoiceStream(self.runners(request_id, prepared, timer))
        events = stream.events()

        async def first_event() -> ChoiceEvent | None:
            await self.admission.wait_turn()
            turn["started"] = True
            try:
                return await events.__anext__()
            except StopAsyncIteration:
                return None

        first = asyncio.create_task(first_event(), name=f"{request_id}-first")
        watch = asyncio.create_task(wait_for_disconnect(request.receive))
        try:
            await asyncio.wait({first, watch}, timeout=self.sse_keepalive_s, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            first.cancel()
            raise
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        failure = first.exception() if first.done() and not first.cancelled() else None
        gone = not first.done() and watch.done() and not watch.cancelled()
        if isinstance(failure, BackendFailure) or gone or first.cancelled():
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            await events.aclose()
            release(turn["started"])
            timer.done()
            if isinstance(failure, BackendFailure):
                logger.error("request %s: backend failure before the first token: %s", request_id, failure)
                return error_response(self.failure_error(failure))
            logger.info("request %s: client disconnected before the first token, generation cancelled", request_id)
            return Response(status_code=499)

        def on_close() -> None:
            if not first.done():  # the body never ran (client gone at once): stop the generation
                first.cancel()
            release(turn["started"])

        gen = self._stream(request_id, prepared, timer, chat, stream, events, first)
        return DisconnectAwareStreamingResponse(
            gen,
            request_id=request_id,
            on_close=on_close,
            headers={"Cache-Control": "no-cache"},
            keepalive_s=self.sse_keepalive_s,
        )

    async def _stream(
        self,
        request_id: str,
        prepared: PreparedRequest,
        timer: RequestTimer,
        chat: bool,
        stream: ChoiceStream,
        events: AsyncGenerator[ChoiceEvent, None],
        first: asyncio.Task[ChoiceEvent | None],
    ) -> AsyncGenerator[str, None]:
        """SSE lines of a streaming request whose first event is (or will be) the result of `first`."""
        created = self.created_now()
        include_usage = prepared.include_usage
        obj = "chat.completion.chunk" if chat else "text_completion"
        echo_lens: dict[int, int] = {}  # prompt index -> length of its echoed text
        options = prepared.chat_output or ChatOutputOptions()
        outputs = [ChatOutputStream(options) for _ in range(prepared.num_choices if chat else 0)]
        try:
            if not first.done():  # the first token is slow: the stream starts now, with a keep-alive
                yield KEEPALIVE.decode()
            ev0 = await first
            if chat:
                for i in range(prepared.num_choices):
                    yield R.sse(
                        R.chat_chunk(
                            request_id,
                            created,
                            self.model_name,
                            i,
                            {"role": "assistant", "content": ""},
                            None,
                            None,
                            include_usage,
                        )
                    )
            ev: ChoiceEvent | None = ev0
            while ev is not None:
                lines = (
                    self._chat_lines(ev, request_id, created, prepared, outputs[ev.index])
                    if chat
                    else self._completion_lines(ev, request_id, created, prepared, echo_lens)
                )
                for line in lines:
                    yield line
                ev = await anext(events, None)
            results = stream.results or []
            if include_usage:
                yield R.sse(R.usage_chunk(request_id, created, self.model_name, obj, self._usage(prepared, results)))
            yield R.SSE_DONE
            logger.info("request %s: stream done", request_id)
        except BackendFailure as e:
            logger.error("request %s: backend failure: %s", request_id, e)
            err = self.failure_error(e)
            yield R.sse(error_body(err.message, err.type, None, err.code))
            yield R.SSE_DONE
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
            await events.aclose()  # cancels every choice if we stopped early (client gone, error)
            timer.done()

    def _chat_lines(
        self, ev: ChoiceEvent, request_id: str, created: int, prepared: PreparedRequest, output: ChatOutputStream
    ) -> list[str]:
        """The event's text as reasoning / content / tool-call deltas; logprobs ride on the first of them."""
        lines = []
        usage_null = prepared.include_usage
        deltas = output.feed(ev.text) if ev.text else []
        if ev.finish_reason is not None:
            deltas += output.finish()
        lp = R.chat_logprobs(ev.pieces, self.strings) if prepared.logprobs is not None and ev.pieces else None
        if lp is not None and not deltas:
            deltas = [{}]
        for i, delta in enumerate(deltas):
            chunk = R.chat_chunk(
                request_id, created, self.model_name, ev.index, delta, lp if i == 0 else None, None, usage_null
            )
            lines.append(R.sse(chunk))
        if ev.finish_reason is not None:
            finish = output.finish_reason(ev.finish_reason)
            chunk = R.chat_chunk(request_id, created, self.model_name, ev.index, {}, None, finish, usage_null)
            lines.append(R.sse(chunk))
        return lines

    def _completion_lines(
        self, ev: ChoiceEvent, request_id: str, created: int, prepared: PreparedRequest, echo_lens: dict[int, int]
    ) -> list[str]:
        """One chunk per event; the first chunk of a choice carries the echoed prompt (and its logprobs).
        Events with no text are skipped, except a choice's first: its chunk tells the client the first
        token exists even when its text is still held back (part of a UTF-8 character, a possible stop
        string), as the chat stream's role chunk does, so a client's time to first token is the server's."""
        p = ev.index // prepared.n
        echo_text, echo_pieces = "", list[Piece]()
        if prepared.echo and ev.first:
            echo_text, echo_pieces = R.echo_prompt(
                prepared.prompts[p], prepared.prompt_texts[p], ev.prompt_logprobs, self.tokenizer
            )
            echo_lens[p] = len(echo_text)
        lp = None
        if prepared.logprobs is not None:
            lp = self._completion_logprobs(echo_text, echo_pieces, ev.pieces, None, echo_lens.get(p, 0))
        text = echo_text + ev.text
        if not text and (lp is None or not ev.pieces) and ev.finish_reason is None and not ev.first:
            return []
        choice = R.completion_choice(ev.index, text, lp, ev.finish_reason)
        return [R.sse(R.completion_chunk(request_id, created, self.model_name, choice, prepared.include_usage))]

    # ---- other endpoints ----------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "splitserve",
                    "max_model_len": self.limits.max_context_len,
                }
            ],
        }

    async def health(self) -> JSONResponse:
        try:
            status = await asyncio.wait_for(self.backend.health(), timeout=5.0)
        except Exception as e:  # noqa: BLE001 - any failure means unhealthy
            logger.warning("health check failed: %s", e)
            return JSONResponse({"status": "error", "error": f"{type(e).__name__}: {e}"}, status_code=503)
        ok = isinstance(status, dict) and status.get("status") == "ok"
        return JSONResponse(
            status if isinstance(status, dict) else {"status": str(status)}, status_code=200 if ok else 503
        )


def build_app(
    backend: GenerationBackend,
    tokenizer: Tokenizer,
    model_name: str,
    limits: ApiLimits,
    *,
    chat_encoder: ChatEncoder = encode_messages,
    api_key: str | None = None,
    max_queued: int = 256,
    max_running: int | None = None,
    retry_after_s: int = 1,
    add_bos: bool = False,
    eos_token_id: int | None = None,
    sse_keepalive_s: float | None = 15.0,
) -> FastAPI:
    """The OpenAI-compatible app over `backend`.

    `sse_keepalive_s`: a stream that has nothing to send for this long sends an SSE comment
    (``: keep-alive``) so proxies keep the connection while a long prompt is prefilled (None: never).
    A stream's response is held back for up to this long waiting for its first token, so that a request
    the backend refuses by then answers 503 / 400 like a non-streaming one (see `_Server.start_stream`).

    `max_queued` bounds admitted requests (running + waiting; 429 beyond), `max_running` how many run
    at once. `add_bos` prepends BOS to string prompts of /v1/completions (chat prompts carry their own).
    `eos_token_id` defaults to the tokenizer's ``<｜end▁of▁sentence｜>``.
    """
    if eos_token_id is None:
        eos_token_id = tokenizer.token_to_id(EOS_TOKEN)
    metrics = RouterMetrics(backend)
    server = _Server(
        backend=backend,
        tokenizer=tokenizer,
        model_name=model_name,
        limits=limits,
        chat_encoder=chat_encoder,
        api_key=api_key,
        admission=Admission(max_queued, max_running),
        retry_after_s=retry_after_s,
        add_bos=add_bos,
        eos_token_id=eos_token_id,
        metrics=metrics,
    )
    server.sse_keepalive_s = sse_keepalive_s
    app = FastAPI(title="splitserve router", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.state.metrics = metrics

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def _internal_error(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error: %s", exc)
        return JSONResponse(error_body("Internal server error.", "server_error"), status_code=500)

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        try:
            server.check_auth(request)
        except ApiError as e:
            return error_response(e)
        return JSONResponse(server.models())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.handle(request, chat=True)

    @app.get("/health")
    async def health() -> Response:
        return await server.health()

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_StatusCounter, metrics=metrics)
    return app
