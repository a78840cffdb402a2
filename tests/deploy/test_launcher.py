"""The Ray launcher with real processes: a local Ray cluster, real prefill/decode worker actors serving
real gRPC, the router app over them.

One module-scoped 1P1D cluster from deploy/local.yaml (transfer tcp, router port 0, 4 logical Ray CPUs
so a third worker fits on this 2-core machine). Every wait is bounded; the last test shuts the cluster
down and checks that no worker or Ray process is left (the fixture shuts down again if a test failed).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import httpx
import pytest
import ray

from splitserve.deploy.config import DEFAULT_CONFIG_PATH, ClusterConfig, load_config, parse_config
from splitserve.deploy.controller import Controller, ControllerError, WorkerStartError
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.protos.auth import channel
from splitserve.router.membership import Directory, WorkerInfo
from splitserve.tests.helpers import ServeThread, all_pids, pid_alive, proc_stat, wait_until

pytestmark = pytest.mark.timeout(240)

STATUS_KEYS = {
    "id",
    "role",
    "state",
    "pid",
    "node",
    "gpus",
    "gpu_share",
    "blocks_used",
    "blocks_total",
    "requests_done",
    "weight_bytes",
    "tensor_parallel_size",
    "expert_parallel",
    "ranks",
}
RPC_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------------------------
# helpers


def local_cfg(**changes: Any) -> ClusterConfig:
    """deploy/local.yaml with test overrides; `section__field=value` changes more."""
    data = load_config(DEFAULT_CONFIG_PATH).model_dump()
    data["model"]["path"] = "tiny"  # local.yaml serves pycoder; these tests ask for the tiny checkpoint
    data["transfer"]["backend"] = "tcp"
    data["router"]["port"] = 0
    data["ray"]["num_cpus"] = 4
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    return parse_config(data)


class RecordingDirectory(Directory):
    """A Directory that records membership changes in order: ("add"|"state"|"remove", worker id, state)."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, str | None]] = []
        self._events_lock = threading.Lock()

    def _record(self, *event: Any) -> None:
        with self._events_lock:
            self.events.append(event)  # type: ignore[arg-type]

    def add(self, info: WorkerInfo) -> None:
        self._record("add", info.worker_id, info.state)
        super().add(info)

    def update(self, worker_id: str, **changes: object) -> WorkerInfo | None:
        if "state" in changes:
            self._record("state", worker_id, changes["state"])
        return super().update(worker_id, **changes)

    def remove(self, worker_id: str) -> WorkerInfo | None:
        self._record("remove", worker_id, None)
        return super().remove(worker_id)

    def history(self, worker_id: str) -> list[tuple[str, str | None]]:
        with self._events_lock:
            return [(kind, state) for kind, wid, state in self.events if wid == worker_id]


def ray_descendants(root: int) -> set[int]:
    """Ray processes (gcs, raylet, agents, workers) below `root` in the process tree."""
    children: dict[int, list[int]] = {}
    cmd: dict[int, str] = {}
    for pid in all_pids():
        fields = proc_stat(pid)
        if fields is None:
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd[pid] = f.read().decode(errors="replace").lower()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(pid)
    out: set[int] = set()
    stack = [root]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return {p for p in out if "ray" in cmd.get(p, "")}


def stub_for(info: WorkerInfo, channel: grpc.Channel) -> Any:
    return (pbg.PrefillWorkerStub if info.role == "prefill" else pbg.DecodeWorkerStub)(channel)


SECRET: dict[str, str] = {}  # the module cluster's secret, set by the fixture


def health(info: WorkerInfo) -> tuple[pb.HealthReply, pb.StatsReply]:
    with channel(info.address, SECRET["secret"]) as ch:
        stub = stub_for(info, ch)
        return (
            stub.Health(pb.HealthRequest(), timeout=RPC_TIMEOUT_S),
            stub.Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S),
        )


# ----------------------------------------------------------------------------------------------
# a worker that cannot start (runs first: its own short-lived Ray cluster)


def test_start_failure_names_the_worker_and_leaves_nothing() -> None:
    directory = Directory()
    controller = Controller(local_cfg(model__path="/nonexistent/checkpoint"), directory, start_timeout_s=90)
    with pytest.raises(WorkerStartError) as err:
        controller.start()
    assert set(err.value.failures) == {"prefill-0", "decode-0"}
    for wid, why in err.value.failures.items():
        assert "/nonexistent/checkpoint" in why, why  # the worker's own error, not a generic one
        assert wid in str(err.value)
    assert not ray.is_initialized()  # start() shut its local Ray cluster down again
    assert directory.all() == []
    assert ray_descendants(os.getpid()) == set()


# ----------------------------------------------------------------------------------------------
# the module's cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimpleNamespace]:
    cfg = local_cfg()
    directory = RecordingDirectory()
    controller = Controller(
        cfg, directory, start_timeout_s=120, drain_timeout_s=30, monitor_interval_s=0.5, ping_timeout_s=3.0
    )
    t0 = time.monotonic()
    controller.start()
    SECRET["secret"] = controller.cluster_secret
    ctx = SimpleNamespace(
        cfg=cfg, controller=controller, directory=directory, start_s=time.monotonic() - t0, worker_pids=set()
    )
    try:
        yield ctx
    finally:
        controller.shutdown()


def test_pools_start_and_serve(cluster: SimpleNamespace) -> None:
    d: RecordingDirectory = cluster.directory
    assert cluster.start_s < 120
    assert [w.worker_id for w in d.all()] == ["decode-0", "prefill-0"]
    for w in d.all():
        assert w.state == "serving"
        assert d.history(w.worker_id)[0] == ("add", "serving")  # added once it serves, never before
        h, _ = health(w)
        assert h.state == pb.SERVING_STATE_SERVING and h.worker_id == w.worker_id
    # decode workers come with the transfer metadata prefill workers need to write to them
    assert d.get("decode-0").transfer_metadata  # type: ignore[union-attr]


def test_status_shape_and_real_pids(cluster: SimpleNamespace) -> None:
    st = cluster.controller.status()
    assert set(st) == {"router", "workers"}
    assert set(st["router"]) == {"url"}
    workers = st["workers"]
    assert [(w["id"], w["role"]) for w in workers] == [("prefill-0", "prefill"), ("decode-0", "decode")]
    pids = set()
    for w in workers:
        assert set(w) == STATUS_KEYS
        assert w["state"] == "serving"
        assert w["gpus"] == [] and w["gpu_share"] == 0.0  # a CPU cluster: no GPU share
        pool = cluster.cfg.prefill if w["role"] == "prefill" else cluster.cfg.decode
        assert w["blocks_total"] == pool.num_blocks
        assert 0 <= w["blocks_used"] <= w["blocks_total"]
        pid = w["pid"]
        assert isinstance(pid, int) and pid != os.getpid()
        os.kill(pid, 0)  # exists (raises if not)
        assert pid_alive(pid)
        # it is the process serving the worker's gRPC: the server reports its own pid
        info = cluster.directory.get(w["id"])
        assert info is not None and info.pid == pid
        _, stats = health(info)
        assert stats.pid == pid
        pids.add(pid)
        cluster.worker_pids.add(pid)
    assert len(pids) == 2


def test_workers_refuse_calls_without_the_cluster_secret(cluster: SimpleNamespace) -> None:
    secret = cluster.controller.cluster_secret
    assert len(secret) >= 32 and secret not in repr(cluster.controller.worker_info("decode-0"))
    for w in cluster.directory.all():
        for ch in (grpc.insecure_channel(w.address), channel(w.address, secret + "-wrong")):
            with ch, pytest.raises(grpc.RpcError) as err:
                stub_for(w, ch).Stats(pb.StatsRequest(), timeout=RPC_TIMEOUT_S)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        h, _ = health(w)  # the controller's secret opens it
        assert h.worker_id == w.worker_id
    # the secret reached the workers through Ray, not through their environment or command line
    for w in cluster.directory.all():
        with open(f"/proc/{w.pid}/environ", "rb") as f:
            assert secret.encode() not in f.read()
        with open(f"/proc/{w.pid}/cmdline", "rb") as f:
            assert secret.encode() not in f.read()


def test_unplaceable_pool_is_reported(cluster: SimpleNamespace) -> None:
    cfg = local_cfg(decode__resources={"no_such_node": 1.0})
    probe = Controller(cfg, Directory())
    with pytest.raises(ControllerError, match="no node of the Ray cluster can host a decode worker.*no_such_node"):
        probe._check_feasible("decode")
    probe._check_feasible("prefill")


def test_completion_through_the_router_and_admin(cluster: SimpleNamespace) -> None:
    from splitserve.deploy.launcher import build_router_app, resolve_model

    model = resolve_model(cluster.cfg)
    shutdowns: list[str] = []
    app, _ = build_router_app(
        cluster.cfg,
        cluster.directory,
        model,
        controller=cluster.controller,
        api_key="client-key",
        operator_token="operator-token",
        request_shutdown=lambda: shutdowns.append("asked"),
    )
    clients = {"Authorization": "Bearer client-key"}
    with ServeThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60, headers=clients) as client:
        wait_until(lambda: client.get("/health").status_code == 200, 20, "/health")
        # the clients' API key opens the public API only: it cannot scale or stop the cluster
        for method, path, body in (
            ("GET", "/admin/status", None),
            ("POST", "/admin/scale", {"decode": 2}),
            ("POST", "/admin/shutdown", None),
        ):
            r = client.request(method, path, json=body)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_operator_token", (path, r.text)
        assert shutdowns == [] and cluster.controller.targets == {"prefill": 1, "decode": 1}
        client.headers["Authorization"] = "Bearer operator-token"
        assert client.get("/v1/models").status_code == 401  # the operator token is no API key
        client.headers.update(clients)
        r = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "def fib(n):", "max_tokens": 8, "temperature": 0}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] in ("length", "stop")
        assert 1 <= body["usage"]["completion_tokens"] <= 8
        # the same request again gives the same greedy text (both runs went through prefill -> decode)
        r2 = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "def fib(n):", "max_tokens": 8, "temperature": 0}
        )
        assert r2.json()["choices"][0]["text"] == body["choices"][0]["text"]

        client.headers["Authorization"] = "Bearer operator-token"
        st = client.get("/admin/status")
        assert st.status_code == 200
        done = {w["id"]: w["requests_done"] for w in st.json()["workers"]}
        assert done["prefill-0"] >= 2 and done["decode-0"] >= 2
        bad = client.post("/admin/scale", json={"decode": 0})
        assert bad.status_code == 400 and "decode" in bad.json()["error"]["message"]
        assert client.post("/admin/scale", json={}).status_code == 400
        assert client.post("/admin/shutdown").status_code == 200
        wait_until(lambda: shutdowns == ["asked"], 10, "the shutdown hook")  # the operator can stop it
    assert cluster.controller.targets == {"prefill": 1, "decode": 1}


def test_scale_decode_up_then_down_drains(cluster: SimpleNamespace) -> None:
    c: Controller = cluster.controller
    d: RecordingDirectory = cluster.directory
    st = c.scale(decode=2)
    decode = [w for w in st["workers"] if w["role"] == "decode"]
    assert [w["id"] for w in decode] == ["decode-0", "decode-1"]
    assert all(w["state"] == "serving" for w in decode)
    assert c.targets == {"prefill": 1, "decode": 2}
    new = d.get("decode-1")
    assert new is not None and new.state == "serving" and new.pid not in cluster.worker_pids
    h, _ = health(new)
    assert h.worker_id == "decode-1"
    new_pid = new.pid

    # Work in flight on decode-1: a reservation (counted as waiting) that lives for `lease` seconds.
    lease_s = 3.0
    with channel(new.address, c.cluster_secret) as ch:
        rep = pbg.DecodeWorkerStub(ch).Reserve(
            pb.ReserveRequest(request_id="drain-test", prompt_len=100, max_tokens=4, lease_ms=int(lease_s * 1000)),
            timeout=RPC_TIMEOUT_S,
        )
    assert rep.HasField("reservation")
    t0 = time.monotonic()
    st = c.scale(decode=1)
    took = time.monotonic() - t0
    assert [w["id"] for w in st["workers"] if w["role"] == "decode"] == ["decode-0"]
    assert [w.worker_id for w in d.serving("decode")] == ["decode-0"]
    assert d.get("decode-1") is None
    # the router was told first ("draining"), the worker was removed only after its work was done
    hist = d.history("decode-1")
    assert hist.index(("state", "draining")) < hist.index(("remove", None))
    assert took >= lease_s - 0.5, f"scale-down returned after {took:.1f} s, before the reservation ended"
    assert took < 30
    wait_until(lambda: not pid_alive(new_pid), 20, "the removed worker's process to exit")
    assert c.targets == {"prefill": 1, "decode": 1}
    # the oldest worker kept serving throughout
    assert d.history("decode-0") == [("add", "serving")]


def test_killed_worker_is_noticed_and_replaced(cluster: SimpleNamespace) -> None:
    c: Controller = cluster.controller
    d: RecordingDirectory = cluster.directory
    old = d.serving("decode")[0]
    os.kill(old.pid, signal.SIGKILL)
    noticed_s = wait_until(
        lambda: (w := d.get(old.worker_id)) is None or w.state == "dead", 15, "the controller to notice the dead worker"
    )
    assert noticed_s < 10
    assert ("state", "dead") in d.history(old.worker_id)
    wait_until(
        lambda: [w.worker_id for w in d.serving("decode")] not in ([], [old.worker_id]),
        90,
        "a replacement decode worker",
    )
    (new,) = d.serving("decode")
    assert new.worker_id != old.worker_id and new.pid != old.pid and pid_alive(new.pid)
    assert d.get(old.worker_id) is None
    assert any(wid == old.worker_id for wid, _ in c.replaced)
    h, _ = health(new)
    assert h.state == pb.SERVING_STATE_SERVING and h.worker_id == new.worker_id
    st = c.status()
    assert [(w["role"], w["state"]) for w in st["workers"]] == [("prefill", "serving"), ("decode", "serving")]
    assert c.targets == {"prefill": 1, "decode": 1}


def test_shutdown_leaves_no_process(cluster: SimpleNamespace) -> None:
    c: Controller = cluster.controller
    pids = {w["pid"] for w in c.status()["workers"]} | cluster.worker_pids
    ray_procs = ray_descendants(os.getpid())
    assert pids <= ray_procs | pids and ray_procs  # the local Ray cluster is this process's child
    c.shutdown()
    assert not ray.is_initialized()
    assert cluster.directory.all() == []
    wait_until(lambda: not any(pid_alive(p) for p in pids | ray_procs), 30, "every worker and Ray process to exit")
    c.shutdown()  # idempotent
