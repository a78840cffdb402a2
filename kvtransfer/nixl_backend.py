"""NIXL (UCX) backend: one-sided RDMA-style WRITEs from local pools into a peer's pools.

One ``nixl_agent`` per transport (per worker process), UCX backend only. Pools are registered once
(DRAM for CPU tensors, VRAM for CUDA tensors); ``metadata()`` carries ``get_agent_metadata()``
(connection info + remote keys) inside our own versioned envelope together with the pool
descriptors (base address, block count, block bytes), so the initiator can build remote
descriptors itself -- no pickled NIXL descriptor lists travel.

A write is coalesced into runs (both block ids consecutive) and posted as ONE ``initialize_xfer``
per (local memory type, remote memory type) pair -- normally exactly one -- with one descriptor per
run per pool, and the notification attached, which NIXL delivers after the data has been flushed
to the peer. NIXL sends an attached notification when the INITIATOR sees the request complete
(``check_xfer_state``), so a background thread checks unfinished requests
(``NixlConfig.progress_interval_s``). The notification is NOT attached, but sent with
``send_notif`` once the data is in place, when (a) pools of one side mix CPU and CUDA memory (the
write needs several NIXL requests), or (b) an earlier write to the same peer is still in flight:
NIXL does not order independent requests, and a request streamed as several writes must be
announced only when all of them landed. NIXL's UCX backend flushes the endpoint before reporting
DONE, so DONE means the bytes are in the peer's memory.

Why ``initialize_xfer`` and not ``prep_xfer_dlist`` + ``make_prepped_xfer``: the prepped path needs
a per-block descriptor list for every pool of every peer (num_blocks descriptors each, rebuilt at
every handshake) and selects blocks by index; NIXL then merges adjacent descriptors itself. With
block-major pools a request is a few runs, so building the few coalesced descriptors per request is
cheaper than keeping per-block lists, and it is the same code for any run length. On CPU (UCX over
CMA) both paths cost the same for a request-sized transfer (see ``python -m
splitserve.kvtransfer.bench``).

UCX on CPU between two processes on one host uses ``cma`` (process_vm_writev) for the data and
``tcp`` over loopback for the notification active messages; no environment variable is needed.
UCX options can be given through :class:`NixlConfig` (``ucx_options``); NIXL applies them to its UCX
context, except keys already set as ``UCX_*`` environment variables in the process, which win.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from nixl._api import nixl_agent, nixl_agent_config

from .base import (
    Compat,
    HandshakeError,
    PeerMetadata,
    PoolInfo,
    TransferState,
    TransportConfig,
    TransportError,
)
from .common import TransportCore, XferRecord

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NixlConfig(TransportConfig):
    """Options of the NIXL backend (plus the shared timeouts)."""

    #: NIXL progress thread (drives UCX so transfers and notifs progress without polling)
    enable_prog_thread: bool = True
    #: UCX backend worker threads; 0 = NIXL's default
    num_threads: int = 0
    #: "peer": UCX detects a dead peer and fails its transfers; "none": no detection (faster on IB)
    error_handling_mode: str = "peer"
    #: restrict UCX to these network devices, e.g. ("mlx5_0", "mlx5_1"); () = let UCX choose
    ucx_devices: tuple[str, ...] = ()
    #: UCX configuration overrides without the "UCX_" prefix, e.g. (("TLS", "tcp"),) -- NIXL splits
    #: its engine_config on ',' so a value cannot contain ','; UCX_* env vars of the process win
    ucx_options: tuple[tuple[str, str], ...] = ()
    #: NIXL per-transfer telemetry (needed for get_xfer_telemetry; small overhead)
    capture_telemetry: bool = False
    #: NIXL sends a transfer's notification only when the INITIATOR checks the transfer's state
    #: after the data landed. A background thread of ours checks unfinished transfers at this
    #: interval so the receiver gets its notification even if the caller polls rarely; None =
    #: no thread, the caller's ``poll`` alone drives completion and notification.
    progress_interval_s: float | None = 0.0005

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.error_handling_mode not in ("peer", "none"):
            raise ValueError(f"error_handling_mode must be 'peer' or 'none', got {self.error_handling_mode!r}")
        if self.progress_interval_s is not None and not self.progress_interval_s > 0:
            raise ValueError(f"progress_interval_s must be > 0 or None, got {self.progress_interval_s}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")
        for k, v in self.ucx_options:
            if not k or "=" in k or "," in k or "," in v:
                raise ValueError(f"bad UCX option {k}={v}: keys need no '=' or ',', values no ','")
            if k.upper().startswith("UCX_"):
                raise ValueError(f"give UCX option {k!r} without the 'UCX_' prefix")

    def ucx_params(self) -> dict[str, str]:
        params = {"ucx_error_handling_mode": self.error_handling_mode}
        if self.num_threads:
            params["num_threads"] = str(self.num_threads)
        if self.ucx_devices:
            params["ucx_devices"] = ",".join(self.ucx_devices)
        if self.ucx_options:
            params["engine_config"] = ",".join(f"{k}={v}" for k, v in self.ucx_options)
        return params


@dataclass(eq=False)
class _NixlXfer:
    handles: list[Any] = field(default_factory=list)
    #: a notif NIXL could not carry with the data (several requests, or an empty message)
    pending_notif: bytes | None = None


class NixlTransport(TransportCore):
    """:class:`~splitserve.kvtransfer.base.Transport` over a NIXL agent with the UCX backend.

    ``host`` is only advertised in the metadata (for logs and peers); UCX picks its own interfaces
    and transports -- restrict them with ``NixlConfig.ucx_devices`` / ``ucx_options``.
    """

    backend = "nixl"

    def __init__(self, name: str, compat: Compat, host: str = "127.0.0.1", config: NixlConfig | None = None) -> None:
        cfg = config if config is not None else NixlConfig()
        super().__init__(name, compat, cfg)
        self._cfg = cfg
        self._host = host
        agent_cfg = nixl_agent_config(
            enable_prog_thread=cfg.enable_prog_thread,
            enable_listen_thread=False,
            capture_telemetry=cfg.capture_telemetry,
            backends=[],
        )
        self._agent: nixl_agent | None = None
        try:
            self._agent = nixl_agent(name, agent_cfg)
            self._agent.create_backend("UCX", cfg.ucx_params())
        except Exception as e:
            self._agent = None
            raise TransportError(f"NIXL could not create an agent with UCX: {type(e).__name__}: {e}") from e
        self._regs: list[Any] = []
        self._notifs: dict[str, list[bytes]] = defaultdict(list)
        self._leaked: list[Any] = []  # handles NIXL refused to release (kept alive, retried at close)
        self._active: set[XferRecord] = set()  # unfinished transfers, for the progress thread
        self._inflight: dict[str, list[XferRecord]] = {}  # per peer, in posting order
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._progress_thread: threading.Thread | None = None
        if cfg.progress_interval_s is not None:
            self._progress_thread = threading.Thread(
                target=self._progress_loop, args=(cfg.progress_interval_s,), name=f"kvnixl-progress-{name}", daemon=True
            )
            self._progress_thread.start()

    @property
    def agent(self) -> nixl_agent:
        if self._agent is None:
            raise TransportError(f"transport {self.name!r} is closed")
        return self._agent

    # -- hooks ----------------------------------------------------------------------------------

    def _on_register(self, pools: list[torch.Tensor], infos: tuple[PoolInfo, ...]) -> None:
        regs: list[Any] = []
        try:
            for info in infos:
                regs.append(self.agent.register_memory([(info.base_addr, info.nbytes, info.dev_id, "")], info.mem_type))
        except Exception as e:
            for r in regs:
                self._deregister(r)
            raise TransportError(f"NIXL could not register the pools: {type(e).__name__}: {e}") from e
        self._regs = regs

    def _address(self) -> str:
        return self._host

    def _blob(self) -> bytes:
        with self._lock:
            return bytes(self.agent.get_agent_metadata())

    def _connect(self, md: PeerMetadata) -> None:
        with self._lock:
            try:
                got = self.agent.add_remote_agent(md.blob)
            except Exception as e:
                raise HandshakeError(f"NIXL could not load the metadata of {md.name!r}: {type(e).__name__}: {e}") from e
            got_name = got.decode() if isinstance(got, bytes) else str(got)
            if got_name != md.name:
                self._forget_agent(got_name)
                raise HandshakeError(f"peer metadata names {md.name!r} but its NIXL agent is called {got_name!r}")

    def _forget_agent(self, name: str) -> None:
        try:
            self.agent.remove_remote_agent(name)
        except Exception as e:
            logger.warning("%r: NIXL remove_remote_agent(%r) failed: %s", self.name, name, e)

    def _disconnect(self, name: str) -> None:
        with self._lock:
            self._inflight.pop(name, None)
            if self._agent is not None:
                self._forget_agent(name)

    def _start(self, rec: XferRecord, peer: PeerMetadata) -> None:
        ctx = _NixlXfer()
        rec.ctx = ctx
        inflight = self._inflight.setdefault(peer.name, [])
        inflight[:] = [r for r in inflight if not r.state.finished]
        if len(rec.runs) == 0 and rec.notif is None:
            self._finish(rec, TransferState.DONE)
            return
        groups: dict[tuple[str, str], tuple[list[np.ndarray], list[np.ndarray]]] = {}
        if len(rec.runs):
            runs = rec.runs.astype(np.uint64)
            for lp, rp in zip(self._pool_infos, peer.pools, strict=True):
                locs, rems = groups.setdefault((lp.mem_type, rp.mem_type), ([], []))
                locs.append(_descs(lp, runs[:, 0], runs[:, 2]))
                rems.append(_descs(rp, runs[:, 1], runs[:, 2]))
        # NIXL can carry the notif itself only for one request with a non-empty message, and only
        # if no earlier write to this peer is still in flight (NIXL does not order independent
        # requests; a request streamed as several writes must not announce itself early).
        attach = len(groups) == 1 and bool(rec.notif) and not inflight
        if rec.notif is not None and not attach:
            ctx.pending_notif = rec.notif
        for (lmem, rmem), (locs, rems) in groups.items():
            ldescs = self.agent.get_xfer_descs(np.concatenate(locs), lmem)
            rdescs = self.agent.get_xfer_descs(np.concatenate(rems), rmem)
            notif = rec.notif if attach and rec.notif is not None else b""
            h = self.agent.initialize_xfer("WRITE", ldescs, rdescs, peer.name, notif)
            ctx.handles.append(h)
            if self.agent.transfer(h) == "ERR":
                raise TransportError("NIXL refused to post the transfer")
        inflight.append(rec)
        self._set_in_progress(rec)
        self._active.add(rec)
        self._wake.set()

    def _earlier_unfinished(self, rec: XferRecord) -> bool:
        """Is a write to the same peer, posted before ``rec``, still running? (advances them)"""
        for r in self._inflight.get(rec.handle.peer, []):
            if r.handle.xfer_id >= rec.handle.xfer_id:
                break
            self._poll_record(r)
            if not r.state.finished:
                return True
        return False

    def _progress_loop(self, interval_s: float) -> None:
        """Drive unfinished transfers (and so their notifications) without the caller polling."""
        while not self._stop.is_set():
            with self._lock:
                active = sorted((r for r in self._active if not r.state.finished), key=lambda r: r.handle.xfer_id)
                self._active.difference_update([r for r in self._active if r.state.finished])
                if not active:
                    self._wake.clear()
            if not active:
                self._wake.wait(0.5)
                continue
            for rec in active:
                with self._lock:
                    if self._agent is None:
                        return
                    self._poll_record(rec)
            time.sleep(interval_s)

    def _progress(self, rec: XferRecord) -> None:
        ctx: _NixlXfer = rec.ctx
        states = [self.agent.check_xfer_state(h) for h in ctx.handles]
        if "ERR" in states:
            self._finish(rec, TransferState.FAILED, "NIXL reported ERR (peer unreachable, died or was removed?)")
            self._abort(rec)
            return
        if all(s == "DONE" for s in states):
            if ctx.pending_notif is not None:
                if self._earlier_unfinished(rec):
                    return  # data landed; the notif waits for the earlier writes to this peer
                try:
                    self.agent.send_notif(rec.handle.peer, ctx.pending_notif)
                except Exception as e:
                    self._finish(rec, TransferState.FAILED, f"data landed but the notif failed: {e}")
                    return
                ctx.pending_notif = None
            self._finish(rec, TransferState.DONE)

    def _abort(self, rec: XferRecord) -> None:
        self._release_backend(rec)

    def _release_backend(self, rec: XferRecord) -> None:
        ctx: _NixlXfer | None = rec.ctx
        if ctx is None:
            return
        for h in ctx.handles:
            try:
                h.release()
            except Exception as e:  # NIXL could not cancel an in-flight request: keep it alive
                logger.warning("%s: NIXL release failed (%s); retrying at close", rec.tag, e)
                self._leaked.append(h)
        ctx.handles.clear()

    def _send_notif(self, peer: PeerMetadata, msg: bytes) -> None:
        with self._lock:
            try:
                self.agent.send_notif(peer.name, msg)
            except Exception as e:
                raise TransportError(f"send_notif to {peer.name!r} failed: {type(e).__name__}: {e}") from e

    def _take_notifs(self) -> dict[str, list[bytes]]:
        with self._lock:
            if self._agent is None:
                return {}
            got = self._agent.get_new_notifs()
        out: dict[str, list[bytes]] = {}
        for k, msgs in got.items():
            key = k.decode() if isinstance(k, bytes) else str(k)
            out.setdefault(key, []).extend(bytes(m) for m in msgs)
        return out

    def _deregister(self, reg: Any) -> None:
        try:
            self.agent.deregister_memory(reg)
        except Exception as e:
            logger.warning("%r: NIXL deregister_memory failed: %s", self.name, e)

    def _close_backend(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._progress_thread is not None:
            self._progress_thread.join(self._config.close_timeout_s)
        with self._lock:
            if self._agent is None:
                return
            for h in self._leaked:
                try:
                    h.release()
                except Exception as e:
                    logger.warning("%r: NIXL release at close failed: %s", self.name, e)
            self._leaked.clear()
            for reg in self._regs:
                self._deregister(reg)
            self._regs.clear()
            self._agent = None  # the C++ agent (and its progress thread) goes with the last reference


def _descs(pool: PoolInfo, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Nx3 ``(addr, len, dev_id)`` rows, one per run, for NIXL's get_xfer_descs."""
    bb = np.uint64(pool.block_bytes)
    out = np.empty((len(starts), 3), dtype=np.uint64)
    out[:, 0] = np.uint64(pool.base_addr) + starts * bb
    out[:, 1] = counts * bb
    out[:, 2] = pool.dev_id
    return out
