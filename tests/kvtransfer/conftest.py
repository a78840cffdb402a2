"""Fixtures of the kvtransfer tests: child-process workers that are always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from splitserve.kvtransfer import nixl_available
from splitserve.tests.kvtransfer.workers import Worker, stop_all

BACKENDS = [
    "tcp",
    pytest.param("nixl", marks=pytest.mark.skipif(not nixl_available(), reason="nixl is not installed")),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def spawn_worker() -> Iterator[Callable[..., Worker]]:
    """Start :class:`Worker` children; all of them are stopped (or killed) at teardown."""
    started: list[Worker] = []

    def start(*args: Any, **kwargs: Any) -> Worker:
        w = Worker(*args, **kwargs)
        started.append(w)
        return w

    try:
        yield start
    finally:
        stop_all(started)
