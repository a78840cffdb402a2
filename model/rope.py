"""Rotary position embedding with YaRN: the cos/sin tables. The rotation itself is
splitserve.kernels.rope (a Triton kernel on CUDA, `rope_ref` elsewhere), in the two layouts
DeepSeek-V3.2 uses.

MLA rotates its 64 rope dims in the *interleaved* (pairwise) form; the indexer rotates the first
64 dims of its 128-dim heads in the *half-split* (non-interleaved) form. Following transformers,
the interleaved form outputs the rotated pairs de-interleaved ([evens' ‖ odds']): both q and k go
through the same permutation, so q·k is unchanged, and the cache stores k_rope in that order.
"""

from __future__ import annotations

import math

import torch

from .config import RopeConfig


def inv_freq(rope: RopeConfig, dim: int) -> torch.Tensor:
    """[dim // 2] float32 inverse frequencies (YaRN-corrected when rope.rope_type == 'yarn')."""
    pos = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos
    if rope.rope_type == "default":
        return extrapolation
    interpolation = 1.0 / (rope.factor * pos)

    def correction_dim(rotations: float) -> float:
        return (
            dim
            * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(rope.theta))
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    return interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor


class RotaryTable:
    """cos/sin lookup for integer positions; one per model (shared by MLA and the indexer)."""

    def __init__(self, rope: RopeConfig, dim: int, device: torch.device | str = "cpu") -> None:
        if str(device) == "meta":
            device = "cpu"
        self.dim = dim
        with torch.device("cpu"):  # computed eagerly even when the network is built on "meta"
            self.inv_freq = inv_freq(rope, dim)
        self.inv_freq = self.inv_freq.to(device)
        self.scale = rope.cos_sin_scale

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] int -> (cos, sin) each [N, dim // 2] in `dtype`."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        return (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)
