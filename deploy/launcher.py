"""Assembling a running cluster: checkpoint, workers (through the `Controller`), and the router app.

    cluster = Cluster(cfg).start()       # resolves the model once, starts the pools, builds the app
    uvicorn.Server(uvicorn.Config(cluster.app, lifespan="on", ...)).run(sockets=[sock])
    cluster.shutdown()                   # every worker, and the local Ray cluster

`splitserve up` does exactly this (deploy/cluster_cli.py); tests do it with a uvicorn thread. The app
is the router's OpenAI app (`splitserve.router.app.build_app`) over a `DisaggBackend` (a `ColocatedBackend`
when router.mode is colocated) that routes over the controller's `Directory`, plus the /admin endpoints
(deploy/admin.py) behind the operator token (`Cluster.operator_token`, not the clients' API key). The app's lifespan starts the backend's worker poller and
closes its gRPC channels.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from tokenizers import Tokenizer

from splitserve.deploy.config import ClusterConfig
from splitserve.deploy.controller import Controller
from splitserve.model.config import ModelConfig
from splitserve.router.membership import Directory
from splitserve.router.openai_api import ApiLimits

logger = logging.getLogger(__name__)

__all__ = ["Cluster", "ModelFiles", "api_limits", "build_router_app", "resolve_model"]


@dataclass(frozen=True)
class ModelFiles:
    """The checkpoint as the router sees it: where it is, its config, its tokenizer."""

    path: Path
    config: ModelConfig
    tokenizer: Tokenizer


def resolve_model(cfg: ClusterConfig) -> ModelFiles:
    """Resolve cfg.model.path ("tiny" is made on first use, here, once) and load what the router needs.

    Raises:
        FileNotFoundError: not a checkpoint directory (the router's node needs config.json and the
            tokenizer; the worker nodes need the weights at the same path).
    """
    from splitserve.model.presets import resolve_checkpoint
    from splitserve.model.tokenizer import load_tokenizer

    if cfg.model.is_tiny:
        logger.info("resolving the tiny checkpoint (made on first use)...")
    path = Path(resolve_checkpoint(cfg.model.path))
    return ModelFiles(path=path, config=ModelConfig.from_json(path / "config.json"), tokenizer=load_tokenizer(path))


def api_limits(cfg: ClusterConfig, model: ModelFiles) -> ApiLimits:
    return ApiLimits(
        vocab_size=model.config.vocab_size,
        max_context_len=cfg.model.max_model_len or model.config.max_position_embeddings,
        max_body_bytes=cfg.router.max_body_bytes,
    )


def build_router_app(
    cfg: ClusterConfig,
    directory: Directory,
    model: ModelFiles,
    *,
    controller: Controller | None = None,
    api_key: str | None = None,
    operator_token: str | None = None,
    request_shutdown: Callable[[], None] | None = None,
    cluster_secret: str | None = None,
) -> tuple[FastAPI, Any]:
    """The router app over the cluster backend, with /admin when `controller` is given.

    `api_key` guards the public API; `operator_token` (required with `controller`) guards /admin. The
    backend presents `cluster_secret` (default: the controller's) to the workers on every call.

    Returns (app, backend). Serve the app with lifespan on: it starts and closes the backend.
    """
    from splitserve.deploy.admin import build_admin_router
    from splitserve.router.app import build_app
    from splitserve.router.cluster_backend import ColocatedBackend, DisaggBackend

    r = cfg.router
    kind = ColocatedBackend if r.mode == "colocated" else DisaggBackend
    backend = kind(
        directory,
        policy=r.policy,
        reserve_timeout_s=r.reserve_timeout_s,
        first_token_timeout_s=r.first_token_timeout_s,
        idle_stream_timeout_s=r.idle_stream_timeout_s,
        # a reservation lives until its prefill (and cache transfer) is done
        lease_s=r.first_token_timeout_s,
        cluster_secret=cluster_secret or (controller.cluster_secret if controller else None),
        grpc_tls=controller.grpc_tls if controller is not None else None,
    )
    app = build_app(
        backend,
        model.tokenizer,
        cfg.model.served_name,
        api_limits(cfg, model),
        api_key=api_key,
        max_queued=r.max_queued,
        add_bos=model.config.bos_token_id is not None,
        eos_token_id=model.config.eos_token_id,
        sse_keepalive_s=r.sse_keepalive_s,
    )
    if controller is not None:
        if operator_token is None:
            raise ValueError("/admin needs an operator_token")
        app.include_router(
            build_admin_router(controller, operator_token=operator_token, request_shutdown=request_shutdown)
        )
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:
            await backend.start()
            try:
                yield state
            finally:
                await backend.close()

    app.router.lifespan_context = lifespan
    return app, backend


class Cluster:
    """One cluster: its controller (workers on Ray), Directory, model files and router app."""

    def __init__(
        self,
        cfg: ClusterConfig,
        *,
        router_url: str | None = None,
        start_timeout_s: float = 600.0,
        operator_token: str | None = None,
        **controller_options: Any,
    ) -> None:
        """`operator_token` guards /admin (None: a fresh random one, `self.operator_token`);
        `controller_options` go to `Controller` (drain_timeout_s, monitor_interval_s, ...)."""
        self.cfg = cfg
        self.api_key = cfg.router.resolve_api_key()  # a missing key variable fails before anything starts
        self.operator_token = operator_token or secrets.token_urlsafe(32)
        self.directory = Directory()
        self.controller = Controller(
            cfg, self.directory, router_url=router_url, start_timeout_s=start_timeout_s, **controller_options
        )
        self.model: ModelFiles | None = None
        self.app: FastAPI | None = None
        self.backend: Any = None
        self.on_shutdown_request: Callable[[], None] | None = None

    @property
    def router_url(self) -> str | None:
        return self.controller.router_url

    @router_url.setter
    def router_url(self, url: str | None) -> None:
        self.controller.router_url = url

    def start(self) -> Cluster:
        """Resolve the model, start every worker (bounded; see `Controller.start`), build the app."""
        self.model = resolve_model(self.cfg)
        self.controller.model_path = str(self.model.path)
        self.controller.start()
        try:
            self.app, self.backend = build_router_app(
                self.cfg,
                self.directory,
                self.model,
                controller=self.controller,
                api_key=self.api_key,
                operator_token=self.operator_token,
                request_shutdown=self._request_shutdown,
            )
        except BaseException:
            self.controller.shutdown()
            raise
        return self

    def _request_shutdown(self) -> None:
        if self.on_shutdown_request is not None:
            self.on_shutdown_request()
        else:
            logger.warning("shutdown requested, but nothing serves this cluster's app to stop")

    def shutdown(self) -> None:
        self.controller.shutdown()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
