"""RMSNorm computed in fp32, output cast back to the input dtype (transformers' convention)."""

from __future__ import annotations

import torch
from torch import nn

from splitserve.kernels import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = rms_norm(x, self.weight, self.eps)  # one Triton kernel on CUDA, torch ops elsewhere
        assert isinstance(out, torch.Tensor)  # no residual given: one tensor back
        return out

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(h), h) with h = x + residual rounded to x's dtype: the decoder's residual add fused into the
        norm after it (one kernel on CUDA; the same values as the add and the norm apart)."""
        out = rms_norm(x, self.weight, self.eps, residual)
        assert isinstance(out, tuple)
        return out
