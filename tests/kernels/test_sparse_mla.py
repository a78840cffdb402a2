"""Sparse absorbed-MLA decode over the paged latent cache vs its reference and the model's form."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import sparse_mla as K

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def make_case(bsz, heads, dl, dr, bs, num_blocks, seq_lens, topk, dtype, device, layer=1):
    max_blocks = max(-(-s // bs) for s in seq_lens)
    q_lat = torch.randn(bsz, heads, dl, device=device).to(dtype)
    q_rope = torch.randn(bsz, heads, dr, device=device).to(dtype)
    latent = torch.randn(num_blocks, 2, bs, dl + dr, device=device).to(dtype)
    bt = torch.randperm(num_blocks, device=device)[: bsz * max_blocks].view(bsz, max_blocks).int()
    rows = []
    for s in seq_lens:
        sel = torch.randperm(s, device=device)[:topk]
        rows.append(torch.cat([sel, torch.full((topk - sel.numel(),), -1, device=device)]))
    idx = torch.stack(rows).int()
    return q_lat, q_rope, latent, layer, bt, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits,prefetch", [(1, False), (2, True), (3, True)])
def test_sparse_mla_small(dtype, splits, prefetch, device):
    q_lat, q_rope, latent, layer, bt, idx = make_case(3, 32, 64, 16, 16, 24, [70, 5, 40], 48, dtype, device)
    idx[2, 7:] = -1
    scale = 0.1
    ref = K.sparse_mla_decode_ref(q_lat, q_rope, latent, layer, bt, idx, scale)
    out = torch.full_like(ref, float("nan"))
    out = K.sparse_mla_decode_triton(
        q_lat,
        q_rope,
        latent,
        layer,
        bt,
        idx,
        scale,
        block_h=16,
        block_n=16,
        num_splits=splits,
        prefetch=prefetch,
    )
    assert out.dtype == dtype and not out.isnan().any()
    assert rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_all_invalid_row_is_zero(device):
    q_lat, q_rope, latent, layer, bt, idx = make_case(2, 16, 32, 16, 16, 8, [20, 20], 16, torch.float32, device)
    idx[1] = -1
    out = K.sparse_mla_decode_triton(q_lat, q_rope, latent, layer, bt, idx, 0.2, block_h=16, block_n=16, num_splits=2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert rel(out[0], K.sparse_mla_decode_ref(q_lat, q_rope, latent, layer, bt, idx, 0.2)[0]) < 1e-5


def test_reference_matches_model_absorbed_form():
    """With every visible position selected, the kernel reference equals MLA._absorbed's latent output."""
    torch.manual_seed(0)
    heads, dl, dr, bs, seq = 4, 32, 16, 8, 21
    q_lat, q_rope, latent, layer, bt, idx = make_case(1, heads, dl, dr, bs, 6, [seq], seq, torch.float64, "cpu", 0)
    pos = torch.arange(seq)
    cache = latent[bt[0, pos // bs].long(), 0, pos % bs]  # [L, dl + dr]
    lat, k_rope = cache[:, :dl], cache[:, dl:]
    logits = torch.einsum("nhc,lc->hnl", q_lat, lat) + torch.einsum("nhd,ld->hnl", q_rope, k_rope)
    p = torch.softmax(logits * 0.3, dim=-1)
    want = torch.einsum("hnl,lc->nhc", p, lat)
    got = K.sparse_mla_decode_ref(q_lat, q_rope, latent, 0, bt, idx, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the reference computes in fp32


@gpu
@pytest.mark.parametrize("bsz", [1, 8, 64])
def test_sparse_mla_gpu_real_shapes(bsz):
    ctx = 16384
    q_lat, q_rope, latent, layer, bt, idx = make_case(
        bsz, 128, 512, 64, 64, bsz * ctx // 64 + 4, [ctx - i for i in range(bsz)], 2048, torch.bfloat16, "cuda"
    )
    q_lat, q_rope = q_lat * 0.05, q_rope * 0.05
    ref = K.sparse_mla_decode_ref(q_lat, q_rope, latent, layer, bt, idx, 192**-0.5)
    for prefetch in (False, True):
        out = K.sparse_mla_decode_triton(
            q_lat, q_rope, latent, layer, bt, idx, 192**-0.5, prefetch=prefetch, wgmma=False
        )
        assert rel(out, ref) < 1e-2
    if hopper:
        for block_n, stages in ((64, 2), (32, 3)):
            out = K.sparse_mla_decode_triton(
                q_lat, q_rope, latent, layer, bt, idx, 192**-0.5, wgmma=True, block_n=block_n, num_stages=stages,
                warp_specialized=False,
            )  # fmt: skip
            assert rel(out, ref) < 1e-2
        for splits in (None, 1, 4):  # by default (pairs of tiles) 16 splits at 1 row, 8 at 8 rows, 1 at 64
            out = K.sparse_mla_decode_triton(
                q_lat, q_rope, latent, layer, bt, idx, 192**-0.5, wgmma=True, warp_specialized=True, num_splits=splits
            )
            assert rel(out, ref) < 1e-2


hopper = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not hopper, reason="needs a Hopper GPU")
@pytest.mark.parametrize("ws", [True, False])
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_sparse_mla_wgmma_short_rows(splits, ws):
    """The Hopper kernels where rows select fewer positions than top-k (-1 padding), top-k is not a
    multiple of the tile, and splits end mid-tile (or mid-pair of tiles); a row with nothing selected gives
    zeros."""
    q_lat, q_rope, latent, layer, bt, idx = make_case(
        4, 128, 512, 64, 64, 40, [300, 50, 120, 90], 200, torch.bfloat16, "cuda"
    )
    q_lat, q_rope = q_lat * 0.05, q_rope * 0.05
    idx[3] = -1
    ref = K.sparse_mla_decode_ref(q_lat, q_rope, latent, layer, bt, idx, 192**-0.5)
    out = K.sparse_mla_decode_triton(
        q_lat, q_rope, latent, layer, bt, idx, 192**-0.5, wgmma=True, num_splits=splits, warp_specialized=ws
    )
    assert rel(out[:3], ref[:3]) < 1e-2
    assert out[3].abs().max() == 0


@pytest.mark.skipif(not hopper, reason="needs a Hopper GPU")
@pytest.mark.parametrize("bs,topk,splits", [(16, 128, None), (64, 2048, None), (64, 2048, 4)])
def test_sparse_mla_ws_is_deterministic_and_equals_the_pipelined_kernel(bs, topk, splits):
    """Engine-like shapes (64 heads, rows of many lengths, one or several pairs of tiles): repeated calls of
    the warp-specialised kernel are bitwise equal (a race between its warp groups would show), with the
    remote product left in flight or not, and within bf16 rounding of the pipelined kernel and the reference."""
    from splitserve.kernels import sparse_mla_hopper as H

    lens = [max(1, 3000 - 37 * i) for i in range(80)]
    q_lat, q_rope, latent, layer, bt, idx = make_case(
        80, 64, 512, 64, bs, 80 * (-(-3000 // bs)) + 4, lens, topk, torch.bfloat16, "cuda"
    )
    q_lat, q_rope = q_lat * 0.05, q_rope * 0.05
    ref = K.sparse_mla_decode_ref(q_lat, q_rope, latent, layer, bt, idx, 192**-0.5)
    piped = K.sparse_mla_decode_triton(
        q_lat, q_rope, latent, layer, bt, idx, 192**-0.5, wgmma=True, warp_specialized=False
    )
    saved = H.WS_OVERLAP
    try:
        for overlap in (True, False):
            H.WS_OVERLAP = overlap
            runs = [
                K.sparse_mla_decode_triton(
                    q_lat, q_rope, latent, layer, bt, idx, 192**-0.5, warp_specialized=True, num_splits=splits
                )
                for _ in range(20)
            ]
            assert all(torch.equal(r, runs[0]) for r in runs), f"overlap={overlap}: calls differ"
            assert rel(runs[0], ref) < 1e-2 and rel(runs[0], piped) < 1e-2
    finally:
        H.WS_OVERLAP = saved


# ---------------------------------------------------------------------------------------------
# FP8 latent cache (656-byte entries at DeepSeek's shapes)
# ---------------------------------------------------------------------------------------------
def to_fp8_pool(latent: torch.Tensor, dl: int) -> torch.Tensor:
    """A float pool [NB, L, BS, dl + dr] -> the FP8 entry format, packed by the engine's own CachePool code."""
    from splitserve.engine.cache import CachePool

    nb, nl, bs, d = latent.shape
    pool = CachePool.__new__(CachePool)
    pool.kv_lora, pool.fp8_group, pool.dtype = dl, min(128, dl), latent.dtype
    flat = latent.reshape(-1, d)
    return pool._pack_fp8(flat).view(nb, nl, bs, -1)


@pytest.mark.parametrize("dl,dr,splits,prefetch", [(256, 32, 1, False), (256, 32, 2, True), (64, 16, 3, True)])
def test_sparse_mla_fp8_cache_small(dl, dr, splits, prefetch, device):
    q_lat, q_rope, latent, layer, bt, idx = make_case(3, 16, dl, dr, 16, 24, [70, 5, 40], 48, torch.float32, device)
    idx[2, 7:] = -1
    raw = to_fp8_pool(latent, dl)
    assert raw.dtype == torch.uint8 and raw.shape[-1] == K.fp8_token_bytes(dl, dr)
    ref = K.sparse_mla_decode_ref(q_lat, q_rope, raw, layer, bt, idx, 0.1)
    # the FP8 reference is the float reference over the unpacked entries, and close to the unquantised one
    unpacked = K.unpack_fp8_entries(raw, dl, dr, torch.float32)
    torch.testing.assert_close(ref, K.sparse_mla_decode_ref(q_lat, q_rope, unpacked, layer, bt, idx, 0.1))
    assert rel(ref, K.sparse_mla_decode_ref(q_lat, q_rope, latent, layer, bt, idx, 0.1)) < 0.1
    out = K.sparse_mla_decode_triton(
        q_lat, q_rope, raw, layer, bt, idx, 0.1, block_h=16, block_n=16, num_splits=splits, prefetch=prefetch
    )
    assert rel(out, ref) < 1e-5


def test_fp8_token_is_flashmla_size():
    assert K.fp8_token_bytes(512, 64) == 656


@gpu
@pytest.mark.parametrize("bsz", [1, 8, 64])
def test_sparse_mla_fp8_gpu_real_shapes(bsz):
    ctx = 16384
    q_lat, q_rope, latent, layer, bt, idx = make_case(
        bsz, 128, 512, 64, 64, bsz * ctx // 64 + 4, [ctx - i for i in range(bsz)], 2048, torch.bfloat16, "cuda"
    )
    q_lat, q_rope = q_lat * 0.05, q_rope * 0.05
    raw = to_fp8_pool(latent, 512)
    del latent
    assert raw.shape[-1] == 656
    ref = K.sparse_mla_decode_ref(q_lat, q_rope, raw, layer, bt, idx, 192**-0.5)
    out = K.sparse_mla_decode(q_lat, q_rope, raw, layer, bt, idx, 192**-0.5)
    assert rel(out, ref) < 1e-2


def test_wgmma_smem_estimate_and_refusals():
    """The shared-memory estimate equals what the compiler reported for the measured launches (sm_90,
    triton 3.6), and an explicit wgmma=True that cannot run is refused with a message."""
    from splitserve.kernels.sparse_mla_hopper import SMEM_LIMIT, smem_bytes, ws_smem_bytes

    assert smem_bytes(64, 2) == smem_bytes(32, 4) == 225792 and smem_bytes(32, 3) == 188800
    assert smem_bytes(64, 2) <= SMEM_LIMIT < smem_bytes(64, 3)
    assert 222544 <= ws_smem_bytes() <= SMEM_LIMIT  # the warp-specialised kernel, with and without splits
    q_lat, q_rope, latent, layer, bt, idx = make_case(1, 16, 32, 16, 16, 8, [20], 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="wgmma"):
        K.sparse_mla_decode_triton(q_lat, q_rope, latent, layer, bt, idx, 0.1, wgmma=True)
    with pytest.raises(ValueError, match="wgmma"):
        K.sparse_mla_decode_triton(q_lat, q_rope, latent, layer, bt, idx, 0.1, warp_specialized=True)
    with pytest.raises(ValueError, match="Hopper kernel"):
        K.sparse_mla_decode_triton(q_lat, q_rope, latent, layer, bt, idx, 0.1, wgmma=False, warp_specialized=True)


def test_hopper_kernels_need_16_byte_aligned_tensors():
    """The Hopper kernels' 16-byte cp.async gathers: tensors starting off a 16-byte boundary or with a stride
    that is not a multiple of 16 elements are not theirs (the launcher falls back instead of failing to compile)."""
    from splitserve.kernels.sparse_mla_hopper import aligned_16

    x = torch.zeros(4, 64, 576, dtype=torch.bfloat16)
    assert aligned_16(x, x[:, :, 512:], x[1:])  # q_rope as a slice of a fused projection, a sub-batch
    assert not aligned_16(x, x[:, :, 4:])  # 8 bytes in
    assert not aligned_16(torch.zeros(4, 64, 584, dtype=torch.bfloat16)[..., :576])  # rows 584 elements apart
