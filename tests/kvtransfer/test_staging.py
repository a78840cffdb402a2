"""Staging (kvtransfer/staging.py): scattered local blocks are gathered into the sender's staging area and
travel as one descriptor per run of remote blocks; the bytes land in the right remote blocks, on both
backends (real NIXL over UCX on loopback, TCP), and the staging blocks come back once the write is done."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitserve.kvtransfer import Compat, TransferState, Transport, make_transport
from splitserve.kvtransfer.staging import StagingArea, copy_blocks
from splitserve.tests.kvtransfer.workers import SMALL_POOLS, make_pools

COMPAT = Compat({"model": "tiny-dsv32", "layout": "block-major", "block_size": 64})
STAGE_AT, STAGE_N = 24, 8  # blocks 24..31 of the sender's 32 are its staging area


@pytest.fixture
def pair(backend: str) -> Iterator[tuple[Transport, list[torch.Tensor], Transport, list[torch.Tensor]]]:
    made = []
    try:
        a = make_transport(backend, "pre", COMPAT)  # type: ignore[arg-type]
        made.append(a)
        b = make_transport(backend, "dec", COMPAT)  # type: ignore[arg-type]
        made.append(b)
        pa, pb = make_pools(SMALL_POOLS, 1), make_pools(SMALL_POOLS, None)
        a.register_pools(pa)
        b.register_pools(pb)
        a.enable_staging(STAGE_AT, STAGE_N)
        a.add_peer(b.metadata())
        yield a, pa, b, pb
    finally:
        for t in made:
            t.close()


def _write(a: Transport, local: list[int], remote: list[int], notif: bytes | None = None):
    h = a.write_blocks("dec", local, remote, notif=notif)
    assert a.wait(h, 20.0) is TransferState.DONE, a.error(h)
    return h


def _landed(pa, pb, local, remote) -> bool:
    return all(torch.equal(q[ro], p[lo]) for p, q in zip(pa, pb) for lo, ro in zip(local, remote))


def test_scattered_blocks_travel_as_one_region(pair) -> None:
    a, pa, b, pb = pair
    local, remote = [3, 9, 1, 15, 7], [10, 11, 12, 13, 14]
    h = _write(a, local, remote, notif=b"r1:1")
    assert h.num_descriptors == len(pa)  # one per pool, where 5 scattered blocks were 5 per pool
    assert _landed(pa, pb, local, remote)
    assert a.staging.num_free == STAGE_N and a.staging.staged_writes == 1  # given back once DONE
    notifs = b.wait_notifs(10.0)
    assert notifs == {"pre": [b"r1:1"]}
    a.release(h)


def test_remote_runs_are_kept_and_other_blocks_untouched(pair) -> None:
    a, pa, b, pb = pair
    local, remote = [5, 2, 17, 11, 0], [2, 3, 4, 20, 21]  # two runs on the receiver
    h = _write(a, local, remote)
    assert h.num_descriptors == 2 * len(pa)
    assert _landed(pa, pb, local, remote)
    untouched = [i for i in range(32) if i not in remote]
    assert all(not q[untouched].any() for q in pb)
    a.release(h)


def test_no_room_falls_back_to_block_writes(pair) -> None:
    a, pa, b, pb = pair
    local = [0, 2, 4, 6, 8, 10, 12, 14, 16]  # 9 blocks > 8 staging blocks
    remote = list(range(9))
    h = _write(a, local, remote)
    assert h.num_descriptors == 9 * len(pa) and a.staging.unstaged_writes == 1
    assert _landed(pa, pb, local, remote)
    with pytest.raises(ValueError, match="staging"):
        a.write_blocks("dec", [1, 25], [0, 1])
    a.release(h)


def test_contiguous_or_equally_scattered_writes_are_not_staged(pair) -> None:
    a, pa, b, pb = pair
    for local, remote in (([4, 5, 6], [7, 8, 9]), ([1, 5, 9], [2, 6, 10])):
        h = _write(a, local, remote)
        assert _landed(pa, pb, local, remote)
        a.release(h)
    assert a.staging.staged_writes == 0


def test_copy_blocks_and_staging_area() -> None:
    pools = make_pools(SMALL_POOLS, 3)
    ref = [p.clone() for p in pools]
    copy_blocks(pools, [7, 1, 30], [20, 21, 22])
    for p, r in zip(pools, ref):
        assert torch.equal(p[[20, 21, 22]], r[[7, 1, 30]])
        keep = [i for i in range(32) if i not in (20, 21, 22)]
        assert torch.equal(p[keep], r[keep])
    st = StagingArea(10, 6)
    x, y = st.take(4), st.take(2)
    assert (x, y, st.take(1)) == (10, 14, None)
    st.give_back(x, 4)
    assert st.take(3) == 10 and st.num_free == 1
    with pytest.raises(RuntimeError):
        st.give_back(14, 3)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12)), max_size=40))
def test_staging_area_is_first_fit(ops: list[tuple[bool, int]]) -> None:
    """take() hands out the lowest run of n free blocks, exactly as a linear first-fit scan does."""
    area, free, held = StagingArea(100, 24), [True] * 24, []
    for is_take, n in ops:
        if is_take or not held:
            want = next((i for i in range(24 - n + 1) if all(free[i : i + n])), None)
            got = area.take(n)
            assert got == (None if want is None else 100 + want)
            if want is not None:
                free[want : want + n] = [False] * n
                held.append((got, n))
        else:
            first, k = held.pop(n % len(held))
            area.give_back(first, k)
            free[first - 100 : first - 100 + k] = [True] * k
        assert area.num_free == sum(free)
