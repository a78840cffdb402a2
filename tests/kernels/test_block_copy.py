"""The staging copy kernel (kvtransfer/staging.py) against its reference: whole blocks of pools of any
dtype and block size move src[i] -> dst[i], nothing else changes (Triton interpreter without a GPU)."""

from __future__ import annotations

import importlib

import pytest
import torch


@pytest.mark.parametrize(
    "dtype,shape", [(torch.bfloat16, (12, 3, 4, 40)), (torch.uint8, (12, 2, 37)), (torch.float32, (12, 5))]
)
def test_copy_blocks_triton_equals_reference(device, dtype, shape) -> None:
    import splitserve.kvtransfer.staging as staging

    staging = importlib.reload(staging)  # defined under this process's TRITON_INTERPRET setting
    g = torch.Generator().manual_seed(0)
    pool = (
        (torch.randn(shape, generator=g) * 50).to(dtype)
        if dtype.is_floating_point
        else torch.randint(0, 255, shape, generator=g, dtype=torch.uint8)
    )
    pool = pool.to(device)
    ref = pool.clone().cpu()
    src, dst = [5, 0, 11, 3], [8, 9, 10, 1]
    s, d = torch.tensor(src, device=device), torch.tensor(dst, device=device)
    staging.copy_blocks_triton([pool], s, d, block_words=16)
    staging.copy_blocks_ref([ref], torch.tensor(src), torch.tensor(dst))
    assert torch.equal(pool.cpu(), ref)


def test_one_launch_copies_every_pool(device) -> None:
    """Pools of different dtypes and block sizes (8-, 4- and 1-byte words) in one call: each moves
    src[i] -> dst[i], nothing else changes."""
    import splitserve.kvtransfer.staging as staging

    staging = importlib.reload(staging)
    g = torch.Generator().manual_seed(1)
    pools = [
        (torch.randn(10, 3, 8, generator=g) * 9).to(torch.bfloat16),  # 48 B blocks: int64 words
        torch.randn(10, 5, generator=g),  # 20 B: int32 words
        torch.randint(0, 255, (10, 7), generator=g, dtype=torch.uint8),  # 7 B: bytes
        torch.randn(10, 2, 6, generator=g, dtype=torch.float64),  # 96 B: int64 words, same launch as the first
    ]
    pools = [p.to(device) for p in pools]
    refs = [p.clone().cpu() for p in pools]
    src, dst = [9, 2, 4], [0, 7, 5]
    idx = torch.tensor([src, dst], device=device)
    staging.copy_blocks_triton(pools, idx[0], idx[1], block_words=4)
    staging.copy_blocks_ref(refs, torch.tensor(src), torch.tensor(dst))
    for p, r in zip(pools, refs, strict=True):
        assert torch.equal(p.cpu(), r)
