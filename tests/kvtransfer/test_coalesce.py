"""coalesce(): runs of (local, remote) block pairs where both ids are consecutive."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splitserve.kvtransfer import coalesce


def expand(runs: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    return [(ls + i, rs + i) for ls, rs, n in runs for i in range(n)]


def test_examples() -> None:
    assert coalesce([], []) == []
    assert coalesce([3], [7]) == [(3, 7, 1)]
    assert coalesce([0, 1, 2, 3], [10, 11, 12, 13]) == [(0, 10, 4)]
    # local consecutive but remote not, and the reverse: no merge
    assert coalesce([0, 1], [5, 7]) == [(0, 5, 1), (1, 7, 1)]
    assert coalesce([0, 2], [5, 6]) == [(0, 5, 1), (2, 6, 1)]
    # order of the pairs does not matter
    assert coalesce([6, 4, 5, 9], [12, 10, 11, 0]) == [(4, 10, 3), (9, 0, 1)]
    # remote goes down while local goes up: every pair alone
    assert coalesce([0, 1, 2], [2, 1, 0]) == [(0, 2, 1), (1, 1, 1), (2, 0, 1)]


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="local block ids"):
        coalesce([1, 2], [1])
    with pytest.raises(ValueError, match="distinct"):
        coalesce([1, 2], [5, 5])
    with pytest.raises(ValueError, match=">= 0"):
        coalesce([-1], [0])
    with pytest.raises(TypeError):
        coalesce([1.5], [0])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        coalesce([True], [0])


def test_accepts_numpy_and_torch_ints() -> None:
    import numpy as np
    import torch

    assert coalesce(np.arange(3), torch.arange(5, 8).tolist()) == [(0, 5, 3)]
    assert coalesce([np.int64(4)], [np.int32(2)]) == [(4, 2, 1)]


pair_lists = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 200)), max_size=120, unique_by=lambda p: p[1])


@given(pair_lists)
def test_runs_cover_exactly_the_pairs(pairs: list[tuple[int, int]]) -> None:
    runs = coalesce([p[0] for p in pairs], [p[1] for p in pairs])
    assert all(n >= 1 for _, _, n in runs)
    assert sorted(expand(runs)) == sorted(pairs)


@given(pair_lists.map(lambda ps: list({p[0]: p for p in ps}.values())))  # distinct local ids too
def test_run_count_is_minimal(pairs: list[tuple[int, int]]) -> None:
    # With distinct ids on both sides, a pair must start a run exactly when its predecessor
    # (l-1, r-1) is not among the pairs: that many runs is both necessary and sufficient.
    runs = coalesce([p[0] for p in pairs], [p[1] for p in pairs])
    pset = set(pairs)
    starts = sum(1 for lid, rid in pairs if (lid - 1, rid - 1) not in pset)
    assert len(runs) == starts
    # and no two runs could be glued together
    run_starts = {(ls, rs) for ls, rs, _ in runs}
    for ls, rs, n in runs:
        assert (ls + n, rs + n) not in run_starts


@given(st.integers(0, 1000), st.integers(0, 1000), st.integers(1, 300))
def test_one_contiguous_range_is_one_run(l0: int, r0: int, n: int) -> None:
    assert coalesce(range(l0, l0 + n), range(r0, r0 + n)) == [(l0, r0, n)]
