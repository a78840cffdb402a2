"""One request's cache on its way from this prefill worker to the decode worker that reserved blocks.

Lifecycle (every transition under the stream's lock; an illegal one raises `IllegalTransition`)::

    PREFILLING --send_last--> SENDING --every write DONE--> DELIVERED --release--> RELEASED
        |                        |
        +--stop (abort, timeout, +--stop--> STOPPING --release (writes settled or given up)--> RELEASED
        |   first-token finish)--^
        +--a write FAILED (from PREFILLING, SENDING or STOPPING)--> LOST --release--> RELEASED

* PREFILLING: after each engine step the blocks it completed are written (`send_ready`);
* SENDING: the last blocks went out with the DATA notice, which the decode side sees only after
  every byte landed;
* STOPPING: nothing more is written; writes already issued settle before the decode side is told
  RELEASED (a notice may overtake in-flight writes on NIXL, so it waits for them);
* LOST: a write failed (peer gone, link broken): the decode side's quarantine timer covers it.

Blocks: the local ones belong to the engine request (freed by `release`'s caller, in the engine
thread, after the handles are released); the remote ones belong to the decode worker's reservation,
which `release` tells it it may free (RELEASED notice) unless the cache was DELIVERED.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass, field

from splitserve.kvtransfer import TransferHandle, TransferState, Transport
from splitserve.kvtransfer.notice import Notice, NoticeKind

log = logging.getLogger(__name__)


class StreamState(enum.Enum):
    PREFILLING = "prefilling"
    SENDING = "sending"
    DELIVERED = "delivered"
    STOPPING = "stopping"
    LOST = "lost"
    RELEASED = "released"


_ALLOWED: dict[StreamState, frozenset[StreamState]] = {
    StreamState.PREFILLING: frozenset({StreamState.SENDING, StreamState.STOPPING, StreamState.LOST}),
    StreamState.SENDING: frozenset({StreamState.DELIVERED, StreamState.STOPPING, StreamState.LOST}),
    StreamState.DELIVERED: frozenset({StreamState.RELEASED}),
    StreamState.STOPPING: frozenset({StreamState.LOST, StreamState.RELEASED}),
    StreamState.LOST: frozenset({StreamState.RELEASED}),
    StreamState.RELEASED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class PrefillStream:
    transport: Transport
    request_id: str
    peer: str
    remote_blocks: list[int]
    epoch: int
    state: StreamState = StreamState.PREFILLING
    sent: int = 0  # leading blocks handed to the transport
    nbytes: int = 0
    why: str = ""  # why it stopped or was lost
    handles: list[TransferHandle] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def _to(self, state: StreamState, why: str = "") -> None:
        if state not in _ALLOWED[self.state]:
            raise IllegalTransition(f"stream {self.request_id}: {self.state.value} -> {state.value}")
        self.state = state
        self.why = why or self.why

    def _write(self, local: list[int], upto: int, notice: Notice | None) -> None:
        upto = min(upto, len(self.remote_blocks), len(local))
        if upto <= self.sent and notice is None:
            return
        h = self.transport.write_blocks(
            self.peer,
            local[self.sent : upto],
            self.remote_blocks[self.sent : upto],
            notif=notice.to_bytes() if notice else None,
        )
        self.handles.append(h)
        self.nbytes += h.nbytes
        self.sent = max(self.sent, upto)

    # ---- the engine thread -----------------------------------------------------------------------
    def send_ready(self, local: list[int], upto: int) -> None:
        """Write blocks [sent, upto) of the request's block table `local` (PREFILLING only)."""
        with self.lock:
            if self.state is StreamState.PREFILLING and self.check() is StreamState.PREFILLING:
                self._write(local, upto, None)

    def send_last(self, local: list[int], upto: int) -> bool:
        """The first token is sampled: the rest of the cache, with the DATA notice (PREFILLING ->
        SENDING). False when the stream already stopped or was lost (nothing is sent)."""
        with self.lock:
            if self.check() is not StreamState.PREFILLING:
                return False
            self._to(StreamState.SENDING)
            self._write(local, upto, Notice(NoticeKind.DATA, self.request_id, self.epoch))
            return True

    # ---- any thread --------------------------------------------------------------------------------
    def stop(self, why: str) -> bool:
        """No more writes (PREFILLING/SENDING -> STOPPING); False when it is already past that."""
        with self.lock:
            if self.state in (StreamState.PREFILLING, StreamState.SENDING):
                self._to(StreamState.STOPPING, why)
                return True
            return False

    def check(self) -> StreamState:
        """Poll the writes: a FAILED one makes the stream LOST; SENDING with all DONE is DELIVERED."""
        with self.lock:
            if self.state in (StreamState.RELEASED, StreamState.LOST, StreamState.DELIVERED):
                return self.state
            states = [self.transport.poll(h) for h in self.handles]
            failed = [h for h, st in zip(self.handles, states) if st is TransferState.FAILED]
            if failed:
                self._to(StreamState.LOST, f"cache transfer failed: {self.transport.error(failed[0])}")
            elif self.state is StreamState.SENDING and all(st is TransferState.DONE for st in states):
                self._to(StreamState.DELIVERED)
            return self.state

    def settled(self) -> bool:
        """Every write issued has finished (DONE or FAILED): nothing can land any more."""
        with self.lock:
            self.check()
            return all(self.transport.poll(h).finished for h in self.handles)

    def release(self) -> None:
        """-> RELEASED: forget the handles and, unless the cache was delivered, tell the decode side
        it may free the reservation (only when every write settled: otherwise its quarantine does)."""
        with self.lock:
            if self.state is StreamState.RELEASED:
                return
            if self.state in (StreamState.PREFILLING, StreamState.SENDING):
                self._to(StreamState.STOPPING, "released")
            settled = all(self.transport.poll(h).finished for h in self.handles)
            delivered = self.state is StreamState.DELIVERED
            for h in self.handles:
                self.transport.release(h)
            self._to(StreamState.RELEASED)
        if not delivered and settled:
            try:
                self.transport.send_notif(
                    self.peer, Notice(NoticeKind.RELEASED, self.request_id, self.epoch).to_bytes()
                )
            except Exception as e:  # noqa: BLE001 - the peer may be gone; its quarantine times out
                log.info("request %s: RELEASED notice not sent: %s", self.request_id, e)
        elif not delivered:
            log.warning(
                "request %s: writes still in flight at release; the decode side's quarantine frees epoch %d",
                self.request_id,
                self.epoch,
            )
