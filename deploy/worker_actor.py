"""One worker of a pool as a Ray actor, and how its `WorkerSpec` is built from the cluster YAML.

`spec_for(cfg, role, index)` maps a `ClusterConfig` to the `WorkerSpec` of worker `<role>-<index>`;
`actor_options(cfg, role, worker_id)` gives the Ray options of its actor (GPUs, CPUs, custom
resources, name, namespace). `WorkerActor` is a plain class so it can be read and tested without Ray;
`RemoteWorkerActor` is its Ray actor class. The actor's constructor starts the role's gRPC server
(`splitserve.{prefill,decode}_worker.server.serve(spec)`) in the actor's own process, so the actor's
pid is the worker's pid and killing the actor kills the worker.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
from typing import Any, Literal

import ray

from splitserve.deploy.config import ClusterConfig, ConfigError, ConfigProblem, PoolConfig
from splitserve.engine.config import EngineConfig
from splitserve.engine.runtime import FollowerRuntime, WorkerServer, WorkerSpec
from splitserve.protos.auth import GrpcTls

logger = logging.getLogger(__name__)

Role = Literal["prefill", "decode"]
ROLES: tuple[Role, Role] = ("prefill", "decode")

#: Threads serving the actor's methods: ping/stats must answer while stop() or drain() runs.
ACTOR_MAX_CONCURRENCY = 8


def worker_id(role: Role, index: int) -> str:
    return f"{role}-{index}"


def pool_config(cfg: ClusterConfig, role: Role) -> PoolConfig:
    if role not in ROLES:
        raise ValueError(f"unknown worker role {role!r}; expected 'prefill' or 'decode'")
    return cfg.prefill if role == "prefill" else cfg.decode


def engine_config_for(cfg: ClusterConfig, role: Role) -> EngineConfig:
    """The engine settings of a `role` worker.

    mtp_draft_tokens is the decode pool's value for both roles: the prefill side fills the MTP
    layer's cache (and returns the MTP state) that decode drafts from, and the transfer handshake
    checks that both sides agree on it.
    """
    pool = pool_config(cfg, role)
    sizing = (
        {"num_blocks": pool.num_blocks}
        if pool.num_blocks is not None
        else {"cache_memory_fraction": pool.cache_memory_fraction}
    )  # the engine sizes the cache after loading
    staging = 0
    if role == "prefill":
        chunk_size = cfg.prefill.chunk_size
        staging = staging_blocks_for(
            pool.max_batch_tokens, cfg.model.max_model_len or 0, pool.block_size, pool.num_blocks
        )
    else:  # decode computes prompts in colocated mode only (otherwise their cache arrives)
        chunk_size = cfg.decode.effective_chunk_size
    return EngineConfig(
        **sizing,
        block_size=pool.block_size,
        max_batch_tokens=pool.max_batch_tokens,
        chunk_size=chunk_size,
        max_running=pool.max_running_requests,
        mtp_draft_tokens=cfg.decode.mtp_draft_tokens,
        mtp_relaxed_topk=cfg.decode.mtp_relaxed_topk if role == "decode" else 0,
        mtp_relaxed_delta=cfg.decode.mtp_relaxed_delta,
        overlap_scheduling=cfg.decode.overlap_scheduling if role == "decode" else None,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        indexer_fp8=cfg.model.indexer_fp8,
        latent_fp8=cfg.model.latent_fp8,
        fp8_weights=cfg.model.fp8_weights,
        max_model_len=cfg.model.max_model_len or 0,
        staging_blocks=staging,
    )


def staging_blocks_for(max_batch_tokens: int, max_model_len: int, block_size: int, num_blocks: int | None) -> int:
    """A prefill worker's staging area (kvtransfer/staging.py): room for two steps' writes, or for one
    whole prompt (a prefix-cache hit sends its cached blocks in one write), plus slack."""
    step = -(-max_batch_tokens // block_size)
    n = max(2 * step, -(-max_model_len // block_size)) + 64
    return min(n, num_blocks) if num_blocks else n


def spec_for(
    cfg: ClusterConfig,
    role: Role,
    index: int,
    *,
    model_path: str | None = None,
    cluster_secret: str | None = None,
    grpc_tls: GrpcTls | None = None,
) -> WorkerSpec:
    """The `WorkerSpec` of worker `<role>-<index>`.

    `model_path` replaces cfg.model.path (the launcher passes the resolved checkpoint directory so
    workers never race to create the tiny checkpoint). `cluster_secret` and `grpc_tls` (the controller's,
    made per run) travel to the worker inside the spec, through Ray.
    """
    if index < 0:
        raise ValueError(f"worker index must be >= 0, got {index}")
    pool = pool_config(cfg, role)
    return WorkerSpec(
        worker_id=worker_id(role, index),
        role=role,
        model_path=model_path if model_path is not None else cfg.model.path,
        engine=engine_config_for(cfg, role),
        transfer_backend=cfg.transfer.backend,
        transfer_host=cfg.transfer.host,
        transfer_timeout_s=cfg.transfer.timeout_s,
        grpc_host=pool.grpc_host,
        grpc_port=0,
        # A reservation waits for prefill + cache transfer: as long as the router waits for a first token.
        reserve_lease_s=cfg.router.first_token_timeout_s,
        first_token_timeout_s=cfg.router.first_token_timeout_s,
        cluster_secret=cluster_secret,
        grpc_tls=grpc_tls,
        tensor_parallel_size=pool.tensor_parallel_size,
        expert_parallel=pool.expert_parallel,
        # the ranks share one node (a STRICT_PACK placement group): a fresh file there is their rendezvous
        dist_init_method=(
            f"file:///tmp/splitserve-tp-{worker_id(role, index)}-{secrets.token_hex(8)}"
            if pool.tensor_parallel_size > 1
            else ""
        ),
    )


def rank_bundles(cfg: ClusterConfig, role: Role) -> list[dict[str, float]]:
    """The placement-group bundles of a `role` worker, one per rank: each rank's CPUs and its GPU
    (gpus_per_worker / tensor_parallel_size); the pool's custom resources go with rank 0."""
    pool = pool_config(cfg, role)
    n = pool.tensor_parallel_size
    bundles: list[dict[str, float]] = []
    for r in range(n):
        b: dict[str, float] = {"CPU": pool.cpus_per_worker}
        if pool.gpus_per_worker:
            b["GPU"] = pool.gpus_per_worker / n
        if r == 0:
            b.update(pool.resources)
        bundles.append(b)
    return bundles


def rank_options(cfg: ClusterConfig, role: Role, wid: str, rank: int, placement_group: Any) -> dict[str, Any]:
    """Ray options of rank `rank` of a tensor-parallel worker: its bundle of the worker's placement group
    (rank 0 is the worker's named actor; the others are named `<wid>-rank<r>`)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = rank_bundles(cfg, role)[rank]
    opts = actor_options(cfg, role, wid)
    opts.update(
        num_cpus=bundle["CPU"],
        num_gpus=bundle.get("GPU", 0),
        resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU")},
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=placement_group, placement_group_bundle_index=rank
        ),
    )
    if rank:
        opts["name"] = f"{wid}-rank{rank}"
        opts["max_concurrency"] = 2
    return opts


def actor_options(cfg: ClusterConfig, role: Role, wid: str) -> dict[str, Any]:
    """Ray actor options of worker `wid` (pass to `RemoteWorkerActor.options(**...)`)."""
    pool = pool_config(cfg, role)
    opts: dict[str, Any] = {
        "name": wid,
        "namespace": cfg.ray.namespace,
        # On cpu the worker computes on them (Ray sets the actor's OMP_NUM_THREADS to max(1, floor(n)),
        # so torch uses one thread below one CPU); on cuda they are the host-side loop's.
        "num_cpus": pool.cpus_per_worker,
        "num_gpus": pool.gpus_per_worker,
        "resources": dict(pool.resources),
        # The config has no restart setting: the controller notices a dead worker and starts a fresh
        # one (new id, new cache, new transfer identity) instead of Ray restarting it in place.
        "max_restarts": 0,
        "max_task_retries": 0,
        "max_concurrency": ACTOR_MAX_CONCURRENCY,
    }
    if cfg.transfer.interface is not None and cfg.transfer.backend == "nixl":
        opts["runtime_env"] = {"env_vars": {"UCX_NET_DEVICES": cfg.transfer.interface}}
    return opts


def load_grpc_tls(cfg: ClusterConfig) -> GrpcTls | None:
    """The TLS material of the security section (None: plaintext gRPC).

    Raises:
        ConfigError: a file cannot be read (named by its field).
    """
    s = cfg.security
    if not s.uses_tls:
        return None
    pem: dict[str, bytes] = {}
    for name in ("grpc_tls_cert", "grpc_tls_key", "grpc_tls_ca"):
        path = str(getattr(s, name))
        try:
            with open(path, "rb") as f:
                pem[name] = f.read()
        except OSError as e:
            raise ConfigError([ConfigProblem(f"security.{name}", f"cannot read {path}: {e.strerror or e}")]) from None
    return GrpcTls(pem["grpc_tls_cert"], pem["grpc_tls_key"], pem["grpc_tls_ca"], s.grpc_tls_server_name)


def resource_demand(cfg: ClusterConfig, role: Role) -> dict[str, float]:
    """What one `role` worker asks Ray for, in `ray.nodes()` resource names."""
    pool = pool_config(cfg, role)
    demand = {"CPU": pool.cpus_per_worker * pool.tensor_parallel_size, **pool.resources}  # CPUs per rank
    if pool.gpus_per_worker:
        demand["GPU"] = pool.gpus_per_worker
    return demand


def _serve(spec: WorkerSpec) -> WorkerServer:
    if spec.role == "prefill":
        from splitserve.prefill_worker.server import serve
    else:
        from splitserve.decode_worker.server import serve
    return serve(spec)


_WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")


class WorkerActor:
    """A prefill or decode worker inside a Ray actor process (one actor = one worker process)."""

    def __init__(self, spec: WorkerSpec) -> None:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.spec = spec
        self._stop_lock = threading.Lock()
        self._stopped = False
        self.node_id, self.node_ip, self.gpus = _ray_placement()
        self.server = _serve(spec)
        self.address = self._advertised(self.server.address)
        logger.info(
            "worker %s up: pid %d, node %s (%s), gpus %s, gRPC %s",
            spec.worker_id,
            os.getpid(),
            self.node_ip,
            self.node_id[:12],
            list(self.gpus),
            self.address,
        )

    def _advertised(self, address: str) -> str:
        """The gRPC address peers dial: a wildcard bind advertises the node's IP."""
        host, _, port = address.rpartition(":")
        if host in _WILDCARD_HOSTS:
            ip = self.node_ip or socket.gethostbyname(socket.gethostname())
            return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        return address

    def info(self) -> dict[str, Any]:
        """The server's info (worker_id, role, address, pid, node, transfer_metadata, blocks_total)
        plus where Ray placed it: node_id, node_ip, gpus."""
        info = dict(self.server.info())
        info.setdefault("pid", os.getpid())
        info["address"] = self.address
        info["node_id"] = self.node_id
        info["node_ip"] = self.node_ip
        info["gpus"] = list(self.gpus)
        return info

    def stats(self) -> dict[str, Any]:
        return dict(self.server.stats())

    def ping(self) -> dict[str, Any]:
        """Liveness plus current load: engine_alive is False once the engine loop has died."""
        loop = getattr(getattr(self.server, "rt", None), "loop", None)
        alive = bool(getattr(loop, "alive", True))
        out: dict[str, Any] = {"worker_id": self.spec.worker_id, "pid": os.getpid(), "engine_alive": alive}
        if alive and not self._stopped:
            out.update(self.server.stats())
        return out

    def drain(self) -> None:
        """Take no new requests; those in flight finish."""
        self.server.drain()
        logger.info("worker %s draining", self.spec.worker_id)

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop the gRPC server (in-flight calls get `grace_s`) and the engine. Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        logger.info("worker %s stopping", self.spec.worker_id)
        self.server.stop(grace_s)


class RankActor:
    """Rank 1.. of a tensor-parallel worker (rank 0 is its WorkerActor, which serves gRPC and leads):
    joins the worker's process group, loads its shard, follows the leader's engine steps. It lives and
    dies with its worker (the controller kills every rank together)."""

    def __init__(self, spec: WorkerSpec) -> None:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.spec = spec
        self.node_id, self.node_ip, self.gpus = _ray_placement()
        self.rt = FollowerRuntime(spec)

    def ping(self) -> dict[str, Any]:
        return {
            "worker_id": self.spec.worker_id,
            "rank": self.spec.rank,
            "pid": os.getpid(),
            "node_ip": self.node_ip,
            "gpus": list(self.gpus),
            "following": self.rt.alive,
            "calls": self.rt.calls,
        }


def _ray_placement() -> tuple[str, str, tuple[int, ...]]:
    """(node id, node IP, GPU ids) of this process, as Ray placed it ('' / () outside Ray)."""
    if not ray.is_initialized():
        return "", "", ()
    ctx = ray.get_runtime_context()
    gpus: list[int] = []
    for g in ray.get_gpu_ids():
        try:
            gpus.append(int(g))
        except (TypeError, ValueError):
            continue
    return ctx.get_node_id(), ray.util.get_node_ip_address(), tuple(gpus)


#: The Ray actor class of `WorkerActor` (options per worker from `actor_options`).
RemoteWorkerActor = ray.remote(WorkerActor)
#: The Ray actor class of `RankActor` (options from `rank_options`).
RemoteRankActor = ray.remote(RankActor)
