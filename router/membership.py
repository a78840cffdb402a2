"""Pool membership as the router sees it: which workers exist, their gRPC address, their state and
their last reported load. The deploy layer (launcher/controller) adds, drains and removes workers;
the router's poller refreshes load and liveness; routing policies read it.

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
    address: str                      # gRPC host:port
    pid: int = 0
    node: str = ""
    gpus: tuple[int, ...] = ()
    state: State = "serving"
    transfer_metadata: bytes = b""    # decode workers: what a prefill worker needs to write to it
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
    failures: int = 0                 # consecutive failed polls

    @property
    def free_blocks(self) -> int:
        return self.blocks_total - self.blocks_used


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

    def get(self, worker_id: str) -> WorkerInfo | None:
        with self._lock:
            return self._workers.get(worker_id)

    def all(self) -> list[WorkerInfo]:
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: (w.role, w.worker_id))

    def serving(self, role: Role) -> list[WorkerInfo]:
        """Workers of `role` that take new requests."""
        return [w for w in self.all() if w.role == role and w.state == "serving"]
