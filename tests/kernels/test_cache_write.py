"""The fused cache-entry write (kernels/cache_write.py) against the composition it replaces."""

from __future__ import annotations

import pytest
import torch

from splitserve.kernels import cache_write as C
from splitserve.model.fp8 import hadamard_matrix

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FP8 = torch.float8_e4m3fn


def make_case(device, dtype, n, kv_lora, rope, d, fp8, num_blocks=6, layers=3, bs=16):
    half = rope // 2
    args = dict(
        kv_a=torch.randn(n, kv_lora + rope + 8, device=device).to(dtype)[:, : kv_lora + rope],  # strided rows
        k_idx=torch.randn(n, d, device=device).to(dtype) * 3 + 1,
        cos=torch.rand(n, half, device=device).to(dtype),
        sin=torch.rand(n, half, device=device).to(dtype),
        kv_norm_w=(torch.rand(kv_lora, device=device) + 0.5).to(dtype),
        kv_eps=1e-6,
        k_norm_w=(torch.rand(d, device=device) + 0.5).to(dtype),
        k_norm_b=(torch.randn(d, device=device) * 0.1).to(dtype),
        k_eps=1e-6,
        hadamard=hadamard_matrix(d, dtype, device) if fp8 else None,
    )
    pools = dict(
        latent=torch.zeros(num_blocks, layers, bs, kv_lora + rope, device=device, dtype=dtype),
        ikeys=torch.zeros(num_blocks, layers, bs, d, device=device, dtype=torch.uint8 if fp8 else dtype),
        iscale=torch.zeros(num_blocks, layers, bs, device=device) if fp8 else None,
    )
    slots = torch.randperm(num_blocks * bs, device=device)[:n].long()
    return args, pools, slots


def run(fn, args, pools, slots, interleaved, layer=1):
    out = {k: (None if v is None else v.clone()) for k, v in pools.items()}
    fn(**args, index_rope_interleaved=interleaved, **out, layer=layer, slots=slots)
    return out


def dequant(ikeys, iscale):
    return ikeys.view(FP8).float() * iscale[..., None]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dims", [(32, 16, 32), (64, 32, 64)])
def test_fused_write_fp32_matches_reference(dims, fp8, interleaved, device):
    """fp32 everywhere: no intermediate roundings, so the kernel equals the reference to fp32 ulps
    (and the e4m3 keys exactly, but for values on a rounding boundary)."""
    args, pools, slots = make_case(device, torch.float32, 19, *dims, fp8)
    ref = run(C.kv_write_ref, args, pools, slots, interleaved)
    got = run(C.kv_write_triton, args, pools, slots, interleaved)
    torch.testing.assert_close(got["latent"], ref["latent"], atol=1e-5, rtol=1e-5)
    if fp8:
        assert torch.equal(got["iscale"], ref["iscale"])
        same = got["ikeys"] == ref["ikeys"]
        assert same.float().mean() > 0.999
        torch.testing.assert_close(
            dequant(got["ikeys"], got["iscale"]), dequant(ref["ikeys"], ref["iscale"]), atol=1e-2, rtol=0.07
        )
    else:
        torch.testing.assert_close(got["ikeys"], ref["ikeys"], atol=1e-5, rtol=1e-5)
    untouched = torch.ones(pools["latent"].shape[0] * pools["latent"].shape[2], dtype=torch.bool)
    untouched[slots.cpu()] = False
    lat = got["latent"].transpose(1, 2).reshape(-1, *got["latent"].shape[1:2], got["latent"].shape[-1])
    assert (lat[untouched.to(lat.device)] == 0).all()
    assert (got["latent"][:, [0, 2]] == 0).all()  # other layers untouched


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_write_bf16_within_rounding(fp8, device):
    """The model dtype: the kernel rounds where the composition does, differing by bf16 ulps (and the
    e4m3 keys by at most one e4m3 step where such an ulp moves a value across a rounding boundary)."""
    args, pools, slots = make_case(device, torch.bfloat16, 33, 64, 32, 64, fp8)
    ref = run(C.kv_write_ref, args, pools, slots, False)
    got = run(C.kv_write_triton, args, pools, slots, False)
    torch.testing.assert_close(got["latent"].float(), ref["latent"].float(), atol=2e-2, rtol=1e-2)
    if fp8:
        assert (got["iscale"] == ref["iscale"]).float().mean() > 0.95
        g, r = dequant(got["ikeys"], got["iscale"]), dequant(ref["ikeys"], ref["iscale"])
        torch.testing.assert_close(g, r, atol=0.1 * float(r.abs().max()), rtol=0.13)
    else:
        torch.testing.assert_close(got["ikeys"].float(), ref["ikeys"].float(), atol=2e-2, rtol=1e-2)


def test_reference_is_the_model_composition():
    """kv_write_ref writes exactly what MLA.forward + Indexer.keys + CachePool.write wrote before."""
    from splitserve.engine.cache import CachePool
    from splitserve.kernels import rope
    from splitserve.model.attention import MLA
    from splitserve.model.checkpoint import PRESETS

    cfg = PRESETS["tiny"]
    for fp8 in (False, True):
        mla = MLA(cfg, 0, indexer_fp8=fp8)
        pool_a = CachePool(cfg, 2, 4, 16, torch.float32, "cpu", indexer_fp8=fp8)
        pool_b = CachePool(cfg, 2, 4, 16, torch.float32, "cpu", indexer_fp8=fp8)
        n = 7
        kv_a, k_idx = torch.randn(n, cfg.latent_dim), torch.randn(n, cfg.index_head_dim)
        cos, sin = torch.rand(n, cfg.qk_rope_head_dim // 2), torch.rand(n, cfg.qk_rope_head_dim // 2)
        slots = torch.tensor([3, 17, 18, 40, 41, 62, 5])
        latent, k_rope = kv_a.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        entries = torch.cat([mla.kv_a_layernorm(latent), rope(k_rope, cos, sin, interleaved=True)], dim=-1)
        pool_a.write(0, slots, entries, mla.indexer.keys(k_idx, cos, sin))
        mla.write_entries(kv_a, k_idx, cos, sin, pool_b, slots)
        for a, b in zip(pool_a.pools(), pool_b.pools()):
            assert torch.equal(a, b)


@gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_fused_write_gpu_real_shapes(fp8):
    args, pools, slots = make_case("cuda", torch.bfloat16, 64, 512, 64, 128, fp8, num_blocks=8, layers=2, bs=64)
    ref = run(C.kv_write_ref, args, pools, slots, False)
    got = run(C.kv_write_triton, args, pools, slots, False)
    torch.testing.assert_close(got["latent"].float(), ref["latent"].float(), atol=2e-2, rtol=1e-2)
    if fp8:
        g, r = dequant(got["ikeys"], got["iscale"]), dequant(ref["ikeys"], ref["iscale"])
        torch.testing.assert_close(g, r, atol=0.1 * float(r.abs().max()), rtol=0.13)
