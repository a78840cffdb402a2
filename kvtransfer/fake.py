"""An in-memory Transport for tests, with faults you can inject (the twin of the real backends).

Several `FakeTransport`s share one `FakeNetwork` (one process, one lock). A write copies the local
blocks of every registered pool into the peer's pools when it *lands*; it lands on the first
`poll` after `Faults.delay_s`, and only after every earlier write to the same peer has finished
(the ordering rule of base.py), so its notification is delivered after its bytes. Faults:

* ``delay_s``: a write stays IN_PROGRESS this long (a late reply, a slow link);
* ``hold``: writes stay IN_PROGRESS until `release_held()` (a write frozen mid-way, deterministic);
* ``fail_writes``: new writes end FAILED ("peer unreachable") without landing;
* ``drop_notifs``: notifications, with a write or standalone, are lost;
* `kill()`: the transport's process is gone: its transfers, and every transfer to it, FAIL, and
  notifications to it raise TransportError.

Faults are per sending transport and may be changed at any time (`transport.faults.hold = False`).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .base import Compat, HandshakeError, TransferHandle, TransferState, Transport, TransportError

if TYPE_CHECKING:
    import torch


@dataclass
class Faults:
    delay_s: float = 0.0
    hold: bool = False
    fail_writes: bool = False
    drop_notifs: bool = False


@dataclass
class _Write:
    handle: TransferHandle
    local: list[int]
    remote: list[int]
    notif: bytes | None
    lands_at: float
    state: TransferState = TransferState.IN_PROGRESS
    error: str | None = None


@dataclass
class FakeNetwork:
    """The processes a test runs: transports by name, one lock for all of them."""

    transports: dict[str, FakeTransport] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))


class FakeTransport(Transport):
    backend = "fake"

    def __init__(
        self, name: str, network: FakeNetwork, compat: Compat | None = None, faults: Faults | None = None
    ) -> None:
        self._name, self.net, self._compat = name, network, compat or Compat()
        self.faults = faults or Faults()
        self.pools: list[torch.Tensor] = []
        self.alive = True
        self._peers: set[str] = set()
        self._writes: dict[int, _Write] = {}
        self._inbox: dict[str, list[bytes]] = {}
        self.landed = 0  # writes that landed (test introspection)
        with network.lock:
            network.transports[name] = self

    @property
    def name(self) -> str:
        return self._name

    @property
    def compat(self) -> Compat:
        return self._compat

    def register_pools(self, pools: Sequence[torch.Tensor]) -> None:
        self.pools = list(pools)

    def metadata(self) -> bytes:
        return json.dumps({"name": self._name, "compat": self._compat.to_json()}).encode()

    def add_peer(self, metadata: bytes) -> str:
        md = json.loads(metadata)
        if Compat.from_json(md["compat"]) != self._compat:
            raise HandshakeError("; ".join(self._compat.diff(Compat.from_json(md["compat"]))))
        with self.net.lock:
            peer = self.net.transports.get(md["name"])
            if peer is None or not peer.alive:
                raise TransportError(f"peer {md['name']!r} is unreachable")
            self._peers.add(peer.name)
        return peer.name

    def remove_peer(self, name: str) -> None:
        with self.net.lock:
            self._peers.discard(name)
            for w in self._writes.values():
                if w.handle.peer == name and not w.state.finished:
                    w.state, w.error = TransferState.FAILED, "peer removed"

    def peers(self) -> list[str]:
        return sorted(self._peers)

    def write_blocks(
        self, peer: str, local_block_ids: Sequence[int], remote_block_ids: Sequence[int], notif: bytes | None = None
    ) -> TransferHandle:
        if len(local_block_ids) != len(remote_block_ids):
            raise ValueError("local and remote block lists differ in length")
        with self.net.lock:
            h = TransferHandle(
                next(self.net.ids),
                peer,
                len(local_block_ids),
                len(self.pools) or 1,
                sum(p[0].nbytes for p in self.pools) * len(local_block_ids),
            )
            w = _Write(h, list(local_block_ids), list(remote_block_ids), notif, time.monotonic() + self.faults.delay_s)
            if self.faults.fail_writes:
                w.state, w.error = TransferState.FAILED, f"injected: {peer} unreachable"
            self._writes[h.xfer_id] = w
            return h

    def poll(self, handle: TransferHandle) -> TransferState:
        with self.net.lock:
            w = self._writes.get(handle.xfer_id)
            if w is None:
                return TransferState.FAILED
            if not w.state.finished:
                self._advance(w)
            return w.state

    def _advance(self, w: _Write) -> None:
        peer = self.net.transports.get(w.handle.peer)
        if not self.alive or peer is None or not peer.alive or w.handle.peer not in self._peers:
            w.state, w.error = TransferState.FAILED, f"peer {w.handle.peer} is gone"
            return
        if self.faults.hold or time.monotonic() < w.lands_at:
            return
        earlier = [
            x
            for x in self._writes.values()
            if x.handle.peer == w.handle.peer and x.handle.xfer_id < w.handle.xfer_id and not x.state.finished
        ]
        for x in earlier:  # the ordering rule: earlier writes to the peer land first
            self._advance(x)
            if not x.state.finished:
                return
        for src, dst in zip(self.pools, peer.pools):
            dst[w.remote] = src[w.local]
        w.state = TransferState.DONE
        self.landed += 1
        if w.notif is not None and not self.faults.drop_notifs:
            peer._inbox.setdefault(self._name, []).append(w.notif)

    def release_held(self) -> None:
        self.faults.hold = False

    def error(self, handle: TransferHandle) -> str | None:
        with self.net.lock:
            w = self._writes.get(handle.xfer_id)
            return None if w is None else w.error

    def release(self, handle: TransferHandle) -> None:
        with self.net.lock:
            self._writes.pop(handle.xfer_id, None)

    def in_flight(self) -> int:
        with self.net.lock:
            return sum(1 for w in self._writes.values() if not w.state.finished)

    def send_notif(self, peer: str, msg: bytes) -> None:
        with self.net.lock:
            p = self.net.transports.get(peer)
            if not self.alive or p is None or not p.alive:
                raise TransportError(f"peer {peer!r} is unreachable")
            if not self.faults.drop_notifs:
                p._inbox.setdefault(self._name, []).append(msg)

    def get_notifs(self) -> dict[str, list[bytes]]:
        with self.net.lock:
            out, self._inbox = self._inbox, {}
            return out

    def kill(self) -> None:
        """This transport's process died."""
        with self.net.lock:
            self.alive = False
            for w in self._writes.values():
                if not w.state.finished:
                    w.state, w.error = TransferState.FAILED, "process killed"

    def close(self) -> None:
        with self.net.lock:
            self.kill()
            self.net.transports.pop(self._name, None)
