"""Where a request goes: ONE ranking used by both modes (the prefill pool and the decode pool of the
disaggregated mode, the decode pool of the co-located mode).

Policies (`router.policy`):
* least_loaded: by the caller's load key (the router's own in-flight counts first: fresher than the
  polled Stats, so a burst spreads over the workers instead of piling onto the one the last poll
  showed least loaded);
* round_robin: the workers in id order, rotated by one per request;
* prefix_affinity: the prompt prefix's home worker (rendezvous hash of its first 64 tokens: its
  prefix cache is warm, and only a removed worker's prefixes move), unless its backlog exceeds the
  least loaded one's by more than 4 prompts' worth; then least_loaded.

Workers whose last polls failed (`failures > 0`) rank after the others in every policy: the
controller alone decides whether they are dead, the router only avoids them while they look gone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from .membership import WorkerInfo

POLICIES = ("least_loaded", "round_robin", "prefix_affinity")


def affinity_ranked(prompt: list[int], workers: list[WorkerInfo]) -> list[WorkerInfo]:
    key = hashlib.blake2b(repr(prompt[:64]).encode(), digest_size=8).digest()
    return sorted(workers, key=lambda w: hashlib.blake2b(key + w.worker_id.encode(), digest_size=8).digest())


class InFlight:
    """What this router has sent and not yet seen end, per worker."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}  # requests reserving, reserved, prefilling or streaming
        self.prompt_tokens: dict[str, int] = {}  # prompt tokens sent whose first token is not back yet

    @staticmethod
    def add(table: dict[str, int], worker_id: str, n: int) -> None:
        """Add n to a worker's count; zero counts are dropped (no stale entries for workers that go)."""
        left = table.get(worker_id, 0) + n
        if left:
            table[worker_id] = left
        else:
            table.pop(worker_id, None)


class RoutingPolicy:
    def __init__(self, name: str = "least_loaded") -> None:
        if name not in POLICIES:
            raise ValueError(f"routing policy {name!r}: expected one of {', '.join(POLICIES)}")
        self.name = name
        self._rr = 0

    def rank(
        self,
        workers: list[WorkerInfo],
        prompt: list[int],
        load: Callable[[WorkerInfo], Any],
        backlog: Callable[[WorkerInfo], int],
    ) -> list[WorkerInfo]:
        """`workers` best first. load: the least_loaded sort key; backlog: prompt tokens waiting there."""
        if not workers:
            return []
        ranked = self._by_policy(workers, prompt, load, backlog)
        return [w for w in ranked if not w.failures] + [w for w in ranked if w.failures]

    def _by_policy(
        self,
        workers: list[WorkerInfo],
        prompt: list[int],
        load: Callable[[WorkerInfo], Any],
        backlog: Callable[[WorkerInfo], int],
    ) -> list[WorkerInfo]:
        by_load = sorted(workers, key=load)
        if self.name == "round_robin":
            self._rr += 1
            by_id = sorted(workers, key=lambda w: w.worker_id)
            k = self._rr % len(by_id)
            return by_id[k:] + by_id[:k]
        if self.name == "prefix_affinity":
            home = affinity_ranked(prompt, workers)[0]
            if backlog(home) <= backlog(by_load[0]) + 4 * max(64, len(prompt)):
                return [home] + [w for w in by_load if w is not home]
        return by_load
