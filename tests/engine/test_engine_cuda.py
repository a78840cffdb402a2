"""The engine on a GPU (skipped without CUDA): paged prefill/decode over CUDA pools equals cache-free
scoring on the same device, MTP drafting runs, the prefill -> adopt handoff carries a CUDA generator."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import load
from splitserve.model.checkpoint import make_checkpoint

from .conftest import greedy_reference, random_prompts
from .test_handoff import handoff

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def small_cuda(tmp_path_factory):
    path = make_checkpoint("small", tmp_path_factory.mktemp("small"), seed=0, dtype=torch.float32)
    return load(path, device="cuda", dtype=torch.float32)


def test_greedy_on_cuda_matches_scoring(small_cuda) -> None:
    net = small_cuda
    prompts = random_prompts([150, 40, 7], net.cfg.vocab_size, seed=1)  # 150 > index_topk 128: sparse
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for k in (0, 2):
        eng = Engine(net, EngineConfig(num_blocks=64, block_size=16, chunk_size=64, mtp_draft_tokens=k, device="cuda"))
        assert eng.pool.latent.is_cuda
        res = eng.generate(prompts, params)
        for r, p in zip(res, prompts):
            assert r.token_ids == greedy_reference(net, p, params.max_tokens)
        assert eng.blocks_used == 0
        if k:
            assert sum(r.draft_tokens for r in res) > 0


def test_handoff_on_cuda_with_seeded_sampling(small_cuda) -> None:
    net = small_cuda
    cfg = EngineConfig(num_blocks=64, block_size=16, chunk_size=64, mtp_draft_tokens=1, device="cuda")
    params = SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True, seed=3)
    p = random_prompts([90], net.cfg.vocab_size, seed=2)[0]
    ref = Engine(net, cfg).generate([p], params)[0].token_ids
    a, b = Engine(net, cfg), Engine(net, cfg)
    assert handoff(a, b, "cuda-0", p, params) == ref
    assert a.blocks_used == 0 and b.blocks_used == 0


# The small preset with 16 attention and 16 indexer heads: the shapes the Triton kernels take, so the
# engine's rows path runs the indexer top-k, sparse MLA, fused MoE and RMSNorm kernels, and decode
# steps replay CUDA graphs.
def _kernel_net(tmp_path_factory, dtype, indexer_fp8=False):
    from dataclasses import replace

    from splitserve.model.checkpoint import PRESETS

    cfg = replace(PRESETS["small"], num_attention_heads=16, index_n_heads=16)
    path = make_checkpoint(cfg, tmp_path_factory.mktemp("kernel-shaped"), seed=0, dtype=torch.float32)
    return load(path, device="cuda", dtype=dtype, indexer_fp8=indexer_fp8)


@pytest.fixture(scope="module")
def kernel_net32(tmp_path_factory):
    return _kernel_net(tmp_path_factory, torch.float32)


@pytest.fixture(scope="module")
def kernel_net16(tmp_path_factory):
    return _kernel_net(tmp_path_factory, torch.bfloat16, indexer_fp8=True)


def test_kernels_and_graphs_match_scoring_fp32(kernel_net32) -> None:
    net = kernel_net32
    prompts = random_prompts([300, 140, 9, 64], net.cfg.vocab_size, seed=5)  # 300, 140 > index_topk 128
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    refs = [greedy_reference(net, p, params.max_tokens) for p in prompts]
    for k in (0, 2):
        eng = Engine(
            net,
            EngineConfig(
                num_blocks=96, block_size=16, chunk_size=128, mtp_draft_tokens=k, device="cuda", dtype="float32"
            ),
        )
        assert eng.runner.paged and eng.runner.graphs is not None
        res = eng.generate(prompts, params)
        assert [r.token_ids for r in res] == refs
        if k:  # decode-only steps: the fused speculative step (engine/spec_step.py)
            assert eng.runner.spec.graphs, "speculative steps did not run through a CUDA graph"
            assert sum(r.draft_tokens for r in res) > 0
        else:
            assert eng.runner.graphs.graphs, "decode steps did not run through a CUDA graph"
        assert eng.blocks_used == 0


def test_graphs_equal_eager_kernels_bf16_fp8_indexer(kernel_net16) -> None:
    net = kernel_net16
    prompts = random_prompts([500, 200, 130, 33], net.cfg.vocab_size, seed=6)  # 4 rows: a graph size
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    out = {}
    for graphs in (False, True):
        eng = Engine(
            net,
            EngineConfig(
                num_blocks=128, block_size=64, chunk_size=256, device="cuda", dtype="bfloat16", cuda_graphs=graphs
            ),
        )
        out[graphs] = [r.token_ids for r in eng.generate(prompts, params)]
        assert bool(eng.runner.graphs and eng.runner.graphs.graphs) == graphs
        assert eng.blocks_used == 0
    assert out[True] == out[False]


def test_cache_sized_by_memory_fraction(small_cuda) -> None:
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    eng = Engine(small_cuda, EngineConfig(cache_memory_fraction=0.05, block_size=16, device="cuda"))
    used = sum(p.nbytes for p in eng.pool.pools())
    assert eng.cfg.num_blocks == eng.blocks_total > 1000
    assert 0.04 * free_before <= used <= 0.051 * free_before  # ~5% of what was free (+ the scratch block)
    prompts = random_prompts([40], small_cuda.cfg.vocab_size, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    assert eng.generate(prompts, params)[0].token_ids == greedy_reference(small_cuda, prompts[0], 4)
    assert eng.blocks_used == 0


def test_warm_up_captures_every_size_and_nothing_while_serving(kernel_net32) -> None:
    """Warm start: every batch size's graph (decode and MTP) is captured before ready; a mixed load of
    prompt lengths, batch sizes and context lengths afterwards captures nothing and misses no graph,
    and its outputs equal the cache-free reference."""
    net = kernel_net32
    for k in (0, 2):
        eng = Engine(
            net,
            EngineConfig(
                num_blocks=160,
                block_size=16,
                chunk_size=128,
                mtp_draft_tokens=k,
                max_running=12,
                device="cuda",
                dtype="float32",
            ),
        )
        info = eng.warm_up()
        sizes = eng.runner.graphs.sizes
        assert sorted(eng.runner.graphs.graphs) == list(sizes) and sizes[-1] == 12 * (k + 1)
        if k:
            assert sorted(eng.runner.mtp_graphs.graphs) == list(eng.runner.mtp_graphs.sizes)
        assert info["graphs"] == eng.graph_stats["graph_captures"] > 0 and info["seconds"] > 0
        assert eng.blocks_used == 0 and not eng.requests and not eng.blocks.hash_to_block
        captured = eng.graph_stats["graph_captures"]
        prompts = random_prompts([300, 140, 9, 64, 33, 1, 200, 17, 90], net.cfg.vocab_size, seed=5)
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        refs = [greedy_reference(net, p, params.max_tokens) for p in prompts]
        assert [r.token_ids for r in eng.generate(prompts, params)] == refs
        assert [r.token_ids for r in eng.generate(prompts[:3], params)] == refs[:3]
        assert eng.graph_stats == {"graph_captures": captured, "graph_misses_after_ready": 0}
        assert eng.blocks_used == 0


def test_a_failed_capture_keeps_outputs_exact(kernel_net32, monkeypatch) -> None:
    net = kernel_net32
    prompts = random_prompts([150, 20, 70], net.cfg.vocab_size, seed=11)  # decode batches of 2, then 3 rows
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    refs = [greedy_reference(net, p, params.max_tokens) for p in prompts]
    cfg = EngineConfig(num_blocks=96, block_size=16, chunk_size=128, device="cuda", dtype="float32")
    eng = Engine(net, cfg)

    def capture_fails(rows: int):
        raise RuntimeError("injected capture failure")

    monkeypatch.setattr(eng.runner.graphs, "_capture", capture_fails)
    assert [r.token_ids for r in eng.generate(prompts, params)] == refs  # eager from the first decode step
    assert eng.runner.graphs.disabled and not eng.runner.graphs.graphs
    assert eng.blocks_used == 0


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs a Hopper GPU"
)
def test_hopper_sparse_mla_in_the_engine_equals_the_triton_kernel(tmp_path_factory) -> None:
    """DeepSeek-V3.2's attention widths (64 heads here, latent 512, rope 64) in a small net, bf16: every sparse
    MLA call of an eager run (prefill chunks and decode steps, as the engine shapes them) is computed by the
    default Hopper kernel (the warp-specialised Gluon one) and by the Triton kernel (itself tested against the
    reference): equal within bf16 rounding; and the engine on the Hopper kernel gives the same tokens with CUDA
    graphs as eager. (Greedy tokens of the two kernels are not compared: with random weights a bf16 rounding
    difference can flip a near-tie argmax; on an H100 one of four prefill tokens did.)"""
    from dataclasses import replace

    from splitserve.kernels import sparse_mla
    from splitserve.model.checkpoint import PRESETS

    cfg = replace(PRESETS["small"], num_attention_heads=64, kv_lora_rank=512, qk_rope_head_dim=64, index_n_heads=16)
    path = make_checkpoint(cfg, tmp_path_factory.mktemp("mla-widths"), seed=0, dtype=torch.float32)
    net = load(path, device="cuda", dtype=torch.bfloat16)
    prompts = random_prompts([500, 200, 130, 33], net.cfg.vocab_size, seed=7)  # 500, 200, 130 > index_topk 128
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    real = sparse_mla.sparse_mla_decode_triton
    errors: list[float] = []
    rows: list[int] = []

    def both(*args, **kw):
        out = real(*args, **kw)
        if not torch.cuda.is_current_stream_capturing() and sparse_mla.wgmma_fits(args[0], args[1], args[2]):
            ref = real(*args, **{**kw, "wgmma": False})
            errors.append(float((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)))
            rows.append(args[0].shape[0])
        return out

    out = {}
    for graphs in (False, True):
        eng = Engine(
            net,
            EngineConfig(
                num_blocks=128, block_size=16, chunk_size=256, device="cuda", dtype="bfloat16", cuda_graphs=graphs
            ),
        )
        sparse_mla.sparse_mla_decode_triton = both
        try:
            out[graphs] = [r.token_ids for r in eng.generate(prompts, params)]
        finally:
            sparse_mla.sparse_mla_decode_triton = real
        assert eng.blocks_used == 0
    assert errors, "the Hopper kernel never ran"
    assert any(n <= len(prompts) for n in rows), "no decode step compared"  # prefill chunks have more rows
    assert max(errors) < 1e-2, errors
    assert out[True] == out[False]  # graphs replay what eager steps computed
