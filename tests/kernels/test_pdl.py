"""Programmatic dependent launch (kernels/_common.py PDL): on Hopper every Triton kernel of ours launches with
it and waits for the kernel before it as its first statement, so a chain of dependent kernels, eager or
replayed from a CUDA graph, computes exactly what plain launches compute."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import _common, norm

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


def test_launch_options(device, monkeypatch):
    """On: a compiled kernel on a CUDA GPU of compute capability 9 or later. Off: the CPU, the interpreter,
    older GPUs, PDL = False (and then the kernel's PDL constexpr keeps its default, False)."""
    x = torch.zeros(4, device=device)
    on = device == "cuda" and hopper() and not _common.interpreting(norm._rms_norm_kernel)
    assert _common.pdl(norm._rms_norm_kernel, x) == ({"PDL": True, "launch_pdl": True} if on else {})
    assert _common.pdl(norm._rms_norm_kernel, torch.zeros(4)) == {}
    monkeypatch.setattr(_common, "PDL", False)
    assert _common.pdl(norm._rms_norm_kernel, x) == {}


def _chain(x, r, w, steps):
    """steps fused residual-add RMSNorms, each reading what the one before wrote."""
    for _ in range(steps):
        x, r = norm.rms_norm_triton(x, w, 1e-6, r)
    return x, r


@gpu
@pytest.mark.skipif(not hopper(), reason="programmatic dependent launch needs compute capability 9 or later")
def test_dependent_kernels_under_pdl_equal_plain_launches(monkeypatch):
    """64 dependent kernels (each small, so the next one's programs are resident while it runs), eager and as a
    CUDA graph replayed several times, with PDL against plain launches: bitwise equal. A kernel that read its
    input before the one producing it had finished would read the previous step's values."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x0 = torch.randn(8, 7168, device="cuda", generator=g).bfloat16()
    r0 = torch.randn(8, 7168, device="cuda", generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(7168, device="cuda", generator=g)).bfloat16()
    monkeypatch.setattr(_common, "PDL", False)
    want = _chain(x0, r0, w, 64)
    monkeypatch.setattr(_common, "PDL", True)
    assert all(torch.equal(a, b) for a, b in zip(_chain(x0, r0, w, 64), want))

    x, r = x0.clone(), r0.clone()
    _chain(x, r, w, 64)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(x, r, w, 64)
    for _ in range(5):
        x.copy_(x0)
        r.copy_(r0)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(out, want))
