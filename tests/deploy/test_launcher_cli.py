"""The cluster CLI as a user runs it: `splitserve up --detach`, `status`, `scale`, `down`, and a foreground
`up` stopped by SIGTERM. Real subprocesses, a real local Ray cluster, the real router; state files in a
temporary run dir. Every wait is bounded and no process is left behind (a finalizer kills the whole
session of an `up` that a failing test left running).
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from splitserve.deploy.config import DEFAULT_CONFIG_PATH, load_config
from splitserve.tests.helpers import pid_alive, session_pids, wait_until

pytestmark = pytest.mark.timeout(300)

KEY_ENV = "SPLITSERVE_TEST_LAUNCHER_KEY"
KEY = "test-key-123"


def cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "splitserve.deploy.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
    )


def write_config(path: Path, **router: object) -> Path:
    data = load_config(DEFAULT_CONFIG_PATH).model_dump()
    data["model"]["path"] = "tiny"  # the fast random-weight model (local.yaml serves pycoder)
    data["transfer"]["backend"] = "tcp"
    data["router"]["port"] = 0
    data["router"].update(router)
    data["ray"]["num_cpus"] = 4
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def states(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("cluster-*.json"))]


@pytest.fixture
def reaper() -> Iterator[list[int]]:
    """Pids of `up` processes (session leaders) a test started; whatever is left of them is killed."""
    leaders: list[int] = []
    yield leaders
    for sid in leaders:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [p for p in session_pids(sid) if pid_alive(p)]
            for p in pids:
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
            if pids:
                time.sleep(3)


def test_up_detach_status_scale_down(tmp_path: Path, reaper: list[int]) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cluster.yaml", api_key_env=KEY_ENV)
    env = {**os.environ, KEY_ENV: KEY}
    no_key_env = {k: v for k, v in os.environ.items() if k != KEY_ENV}

    # nothing runs yet
    r = cli("status", "--run-dir", str(run_dir))
    assert r.returncode == 1 and "no running cluster" in r.stderr

    t0 = time.monotonic()
    r = cli("up", str(config), "--detach", "--run-dir", str(run_dir), "--start-timeout", "120", env=env, timeout_s=240)
    (state,) = states(run_dir) if r.returncode == 0 else [{}]
    if state:
        reaper.append(int(state["pid"]))
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 150
    url = state["url"]
    assert url in r.stdout and str(run_dir) in r.stdout  # the URL and the log path are printed
    up_pid = int(state["pid"])
    assert up_pid != os.getpid() and pid_alive(up_pid)
    assert KEY not in json.dumps(state)  # never the key itself
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200

    # the operator's token: a file of its own in the run directory, readable by its owner only
    token_file = Path(state["operator_token_file"])
    assert token_file.parent == run_dir and stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token not in json.dumps(state) and token != KEY
    # the clients' API key cannot look at, scale or stop the cluster; nothing at all cannot either
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}):
        assert httpx.get(f"{url}/admin/status", headers=headers, timeout=10).status_code == 401
        assert httpx.post(f"{url}/admin/scale", headers=headers, json={"decode": 2}, timeout=10).status_code == 401
        assert httpx.post(f"{url}/admin/shutdown", headers=headers, timeout=10).status_code == 401
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200  # still up
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token\n")
    r = cli("status", "--run-dir", str(run_dir), "--operator-token-file", str(wrong), env=env)
    assert r.returncode == 1 and "refused the operator token" in r.stderr

    # the CLI reads the token; it needs no API key
    r = cli("status", "--json", "--run-dir", str(run_dir), env=no_key_env)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["router"]["url"] == url
    assert [(w["id"], w["state"]) for w in st["workers"]] == [("prefill-0", "serving"), ("decode-0", "serving")]
    pids = {w["pid"] for w in st["workers"]}
    assert all(pid_alive(p) and p != up_pid for p in pids)

    r = cli("status", "--run-dir", str(run_dir), env=env)
    assert r.returncode == 0
    for wid in ("prefill-0", "decode-0"):
        assert wid in r.stdout
    assert url in r.stdout

    r = cli("scale", "--decode", "2", "--json", "--run-dir", str(run_dir), env=env)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [w["id"] for w in st["workers"] if w["role"] == "decode" and w["state"] == "serving"] == [
        "decode-0",
        "decode-1",
    ]
    pids |= {w["pid"] for w in st["workers"]}

    resp = httpx.post(
        f"{url}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        json={"model": "tiny", "prompt": "hello", "max_tokens": 4},
    )
    assert resp.status_code == 200, resp.text

    r = cli("down", "--run-dir", str(run_dir), env=env)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not pid_alive(up_pid), 30, "the up process to exit")
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "the workers to exit")
    wait_until(lambda: not [p for p in session_pids(up_pid) if pid_alive(p)], 30, "every Ray process to exit")
    assert states(run_dir) == [] and not token_file.exists()
    r = cli("status", "--run-dir", str(run_dir), env=env)
    assert r.returncode == 1 and "no running cluster" in r.stderr


def test_foreground_up_stops_everything_on_sigterm(tmp_path: Path, reaper: list[int]) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "cluster.yaml")
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "splitserve.deploy.cli",
            "up",
            str(config),
            "--run-dir",
            str(run_dir),
            "--start-timeout",
            "120",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    reaper.append(proc.pid)

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "up.log").read_text()
        found = [s for s in states(run_dir) if s["pid"] == proc.pid]
        try:
            return bool(found) and httpx.get(f"{found[0]['url']}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 150, "the cluster to serve")
    (state,) = states(run_dir)
    token = Path(state["operator_token_file"]).read_text().strip()
    st = httpx.get(f"{state['url']}/admin/status", headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
    pids = {w["pid"] for w in st["workers"]}
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    out = (tmp_path / "up.log").read_text()
    assert "cluster stopped" in out
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "the workers to exit")
    wait_until(lambda: not [p for p in session_pids(proc.pid) if pid_alive(p)], 30, "every Ray process to exit")
    assert states(run_dir) == []
