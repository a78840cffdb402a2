"""A decode worker's reservations: blocks taken for a request whose cache a prefill worker writes.

Lifecycle of one reservation (request id R, epoch E; every transition under the table's lock, an
illegal one raises `IllegalTransition`)::

    RESERVED --DATA notice--> COMPLETE --begin_adopt--> ADOPTING --adopted--> ADOPTED --finish--> RELEASED
       |                          |                        |
       |                          +--abort / lease--+      +--adopt failed--> RELEASED
       +--abort / lease: writer may still write--> ABORTED --RELEASED or DATA notice, or quarantine_s--> RELEASED
       +--abort: nothing written, or the writer said RELEASED------------------------------------> RELEASED

Who owns the blocks: the reservation, until ADOPTED (the engine's request then owns them and frees
them when it ends) or RELEASED (freed here, exactly once, through `free`). An ABORTED reservation
keeps its blocks *quarantined*: a prefill worker writes into them one-sidedly, so they come back only
once it says it will write no more (RELEASED notice), its last write landed (DATA notice), or after
quarantine_s (its own deadlines are shorter): a reused block never receives a stale write.

A peer lost mid-write (prefill worker killed, link down) is an ABORTED reservation whose writer never
speaks again: the quarantine timer releases it.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from splitserve.kvtransfer.notice import Notice, NoticeKind


class ResState(enum.Enum):
    RESERVED = "reserved"
    COMPLETE = "complete"
    ADOPTING = "adopting"
    ADOPTED = "adopted"
    ABORTED = "aborted"
    RELEASED = "released"


_ALLOWED: dict[ResState, frozenset[ResState]] = {
    ResState.RESERVED: frozenset({ResState.COMPLETE, ResState.ABORTED, ResState.RELEASED}),
    ResState.COMPLETE: frozenset({ResState.ADOPTING, ResState.RELEASED}),
    ResState.ADOPTING: frozenset({ResState.ADOPTED, ResState.RELEASED}),
    ResState.ADOPTED: frozenset({ResState.RELEASED}),
    ResState.ABORTED: frozenset({ResState.RELEASED}),
    ResState.RELEASED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


class Duplicate(ValueError):
    """The request id already holds a live reservation here."""


@dataclass
class Reservation:
    request_id: str
    epoch: int
    blocks: list[int]
    lease_until: float
    state: ResState = ResState.RESERVED
    writer_done: bool = False  # the prefill side said RELEASED: it writes nothing more
    cancelled: bool = False  # an Abort came while ADOPTING/ADOPTED: the stream stops
    claimed: bool = False  # a Generate stream owns it (only that stream ends it)
    quarantine_until: float = 0.0

    @property
    def holds_blocks(self) -> bool:
        """Blocks this reservation (not the engine) must still give back."""
        return self.state in (ResState.RESERVED, ResState.COMPLETE, ResState.ADOPTING, ResState.ABORTED)


class ReservationTable:
    """Every reservation of one decode worker. `free(blocks)` gives blocks back to the engine; it is
    called outside the lock, exactly once per reservation that did not reach ADOPTED."""

    def __init__(self, free: Callable[[list[int]], None], quarantine_s: float) -> None:
        self._free = free
        self.quarantine_s = quarantine_s
        self.cv = threading.Condition()
        self._all: dict[tuple[str, int], Reservation] = {}  # (request id, epoch) -> until RELEASED
        self._active: dict[str, Reservation] = {}  # request id -> its reservation, until ABORTED or RELEASED

    # ---- transitions (call with self.cv held) ------------------------------------------------------
    def _to(self, r: Reservation, state: ResState) -> list[int]:
        """Move r to state; the blocks to free when that means giving them back here."""
        if state not in _ALLOWED[r.state]:
            raise IllegalTransition(f"reservation {r.request_id} epoch {r.epoch}: {r.state.value} -> {state.value}")
        freed = r.blocks if state is ResState.RELEASED and r.holds_blocks else []
        r.state = state
        if state in (ResState.ABORTED, ResState.RELEASED) and self._active.get(r.request_id) is r:
            del self._active[r.request_id]  # the request id may reserve again (a retry)
        if state is ResState.RELEASED:
            self._all.pop((r.request_id, r.epoch), None)
        elif state is ResState.ABORTED:
            r.quarantine_until = time.monotonic() + self.quarantine_s
        self.cv.notify_all()
        return list(freed)

    def _give_up(self, r: Reservation, nothing_written: bool) -> list[int]:
        """End a reservation before adoption (abort, lease): free now unless a late write may come."""
        if r.state is ResState.RESERVED and not (nothing_written or r.writer_done):
            return self._to(r, ResState.ABORTED)
        if r.state in (ResState.RESERVED, ResState.COMPLETE):
            return self._to(r, ResState.RELEASED)
        return []

    def _run(self, fn: Callable[[], list[int]]) -> None:
        with self.cv:
            blocks = fn()
        if blocks:
            self._free(blocks)

    # ---- the API ----------------------------------------------------------------------------------
    def add(self, request_id: str, epoch: int, blocks: list[int], lease_s: float) -> Reservation:
        with self.cv:
            if request_id in self._active:
                raise Duplicate(f"{request_id} already holds a reservation here")
            r = Reservation(request_id, epoch, list(blocks), time.monotonic() + lease_s)
            self._active[request_id] = self._all[(request_id, epoch)] = r
            return r

    def get(self, request_id: str, epoch: int | None = None) -> Reservation | None:
        """The reservation of (request id, epoch), quarantined ones included; without an epoch, the
        request id's active one."""
        with self.cv:
            return self._all.get((request_id, epoch)) if epoch else self._active.get(request_id)

    def claim(self, request_id: str, epoch: int) -> Reservation | None:
        """The reservation for a Generate stream to own; None when there is none to take (unknown,
        past adoption, or another stream has it)."""
        with self.cv:
            r = self._all.get((request_id, epoch))
            if r is None or r.claimed or r.state not in (ResState.RESERVED, ResState.COMPLETE):
                return None
            r.claimed = True
            return r

    def on_notice(self, n: Notice) -> None:
        def go() -> list[int]:
            r = self.get(n.request_id, n.epoch)
            if r is None:
                return []  # freed already (nothing written / released): nothing to do
            if n.kind is NoticeKind.RELEASED:
                r.writer_done = True
                self.cv.notify_all()
                return self._to(r, ResState.RELEASED) if r.state is ResState.ABORTED else []
            if r.state is ResState.RESERVED:
                return self._to(r, ResState.COMPLETE)
            return self._to(r, ResState.RELEASED) if r.state is ResState.ABORTED else []

        self._run(go)

    def wait_complete(self, r: Reservation, deadline: float, stop: Callable[[], bool]) -> str | None:
        """Block until r's cache is complete; why not, otherwise (None: it is)."""
        with self.cv:
            while r.state is ResState.RESERVED:
                if r.cancelled or stop():
                    return "aborted while waiting for the cache"
                if r.writer_done:
                    return "the prefill side released the reservation without sending the cache"
                left = deadline - time.monotonic()
                if left <= 0:
                    return "the cache did not arrive in time"
                self.cv.wait(min(left, 0.2))
            return None if r.state is ResState.COMPLETE else f"the reservation is {r.state.value}"

    def begin_adopt(self, r: Reservation) -> None:
        with self.cv:
            self._to(r, ResState.ADOPTING)

    def adopted(self, r: Reservation) -> bool:
        """ADOPTING -> ADOPTED; False when an Abort came meanwhile (the caller aborts it in the engine)."""
        with self.cv:
            self._to(r, ResState.ADOPTED)
            return not r.cancelled

    def adopt_failed(self, r: Reservation, engine_took_blocks: bool) -> None:
        """The engine refused (or a timed-out adoption is being undone, and the undo frees the blocks)."""

        def go() -> list[int]:
            blocks = self._to(r, ResState.RELEASED)
            return [] if engine_took_blocks else blocks

        self._run(go)

    def end(self, r: Reservation, nothing_written: bool = False) -> None:
        """The stream that owned r is over (finished, failed, cancelled)."""

        def go() -> list[int]:
            if r.state is ResState.ADOPTED:
                return self._to(r, ResState.RELEASED)  # the engine frees the blocks
            return self._give_up(r, nothing_written)

        self._run(go)

    def abort(self, request_id: str, epoch: int, nothing_written: bool) -> bool:
        """An Abort RPC: False when no live reservation matches."""
        found = False

        def go() -> list[int]:
            nonlocal found
            r = self.get(request_id, epoch or None)
            if r is None:
                return []
            found = True
            if r.state in (ResState.ADOPTING, ResState.ADOPTED):
                r.cancelled = True  # its Generate stops and ends it
                self.cv.notify_all()
                return []
            if r.state is ResState.ABORTED:
                return self._to(r, ResState.RELEASED) if nothing_written else []
            r.cancelled = True
            return self._give_up(r, nothing_written)

        self._run(go)
        return found

    def expire(self, now: float | None = None) -> list[Reservation]:
        """Leases past due give up; quarantines past due release. Returns the reservations that moved."""
        now = time.monotonic() if now is None else now
        moved: list[Reservation] = []
        blocks: list[int] = []
        with self.cv:
            for r in list(self._all.values()):
                if r.state in (ResState.RESERVED, ResState.COMPLETE) and r.lease_until < now:
                    r.cancelled = True
                    blocks += self._give_up(r, False)
                    moved.append(r)
                elif r.state is ResState.ABORTED and r.quarantine_until < now:
                    blocks += self._to(r, ResState.RELEASED)
                    moved.append(r)
        if blocks:
            self._free(blocks)
        return moved

    def is_cancelled(self, request_id: str) -> bool:
        with self.cv:
            r = self._active.get(request_id)
            return r is not None and r.cancelled

    def counts(self) -> tuple[int, int]:
        """(blocks held by reservations, not by the engine; reservations not yet adopted)."""
        with self.cv:
            live = [r for r in self._all.values() if r.holds_blocks]
            return sum(len(r.blocks) for r in live), sum(1 for r in live if r.state is not ResState.ABORTED)
