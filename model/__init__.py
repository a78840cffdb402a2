"""The DeepSeek-V3.2 network, its config and its checkpoints.

    net = splitserve.model.load(path, device="cpu", dtype=torch.float32)
    logits = net.score(input_ids)          # [S] -> [S, vocab], cache-free
"""

from .batch import DenseStore, ForwardBatch, IndexerKeys, KVStore, SeqSpan
from .config import ConfigError, ModelConfig, RopeConfig
from .loader import CheckpointError, load
from .network import DeepseekV32

__all__ = ["load", "DeepseekV32", "ModelConfig", "RopeConfig", "ConfigError", "CheckpointError",
           "ForwardBatch", "SeqSpan", "KVStore", "DenseStore", "IndexerKeys"]
