"""Row plans (engine/rows.py): the host arrays every paged-kernel forward and CUDA graph is built from."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.engine.rows import ROW_SIZES, RowPlan, _pad_to, capture_sizes, pack


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 40), st.integers(0, 300), st.integers(0, 3)), min_size=1, max_size=8),
    st.sampled_from([4, 16, 64]),
)
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
            assert plan.tables[r, : len(table)].tolist() == table
            r += 1
    assert r == len(plan.input_ids) == plan.tables.shape[0]


@pytest.mark.parametrize("n,w", [(1, 1), (3, 5), (17, 2)])
def test_packed_plan_arrays_equal_the_plan(n, w) -> None:
    """A row plan's arrays staged in one host buffer (pinned on CUDA: DecodeGraphs.run) keep their
    values, dtypes and shapes, whatever the odd sizes before them."""
    rng = np.random.default_rng(n * w)
    groups = [
        ([int(t)], int(p), rng.permutation(100)[:w].tolist())
        for t, p in zip(rng.integers(0, 999, n), rng.integers(0, w * 4, n))
    ]
    plan = RowPlan.build(groups, 4)
    arrays = (plan.input_ids, plan.seq_lens, plan.tables, plan.positions, plan.slots)  # int32 between int64s
    for a, t in zip(arrays, pack(arrays, pin=False)):
        assert t.shape == a.shape and t.numpy().dtype == a.dtype and (t.numpy() == a).all()


def test_row_plan_refuses_a_table_too_short() -> None:
    with pytest.raises(RuntimeError, match="cannot hold position 8"):
        RowPlan.build([([1, 2, 3], 6, [0, 1])], 4)


def test_capture_sizes_cover_every_batch_with_bounded_padding() -> None:
    """Graphs are keyed by padded row count only: every batch up to max_rows pads to a captured size,
    at most 7 rows (up to 256), 15 (up to 512) or 31 rows beyond; the list is fixed by max_rows."""
    for max_rows in (1, 3, 8, 64, 100, 192, 256, 600):
        sizes = capture_sizes(max_rows)
        assert sizes[0] == 1 and sizes[-1] == max_rows and list(sizes) == sorted(set(sizes))
        for n in range(1, max_rows + 1):
            p = _pad_to(n, sizes)
            assert p is not None and p >= n
            if n > 4:
                assert p - n < (8 if p <= 256 else 16 if p <= 512 else 32)
        assert _pad_to(max_rows + 1, sizes) is None
    assert capture_sizes(64)[:6] == (1, 2, 4, 8, 16, 24)
    for n in range(1, ROW_SIZES[-1] + 1):
        assert _pad_to(n, ROW_SIZES) >= n
