"""Rotary position embedding with YaRN, in the two layouts DeepSeek-V3.2 uses.

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
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

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


def apply_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, ..., d] with rotation pairs (x0, x1), (x2, x3), ...; cos/sin [N, d/2].

    Returns [N, ..., d] laid out as [rotated evens ‖ rotated odds] (transformers' layout).
    """
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def apply_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, ..., d] rotated as pairs (x_i, x_{i+d/2}) (the "rotate_half" form); cos/sin [N, d/2]."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
