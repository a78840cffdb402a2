"""Row plans (engine/rows.py): the host arrays every paged-kernel forward and CUDA graph is built from."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.rows import ROW_SIZES, RowPlan, _pad_to, _width_bucket


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 300), st.integers(0, 3)), min_size=1, max_size=8),
       st.sampled_from([4, 16, 64]))
def test_row_plan_matches_per_row_definition(runs, bs) -> None:
    rng = np.random.default_rng(len(runs) * 1000 + bs)
    groups = []
    for n, start, spare in runs:
        blocks = -(-(start + n) // bs) + spare
        groups.append((rng.integers(0, 1000, n).tolist(), start, rng.permutation(5000)[:blocks].tolist()))
    plan = RowPlan.build(groups, bs)
    r = 0
    for ids, start, table in groups:
        for j, tok in enumerate(ids):
            p = start + j
            assert plan.input_ids[r] == tok and plan.positions[r] == p and plan.seq_lens[r] == p + 1
            assert plan.slots[r] == table[p // bs] * bs + p % bs
            assert plan.tables[r, :len(table)].tolist() == table
            r += 1
    assert r == len(plan.input_ids) == plan.tables.shape[0]


def test_row_plan_refuses_a_table_too_short() -> None:
    with pytest.raises(RuntimeError, match="cannot hold position 8"):
        RowPlan.build([([1, 2, 3], 6, [0, 1])], 4)


def test_graph_buckets_cover_with_bounded_padding() -> None:
    prev = 0
    for blocks in range(1, 5000):
        w = _width_bucket(blocks)
        assert w >= max(blocks, 16) and w >= prev and (blocks <= 16 or w <= 1.25 * blocks + 1)
        prev = w
    assert len({_width_bucket(b) for b in range(1, 4097)}) <= 4 * 9
    for n in range(1, ROW_SIZES[-1] + 1):
        assert _pad_to(n, ROW_SIZES) >= n
    assert _pad_to(ROW_SIZES[-1] + 1, ROW_SIZES) is None
