"""FP8 weights and the FP8 latent cache inside the engine on a GPU (skipped without CUDA): the small
preset with kernel-sized heads, its FP8 checkpoint loaded with the weights kept e4m3, so the block-scaled
FP8 GEMM, the FP8 grouped MoE and the sparse MLA kernel's FP8 read all run (Triton, CUDA graphs).

What is compared, and why not logits: FP8 activations (act_quant per 1x128 group) make this random
network chaotic. On the CPU references, relative noise of 1e-7 on every FP8 GEMM output moves the
greedy token's logprob by 0.09 (median) and the logits by >10%; noise of 1e-6 moves them by 14%, the
same order as switching activation quantisation off (33%), while without activation quantisation the
same noise moves them by 4e-6 (bench/fp8_diagnose.py's docstring). So GPU-vs-CPU logits, or the paged
rows path vs the spans path, differ by ~30% with correct kernels too (0.28 was measured on an H200).
Instead every FP8 kernel call made inside the network is checked against its reference on the same
inputs (bench.fp8_diagnose.KernelCheck), which names the kernel, shape and launch path at fault."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from splitserve.bench.fp8_diagnose import TOL, KernelCheck, rel
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels import _common
from splitserve.model import load
from splitserve.model.checkpoint import PRESETS, make_checkpoint
from splitserve.model.linear import FP8Linear

from .conftest import random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def fp8_path(tmp_path_factory):
    cfg = replace(PRESETS["small"], num_attention_heads=16, index_n_heads=16)
    return make_checkpoint(cfg, tmp_path_factory.mktemp("kernel-shaped-fp8"), seed=0, fp8=True)


def _assert_checked(chk: KernelCheck, dtype: torch.dtype, kernels: set[str]) -> None:
    print(chk.table())
    missing = kernels - {k for k, _ in chk.worst}
    assert not missing, f"never called: {missing}\n{chk.table()}"
    bad = chk.failures(TOL[dtype])
    assert not bad, "FP8 kernel calls that disagree with their references:\n" + "\n".join(bad) + "\n" + chk.table()


def test_fp8_kernels_in_the_network_equal_the_references(fp8_path) -> None:
    gpu = load(fp8_path, device="cuda", dtype=torch.float32)  # default on CUDA: weights stay FP8
    assert isinstance(gpu.model.layers[0].self_attn.q_b_proj, FP8Linear) and gpu.weight_bytes()["fp8"] > 0
    gpu.fuse_weights()
    ids = torch.tensor(random_prompts([200], gpu.cfg.vocab_size, seed=4)[0])
    chk = KernelCheck()
    with chk.active():
        a = gpu.score(ids.cuda()).cpu()
    _assert_checked(chk, torch.float32, {"fp8_linear", "fused_moe_fp8"})
    assert torch.isfinite(a).all()
    # for the record only (see the module docstring): the CPU references' logits
    cpu = load(fp8_path, device="cpu", dtype=torch.float32, fp8_weights=True)
    b = cpu.score(ids)
    print(
        f"Triton vs CPU references, whole network (chaotic under FP8 activations): logits rel {rel(a, b):.2e}, "
        f"argmax agreement {(a.argmax(-1) == b.argmax(-1)).float().mean():.3f}"
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_fp8_weights_and_fp8_latents(fp8_path, dtype) -> None:
    """The paged rows path (FP8 GEMMs at prefill and decode sizes, FP8 MoE, sparse MLA over bf16 or FP8
    latents): every kernel call checked against its reference on the same inputs (eager steps), then the
    same requests with CUDA graphs: the graphs are captured and, the prefill being the same kernels on the
    same inputs, the first tokens are identical."""
    tdtype = getattr(torch, dtype)
    net = load(fp8_path, device="cuda", dtype=tdtype, indexer_fp8=dtype == "bfloat16")
    assert isinstance(net.model.layers[0].mlp.down_proj, FP8Linear) and net.model.layers[1].mlp.fp8
    prompts = random_prompts([300, 140, 9, 64], net.cfg.vocab_size, seed=5)  # > index_topk 128: sparse
    for latent_fp8 in (False, True):
        base = dict(num_blocks=128, block_size=16, chunk_size=128, device="cuda", dtype=dtype, latent_fp8=latent_fp8)
        chk = KernelCheck()
        eng = Engine(net, EngineConfig(**base, cuda_graphs=False))
        assert eng.runner.paged  # the default on CUDA, FP8 latents included
        with chk.active():
            eager = [r.token_ids for r in eng.generate(prompts, GREEDY)]
        assert eng.blocks_used == 0
        print(f"{dtype} latent_fp8={latent_fp8}")
        _assert_checked(
            chk,
            tdtype,
            # the FP8 indexer's query quantisation: act_quant, or inside the fused index_query kernel
            # (GLUE_KERNELS; checked against that composition by tests/kernels/test_indexer_query.py)
            {"fp8_linear", "fused_moe_fp8", "sparse_mla"}
            | ({"act_quant"} if dtype == "bfloat16" and not _common.GLUE_KERNELS else set()),
        )
        if latent_fp8:
            assert any("fp8 cache" in s for k, s in chk.worst if k == "sparse_mla")
        eng = Engine(net, EngineConfig(**base))
        graphed = [r.token_ids for r in eng.generate(prompts, GREEDY)]
        assert eng.runner.graphs is not None and eng.runner.graphs.graphs
        assert eng.blocks_used == 0
        assert all(len(t) == GREEDY.max_tokens for t in graphed)
        assert [t[0] for t in graphed] == [t[0] for t in eager]
        same = sum(a == b for x, y in zip(graphed, eager) for a, b in zip(x, y))
        print(f"graphs vs eager: {same}/{sum(map(len, eager))} tokens equal (later ones may part: see the docstring)")
