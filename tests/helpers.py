"""Helpers shared by the tests that run servers: bounded waiting and the router app under uvicorn."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn


def wait_until(cond: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.1) -> float:
    """Poll `cond` until it is truthy; returns the seconds it took; fails the test after `timeout_s`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - t0


class ServeThread:
    """An ASGI app under uvicorn (lifespan on, as `splitserve up` serves it) in a thread, on a free port."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServeThread:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), 30, "uvicorn to start")
        assert self.server.started
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        assert not self.thread.is_alive()


def proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, session, ...), or None
    when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid` (Ray's daemons keep the session they started in)."""
    out = []
    for pid in all_pids():
        fields = proc_stat(pid)
        if fields is not None and int(fields[3]) == sid and fields[0] != "Z":
            out.append(pid)
    return out
