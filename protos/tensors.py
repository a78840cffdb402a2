"""Conversions for the tensor-like wire messages: `Tensor` and `TokenLogprobs`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from splitserve.engine.sampling_params import TokenLogprobs

from . import worker_pb2 as pb

if TYPE_CHECKING:
    import torch

# torch is imported where tensors are converted: the router imports this module for logprobs only
_DTYPE_NAMES = ("float32", "bfloat16", "float16", "uint8", "int64")


def _dtypes() -> dict[str, torch.dtype]:
    import torch

    return {name: getattr(torch, name) for name in _DTYPE_NAMES}


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    import torch

    t = t.detach().cpu().contiguous()
    name = str(t.dtype).replace("torch.", "")
    if name not in _DTYPE_NAMES:
        raise ValueError(f"cannot send a {name} tensor")
    return pb.Tensor(dtype=name, shape=list(t.shape), data=t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    import torch

    if msg.dtype not in _DTYPE_NAMES:
        raise ValueError(f"unknown tensor dtype {msg.dtype!r}")
    dtype = _dtypes()[msg.dtype]
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8) if msg.data else torch.empty(0, dtype=torch.uint8)
    n = int(np.prod(msg.shape)) if msg.shape else 1
    if raw.numel() != n * torch.empty(0, dtype=dtype).element_size():
        raise ValueError(f"tensor of shape {list(msg.shape)} {msg.dtype} has {raw.numel()} bytes")
    return raw.view(dtype).reshape(list(msg.shape))


def logprobs_to_proto(lp: TokenLogprobs) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top_token_ids=[t for t, _ in lp.top],
        top_logprobs=[v for _, v in lp.top],
    )


def logprobs_from_proto(msg: pb.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(msg.token_id, msg.logprob, list(zip(msg.top_token_ids, msg.top_logprobs)))
