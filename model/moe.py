"""Feed-forward blocks: the dense SwiGLU MLP and the DeepSeek MoE (noaux_tc sigmoid router).

Routed experts are stored stacked — `w13` [E, 2·I, H] (gate rows, then up rows) and `w2`
[E, H, I] — so that a grouped GEMM can use them directly; the loader maps both checkpoint layouts
(per-expert `experts.{e}.{gate,up,down}_proj` and transformers' fused `experts.gate_up_proj` /
`experts.down_proj`) onto them.
"""

from __future__ import annotations

import torch
from torch import nn

from splitserve.kernels import fp32_linear, fused_moe, fused_moe_fp8, moe_route, silu_mul

from .config import ModelConfig
from .fp8 import FP8_DTYPE, quantize_weight
from .linear import FusedLinear
from .parallel import ParallelState


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).

    Tensor parallel: gate and up column-parallel (each rank inter / N rows), down row-parallel; the
    partial outputs are summed over the ranks (all-reduce) unless reduce=False (a MoE's shared
    experts: the MoE reduces routed and shared partials together, one all-reduce)."""

    def __init__(self, hidden: int, inter: int, parallel: ParallelState | None = None, reduce: bool = True) -> None:
        super().__init__()
        self.parallel = parallel or ParallelState.single()
        self.reduce = reduce
        inter = self.parallel.split(inter, "intermediate size")
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up: FusedLinear | None = None  # fuse_weights(): gate ‖ up, one GEMM

    @torch.no_grad()
    def fuse_weights(self) -> None:
        """gate and up as one weight; the modules' weights become views of it (no extra memory)."""
        if self.gate_up is None and type(self.gate_proj) is type(self.up_proj):
            self.gate_up = FusedLinear([self.gate_proj, self.up_proj])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        out = self.down_proj(silu_mul(gate, up))  # one Triton kernel on CUDA
        return self.parallel.all_reduce(out) if self.reduce else out


class Gate(nn.Module):
    """Sigmoid scores; group-limited top-k on score + correction bias; weights from unbiased scores."""

    e_score_correction_bias: torch.Tensor  # a buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    @torch.no_grad()
    def fuse_weights(self) -> None:
        """Hold the gate weight and the correction bias in fp32 (exact: the router computes in fp32),
        so that a forward converts neither (a copy kernel and ~2 bytes per weight each step)."""
        if self.weight.dtype != torch.float32:
            self.weight = nn.Parameter(self.weight.float(), requires_grad=self.weight.requires_grad)
        if self.e_score_correction_bias.dtype != torch.float32:
            self.e_score_correction_bias = self.e_score_correction_bias.float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, H] -> (weights [N, k] fp32, expert ids [N, k] int64): the fp32 GEMM (kernels/fp32_gemm.py)
        and one Triton kernel after it on CUDA (kernels/moe_router.py), the torch composition elsewhere."""
        cfg = self.cfg
        logits = fp32_linear(x, self.weight)  # fp32 product; one kernel + a split sum on CUDA
        return moe_route(
            logits,
            self.e_score_correction_bias,
            cfg.n_group,
            cfg.topk_group,
            cfg.num_experts_per_tok,
            cfg.norm_topk_prob,
            cfg.routed_scaling_factor,
        )


class MoE(nn.Module):
    """Router (replicated) + routed experts + shared experts.

    Over N ranks: with parallel.expert_parallel, rank r holds experts [r * E/N, (r + 1) * E/N) whole
    and computes them for the (token, expert) pairs routed to them; otherwise every rank holds every
    expert's slice of the intermediate dimension (I/N: w13's gate and up rows, w2's columns). Shared
    experts are tensor parallel either way. Each rank's output is a partial sum (of its experts, or of
    its intermediate slice, plus its shared-expert slice); one all-reduce combines them (activations
    are replicated on every rank, so no all-to-all dispatch is needed)."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelState | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.parallel = ps = parallel or ParallelState.single()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.expert_start = 0
        if ps.expert_parallel:
            self.expert_start = ps.my_range(e, "n_routed_experts")[0]
            e = ps.split(e, "n_routed_experts")
        else:
            i = ps.split(i, "moe_intermediate_size")
        self.num_local_experts = e
        self.gate = Gate(cfg)
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        self.shared_experts = (
            MLP(h, cfg.moe_intermediate_size * cfg.n_shared_experts, ps, reduce=False) if cfg.n_shared_experts else None
        )
        self.w13_scale_inv: nn.Parameter | None = None  # FP8 experts (to_fp8): 128x128 block scales
        self.w2_scale_inv: nn.Parameter | None = None

    @property
    def fp8(self) -> bool:
        return self.w13.dtype == FP8_DTYPE

    @torch.no_grad()
    def to_fp8(self, quantize: bool = False) -> None:
        """Hold the routed experts in e4m3 with the checkpoint's 128x128 block scales, stacked:
        w13_scale_inv [E, 2 * ceil(I/128), ceil(H/128)] (gate's blocks, then up's), w2_scale_inv
        [E, ceil(H/128), ceil(I/128)]. quantize=True quantises the current weights (benchmarks);
        otherwise the tensors are left empty for the loader (on w13's device, meta included)."""
        if self.fp8:
            return
        e, two_i, h = self.w13.shape
        i = two_i // 2
        ib, hb = -(-i // 128), -(-h // 128)
        dev = self.w13.device
        w13 = torch.empty(e, two_i, h, dtype=FP8_DTYPE, device=dev)
        w2 = torch.empty(e, h, i, dtype=FP8_DTYPE, device=dev)
        s13 = torch.empty(e, 2 * ib, hb, dtype=torch.float32, device=dev)
        s2 = torch.empty(e, hb, ib, dtype=torch.float32, device=dev)
        if quantize:
            for x in range(e):
                w13[x, :i], s13[x, :ib] = quantize_weight(self.w13[x, :i])
                w13[x, i:], s13[x, ib:] = quantize_weight(self.w13[x, i:])
                w2[x], s2[x] = quantize_weight(self.w2[x])
        self.w13 = nn.Parameter(w13, requires_grad=False)
        self.w2 = nn.Parameter(w2, requires_grad=False)
        self.w13_scale_inv = nn.Parameter(s13, requires_grad=False)
        self.w2_scale_inv = nn.Parameter(s2, requires_grad=False)

    def _routed(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, shared: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The routed experts' weighted sum (+ shared, added in the MoE's last kernel on CUDA)."""
        if self.fp8:  # block-scaled FP8 grouped GEMMs on CUDA, a loop over dequantised experts elsewhere
            assert self.w13_scale_inv is not None and self.w2_scale_inv is not None  # set with fp8 (to_fp8)
            return fused_moe_fp8(x, self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv, weights, ids, shared)
        return fused_moe(x, self.w13, self.w2, weights, ids, shared)  # Triton grouped GEMMs on CUDA, a loop elsewhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        if self.parallel.expert_parallel and self.parallel.distributed:
            # this rank's experts, for the (token, slot) pairs routed to them: one row per pair
            local = (ids >= self.expert_start) & (ids < self.expert_start + self.num_local_experts)
            tok, slot = local.nonzero(as_tuple=True)
            out = torch.zeros_like(x)
            if tok.numel():
                y = self._routed(x[tok], weights[tok, slot][:, None], (ids[tok, slot] - self.expert_start)[:, None])
                out.index_add_(0, tok, y)
            if self.shared_experts is not None:
                out = out + self.shared_experts(x)
        else:
            out = self._routed(x, weights, ids, self.shared_experts(x) if self.shared_experts is not None else None)
        return self.parallel.all_reduce(out)
