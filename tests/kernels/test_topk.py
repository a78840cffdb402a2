"""Radix-select top-k (kernels/radix_topk.py) against torch.topk (topk_ref)."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import radix_topk as T

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
NEG = float("-inf")


def assert_valid_topk(got: torch.Tensor, logits: torch.Tensor, k: int) -> None:
    """Each row: min(k, visible) distinct visible positions, none scoring below any unselected
    visible one, the rest -1; with ties at the k-th value the lowest positions are taken."""
    for b in range(logits.shape[0]):
        row, x = got[b].long(), logits[b]
        vis = x > NEG
        n = min(k, int(vis.sum()))
        sel = row[row >= 0]
        assert sel.numel() == n and int((row < 0).sum()) == k - n
        assert sel.unique().numel() == n and bool(vis[sel].all())
        if n == 0:
            continue
        kth = x[sel].min()
        unsel = torch.ones_like(vis)
        unsel[sel] = False
        assert not bool((x[unsel & vis] > kth).any())
        ties = (x == kth).nonzero().flatten()
        taken = ties[torch.isin(ties, sel)]
        assert torch.equal(taken, ties[: taken.numel()])  # lowest positions first


def rows_case(device: str, bsz: int, width: int, visible: list[int]) -> torch.Tensor:
    x = torch.randn(bsz, width, device=device)
    for b, v in enumerate(visible):
        x[b, v:] = NEG
    return x


@pytest.mark.parametrize("width,k", [(100, 16), (37, 64), (300, 7), (2500, 1024)])
def test_topk_set_equals_torch(width, k, device):
    vis = [width, width // 2, 3, 0]
    x = rows_case(device, 4, width, vis)
    got = T.topk_triton(x, k, block=256)
    ref = T.topk_ref(x, k)
    assert got.dtype == torch.int32 and got.shape == (4, k)
    for b in range(4):  # distinct values: the same set as torch.topk
        assert set(got[b].tolist()) == set(ref[b].tolist())
    assert_valid_topk(got.cpu(), x.cpu(), k)
    assert (got[3] == -1).all()


def test_topk_ties_and_signs(device):
    """Few distinct values (many ties at the threshold), negatives, zeros of both signs, +inf."""
    x = torch.randint(-3, 4, (3, 700), device=device).float()
    x[1, ::7] = -0.0
    x[1, 5] = float("inf")
    x[2, :350] = NEG
    got = T.topk_triton(x, 100, block=128)
    assert_valid_topk(got.cpu(), x.cpu(), 100)
    assert 5 in got[1].tolist()


def test_topk_high_bits_equal(device):
    """Scores that share their high 24 bits (one bucket until the last byte)."""
    base = torch.tensor(1.5, device=device).view(torch.int32)
    bits = base + torch.randperm(256, device=device, dtype=torch.int32)[None, :].repeat(2, 4)[:, :1000]
    x = bits.view(torch.float32).contiguous()
    got = T.topk_triton(x, 300, block=256)
    assert_valid_topk(got.cpu(), x.cpu(), 300)


def test_dispatch_uses_reference_on_cpu():
    x = rows_case("cpu", 2, 50, [50, 10])
    assert torch.equal(T.topk(x, 20), T.topk_ref(x, 20))


@gpu
@pytest.mark.parametrize("bsz,width", [(1, 4160), (64, 4160), (4, 131072)])
def test_topk_gpu_real_shapes(bsz, width):
    x = rows_case("cuda", bsz, width, [width - 13 * b for b in range(bsz)])
    got = T.topk_triton(x, 2048)
    ref = T.topk_ref(x, 2048)
    for b in range(bsz):
        assert set(got[b].tolist()) == set(ref[b].tolist())


def test_topk_nan_counts_as_not_visible(device):
    """The kernel never selects a NaN score (the module docstring's rule): a row with NaNs selects among
    its other visible scores, an all-NaN row selects nothing."""
    nan = float("nan")
    x = torch.tensor([[1.0, nan, 3.0, NEG, 2.0, 0.5], [nan] * 6], device=device)
    got = T.topk_triton(x, 2, block=8).cpu()
    assert sorted(got[0].tolist()) == [2, 4]
    assert got[1].tolist() == [-1, -1]
