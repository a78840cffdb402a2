"""Responses that stop their work when the client goes away.

`DisconnectAwareStreamingResponse` streams an async iterator of strings and, in parallel, listens for the
ASGI ``http.disconnect`` message: on a disconnect it cancels the streaming task (which raises
CancelledError inside the body iterator, whose ``finally`` closes the backend generations) and then
closes the iterator. This does not wait for the next ``send`` to fail, so a backend that is slow to
produce its next token is cancelled at once.

While the body iterator produces nothing for `keepalive_s` seconds (a long prompt waiting for its first
token), the response sends an SSE comment line, ``: keep-alive``, so that proxies and load balancers with
idle timeouts do not cut the connection; clients' SSE parsers skip comments.

`run_until_disconnect` does the same for a non-streaming request's coroutine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

T = TypeVar("T")


#: An SSE comment line (clients ignore it) sent while a stream has nothing else to send.
KEEPALIVE = b": keep-alive\n\n"


class ClientDisconnected(Exception):
    pass


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Runs `work`; if the client disconnects first, cancels it and raises `ClientDisconnected`."""
    work_task = asyncio.ensure_future(work)
    watch = asyncio.create_task(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        raise ClientDisconnected()
    finally:
        for t in (work_task, watch):
            if not t.done():
                t.cancel()
        await asyncio.gather(work_task, watch, return_exceptions=True)


class DisconnectAwareStreamingResponse(Response):
    def __init__(
        self,
        body: AsyncGenerator[str, None],
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str = "text/event-stream",
        request_id: str = "",
        on_close: Callable[[], None] | None = None,
        keepalive_s: float | None = None,
    ) -> None:
        self.body_iterator = body
        self.on_close = on_close
        self.keepalive_s = keepalive_s
        self.status_code = status_code
        self.media_type = media_type
        self.background = None
        self.request_id = request_id
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            it = self.body_iterator.__aiter__()
            while True:
                # The next chunk is awaited in a task of its own so that, while none comes (a long prompt's
                # prefill), an SSE comment goes out every keepalive_s and proxies keep the connection.
                nxt = asyncio.ensure_future(it.__anext__())
                try:
                    while not (await asyncio.wait({nxt}, timeout=self.keepalive_s))[0]:
                        await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})
                finally:
                    if not nxt.done():  # cancelled (client gone): the generator's finally runs now
                        nxt.cancel()
                        await asyncio.gather(nxt, return_exceptions=True)
                try:
                    chunk = nxt.result()
                except StopAsyncIteration:
                    break
                await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        stream_task = asyncio.create_task(stream())
        watch = asyncio.create_task(wait_for_disconnect(receive))
        try:
            await asyncio.wait({stream_task, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not stream_task.done():
                logger.info("request %s: client disconnected, cancelling", self.request_id)
        finally:
            for t in (stream_task, watch):
                if not t.done():
                    t.cancel()
            results: Sequence[Any] = await asyncio.gather(stream_task, watch, return_exceptions=True)
            try:
                await self.body_iterator.aclose()
            finally:
                if self.on_close is not None:
                    self.on_close()
        exc = results[0]
        if isinstance(exc, OSError):  # the client went away while we were sending
            logger.info("request %s: client disconnected during send", self.request_id)
        elif isinstance(exc, BaseException) and not isinstance(exc, asyncio.CancelledError):
            raise exc
