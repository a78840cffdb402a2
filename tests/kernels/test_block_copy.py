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
