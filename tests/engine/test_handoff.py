"""The engine's disaggregation hooks, in one process: a prefill_only request on engine A, its cache
blocks copied into blocks reserved on engine B, B adopts it and decodes. The output equals one engine
doing everything (same seed), with MTP on and off, and both engines end with every block free."""

from __future__ import annotations

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams

from .conftest import random_prompts


def handoff(a: Engine, b: Engine, rid: str, prompt: list[int], params: SamplingParams) -> list[int]:
    req = a.add_request(rid, prompt, params, prefill_only=True)
    out = None
    while out is None:
        for o in a.step():
            if o.request_id == rid and o.finished:
                out = o
    assert out.finish_reason == "prefilled" and len(out.new_token_ids) == 1
    assert not a.has_work  # a prefilled request is not decoded by the prefill engine
    blocks = b.reserve(len(prompt) + 1 + b.mtp_k)
    n = -(-len(prompt) // a.cfg.block_size)
    for src, dst in zip(a.pool.pools(), b.pool.pools()):
        dst[blocks[:n]] = src[req.block_table[:n]]
    if a.mtp_cache:
        assert req.mtp_computed == len(prompt) - 1 and req.pending_hidden.shape[0] == 1
    hidden = req.pending_hidden[-1] if req.pending_hidden is not None else None
    b.adopt_prefilled(rid, prompt, params, blocks, out.new_token_ids[0], None, hidden, req.generator.get_state())
    a.release_prefilled(rid)
    toks = list(out.new_token_ids)
    done = False
    while not done:
        for o in b.step():
            if o.request_id == rid:
                toks += o.new_token_ids
                done = o.finished
    return toks


@pytest.mark.parametrize("k,temperature", [(0, 0.0), (0, 0.9), (2, 0.0), (2, 0.9)])
def test_prefill_then_adopt_equals_one_engine(predictable_net, k, temperature) -> None:
    cfg = EngineConfig(num_blocks=64, block_size=8, chunk_size=16, max_batch_tokens=64, mtp_draft_tokens=k)
    params = SamplingParams(temperature=temperature, max_tokens=16, ignore_eos=True, seed=11)
    prompts = random_prompts([7, 33, 50], predictable_net.cfg.vocab_size, seed=21)
    ref = Engine(predictable_net, cfg).generate(prompts, params)
    a, b = Engine(predictable_net, cfg), Engine(predictable_net, cfg)
    for i, p in enumerate(prompts):
        assert handoff(a, b, f"r{i}", p, params) == ref[i].token_ids
    assert a.blocks_used == 0 and b.blocks_used == 0


def test_prefill_side_prefix_cache_serves_the_handoff(predictable_net) -> None:
    cfg = EngineConfig(num_blocks=64, block_size=8, chunk_size=16, mtp_draft_tokens=1)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    base = random_prompts([40], predictable_net.cfg.vocab_size, seed=3)[0]
    p1, p2 = base + [5, 6], base + [7, 8, 9]
    ref = Engine(predictable_net, cfg).generate([p2], params)[0].token_ids
    a, b = Engine(predictable_net, cfg), Engine(predictable_net, cfg)
    handoff(a, b, "first", p1, params)
    assert handoff(a, b, "second", p2, params) == ref
    assert a.stats.prefill_tokens < len(p1) + len(p2)  # the shared prefix was not recomputed
    assert a.blocks_used == 0 and b.blocks_used == 0


@pytest.mark.parametrize("stop_first", [False, True])
def test_prefill_only_finishing_at_its_first_token_keeps_its_blocks_for_the_owner(predictable_net, stop_first) -> None:
    """max_tokens 1 (length) or a stop token on the first token: the output carries the real finish
    reason and the first token, and the blocks stay until release_prefilled, then are all free."""
    cfg = EngineConfig(num_blocks=64, block_size=8, chunk_size=16, mtp_draft_tokens=1)
    prompt = random_prompts([30], predictable_net.cfg.vocab_size, seed=5)[0]
    greedy = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    first = Engine(predictable_net, cfg).generate([prompt], greedy)[0].token_ids[0]
    params = (
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=(first,))
        if stop_first
        else greedy
    )
    a = Engine(predictable_net, cfg)
    req = a.add_request("r", prompt, params, prefill_only=True)
    outs = []
    while not outs:
        outs = [o for o in a.step() if o.finished]
    assert [(o.finish_reason, o.new_token_ids) for o in outs] == [("stop" if stop_first else "length", [first])]
    assert a.blocks_used == len(req.block_table) == -(-(len(prompt) + 1) // cfg.block_size)
    assert not a.has_work and a.step() == []  # reported once, not again every step
    a.release_prefilled("r")
    assert a.blocks_used == 0


def test_preemption_never_takes_the_blocks_of_a_prefilled_request(predictable_net) -> None:
    """A prefilled request's blocks may be on their way to a decode worker: when a decoding request runs
    out of cache, the scheduler preempts that request (it waits), never the prefilled one."""
    cfg = EngineConfig(num_blocks=8, block_size=8, chunk_size=8, max_batch_tokens=8, mtp_draft_tokens=0)
    p1, p2 = random_prompts([10, 20], predictable_net.cfg.vocab_size, seed=9)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)  # 50 tokens: 7 blocks
    ref = Engine(predictable_net, cfg).generate([p1], long)[0].token_ids
    a = Engine(predictable_net, cfg)
    a.add_request("dec", p1, long)
    a.step()
    held = a.add_request("held", p2, SamplingParams(temperature=0.0, max_tokens=1), prefill_only=True)
    toks: list[int] = []
    while not held.is_finished:
        toks += [t for o in a.step() if o.request_id == "dec" for t in o.new_token_ids]
    pinned = list(held.block_table)
    assert len(pinned) == 3 and a.scheduler.running[-1] is held
    for _ in range(40):  # "dec" outgrows the 5 blocks left: it is preempted, "held" keeps its blocks
        toks += [t for o in a.step() if o.request_id == "dec" for t in o.new_token_ids]
        assert held.block_table == pinned and held.is_finished
    assert a.scheduler.num_preemptions >= 1 and len(toks) < 40
    a.release_prefilled("held")  # its blocks come back: "dec" recomputes and finishes as one engine would
    done = False
    while not done:
        for o in a.step():
            if o.request_id == "dec":
                toks += o.new_token_ids
                done = o.finished
    assert toks == ref and a.blocks_used == 0
