"""Tensor and expert parallelism on a CPU: 2 real processes joined by gloo, each loading only its
shard of the checkpoint, against the same network on one rank (fp32).

For TP=2, EP=2 (experts split, attention and dense layers tensor parallel as always) on the tiny and
small presets, cases cover: cache-free logits (decompressed MLA), the engine's greedy generation with
chunked prefill over the paged cache (spans path) and over the rows path (absorbed MLA, paged
kernels' references), and MTP speculative decoding on a network whose drafts are often accepted.
Checked: logits equal one rank's within fp32 rounding; greedy tokens identical; every rank's cache
pools equal one rank's (so the followers' caches are the leader's: only one rank's blocks need to
travel) and the cache-transfer handshake's fields equal one rank's (TP size is not among them); the
MTP cases accepted drafts (the verification path ran)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from splitserve.model import load
from splitserve.model.checkpoint import make_checkpoint
from splitserve.model.parallel import ParallelState, ShardError

from ..tp_workers import FP8_TP, run_case, run_ranks, tp_rank
from .conftest import random_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors; restored after the module

ENGINE = dict(num_blocks=64, block_size=8, chunk_size=16, max_batch_tokens=64)


def _cases(vocab: int, ep: bool) -> list[dict[str, Any]]:
    prompts = random_prompts([5, 40, 21], vocab, seed=7)  # 40 > tiny's index_topk 32: sparse attention
    score_ids = random_prompts([48], vocab, seed=8)[0]
    base = dict(ep=ep, prompts=prompts, score_ids=score_ids, max_tokens=10)
    return [
        {**base, "engine": dict(ENGINE, paged_kernels=False)},
        {**base, "engine": dict(ENGINE, paged_kernels=True)},
        {**base, "engine": dict(ENGINE, paged_kernels=True, mtp_draft_tokens=2), "predictable": True},
        {**base, "engine": dict(ENGINE, paged_kernels=False, mtp_draft_tokens=1), "predictable": True},
    ]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("small", tmp_path_factory.mktemp("small"), seed=1, dtype=torch.float32)


@pytest.mark.parametrize("ep", [False, True], ids=["tp2", "tp2-ep2"])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_two_ranks_equal_one(preset, ep, tiny_checkpoint, small_checkpoint, tmp_path) -> None:
    ckpt = tiny_checkpoint if preset == "tiny" else small_checkpoint
    vocab = load(ckpt, dtype=torch.float32, mtp=False).cfg.vocab_size
    cases = _cases(vocab, ep)
    run_ranks(tp_rank, 2, (str(ckpt), cases, str(tmp_path)), timeout_s=600)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, case in enumerate(cases):
        ref = run_case(load(ckpt, dtype=torch.float32), case)
        lead, follow = ranks[0][i], ranks[1][i]
        for r in (lead, follow):
            torch.testing.assert_close(r["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
            assert len(r["pools"]) == len(ref["pools"])
            # every request block equal; the scratch block after them (index num_blocks) holds throw-away
            # padding writes, which the single-rank fused MTP step makes and a TP worker's per-phase path does not
            n = ENGINE["num_blocks"]
            for got, want in zip(r["pools"], ref["pools"]):
                torch.testing.assert_close(got[:n], want[:n], rtol=1e-4, atol=1e-4)
        assert lead["tokens"] == ref["tokens"], f"case {i}: greedy tokens differ from one rank's"
        # a TP-2 worker's cache transfers to and from a TP-1 worker: the handshake sees the same fields
        assert lead["compat"] == ref["compat"]
        assert follow["follower_calls"] > 0
        if case["engine"].get("mtp_draft_tokens"):
            assert lead["accepted"] == ref["accepted"] > 0


@pytest.fixture(scope="module")
def fp8_tp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(FP8_TP, tmp_path_factory.mktemp("fp8tp"), seed=3, fp8=True)


def test_fp8_weights_two_ranks_equal_one(fp8_tp_checkpoint, tmp_path) -> None:
    """FP8 weights kept in e4m3 (128x128 block scales sliced with them; the CPU runs the FP8 kernels'
    references): TP2 and TP2 with EP equal one rank."""
    ckpt = fp8_tp_checkpoint
    vocab = FP8_TP.vocab_size
    cases = [
        {**c, "load": {"fp8_weights": True}}
        for ep in (False, True)
        for c in _cases(vocab, ep)[1:2]  # rows path, no MTP
    ]
    run_ranks(tp_rank, 2, (str(ckpt), cases, str(tmp_path)), timeout_s=600)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref = run_case(load(ckpt, dtype=torch.float32, fp8_weights=True), cases[0])
    for i in range(len(cases)):
        for r in ranks:
            torch.testing.assert_close(r[i]["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
        assert ranks[0][i]["tokens"] == ref["tokens"]


def test_shard_sizes_and_errors(tiny_checkpoint) -> None:
    """A rank's network holds its share only; sizes that do not divide fail with a clear error."""
    full = load(tiny_checkpoint, dtype=torch.float32)
    cfg = full.cfg
    tp = ParallelState(rank=1, world_size=2)  # sharding arithmetic only: no collective is run
    from splitserve.model.network import DeepseekV32

    with torch.device("meta"):
        half = DeepseekV32(cfg, parallel=tp)
        ep = DeepseekV32(cfg, parallel=tp.with_expert_parallel(True))
    attn, moe_layer = half.model.layers[0].self_attn, cfg.first_k_dense_replace
    assert attn.q_b_proj.weight.shape[0] == full.model.layers[0].self_attn.q_b_proj.weight.shape[0] // 2
    assert attn.o_proj.weight.shape[1] == full.model.layers[0].self_attn.o_proj.weight.shape[1] // 2
    assert attn.q_a_proj.weight.shape == full.model.layers[0].self_attn.q_a_proj.weight.shape
    assert half.model.layers[moe_layer].mlp.w13.shape[1] == cfg.moe_intermediate_size  # 2 * I / 2
    assert ep.model.layers[moe_layer].mlp.w13.shape[0] == cfg.n_routed_experts // 2
    assert half.lm_head.weight.shape[0] == cfg.vocab_size // 2
    with pytest.raises(
        ShardError, match=r"(vocab_size|num_attention_heads) \(\d+\) does not divide by tensor_parallel_size 3"
    ):
        with torch.device("meta"):
            DeepseekV32(cfg, parallel=ParallelState(rank=0, world_size=3))


# The small preset with 32 attention heads (16 per rank: what the sparse MLA kernel takes) and 16
# indexer heads: on a GPU every rank's rows path runs the Triton kernels (indexer top-k, sparse MLA,
# fused MoE on its experts or its slice of each). NCCL refuses two ranks on one device, so the ranks
# share the one GPU over gloo (CUDA tensors; the same code path as NCCL, slower).
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_ranks_on_one_gpu_equal_one(tmp_path_factory, tmp_path) -> None:
    from dataclasses import replace

    from splitserve.model.checkpoint import PRESETS

    cfg = replace(PRESETS["small"], num_attention_heads=32, index_n_heads=16)
    ckpt = make_checkpoint(cfg, tmp_path_factory.mktemp("tp-cuda"), seed=2, dtype=torch.float32)
    prompts = random_prompts([300, 140, 9], cfg.vocab_size, seed=5)  # 300, 140 > index_topk 128
    score_ids = random_prompts([200], cfg.vocab_size, seed=6)[0]
    eng = dict(num_blocks=96, block_size=16, chunk_size=128, device="cuda", dtype="float32")
    base = dict(prompts=prompts, score_ids=score_ids, max_tokens=12)
    cases = [
        {**base, "ep": ep, "engine": dict(eng, mtp_draft_tokens=k), "predictable": k > 0}
        for ep in (False, True)
        for k in (0, 2)
    ]
    run_ranks(tp_rank, 2, (str(ckpt), cases, str(tmp_path), "cuda"), timeout_s=900)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, case in enumerate(cases):
        ref = run_case(load(ckpt, device="cuda", dtype=torch.float32), case)
        for r in ranks:
            torch.testing.assert_close(r[i]["logits"], ref["logits"].cpu(), rtol=1e-4, atol=1e-4)
            for got, want in zip(r[i]["pools"], ref["pools"]):  # request blocks (not the scratch block)
                n = eng["num_blocks"]
                torch.testing.assert_close(got[:n], want[:n].cpu(), rtol=1e-4, atol=1e-4)
        assert ranks[0][i]["tokens"] == ref["tokens"], f"case {i}"
        if case["predictable"]:
            assert ranks[0][i]["accepted"] == ref["accepted"] > 0


def test_cli_generate_tensor_parallel_same_text(tiny_checkpoint) -> None:
    """`splitserve generate --tensor-parallel-size 2` (and with --expert-parallel), MTP on: the same greedy
    tokens and text as one rank; the follower process exits with the leader."""
    import json
    import subprocess
    import sys

    def gen(*extra: str) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "splitserve.deploy.cli", "generate", "--model", str(tiny_checkpoint)]
        cmd += ["--prompt", "def fib(n):", "--max-tokens", "12", "--mtp", "2", "--json", *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout)

    one = gen()
    assert len(one["token_ids"]) == 12
    for extra in (("--tensor-parallel-size", "2"), ("--tensor-parallel-size", "2", "--expert-parallel")):
        out = gen(*extra)
        assert (out["token_ids"], out["text"]) == (one["token_ids"], one["text"]), extra
