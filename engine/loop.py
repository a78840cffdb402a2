"""An Engine running in its own thread, for the gRPC workers.

The engine is not thread-safe: only the loop thread touches it. Other threads (gRPC handlers)
submit work with `call(fn)` — fn(engine) runs in the loop thread between two steps and its result
comes back through a future; `submit(fn)` queues it without waiting (the prefill worker's cleanup
after a delivered cache) — and read a request's outputs from the queue `subscribe()` returned.
A call that times out is cancelled when it has not started (it never runs); when it has, its `undo`
runs in the loop thread once it is done, so what it did is taken back (`CallTimeout.ran` says which).
`after_step` hooks run in the loop thread after every step (the prefill worker sends the cache
blocks that a step completed).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from .engine import Engine
from .request import RequestOutput

log = logging.getLogger(__name__)
T = TypeVar("T")


class CallTimeout(TimeoutError):
    """`EngineLoop.call` gave up waiting. ran=False: the call was cancelled and never runs; ran=True: it
    started before the timeout, and its undo (if given) runs in the loop thread once it is done."""

    def __init__(self, message: str, ran: bool) -> None:
        super().__init__(message)
        self.ran = ran


class EngineLoop:
    def __init__(self, engine: Engine, name: str = "engine") -> None:
        self.engine = engine
        self._calls: queue.Queue[tuple[Callable[[Engine], object], Future]] = queue.Queue()
        self._subs: dict[str, queue.Queue[RequestOutput | BaseException]] = {}
        self._subs_lock = threading.Lock()
        self.after_step: list[Callable[[Engine, list[RequestOutput]], None]] = []
        self.idle_hooks: list[Callable[[Engine], None]] = []  # run when idle, ~every idle_interval
        self.idle_interval = 0.05
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._calls.put((lambda e: None, Future()))
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def stopped_cleanly(self) -> bool:
        """The loop thread has ended through stop(), not by an error (no step is half done)."""
        return not self._thread.is_alive() and self.error is None

    # ---- API for other threads ---------------------------------------------------------------
    def call(
        self, fn: Callable[[Engine], T], timeout: float = 30.0, undo: Callable[[Engine, T], object] | None = None
    ) -> T:
        """Run fn(engine) in the loop thread; re-raises its exception here. Past `timeout`, raises
        CallTimeout: the call never runs (ran=False) or, having started, is taken back by
        undo(engine, its result) in the loop thread (ran=True; nothing to undo if it raised)."""
        fut = self.submit(fn)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            if fut.cancel():
                raise CallTimeout(f"engine call not started within {timeout:.1f} s (cancelled)", ran=False) from None
            if undo is not None:
                fut.add_done_callback(lambda f: self._undo_when_done(f, undo))
            raise CallTimeout(f"engine call not done within {timeout:.1f} s (undone when it is)", ran=True) from None

    def submit(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Queue fn(engine) for the loop thread (between two steps) without waiting for it."""
        if not self.alive:
            raise RuntimeError(f"engine loop is not running ({self.error!r})")
        fut: Future = Future()
        self._calls.put((fn, fut))
        return fut

    def _undo_when_done(self, fut: Future, undo: Callable[[Engine, T], object]) -> None:
        if fut.exception() is None:
            result = fut.result()
            self._calls.put((lambda e: undo(e, result), Future()))

    def subscribe(self, request_id: str) -> queue.Queue[RequestOutput | BaseException]:
        q: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        with self._subs_lock:
            self._subs[request_id] = q
        return q

    def unsubscribe(self, request_id: str) -> None:
        with self._subs_lock:
            self._subs.pop(request_id, None)

    # ---- the thread ---------------------------------------------------------------------------
    def _drain_calls(self, block: bool) -> None:
        try:
            item = self._calls.get(timeout=self.idle_interval) if block else self._calls.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)
            try:
                item = self._calls.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                busy = self.engine.has_work
                self._drain_calls(block=not busy)
                if not self.engine.has_work:
                    for hook in self.idle_hooks:
                        hook(self.engine)
                    continue
                outputs = self.engine.step()
                with self._subs_lock:
                    for out in outputs:
                        q = self._subs.get(out.request_id)
                        if q is not None:
                            q.put(out)
                for after in self.after_step:
                    after(self.engine, outputs)
        except BaseException as e:  # noqa: BLE001 - a dead loop must be visible to every waiter
            log.exception("engine loop died")
            self.error = e
            with self._subs_lock:
                for q in self._subs.values():
                    q.put(e)
            while True:
                try:
                    _, fut = self._calls.get_nowait()
                except queue.Empty:
                    break
                fut.set_exception(RuntimeError(f"engine loop died: {e!r}"))
