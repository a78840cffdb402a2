"""The one-kernel MoE router (kernels/moe_router.py) against the torch composition it replaces."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import moe_router as R

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (E, n_group, topk_group, top_k): the tiny and small presets, the bench preset, DeepSeek-V3.2
SHAPES = [(8, 2, 1, 2), (16, 4, 2, 4), (16, 8, 4, 8), (256, 8, 4, 8)]


def case(t, e, device, spread=3.0):
    logits = torch.randn(t, e, device=device) * spread
    bias = torch.randn(e, device=device) * 0.05
    return logits, bias


def check(logits, bias, g, tg, k, normalize=True, scale=2.5):
    w_ref, id_ref = R.moe_route_ref(logits, bias, g, tg, k, normalize, scale)
    w, ids = R.moe_route_triton(logits, bias, g, tg, k, normalize, scale)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(ids, id_ref)
    torch.testing.assert_close(w, w_ref, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_route_matches_reference(shape, normalize, device):
    e, g, tg, k = shape
    logits, bias = case(37, e, device)
    check(logits, bias, g, tg, k, normalize)


def test_route_ties_pick_lowest_index(device):
    """Logits from a handful of values: equal scores everywhere, within and across groups."""
    e, g, tg, k = 16, 4, 2, 4
    logits = torch.randint(0, 3, (64, e), device=device).float()
    bias = torch.zeros(e, device=device)
    check(logits, bias, g, tg, k)
    _, ids = R.moe_route_triton(torch.zeros(1, e, device=device), bias, g, tg, k, True, 1.0)
    assert ids.tolist() == [[0, 1, 2, 3]]  # groups 0 and 1 kept, their experts in index order


def test_route_invariants(device):
    """Selected experts lie in the kept groups, are distinct, in descending biased score; weights sum to
    the scaling factor."""
    e, g, tg, k = 256, 8, 4, 8
    logits, bias = case(20, e, device)
    w, ids = R.moe_route_triton(logits, bias, g, tg, k, True, 2.5)
    torch.testing.assert_close(w.sum(-1), torch.full((20,), 2.5, device=device))
    assert all(len(set(r)) == k for r in ids.tolist())
    assert all(len({i // (e // g) for i in r}) <= tg for r in ids.tolist())
    choice = logits.sigmoid() + bias
    picked = choice.gather(1, ids)
    assert (picked[:, :-1] >= picked[:, 1:]).all()


def test_dispatch_keeps_autograd_on_the_reference(device):
    logits, bias = case(3, 16, device)
    logits.requires_grad_(True)
    w, _ = R.moe_route(logits, bias, 4, 2, 4, True, 2.5)
    w.sum().backward()
    assert logits.grad is not None


@gpu
def test_route_cuda_real_widths():
    logits, bias = case(300, 256, "cuda")
    check(logits, bias, 8, 4, 8)
    w, ids = R.moe_route(logits, bias, 8, 4, 8, True, 2.5)  # the dispatcher takes the kernel
    assert torch.equal(ids, R.moe_route_ref(logits, bias, 8, 4, 8, True, 2.5)[1])
