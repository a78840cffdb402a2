"""Shared fixtures: small random checkpoints made once per test session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splitserve.model.checkpoint import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0, dtype=__import__("torch").float32)


@pytest.fixture(scope="session")
def tiny_fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splitserve.model.checkpoint import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("tiny_fp8"), seed=0, fp8=True)


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("splitserve").setLevel(logging.INFO)
