"""Bounded admission: at most `max_queued` requests in flight or waiting; beyond that the router answers 429."""

from __future__ import annotations

import asyncio
import logging

logger = logging.getLogger(__name__)


class AdmissionRejected(Exception):
    pass


class Admission:
    """`max_queued` bounds the requests in the router (running + waiting); `max_running`, if set, bounds
    how many of them are handed to the backend at once (the rest wait, in arrival order)."""

    def __init__(self, max_queued: int, max_running: int | None = None) -> None:
        if max_queued < 1:
            raise ValueError("max_queued must be >= 1")
        if max_running is not None and max_running < 1:
            raise ValueError("max_running must be >= 1")
        self.max_queued = max_queued
        self.max_running = max_running
        self._count = 0
        self._sem = asyncio.Semaphore(max_running) if max_running is not None else None

    @property
    def count(self) -> int:
        return self._count

    def try_enter(self) -> None:
        """Takes a place or raises `AdmissionRejected` (never waits)."""
        if self._count >= self.max_queued:
            raise AdmissionRejected(f"{self._count} requests already queued (limit {self.max_queued})")
        self._count += 1

    async def wait_turn(self) -> None:
        """After `try_enter`: waits until the request may run (no-op without `max_running`)."""
        if self._sem is not None:
            await self._sem.acquire()

    def leave(self, started: bool) -> None:
        """Gives the place back; `started` says whether `wait_turn` had returned."""
        self._count -= 1
        if started and self._sem is not None:
            self._sem.release()
