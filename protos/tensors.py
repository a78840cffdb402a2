"""Conversions for the tensor-like wire messages: `Tensor` and `TokenLogprobs`."""

from __future__ import annotations

import numpy as np
import torch

from splitserve.engine.sampler import TokenLogprobs

from . import worker_pb2 as pb

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "uint8": torch.uint8,
           "int64": torch.int64}


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise ValueError(f"cannot send a {name} tensor")
    return pb.Tensor(dtype=name, shape=list(t.shape), data=t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    if msg.dtype not in _DTYPES:
        raise ValueError(f"unknown tensor dtype {msg.dtype!r}")
    dtype = _DTYPES[msg.dtype]
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8) if msg.data else torch.empty(0, dtype=torch.uint8)
    n = int(np.prod(msg.shape)) if msg.shape else 1
    if raw.numel() != n * torch.empty(0, dtype=dtype).element_size():
        raise ValueError(f"tensor of shape {list(msg.shape)} {msg.dtype} has {raw.numel()} bytes")
    return raw.view(dtype).reshape(list(msg.shape))


def logprobs_to_proto(lp: TokenLogprobs) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(token_id=lp.token_id, logprob=lp.logprob, top_token_ids=[t for t, _ in lp.top],
                            top_logprobs=[v for _, v in lp.top])


def logprobs_from_proto(msg: pb.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(msg.token_id, msg.logprob, list(zip(msg.top_token_ids, msg.top_logprobs)))
