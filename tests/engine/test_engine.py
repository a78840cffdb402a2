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
    r = make_engine(tiny_net).generate([p], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_tok,)))[
        0
    ]
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


@PAGED
def test_fp8_latent_cache_equals_scoring_over_fp8_rounded_latents(tiny_net, paged) -> None:
    """FP8 latent cache (e4m3 + one fp32 scale per group, rope in bf16) gives the logits of cache-free
    scoring whose cache entries went through the same rounding (computed here independently)."""
    from splitserve.kernels import act_quant
    from splitserve.model import DenseStore, ForwardBatch

    class RoundedStore(DenseStore):
        def write(self, layer, seq, latent, keys):
            kv = tiny_net.cfg.kv_lora_rank
            q, s = act_quant(latent[:, :kv], kv, ue8m0=False)  # tiny: kv_lora 32 -> one group
            nope = q.float() * s
            rope = latent[:, kv:].to(torch.bfloat16).float()
            super().write(layer, seq, torch.cat([nope, rope], -1).to(latent.dtype), keys)

    prompts = random_prompts([45, 20], tiny_net.cfg.vocab_size, seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    eng = make_engine(tiny_net, latent_fp8=True, paged_kernels=paged)  # rows: the sparse MLA kernel's FP8 read
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


# ---- logit_bias -------------------------------------------------------------------------------


def _biased_reference(net, prompt: list[int], n: int, bias: dict[int, float]) -> tuple[list[int], list[float]]:
    """Greedy continuation of cache-free scoring with `bias` added to every step's logits, and the
    chosen tokens' logprobs under log_softmax(logits + bias)."""
    ids, lps = list(prompt), []
    b = torch.zeros(net.cfg.vocab_size)
    for t, x in bias.items():
        b[t] = x
    for _ in range(n):
        x = net.score(torch.tensor(ids))[-1].float() + b
        t = int(x.argmax())
        ids.append(t)
        lps.append(torch.log_softmax(x.double(), -1)[t].item())
    return ids[len(prompt) :], lps


def _banning(free: list[list[int]], extra: dict[int, float]) -> dict[int, float]:
    """A bias that bans the first two tokens every unbiased continuation starts with, plus `extra`."""
    bias = {t: -100.0 for out in free for t in out[:2]}
    bias.update(extra)
    return bias


@PAGED
def test_logit_bias_greedy_and_logprobs_match_biased_scoring(tiny_net, paged) -> None:
    prompts = random_prompts([9, 40], tiny_net.cfg.vocab_size, seed=21)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1)
    free = [r.token_ids for r in make_engine(tiny_net, paged_kernels=paged).generate(prompts, params)]
    bias = _banning(free, {5: 1.5, 17: -0.5})
    eng = make_engine(tiny_net, paged_kernels=paged)
    res = eng.generate(
        prompts, [params, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=1, logit_bias=bias)]
    )
    assert res[0].token_ids == free[0]  # batched with a biased request, an unbiased one is unchanged
    ref, ref_lps = _biased_reference(tiny_net, prompts[1], 8, bias)
    assert res[1].token_ids == ref and res[1].token_ids != free[1]
    assert not set(res[1].token_ids) & {t for t, x in bias.items() if x == -100.0}
    assert [lp.logprob for lp in res[1].logprobs] == pytest.approx(ref_lps, abs=1e-4)  # after the bias
    assert eng.blocks_used == 0


def test_logit_bias_out_of_vocabulary_is_refused(tiny_net) -> None:
    eng = make_engine(tiny_net)
    v = tiny_net.cfg.vocab_size
    with pytest.raises(RequestError, match="logit_bias token id"):
        eng.add_request("a", [5, 6], SamplingParams(logit_bias={v: 1.0}))
    with pytest.raises(RequestError, match="logit_bias token id"):
        eng.adopt_prefilled("b", [5, 6], SamplingParams(logit_bias={v + 3: 1.0}), [], 7, None, None)
    assert not eng.requests and eng.blocks_used == 0


def _dense_bias(vocab: int, scale: float, seed: int) -> dict[int, float]:
    """A bias on every token, uniform in [-scale, scale]: it moves the argmax at most steps."""
    g = torch.Generator().manual_seed(seed)
    return {t: round(x, 3) for t, x in enumerate(((torch.rand(vocab, generator=g) * 2 - 1) * scale).tolist())}


@PAGED
@pytest.mark.parametrize("k", [2])
def test_mtp_greedy_with_logit_bias_equals_greedy_without_mtp(predictable_net, k, paged) -> None:
    """MTP stays lossless under a bias: verification is against the biased target, so greedy output
    with drafts equals greedy output without them (a mixed batch: biased and unbiased requests), and
    both equal cache-free scoring with the bias added."""
    net = predictable_net
    prompts = random_prompts([6, 35, 18, 70], net.cfg.vocab_size, seed=22)
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    free = [r.token_ids for r in make_engine(net).generate(prompts, plain)]
    bias = _dense_bias(net.cfg.vocab_size, 3.0, seed=k)
    biased = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logit_bias=bias)
    plist = [biased, plain, biased, biased]
    base = make_engine(net, mtp_draft_tokens=0).generate(prompts, plist)
    eng = make_engine(net, mtp_draft_tokens=k, paged_kernels=paged)
    res = eng.generate(prompts, plist)
    assert [r.token_ids for r in res] == [r.token_ids for r in base]
    assert res[1].token_ids == free[1] and all(base[i].token_ids != free[i] for i in (0, 2, 3))
    assert res[2].token_ids == _biased_reference(net, prompts[2], 20, bias)[0]
    drafted = sum(r.draft_tokens for r in res)
    accepted = sum(r.accepted_draft_tokens for r in res)
    assert drafted > 0 and 0 < accepted < drafted
    assert eng.blocks_used == 0


def test_mtp_drafts_are_biased_too(predictable_net) -> None:
    """Drafts see the request's bias: with +100 on one token every draft is that token and is
    accepted (unbiased drafts would be the model's own guesses, and rejected), greedy or sampled."""
    prompts = random_prompts([12, 30], predictable_net.cfg.vocab_size, seed=23)
    forced = 11
    eng = make_engine(predictable_net, mtp_draft_tokens=2)
    plist = [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logit_bias={forced: 100.0}),
        SamplingParams(temperature=1.0, seed=4, max_tokens=12, ignore_eos=True, logit_bias={forced: 100.0}),
    ]
    for r in eng.generate(prompts, plist):
        assert r.token_ids == [forced] * 12
        assert r.draft_tokens > 0 and r.accepted_draft_tokens == r.draft_tokens
    assert eng.blocks_used == 0


def test_mtp_sampling_never_emits_a_banned_token(predictable_net) -> None:
    """Sampled drafts and the rejection sampler both use the biased distributions: a -100 ban holds
    with MTP on (the banned tokens are the likeliest ones, so they would show up otherwise)."""
    prompts = random_prompts([10, 25, 40], predictable_net.cfg.vocab_size, seed=24)
    hot = SamplingParams(temperature=0.8, seed=1, max_tokens=16, ignore_eos=True)
    free = [r.token_ids for r in make_engine(predictable_net, mtp_draft_tokens=2).generate(prompts, hot)]
    ban = {t for out in free for t in out}
    eng = make_engine(predictable_net, mtp_draft_tokens=2)
    res = eng.generate(
        prompts,
        SamplingParams(temperature=0.8, seed=1, max_tokens=16, ignore_eos=True, logit_bias={t: -100.0 for t in ban}),
    )
    for r in res:
        assert len(r.token_ids) == 16 and not set(r.token_ids) & ban
    assert sum(r.draft_tokens for r in res) > 0


@PAGED
def test_fp8_weights_engine_matches_fp8_scoring(tiny_fp8_checkpoint, paged) -> None:
    """An FP8 checkpoint served with its weights kept FP8 (on a CPU through the FP8 kernels'
    references), fused projections included: the engine's greedy tokens equal cache-free scoring."""
    net = load(tiny_fp8_checkpoint, fp8_weights=True)
    assert net.weight_bytes()["fp8"] > 0
    prompts = random_prompts([40, 9], net.cfg.vocab_size, seed=11)
    eng = make_engine(net, chunk_size=16, paged_kernels=paged)
    for r, p in zip(eng.generate(prompts, GREEDY), prompts):
        assert r.token_ids == greedy_reference(net, p, GREEDY.max_tokens)
    assert eng.blocks_used == 0


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
