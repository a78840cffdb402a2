"""The prefill side's stream state machine, writing through the in-memory transport into blocks a
decode-side reservation holds, through every transition and fault: abort during a write, a write
that fails (peer lost), a late DATA notice after the decode side gave up, a first-token finish.
After each, both allocators' free counts are back where they started. (Preemption during a send:
tests/engine/test_handoff.py drives it on a real engine: a prefilled request is never a victim.)"""

from __future__ import annotations

import time

import pytest

from splitserve.decode_worker.reservation import ResState
from splitserve.prefill_worker.stream import IllegalTransition, StreamState

from .conftest import Pair


def finish(pair: Pair, local: list[int]) -> None:
    """What the prefill worker's cleanup does after release: free the request's local blocks."""
    pair.p.blocks.free(local)


def test_prefilling_sending_delivered_released(pair: Pair) -> None:
    res = pair.reserve("r", 4)
    s, local = pair.stream(res, 4)
    s.send_ready(local, 2)  # two chunks' blocks complete
    s.send_ready(local, 2)  # nothing new: no write
    assert len(s.handles) == 1 and s.state is StreamState.PREFILLING
    assert s.send_last(local, 4) and s.state is StreamState.SENDING
    assert s.check() is StreamState.DELIVERED
    pair.pump()
    assert res.state is ResState.COMPLETE
    assert pair.d.pool[res.blocks].tolist() == pair.p.pool[local].tolist()  # the bytes landed
    s.release()
    finish(pair, local)
    pair.pump()  # delivered: no RELEASED notice
    assert res.state is ResState.COMPLETE and not res.writer_done
    pair.table.begin_adopt(res)
    pair.table.adopted(res)
    pair.d.blocks.free(res.blocks)
    pair.table.end(res)
    assert pair.leaked() == (0, 0)


def test_illegal_transitions_raise(pair: Pair) -> None:
    res = pair.reserve("r", 2)
    s, local = pair.stream(res, 2)
    s.release()
    assert s.state is StreamState.RELEASED
    with pytest.raises(IllegalTransition):
        s._to(StreamState.SENDING)
    assert not s.stop("late") and not s.send_last(local, 2)
    finish(pair, local)
    pair.pump()
    assert res.state is ResState.RESERVED and res.writer_done  # told: nothing will be written
    pair.table.end(res)
    assert pair.leaked() == (0, 0)


def test_abort_during_a_write_waits_for_it_to_settle(pair: Pair) -> None:
    res = pair.reserve("r", 4)
    s, local = pair.stream(res, 4)
    pair.p.t.faults.hold = True  # the write is stuck in flight
    s.send_ready(local, 3)
    assert pair.table.abort("r", res.epoch, nothing_written=False)  # the router gave up
    assert s.stop("aborted") and s.state is StreamState.STOPPING
    assert not s.settled()
    s.send_ready(local, 4)  # a later step sends nothing more
    assert len(s.handles) == 1
    pair.p.t.release_held()
    assert s.settled()
    s.release()  # settled: the decode side may free at once
    finish(pair, local)
    assert res.state is ResState.ABORTED and pair.leaked() == (0, 4)  # quarantined until told
    pair.pump()
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


def test_released_with_writes_in_flight_leaves_the_blocks_to_the_quarantine(pair: Pair) -> None:
    res = pair.reserve("r", 4)
    s, local = pair.stream(res, 4)
    pair.p.t.faults.hold = True
    s.send_ready(local, 4)
    pair.table.abort("r", res.epoch, nothing_written=False)
    s.release()  # not settled: no RELEASED notice (a write may land)
    finish(pair, local)
    pair.pump()
    assert res.state is ResState.ABORTED
    pair.table.expire(time.monotonic() + 61)
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


@pytest.mark.parametrize("fault", ["write fails", "decode worker killed"])
def test_a_failed_write_loses_the_stream(pair: Pair, fault: str) -> None:
    res = pair.reserve("r", 4)
    s, local = pair.stream(res, 4)
    if fault == "write fails":
        pair.p.t.faults.fail_writes = True
    s.send_ready(local, 2)
    if fault == "decode worker killed":
        pair.d.t.kill()
    assert s.check() is StreamState.LOST and s.why.startswith("cache transfer failed")
    assert not s.send_last(local, 4)  # lost: nothing more goes out
    s.release()
    finish(pair, local)
    pair.table.end(res)  # the router's abort / the lease ends it on D
    if fault == "write fails":  # the decode side is alive: it heard RELEASED
        pair.pump()
    else:
        pair.table.expire(time.monotonic() + 61)  # a dead worker's blocks are its own business
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


def test_a_late_data_notice_after_the_decode_side_gave_up(pair: Pair) -> None:
    """The router's Generate timed out and aborted D's reservation; the prefill side's last write
    lands afterwards with its DATA notice: D frees the quarantined blocks then, and only then."""
    res = pair.reserve("r", 3)
    s, local = pair.stream(res, 3)
    pair.p.t.faults.delay_s = 0.05
    assert s.send_last(local, 3)
    assert s.check() is StreamState.SENDING
    pair.table.abort("r", res.epoch, nothing_written=False)
    pair.pump()
    assert res.state is ResState.ABORTED and pair.leaked() == (3, 3)
    deadline = time.monotonic() + 5
    while s.check() is not StreamState.DELIVERED and time.monotonic() < deadline:
        time.sleep(0.01)
    pair.pump()
    s.release()
    finish(pair, local)
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


def test_first_token_finish_sends_nothing_more_and_releases(pair: Pair) -> None:
    res = pair.reserve("r", 4)
    s, local = pair.stream(res, 4)
    s.send_ready(local, 3)
    assert s.stop("finished at its first token") and s.settled()
    s.release()
    finish(pair, local)
    pair.pump()
    assert res.writer_done
    pair.table.abort("r", res.epoch, nothing_written=False)  # the router releases the reservation
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)
