"""Tensor-parallel workers in a real cluster (worker processes, real gRPC, TCP cache transfer): a TP-2
prefill worker feeding a TP-1 decode worker and the reverse give the greedy tokens of one engine
(what `splitserve generate` runs), MTP drafting on. Only rank 0's cache blocks travel: a TP-2 decode
worker's leader copies a request's blocks to its follower before admitting it, so the follower's
attention reads the same cache; a TP-2 prefill worker sends its leader's blocks, which equal its
follower's. Every block is free afterwards."""

from __future__ import annotations

import asyncio

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import load

from ..engine.conftest import random_prompts
from .harness import directory_of, start_workers, started_backend, tcp_spec, tp_init
from .test_faults import assert_all_free, run

pytestmark = pytest.mark.timeout(600)

ENGINE = EngineConfig(num_blocks=128, block_size=8, chunk_size=16, max_batch_tokens=64, mtp_draft_tokens=2)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2)], ids=["tp2-prefill", "tp2-decode"])
def test_tp_workers_give_one_engines_tokens(tiny_checkpoint, tmp_path, prefill_tp, decode_tp) -> None:
    specs = [
        tcp_spec(
            tiny_checkpoint,
            wid,
            role,
            ENGINE,
            tensor_parallel_size=tp,
            dist_init_method=tp_init(tmp_path, wid) if tp > 1 else "",
        )
        for wid, role, tp in (("prefill-0", "prefill", prefill_tp), ("decode-0", "decode", decode_tp))
    ]
    workers = start_workers(specs, timeout_s=240)
    try:
        assert [w.info["tensor_parallel_size"] for w in workers] == [prefill_tp, decode_tp]
        prompts = random_prompts([6, 41, 23], 1024, seed=11)  # 41 > index_topk 32: sparse attention

        async def go():
            async with started_backend(directory_of(workers)) as b:
                return await asyncio.gather(*(run(b, f"tp-{i}", p, GREEDY) for i, p in enumerate(prompts)))

        outs = asyncio.run(go())
        want = [r.token_ids for r in Engine(load(tiny_checkpoint), EngineConfig()).generate(prompts, GREEDY)]
        for (toks, reason, err), ref in zip(outs, want):
            assert err is None and reason == "length"
            assert toks == ref
        assert_all_free(workers)
    finally:
        for w in workers:
            w.stop()
        assert not any(p.is_alive() for w in workers for p in [w.proc, *w.followers])
