"""A prefill worker's streams and a decode worker's reservations wired through the in-memory
transport (kvtransfer/fake.py): two block allocators, two sets of pools, one fake network."""

from __future__ import annotations

import pytest
import torch

from splitserve.decode_worker.reservation import ReservationTable
from splitserve.engine.block_manager import BlockManager
from splitserve.kvtransfer.fake import FakeNetwork, FakeTransport
from splitserve.kvtransfer.notice import Notice
from splitserve.prefill_worker.stream import PrefillStream

NUM_BLOCKS = 16


class Side:
    def __init__(self, name: str, net: FakeNetwork) -> None:
        self.blocks = BlockManager(NUM_BLOCKS, prefix_cache=False)
        self.pool = torch.zeros(NUM_BLOCKS, 4)
        self.t = FakeTransport(name, net)
        self.t.register_pools([self.pool])


class Pair:
    """P writes into blocks D reserved; `pump()` hands D's notices to its reservation table."""

    def __init__(self, quarantine_s: float = 60.0) -> None:
        self.net = FakeNetwork()
        self.p, self.d = Side("prefill", self.net), Side("decode", self.net)
        self.peer = self.p.t.add_peer(self.d.t.metadata())
        self.table = ReservationTable(self.d.blocks.free, quarantine_s)
        self.start_free = (self.p.blocks.num_free, self.d.blocks.num_free)

    def reserve(self, rid: str, n: int, epoch: int = 1, lease_s: float = 60.0):
        return self.table.add(rid, epoch, self.d.blocks.allocate(n), lease_s)

    def stream(self, res, n: int) -> tuple[PrefillStream, list[int]]:
        local = self.p.blocks.allocate(n)
        for i, b in enumerate(local):
            self.p.pool[b] = float(100 * len(res.request_id) + i + 1)
        return PrefillStream(self.p.t, res.request_id, self.peer, list(res.blocks), res.epoch), local

    def pump(self) -> None:
        for msgs in self.d.t.get_notifs().values():
            for m in msgs:
                self.table.on_notice(Notice.from_bytes(m))

    def leaked(self) -> tuple[int, int]:
        """Blocks not back in each allocator (0, 0 when nothing leaked)."""
        return self.start_free[0] - self.p.blocks.num_free, self.start_free[1] - self.d.blocks.num_free


@pytest.fixture
def pair() -> Pair:
    return Pair()
