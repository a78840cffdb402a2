"""The fp32 linear of bf16 activations (kernels/fp32_gemm.py) against a float64 product.

The claim to hold: fp32 precision, i.e. the error against the exact product stays at fp32's rounding level
(a few 2^-24 of sum |x| |w|), where rounding the weights to bf16 once (one MMA instead of three) is off by
~2^-9 of it, so the bound below tells the two apart."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import fp32_gemm as L

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BOUND = 2.0**-19  # of sum_k |x_mk| |w_nk|: fp32 accumulation over a few thousand terms sits well inside it


def inputs(m, n, k, device, spread=1.0):
    x = (torch.randn(m, k, device=device) * spread).bfloat16()
    w = torch.randn(n, k, device=device) * 0.02 * torch.rand(n, 1, device=device).exp()
    return x, w


def rel_error(y, x, w):
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    return ((y.double() - exact).abs() / scale.clamp_min(1e-300)).max().item()


@pytest.mark.parametrize(
    "m,n,k",
    [  # up to GEMV_MAX_ROWS rows the GEMV kernel (one program an output), above it the tiles
        (1, 256, 512),
        (1, 64, 1344),
        (3, 48, 1100),  # K not a multiple of the GEMV's 1024-wide steps, rows below its power of two
        (4, 16, 256),
        (5, 64, 1000),
        (5, 64, 1344),
        (16, 24, 512),
        (37, 256, 640),
        (64, 64, 448),
        (130, 256, 512),
        (300, 64, 128),
    ],
)
def test_fp32_precision_against_float64(m, n, k, device):
    x, w = inputs(m, n, k, device)
    y = L.fp32_linear_triton(x, w)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert rel_error(y, x, w) < BOUND
    bf16_weights = x.float() @ w.bfloat16().float().T  # what a single bf16 MMA would give
    assert rel_error(bf16_weights, x, w) > 8 * BOUND  # so the bound above does tell fp32 from bf16


def test_split_and_unsplit_plans_are_both_taken():
    """plan() (the tiles, above GEMV_MAX_ROWS rows) splits K at decode sizes and not for many rows over a short K
    (the shapes above cover both)."""
    assert L.GEMV_MAX_ROWS < 5
    assert L.plan(5, 64, 1000)[2] > 1
    assert L.plan(64, 256, 7168)[2] > 1
    assert L.plan(300, 64, 128)[2] == 1
    assert L.plan(5, 64, 1344)[2] == 7  # a split count that is not a power of two (the sum's masked rows)
    for m, n, k in [(1, 256, 7168), (64, 64, 7168), (256, 256, 7168), (8192, 256, 7168), (3, 5, 70)]:
        bm, bn, splits, k_split = L.plan(m, n, k)
        assert k_split % 64 == 0 and (splits - 1) * k_split < k <= splits * k_split  # every K step covered once


@pytest.mark.parametrize("m", [3, 8])  # the GEMV kernel (fp32 FMAs), the tiles (three bf16 pieces a weight)
def test_weights_across_magnitudes_and_signs(m, device):
    """Weight rows from 1e-30 to 1e30 (one magnitude per output, so each output's error is measured against its
    own scale): both kernels keep each weight's 24 bits, where one bf16 piece would not."""
    k = 256
    w = torch.randn(32, k, device=device) * torch.logspace(-30, 30, 32, device=device)[:, None]
    x = torch.randn(m, k, device=device).bfloat16()
    assert rel_error(L.fp32_linear_triton(x, w), x, w) < BOUND
    assert rel_error(x.float() @ w.bfloat16().float().T, x, w) > 8 * BOUND


@pytest.mark.parametrize("m", [2, 64])
def test_repeated_calls_are_bitwise_equal(m, device):
    x, w = inputs(m, 256, 1024, device)
    assert torch.equal(L.fp32_linear_triton(x, w), L.fp32_linear_triton(x, w))


def test_dispatch_and_bad_input():
    """CPU tensors and tensors with autograd take F.linear (gradients flow); the kernel refuses other dtypes."""
    x = torch.randn(4, 32).bfloat16()
    w = torch.randn(16, 32, requires_grad=True)
    y = L.fp32_linear(x, w)
    assert y.grad_fn is not None
    torch.testing.assert_close(y, torch.nn.functional.linear(x.float(), w), rtol=0, atol=0)
    with pytest.raises(ValueError, match="bf16 x and fp32 w"):
        L.fp32_linear_triton(x.float(), w.detach())
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        L.fp32_linear_triton(x, w.detach()[:, :16])


@gpu
def test_autograd_takes_the_reference_on_the_gpu():
    """With a gradient to record, the dispatcher runs F.linear (the kernel has no backward); without, the kernel."""
    x, w = inputs(8, 64, 512, "cuda")
    w.requires_grad_()
    y = L.fp32_linear(x, w)
    assert y.grad_fn is not None
    y.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape
    with torch.no_grad():
        assert L.fp32_linear(x, w).grad_fn is None


@gpu
def test_bench_shapes_on_the_gpu():
    """The router (256 x 7168) and the indexer head weights (64 x 7168) at batch 1 / 64 / 256 / 4096, through the
    dispatcher the model calls, and 3-D input."""
    for n in (256, 64):
        for m in (1, 2, 4, 5, 64, 256, 4096):
            x, w = inputs(m, n, 7168, "cuda", spread=4.0)
            assert rel_error(L.fp32_linear(x, w), x, w) < BOUND
    x, w = inputs(6, 64, 7168, "cuda")
    assert torch.equal(L.fp32_linear(x.view(2, 3, -1), w), L.fp32_linear(x, w).view(2, 3, -1))
