"""Lightning-indexer top-k over the paged key cache vs its reference (and the model's scoring)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from splitserve.kernels import indexer as K

pytest.importorskip("triton")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_case(bsz, heads, dim, bs, num_blocks, layers, seq_lens, fp8, dtype, device, layer=1):
    max_blocks = max(-(-s // bs) for s in seq_lens) + 1
    q = torch.randn(bsz, heads, dim, device=device)
    w = torch.rand(bsz, heads, device=device) * heads**-0.5
    kc = torch.randn(num_blocks, layers, bs, dim, device=device)
    ks = None
    if fp8:
        q = q.to(torch.float8_e4m3fn)
        kc = kc.to(torch.float8_e4m3fn).view(torch.uint8)
        ks = torch.rand(num_blocks, layers, bs, device=device) + 0.5
    else:
        q, kc = q.to(dtype), kc.to(dtype)
    # scattered, distinct physical blocks per row
    bt = torch.randperm(num_blocks, device=device)[: bsz * max_blocks].view(bsz, max_blocks).int()
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, w, kc, ks, layer, bt, sl


def assert_topk_valid(idx: torch.Tensor, ref_logits: torch.Tensor, seq_lens: torch.Tensor, topk: int, atol: float):
    """Every row selects min(topk, seq_len) distinct visible positions whose reference scores are
    the top ones (up to atol at the boundary); the rest is -1."""
    for b in range(idx.shape[0]):
        n = min(topk, int(seq_lens[b]))
        row = idx[b].long()
        sel = row[row >= 0]
        assert sel.numel() == n and (row < 0).sum() == topk - n
        assert sel.unique().numel() == n and int(sel.max()) < int(seq_lens[b])
        got = ref_logits[b, sel].sort(descending=True).values
        want = ref_logits[b].topk(n).values
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("fp8,dtype", [(False, torch.float32), (False, torch.bfloat16), (True, None)])
def test_indexer_small(fp8, dtype, device):
    seq_lens = [70, 5, 33, 64]
    args = make_case(4, 16, 32, 16, 40, 2, seq_lens, fp8, dtype, device)
    ref = K.indexer_logits_decode_ref(*args)
    got = K.indexer_logits_decode_triton(*args, pages_per_program=2)
    assert got.shape == ref.shape == (4, args[5].shape[1] * 16)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], atol=1e-4, rtol=1e-4)
    idx = K.indexer_topk_decode_triton(*args, topk=24)
    assert idx.dtype == torch.int32 and idx.shape == (4, 24)
    assert_topk_valid(idx.cpu(), ref.cpu(), args[6].cpu(), 24, atol=1e-4)


def test_reference_matches_model_scoring():
    """The kernel contract (weights with scales folded in) reproduces model.attention.Indexer.scores."""
    from splitserve.model.attention import Indexer
    from splitserve.model.batch import IndexerKeys

    bs, dim, heads = 8, 32, 4
    for fp8 in (False, True):
        q, w, kc, ks, layer, bt, sl = make_case(1, heads, dim, bs, 6, 2, [19], fp8, torch.float32, "cpu", layer=0)
        pos = torch.arange(19)
        blk = bt[0, pos // bs].long()
        keys = kc[blk, 0, pos % bs]
        me = SimpleNamespace(fp8=fp8, softmax_scale=dim**-0.5)
        if fp8:
            model = Indexer.scores(me, q, w, IndexerKeys(keys.view(torch.float8_e4m3fn), ks[blk, 0, pos % bs]))
            kern = K.indexer_logits_decode_ref(q, w, kc, ks, 0, bt, sl)
        else:  # the exact path's softmax_scale is folded into the weights
            model = Indexer.scores(me, q, w, IndexerKeys(keys))
            kern = K.indexer_logits_decode_ref(q, w * dim**-0.5, kc, None, 0, bt, sl)
        torch.testing.assert_close(kern[:, :19], model, atol=1e-5, rtol=1e-5)
        assert torch.isinf(kern[:, 19:]).all()


def test_dispatch_uses_reference_on_cpu():
    args = make_case(2, 16, 32, 16, 10, 1, [20, 3], False, torch.float32, "cpu", layer=0)
    assert torch.equal(K.indexer_topk_decode(*args, topk=8), K.indexer_topk_decode_ref(*args, topk=8))


@gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("bsz,ctx", [(1, 4096), (8, 16384), (4, 65536)])
def test_indexer_gpu_real_shapes(fp8, bsz, ctx):
    seq_lens = [ctx - 7 * i for i in range(bsz)]
    nb = bsz * (ctx // 64 + 1) + 8
    args = make_case(bsz, 64, 128, 64, nb, 2, seq_lens, fp8, torch.bfloat16, "cuda")
    ref = K.indexer_logits_decode_ref(*args)
    got = K.indexer_logits_decode_triton(*args)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    scale = float(ref[fin].abs().max())
    tol = 1e-3 if fp8 else 1e-4  # e4m3 tensor-core dots accumulate with reduced precision on Hopper
    torch.testing.assert_close(got[fin], ref[fin], atol=tol * scale, rtol=tol)
    idx = K.indexer_topk_decode_triton(*args, topk=2048)
    assert_topk_valid(idx.cpu(), ref.cpu(), args[6].cpu(), 2048, atol=2 * tol * scale)


def test_width_within_topk_selects_every_visible_position(device):
    """Block tables spanning at most top-k positions: the selection is every visible position (what
    scoring then top-k would pick), in order, without scoring."""
    seq_lens = [20, 3, 33]
    args = make_case(3, 16, 32, 16, 20, 1, seq_lens, False, torch.float32, device, layer=0)
    width = args[5].shape[1] * 16
    for topk in (width, width + 24):  # block tables spanning exactly top-k, and fewer positions than top-k
        idx = K.indexer_topk_decode(*args, topk=topk)
        scored = K.indexer_topk_decode_ref(*args, topk=topk)
        assert idx.shape == scored.shape == (3, topk)
        for b, n in enumerate(seq_lens):
            assert idx[b, :n].tolist() == list(range(n)) and (idx[b, n:] == -1).all()
            assert sorted(scored[b][scored[b] >= 0].tolist()) == list(range(n))
