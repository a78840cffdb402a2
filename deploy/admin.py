"""Admin HTTP endpoints of a running cluster, mounted on the router app by `splitserve up`:

    GET  /admin/status     the controller's status(): router URL and every worker with its load
    POST /admin/scale      {"prefill": N, "decode": M} (either may be omitted); answers the new status
    POST /admin/shutdown   stops the router, then every worker (answers first)

They take the operator's own Bearer token (made by `splitserve up` for each run and written into the
run directory with mode 0600; the CLI reads it there), never the clients' API key. Errors use the OpenAI
error body the public API uses: 400 (bad request), 401 (no or a wrong operator token), 409 (scale failed to start a worker, or
the Ray cluster has no room for the new ones),
503 (the cluster is not running).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from splitserve.deploy.controller import ControllerError, PlacementError, WorkerStartError

logger = logging.getLogger(__name__)

__all__ = ["ScaleRequest", "build_admin_router"]


class _Controller(Protocol):
    def status(self) -> dict[str, Any]: ...

    def scale(self, prefill: int | None = None, decode: int | None = None) -> dict[str, Any]: ...


class ScaleRequest(BaseModel):
    """Body of POST /admin/scale: the new pool sizes; an omitted (or null) pool keeps its size."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prefill: Annotated[int | None, Field(ge=1)] = None
    decode: Annotated[int | None, Field(ge=1)] = None


def _error(status: int, message: str, code: str, type_: str = "invalid_request_error", **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"error": {"message": message, "type": type_, "param": None, "code": code, **extra}}
    return JSONResponse(body, status_code=status)


def build_admin_router(
    controller: _Controller,
    *,
    operator_token: str,
    request_shutdown: Callable[[], None] | None = None,
) -> APIRouter:
    """The /admin endpoints over `controller`.

    Args:
        controller: what status/scale act on (a `Controller`).
        operator_token: the Bearer token every /admin call needs: the operator's credential, never the
            clients' API key (`splitserve up` makes one per run and writes it, readable only by its owner,
            into the run directory, where the CLI reads it).
        request_shutdown: called after POST /admin/shutdown has answered (e.g. tells uvicorn to exit;
            the `up` process then shuts the controller down). None: the endpoint answers 501.
    """
    if not operator_token:
        raise ValueError("the /admin endpoints need an operator token")
    router = APIRouter(prefix="/admin")
    expected = operator_token.encode()

    def unauthorized(request: Request) -> JSONResponse | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected):
            return None
        return _error(
            401,
            "The admin endpoints need the operator token (`splitserve up` writes it into its run "
            "directory); an API key is not one.",
            "invalid_operator_token",
        )

    @router.get("/status")
    async def status(request: Request) -> JSONResponse:
        if (denied := unauthorized(request)) is not None:
            return denied
        try:
            return JSONResponse(await run_in_threadpool(controller.status))
        except ControllerError as e:
            return _error(503, str(e), "cluster_unavailable", "server_error")

    @router.post("/scale")
    async def scale(request: Request) -> JSONResponse:
        if (denied := unauthorized(request)) is not None:
            return denied
        raw = await request.body()
        try:
            body = ScaleRequest.model_validate_json(raw or b"{}")
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors()
            )
            return _error(400, f"Invalid scale request: {problems}", "invalid_scale_request")
        if body.prefill is None and body.decode is None:
            return _error(400, "Give prefill and/or decode (the new pool sizes).", "invalid_scale_request")
        logger.info("admin: scale to prefill=%s decode=%s", body.prefill, body.decode)
        try:
            result = await run_in_threadpool(controller.scale, body.prefill, body.decode)
        except ValueError as e:
            return _error(400, str(e), "invalid_scale_request")
        except WorkerStartError as e:
            return _error(409, str(e), "worker_start_failed", "server_error", failures=e.failures)
        except PlacementError as e:
            return _error(409, str(e), "cannot_place_workers", "server_error")
        except ControllerError as e:
            return _error(503, str(e), "cluster_unavailable", "server_error")
        return JSONResponse(result)

    @router.post("/shutdown")
    async def shutdown(request: Request) -> JSONResponse:
        if (denied := unauthorized(request)) is not None:
            return denied
        if request_shutdown is None:
            return _error(501, "Shutdown is not available on this server.", "not_supported", "server_error")
        logger.info("admin: shutdown requested")
        return JSONResponse({"status": "shutting down"}, background=BackgroundTask(request_shutdown))

    return router
