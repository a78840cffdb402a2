"""FP8 (e4m3) block quantisation as DeepSeek's inference code does it.

Weights: float8_e4m3fn with one float32 multiplier (`weight_scale_inv`) per 128x128 block.
Activations (and the indexer's q and k): one scale per row per 128 contiguous values,
`ue8m0` scales rounded up to a power of two — splitserve.kernels.act_quant (a Triton kernel on
CUDA, `act_quant_ref` elsewhere).
"""

from __future__ import annotations

import functools
import math

import torch

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def dequantize_weight(
    w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """W[r, c] = float(W_q[r, c]) * S[r // br, c // bc]; partial edge blocks use their block's scale."""
    rows, cols = w.shape
    br, bc = block
    expect = (math.ceil(rows / br), math.ceil(cols / bc))
    if tuple(scale_inv.shape) != expect:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {expect} for weight {tuple(w.shape)}"
        )
    s = scale_inv.to(torch.float32).repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (w.to(torch.float32) * s).to(dtype)


def quantize_weight(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of dequantize_weight: per-block amax / 448 scales (float32), e4m3 values."""
    rows, cols = w.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = torch.zeros(nr * br, nc * bc, dtype=torch.float32, device=w.device)
    padded[:rows, :cols] = w.to(torch.float32)
    blocks = padded.view(nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nr * br, nc * bc)[:rows, :cols].contiguous(), scale


@functools.lru_cache(maxsize=16)
def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sylvester-ordered ±1 Hadamard matrix of size n (a power of two). Cached per (n, dtype, device):
    built once, outside any CUDA graph capture (callers must not modify it)."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    with torch.inference_mode(False):  # a normal tensor, usable in and outside inference mode
        h = torch.ones(1, 1, dtype=dtype, device=device)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] -> x · H_n · n^-0.5 (orthonormal, so dot products are preserved)."""
    n = x.shape[-1]
    h = hadamard_matrix(n, x.dtype, x.device)
    return (x @ h) * n**-0.5
