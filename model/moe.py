"""Feed-forward blocks: the dense SwiGLU MLP and the DeepSeek MoE (noaux_tc sigmoid router).

Routed experts are stored stacked — `w13` [E, 2·I, H] (gate rows, then up rows) and `w2`
[E, H, I] — so that a grouped GEMM can use them directly; the loader maps both checkpoint layouts
(per-expert `experts.{e}.{gate,up,down}_proj` and transformers' fused `experts.gate_up_proj` /
`experts.down_proj`) onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels import fused_moe

from .config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up: torch.Tensor | None = None  # fuse_weights(): gate ‖ up, one GEMM

    @torch.no_grad()
    def fuse_weights(self) -> None:
        """gate and up as one weight; the modules' weights become views of it (no extra memory)."""
        if self.gate_up is not None:
            return
        fused = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        inter = self.gate_proj.weight.shape[0]
        self.gate_proj.weight.data, self.up_proj.weight.data = fused[:inter], fused[inter:]
        self.gate_up = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid scores; group-limited top-k on score + correction bias; weights from unbiased scores."""

    e_score_correction_bias: torch.Tensor  # a buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] fp32, expert ids [N, k] int64)."""
        cfg = self.cfg
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        n = x.shape[0]
        # top-k over a few dozen values by sorting: on CUDA one bitonic-sort kernel (~4 us) where
        # torch.topk launches its radix select (~12 us each, three per layer at decode batch sizes)
        grouped = choice.view(n, cfg.n_group, -1)
        group_scores = grouped.sort(dim=-1, descending=True).values[..., :2].sum(-1)
        keep = group_scores.sort(dim=-1, descending=True).indices[:, : cfg.topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask[:, :, None].expand_as(grouped).reshape(n, -1), float("-inf"))
        ids = choice.sort(dim=-1, descending=True).indices[:, : cfg.num_experts_per_tok]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = Gate(cfg)
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        self.shared_experts = MLP(h, i * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        out = fused_moe(x, self.w13, self.w2, weights, ids)  # Triton grouped GEMMs on CUDA, a loop elsewhere
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
