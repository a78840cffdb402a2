"""The MoE router after its GEMM (DeepSeek-V3's noaux_tc sigmoid gate): one kernel.

Per token t, from the gate logits l = x · W_gate^T (fp32, [T, E]):

    s = sigmoid(l); c = s + e_score_correction_bias
    group score = sum of the 2 largest c in each of n_group groups of E / n_group experts
    keep the topk_group best groups; the top_k experts by c among the kept groups -> ids
    weights = s[ids] (/ (their sum + 1e-20) with norm_topk_prob) * routed_scaling_factor

Ties pick the lowest index (group, then expert): the reference sorts stably, the kernel takes the
lowest index holding the maximum, so both select the same experts for any input without NaN. The
reference is the torch composition model.moe.Gate ran (three sorts, masks, scatter, gather: about
20 kernels on CUDA); the kernel is one program per token with the [n_group, E / n_group] scores in
registers. It writes int64 ids (torch.topk's dtype, which scatter and the MoE paths take).
"""

from __future__ import annotations

import torch

from . import _common
from ._common import HAS_TRITON, interpreting, next_pow2, pdl, pdl_start, require_triton, tl, triton, use_triton

if HAS_TRITON:
    from triton.language.extra import libdevice


def moe_route_ref(
    logits: torch.Tensor,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    normalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, e = logits.shape
    scores = logits.float().sigmoid()
    choice = scores + bias.float()
    grouped = choice.view(n, n_group, e // n_group)
    group_scores = grouped.sort(dim=-1, descending=True).values[..., :2].sum(-1)
    keep = group_scores.sort(dim=-1, descending=True, stable=True).indices[:, :topk_group]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    choice = choice.masked_fill(~group_mask[:, :, None].expand_as(grouped).reshape(n, -1), float("-inf"))
    ids = choice.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scale, ids


if HAS_TRITON:

    @triton.jit
    def _moe_route_kernel(
        l_ptr,
        b_ptr,
        w_ptr,
        id_ptr,
        s_l,
        s_w,
        s_id,
        scale,
        G: tl.constexpr,
        GS: tl.constexpr,
        TOPK_GROUP: tl.constexpr,
        TOP_K: tl.constexpr,
        KP: tl.constexpr,
        NORMALIZE: tl.constexpr,
        INTERP: tl.constexpr,
        PDL: tl.constexpr = False,
    ):
        pdl_start(PDL)
        t = tl.program_id(0).to(tl.int64)
        offs_g = tl.arange(0, G)
        offs_j = tl.arange(0, GS)
        expert = offs_g[:, None] * GS + offs_j[None, :]  # [G, GS]: the expert ids, group by group
        x = tl.load(l_ptr + t * s_l + expert).to(tl.float32)
        # torch's sigmoid, 1 / (1 + exp(-x)), with the same correctly rounded division and CUDA's
        # expf (libdevice; tl.exp is the approximate ex2 form), so the GPU picks what torch picks
        if INTERP:  # the CPU interpreter has no libdevice
            s = 1.0 / (1.0 + tl.exp(-x))
        else:
            s = tl.math.div_rn(1.0, 1.0 + libdevice.exp(-x))
        c = s + tl.load(b_ptr + expert).to(tl.float32)
        neg = float("-inf")
        # group score: the two largest of each group (the largest masked once, at its first place)
        m1 = tl.max(c, axis=1)
        first = tl.min(tl.where(c == m1[:, None], offs_j[None, :], GS), axis=1)
        m2 = tl.max(tl.where(offs_j[None, :] == first[:, None], neg, c), axis=1)
        gs = m1 + m2
        keep = offs_g < 0
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gs, axis=0)
            g = tl.min(tl.where(gs == best, offs_g, G), axis=0)
            keep = keep | (offs_g == g)
            gs = tl.where(offs_g == g, neg, gs)
        c = tl.where(keep[:, None], c, neg)
        offs_k = tl.arange(0, KP)
        ids = tl.zeros([KP], tl.int64)
        ws = tl.zeros([KP], tl.float32)
        for k in tl.static_range(TOP_K):
            best = tl.max(tl.max(c, axis=1), axis=0)
            e = tl.min(tl.min(tl.where(c == best, expert, G * GS), axis=1), axis=0)
            hit = expert == e
            ids = tl.where(offs_k == k, e, ids)
            ws = tl.where(offs_k == k, tl.sum(tl.sum(tl.where(hit, s, 0.0), axis=1), axis=0), ws)
            c = tl.where(hit, neg, c)
        if NORMALIZE:
            ws = tl.math.div_rn(ws, tl.sum(ws, axis=0) + 1e-20)
        kmask = offs_k < TOP_K
        tl.store(w_ptr + t * s_w + offs_k, ws * scale, mask=kmask)
        tl.store(id_ptr + t * s_id + offs_k, ids, mask=kmask)


def moe_route_fits(logits: torch.Tensor, n_group: int) -> bool:
    """The kernel holds a token's scores as a [n_group, E / n_group] tile: both powers of two."""
    e = logits.shape[-1]
    gs = e // n_group if n_group else 0
    return n_group > 0 and e % n_group == 0 and next_pow2(n_group) == n_group and gs >= 2 and next_pow2(gs) == gs


def moe_route_triton(
    logits: torch.Tensor,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    normalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    require_triton()
    n, e = logits.shape
    if not moe_route_fits(logits, n_group):
        raise ValueError(f"moe_route_triton needs power-of-two n_group and E / n_group >= 2, got E={e}, {n_group}")
    if not (1 <= topk_group <= n_group and 1 <= top_k <= topk_group * (e // n_group)):
        raise ValueError(f"top_k {top_k} / topk_group {topk_group} do not fit {n_group} groups of {e // n_group}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    bias = bias.contiguous()
    weights = torch.empty(n, top_k, device=logits.device, dtype=torch.float32)
    ids = torch.empty(n, top_k, device=logits.device, dtype=torch.int64)
    if n == 0:
        return weights, ids
    _moe_route_kernel[(n,)](
        logits,
        bias,
        weights,
        ids,
        logits.stride(0),
        weights.stride(0),
        ids.stride(0),
        float(scale),
        G=n_group,
        GS=e // n_group,
        TOPK_GROUP=topk_group,
        TOP_K=top_k,
        KP=next_pow2(top_k),
        NORMALIZE=bool(normalize),
        INTERP=interpreting(_moe_route_kernel),
        num_warps=1 if e <= 256 else 4,
        **pdl(_moe_route_kernel, logits),
    )
    return weights, ids


def moe_route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    n_group: int,
    topk_group: int,
    top_k: int,
    normalize: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-limited top-k routing from the gate logits (module docstring).

    Args:
        logits: [T, E] fp32 gate GEMM output; bias: [E] e_score_correction_bias.
        n_group, topk_group, top_k: groups, groups kept, experts per token.
        normalize: norm_topk_prob; scale: routed_scaling_factor.
    Returns:
        (weights [T, top_k] fp32, ids [T, top_k] int64), slots in descending order of the biased score.
    The kernel serves CUDA tensors that need no gradient (the reference keeps autograd for training).
    """
    triton_ok = (
        _common.GLUE_KERNELS and use_triton(logits) and not logits.requires_grad and moe_route_fits(logits, n_group)
    )
    fn = moe_route_triton if triton_ok else moe_route_ref
    return fn(logits, bias, n_group, topk_group, top_k, normalize, scale)
