"""Both sides of the two-process kvtransfer tests.

``worker_main`` runs in a spawned child: it builds a transport with seeded pools and serves
commands from the parent over a Pipe. :class:`Worker` is the parent's handle on such a child:
every call is bounded by a timeout and :meth:`Worker.kill` never fails, so tests can clean up
in ``finally`` / fixtures whatever happened.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import torch

from splitserve.kvtransfer import Compat, TransportConfig, make_transport

#: (dtype name, shape) or (dtype name, shape, device)
PoolSpec = tuple[str, tuple[int, ...]] | tuple[str, tuple[int, ...], str]

#: the pools of the functional tests: two pools with different block_bytes (1024 and 1056)
SMALL_POOLS: tuple[PoolSpec, ...] = (("float32", (32, 4, 64)), ("uint8", (32, 1056)))

IDLE_EXIT_S = 120.0  # a child whose parent went silent this long exits by itself


def make_pools(specs: Sequence[PoolSpec], seed: int | None) -> list[torch.Tensor]:
    """Deterministic pool contents: seeded random data, or zeros when ``seed`` is None."""
    g = torch.Generator().manual_seed(seed or 0)
    pools = []
    for spec in specs:
        dtype_name, shape = spec[0], spec[1]
        device = spec[2] if len(spec) == 3 else "cpu"  # type: ignore[misc]
        dtype = getattr(torch, dtype_name)
        if seed is None:
            pool = torch.zeros(shape, dtype=dtype)
        elif dtype.is_floating_point:
            pool = torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)
        else:
            pool = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(dtype)
        pools.append(pool.to(device))
    return pools


def pool_bytes(pools: Sequence[torch.Tensor]) -> list[bytes]:
    return [p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes() for p in pools]


def worker_main(
    conn: Connection,
    backend: str,
    name: str,
    compat_fields: dict[str, str],
    specs: Sequence[PoolSpec],
    seed: int | None,
    config: dict[str, float],
) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[{name} %(levelname)s %(name)s] %(message)s")
    transport = make_transport(backend, name, Compat(compat_fields), config=TransportConfig(**config))  # type: ignore[arg-type]
    pools = make_pools(specs, seed)
    transport.register_pools(pools)
    handles: dict[int, Any] = {}
    conn.send(("ready", (os.getpid(), transport.metadata())))
    try:
        while conn.poll(IDLE_EXIT_S):
            cmd, args = conn.recv()
            try:
                result: Any = None
                if cmd == "add_peer":
                    result = transport.add_peer(args[0])
                elif cmd == "write":
                    h = transport.write_blocks(*args)
                    handles[h.xfer_id] = h
                    result = (h.xfer_id, h.num_descriptors, h.nbytes)
                elif cmd == "poll":
                    h = handles[args[0]]
                    result = (transport.poll(h).value, transport.error(h))
                elif cmd == "wait":
                    h = handles[args[0]]
                    t0 = time.monotonic()
                    state = transport.wait(h, args[1])
                    result = (state.value, transport.error(h), time.monotonic() - t0)
                elif cmd == "release":
                    transport.release(handles.pop(args[0]))
                elif cmd == "wait_notifs":
                    result = transport.wait_notifs(args[0])
                elif cmd == "wait_notifs_then_snapshot":  # pool bytes the moment the notif is seen
                    got = transport.wait_notifs(args[0])
                    result = (got, pool_bytes(pools))
                elif cmd == "send_notif":
                    transport.send_notif(args[0], args[1])
                elif cmd == "zero":
                    for p in pools:
                        p.zero_()
                elif cmd == "pool_bytes":
                    result = pool_bytes(pools)
                elif cmd == "close":
                    t0 = time.monotonic()
                    transport.close()
                    result = time.monotonic() - t0
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", result))
            except Exception as e:
                conn.send(("err", f"{type(e).__name__}: {e}"))
            if cmd == "close":
                break
    finally:
        transport.close()
    # Skip the interpreter's teardown (torch's takes ~0.5-1 s): nothing is left to flush.
    logging.shutdown()
    os._exit(0)


class WorkerError(Exception):
    pass


class Worker:
    """A transport in a spawned child process, driven with bounded calls."""

    def __init__(
        self,
        backend: str,
        name: str,
        compat_fields: dict[str, str],
        specs: Sequence[PoolSpec] = SMALL_POOLS,
        seed: int | None = 0,
        config: dict[str, float] | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        ctx = mp.get_context("spawn")
        self.name = name
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=worker_main,
            args=(child, backend, name, compat_fields, tuple(specs), seed, config or {}),
            name=f"kvtransfer-test-{name}",
            daemon=True,
        )
        self.proc.start()
        child.close()
        self._start_timeout_s = start_timeout_s
        self._metadata: bytes | None = None  # the child's first message; wait for it lazily so
        # that several workers can start (import torch, build pools) at the same time

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    @property
    def metadata(self) -> bytes:
        """The child's transport metadata (waits, bounded, for the child to be ready)."""
        if self._metadata is None:
            tag, (pid, md) = self._recv(self._start_timeout_s)
            assert tag == "ready" and pid == self.pid, tag
            self._metadata = md
        return self._metadata

    def _recv(self, timeout_s: float) -> tuple[str, Any]:
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"worker {self.name!r} did not answer within {timeout_s} s")
        try:
            return self._conn.recv()
        except EOFError:
            raise WorkerError(f"worker {self.name!r} died (exit code {self.proc.exitcode})") from None

    def call(self, cmd: str, *args: Any, timeout_s: float = 30.0) -> Any:
        _ = self.metadata  # ready first
        self._conn.send((cmd, args))
        tag, value = self._recv(timeout_s)
        if tag == "err":
            raise WorkerError(f"worker {self.name!r}: {cmd} failed: {value}")
        return value

    def stop(self) -> None:
        """Close the transport (bounded), then make sure the process is gone."""
        stop_all([self])

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5.0)
        self._conn.close()


def stop_all(workers: Sequence[Worker], timeout_s: float = 15.0) -> None:
    """Ask every live worker to close at once, wait (bounded) for all, kill whatever is left."""
    asked = []
    for w in workers:
        if w.proc.is_alive() and w._metadata is not None:
            try:
                w._conn.send(("close", ()))
                asked.append(w)
            except OSError:
                pass
    deadline = time.monotonic() + timeout_s
    for w in asked:
        w.proc.join(max(0.0, deadline - time.monotonic()))
    for w in workers:
        w.kill()
