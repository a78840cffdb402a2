"""Pool membership as the router sees it: which workers exist, their gRPC address, their state and
their last reported load.

Writers: the deploy layer (the controller) alone adds, drains and removes workers and decides their
`state` (serving, draining, dead), through `add` / `update` / `remove`. The router's load poller
only `report`s load (the fields in LOAD_FIELDS, `failures` included: consecutive polls it could not
get an answer to, which routing uses to rank a worker last, never to declare it dead). Routing
policies read it.

Thread-safe: the controller may run in another thread than the router's event loop.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from typing import Literal

Role = Literal["prefill", "decode"]
State = Literal["starting", "serving", "draining", "dead"]


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    role: Role
    address: str  # gRPC host:port
    pid: int = 0
    node: str = ""
    gpus: tuple[int, ...] = ()
    state: State = "serving"
    transfer_metadata: bytes = b""  # decode workers: what a prefill worker needs to write to it
    # load, refreshed by the router's poller
    blocks_used: int = 0
    blocks_total: int = 0
    running: int = 0
    waiting: int = 0
    requests_done: int = 0
    queued_prefill_tokens: int = 0
    graph_captures: int = 0
    graph_misses_after_ready: int = 0  # decode steps after ready with no CUDA graph (warm-up missed a shape)
    last_seen: float = field(default_factory=time.monotonic)
    failures: int = 0  # consecutive failed polls

    @property
    def free_blocks(self) -> int:
        return self.blocks_total - self.blocks_used


# what the router's poller may write: observations, never membership or liveness
LOAD_FIELDS = frozenset(
    {
        "blocks_used",
        "blocks_total",
        "running",
        "waiting",
        "requests_done",
        "queued_prefill_tokens",
        "graph_captures",
        "graph_misses_after_ready",
        "last_seen",
        "failures",
        "transfer_metadata",
    }
)


class Directory:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._workers: dict[str, WorkerInfo] = {}
        self._version = 0

    def add(self, info: WorkerInfo) -> None:
        with self._lock:
            self._workers[info.worker_id] = info
            self._version += 1

    def remove(self, worker_id: str) -> WorkerInfo | None:
        with self._lock:
            self._version += 1
            return self._workers.pop(worker_id, None)

    def update(self, worker_id: str, **changes: object) -> WorkerInfo | None:
        with self._lock:
            w = self._workers.get(worker_id)
            if w is None:
                return None
            w = replace(w, **changes)  # type: ignore[arg-type]
            self._workers[worker_id] = w
            return w

    def report(self, worker_id: str, **load: object) -> WorkerInfo | None:
        """The router's poller: a worker's load (LOAD_FIELDS only; state is the controller's)."""
        bad = set(load) - LOAD_FIELDS
        if bad:
            raise ValueError(f"the router may report load only, not {', '.join(sorted(bad))}")
        return self.update(worker_id, **load)

    def get(self, worker_id: str) -> WorkerInfo | None:
        with self._lock:
            return self._workers.get(worker_id)

    def all(self) -> list[WorkerInfo]:
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: (w.role, w.worker_id))

    def serving(self, role: Role) -> list[WorkerInfo]:
        """Workers of `role` that take new requests."""
        return [w for w in self.all() if w.role == role and w.state == "serving"]
