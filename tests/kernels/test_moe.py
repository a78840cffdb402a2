"""moe_align and the grouped-GEMM MoE (bf16 and FP8 block-scaled) vs references and the model's MoE."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import moe as K
from splitserve.model.fp8 import quantize_weight

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def make_case(n, hidden, inter, experts, k, dtype, device):
    x = torch.randn(n, hidden, device=device).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, device=device) * hidden**-0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, device=device) * inter**-0.5).to(dtype)
    ids = torch.stack([torch.randperm(experts, device=device)[:k] for _ in range(n)])
    tw = torch.rand(n, k, device=device) * 2.5
    return x, w13, w2, tw, ids


def test_moe_align_invariants():
    ids = torch.randint(0, 6, (13, 3))
    for bm in (1, 4, 16):
        sorted_ids, expert_ids, npad = K.moe_align_ref(ids, 6, bm)
        t = ids.numel()
        used = int(npad)
        assert used % bm == 0 and sorted_ids.numel() % bm == 0 and expert_ids.numel() == sorted_ids.numel() // bm
        real = sorted_ids[sorted_ids < t].long()
        assert torch.equal(real.sort().values, torch.arange(t))  # a permutation of the flat ids
        assert (sorted_ids[used:] == t).all()
        flat = ids.flatten()
        for blk in range(used // bm):
            rows = sorted_ids[blk * bm : (blk + 1) * bm].long()
            rows = rows[rows < t]
            assert (flat[rows] == int(expert_ids[blk])).all()
        assert (expert_ids[used // bm :] == -1).all()


@pytest.mark.parametrize("n,k,experts,bm", [(13, 3, 6, 4), (1, 8, 16, 16), (64, 8, 16, 32), (5, 2, 8, 1)])
def test_moe_align_triton_equals_torch(n, k, experts, bm, device):
    ids = torch.stack([torch.randperm(experts, device=device)[:k] for _ in range(n)])
    for got, want in zip(K.moe_align_triton(ids, experts, bm), K.moe_align_ref(ids, experts, bm)):
        assert torch.equal(got, want)


def test_reference_matches_model_moe():
    from splitserve.model.config import ModelConfig
    from splitserve.model.moe import MoE

    cfg = ModelConfig(
        hidden_size=32,
        moe_intermediate_size=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=0,
        n_group=2,
        topk_group=1,
    )
    m = MoE(cfg)
    for p in (m.w13, m.w2, m.gate.weight):
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(6, 32)
    tw, ids = m.gate(x)
    torch.testing.assert_close(K.fused_moe_ref(x, m.w13, m.w2, tw, ids), m(x).detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_small(dtype, device):
    x, w13, w2, tw, ids = make_case(5, 256, 64, 8, 3, dtype, device)
    ref = K.fused_moe_ref(x, w13, w2, tw, ids)
    out = K.fused_moe_triton(x, w13, w2, tw, ids, block_m=16, block_n=32)
    assert out.dtype == dtype
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1.5e-2)


def test_shared_output_added_in_the_combine(device):
    """`shared` (the shared experts' output) is added to the fp32 slot sum in the last kernel, on every path:
    in fp32 exactly routed + shared; a wrong shape is refused."""
    x, w13, w2, tw, ids = make_case(4, 256, 128, 4, 2, torch.float32, device)
    shared = torch.randn_like(x)
    q13, s13, q2, s2 = _fp8_weights(w13, w2)
    paths = [
        lambda **kw: K.fused_moe_triton(x, w13, w2, tw, ids, block_m=16, block_n=32, **kw),
        lambda **kw: K.fused_moe_fp8_triton(x, q13, s13, q2, s2, tw, ids, block_n=32, **kw),
        lambda **kw: K.fused_moe_fp8_gemv_triton(x, q13, s13, q2, s2, tw, ids, dot=False, down_splits=2, **kw),
    ]
    for run in paths:
        assert torch.equal(run(shared=shared), run() + shared)
    assert torch.equal(K.fused_moe_ref(x, w13, w2, tw, ids, shared), K.fused_moe_ref(x, w13, w2, tw, ids) + shared)
    with pytest.raises(ValueError, match="shared must be"):
        paths[0](shared=shared[:, :64])


def _fp8_weights(w13, w2):
    q13, s13 = K.quantize_stacked(w13)
    q2, s2 = K.quantize_stacked(w2)
    return q13, s13, q2, s2


def test_quantize_stacked_matches_model_quantize_weight():
    w = torch.randn(2, 256, 384)
    q, s = K.quantize_stacked(w)
    for e in range(2):
        qm, sm = quantize_weight(w[e])
        torch.testing.assert_close(s[e], sm)
        torch.testing.assert_close(q[e].float(), qm.float(), atol=0, rtol=0)


def test_fused_moe_fp8_small(device):
    # fp32 activations: the CPU interpreter rounds bf16 by truncation, which FP8 requantisation amplifies
    x, w13, w2, tw, ids = make_case(4, 256, 128, 4, 2, torch.float32, device)
    q13, s13, q2, s2 = _fp8_weights(w13, w2)
    ref = K.fused_moe_fp8_ref(x, q13, s13, q2, s2, tw, ids)
    out = K.fused_moe_fp8_triton(x, q13, s13, q2, s2, tw, ids, block_n=32)
    assert rel(out, ref) < 1e-5
    # and the FP8 reference is an FP8-accurate version of the bf16 one
    assert (
        rel(
            ref, K.fused_moe_ref(x, K._dequant_stacked(q13, s13, x.dtype), K._dequant_stacked(q2, s2, x.dtype), tw, ids)
        )
        < 0.1
    )


@gpu
@pytest.mark.parametrize("n", [1, 8, 64, 256, 1024])  # from 256 x 8 ids (>= 64 per expert): 128x128 tiles
def test_fused_moe_gpu_real_shapes(n):
    x, w13, w2, tw, ids = make_case(n, 7168, 2048, 16, 8, torch.bfloat16, "cuda")
    ref = K.fused_moe_ref(x, w13, w2, tw, ids)
    assert rel(K.fused_moe_triton(x, w13, w2, tw, ids), ref) < 1e-2
    shared = torch.randn_like(x) * ref.float().std().to(x.dtype)
    assert rel(K.fused_moe(x, w13, w2, tw, ids, shared), ref + shared) < 1e-2
    q13, s13, q2, s2 = _fp8_weights(w13, w2)
    ref8 = K.fused_moe_fp8_ref(x, q13, s13, q2, s2, tw, ids)
    assert rel(K.fused_moe_fp8_triton(x, q13, s13, q2, s2, tw, ids), ref8) < 2e-2
    assert rel(K.fused_moe_fp8(x, q13, s13, q2, s2, tw, ids, shared), ref8 + shared) < 2e-2


# ---------------------------------------------------------------------------------------------
# the decode-size FP8 MoE (each active expert streamed once)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,dot,splits,down_splits,block_n,prequant",
    [
        (1, False, 1, 1, 64, False),  # FMA path, one token
        (3, False, 2, 2, 32, False),  # K split on both GEMMs: silu-sum and combine over the splits
        (5, True, 1, 1, 64, False),  # tensor-core path, 16-row blocks
        (9, True, 2, 1, 32, False),
        (12, True, 2, 2, 64, True),  # act_quant launches first (x, then the hidden rows)
    ],
)
def test_fused_moe_fp8_gemv_small(n, dot, splits, down_splits, block_n, prequant, device):
    x, w13, w2, tw, ids = make_case(n, 256, 256, 6, 3, torch.float32, device)
    q13, s13, q2, s2 = _fp8_weights(w13, w2)
    ref = K.fused_moe_fp8_ref(x, q13, s13, q2, s2, tw, ids)
    out = K.fused_moe_fp8_gemv_triton(
        x,
        q13,
        s13,
        q2,
        s2,
        tw,
        ids,
        dot=dot,
        splits=splits,
        down_splits=down_splits,
        block_n=block_n,
        prequant=prequant,
    )
    assert out.shape == x.shape and out.dtype == x.dtype
    tol = 3e-2 if device == "cuda" and dot else 1e-5  # GPU e4m3 MMA, requantised hidden (fp8_diagnose TOL)
    assert rel(out, ref) < tol


def test_fused_moe_fp8_gemv_repeated_expert_and_bad_input(device):
    """Tokens sharing experts (every token picks the same 2 of 4): one block per expert holds them all."""
    x, w13, w2, tw, _ = make_case(4, 128, 128, 4, 2, torch.float32, device)
    ids = torch.tensor([[1, 3]] * 4, device=device)
    q13, s13, q2, s2 = _fp8_weights(w13, w2)
    ref = K.fused_moe_fp8_ref(x, q13, s13, q2, s2, tw, ids)
    assert rel(K.fused_moe_fp8_gemv_triton(x, q13, s13, q2, s2, tw, ids, dot=False), ref) < 1e-5
    with pytest.raises(ValueError, match="MOE_GEMV_MAX_N"):
        big = torch.zeros(K.MOE_GEMV_MAX_N + 1, 128, device=device)
        ids_big = torch.zeros(K.MOE_GEMV_MAX_N + 1, 2, dtype=torch.long, device=device)
        K.fused_moe_fp8_gemv_triton(big, q13, s13, q2, s2, tw[:1].expand(len(big), 2), ids_big)


def test_moe_gemv_table_covers_decode_sizes():
    assert max(K.MOE_GEMV_TABLE) == K.MOE_GEMV_MAX_N
    for n in range(1, K.MOE_GEMV_MAX_N + 1):
        cfg = K.MOE_GEMV_TABLE[K.moe_gemv_class(n)]
        assert 128 % cfg.block_n == 0 and K.moe_gemv_class(n) >= n


@gpu
@pytest.mark.parametrize("n", [1, 4, 8, 16])
def test_fused_moe_fp8_gemv_gpu_real_shapes(n):
    x, w13, w2, tw, ids = make_case(n, 7168, 2048, 16, 8, torch.bfloat16, "cuda")
    q13, s13, q2, s2 = _fp8_weights(w13, w2)
    ref = K.fused_moe_fp8_ref(x, q13, s13, q2, s2, tw, ids)
    assert rel(K.fused_moe_fp8_gemv_triton(x, q13, s13, q2, s2, tw, ids), ref) < 2e-2
    assert rel(K.fused_moe_fp8(x, q13, s13, q2, s2, tw, ids), ref) < 2e-2  # the dispatcher's path
    assert rel(K.fused_moe_fp8_gemv_triton(x, q13, s13, q2, s2, tw, ids, splits=2, down_splits=2), ref) < 2e-2
    for pre in (False, True):
        assert rel(K.fused_moe_fp8_gemv_triton(x, q13, s13, q2, s2, tw, ids, prequant=pre), ref) < 2e-2
