"""rms_norm (+ residual), rope (both layouts), act_quant: the Triton kernels vs their references (which the
model calls off CUDA)."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import norm, quant
from splitserve.kernels import rotary as rope
from splitserve.model.norm import RMSNorm

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
INTERP = not torch.cuda.is_available()


def ulp_tol(dtype: torch.dtype) -> dict:
    # Triton's CPU interpreter truncates fp32 -> bf16 instead of rounding: allow a couple of ulps there
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    return dict(atol=2e-2, rtol=2e-2 if INTERP else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 200])
def test_rms_norm(dtype, dim, device):
    x = torch.randn(5, 3, dim, device=device).to(dtype)
    r = torch.randn(5, 3, dim, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(dim, device=device)).to(dtype)
    m = RMSNorm(dim, 1e-6).to(device=device, dtype=dtype)
    m.weight.data.copy_(w)
    torch.testing.assert_close(norm.rms_norm_ref(x, w, 1e-6), m(x).detach())
    torch.testing.assert_close(norm.rms_norm_triton(x, w, 1e-6), norm.rms_norm_ref(x, w, 1e-6), **ulp_tol(dtype))
    y, h = norm.rms_norm_triton(x, w, 1e-6, residual=r)
    yr, hr = norm.rms_norm_ref(x, w, 1e-6, residual=r)
    torch.testing.assert_close(h, hr, **ulp_tol(dtype))
    torch.testing.assert_close(y, yr, **ulp_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope(dtype, interleaved, device):
    c, s = torch.randn(4, 16, device=device).to(dtype), torch.randn(4, 16, device=device).to(dtype)
    q = torch.randn(4, 8, 96, device=device).to(dtype)
    for x in (q[..., 64:], q[:, :, :32], torch.randn(4, 32, device=device).to(dtype)):  # strided slices, 2-D
        got = rope.rope_triton(x, c, s, interleaved)
        assert got.shape == x.shape
        torch.testing.assert_close(got, rope.rope_ref(x, c, s, interleaved), **ulp_tol(dtype))


@pytest.mark.parametrize("ue8m0", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant(ue8m0, dtype, device):
    x = (torch.randn(7, 3, 256, device=device) * torch.rand(7, 3, 1, device=device) * 8).to(dtype)
    x[0, 0, :128] = 0  # amax clamp
    q, s = quant.act_quant_triton(x, 128, ue8m0)
    qr, sr = quant.act_quant_ref(x, 128, ue8m0)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (7, 3, 2)
    torch.testing.assert_close(s, sr, atol=0, rtol=0)
    torch.testing.assert_close(q.float(), qr.float(), atol=0, rtol=0)


def test_e4m3_rounding_helper_matches_torch():
    """The interpreter-only rounding helper is exact RNE onto the e4m3 grid (incl. subnormals)."""
    if not INTERP:
        pytest.skip("interpreter workaround")
    import triton
    import triton.language as tl

    @triton.jit
    def k(x_ptr, y_ptr, n):
        o = tl.arange(0, 4096)
        m = o < n
        tl.store(y_ptr + o, quant.round_to_e4m3(tl.load(x_ptr + o, mask=m)), mask=m)

    grid = torch.tensor(
        [float(v) for v in torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float() if abs(v) <= 448]
    )
    mids = (grid.sort().values[1:] + grid.sort().values[:-1]) / 2  # exact ties
    x = torch.cat([torch.randn(2000) * 30, torch.rand(500) * 0.03, mids[:1000], grid[:500]]).clamp(-448, 448)
    y = torch.empty_like(x)
    k[(1,)](x, y, x.numel())
    torch.testing.assert_close(y, x.to(torch.float8_e4m3fn).float(), atol=0, rtol=0)


@gpu
def test_elementwise_gpu_real_shapes():
    for rows in (1, 64):
        x = torch.randn(rows, 7168, device="cuda", dtype=torch.bfloat16)
        r = torch.randn_like(x)
        w = (1 + 0.1 * torch.randn(7168, device="cuda")).bfloat16()
        y, h = norm.rms_norm_triton(x, w, 1e-6, residual=r)
        yr, hr = norm.rms_norm_ref(x, w, 1e-6, residual=r)
        torch.testing.assert_close(h, hr, atol=0, rtol=0)
        torch.testing.assert_close(y, yr, atol=1e-2, rtol=1e-2)
        q = torch.randn(rows, 128, 192, device="cuda", dtype=torch.bfloat16)
        c, s = torch.randn(rows, 32, device="cuda").bfloat16(), torch.randn(rows, 32, device="cuda").bfloat16()
        torch.testing.assert_close(
            rope.rope_triton(q[..., 128:], c, s, True), rope.rope_ref(q[..., 128:], c, s, True), atol=2e-2, rtol=1e-2
        )
        q8, s8 = quant.act_quant_triton(x)
        qr, sr = quant.act_quant_ref(x)
        assert torch.equal(s8, sr) and torch.equal(q8.view(torch.uint8), qr.view(torch.uint8))
