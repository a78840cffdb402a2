"""The decode side's reservation state machine through every transition and fault, on a real block
allocator: after each scenario the allocator's free count is back where it started."""

from __future__ import annotations

import time

import pytest

from splitserve.decode_worker.reservation import Duplicate, IllegalTransition, ResState
from splitserve.kvtransfer.notice import BadNotice, Notice, NoticeKind

from .conftest import Pair


def data(res) -> Notice:
    return Notice(NoticeKind.DATA, res.request_id, res.epoch)


def released(res) -> Notice:
    return Notice(NoticeKind.RELEASED, res.request_id, res.epoch)


def test_reserved_complete_adopted_released(pair: Pair) -> None:
    res = pair.reserve("r", 3)
    assert pair.table.counts() == (3, 1)
    pair.table.on_notice(data(res))
    assert res.state is ResState.COMPLETE
    assert pair.table.wait_complete(res, time.monotonic() + 1, lambda: False) is None
    pair.table.begin_adopt(res)
    assert pair.table.adopted(res) and res.state is ResState.ADOPTED
    assert pair.table.counts() == (0, 0)  # the engine owns the blocks now
    pair.d.blocks.free(res.blocks)  # ... and frees them when the request ends
    pair.table.end(res)
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


@pytest.mark.parametrize(
    "state,call",
    [
        ("RESERVED", lambda t, r: t.begin_adopt(r)),
        ("RESERVED", lambda t, r: t.adopted(r)),
        ("COMPLETE", lambda t, r: t.adopted(r)),
        ("RELEASED", lambda t, r: t.begin_adopt(r)),
    ],
)
def test_illegal_transitions_raise(pair: Pair, state: str, call) -> None:
    res = pair.reserve("r", 2)
    if state == "COMPLETE":
        pair.table.on_notice(data(res))
    if state == "RELEASED":
        pair.table.abort("r", res.epoch, nothing_written=True)
    with pytest.raises(IllegalTransition):
        call(pair.table, res)
    pair.table.abort("r", res.epoch, nothing_written=True)
    assert pair.leaked() == (0, 0)


def test_a_request_id_reserves_once_at_a_time_but_again_after_an_abort(pair: Pair) -> None:
    res = pair.reserve("r", 2)
    with pytest.raises(Duplicate):
        pair.table.add("r", 2, [], 60.0)
    pair.table.abort("r", 0, nothing_written=False)  # quarantined: a write may still land
    retry = pair.reserve("r", 2, epoch=2)  # the router's retry is a new epoch
    assert res.state is ResState.ABORTED and retry.state is ResState.RESERVED
    pair.table.on_notice(released(res))
    pair.table.abort("r", 2, nothing_written=True)
    assert pair.leaked() == (0, 0)


def test_abort_before_any_write_frees_at_once(pair: Pair) -> None:
    res = pair.reserve("r", 4)
    assert pair.table.abort("r", res.epoch, nothing_written=True)
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)
    assert not pair.table.abort("r", res.epoch, nothing_written=True)  # unknown now: not found


@pytest.mark.parametrize("word", ["released", "late data", "quarantine over"])
def test_an_aborted_reservation_waits_for_the_writers_word(pair: Pair, word: str) -> None:
    res = pair.reserve("r", 4)
    pair.table.abort("r", res.epoch, nothing_written=False)
    assert res.state is ResState.ABORTED and pair.leaked() == (0, 4)  # quarantined, not reused yet
    if word == "released":
        pair.table.on_notice(released(res))
    elif word == "late data":
        pair.table.on_notice(data(res))
    else:
        assert pair.table.expire(time.monotonic() + 30) == []  # not yet
        assert pair.table.expire(time.monotonic() + 61) == [res]
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


def test_the_writers_released_notice_before_the_abort_frees_at_the_abort(pair: Pair) -> None:
    res = pair.reserve("r", 2)
    pair.table.on_notice(released(res))
    assert res.writer_done and res.state is ResState.RESERVED
    assert pair.table.wait_complete(res, time.monotonic() + 1, lambda: False) is not None  # no cache coming
    pair.table.end(res)
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


def test_lease_expiry_quarantines_then_releases(pair: Pair) -> None:
    res = pair.reserve("r", 3, lease_s=0.0)
    assert pair.table.expire() == [res] and res.state is ResState.ABORTED and res.cancelled
    pair.table.expire(time.monotonic() + 61)
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


def test_a_complete_reservation_past_its_lease_is_freed_at_once(pair: Pair) -> None:
    res = pair.reserve("r", 3, lease_s=0.0)
    pair.table.on_notice(data(res))
    pair.table.expire()
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


def test_abort_during_adoption_stops_the_stream(pair: Pair) -> None:
    res = pair.reserve("r", 2)
    pair.table.on_notice(data(res))
    pair.table.begin_adopt(res)
    assert pair.table.abort("r", res.epoch, nothing_written=False) and pair.table.is_cancelled("r")
    assert not pair.table.adopted(res)  # the caller aborts it in the engine, which frees the blocks
    pair.d.blocks.free(res.blocks)
    pair.table.end(res)
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


@pytest.mark.parametrize("engine_took_blocks", [False, True])
def test_worker_lost_during_adopt(pair: Pair, engine_took_blocks: bool) -> None:
    """The adoption failed (engine refused, its loop gone) or timed out after it ran (its undo frees
    the engine's copy): the blocks are freed exactly once either way."""
    res = pair.reserve("r", 2)
    pair.table.on_notice(data(res))
    pair.table.begin_adopt(res)
    if engine_took_blocks:
        pair.d.blocks.free(res.blocks)  # what the undo (engine.abort) does
    pair.table.adopt_failed(res, engine_took_blocks=engine_took_blocks)
    pair.table.end(res)  # the stream's finally: nothing more to do
    assert res.state is ResState.RELEASED and pair.leaked() == (0, 0)


def test_notices_for_unknown_or_old_epochs_change_nothing(pair: Pair) -> None:
    res = pair.reserve("r", 2, epoch=5)
    pair.table.on_notice(Notice(NoticeKind.DATA, "r", 4))
    pair.table.on_notice(Notice(NoticeKind.RELEASED, "other", 5))
    assert res.state is ResState.RESERVED and not res.writer_done
    with pytest.raises(BadNotice):
        Notice.from_bytes(b"r:5")  # the old string protocol is not a notice
    assert Notice.from_bytes(data(res).to_bytes()) == data(res)
    pair.table.abort("r", 5, nothing_written=True)
    assert pair.leaked() == (0, 0)


def test_one_stream_claims_a_reservation(pair: Pair) -> None:
    res = pair.reserve("r", 2, epoch=3)
    assert pair.table.claim("r", 3) is res
    assert pair.table.claim("r", 3) is None and pair.table.claim("r", 4) is None  # a twin, a wrong epoch
    pair.table.end(res)
    assert res.state is ResState.ABORTED  # no word from the writer yet: quarantined
    pair.table.on_notice(released(res))
    assert pair.table.claim("r", 3) is None and pair.leaked() == (0, 0)
