"""The fused speculative step (engine/spec_step.py): the whole MTP step as one tensor program, run
eagerly on CPU (the paged kernels' references) and from one CUDA graph on GPU.

References: greedy decoding without MTP (lossless), the per-phase path of runner.py (same drafts, same
acceptance, same random consumption), naive Python versions of the relaxed-acceptance rule."""

from __future__ import annotations

import math

import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.spec_step import RelaxedAcceptance, relaxed_accept, thinking_after, thinking_states

from .conftest import random_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(net, **kw) -> Engine:
    base = dict(num_blocks=128, block_size=8, chunk_size=16, max_batch_tokens=128, paged_kernels=True)
    base.update(kw)
    return Engine(net, EngineConfig(**base))


def per_phase(eng: Engine) -> Engine:
    """The same engine with the fused step off: runner.py's per-phase path (the reference)."""
    eng.runner.spec = None
    return eng


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_equals_decoding_without_mtp(predictable_net, k) -> None:
    net = predictable_net
    prompts = random_prompts([6, 35, 18, 70, 9], net.cfg.vocab_size, seed=11)
    # different lengths: requests finish at different steps, some with max_tokens reached mid-draft
    plist = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (3, 17, 20, 8, 11)]
    base = make_engine(net, paged_kernels=False).generate(prompts, plist)
    eng = make_engine(net, mtp_draft_tokens=k)
    res = eng.generate(prompts, plist)
    assert [r.token_ids for r in res] == [r.token_ids for r in base]
    assert [len(r.token_ids) for r in res] == [p.max_tokens for p in plist]
    assert eng.runner.spec is not None and eng.runner.spec.steps > 0  # the fused step ran
    # accounting: the per-phase path drafts and accepts the same tokens
    ref = per_phase(make_engine(net, mtp_draft_tokens=k)).generate(prompts, plist)
    assert [(r.draft_tokens, r.accepted_draft_tokens) for r in res] == [
        (r.draft_tokens, r.accepted_draft_tokens) for r in ref
    ]
    accepted = sum(r.accepted_draft_tokens for r in res)
    assert 0 < accepted < sum(r.draft_tokens for r in res)
    assert eng.stats.accepted_draft_tokens == accepted
    assert eng.blocks_used == 0


@pytest.mark.parametrize("k", [2, 3])
def test_stop_tokens_inside_accepted_drafts(predictable_net, k) -> None:
    """A stop token among a step's accepted drafts ends the request there, as without MTP."""
    net = predictable_net
    prompts = random_prompts([12, 30, 7], net.cfg.vocab_size, seed=3)
    free = make_engine(net, paged_kernels=False).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    )
    eng = make_engine(net, mtp_draft_tokens=k)
    hits = 0
    for p, f in zip(prompts, free):
        stop = f.token_ids[9]  # a token the greedy continuation emits: stop there (or earlier)
        params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop])
        want = f.token_ids[: f.token_ids.index(stop) + 1]
        got = eng.generate([p], params)[0]
        assert got.token_ids == want and got.finish_reason == "stop"
        hits += got.accepted_draft_tokens > 0
    assert hits > 0
    assert eng.blocks_used == 0


@pytest.mark.parametrize("k", [1, 3])
def test_seeded_sampling_equals_the_per_phase_path(predictable_net, k) -> None:
    """Same seeds: the fused step draws the same randomness in the same order and applies the same
    (lossless, tests/engine/test_speculative.py) rule, so it emits the per-phase path's tokens."""
    net = predictable_net
    prompts = random_prompts([8, 21, 15, 30], net.cfg.vocab_size, seed=5)
    plist = [
        SamplingParams(temperature=0.8, max_tokens=14, seed=1, ignore_eos=True),
        SamplingParams(temperature=1.0, top_k=5, max_tokens=12, seed=2, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0.7, top_p=0.8, min_p=0.05, max_tokens=16, seed=3, ignore_eos=True),
    ]
    eng = make_engine(net, mtp_draft_tokens=k)
    res = eng.generate(prompts, plist)
    assert eng.runner.spec is not None and eng.runner.spec.steps > 0
    ref = per_phase(make_engine(net, mtp_draft_tokens=k)).generate(prompts, plist)
    assert [r.token_ids for r in res] == [r.token_ids for r in ref]
    assert [r.accepted_draft_tokens for r in res] == [r.accepted_draft_tokens for r in ref]
    assert sum(r.accepted_draft_tokens for r in res) > 0
    assert eng.blocks_used == 0


def test_ineligible_requests_take_the_per_phase_path(predictable_net) -> None:
    """A request with a penalty (or logprobs) sends its steps through runner.py's per-phase path."""
    net = predictable_net
    prompts = random_prompts([10, 14], net.cfg.vocab_size, seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3)
    base = make_engine(net, paged_kernels=False).generate(prompts, params)
    eng = make_engine(net, mtp_draft_tokens=2)
    assert [r.token_ids for r in eng.generate(prompts, params)] == [r.token_ids for r in base]
    assert eng.runner.spec is not None and eng.runner.spec.steps == 0


# ---- relaxed acceptance ----------------------------------------------------------------------
def test_relaxed_rule_matches_a_naive_reference() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, v = 6, 3, 40
    logits = torch.randn(b, k, v, generator=g) * 2
    logits[0, 0, 3] = logits[0, 0, 4] = logits[0, 0].max() + 1  # a tie at the top
    drafts = torch.randint(0, v, (b, k), generator=g)
    drafts[0, 0] = 4
    for topk, delta in ((1, 0.0), (3, 0.5), (5, 2.0), (v, math.inf)):
        got = relaxed_accept(logits, drafts, topk, delta)
        lp = torch.log_softmax(logits, dim=-1).tolist()
        for i in range(b):
            for j in range(k):
                row, d = lp[i][j], int(drafts[i, j])
                above = sum(x > row[d] for x in row)
                want = above < topk and row[d] >= max(row) - delta
                assert bool(got[i, j]) == want, (topk, delta, i, j)


def test_thinking_states_follow_the_drafts() -> None:
    s, e = 5, 6
    drafts = torch.tensor([[1, 6, 2], [5, 1, 1], [6, 5, 1], [1, 2, 3]])
    state0 = torch.tensor([True, False, True, False])
    got = thinking_states(drafts, state0, s, e).tolist()
    for i in range(4):
        want = [thinking_after(drafts[i, :j].tolist(), s, e, bool(state0[i])) for j in range(3)]
        assert got[i] == want
    assert thinking_after([1, 5, 2, 6, 3], s, e) is False and thinking_after([6, 5, 2], s, e) is True


def _relaxed_engine(net, k: int, topk: int, delta: float) -> Engine:
    return make_engine(net, mtp_draft_tokens=k, mtp_relaxed_topk=topk, mtp_relaxed_delta=delta, think_token_ids=(5, 6))


def test_relaxed_acceptance_off_or_outside_thinking_is_exact(predictable_net) -> None:
    net = predictable_net
    prompts = random_prompts([10, 25], net.cfg.vocab_size, seed=2)
    prompts = [[t for t in p if t not in (5, 6)] for p in prompts]  # no <think>: exact everywhere
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[5])
    base = make_engine(net, paged_kernels=False).generate(prompts, params)
    for eng in (make_engine(net, mtp_draft_tokens=2), _relaxed_engine(net, 2, 50, 100.0)):
        assert [r.token_ids for r in eng.generate(prompts, params)] == [r.token_ids for r in base]
    with pytest.raises(ValueError, match="think_token_ids"):
        make_engine(net, mtp_draft_tokens=1, mtp_relaxed_topk=2)


@pytest.mark.parametrize("k", [1, 3])
def test_relaxed_acceptance_inside_thinking_accepts_exactly_the_rule(predictable_net, k) -> None:
    """Inside <think>: every emitted token satisfies the rule against cache-free scoring of its prefix,
    some are not the argmax (drafts accepted by the relaxation); after </think> tokens are exact."""
    net = predictable_net
    topk, delta = 4, 1.5
    prompts = [[t for t in p if t not in (5, 6)] + [5] for p in random_prompts([9, 20], net.cfg.vocab_size, seed=7)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    eng = _relaxed_engine(net, k, topk, delta)
    res = eng.generate(prompts, params)
    # the per-phase path (steps that also prefill, ineligible requests) applies the same rule
    ref = per_phase(_relaxed_engine(net, k, topk, delta)).generate(prompts, params)
    assert [r.token_ids for r in res] == [r.token_ids for r in ref]
    assert [r.accepted_draft_tokens for r in res] == [r.accepted_draft_tokens for r in ref]
    relaxed_taken = 0
    for p, r in zip(prompts, res):
        seq = p + r.token_ids
        lp = torch.log_softmax(net.score(torch.tensor(seq)), dim=-1)
        for i in range(len(p), len(seq)):
            row, t = lp[i - 1], seq[i]
            best = int(row.argmax())
            if thinking_after(seq[:i], 5, 6) and t != best:
                relaxed_taken += 1
                assert int((row > row[t]).sum()) < topk and float(row[t]) >= float(row.max()) - delta - 1e-5
            elif not thinking_after(seq[:i], 5, 6):
                assert t == best
    assert relaxed_taken > 0
    assert eng.blocks_used == 0


def test_relaxed_engine_option_validation() -> None:
    with pytest.raises(ValueError):
        RelaxedAcceptance(0, 1.0, 5, 6)
    with pytest.raises(ValueError):
        RelaxedAcceptance(2, -1.0, 5, 6)
    with pytest.raises(ValueError):
        EngineConfig(mtp_draft_tokens=1, mtp_relaxed_topk=-1)


# ---- CUDA graphs -----------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [1, 3])
def test_graphs_equal_eager_on_cuda(tmp_path_factory, k) -> None:
    from .test_engine_cuda import _kernel_net  # the shapes the Triton kernels take

    net = _kernel_net(tmp_path_factory, torch.float32)
    prompts = random_prompts([6, 35, 18, 70, 9], net.cfg.vocab_size, seed=4)
    greedy = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (3, 17, 20, 8, 11)]
    sampled = [SamplingParams(temperature=0.9, top_k=20, max_tokens=15, seed=s, ignore_eos=True) for s in range(5)]
    kw = dict(mtp_draft_tokens=k, device="cuda", dtype="float32", max_running=8, block_size=16)
    for plist in (greedy, sampled):
        eager = make_engine(net, cuda_graphs=False, **kw).generate(prompts, plist)
        eng = make_engine(net, **kw)
        eng.warm_up()
        spec = eng.runner.spec
        assert spec is not None
        assert sorted(spec.graphs) == sorted((s, m) for s in spec.sizes for m in (False, True))
        got = eng.generate(prompts, plist)
        assert [r.token_ids for r in got] == [r.token_ids for r in eager]
        assert eng.runner.spec is not None and eng.runner.spec.captures > 0 and eng.runner.spec.steps > 0
        assert eng.graph_stats["graph_misses_after_ready"] == 0
        assert eng.blocks_used == 0


def test_yaml_fields_reach_the_engine_and_the_tokenizer_names_the_think_ids(tiny_checkpoint) -> None:
    from splitserve.deploy.config import ConfigError, parse_config
    from splitserve.deploy.worker_actor import engine_config_for
    from splitserve.engine.runtime import think_token_ids
    from splitserve.model.tokenizer import THINK_END_TOKEN, THINK_START_TOKEN, load_tokenizer

    cfg = parse_config({"decode": {"mtp_draft_tokens": 2, "mtp_relaxed_topk": 3, "mtp_relaxed_delta": 0.5}})
    ecfg = engine_config_for(cfg, "decode")
    assert (ecfg.mtp_relaxed_topk, ecfg.mtp_relaxed_delta) == (3, 0.5)
    assert engine_config_for(cfg, "prefill").mtp_relaxed_topk == 0  # prefill never verifies drafts
    off = engine_config_for(parse_config({"decode": {"mtp_draft_tokens": 2}}), "decode")
    assert off.mtp_relaxed_topk == 0  # off by default
    with pytest.raises(ConfigError) as info:
        parse_config({"decode": {"mtp_relaxed_delta": -1.0}})
    assert [p.path for p in info.value.problems] == ["decode.mtp_relaxed_delta"]
    tok = load_tokenizer(tiny_checkpoint)
    assert think_token_ids(tiny_checkpoint) == (tok.token_to_id(THINK_START_TOKEN), tok.token_to_id(THINK_END_TOKEN))


@pytest.mark.parametrize("k", [1, 2])
def test_padded_batches_as_the_graphs_run_them(predictable_net, k) -> None:
    """CUDA graphs run the step padded to a captured size (padding requests on the scratch block): on a
    CPU the same padded program, run eagerly, gives the unpadded results (greedy and seeded sampling)."""
    net = predictable_net
    prompts = random_prompts([7, 19, 26], net.cfg.vocab_size, seed=9)  # 3 requests pad to 4, then 2, 1
    greedy = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (6, 12, 9)]
    sampled = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=10, seed=s, ignore_eos=True) for s in range(3)]
    for plist in (greedy, sampled):
        ref = make_engine(net, mtp_draft_tokens=k).generate(prompts, plist)
        eng = make_engine(net, mtp_draft_tokens=k)
        spec = eng.runner.spec
        assert spec is not None
        spec.disabled = False  # pad to the graph sizes ...
        spec._try_capture = lambda b, sampling: False  # type: ignore[method-assign]  # ... and run eagerly
        res = eng.generate(prompts, plist)
        assert [r.token_ids for r in res] == [r.token_ids for r in ref]
        assert [r.accepted_draft_tokens for r in res] == [r.accepted_draft_tokens for r in ref]
        assert eng.blocks_used == 0


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_disaggregated_handoff_through_the_fused_step(predictable_net, temperature) -> None:
    """Prefill on one engine, decode on another (one pending MTP position after adopt_prefilled): the
    decode side's fused steps give what one engine gives."""
    from .test_handoff import handoff

    net = predictable_net
    p = random_prompts([27], net.cfg.vocab_size, seed=13)[0]
    params = SamplingParams(temperature=temperature, max_tokens=14, ignore_eos=True, seed=4)
    ref = make_engine(net, mtp_draft_tokens=2).generate([p], params)[0].token_ids
    a, b = make_engine(net, mtp_draft_tokens=2), make_engine(net, mtp_draft_tokens=2)
    assert handoff(a, b, "h-0", p, params) == ref
    assert b.runner.spec is not None and b.runner.spec.steps > 0
    assert a.blocks_used == 0 and b.blocks_used == 0


def test_relaxed_acceptance_extremes(predictable_net) -> None:
    """Inside <think> (never closed here): with top-N = V and an infinite delta every draft is accepted;
    with top-1 and delta 0 the rule is exact acceptance (the output equals decoding without MTP)."""
    net = predictable_net
    v = net.cfg.vocab_size
    prompts = [[t for t in p if t != 5] + [5] for p in random_prompts([9, 20], v, seed=17)]
    params = SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True)
    cfg = dict(mtp_draft_tokens=3, think_token_ids=(5, v))  # </think> outside the vocabulary: never emitted
    res = make_engine(net, mtp_relaxed_topk=v, mtp_relaxed_delta=math.inf, **cfg).generate(prompts, params)
    assert all(r.accepted_draft_tokens == r.draft_tokens > 0 for r in res)
    base = make_engine(net, paged_kernels=False).generate(prompts, params)
    exact = make_engine(net, mtp_relaxed_topk=1, mtp_relaxed_delta=0.0, **cfg).generate(prompts, params)
    assert [r.token_ids for r in exact] == [r.token_ids for r in base]
