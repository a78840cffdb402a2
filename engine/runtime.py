"""What a worker process runs: the model, its engine in a loop thread, and a cache transport.

Both worker kinds build one `WorkerRuntime` from a `WorkerSpec` (picklable: the Ray launcher
sends it to the worker's actor). The transport registers the engine's cache pools once; its
compatibility fields (model, cache layout, MTP) are checked first in every transfer handshake.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import grpc

from splitserve.protos.auth import ClusterSecretInterceptor, GrpcTls, add_port

from .config import EngineConfig

if TYPE_CHECKING:  # the model stack loads in the worker only: a WorkerSpec is built without torch
    import torch

    from splitserve.kvtransfer import Compat
    from splitserve.model.parallel import ParallelState

    from .engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to start (built from the cluster YAML by the launcher)."""

    worker_id: str
    role: Literal["prefill", "decode"]
    model_path: str
    engine: EngineConfig = field(default_factory=EngineConfig)
    transfer_backend: Literal["nixl", "tcp"] = "tcp"
    transfer_host: str = "127.0.0.1"
    transfer_timeout_s: float = 30.0
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 0
    reserve_lease_s: float = 30.0  # decode: reserved blocks come back if no cache arrives in time
    first_token_timeout_s: float = 120.0
    # Every gRPC call and every TCP-transfer handshake must prove it (None: no check; the launcher always
    # sets one, made per run and sent to the worker through Ray inside this spec).
    cluster_secret: str | None = field(default=None, repr=False)
    grpc_tls: GrpcTls | None = field(default=None, repr=False)  # TLS for the gRPC server (None: plaintext)
    # Tensor parallelism (model/parallel.py): the worker is tensor_parallel_size processes; this spec's
    # rank 0 serves gRPC and leads the engine, ranks 1.. follow (FollowerRuntime). dist_init_method is
    # their torch.distributed rendezvous ("file://..." on the node they share, or "tcp://host:port").
    tensor_parallel_size: int = 1
    expert_parallel: bool = False
    dist_init_method: str = ""
    rank: int = 0

    @property
    def quarantine_s(self) -> float:
        """Decode: how long blocks of an abandoned reservation wait for a possible late write
        (longer than any prefill worker keeps writing: its first-token plus transfer deadlines)."""
        return self.first_token_timeout_s + self.transfer_timeout_s + 5.0


def think_token_ids(checkpoint: str | Path) -> tuple[int, int]:
    """The ids of <think> and </think> in a checkpoint's tokenizer (relaxed MTP acceptance needs them)."""
    from splitserve.model.tokenizer import THINK_END_TOKEN, THINK_START_TOKEN, load_tokenizer

    tok = load_tokenizer(checkpoint)
    start, end = tok.token_to_id(THINK_START_TOKEN), tok.token_to_id(THINK_END_TOKEN)
    if start is None or end is None:
        raise RuntimeError(
            f"decode.mtp_relaxed_topk is set but the tokenizer of {checkpoint} has no {THINK_START_TOKEN} / "
            f"{THINK_END_TOKEN} tokens: relaxed acceptance only applies inside the thinking phase"
        )
    return start, end


def engine_config(spec: WorkerSpec, checkpoint: str | Path) -> EngineConfig:
    """The worker's engine config, completed from its checkpoint (every rank builds the same one)."""
    ecfg = spec.engine
    if ecfg.mtp_relaxed_topk and ecfg.think_token_ids is None:
        ecfg = dataclasses.replace(ecfg, think_token_ids=think_token_ids(checkpoint))
    return ecfg


def join_parallel(spec: WorkerSpec) -> ParallelState:
    """This process's rank of the worker (world size 1: no process group at all)."""
    from splitserve.model.parallel import ParallelState

    n = spec.tensor_parallel_size
    if n > 1 and not spec.dist_init_method:
        raise ValueError(f"worker {spec.worker_id}: tensor_parallel_size {n} needs a dist_init_method")
    return ParallelState.init(
        spec.rank, n, spec.dist_init_method, spec.engine.device, expert_parallel=spec.expert_parallel
    )


def load_shard(spec: WorkerSpec, parallel: ParallelState) -> tuple[Any, Any]:
    """(checkpoint directory, this rank's network)."""
    import torch

    from splitserve.model import load
    from splitserve.model.presets import resolve_checkpoint

    ecfg = spec.engine
    if ecfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"worker {spec.worker_id}: device 'cuda' requested but no GPU is visible")
    path = resolve_checkpoint(spec.model_path)
    net = load(
        path,
        device=ecfg.device,
        dtype=ecfg.torch_dtype,
        indexer_fp8=ecfg.indexer_fp8,
        fp8_weights=ecfg.fp8_weights,
        parallel=parallel,
    )
    return path, net


class FollowerRuntime:
    """Rank 1.. of a tensor-parallel worker: its shard of the network and a cache like the leader's,
    repeating the leader's network calls in a thread (Engine.follow) until the leader stops it."""

    def __init__(self, spec: WorkerSpec) -> None:
        import threading

        from .engine import Engine

        if spec.rank < 1:
            raise ValueError("FollowerRuntime is for ranks >= 1 (rank 0 is the WorkerRuntime)")
        self.spec = spec
        self.parallel = join_parallel(spec)
        path, net = load_shard(spec, self.parallel)
        self.engine = Engine(net, engine_config(spec, path))  # the same config as the leader's
        self.error: BaseException | None = None
        self.calls = 0
        self._thread = threading.Thread(target=self._follow, name=f"follow-{spec.worker_id}-{spec.rank}", daemon=True)
        self._thread.start()
        log.info("worker %s rank %d/%d following", spec.worker_id, spec.rank, spec.tensor_parallel_size)

    def _follow(self) -> None:
        try:
            self.calls = self.engine.follow()
        except BaseException as e:  # noqa: BLE001 - reported by alive/ping; the leader fails on its side
            log.exception("worker %s rank %d: following the leader failed", self.spec.worker_id, self.spec.rank)
            self.error = e

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.parallel.destroy()


def transfer_compat(engine: Engine) -> Compat:
    """Fields both ends of a cache transfer must agree on."""
    from splitserve.kvtransfer import Compat

    cfg = engine.net.cfg
    fields: dict[str, Any] = {
        "model": cfg.short_hash(),
        **engine.pool.layout.describe(),
        "mtp_layers": int(engine.net.has_mtp),
        "mtp_cache": engine.mtp_cache,
    }
    return Compat.of(**fields)


class WorkerRuntime:
    def __init__(self, spec: WorkerSpec) -> None:
        from splitserve.kvtransfer import TransportConfig, make_transport

        from .engine import Engine
        from .loop import EngineLoop

        self.spec = spec
        ecfg = spec.engine
        if spec.rank != 0:
            raise ValueError("WorkerRuntime is rank 0 of its worker (the others run FollowerRuntime)")
        self.parallel = join_parallel(spec)  # tensor parallel: waits for the other ranks to join
        path, net = load_shard(spec, self.parallel)
        ecfg = engine_config(spec, path)
        self.checkpoint = path
        self.engine = Engine(net, ecfg)
        # kernels compiled and (decode) graphs captured before ready; a prefill worker never decodes
        self.warm = self.engine.warm_up(capture_graphs=spec.role == "decode")
        self.loop = EngineLoop(self.engine, name=f"engine-{spec.worker_id}").start()
        self.transport = make_transport(
            spec.transfer_backend,
            spec.worker_id,
            transfer_compat(self.engine),
            host=spec.transfer_host,
            config=TransportConfig(
                transfer_timeout_s=spec.transfer_timeout_s,
                secret=None if spec.cluster_secret is None else spec.cluster_secret.encode(),
            ),
        )
        self.transport.register_pools(self.engine.pool.pools())
        if self.engine.pool.staging[1]:  # scattered blocks gather here and travel as one region
            self.transport.enable_staging(*self.engine.pool.staging)
        self.metadata = self.transport.metadata()
        log.info(
            "worker %s (%s) ready: %s, %d blocks of %d tokens (%.1f MB each), transfer %s",
            spec.worker_id,
            spec.role,
            path,
            self.engine.cfg.num_blocks,
            ecfg.block_size,
            self.engine.pool.bytes_per_block / 1e6,
            spec.transfer_backend,
        )

    def warm_stats(self) -> dict:
        """For Stats: graphs captured, steps after ready without a graph, warm-up seconds."""
        return {**self.engine.graph_stats, "warmup_seconds": float(self.warm.get("seconds", 0.0))}

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def node(self) -> str:
        return socket.gethostname()

    def close(self) -> None:
        self.loop.stop()
        self.transport.close()
        if self.parallel.distributed and self.loop.stopped_cleanly:  # no step half done: the followers are waiting
            self.engine.stop_followers()
            self.parallel.destroy()
        remove_rendezvous(self.spec.dist_init_method)


def remove_rendezvous(init_method: str) -> None:
    """Delete a "file://" rendezvous of a worker's ranks (once they are done with it), if it is here."""
    if init_method.startswith("file://"):
        try:
            os.unlink(init_method.removeprefix("file://"))
        except OSError:
            pass


class WorkerServer:
    """A running worker: its runtime and its gRPC server (built by each role's `serve(spec)`)."""

    def __init__(self, rt: WorkerRuntime, service, add_to_server, role: str) -> None:
        self.rt, self.service, self.role = rt, service, role
        secret = rt.spec.cluster_secret
        # One thread per open stream (Generate holds one until its last token): with fewer threads than
        # running requests, later streams would wait in gRPC's queue, a decode stall of whole seconds.
        threads = max(64, 2 * rt.engine.cfg.max_running + 16)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"grpc-{role}"),
            options=[("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)],
            interceptors=[ClusterSecretInterceptor(secret)] if secret is not None else None,
        )
        add_to_server(service, self.server)
        port = add_port(self.server, f"{rt.spec.grpc_host}:{rt.spec.grpc_port}", rt.spec.grpc_tls)
        if port == 0:
            raise RuntimeError(f"cannot bind gRPC on {rt.spec.grpc_host}:{rt.spec.grpc_port}")
        self.address = f"{rt.spec.grpc_host}:{port}"
        self.server.start()
        log.info("%s worker %s serving gRPC on %s", role, rt.spec.worker_id, self.address)

    def info(self) -> dict:
        return {
            "worker_id": self.rt.spec.worker_id,
            "role": self.role,
            "address": self.address,
            "pid": self.rt.pid,
            "node": self.rt.node,
            "transfer_metadata": self.rt.metadata,
            "blocks_total": self.rt.engine.blocks_total,
            "tensor_parallel_size": self.rt.parallel.world_size,
            "expert_parallel": self.rt.parallel.expert_parallel,
        }

    def stats(self) -> dict:
        return self.service.stats()

    def drain(self) -> None:
        self.service.draining = True

    def stop(self, grace_s: float = 5.0) -> None:
        self.service.draining = True
        self.server.stop(grace_s).wait(grace_s + 1)
        self.rt.close()


def generator_state_from_bytes(data: bytes) -> torch.Tensor | None:
    """A generator state sent as raw bytes (torch.Generator.get_state())."""
    import torch

    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else None
