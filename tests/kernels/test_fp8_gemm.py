"""Block-scaled FP8 linear (kernels/fp8_gemm.py): the Triton kernel vs its reference, and the reference
vs an independent formulation (model.fp8's weight dequantisation + act_quant's round trip)."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import fp8_gemm as K
from splitserve.kernels.quant import act_quant_ref
from splitserve.model.fp8 import dequantize_weight, quantize_weight

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def make_case(m, n, k, dtype, device):
    x = torch.randn(m, k, device=device).to(dtype)
    x[:, : min(k, 7)] *= 20.0  # groups with different amax
    w = torch.randn(n, k) * k**-0.5
    q, s = quantize_weight(w)
    return x, q.to(device), s.to(device), w


def test_reference_is_act_quant_times_dequantised_weight():
    x, q, s, w = make_case(6, 256, 384, torch.float32, "cpu")
    xq, xs = act_quant_ref(x)
    xd = (xq.float().view(6, 3, 128) * xs[..., None]).view(6, 384)
    want = xd.double() @ dequantize_weight(q, s).double().t()
    torch.testing.assert_close(K.fp8_linear_ref(x, q, s).double(), want, atol=1e-4, rtol=1e-4)
    assert rel(K.fp8_linear_ref(x, q, s), x @ w.t()) < 0.08  # an FP8-accurate version of x @ W^T


def test_reference_partial_groups_equal_zero_padding():
    x, q, s, _ = make_case(3, 100, 200, torch.float32, "cpu")  # K % 128 != 0, N % 128 != 0
    xp = torch.nn.functional.pad(x, (0, 56))
    wp = torch.zeros(100, 256, dtype=q.dtype)
    wp[:, :200] = q
    torch.testing.assert_close(K.fp8_linear_ref(x, q, s), K.fp8_linear_ref(xp, wp, s))


@pytest.mark.parametrize(
    "m,n,k,splits,fused",
    [(1, 192, 384, 1, True), (5, 200, 320, 2, True), (19, 128, 256, 3, True), (40, 96, 256, 1, False)],
)
def test_fp8_linear_small(m, n, k, splits, fused, device):
    x, q, s, _ = make_case(m, n, k, torch.float32, device)
    ref = K.fp8_linear_ref(x, q, s)
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    out = K.fp8_linear_triton(x, q, s, block_m=bm, block_n=64, splits=splits, fused=fused)
    assert out.shape == ref.shape and out.dtype == x.dtype
    # exact but for summation order, except on a GPU's >= 64-row tiles: Hopper's FP8 tensor-core
    # (wgmma) accumulation keeps ~14 bits within each 128-deep step (kernels/fp8_gemm.py, "Accuracy on
    # Hopper"; 2.9e-4 measured on an H200 at m=40), while a wrong scale or mask is off by > 1e-2
    tol = 2e-3 if device == "cuda" and bm >= 64 else 1e-5
    assert rel(out, ref) < tol
    # the fp16-operand variant (precise=True) is exact on every path
    precise = K.fp8_linear_triton(x, q, s, block_m=bm, block_n=64, splits=splits, fused=fused, precise=True)
    assert rel(precise, ref) < 1e-5


def test_fp8_linear_leading_dims_and_bf16(device):
    x, q, s, _ = make_case(6, 128, 256, torch.bfloat16, device)
    x3 = x.view(2, 3, 256)
    out = K.fp8_linear_triton(x3, q, s, block_m=16, block_n=64)
    assert out.shape == (2, 3, 128) and out.dtype == torch.bfloat16
    assert rel(out, K.fp8_linear_ref(x3, q, s)) < 2e-2


def test_dispatch_off_cuda_is_the_reference():
    x, q, s, _ = make_case(4, 128, 128, torch.float32, "cpu")
    assert torch.equal(K.fp8_linear(x, q, s), K.fp8_linear_ref(x, q, s))


# DeepSeek-V3.2 shapes (bench preset): in_proj (q_a | kv_a padded | indexer wk), q_b, o_proj, dense gate_up / down
REAL = [(2304, 7168), (24576, 1536), (7168, 16384), (36864, 7168), (7168, 18432), (4096, 7168), (7168, 2048)]


@gpu
@pytest.mark.parametrize("m", [1, 8, 64, 300, 4096])
@pytest.mark.parametrize("n,k", REAL)
def test_fp8_linear_gpu_real_shapes(m, n, k):
    if m >= 300 and n * k > 100e6:
        pytest.skip("large-M case at the largest shapes: covered by the smaller ones")
    x, q, s, _ = make_case(m, n, k, torch.bfloat16, "cuda")
    ref = K.fp8_linear_ref(x, q, s)
    out = K.fp8_linear(x, q, s)
    torch.cuda.synchronize()
    assert rel(out, ref) < 1e-2


def test_launch_config_covers_k_at_real_shapes():
    """The decode/prefill launch choice at DeepSeek's shapes: K fully covered, split-K partials small
    beside the weight, enough programs to stream the weight on a 132-SM GPU."""
    for n, k in REAL:
        for m in (1, 8, 64, 65, 8192):
            cfg = K._config(m, n, k, 132)
            kblocks = -(-k // 128)
            per_split = -(-kblocks // cfg["splits"]) * 128
            nsplit = -(-k // per_split)
            assert nsplit * per_split >= k and (nsplit - 1) * per_split < k
            assert cfg["fused"] == (m <= 64)
            if m <= 64:
                assert 2 * nsplit * m * n * 4 <= n * k // 2  # partials << weight bytes
                programs = -(-m // cfg["block_m"]) * -(-n // cfg["block_n"]) * nsplit
                assert programs >= 132 or nsplit * 4 > kblocks, (n, k, m, programs)


# ---------------------------------------------------------------------------------------------
# the small-M weight-streaming kernel (fp8_gemv_triton)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "m,n,k,dot,splits,block_n,prequant",
    [
        (1, 192, 384, False, 2, 64, False),  # FMA path, K split in two
        (3, 200, 320, False, 1, 32, False),  # partial last column block and K group (zero-padded)
        (4, 256, 512, False, 3, 16, False),  # uneven split of 4 K blocks over 3 programs
        (5, 128, 256, True, 2, 64, False),  # tensor-core path, 5 of 16 rows
        (16, 96, 384, True, 3, 32, False),
        (40, 160, 320, True, 2, 64, True),  # act_quant launch first, e4m3 rows loaded; partial K group
        (3, 128, 256, False, 1, 64, True),
    ],
)
def test_fp8_gemv_small(m, n, k, dot, splits, block_n, prequant, device):
    x, q, s, _ = make_case(m, n, k, torch.float32, device)
    ref = K.fp8_linear_ref(x, q, s)
    out = K.fp8_gemv_triton(x, q, s, dot=dot, splits=splits, block_n=block_n, prequant=prequant)
    assert out.shape == ref.shape and out.dtype == x.dtype
    # the act_quant contract exactly (up to fp32 summation order); on a GPU the e4m3 MMA's accumulation
    # keeps ~14 bits within each 128-deep step (module docstring), the fp16 operands none of that
    tol = 2e-3 if device == "cuda" and dot else 1e-5
    assert rel(out, ref) < tol
    if dot:
        precise = K.fp8_gemv_triton(x, q, s, dot=True, splits=splits, block_n=block_n, prequant=prequant, precise=True)
        assert rel(precise, ref) < 1e-5


def test_fp8_gemv_quantises_activations_like_act_quant(device):
    """The in-register quantisation is act_quant's: against a plain x @ W^T (no activation
    quantisation) the kernel is off by the FP8 rounding of x, against the reference by nothing."""
    x, q, s, _ = make_case(2, 128, 256, torch.float32, device)
    out = K.fp8_gemv_triton(x, q, s, dot=False, splits=1)
    unquantised = x.double() @ K.dequant_weight_ref(q, s).double().t()
    assert rel(out, K.fp8_linear_ref(x, q, s)) < 1e-6
    assert rel(out, unquantised) > 1e-3  # e4m3 keeps 3 mantissa bits: ~2% per value


def test_fp8_gemv_bad_input():
    x, q, s, _ = make_case(2, 128, 256, torch.float32, "cpu")
    with pytest.raises(ValueError, match="block_n"):
        K.fp8_gemv_triton(x, q, s, block_n=256)
    with pytest.raises(ValueError, match="GEMV_MAX_M"):
        K.fp8_gemv_triton(torch.randn(K.GEMV_MAX_M + 1, 256), q, s)
    with pytest.raises(ValueError, match="scale"):
        K.fp8_gemv_triton(x, q, s[:, :1])


def test_gemv_table_and_splits():
    """Every M up to GEMV_MAX_M has a table row; split-K covers K, stops at the target program count,
    and keeps the fp32 partials at most 1/8 of the weight at DeepSeek's shapes."""
    assert max(K.GEMV_TABLE) == K.GEMV_MAX_M >= 16
    for m in range(1, K.GEMV_MAX_M + 1):
        cfg = K.GEMV_TABLE[K.gemv_class(m)]
        assert 128 % cfg.block_n == 0
        for n, k in REAL:
            sp = K.gemv_splits(n, k, m, cfg.block_n, cfg.ctas_per_sm, 132)
            kblocks = -(-k // 128)
            assert 1 <= sp <= kblocks and sp & (sp - 1) == 0
            assert sp == 1 or sp * m * n * 4 * 8 <= n * k  # fp32 partials small beside the weight
            tiles = -(-n // cfg.block_n)
            if sp > 1:  # it split only while short of the target
                assert tiles * sp // 2 < cfg.ctas_per_sm * 132
    assert K.fp8_linear_path(K.GEMV_MAX_M) == "gemv" and K.fp8_linear_path(K.GEMV_MAX_M + 1) == "tiles"


@gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 40, 64])
@pytest.mark.parametrize("n,k", REAL)
def test_fp8_gemv_gpu_real_shapes(m, n, k):
    x, q, s, _ = make_case(m, n, k, torch.bfloat16, "cuda")
    ref = K.fp8_linear_ref(x, q, s)
    assert rel(K.fp8_gemv_triton(x, q, s), ref) < 1e-2
    assert rel(K.fp8_linear(x, q, s), ref) < 1e-2  # the dispatcher's path at this M
    x32 = x.float()
    ref32 = K.fp8_linear_ref(x32, q, s)
    assert rel(K.fp8_gemv_triton(x32, q, s, dot=True, precise=True), ref32) < 1e-5
    assert rel(K.fp8_gemv_triton(x32, q, s, dot=True), ref32) < 3e-3
    for pre in (False, True):
        assert rel(K.fp8_gemv_triton(x32, q, s, dot=True, prequant=pre, precise=True), ref32) < 1e-5
    if m <= 4:
        assert rel(K.fp8_gemv_triton(x32, q, s, dot=False), ref32) < 1e-5
