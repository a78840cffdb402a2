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
