"""Kernel tests: on a machine without a GPU the Triton kernels run under Triton's CPU interpreter.

TRITON_INTERPRET must be set before a @triton.jit function is defined, so it is set here (only
when no GPU is present: on a GPU machine the same tests compile the kernels) and any kernel module
imported earlier in this pytest process is reloaded.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()

if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
    _ORDER = [
        "_common",
        "quant",
        "radix_topk",
        "indexer",
        "sparse_mla",
        "norm",
        "rotary",
        "cache_write",
        "moe_router",
        "indexer_query",
        "fp32_gemm",
        "greedy",
        "activation",
        "fp8_gemm",
        "moe",
    ]
    for _name in [f"splitserve.kernels.{m}" for m in _ORDER] + ["splitserve.kernels"]:
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])


@pytest.fixture
def device() -> str:
    """Where the Triton side of a small-shape test runs: the GPU if there is one, else the CPU interpreter."""
    return "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)
