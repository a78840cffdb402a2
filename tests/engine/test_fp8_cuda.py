"""FP8 weights and the FP8 latent cache inside the engine on a GPU (skipped without CUDA): the small
preset with kernel-sized heads, its FP8 checkpoint loaded with the weights kept e4m3, so the block-scaled
FP8 GEMM, the FP8 grouped MoE and the sparse MLA kernel's FP8 read all run (Triton, CUDA graphs)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import load
from splitserve.model.checkpoint import PRESETS, make_checkpoint
from splitserve.model.linear import FP8Linear

from .conftest import greedy_reference, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def fp8_path(tmp_path_factory):
    cfg = replace(PRESETS["small"], num_attention_heads=16, index_n_heads=16)
    return make_checkpoint(cfg, tmp_path_factory.mktemp("kernel-shaped-fp8"), seed=0, fp8=True)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fp8_kernels_in_the_network_equal_the_references(fp8_path) -> None:
    gpu = load(fp8_path, device="cuda", dtype=torch.float32)       # default on CUDA: weights stay FP8
    cpu = load(fp8_path, device="cpu", dtype=torch.float32, fp8_weights=True)
    assert isinstance(gpu.model.layers[0].self_attn.q_b_proj, FP8Linear) and gpu.weight_bytes()["fp8"] > 0
    gpu.fuse_weights()
    ids = torch.tensor(random_prompts([200], gpu.cfg.vocab_size, seed=4)[0])
    a, b = gpu.score(ids.cuda()).cpu(), cpu.score(ids)
    assert rel(a, b) < 2e-3
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.97


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_fp8_weights_and_fp8_latents(fp8_path, dtype) -> None:
    net = load(fp8_path, device="cuda", dtype=getattr(torch, dtype), indexer_fp8=dtype == "bfloat16")
    prompts = random_prompts([300, 140, 9, 64], net.cfg.vocab_size, seed=5)   # > index_topk 128: sparse
    out = {}
    for latent_fp8 in (False, True):
        for paged in (False, True):
            eng = Engine(net, EngineConfig(num_blocks=128, block_size=16, chunk_size=128, device="cuda", dtype=dtype,
                                           latent_fp8=latent_fp8, paged_kernels=paged))
            assert eng.runner.paged == paged
            out[latent_fp8, paged] = [r.token_ids for r in eng.generate(prompts, GREEDY)]
            if paged:
                assert eng.runner.graphs is not None and eng.runner.graphs.graphs
            assert eng.blocks_used == 0
    if dtype == "float32":
        refs = [greedy_reference(net, p, GREEDY.max_tokens) for p in prompts]
        assert out[False, True] == refs and out[False, False] == refs
        # FP8 latents: the paged kernel (reading 656-byte-format entries in place) agrees with the spans
        # path over the same rounded entries
        assert out[True, True] == out[True, False]
    else:  # bf16: kernels and references round differently (greedy paths may part): runs, and the first
        # tokens mostly agree
        for key in ((False, True), (True, True)):
            assert all(len(t) == GREEDY.max_tokens for t in out[key])
            assert sum(a[0] == b[0] for a, b in zip(out[key], out[key[0], False])) >= 3, key
