"""Shared fixtures: tokenizers, and uvicorn servers over the reference backend (module-scoped, always stopped)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tokenizers import Tokenizer

from splitserve.model.tokenizer import make_tokenizer
from splitserve.router.app import build_app
from splitserve.router.openai_api import ApiLimits
from splitserve.router.testing import ReferenceBackend, ServerThread

VOCAB = 1024
MODEL = "tiny"


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    return make_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def start_server(tok: Tokenizer) -> Iterator[Callable[..., tuple[str, ReferenceBackend]]]:
    """Starts an app over a `ReferenceBackend` on a free port; all are stopped at the end of the module."""
    started: list[ServerThread] = []

    def start(
        backend: ReferenceBackend | None = None, limits: ApiLimits | None = None, **kwargs: Any
    ) -> tuple[str, ReferenceBackend]:
        backend = backend or ReferenceBackend(VOCAB)
        limits = limits or ApiLimits(
            vocab_size=VOCAB,
            max_context_len=256,
            max_n=4,
            max_stop_strings=4,
            max_stop_len=32,
            max_body_bytes=64 * 1024,
        )
        app = build_app(backend, tok, MODEL, limits, **kwargs)
        srv = ServerThread(app)
        srv.start()
        started.append(srv)
        return srv.url, backend

    yield start
    for srv in started:
        srv.stop()
