"""The paged-rows path of a forward (what the engine runs on CUDA; the kernels' references here) gives
the logits of the span path over a dense store: the indexer's queries (Indexer.row_queries), the
cache writes, top-k selection and sparse attention of every layer, and the MoE router on the way."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.cache import CachePool
from splitserve.engine.rows import RowPlan
from splitserve.model import ForwardBatch, load


@pytest.mark.parametrize("indexer_fp8", [False, True])
def test_rows_forward_matches_spans(tiny_checkpoint, indexer_fp8) -> None:
    net = load(tiny_checkpoint, dtype=torch.float32, indexer_fp8=indexer_fp8)
    cfg = net.cfg
    n, bs = cfg.index_topk + 9, 16  # rows past index_topk score and select their keys
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    pool = CachePool(cfg, cfg.num_hidden_layers, 8, bs, torch.float32, "cpu", indexer_fp8=indexer_fp8)
    plan = RowPlan.build([(ids.tolist(), 0, list(range(-(-n // bs))))], bs)
    with torch.inference_mode():
        ref = net.logits(net.forward(ForwardBatch.single(ids)))
        got = net.logits(net.forward(plan.to_batch(pool)))
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=2e-4)
