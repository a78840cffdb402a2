"""The fused indexer queries (kernels/indexer_query.py) against the composition they replace."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import indexer_query as Q
from splitserve.model.fp8 import hadamard_matrix

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8 = torch.float8_e4m3fn


def make_case(device, dtype, n, heads, d, rope, fp8):
    half = rope // 2
    q = (torch.randn(n, heads * d + 8, device=device) * 2).to(dtype)[:, : heads * d].view(n, heads, d)  # strided rows
    return dict(
        q=q,
        w=torch.randn(n, heads, device=device),
        cos=torch.rand(n, half, device=device).to(dtype),
        sin=torch.rand(n, half, device=device).to(dtype),
        hadamard=hadamard_matrix(d, dtype, device) if fp8 else None,
        softmax_scale=d**-0.5,
    )


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dims", [(16, 32, 16), (8, 64, 32), (20, 128, 64)])
def test_fp32_matches_reference(dims, fp8, interleaved, device):
    """fp32 q: no intermediate roundings, so the kernel equals the reference to fp32 ulps (the weights
    exactly: the same multiplies in the same order, by the same power-of-two scales)."""
    args = make_case(device, torch.float32, 7, *dims, fp8)
    q_ref, w_ref = Q.index_query_ref(**args, interleaved=interleaved, out_dtype=torch.float32)
    q, w = Q.index_query_triton(**args, interleaved=interleaved, out_dtype=torch.float32)
    assert q.shape == q_ref.shape and q.dtype == q_ref.dtype and w.dtype == torch.float32
    if fp8:
        assert (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean() > 0.999
        torch.testing.assert_close(q.float(), q_ref.float(), atol=1e-2, rtol=0.07)
        assert torch.equal(w, w_ref)
    else:
        torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(w, w_ref)


@pytest.mark.parametrize("fp8", [False, True])
def test_bf16_within_rounding(fp8, device):
    """The model dtype: the kernel rounds the rotation once where the reference rounds each operation,
    so q differs by bf16 ulps (e4m3 by at most one step); the per-head scales agree but where such an
    ulp moves a head's amax across a power of two."""
    args = make_case(device, torch.bfloat16, 9, 64, 128, 64, fp8)
    q_ref, w_ref = Q.index_query_ref(**args, interleaved=False, out_dtype=torch.bfloat16)
    q, w = Q.index_query_triton(**args, interleaved=False, out_dtype=torch.bfloat16)
    assert q.dtype == q_ref.dtype
    if fp8:
        base = args["w"] * 64**-0.5 * args["softmax_scale"]  # the weights without the per-head scales
        sc, sc_ref = w / base, w_ref / base
        assert torch.equal(torch.log2(sc), torch.round(torch.log2(sc)))  # ue8m0: powers of two
        assert (sc == sc_ref).float().mean() > 0.95
        g, r = q.float() * sc[..., None], q_ref.float() * sc_ref[..., None]
        torch.testing.assert_close(g, r, atol=0.1 * float(r.abs().max()), rtol=0.13)
    else:
        torch.testing.assert_close(q.float(), q_ref.float(), atol=0.02, rtol=0.02)
        assert torch.equal(w, w_ref)


def test_dispatch_uses_the_reference_on_cpu():
    args = make_case("cpu", torch.float32, 3, 16, 32, 16, True)
    q, w = Q.index_query(**args, interleaved=False, out_dtype=torch.float32)
    q_ref, w_ref = Q.index_query_ref(**args, interleaved=False, out_dtype=torch.float32)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(w, w_ref)


@gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_cuda_real_widths(fp8):
    args = make_case("cuda", torch.bfloat16, 64, 64, 128, 64, fp8)
    q_ref, w_ref = Q.index_query_ref(**args, interleaved=False, out_dtype=torch.bfloat16)
    q, w = Q.index_query(**args, interleaved=False, out_dtype=torch.bfloat16)
    assert w.shape == w_ref.shape and q.dtype == q_ref.dtype
    base = args["w"] * 64**-0.5 * args["softmax_scale"]
    g, r = q.float() * (w / base)[..., None], q_ref.float() * (w_ref / base)[..., None]
    torch.testing.assert_close(g, r, atol=0.1 * float(r.abs().max()), rtol=0.13)


def test_row_queries_are_the_former_composition():
    """Indexer.row_queries (the reference on CPU) gives exactly what MLA._rows built from
    Indexer.queries before: q in the key pool's dtype and head_dim^-0.5 folded into the exact
    path's weights; e4m3 q and its weights as they were on the FP8 path."""
    from splitserve.model.attention import Indexer
    from splitserve.model.checkpoint import PRESETS

    cfg = PRESETS["tiny"]
    n = 5
    for fp8 in (False, True):
        ix = Indexer(cfg, fp8)
        for p in ix.parameters():
            torch.nn.init.normal_(p, std=0.3)
        q_resid, x = torch.randn(n, cfg.q_lora_rank), torch.randn(n, cfg.hidden_size)
        cos, sin = torch.rand(n, cfg.qk_rope_head_dim // 2), torch.rand(n, cfg.qk_rope_head_dim // 2)
        q_old, w_old = ix.queries(q_resid, x, cos, sin)
        if not fp8:
            q_old, w_old = q_old.to(torch.bfloat16), w_old * ix.softmax_scale
        q, w = ix.row_queries(q_resid, x, cos, sin, torch.bfloat16)
        assert q.dtype == q_old.dtype
        assert torch.equal(q.float(), q_old.float()) and torch.equal(w, w_old)
