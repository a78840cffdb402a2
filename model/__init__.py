"""The DeepSeek-V3.2 network, its config and its checkpoints.

    net = splitserve.model.load(path, device="cpu", dtype=torch.float32)
    logits = net.score(input_ids)          # [S] -> [S, vocab], cache-free

The names below load on first use, so that `splitserve.model.tokenizer` (which the router imports to
tokenize) does not bring in torch and the network with its package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .batch import DenseStore, ForwardBatch, IndexerKeys, KVStore, SeqSpan
    from .config import ConfigError, ModelConfig, RopeConfig
    from .loader import CheckpointError, load
    from .network import DeepseekV32

__all__ = [
    "load",
    "DeepseekV32",
    "ModelConfig",
    "RopeConfig",
    "ConfigError",
    "CheckpointError",
    "ForwardBatch",
    "SeqSpan",
    "KVStore",
    "DenseStore",
    "IndexerKeys",
]

_WHERE = {
    "DenseStore": "batch",
    "ForwardBatch": "batch",
    "IndexerKeys": "batch",
    "KVStore": "batch",
    "SeqSpan": "batch",
    "ConfigError": "config",
    "ModelConfig": "config",
    "RopeConfig": "config",
    "CheckpointError": "loader",
    "load": "loader",
    "DeepseekV32": "network",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value
