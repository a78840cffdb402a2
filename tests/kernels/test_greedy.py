"""The two-stage argmax (kernels/greedy.py) equals torch.argmax, ties and NaNs included."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import greedy as G

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("v", [1, 5, 1000, 3000, 4097])
def test_random_rows(v, device):
    x = torch.randn(6, v, device=device)
    assert torch.equal(G.argmax_triton(x, block=256), x.argmax(-1))


def test_ties_take_the_lowest_index(device):
    x = torch.randint(0, 4, (16, 2500), device=device).float()  # the maximum repeats in many chunks
    x[3] = float("-inf")  # a row of -inf: index 0
    x[4, 2000:] = 9.0  # the tie first appears late in the row
    got = G.argmax_triton(x, block=256)
    assert torch.equal(got, x.argmax(-1))
    assert got[3] == 0 and got[4] == 2000


def test_nan_wins_like_torch(device):
    x = torch.randn(4, 2000, device=device)
    x[0, 1500] = float("nan")
    x[1, 700] = float("nan")
    x[1, 100] = float("nan")
    x[2, 10] = float("inf")
    assert torch.equal(G.argmax_triton(x, block=256), x.argmax(-1))


def test_bf16_and_strided_rows(device):
    x = torch.randn(5, 3000, device=device).to(torch.bfloat16)[:, :2900]
    assert torch.equal(G.argmax_triton(x, block=512), x.argmax(-1))


@gpu
@pytest.mark.parametrize("b", [1, 64])
def test_cuda_vocab_width(b):
    x = torch.randn(b, 129280, device="cuda")
    x[:, 77777] = x.max() + 1
    x[0, 129279] = x.max()  # a tie at the very end: the lowest index still wins
    assert torch.equal(G.argmax(x), x.argmax(-1))
    y = torch.randint(0, 3, (b, 129280), device="cuda").float()
    assert torch.equal(G.argmax(y), y.argmax(-1))
