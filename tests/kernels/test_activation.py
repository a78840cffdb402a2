"""silu_mul (kernels/activation.py) against F.silu(gate) * up."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import activation as A

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_reference(dtype, device):
    y = (torch.randn(7, 2 * 1500, device=device) * 3).to(dtype)
    gate, up = y.split(1500, dim=-1)  # column slices of one GEMM output, as the MLP has them
    got, ref = A.silu_mul_triton(gate, up), A.silu_mul_ref(gate, up)
    assert got.dtype == dtype and got.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    else:  # the interpreter truncates fp32 -> bf16 where the GPU rounds: a bf16 ulp or two
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_dispatch_keeps_autograd_on_the_reference(device):
    gate = torch.randn(3, 16, device=device, requires_grad=True)
    A.silu_mul(gate, torch.randn(3, 16, device=device)).sum().backward()
    assert gate.grad is not None


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_cuda_real_width(dtype):
    """The same operations as torch's kernels: equal but for rare last-bit differences of exp."""
    y = (torch.randn(64, 2 * 18432, device="cuda") * 3).to(dtype)
    gate, up = y.split(18432, dim=-1)
    got, ref = A.silu_mul(gate, up), A.silu_mul_ref(gate, up)
    assert (got == ref).float().mean() > 0.999
    ulp = 2**-7 if dtype == torch.bfloat16 else 2**-22
    torch.testing.assert_close(got, ref, atol=1e-30, rtol=ulp)
