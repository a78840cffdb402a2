"""A two-node Ray cluster on loopback: `ray start --head` labelled {"prefill_node": 1} and a second node
labelled {"decode_node": 1}, both real daemons started here in their own sessions (unique ports, own
temp dir). The config pins each pool to its node group through `<pool>.resources` and joins the
cluster through `ray.address`; the workers must land on the right nodes and serve a request across them.

Self-contained and serial: only the processes of the two sessions started here are stopped at the end
(never `ray stop`, which would stop every Ray process of the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import httpx
import pytest
import ray

from splitserve.deploy.config import DEFAULT_CONFIG_PATH, ClusterConfig, load_config, parse_config
from splitserve.deploy.controller import Controller, PlacementError
from splitserve.router.membership import Directory
from splitserve.tests.helpers import ServeThread, pid_alive, session_pids, wait_until

pytestmark = pytest.mark.timeout(300)

NAMESPACE = "splitserve-two-node-test"


def driver_auth_mode() -> str:
    """Ray's token authentication mode of this process: a local ray.init() earlier in the process (another
    test module) turns it on for good, and a joining driver cannot change it. The nodes started here use
    the same mode, so the test passes alone and after the others."""
    from ray._raylet import AuthenticationMode, get_authentication_mode

    return "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_session(sid: int, timeout_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in session_pids(sid):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(sid):
            return


def ray_logs(temp_dir: str) -> str:
    """The tails of the newest session's GCS and raylet logs: why a node did not come up."""
    logs = os.path.join(temp_dir, "session_latest", "logs")
    tails = []
    for name in ("gcs_server.out", "gcs_server.err", "raylet.out", "raylet.err"):
        try:
            with open(os.path.join(logs, name), errors="replace") as f:
                tails.append(f"--- {name}\n{f.read()[-1500:]}")
        except OSError:
            continue
    return "\n".join(tails)


def ray_start(
    make_args: Callable[[], list[str]], env: dict[str, str], sessions: list[int], temp_dir: str, attempts: int = 3
) -> tuple[list[str], int]:
    """`ray start` in a new session (its daemons keep that session id, so they can be found and stopped).

    `make_args` picks fresh ports on each call. A node that does not register within Ray's own 30 s (a port
    taken between picking and binding, a GCS slow to answer on a loaded 2-core CI machine) is stopped and
    started again on new ports, `attempts` times at most. Every session tried stays in `sessions` (the fixture's
    check that nothing is left running covers the failed ones too); the args that worked and their session id
    are returned."""
    ports = [
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
    ]
    failures = []
    for _ in range(attempts):
        args = make_args()
        cmd = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            *args,
            "--num-cpus",
            "2",
            "--object-store-memory",
            str(100 * 1024 * 1024),
            "--disable-usage-stats",
        ]
        for flag in ports:
            cmd += [flag, str(free_port())]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        sessions.append(proc.pid)
        out, _ = proc.communicate(timeout=120)
        if proc.returncode == 0:
            return args, proc.pid
        failures.append(f"{' '.join(cmd)} failed:\n{out[-2000:]}\n{ray_logs(temp_dir)}")
        kill_session(proc.pid)
    raise AssertionError(f"ray start failed {attempts} times:\n" + "\n\n".join(failures))


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[SimpleNamespace]:
    temp_dir = tempfile.mkdtemp(prefix="ssray", dir="/tmp")  # short: Ray puts unix sockets below it
    env = {**os.environ, "RAY_AUTH_MODE": driver_auth_mode()}
    env.pop("RAY_ADDRESS", None)
    sessions: list[int] = []
    try:
        head, head_sid = ray_start(
            lambda: [
                "--head",
                f"--port={free_port()}",
                "--temp-dir",
                temp_dir,
                "--include-dashboard=false",
                "--ray-client-server-port",
                str(free_port()),
                "--resources",
                json.dumps({"prefill_node": 1}),
            ],
            env,
            sessions,
            temp_dir,
        )
        address = "127.0.0.1:" + head[1].removeprefix("--port=")
        _, node_sid = ray_start(
            lambda: [f"--address={address}", "--resources", json.dumps({"decode_node": 1})], env, sessions, temp_dir
        )
        yield SimpleNamespace(address=address, node_sessions=[head_sid, node_sid])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for sid in reversed(sessions):
            kill_session(sid)
        shutil.rmtree(temp_dir, ignore_errors=True)
        leftover = [p for sid in sessions for p in session_pids(sid)]
        assert not leftover, f"Ray processes left running: {leftover}"


def two_node_cfg(address: str) -> ClusterConfig:
    data = load_config(DEFAULT_CONFIG_PATH).model_dump()
    data["model"]["path"] = "tiny"  # the fast random-weight model (local.yaml serves pycoder)
    data["transfer"]["backend"] = "tcp"
    data["router"]["port"] = 0
    data["prefill"]["resources"] = {"prefill_node": 1.0}
    data["decode"]["resources"] = {"decode_node": 1.0}
    data["ray"].update(address=address, namespace=NAMESPACE, num_cpus=None)
    return parse_config(data)


def test_pools_land_on_their_node_groups(two_nodes: SimpleNamespace) -> None:
    cfg = two_node_cfg(two_nodes.address)
    directory = Directory()
    controller = Controller(cfg, directory, start_timeout_s=120, monitor_interval_s=0.5)
    controller.start()
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        (prefill_node,) = [nid for nid, res in nodes.items() if res.get("prefill_node")]
        (decode_node,) = [nid for nid, res in nodes.items() if res.get("decode_node")]
        # the node each worker reports from inside its actor (ray.get_runtime_context().get_node_id())
        assert controller.worker_info("prefill-0")["node_id"] == prefill_node
        assert controller.worker_info("decode-0")["node_id"] == decode_node
        assert ray.get_runtime_context().namespace == NAMESPACE
        pids = {w["pid"] for w in controller.status()["workers"]}
        assert len(pids) == 2 and os.getpid() not in pids

        # a request served across the two nodes (prefill on one writes the cache into decode on the other)
        from splitserve.deploy.launcher import build_router_app, resolve_model

        app, _ = build_router_app(cfg, directory, resolve_model(cfg), controller=controller, operator_token="op")
        with ServeThread(app) as srv:
            wait_until(lambda: httpx.get(f"{srv.url}/health", timeout=5).status_code == 200, 20, "/health")
            r = httpx.post(
                f"{srv.url}/v1/completions",
                timeout=60,
                json={"model": "tiny", "prompt": "def fib(n):", "max_tokens": 6},
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1

        # the decode node takes one decode worker: a second one cannot be placed, and says so at once
        t0 = time.monotonic()
        with pytest.raises(PlacementError) as err:
            controller.scale(decode=2)
        assert time.monotonic() - t0 < 10
        assert "1 more decode worker" in str(err.value) and "'decode_node' (decode.resources)" in str(err.value)
        assert controller.targets == {"prefill": 1, "decode": 1}
        assert [w.worker_id for w in directory.serving("decode")] == ["decode-0"]
    finally:
        controller.shutdown()
    # joined, not started here: the Ray cluster keeps running, the workers are gone
    assert not ray.is_initialized()
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "the worker processes to exit")
    assert all(session_pids(sid) for sid in two_nodes.node_sessions)  # both nodes still up
