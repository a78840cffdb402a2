"""Fast launcher tests without a Ray cluster: YAML -> WorkerSpec / actor options, the /admin endpoints over
a stand-in controller (auth, validation, error mapping), and the status table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from splitserve.deploy.admin import build_admin_router
from splitserve.deploy.cluster_cli import format_status
from splitserve.deploy.config import DEFAULT_CONFIG_PATH, ClusterConfig, load_config, parse_config
from splitserve.deploy.controller import ControllerError, PlacementError, WorkerStartError
from splitserve.deploy.worker_actor import (
    actor_options,
    resource_demand,
    spec_for,
)

GPU_YAML = Path(DEFAULT_CONFIG_PATH).with_name("gpu-1node.yaml")
MULTINODE_YAML = Path(DEFAULT_CONFIG_PATH).with_name("multinode.yaml")


def cfg_with(path: Path = DEFAULT_CONFIG_PATH, **changes: Any) -> ClusterConfig:
    data = load_config(path).model_dump()
    for key, value in changes.items():
        section, name = key.split("__")
        data[section][name] = value
    return parse_config(data)


# ----------------------------------------------------------------------------------------------
# spec_for / actor_options


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_spec_follows_the_pool_config(role: str) -> None:
    cfg = cfg_with(
        prefill__num_blocks=96,
        prefill__max_batch_tokens=4096,
        prefill__chunk_size=1024,
        prefill__max_running_requests=7,
        decode__num_blocks=80,
        decode__max_running_requests=9,
        decode__mtp_draft_tokens=2,
        transfer__backend="tcp",
        transfer__timeout_s=12.5,
    )
    pool = cfg.prefill if role == "prefill" else cfg.decode
    spec = spec_for(cfg, role, 3, model_path="/ckpt")  # type: ignore[arg-type]
    assert spec.worker_id == f"{role}-3" and spec.role == role
    assert spec.model_path == "/ckpt"
    e = spec.engine
    assert (e.num_blocks, e.block_size, e.max_batch_tokens, e.max_running) == (
        pool.num_blocks,
        pool.block_size,
        pool.max_batch_tokens,
        pool.max_running_requests,
    )
    # both sides run the decode pool's MTP setting: prefill fills the MTP layer's cache decode drafts from
    assert e.mtp_draft_tokens == cfg.decode.mtp_draft_tokens
    assert (e.dtype, e.device, e.indexer_fp8) == (cfg.model.dtype, cfg.model.device, cfg.model.indexer_fp8)
    assert e.chunk_size == (cfg.prefill.chunk_size if role == "prefill" else min(512, pool.max_batch_tokens))
    assert e.chunk_size <= e.max_batch_tokens
    assert (spec.transfer_backend, spec.transfer_host, spec.transfer_timeout_s) == (
        cfg.transfer.backend,
        cfg.transfer.host,
        cfg.transfer.timeout_s,
    )
    assert spec.grpc_host == pool.grpc_host and spec.grpc_port == 0
    assert spec.first_token_timeout_s == cfg.router.first_token_timeout_s


def test_tiny_model_path_and_max_model_len() -> None:
    cfg = cfg_with(model__max_model_len=2048, model__path="tiny")
    spec = spec_for(cfg, "decode", 0)
    assert spec.model_path == "tiny"
    assert spec_for(cfg_with(), "decode", 0).model_path == "pycoder"  # local.yaml's preset, passed by name
    assert spec.engine.max_model_len == 2048
    assert spec_for(cfg_with(), "decode", 0).engine.max_model_len == 0  # 0: the checkpoint's own


def test_cuda_pool_sized_by_memory_fraction_is_passed_to_the_engine() -> None:
    cfg = load_config(GPU_YAML)
    spec = spec_for(cfg, "prefill", 0)
    assert cfg.prefill.num_blocks is None and cfg.prefill.cache_memory_fraction is not None
    assert spec.engine.cache_memory_fraction == cfg.prefill.cache_memory_fraction
    assert spec.engine.device == "cuda" and spec.engine.dtype == "bfloat16"


def test_actor_options_pin_gpus_resources_and_names() -> None:
    cfg = load_config(MULTINODE_YAML)
    for role, pool in (("prefill", cfg.prefill), ("decode", cfg.decode)):
        opts = actor_options(cfg, role, f"{role}-5")  # type: ignore[arg-type]
        assert opts["name"] == f"{role}-5" and opts["namespace"] == cfg.ray.namespace
        assert opts["num_gpus"] == pool.gpus_per_worker
        assert opts["resources"] == pool.resources
        assert opts["num_cpus"] == pool.cpus_per_worker == 1.0  # cuda default: the host loop's core
        assert resource_demand(cfg, role)["CPU"] == pool.cpus_per_worker  # type: ignore[arg-type]
        assert opts["max_restarts"] == 0  # the controller replaces dead workers itself
        assert opts["runtime_env"] == {"env_vars": {"UCX_NET_DEVICES": cfg.transfer.interface}}
        demand = resource_demand(cfg, role)  # type: ignore[arg-type]
        assert demand["GPU"] == pool.gpus_per_worker and all(demand[k] == v for k, v in pool.resources.items())
    local = cfg_with()
    opts = actor_options(local, "decode", "decode-0")
    assert opts["num_gpus"] == 0 and opts["resources"] == {} and "runtime_env" not in opts
    assert "GPU" not in resource_demand(local, "decode")
    # a CPU worker of the embedded default reserves a fraction of a core (deploy/local.yaml's value)
    assert opts["num_cpus"] == local.decode.cpus_per_worker == 0.25


def test_the_cluster_secret_travels_in_the_spec_and_is_never_printed() -> None:
    spec = spec_for(cfg_with(), "decode", 0, cluster_secret="s3cret-value")
    assert spec.cluster_secret == "s3cret-value"
    assert "s3cret-value" not in repr(spec) and "s3cret-value" not in str(spec)
    assert spec_for(cfg_with(), "decode", 0).cluster_secret is None


def test_bad_role_and_index() -> None:
    with pytest.raises(ValueError, match="role"):
        spec_for(cfg_with(), "router", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="index"):
        spec_for(cfg_with(), "decode", -1)


# ----------------------------------------------------------------------------------------------
# /admin over a stand-in controller


class FakeController:
    def __init__(self) -> None:
        self.sizes = {"prefill": 1, "decode": 1}
        self.fail_with: Exception | None = None

    def status(self) -> dict[str, Any]:
        workers = [
            {
                "id": f"{role}-{i}",
                "role": role,
                "state": "serving",
                "pid": 100 + i,
                "node": "n",
                "gpus": [],
                "blocks_used": 0,
                "blocks_total": 8,
                "requests_done": 0,
            }
            for role in ("prefill", "decode")
            for i in range(self.sizes[role])
        ]
        return {"router": {"url": "http://x"}, "workers": workers}

    def scale(self, prefill: int | None = None, decode: int | None = None) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        for role, n in (("prefill", prefill), ("decode", decode)):
            if n is not None:
                self.sizes[role] = n
        return self.status()


@pytest.fixture
def admin() -> tuple[TestClient, FakeController, list[str]]:
    ctl = FakeController()
    calls: list[str] = []
    app = FastAPI()
    app.include_router(
        build_admin_router(ctl, operator_token="sekret", request_shutdown=lambda: calls.append("shutdown"))
    )
    return TestClient(app), ctl, calls


AUTH = {"Authorization": "Bearer sekret"}


def test_admin_requires_the_operator_token(admin: tuple[TestClient, FakeController, list[str]]) -> None:
    client, _, calls = admin
    for method, path in (("GET", "/admin/status"), ("POST", "/admin/scale"), ("POST", "/admin/shutdown")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = client.request(method, path, headers=headers, json={"decode": 2})
            assert r.status_code == 401, (method, path, headers)
            assert r.json()["error"]["code"] == "invalid_operator_token"
    assert calls == []
    assert client.get("/admin/status", headers=AUTH).json()["router"]["url"] == "http://x"


def test_admin_scale_validates_and_maps_errors(admin: tuple[TestClient, FakeController, list[str]]) -> None:
    client, ctl, _ = admin
    r = client.post("/admin/scale", headers=AUTH, json={"decode": 3})
    assert r.status_code == 200
    assert [w["id"] for w in r.json()["workers"] if w["role"] == "decode"] == ["decode-0", "decode-1", "decode-2"]
    for body in ({}, {"decode": 0}, {"prefill": -1}, {"decode": "2"}, {"decode": 1.5}, {"replicas": 2}):
        r = client.post("/admin/scale", headers=AUTH, json=body)
        assert r.status_code == 400, body
        assert r.json()["error"]["code"] == "invalid_scale_request"
    assert client.post("/admin/scale", headers=AUTH, content=b"{not json").status_code == 400
    ctl.fail_with = WorkerStartError({"decode-3": "FileNotFoundError: no config.json"})
    r = client.post("/admin/scale", headers=AUTH, json={"decode": 4})
    assert r.status_code == 409
    assert r.json()["error"]["failures"] == {"decode-3": "FileNotFoundError: no config.json"}
    assert "decode-3" in r.json()["error"]["message"]
    ctl.fail_with = ControllerError("the cluster is not running")
    assert client.post("/admin/scale", headers=AUTH, json={"decode": 4}).status_code == 503


def test_admin_shutdown_answers_then_calls_back(admin: tuple[TestClient, FakeController, list[str]]) -> None:
    client, _, calls = admin
    r = client.post("/admin/shutdown", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"status": "shutting down"}
    assert calls == ["shutdown"]


def test_admin_needs_a_token_and_answers_501_without_a_shutdown_hook() -> None:
    with pytest.raises(ValueError, match="operator token"):
        build_admin_router(FakeController(), operator_token="")
    app = FastAPI()
    app.include_router(build_admin_router(FakeController(), operator_token="t0k"))
    client = TestClient(app)
    assert client.get("/admin/status").status_code == 401
    assert client.get("/admin/status", headers={"Authorization": "Bearer t0k"}).status_code == 200
    assert client.post("/admin/shutdown", headers={"Authorization": "Bearer t0k"}).status_code == 501


def test_unplaceable_scale_is_a_conflict(admin: tuple[TestClient, FakeController, list[str]]) -> None:
    client, ctl, _ = admin
    ctl.fail_with = PlacementError("cannot place 2 more decode workers ... Fix: a smaller decode.cpus_per_worker")
    r = client.post("/admin/scale", headers=AUTH, json={"decode": 3})
    assert r.status_code == 409 and r.json()["error"]["code"] == "cannot_place_workers"
    assert "decode.cpus_per_worker" in r.json()["error"]["message"]


def test_status_table() -> None:
    status = FakeController().status()
    status["workers"][1]["gpus"] = [0, 1]
    status["workers"][1]["weight_bytes"] = 3 * 2**29
    status["workers"][1].update(  # a tensor-parallel worker: two ranks, experts split
        tensor_parallel_size=2,
        expert_parallel=True,
        ranks=[{"rank": 0, "pid": 100, "gpus": [0]}, {"rank": 1, "pid": 101, "gpus": [1]}],
    )
    text = format_status(status)
    lines = text.splitlines()
    assert lines[0] == "router: http://x"
    assert lines[1] == "serving: 1 prefill, 1 decode"
    assert lines[2].split() == [
        "ID",
        "ROLE",
        "STATE",
        "TP",
        "PID",
        "NODE",
        "GPUS",
        "WEIGHTS",
        "BLOCKS",
        "USED",
        "REQUESTS",
        "DONE",
    ]
    assert lines[3].split() == ["prefill-0", "prefill", "serving", "1", "100", "n", "-", "-", "0/8", "0"]
    assert lines[4].split() == [
        "decode-0",
        "decode",
        "serving",
        "2+ep",
        "100,101",
        "n",
        "0,1",
        "1.50",
        "GiB",
        "0/8",
        "0",
    ]


def test_status_table_shows_fractional_gpus() -> None:
    """Two workers sharing one GPU (gpus_per_worker 0.5) show their share, never "0"."""
    status = FakeController().status()
    status["workers"][0].update(gpus=[0], gpu_share=0.5)
    status["workers"][1].update(gpus=[], gpu_share=0.5)
    lines = format_status(status).splitlines()
    assert lines[3].split()[6] == "0.5(gpu0)"
    assert lines[4].split()[6] == "0.5"
    status["workers"][1].update(gpus=[0, 1], gpu_share=2.0)
    assert format_status(status).splitlines()[4].split()[6] == "0,1"
