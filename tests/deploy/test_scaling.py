"""Scaling the embedded default on a real local Ray cluster: it never hangs.

One module-scoped 1P1D cluster from deploy/local.yaml as shipped (ray.num_cpus null, so the local Ray
cluster is sized by the controller; the TCP transfer backend; router port 0). The pools grow to the
issue's 2 prefill + 3 decode on this 2-core machine, a new worker serves while another one of the same
scale is still starting, and a scale that cannot be placed fails within seconds, naming the settings
that fix it. Every wait is bounded; the last test shuts down and checks no process is left.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from splitserve.deploy.config import DEFAULT_CONFIG_PATH, load_config, parse_config
from splitserve.deploy.controller import LOCAL_ROOM_WORKERS, Controller, PlacementError, _Worker
from splitserve.router.membership import Directory
from splitserve.tests.helpers import pid_alive, wait_until

pytestmark = pytest.mark.timeout(420)


@ray.remote(num_cpus=0, max_concurrency=2)
class NeverReady:
    """Stands in for a worker whose model takes long to load: info() answers only once released."""

    def __init__(self) -> None:
        self.released = threading.Event()

    def info(self) -> dict[str, Any]:
        self.released.wait(120)
        raise RuntimeError("released without ever serving")

    def release(self) -> None:
        self.released.set()


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimpleNamespace]:
    data = load_config(DEFAULT_CONFIG_PATH).model_dump()
    data["model"]["path"] = "tiny"  # the fast random-weight model (local.yaml serves pycoder)
    data["transfer"]["backend"] = "tcp"
    data["router"]["port"] = 0
    cfg = parse_config(data)
    assert cfg.ray.num_cpus is None  # the local cluster is sized by the controller, as `splitserve up` does
    directory = Directory()
    controller = Controller(
        cfg, directory, start_timeout_s=150, drain_timeout_s=30, monitor_interval_s=0.5, ping_timeout_s=5.0
    )
    controller.start()
    try:
        yield SimpleNamespace(cfg=cfg, controller=controller, directory=directory, pids=set())
    finally:
        controller.shutdown()


def serving(d: Directory, role: str) -> list[str]:
    return sorted(w.worker_id for w in d.serving(role))


def test_cpu_workers_take_a_fraction_and_the_local_cluster_has_room_to_grow(cluster: SimpleNamespace) -> None:
    cfg = cluster.cfg
    assert cfg.prefill.cpus_per_worker == cfg.decode.cpus_per_worker == 0.25
    want = max(os.cpu_count() or 1, LOCAL_ROOM_WORKERS * 0.25)
    assert cluster.controller.local_num_cpus() == want
    assert ray.cluster_resources()["CPU"] == want
    # the two workers hold 2 x 0.25 of it
    wait_until(lambda: ray.available_resources().get("CPU") == want - 0.5, 10, "Ray to account the workers")


def test_unplaceable_scale_fails_within_seconds_and_changes_nothing(cluster: SimpleNamespace) -> None:
    c: Controller = cluster.controller
    before = c.status()["workers"]
    cpus = ray.cluster_resources()["CPU"]
    too_many = int(cpus / 0.25) + 2  # more decode workers than the local cluster's CPUs can hold
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        c.scale(decode=too_many)
    took = time.monotonic() - t0
    assert took < 10, f"an unplaceable scale took {took:.1f} s to fail"
    msg = str(err.value)
    assert f"{too_many - 1} more decode workers" in msg and "CPU" in msg
    assert "decode.cpus_per_worker" in msg and "ray.num_cpus" in msg  # the settings that fix it
    assert c.targets == {"prefill": 1, "decode": 1}
    assert [(w["id"], w["state"]) for w in c.status()["workers"]] == [(w["id"], w["state"]) for w in before]


def test_a_new_worker_serves_while_another_is_still_starting(cluster: SimpleNamespace) -> None:
    c: Controller = cluster.controller
    d: Directory = cluster.directory
    slow = _Worker("decode-99", "decode", 99, NeverReady.remote())
    result: dict[str, Any] = {}

    def wait_for_both() -> None:
        with c._ops_lock:  # as scale() holds it
            real = c._launch("decode")
            result["real"] = real.worker_id
            result["out"] = c._await_ready([real, slow])

    t = threading.Thread(target=wait_for_both, daemon=True)
    t.start()
    try:
        wait_until(lambda: "real" in result and result["real"] in serving(d, "decode"), 150, "the new worker to serve")
        assert t.is_alive(), "the wait returned before the slow worker answered"
        assert d.get("decode-99") is None
    finally:
        slow.actor.release.remote()
        t.join(60)
    assert not t.is_alive()
    ready, failed = result["out"]
    assert [w.worker_id for w in ready] == [result["real"]]
    assert "released without ever serving" in failed["decode-99"]
    c.scale(decode=1)  # the extra worker goes again (drained: it has nothing in flight)
    assert serving(d, "decode") == ["decode-0"]


def test_scale_to_two_prefill_three_decode_on_the_embedded_default(cluster: SimpleNamespace) -> None:
    c: Controller = cluster.controller
    d: Directory = cluster.directory
    t0 = time.monotonic()
    st = c.scale(prefill=2, decode=3)
    took = time.monotonic() - t0
    assert took < 240
    assert c.targets == {"prefill": 2, "decode": 3}
    assert [(w["role"], w["state"]) for w in st["workers"]] == [("prefill", "serving")] * 2 + [
        ("decode", "serving")
    ] * 3
    assert len(serving(d, "prefill")) == 2 and len(serving(d, "decode")) == 3
    pids = {w["pid"] for w in st["workers"]}
    assert len(pids) == 5 and all(pid_alive(p) for p in pids)
    cluster.pids |= pids
    st = c.scale(prefill=1, decode=1)
    assert [w["id"] for w in st["workers"]] == ["prefill-0", "decode-0"]


def test_shutdown_leaves_no_worker(cluster: SimpleNamespace) -> None:
    c: Controller = cluster.controller
    pids = {w["pid"] for w in c.status()["workers"]} | cluster.pids
    c.shutdown()
    assert not ray.is_initialized()
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "every worker process to exit")
