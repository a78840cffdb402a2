"""The cluster controller: Ray lifecycle of the prefill and decode pools, and the router's view of them.

`Controller(cfg, directory)`:

* `start()` connects to Ray (starts a small local cluster when `ray.address` is null, else joins the
  given one in the configured namespace), starts both pools in parallel — one `WorkerActor` per
  worker — and adds each worker to the `Directory` once it serves. A worker that fails to start
  (bad checkpoint path, no node with its resources, ...) fails `start()` with a `WorkerStartError`
  that names it and says why; everything started so far is stopped again.
* `scale(prefill=N, decode=M)` adds workers, or removes the newest ones after draining them: the
  Directory marks them "draining" (the router stops routing there), the worker stops taking requests,
  the controller waits (bounded) until it has nothing running or waiting, then removes it from the
  Directory, stops it and kills its actor.
* A monitor thread pings every serving worker; a dead one (its process killed, its engine loop gone,
  or `max_missed_pings` pings unanswered) is marked "dead", removed from the Directory and replaced
  by a fresh worker (a new id) so each pool returns to its size.
* `status()` reports the router URL and every worker with its load; `shutdown()` stops everything
  (and the local Ray cluster when this controller started it).

Thread-safe: the CLI's HTTP admin endpoints call `scale`/`status` from other threads. Membership
changes (scale, replacement, shutdown) are serialized by one lock.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group

from splitserve.deploy.config import ClusterConfig
from splitserve.deploy.worker_actor import (
    ROLES,
    RemoteRankActor,
    RemoteWorkerActor,
    Role,
    actor_options,
    load_grpc_tls,
    pool_config,
    rank_bundles,
    rank_options,
    resource_demand,
    spec_for,
    worker_id,
)
from splitserve.engine.runtime import remove_rendezvous
from splitserve.router.membership import Directory, WorkerInfo

logger = logging.getLogger(__name__)

__all__ = ["Controller", "ControllerError", "PlacementError", "WorkerStartError"]

#: Object store of a local Ray cluster: cache blocks travel over the transfer backend and requests over
#: gRPC, so Ray only carries small control messages.
DEFAULT_OBJECT_STORE_BYTES = 100 * 1024 * 1024

#: A local Ray cluster (ray.num_cpus null) has room for this many workers of the pools together.
LOCAL_ROOM_WORKERS = 16
#: How long a scale waits for Ray's view of free resources to show room for its new workers (the
#: resources of a worker stopped just before are released asynchronously) before it fails.
PLACEMENT_CHECK_S = 3.0

_LIVE_STATES = ("starting", "serving")


class ControllerError(RuntimeError):
    """The cluster could not be started, scaled or reached."""


class PlacementError(ControllerError):
    """The Ray cluster has no room for the workers asked for (nothing was started or changed)."""


class WorkerStartError(ControllerError):
    """One or more workers did not come up. `failures` maps worker id -> why."""

    def __init__(self, failures: dict[str, str], during: str = "start") -> None:
        self.failures = dict(failures)
        lines = [f"  - {wid}: {why}" for wid, why in sorted(self.failures.items())]
        n = len(self.failures)
        super().__init__(f"{n} worker{'s' if n != 1 else ''} failed to {during}:\n" + "\n".join(lines))


@dataclass
class _Worker:
    worker_id: str
    role: Role
    index: int
    actor: Any  # ray ActorHandle
    state: str = "starting"  # starting | serving | draining | dead | stopped
    info: dict[str, Any] = field(default_factory=dict)
    missed_pings: int = 0
    created: float = field(default_factory=time.monotonic)
    # tensor parallel (tensor_parallel_size > 1): ranks 1.. and the placement group holding every rank
    followers: list[Any] = field(default_factory=list)
    placement_group: Any = None
    rendezvous: str = ""  # the ranks' torch.distributed init method (a file on their node)


class Controller:
    """Starts, scales, watches and stops the worker pools of one cluster (see the module docstring)."""

    def __init__(
        self,
        cfg: ClusterConfig,
        directory: Directory,
        *,
        model_path: str | None = None,
        router_url: str | None = None,
        start_timeout_s: float = 600.0,
        drain_timeout_s: float = 60.0,
        monitor_interval_s: float = 1.0,
        ping_timeout_s: float = 5.0,
        max_missed_pings: int = 3,
        stop_grace_s: float = 5.0,
        status_timeout_s: float = 2.0,
        object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES,
        cluster_secret: str | None = None,
    ) -> None:
        """
        Args:
            cfg: the validated cluster config; pool sizes start at `<pool>.replicas`.
            directory: the router's membership view, kept current by this controller.
            model_path: the checkpoint directory workers load (default: cfg.model.path; a preset name
                is resolved — "tiny" made on first use — once, in this process, by `start()`).
            router_url: reported by `status()`; settable later (`router_url` attribute).
            start_timeout_s: longest wait for a worker to load its model and serve.
            drain_timeout_s: longest wait for a draining worker to finish its requests.
            monitor_interval_s, ping_timeout_s, max_missed_pings: death detection.
            stop_grace_s: time given to in-flight gRPC calls when a worker stops.
            object_store_bytes: object store of a local Ray cluster.
            cluster_secret: what every worker checks on each gRPC call and transfer handshake (None: a
                fresh random one; `cluster_secret` attribute). Sent to the workers inside their specs.
        """
        self.cfg = cfg
        self.directory = directory
        self.model_path = model_path
        self.router_url = router_url
        self.start_timeout_s = start_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.monitor_interval_s = monitor_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.max_missed_pings = max_missed_pings
        self.stop_grace_s = stop_grace_s
        self.status_timeout_s = status_timeout_s
        self.object_store_bytes = object_store_bytes
        self.cluster_secret = cluster_secret or secrets.token_urlsafe(32)
        self.grpc_tls = load_grpc_tls(cfg)  # ConfigError (naming the field) when a file cannot be read

        self._targets: dict[Role, int] = {"prefill": cfg.prefill.replicas, "decode": cfg.decode.replicas}
        self._next_index: dict[Role, int] = {"prefill": 0, "decode": 0}
        self._workers: dict[str, _Worker] = {}
        self._lock = threading.RLock()  # guards _workers, _targets, _next_index and worker states
        self._ops_lock = threading.Lock()  # serializes membership changes
        self._stopping = threading.Event()
        self._started = False
        self._shutdown_done = False
        self._owns_ray = False
        self._threads: list[threading.Thread] = []
        self._short = threading.Event()  # a pool is below its size: the replacer starts workers
        self._replace_backoff: dict[Role, tuple[int, float]] = {}  # role -> (failures in a row, retry at)
        self.replaced: list[tuple[str, str]] = []  # (dead worker id, why), in order

    # ------------------------------------------------------------------------------------------
    # Public API
    # ------------------------------------------------------------------------------------------

    @property
    def targets(self) -> dict[Role, int]:
        """The size each pool is kept at."""
        with self._lock:
            return dict(self._targets)

    @property
    def running(self) -> bool:
        return self._started and not self._stopping.is_set()

    def start(self) -> None:
        """Connect to Ray and start both pools; returns once every worker serves.

        Raises:
            WorkerStartError: a worker failed to start (named, with the reason); nothing is left running.
            ControllerError: Ray could not be started or joined, or no node can host a pool's workers.
        """
        if self._started:
            raise ControllerError("the controller was already started")
        self._started = True
        t0 = time.monotonic()
        try:
            self._resolve_model()
            self._connect()
            for role in ROLES:
                if self._targets[role]:  # colocated mode has no prefill pool
                    self._check_feasible(role)
            with self._ops_lock:
                self._check_room(dict(self._targets))
                workers, launch_error = self._launch_many(dict(self._targets))
                if launch_error is not None:
                    raise launch_error  # shutdown() below kills the ones created
                _, failed = self._await_ready(workers)
            if failed:
                raise WorkerStartError(failed)
        except BaseException:
            self.shutdown()
            raise
        logger.info(
            "cluster up in %.1f s: %d prefill + %d decode workers",
            time.monotonic() - t0,
            self._targets["prefill"],
            self._targets["decode"],
        )
        # Health checks go on while replacements load their model (minutes for a large checkpoint).
        self._threads = [
            threading.Thread(target=self._monitor_loop, name="splitserve-monitor", daemon=True),
            threading.Thread(target=self._replacer_loop, name="splitserve-replacer", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def scale(self, prefill: int | None = None, decode: int | None = None) -> dict[str, Any]:
        """Set the pool sizes (None leaves a pool as it is); returns `status()` afterwards.

        New workers are started in parallel, and each serves (joins the Directory) as soon as it is ready;
        removed ones (the newest first) are drained, then stopped.

        Raises:
            ValueError: a size is not an integer >= 1, or prefill is given in colocated mode (no prefill pool).
            PlacementError: the Ray cluster's free resources cannot place the new workers (checked before
                anything changes; the message names what is missing and the settings that fix it).
            WorkerStartError: a new worker failed to start (the pool keeps the workers that did).
            ControllerError: the controller is not running.
        """
        wanted: dict[Role, int | None] = {"prefill": prefill, "decode": decode}
        for role, n in wanted.items():
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"{role} must be an integer >= 1, got {n!r}")
        if prefill is not None and self.cfg.router.mode == "colocated":
            raise ValueError(
                "router.mode is 'colocated': the cluster has no prefill pool to scale "
                "(its decode workers prefill; scale decode instead)"
            )
        with self._ops_lock:
            self._check_running()
            with self._lock:
                targets = {role: self._targets[role] if n is None else n for role, n in wanted.items()}
            more = {role: max(0, targets[role] - len(self._active(role))) for role in ROLES}
            for role in ROLES:
                if more[role]:
                    self._check_feasible(role)  # before anything changes
            self._check_room(more, targets)  # fails within seconds when the new workers cannot be placed
            with self._lock:
                self._targets.update(targets)
            logger.info("scaling to %d prefill + %d decode workers", targets["prefill"], targets["decode"])
            victims: list[_Worker] = []
            more = {role: n for role, n in more.items() if n}
            for role in ROLES:
                active = self._active(role)
                if len(active) > targets[role]:
                    order = sorted(active, key=lambda w: w.index)  # the newest go first
                    victims += order[targets[role] :]
            new, launch_error = self._launch_many(more)
            failed: dict[str, str] = {}
            if new:
                _, failed = self._await_ready(new)
            if launch_error is not None:
                with self._lock:
                    for role in ROLES:
                        self._targets[role] = len(self._active(role))
                raise launch_error
            if victims:
                self._drain_and_stop(victims)
            if failed:
                with self._lock:
                    for role in ROLES:
                        self._targets[role] = len(self._active(role))
                raise WorkerStartError(failed, during="start while scaling")
        return self.status()

    def status(self) -> dict[str, Any]:
        """`{"router": {"url"}, "workers": [{"id", "role", "state", "pid", "node", "gpus",
        "gpu_share" (the pool's gpus_per_worker: 0.5 when two workers share a GPU), "blocks_used", "blocks_total",
        "requests_done", "weight_bytes", "tensor_parallel_size", "expert_parallel", "ranks" ([{"rank", "pid",
        "gpus"}], rank 0 first: it serves)}]}`; load is read from the workers now
        (bounded by status_timeout_s), else the last known values."""
        with self._lock:
            workers = sorted(self._workers.values(), key=lambda w: (ROLES.index(w.role), w.index))
        fresh: dict[str, dict[str, Any]] = {}
        live = [w for w in workers if w.state in ("serving", "draining")]
        if live and ray.is_initialized():
            refs = {w.actor.stats.remote(): w for w in live}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.status_timeout_s)
            for ref in ready:
                try:
                    fresh[refs[ref].worker_id] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a worker that cannot answer keeps its last values
                    logger.debug("status: %s did not report: %s", refs[ref].worker_id, e)
        entries = []
        for w in workers:
            d = self.directory.get(w.worker_id)
            ranks: list[dict[str, Any]] = w.info.get("ranks") or [
                {"rank": 0, "pid": w.info.get("pid"), "gpus": list(w.info.get("gpus", []))}
            ]
            load: dict[str, Any] = fresh.get(w.worker_id) or (
                {"blocks_used": d.blocks_used, "blocks_total": d.blocks_total, "requests_done": d.requests_done}
                if d is not None
                else {}
            )
            entries.append(
                {
                    "id": w.worker_id,
                    "role": w.role,
                    "state": d.state if d is not None and w.state == "serving" else w.state,
                    "pid": w.info.get("pid"),
                    "node": w.info.get("node_ip") or w.info.get("node"),
                    "gpus": [g for r in ranks for g in r["gpus"]],
                    "gpu_share": float(pool_config(self.cfg, w.role).gpus_per_worker or 0),
                    "tensor_parallel_size": int(w.info.get("tensor_parallel_size", len(ranks))),
                    "expert_parallel": bool(w.info.get("expert_parallel", False)),
                    "ranks": ranks,
                    "blocks_used": int(load.get("blocks_used", 0)),
                    "blocks_total": int(load.get("blocks_total", w.info.get("blocks_total", 0))),
                    "requests_done": int(load.get("requests_done", 0)),
                    "weight_bytes": int(load.get("weight_bytes", 0)),
                }
            )
        return {"router": {"url": self.router_url}, "workers": entries}

    def worker_info(self, wid: str) -> dict[str, Any]:
        """What worker `wid` reported when it came up (address, pid, node, node_id, node_ip, gpus, ...)."""
        with self._lock:
            w = self._workers.get(wid)
            if w is None:
                raise KeyError(f"no worker {wid!r}")
            return dict(w.info)

    def worker_ids(self, role: Role | None = None, state: str | None = "serving") -> list[str]:
        """Ids of the workers of `role` (both when None) in `state` (any when None), oldest first."""
        with self._lock:
            ws = sorted(self._workers.values(), key=lambda w: (ROLES.index(w.role), w.index))
            return [w.worker_id for w in ws if (role is None or w.role == role) and (state is None or w.state == state)]

    def shutdown(self) -> None:
        """Stop every worker and, when this controller started it, the local Ray cluster. Idempotent."""
        with self._lock:
            if self._shutdown_done:
                return
            self._shutdown_done = True
        self._stopping.set()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(self.ping_timeout_s + 5.0)
        got = self._ops_lock.acquire(timeout=30.0)  # scale/replacement loops see _stopping and return
        if not got:
            logger.warning("shutdown: a membership change is still running; stopping the workers anyway")
        try:
            with self._lock:
                workers = list(self._workers.values())
            for w in workers:
                self.directory.remove(w.worker_id)
            if workers and ray.is_initialized():
                logger.info("stopping %d workers", len(workers))
                self._stop_workers(workers, grace_s=min(self.stop_grace_s, 2.0))
            if self._owns_ray:
                local = _ray_descendants() if self.cfg.ray.address is None else {}
                # also after an interrupted ray.init(): it kills whatever that init had started
                ray.shutdown(wait_for_processes=True)
                _reap(local, timeout_s=10.0)
                logger.info(
                    "Ray disconnected%s", " and the local Ray cluster stopped" if self.cfg.ray.address is None else ""
                )
            self._owns_ray = False
        finally:
            if got:
                self._ops_lock.release()

    # ------------------------------------------------------------------------------------------
    # Starting
    # ------------------------------------------------------------------------------------------

    def _resolve_model(self) -> None:
        if self.model_path is not None:
            return
        if self.cfg.model.is_preset:
            from splitserve.model.presets import resolve_checkpoint

            self.model_path = str(resolve_checkpoint(self.cfg.model.path))
        else:
            # The checkpoint must exist on the worker nodes, not necessarily here; workers report it.
            self.model_path = self.cfg.model.path

    def local_num_cpus(self) -> int:
        """Logical CPUs of a local Ray cluster: ray.num_cpus, else this machine's count or room for
        `LOCAL_ROOM_WORKERS` workers (each takes its pool's cpus_per_worker), whichever is more."""
        if self.cfg.ray.num_cpus is not None:
            return self.cfg.ray.num_cpus
        pools = [self.cfg.prefill, self.cfg.decode]
        initial = sum(p.replicas * p.cpus_per_worker for p in pools)
        room = LOCAL_ROOM_WORKERS * max(p.cpus_per_worker for p in pools)
        return max(os.cpu_count() or 1, math.ceil(max(initial, room) - 1e-9))

    def _connect(self) -> None:
        ns = self.cfg.ray.namespace
        if ray.is_initialized():
            current = ray.get_runtime_context().namespace
            if current != ns:
                raise ControllerError(
                    f"this process is already connected to Ray in namespace {current!r}, "
                    f"but the config's ray.namespace is {ns!r}"
                )
            logger.info("using this process's existing Ray connection (namespace %s)", ns)
            return
        common: dict[str, Any] = {"namespace": ns, "logging_level": logging.WARNING}
        address = self.cfg.ray.address
        self._owns_ray = True  # from here on, shutdown() calls ray.shutdown() (even if init is interrupted)
        try:
            if address is None:
                n = self.local_num_cpus()
                logger.info("starting a local Ray cluster (%d CPUs, namespace %s)", n, ns)
                # address="local": a new cluster, even where RAY_ADDRESS or a `ray start` cluster exists
                ray.init(
                    address="local",
                    num_cpus=n,
                    include_dashboard=False,
                    object_store_memory=self.object_store_bytes,
                    **common,
                )
            else:
                logger.info("joining the Ray cluster at %s (namespace %s)", address, ns)
                ray.init(address=address, **common)
        except Exception as e:
            where = "start a local Ray cluster" if address is None else f"join the Ray cluster at {address!r}"
            hint = ""
            if address is not None:
                hint = (
                    " (is it running? `ray start --head` on the head node; a cluster with token "
                    "authentication needs RAY_AUTH_MODE=token and its token here)"
                )
            raise ControllerError(f"cannot {where}: {type(e).__name__}: {e}{hint}") from e

    def _check_feasible(self, role: Role) -> None:
        """Fail fast when no node of the Ray cluster has what one `role` worker asks for."""
        demand = resource_demand(self.cfg, role)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if any(all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in demand.items()) for n in nodes):
            return
        have = (
            "; ".join(
                f"{n.get('NodeManagerAddress', '?')}: "
                + ", ".join(
                    f"{k}={v:g}"
                    for k, v in sorted(n.get("Resources", {}).items())
                    if not k.startswith("node:") and k not in ("memory", "object_store_memory")
                )
                for n in nodes
            )
            or "no alive nodes"
        )
        raise ControllerError(
            f"no node of the Ray cluster can host a {role} worker: each needs "
            f"{', '.join(f'{k}={v:g}' for k, v in demand.items())} (from {role}.gpus_per_worker and "
            f"{role}.resources); nodes have: {have}"
        )

    def _check_room(self, more: dict[Role, int], targets: dict[Role, int] | None = None) -> None:
        """Fail fast when Ray's free resources cannot place `more` new workers per role (first fit over
        the nodes), naming what is missing and the settings that fix it. Ray's view of free resources
        lags a worker stopped just before, so a shortfall is looked at again for PLACEMENT_CHECK_S."""
        wanted = [(role, resource_demand(self.cfg, role)) for role, n in more.items() for _ in range(n)]
        if not wanted:
            return
        deadline = time.monotonic() + PLACEMENT_CHECK_S
        while True:
            free = _free_resources_per_node()
            if free is None:
                return  # no view of free resources (Ray Client): Ray places or the start timeout reports
            unplaced = _first_fit(wanted, free)
            if not unplaced or time.monotonic() >= deadline or self._stopping.is_set():
                break
            time.sleep(0.25)
        if not unplaced:
            return
        short: dict[Role, int] = {}
        for role, _ in unplaced:
            short[role] = short.get(role, 0) + 1
        total: dict[str, float] = {}
        for _, demand in wanted:
            for k, v in demand.items():
                total[k] = total.get(k, 0.0) + v
        free_sum: dict[str, float] = {}
        for node in free.values():
            for k, v in node.items():
                free_sum[k] = free_sum.get(k, 0.0) + v
        missing = sorted(
            {
                k
                for role, _ in unplaced
                for k in resource_demand(self.cfg, role)
                if free_sum.get(k, 0.0) < total[k] - 1e-9
            }
            or set(total)
        )
        fixes: list[str] = []
        for role in short:
            pool_demand = resource_demand(self.cfg, role)
            if "CPU" in missing and "CPU" in pool_demand:
                fixes.append(f"a smaller {role}.cpus_per_worker (now {pool_demand['CPU']:g})")
            if "GPU" in missing and "GPU" in pool_demand:
                fixes.append(f"a smaller {role}.gpus_per_worker (now {pool_demand['GPU']:g})")
            fixes += [
                f"nodes with more '{k}' ({role}.resources)"
                for k in missing
                if k in pool_config(self.cfg, role).resources
            ]
        if "CPU" in missing:
            fixes.append(
                "a larger ray.num_cpus (the local Ray cluster's logical CPUs; it is restarted by "
                "`splitserve down` + `up`)"
                if self.cfg.ray.starts_local_cluster
                else "more CPUs in the Ray cluster"
            )
        if "GPU" in missing:
            fixes.append("more GPUs in the Ray cluster")
        want = " + ".join(f"{n} more {role} worker{'s' if n != 1 else ''}" for role, n in more.items() if n)
        each = "; ".join(
            f"a {role} worker needs {_fmt_res(resource_demand(self.cfg, role))}" for role in more if more[role]
        )
        sizes = "" if targets is None else f" (to {targets['prefill']} prefill + {targets['decode']} decode)"
        raise PlacementError(
            f"cannot place {want}{sizes}: not enough {', '.join(missing)} free in the Ray cluster; {each}; "
            f"they need {_fmt_res({k: total[k] for k in missing})} in all, free now: "
            f"{_fmt_res({k: free_sum.get(k, 0.0) for k in missing})}. Fix: {'; or '.join(dict.fromkeys(fixes))}. "
            f"Nothing was changed."
        )

    def _launch(self, role: Role) -> _Worker:
        with self._lock:
            index = self._next_index[role]
            self._next_index[role] += 1
        wid = worker_id(role, index)
        spec = spec_for(
            self.cfg,
            role,
            index,
            model_path=self.model_path,
            cluster_secret=self.cluster_secret,
            grpc_tls=self.grpc_tls,
        )
        pg: Any = None
        followers: list[Any] = []
        try:
            if spec.tensor_parallel_size == 1:
                actor = RemoteWorkerActor.options(**actor_options(self.cfg, role, wid)).remote(spec)
            else:  # every rank in one placement group, packed on one node; rank 0 serves
                pg = placement_group(rank_bundles(self.cfg, role), strategy="STRICT_PACK", name=f"{wid}-ranks")
                actor = RemoteWorkerActor.options(**rank_options(self.cfg, role, wid, 0, pg)).remote(spec)
                for r in range(1, spec.tensor_parallel_size):
                    opts = rank_options(self.cfg, role, wid, r, pg)
                    followers.append(RemoteRankActor.options(**opts).remote(dataclasses.replace(spec, rank=r)))
        except ValueError as e:  # e.g. the actor name is taken in this namespace
            for a in followers:
                ray.kill(a, no_restart=True)
            if pg is not None:
                remove_placement_group(pg)
            raise ControllerError(
                f"cannot create worker {wid}: {e} (another splitserve cluster in Ray "
                f"namespace {self.cfg.ray.namespace!r}? give it another ray.namespace)"
            ) from e
        w = _Worker(wid, role, index, actor, followers=followers, placement_group=pg, rendezvous=spec.dist_init_method)
        with self._lock:
            self._workers[wid] = w
        logger.info("starting worker %s", wid)
        return w

    def _launch_many(self, counts: dict[Role, int]) -> tuple[list[_Worker], ControllerError | None]:
        """Create count actors per role; stops at the first that cannot be created (returned)."""
        new: list[_Worker] = []
        try:
            for role, n in counts.items():
                for _ in range(n):
                    new.append(self._launch(role))
        except ControllerError as e:
            logger.error("%s", e)
            return new, e
        return new, None

    def _await_ready(self, workers: list[_Worker]) -> tuple[list[_Worker], dict[str, str]]:
        """Wait (bounded) until each worker serves; add those to the Directory, kill the others."""
        refs = {w.actor.info.remote(): w for w in workers}
        pending = list(refs)
        ready: list[_Worker] = []
        failed: dict[str, str] = {}
        t0 = time.monotonic()
        deadline = t0 + self.start_timeout_s
        next_progress = t0 + 10.0
        while pending:
            now = time.monotonic()
            if self._stopping.is_set():
                failed.update({refs[r].worker_id: "the controller is shutting down" for r in pending})
                break
            if now >= deadline:
                for r in pending:
                    failed[refs[r].worker_id] = (
                        f"not serving after {self.start_timeout_s:.0f} s{self._placement_hint(refs[r])}"
                    )
                break
            if now >= next_progress:
                logger.info(
                    "waiting for %d worker(s) to load the model and serve (%.0f s of at most %.0f): %s",
                    len(pending),
                    now - t0,
                    self.start_timeout_s,
                    ", ".join(f"{refs[r].worker_id}{self._placement_hint(refs[r])}" for r in pending),
                )
                next_progress = now + 10.0
            done, pending = ray.wait(pending, num_returns=1, timeout=min(0.5, deadline - now))
            for r in done:
                w = refs[r]
                try:
                    w.info = ray.get(r)
                    if w.followers:  # rank 0 serves once every rank has joined and follows it
                        ranks = ray.get([f.ping.remote() for f in w.followers], timeout=30.0)
                        w.info["ranks"] = [
                            {"rank": 0, "pid": w.info.get("pid"), "gpus": list(w.info.get("gpus", []))},
                            *({"rank": x["rank"], "pid": x["pid"], "gpus": x["gpus"]} for x in ranks),
                        ]
                except Exception as e:  # noqa: BLE001 - any failure of a worker's creation is reported
                    failed[w.worker_id] = _failure_reason(e)
                else:
                    ready.append(w)
                    self._admit(w)  # it serves now, whatever the others are doing
        dead = [w for w in workers if w.worker_id in failed]
        if dead:
            for wid in sorted(failed):
                logger.error("worker %s failed to start: %s", wid, failed[wid])
            self._kill(dead)
        return ready, failed

    def _placement_hint(self, w: _Worker) -> str:
        """Why a worker is not serving yet: placed and loading, or waiting for resources."""
        pid = _actor_pid(w.actor)
        if pid:
            return f" (loading in pid {pid})"
        demand = resource_demand(self.cfg, w.role)
        try:
            avail = ray.available_resources()
        except Exception:  # noqa: BLE001
            return ""
        free = {k: avail.get(k, 0.0) for k in demand}
        if pid == 0 or any(free[k] < v for k, v in demand.items()):
            return (
                f" (waiting for Ray to place it: it needs "
                f"{', '.join(f'{k}={v:g}' for k, v in demand.items())}; free now: "
                f"{', '.join(f'{k}={v:g}' for k, v in free.items())})"
            )
        return ""

    def _admit(self, w: _Worker) -> None:
        info = w.info
        with self._lock:
            w.state = "serving"
        self.directory.add(
            WorkerInfo(
                worker_id=w.worker_id,
                role=w.role,
                address=str(info["address"]),
                pid=int(info.get("pid") or 0),
                node=str(info.get("node_ip") or info.get("node") or ""),
                gpus=tuple(int(g) for g in info.get("gpus", ())),
                state="serving",
                transfer_metadata=bytes(info.get("transfer_metadata") or b""),
                blocks_total=int(info.get("blocks_total") or 0),
            )
        )
        logger.info(
            "worker %s serving at %s (pid %s, node %s)",
            w.worker_id,
            info["address"],
            info.get("pid"),
            info.get("node_ip") or info.get("node"),
        )

    # ------------------------------------------------------------------------------------------
    # Stopping
    # ------------------------------------------------------------------------------------------

    def _active(self, role: Role) -> list[_Worker]:
        with self._lock:
            return [w for w in self._workers.values() if w.role == role and w.state in _LIVE_STATES]

    def _drain_and_stop(self, victims: list[_Worker]) -> None:
        with self._lock:
            for w in victims:
                w.state = "draining"
        for w in victims:
            self.directory.update(w.worker_id, state="draining")
            logger.info("draining worker %s", w.worker_id)
        _wait_all([w.actor.drain.remote() for w in victims], timeout_s=10.0)
        busy = {w.worker_id: w for w in victims}
        last: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + self.drain_timeout_s
        while busy and time.monotonic() < deadline and not self._stopping.is_set():
            refs = {w.actor.stats.remote(): w for w in busy.values()}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=2.0)
            for r in ready:
                w = refs[r]
                try:
                    s = ray.get(r)
                except RayActorError:
                    busy.pop(w.worker_id, None)  # died while draining: nothing left to wait for
                    continue
                except Exception as e:  # noqa: BLE001
                    logger.warning("worker %s: stats failed while draining: %s", w.worker_id, e)
                    continue
                last[w.worker_id] = s
                if int(s.get("running", 0)) == 0 and int(s.get("waiting", 0)) == 0:
                    busy.pop(w.worker_id, None)
                    logger.info("worker %s drained", w.worker_id)
            if busy:
                time.sleep(0.2)
        for wid in busy:
            s = last.get(wid, {})
            logger.warning(
                "worker %s still has %s running / %s waiting requests after %.0f s of draining; stopping it anyway",
                wid,
                s.get("running", "?"),
                s.get("waiting", "?"),
                self.drain_timeout_s,
            )
        self._stop_workers(victims, grace_s=self.stop_grace_s)

    def _stop_workers(self, workers: list[_Worker], grace_s: float) -> None:
        """Remove from the Directory, stop gracefully (bounded), then kill the actors."""
        for w in workers:
            self.directory.remove(w.worker_id)
        refs = []
        for w in workers:
            try:
                refs.append(w.actor.stop.remote(grace_s))
            except Exception as e:  # noqa: BLE001 - a dead actor needs no stop
                logger.debug("stop %s: %s", w.worker_id, e)
        _wait_all(refs, timeout_s=grace_s + 5.0)
        self._kill(workers)
        for w in workers:
            logger.info("worker %s stopped", w.worker_id)

    def _kill(self, workers: Iterable[_Worker]) -> None:
        for w in workers:
            for a in [w.actor, *w.followers]:  # every rank of the worker
                try:
                    ray.kill(a, no_restart=True)
                except Exception as e:  # noqa: BLE001 - already gone
                    logger.debug("kill %s: %s", w.worker_id, e)
            if w.placement_group is not None:
                try:
                    remove_placement_group(w.placement_group)
                except Exception as e:  # noqa: BLE001 - already removed
                    logger.debug("remove placement group of %s: %s", w.worker_id, e)
            remove_rendezvous(w.rendezvous)  # when the ranks ran on this node (a clean stop removed it already)
            with self._lock:
                w.state = "stopped"
                self._workers.pop(w.worker_id, None)
            self.directory.remove(w.worker_id)

    def _check_running(self) -> None:
        if not self._started or self._stopping.is_set():
            raise ControllerError("the cluster is not running")

    # ------------------------------------------------------------------------------------------
    # Monitoring
    # ------------------------------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        while not self._stopping.wait(self.monitor_interval_s):
            try:
                self._check_health()
                with self._lock:
                    short = any(len(self._active(role)) < self._targets[role] for role in ROLES)
                if short:
                    self._short.set()
            except Exception:  # noqa: BLE001 - the monitor must survive anything
                if not self._stopping.is_set():
                    logger.exception("monitor: unexpected error")

    def _replacer_loop(self) -> None:
        while not self._stopping.is_set():
            if not self._short.wait(0.5):
                continue
            self._short.clear()
            try:
                self._replace_missing()
            except Exception:  # noqa: BLE001
                if not self._stopping.is_set():
                    logger.exception("replacing workers failed")

    def _check_health(self) -> None:
        with self._lock:
            serving = [w for w in self._workers.values() if w.state == "serving"]
        if not serving:
            return
        refs = {w.actor.ping.remote(): w for w in serving}
        # ranks 1.. of tensor-parallel workers: a dead one leaves its leader waiting in a collective
        # (NCCL does not notice a dead peer), so the controller watches every rank
        rank_refs = {f.ping.remote(): (w, i + 1) for w in serving for i, f in enumerate(w.followers)}
        everything = list(refs) + list(rank_refs)
        ready, pending = ray.wait(everything, num_returns=len(everything), timeout=self.ping_timeout_s)
        # a round counts once per worker: missed when any of its ranks missed, answered when none did and
        # its leader answered (so N followers missing one round do not add up to max_missed_pings)
        missed: dict[str, tuple[_Worker, str]] = {}
        answered: set[str] = set()
        for r in ready:
            if r in rank_refs:
                w, rank = rank_refs[r]
                why = self._check_rank(r, w, rank)
                if why is not None:
                    missed.setdefault(w.worker_id, (w, why))
                continue
            w = refs[r]
            try:
                p = ray.get(r)
            except RayActorError as e:
                self._mark_dead(w, _failure_reason(e))
                continue
            except Exception as e:  # noqa: BLE001 - the worker answered with an error: count it as a miss
                missed.setdefault(w.worker_id, (w, f"ping failed: {type(e).__name__}: {e}"))
                continue
            if not p.get("engine_alive", True):
                self._mark_dead(w, "its engine loop stopped")
                continue
            answered.add(w.worker_id)
            load = {
                k: int(p[k])
                for k in ("blocks_used", "blocks_total", "running", "waiting", "requests_done", "queued_prefill_tokens")
                if k in p
            }
            self.directory.update(w.worker_id, last_seen=time.monotonic(), **load)
        for r in pending:
            if r in rank_refs:
                w, rank = rank_refs[r]
                missed.setdefault(
                    w.worker_id, (w, f"rank {rank}: no answer to a ping within {self.ping_timeout_s:g} s")
                )
            else:
                w = refs[r]
                missed.setdefault(w.worker_id, (w, f"no answer to a ping within {self.ping_timeout_s:g} s"))
        for w in serving:
            if w.worker_id in missed:
                self._missed(*missed[w.worker_id])
            elif w.worker_id in answered:
                w.missed_pings = 0

    def _check_rank(self, ref: Any, w: _Worker, rank: int) -> str | None:
        """Marks the worker dead when this rank died or stopped following; a miss's reason otherwise."""
        try:
            p = ray.get(ref)
        except RayActorError as e:
            self._mark_dead(w, f"its rank {rank} died: {_failure_reason(e)}")
            return None
        except Exception as e:  # noqa: BLE001 - counted as a miss, like the leader's
            return f"rank {rank}: ping failed: {type(e).__name__}: {e}"
        if not p.get("following", True):
            self._mark_dead(w, f"its rank {rank} stopped following the leader")
        return None

    def _missed(self, w: _Worker, why: str) -> None:
        w.missed_pings += 1
        logger.warning("worker %s: %s (%d in a row)", w.worker_id, why, w.missed_pings)
        if w.missed_pings >= self.max_missed_pings:
            self._mark_dead(w, f"{w.missed_pings} pings in a row failed ({why})")

    def _mark_dead(self, w: _Worker, why: str) -> None:
        with self._lock:
            if self._workers.get(w.worker_id) is not w or w.state != "serving":
                return
            w.state = "dead"
        self.directory.update(w.worker_id, state="dead")
        logger.error(
            "worker %s (pid %s, node %s) is dead: %s",
            w.worker_id,
            w.info.get("pid"),
            w.info.get("node_ip") or w.info.get("node"),
            why,
        )
        self.replaced.append((w.worker_id, why))
        self._kill([w])

    def _replace_missing(self) -> None:
        if self._stopping.is_set() or not self._ops_lock.acquire(blocking=False):
            return  # a scale in progress reconciles the pools itself
        try:
            now = time.monotonic()
            more: dict[Role, int] = {}
            for role in ROLES:
                with self._lock:
                    missing = self._targets[role] - len(self._active(role))
                fails, retry_at = self._replace_backoff.get(role, (0, 0.0))
                if missing <= 0 or now < retry_at:
                    continue
                logger.info(
                    "%s pool has %d of %d workers; starting %d",
                    role,
                    self._targets[role] - missing,
                    self._targets[role],
                    missing,
                )
                more[role] = missing
            new, launch_error = self._launch_many(more)
            failed: dict[str, str] = {}
            if new:
                _, failed = self._await_ready(new)
            failed_roles = {w.role for w in new if w.worker_id in failed}
            if launch_error is not None:
                failed_roles |= set(more)
            for role in more:
                if role in failed_roles:
                    fails = self._replace_backoff.get(role, (0, 0.0))[0] + 1
                    delay = min(60.0, 2.0**fails)
                    self._replace_backoff[role] = (fails, time.monotonic() + delay)
                    logger.error(
                        "could not replace a %s worker (%d failures in a row); retrying in %.0f s", role, fails, delay
                    )
                else:
                    self._replace_backoff.pop(role, None)
        finally:
            self._ops_lock.release()


def _fmt_res(res: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in res.items())


def _free_resources_per_node() -> dict[str, dict[str, float]] | None:
    """Ray's free resources of each live node (None where this connection cannot read them)."""
    try:
        from ray._private.state import available_resources_per_node

        return {node: dict(res) for node, res in available_resources_per_node().items()}
    except Exception:  # noqa: BLE001 - a developer API (absent under Ray Client): the aggregate then
        try:
            return {"cluster": dict(ray.available_resources())}
        except Exception:  # noqa: BLE001
            return None


def _first_fit(
    wanted: list[tuple[Role, dict[str, float]]], free: dict[str, dict[str, float]]
) -> list[tuple[Role, dict[str, float]]]:
    """The workers that do not fit when placed one by one on the first node with room for each."""
    room = {node: dict(res) for node, res in free.items()}
    unplaced = []
    for role, demand in sorted(wanted, key=lambda w: -sum(w[1].values())):
        node = next((n for n, r in room.items() if all(r.get(k, 0.0) >= v - 1e-9 for k, v in demand.items())), None)
        if node is None:
            unplaced.append((role, demand))
            continue
        for k, v in demand.items():
            room[node][k] -= v
    return unplaced


def _wait_all(refs: list[Any], timeout_s: float) -> None:
    """Wait (bounded) for remote calls whose results do not matter (errors are logged at debug)."""
    if not refs:
        return
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for r in ready:
        try:
            ray.get(r, timeout=0)
        except (RayActorError, GetTimeoutError) as e:
            logger.debug("remote call: %s", e)
        except Exception as e:  # noqa: BLE001
            logger.warning("remote call failed: %s", e)


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ..., starttime at [19])."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _ray_descendants() -> dict[int, str]:
    """pid -> start time of this process's descendants that are Ray's (a local cluster's gcs, raylet,
    agents, workers). Linux only (/proc); {} elsewhere."""
    if not os.path.isdir("/proc"):
        return {}
    children: dict[int, list[int]] = {}
    start: dict[int, str] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        fields = _proc_stat(int(d))
        if fields is None or len(fields) < 20:
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
        start[int(d)] = fields[19]
    out: dict[int, str] = {}
    stack = [os.getpid()]
    while stack:
        for c in children.get(stack.pop(), []):
            if c in out:
                continue
            try:
                with open(f"/proc/{c}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace").lower()
            except OSError:
                continue
            stack.append(c)
            if "ray" in cmd:
                out[c] = start[c]
    return out


def _reap(procs: dict[int, str], timeout_s: float) -> None:
    """Wait for these processes (pid -> start time) to exit; SIGKILL the ones still there after timeout_s.
    A pid whose start time changed is another process by now and is left alone."""

    def alive() -> list[int]:
        out = []
        for pid, started in procs.items():
            fields = _proc_stat(pid)
            if fields is not None and len(fields) >= 20 and fields[19] == started and fields[0] != "Z":
                out.append(pid)
        return out

    deadline = time.monotonic() + timeout_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive()
    if left:
        logger.warning("killing %d Ray processes left after ray.shutdown(): %s", len(left), left)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _actor_pid(actor: Any) -> int | None:
    """The pid of an actor's process (0: not placed yet; None: unknown). Reads Ray's actor table."""
    try:
        from ray._private.state import actors as actor_table

        return int(actor_table(actor._actor_id.hex()).get("Pid") or 0)
    except Exception:  # noqa: BLE001 - a private API (absent under Ray Client): no hint then
        return None


def _failure_reason(e: BaseException) -> str:
    """A one-line reason from a Ray error: the worker's own exception where there is one."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # A creation task error ends with the worker's exception ("FileNotFoundError: ... not a checkpoint").
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if ":" in ln and (head.endswith("Error") or head.endswith("Exception")) and " " not in head:
            if not head.startswith("ray.exceptions") and head not in ("RayActorError", "ActorDiedError"):
                return ln
    if isinstance(e, RayActorError):
        for ln in lines:
            if "killed" in ln or "died" in ln or "exit" in ln.lower():
                return f"{type(e).__name__}: {ln[:300]}"
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"
