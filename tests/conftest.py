"""Shared fixtures: small random checkpoints made once per test session.

On a machine without a GPU, TRITON_INTERPRET=1 is set here, before any test module imports the
model (which imports splitserve.kernels): Triton reads it when a kernel is defined, and the kernel
tests run the Triton kernels under its CPU interpreter. Everything else dispatches CPU tensors to
the PyTorch references, so the setting changes nothing for them.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` puts the checkout itself on sys.path, where its top-level kernels/ folder would
# shadow the `kernels` distribution that transformers (>= 5.25) imports at start: import that one
# first (with the checkout off the path for the moment), so `import kernels` finds it in sys.modules.
# The checkout stays on sys.path: worker processes the tests start import `tests.*` through it.
_CHECKOUT = Path(__file__).resolve().parents[1]
_saved_path = list(sys.path)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
try:  # not a dependency of ours (transformers' own): imported by name only to claim the module name
    importlib.import_module("kernels")
except ImportError:
    pass
finally:
    sys.path[:] = _saved_path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splitserve.model.checkpoint import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("tiny"), seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_fp8_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from splitserve.model.checkpoint import make_checkpoint

    return make_checkpoint("tiny", tmp_path_factory.mktemp("tiny_fp8"), seed=0, fp8=True)


def pytest_configure(config: pytest.Config) -> None:
    logging.getLogger("splitserve").setLevel(logging.INFO)
