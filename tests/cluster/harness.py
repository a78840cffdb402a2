"""Real worker processes for cluster tests, without Ray: each worker is a spawned process running
the role's `serve(spec)`; the router side is a `DisaggBackend` over a `Directory` in the test."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field, replace

from splitserve.engine.config import EngineConfig
from splitserve.engine.runtime import WorkerSpec
from splitserve.router.cluster_backend import DisaggBackend
from splitserve.router.membership import Directory, WorkerInfo


def tcp_spec(ckpt, wid: str, role: str, engine: EngineConfig, **extra) -> WorkerSpec:
    """A worker over the TCP transfer backend with the short timeouts the cluster tests use."""
    return WorkerSpec(
        wid,
        role,
        str(ckpt),
        engine,
        transfer_backend="tcp",
        transfer_timeout_s=5.0,
        first_token_timeout_s=20.0,
        reserve_lease_s=10.0,
        **extra,
    )


def _worker_main(spec: WorkerSpec, q) -> None:  # runs in the child
    import logging

    logging.basicConfig(level=logging.WARNING)
    if spec.role == "prefill":
        from splitserve.prefill_worker.server import serve
    else:
        from splitserve.decode_worker.server import serve
    try:
        srv = serve(spec)
    except BaseException as e:  # noqa: BLE001
        q.put(("error", repr(e)))
        return
    q.put(("ok", srv.info()))
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    srv.stop(1.0)


def _follower_main(spec: WorkerSpec) -> None:  # rank >= 1 of a tensor-parallel worker, in the child
    import logging

    from splitserve.engine.runtime import FollowerRuntime

    logging.basicConfig(level=logging.WARNING)
    rt = FollowerRuntime(spec)
    rt.join(timeout=3600.0)  # until the leader says stop (or dies: the test kills this process)


@dataclass
class WorkerProc:
    spec: WorkerSpec
    proc: mp.Process
    info: dict
    followers: list[mp.Process] = field(default_factory=list)  # ranks 1.. of a tensor-parallel worker

    def kill(self) -> None:
        for p in [self.proc, *self.followers]:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)

    def stop(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.join(10)
        for p in self.followers:  # released by the leader's stop; bounded either way
            p.join(10)
        if self.proc.is_alive() or any(p.is_alive() for p in self.followers):
            self.kill()


def start_workers(specs: list[WorkerSpec], timeout_s: float = 120.0) -> list[WorkerProc]:
    """Each spec's worker in spawned processes: rank 0 serves; a spec of tensor_parallel_size N gets
    N - 1 follower processes too (its dist_init_method, e.g. from `tp_init()`, is their rendezvous)."""
    ctx = mp.get_context("spawn")
    started = []
    for spec in specs:
        q = ctx.Queue()
        p = ctx.Process(target=_worker_main, args=(spec, q), daemon=True)
        p.start()
        followers = []
        for r in range(1, spec.tensor_parallel_size):
            f = ctx.Process(target=_follower_main, args=(replace(spec, rank=r),), daemon=True)
            f.start()
            followers.append(f)
        started.append((spec, p, q, followers))
    out = []
    try:
        for spec, p, q, followers in started:
            status, info = q.get(timeout=timeout_s)
            if status != "ok":
                raise RuntimeError(f"worker {spec.worker_id} failed to start: {info}")
            out.append(WorkerProc(spec, p, info, followers))
    except BaseException:
        for _, p, _, followers in started:
            for x in [p, *followers]:
                if x.is_alive():
                    x.kill()
        raise
    return out


def tp_init(tmp_path, wid: str) -> str:
    """A rendezvous for the ranks of worker `wid` (a file that does not exist yet)."""
    return f"file://{tmp_path / f'tp-{wid}'}"


def directory_of(workers: list[WorkerProc]) -> Directory:
    d = Directory()
    for w in workers:
        i = w.info
        d.add(WorkerInfo(i["worker_id"], i["role"], i["address"], pid=i["pid"], node=i["node"]))
    return d


def wait_for(pred, timeout_s: float, what: str, interval_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


@contextlib.asynccontextmanager
async def started_backend(directory: Directory, **options):
    """The router's cluster backend over `directory`, started (worker poller) and closed after use."""
    b = DisaggBackend(directory, **options)
    await b.start()
    try:
        yield b
    finally:
        await b.close()
