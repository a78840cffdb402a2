"""The engine against cache-free scoring: paged prefill/decode, chunking, batching, preemption,
prefix caching, MTP speculative decoding. Every test ends with every cache block free."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine, RequestError
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import load

from .conftest import greedy_reference, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def make_engine(net, **kw) -> Engine:
    base = dict(num_blocks=96, block_size=8, chunk_size=16, max_batch_tokens=64)
    base.update(kw)
    return Engine(net, EngineConfig(**base))


# paged=True: the rows path (every token a query row over the paged pools, model/attention.py),
# on a CPU through the kernels' PyTorch references; on CUDA the same path runs the Triton kernels.
PAGED = pytest.mark.parametrize("paged", [False, True], ids=["spans", "rows"])


@PAGED
@pytest.mark.parametrize("chunk,block,budget", [(4, 4, 24), (16, 8, 64), (512, 16, 2048)])
def test_greedy_matches_cache_free_scoring(tiny_net, chunk, block, budget, paged) -> None:
    # lengths straddle index_topk (32): sparse attention kicks in while generating
    prompts = random_prompts([3, 29, 45, 70], tiny_net.cfg.vocab_size, seed=chunk)
    eng = make_engine(tiny_net, chunk_size=chunk, block_size=block, max_batch_tokens=budget, paged_kernels=paged)
    res = eng.generate(prompts, GREEDY)
    for r, p in zip(res, prompts):
        assert r.token_ids == greedy_reference(tiny_net, p, GREEDY.max_tokens)
    assert eng.blocks_used == 0


@PAGED
def test_paged_logprobs_equal_scoring_logits(tiny_net, paged) -> None:
    """Prompt logprobs (paged chunked prefill) and generated-token logprobs (paged absorbed decode)
    equal log_softmax of cache-free scoring of the final sequence."""
    prompts = random_prompts([37, 12, 50], tiny_net.cfg.vocab_size, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    eng = make_engine(tiny_net, chunk_size=8, paged_kernels=paged)
    for r in eng.generate(prompts, params):
        full = torch.tensor(r.prompt_ids + r.token_ids)
        ref = torch.log_softmax(tiny_net.score(full), -1)
        assert r.prompt_logprobs[0] is None
        for j in range(1, len(r.prompt_ids)):
            assert r.prompt_logprobs[j].logprob == pytest.approx(ref[j - 1, full[j]].item(), abs=1e-4)
        for i, lp in enumerate(r.logprobs):
            pos = len(r.prompt_ids) + i
            assert lp.token_id == full[pos].item()
            assert lp.logprob == pytest.approx(ref[pos - 1, full[pos]].item(), abs=1e-4)
            assert [t for t, _ in lp.top] == ref[pos - 1].topk(2).indices.tolist()
    assert eng.blocks_used == 0


@PAGED
def test_fp8_indexer_cache_matches_fp8_scoring(tiny_checkpoint, paged) -> None:
    net = load(tiny_checkpoint, indexer_fp8=True)
    prompts = random_prompts([40, 66], net.cfg.vocab_size, seed=5)
    eng = make_engine(net, chunk_size=16, paged_kernels=paged)
    for r, p in zip(eng.generate(prompts, GREEDY), prompts):
        assert r.token_ids == greedy_reference(net, p, GREEDY.max_tokens)
    assert eng.pool.iscale is not None and eng.blocks_used == 0


def test_seeded_sampling_is_batch_invariant(tiny_net) -> None:
    prompts = random_prompts([20, 33, 7, 51], tiny_net.cfg.vocab_size, seed=1)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, ignore_eos=True, seed=1234)
    alone = make_engine(tiny_net).generate([prompts[1]], params)[0].token_ids
    for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
        eng = make_engine(tiny_net, chunk_size=8)
        batch = [prompts[i] for i in order]
        ps = [SamplingParams(temperature=0.7, max_tokens=9, seed=i) if i != 1 else params for i in order]
        res = eng.generate(batch, ps)
        assert res[order.index(1)].token_ids == alone
        assert eng.blocks_used == 0


def test_preemption_and_recompute_give_the_same_output(tiny_net) -> None:
    prompts = random_prompts([30, 30, 30, 30], tiny_net.cfg.vocab_size, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    roomy = make_engine(tiny_net).generate(prompts, params)
    tight = make_engine(tiny_net, num_blocks=20, block_size=8, prefix_cache=False)
    res = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [r.token_ids for r in res] == [r.token_ids for r in roomy]
    assert tight.blocks_used == 0


def test_prefix_cache_hits_give_identical_results(tiny_net) -> None:
    vocab = tiny_net.cfg.vocab_size
    shared = random_prompts([40], vocab, seed=9)[0]
    tails = random_prompts([5, 9], vocab, seed=10)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    eng = make_engine(tiny_net)
    first = eng.generate([shared + tails[0]], params)[0]
    second = eng.generate([shared + tails[1]], params)[0]
    assert first.num_cached_prompt == 0 and second.num_cached_prompt == 40  # 5 full blocks of 8
    cold = make_engine(tiny_net, prefix_cache=False).generate([shared + tails[1]], params)[0]
    assert second.token_ids == cold.token_ids
    for a, b in zip(second.logprobs, cold.logprobs):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
    assert eng.blocks_used == 0


def test_whole_prompt_cached_still_computes_its_last_token(tiny_net) -> None:
    p = random_prompts([32], tiny_net.cfg.vocab_size, seed=11)[0]
    eng = make_engine(tiny_net)
    a = eng.generate([p], GREEDY)[0]
    b = eng.generate([p], GREEDY)[0]
    assert b.num_cached_prompt == 24 and a.token_ids == b.token_ids
    assert eng.blocks_used == 0


@PAGED
@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_greedy_is_lossless(predictable_net, k, paged) -> None:
    prompts = random_prompts([6, 35, 18, 70], predictable_net.cfg.vocab_size, seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    base = make_engine(predictable_net, mtp_draft_tokens=0).generate(prompts, params)
    eng = make_engine(predictable_net, mtp_draft_tokens=k, paged_kernels=paged)
    res = eng.generate(prompts, params)
    assert [r.token_ids for r in res] == [r.token_ids for r in base]
    drafted = sum(r.draft_tokens for r in res)
    accepted = sum(r.accepted_draft_tokens for r in res)
    assert drafted > 0 and 0 < accepted < drafted  # both the accept and the rollback paths ran
    assert eng.stats.accepted_draft_tokens == accepted
    assert eng.blocks_used == 0


def test_mtp_with_preemption_and_prefix_cache(predictable_net) -> None:
    prompts = random_prompts([30, 30, 30], predictable_net.cfg.vocab_size, seed=6)
    prompts.append(prompts[0][:24] + prompts[1][:6])
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    base = make_engine(predictable_net).generate(prompts, params)
    eng = make_engine(predictable_net, mtp_draft_tokens=2, num_blocks=22)
    res = eng.generate(prompts, params)
    assert [r.token_ids for r in res] == [r.token_ids for r in base]
    assert eng.blocks_used == 0


def test_stop_conditions(tiny_net) -> None:
    p = random_prompts([10], tiny_net.cfg.vocab_size, seed=12)[0]
    free = make_engine(tiny_net).generate([p], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    stop_tok = free.token_ids[4]
    first = free.token_ids.index(stop_tok)
    r = make_engine(tiny_net).generate([p], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_tok,)))[0]
    assert r.token_ids == free.token_ids[: first + 1] and r.finish_reason == "stop"
    r = make_engine(tiny_net).generate([p], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
    assert len(r.token_ids) == 3 and r.finish_reason == "length"


def test_bad_requests_are_refused(tiny_net) -> None:
    eng = make_engine(tiny_net, num_blocks=4, block_size=8)
    with pytest.raises(RequestError, match="empty"):
        eng.add_request("a", [], GREEDY)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.add_request("b", [5, tiny_net.cfg.vocab_size], GREEDY)
    with pytest.raises(RequestError, match="cache blocks"):
        eng.add_request("c", list(range(2, 60)), GREEDY)
    assert eng.blocks_used == 0


def test_cache_exhaustion_alone_finishes_with_length(tiny_net) -> None:
    eng = make_engine(tiny_net, num_blocks=3, block_size=8)
    r = eng.generate([list(range(2, 12))], SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))[0]
    # 24 cache slots hold the prompt and all but the last generated token
    assert r.finish_reason == "length" and len(r.token_ids) == 3 * 8 - 10 + 1
    assert eng.blocks_used == 0


def test_fp8_latent_cache_equals_scoring_over_fp8_rounded_latents(tiny_net) -> None:
    """FP8 latent cache (e4m3 + one fp32 scale per group, rope in bf16) gives the logits of cache-free
    scoring whose cache entries went through the same rounding (computed here independently)."""
    from splitserve.model import DenseStore, ForwardBatch
    from splitserve.kernels import act_quant

    class RoundedStore(DenseStore):
        def write(self, layer, seq, latent, keys):
            kv = tiny_net.cfg.kv_lora_rank
            q, s = act_quant(latent[:, :kv], kv, ue8m0=False)  # tiny: kv_lora 32 -> one group
            nope = q.float() * s
            rope = latent[:, kv:].to(torch.bfloat16).float()
            super().write(layer, seq, torch.cat([nope, rope], -1).to(latent.dtype), keys)

    prompts = random_prompts([45, 20], tiny_net.cfg.vocab_size, seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    eng = make_engine(tiny_net, latent_fp8=True)
    assert eng.pool.latent.dtype == torch.uint8  # 32 e4m3 + 4 B scale + 16 bf16 rope = 68 B per token
    assert eng.pool.latent.shape[-1] == 32 + 4 + 2 * 16
    for r in eng.generate(prompts, params):
        full = torch.tensor(r.prompt_ids + r.token_ids)
        ref = torch.log_softmax(tiny_net.logits(tiny_net.forward(ForwardBatch.single(full, RoundedStore()))), -1)
        for j in range(1, len(r.prompt_ids)):
            assert r.prompt_logprobs[j].logprob == pytest.approx(ref[j - 1, full[j]].item(), abs=1e-4)
    assert eng.blocks_used == 0


def test_cache_memory_fraction_sizing_rules() -> None:
    from splitserve.engine.cache import blocks_for_memory

    assert blocks_for_memory(10 * 2**30, 0.5, 2**20) == 5 * 1024
    with pytest.raises(ValueError, match="holds no cache block"):
        blocks_for_memory(2**20, 0.5, 2**20)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        EngineConfig(cache_memory_fraction=1.5, device="cuda")
    with pytest.raises(ValueError, match="set num_blocks"):
        EngineConfig(cache_memory_fraction=0.5, device="cpu")


@pytest.mark.parametrize("k", [0, 2])
def test_warm_up_leaves_the_engine_as_it_was(predictable_net, k) -> None:
    """The warm-up (run before a worker reports ready) leaves no request, block, cached prefix or counter
    behind, and what the engine generates afterwards is what a cold engine generates."""
    net = predictable_net
    cfg = EngineConfig(num_blocks=64, block_size=16, chunk_size=32, mtp_draft_tokens=k)
    prompts = random_prompts([40, 7], net.cfg.vocab_size, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    cold = [r.token_ids for r in Engine(net, cfg).generate(prompts, params)]
    eng = Engine(net, cfg)
    info = eng.warm_up()
    assert info["prefill_lengths"] and info["seconds"] >= 0 and info["graphs"] == 0  # CPU: no graphs
    assert eng.requests == {} and eng.blocks_used == 0 and not eng.blocks.hash_to_block
    assert eng.stats.steps == 0 and eng.stats.requests_done == 0 and not eng.has_work
    assert eng.graph_stats == {"graph_captures": 0, "graph_misses_after_ready": 0}
    assert [r.token_ids for r in eng.generate(prompts, params)] == cold
