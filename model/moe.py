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

from .config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Sigmoid scores; group-limited top-k on score + correction bias; weights from unbiased scores."""

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
        grouped = choice.view(n, cfg.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        keep = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask[:, :, None].expand_as(grouped).reshape(n, -1), float("-inf"))
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False).indices
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
        out = torch.zeros_like(x)
        flat_ids = ids.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.cfg.n_routed_experts).tolist()
        token_of = order // ids.shape[1]
        w_sorted = weights.flatten()[order]
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            tok = token_of[start:start + c]
            gate, up = F.linear(x[tok], self.w13[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[e]) * w_sorted[start:start + c, None].to(x.dtype)
            out.index_add_(0, tok, y)
            start += c
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
