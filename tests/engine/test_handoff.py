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
