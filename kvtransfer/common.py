"""Machinery shared by the backends: pool registration, peer table, handle table, deadlines.

A backend subclasses :class:`TransportCore` and fills in the ``_hook`` methods; the public
methods here do the argument checks, the handshake checks, coalescing and the bookkeeping, so
that every backend behaves the same way at the edges (bad ids, unknown peers, timeouts, release).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import (
    Compat,
    HandshakeError,
    PeerMetadata,
    PoolInfo,
    TransferHandle,
    TransferState,
    Transport,
    TransportConfig,
    TransportError,
    check_handshake,
    coalesce_array,
    describe_pool,
)
from .staging import StagingArea, copy_blocks

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class XferRecord:
    """The transport's private view of one transfer."""

    handle: TransferHandle
    runs: np.ndarray  #: int64 (k, 3): local_start, remote_start, count -- see base.coalesce_array
    notif: bytes | None
    started: float
    deadline: float
    state: TransferState = TransferState.PENDING
    error: str | None = None
    finished_at: float | None = None
    #: set when the caller released the handle or it timed out; background senders check it
    aborted: bool = False
    #: backend-specific state (NIXL handles, ...)
    ctx: Any = None
    #: (first block, count) of the staging area this write reads from (given back once DONE or released)
    stage: tuple[int, int] | None = None

    @property
    def tag(self) -> str:
        notif = "" if self.notif is None else f" notif={self.notif[:48]!r}"
        return f"xfer#{self.handle.xfer_id} -> {self.handle.peer}{notif}"


def _as_bytes(msg: Any, what: str) -> bytes:
    if isinstance(msg, bytes | bytearray | memoryview):
        return bytes(msg)
    raise TypeError(f"{what} must be bytes, got {type(msg).__name__}")


class TransportCore(Transport):
    """Bookkeeping common to all backends; see module docstring."""

    def __init__(self, name: str, compat: Compat, config: TransportConfig) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a transport needs a non-empty name")
        if not isinstance(compat, Compat):
            raise TypeError(f"compat must be a Compat, got {type(compat).__name__}")
        self._name = name
        self._compat = compat
        self._config = config
        self._lock = threading.RLock()
        self._pools: list[torch.Tensor] = []
        self._pool_infos: tuple[PoolInfo, ...] = ()
        self._peers: dict[str, PeerMetadata] = {}
        self._peer_raw: dict[str, bytes] = {}
        self._xfers: dict[int, XferRecord] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._staging: StagingArea | None = None

    # -- hooks for backends -------------------------------------------------------------------

    def _on_register(self, pools: list[torch.Tensor], infos: tuple[PoolInfo, ...]) -> None:
        """Register memory with the engine."""

    def _address(self) -> str:
        return ""

    def _blob(self) -> bytes:
        return b""

    def _connect(self, md: PeerMetadata) -> None:
        """Open whatever the backend needs to reach ``md``; raise HandshakeError / TransportError."""

    def _disconnect(self, name: str) -> None:
        """Tear down the connection to ``name`` (best effort, must not raise)."""

    def _start(self, rec: XferRecord, peer: PeerMetadata) -> None:
        """Post the transfer; may raise (the record then becomes FAILED)."""
        raise NotImplementedError

    def _progress(self, rec: XferRecord) -> None:
        """Advance / inspect an unfinished record, calling ``_finish`` when it ends. Lock held."""

    def _abort(self, rec: XferRecord) -> None:
        """Best-effort cancel of an unfinished transfer's engine resources (must not raise)."""

    def _release_backend(self, rec: XferRecord) -> None:
        """Free engine resources of a record being released (must not raise)."""

    def _send_notif(self, peer: PeerMetadata, msg: bytes) -> None:
        raise NotImplementedError

    def _take_notifs(self) -> dict[str, list[bytes]]:
        raise NotImplementedError

    def _close_backend(self) -> None:
        """Stop threads, deregister memory (bounded, must not raise)."""

    # -- helpers for backends -----------------------------------------------------------------

    def _finish(self, rec: XferRecord, state: TransferState, error: str | None = None) -> bool:
        """Move ``rec`` to a terminal state once; the first caller wins. Thread-safe."""
        with self._lock:
            if rec.state.finished:
                return False
            rec.state = state
            rec.error = error
            rec.finished_at = time.monotonic()
            if state is TransferState.DONE:  # every byte landed: its staging blocks are free again
                self._unstage(rec)
        if state is TransferState.FAILED:
            logger.warning("%s FAILED: %s", rec.tag, error)
        else:
            logger.debug(
                "%s done: %d blocks, %d descriptors, %d bytes in %.3f ms",
                rec.tag,
                rec.handle.num_blocks,
                rec.handle.num_descriptors,
                rec.handle.nbytes,
                1e3 * (rec.finished_at - rec.started),
            )
        return True

    def _set_in_progress(self, rec: XferRecord) -> None:
        with self._lock:
            if rec.state is TransferState.PENDING:
                rec.state = TransferState.IN_PROGRESS

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError(f"transport {self._name!r} is closed")

    def _local_metadata(self) -> PeerMetadata:
        return PeerMetadata(
            backend=self.backend,
            name=self._name,
            address=self._address(),
            compat=self._compat,
            pools=self._pool_infos,
            blob=self._blob(),
        )

    # -- Transport ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def compat(self) -> Compat:
        return self._compat

    @property
    def config(self) -> TransportConfig:
        return self._config

    @property
    def pool_infos(self) -> tuple[PoolInfo, ...]:
        return self._pool_infos

    def register_pools(self, pools: Sequence[torch.Tensor]) -> None:
        self._check_open()
        with self._lock:
            if self._pool_infos:
                raise RuntimeError(f"transport {self._name!r}: pools are already registered")
            pools = list(pools)
            if not pools:
                raise ValueError("register_pools needs at least one pool")
            infos = tuple(describe_pool(p) for p in pools)
            if len({i.num_blocks for i in infos}) != 1:
                raise ValueError(
                    "all pools share one block-id space and need the same number of blocks, got "
                    + str([i.num_blocks for i in infos])
                )
            self._on_register(pools, infos)
            self._pools = pools
            self._pool_infos = infos
        logger.info(
            "%s transport %r registered %d pools: %s",
            self.backend,
            self._name,
            len(infos),
            ", ".join(f"{i.dtype}[{i.num_blocks} x {i.block_bytes} B] on {i.device}" for i in infos),
        )

    def metadata(self) -> bytes:
        self._check_open()
        if not self._pool_infos:
            raise RuntimeError(f"transport {self._name!r}: register_pools before metadata")
        return self._local_metadata().to_bytes()

    def add_peer(self, metadata: bytes) -> str:
        self._check_open()
        if not self._pool_infos:
            raise RuntimeError(f"transport {self._name!r}: register_pools before add_peer")
        raw = _as_bytes(metadata, "metadata")
        md = PeerMetadata.from_bytes(raw)
        check_handshake(self._local_metadata(), md)
        if md.name == self._name:
            raise HandshakeError(f"transport {self._name!r} cannot add itself as a peer")
        with self._lock:
            if md.name in self._peers:
                if self._peer_raw[md.name] == raw:
                    return md.name
                raise HandshakeError(
                    f"peer {md.name!r} is already connected with different metadata; remove_peer first"
                )
        self._connect(md)  # outside the lock: may wait up to connect_timeout_s
        with self._lock:
            self._peers[md.name] = md
            self._peer_raw[md.name] = raw
        logger.info("%r added peer %r at %s (compat %s)", self._name, md.name, md.address or "-", md.compat.digest())
        return md.name

    def remove_peer(self, name: str) -> None:
        with self._lock:
            md = self._peers.pop(name, None)
            self._peer_raw.pop(name, None)
            if md is None:
                logger.debug("%r: remove_peer(%r): not a peer", self._name, name)
                return
            for rec in self._xfers.values():
                if rec.handle.peer == name and not rec.state.finished:
                    rec.aborted = True
                    self._finish(rec, TransferState.FAILED, f"peer {name!r} was removed")
                    self._abort(rec)
        self._disconnect(name)
        logger.info("%r removed peer %r", self._name, name)

    def peers(self) -> list[str]:
        with self._lock:
            return list(self._peers)

    def enable_staging(self, start: int, count: int) -> None:
        """Blocks [start, start + count) of every registered pool are this side's staging area (the
        owner never uses them): a write whose local blocks are more scattered than its remote ones is
        gathered there first and posted as one descriptor per run of remote blocks (staging.py)."""
        if not self._pool_infos:
            raise RuntimeError(f"transport {self._name!r}: register_pools before enable_staging")
        if start < 0 or start + count > self._pool_infos[0].num_blocks:
            raise ValueError(
                f"staging blocks [{start}, {start + count}) are outside the pools' "
                f"{self._pool_infos[0].num_blocks} blocks"
            )
        self._staging = StagingArea(start, count) if count > 0 else None

    @property
    def staging(self) -> StagingArea | None:
        return self._staging

    def _unstage(self, rec: XferRecord) -> None:
        if rec.stage is not None and self._staging is not None:
            self._staging.give_back(*rec.stage)
        rec.stage = None

    def _stage(
        self, local: np.ndarray, remote: np.ndarray, runs: np.ndarray
    ) -> tuple[np.ndarray, tuple[int, int] | None]:
        """Gather scattered local blocks into the staging area when that cuts the descriptors."""
        st = self._staging
        n = len(local)
        if st is None or len(runs) <= 1 or n < 2:
            return runs, None
        remote_runs = 1 + int(np.count_nonzero(np.diff(remote) != 1))
        if len(runs) <= remote_runs:
            return runs, None
        first = st.take(n)
        if first is None:
            st.unstaged_writes += 1
            return runs, None
        staged = np.arange(first, first + n, dtype=np.int64)
        copy_blocks(self._pools, local, staged)  # on the caller's stream: the sync in write_blocks covers it
        st.staged_writes += 1
        return coalesce_array(staged, remote), (first, n)

    def write_blocks(
        self,
        peer: str,
        local_block_ids: Sequence[int],
        remote_block_ids: Sequence[int],
        notif: bytes | None = None,
    ) -> TransferHandle:
        self._check_open()
        if not self._pool_infos:
            raise RuntimeError(f"transport {self._name!r}: register_pools before write_blocks")
        notif_b = None if notif is None else _as_bytes(notif, "notif")
        runs = coalesce_array(local_block_ids, remote_block_ids)
        nblocks = int(runs[:, 2].sum())
        local_n = self._pool_infos[0].num_blocks
        if len(runs) and int((runs[:, 0] + runs[:, 2]).max()) > local_n:
            raise ValueError(f"local block id out of range: this side has {local_n} blocks")
        stage = None
        if self._staging is not None and len(runs) > 1:
            local_a = np.asarray(local_block_ids, dtype=np.int64)
            if self._staging.start < local_n and bool(
                ((local_a >= self._staging.start) & (local_a < self._staging.start + self._staging.count)).any()
            ):
                raise ValueError("local block ids inside the staging area")
            runs, stage = self._stage(local_a, np.asarray(remote_block_ids, dtype=np.int64), runs)
        dev = self._pools[0].device
        if dev.type == "cuda" and len(runs):
            # the transfer engine reads the pools outside CUDA stream order: whatever the caller's stream
            # wrote into these blocks (the step's cache writes, the MTP layer's catch-up, the gather into
            # the staging area) must be done first
            import torch

            torch.cuda.current_stream(dev).synchronize()
        with self._lock:
            md = self._peers.get(peer)
        if md is not None and len(runs):
            remote_n = md.pools[0].num_blocks
            if int((runs[:, 1] + runs[:, 2]).max()) > remote_n:
                raise ValueError(f"remote block id out of range: peer {peer!r} has {remote_n} blocks")
        now = time.monotonic()
        handle = TransferHandle(
            xfer_id=next(self._ids),
            peer=peer,
            num_blocks=nblocks,
            num_descriptors=len(runs) * len(self._pool_infos),
            nbytes=nblocks * sum(i.block_bytes for i in self._pool_infos),
        )
        rec = XferRecord(
            handle=handle,
            runs=runs,
            notif=notif_b,
            started=now,
            deadline=now + self._config.transfer_timeout_s,
            stage=stage,
        )
        with self._lock:
            self._xfers[handle.xfer_id] = rec
            if md is None:
                self._finish(rec, TransferState.FAILED, f"unknown peer {peer!r} (add_peer first)")
                return handle
            try:
                self._start(rec, md)
            except Exception as e:  # reported as data, see Transport.write_blocks
                self._finish(rec, TransferState.FAILED, f"could not start: {type(e).__name__}: {e}")
                self._abort(rec)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s posted: %d blocks in %d runs x %d pools, %d bytes",
                rec.tag,
                nblocks,
                len(runs),
                len(self._pool_infos),
                handle.nbytes,
            )
        return handle

    def _record(self, handle: TransferHandle) -> XferRecord:
        rec = self._xfers.get(handle.xfer_id)
        if rec is None or rec.handle != handle:
            raise KeyError(f"unknown or released transfer handle {handle}")
        return rec

    def poll(self, handle: TransferHandle) -> TransferState:
        with self._lock:
            rec = self._record(handle)
            self._poll_record(rec)
            return rec.state

    def _poll_record(self, rec: XferRecord) -> None:
        """Advance one record and enforce its deadline. Lock held."""
        if rec.state.finished:
            return
        try:
            self._progress(rec)
        except Exception as e:
            self._finish(rec, TransferState.FAILED, f"{type(e).__name__}: {e}")
            self._abort(rec)
        if not rec.state.finished and time.monotonic() > rec.deadline:
            rec.aborted = True
            self._finish(
                rec,
                TransferState.FAILED,
                f"timed out after {self._config.transfer_timeout_s:g} s (state was {rec.state.value})",
            )
            self._abort(rec)

    def error(self, handle: TransferHandle) -> str | None:
        with self._lock:
            return self._record(handle).error

    def release(self, handle: TransferHandle) -> None:
        with self._lock:
            rec = self._xfers.pop(handle.xfer_id, None)
            if rec is None:
                return
            if not rec.state.finished:
                rec.aborted = True
                self._finish(rec, TransferState.FAILED, "released before completion")
                self._abort(rec)
            self._release_backend(rec)
            self._unstage(rec)

    def send_notif(self, peer: str, msg: bytes) -> None:
        self._check_open()
        msg_b = _as_bytes(msg, "msg")
        with self._lock:
            md = self._peers.get(peer)
        if md is None:
            raise TransportError(f"send_notif: unknown peer {peer!r}")
        self._send_notif(md, msg_b)

    def get_notifs(self) -> dict[str, list[bytes]]:
        if self._closed:
            return {}
        return self._take_notifs()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for rec in list(self._xfers.values()):
                if not rec.state.finished:
                    rec.aborted = True
                    self._finish(rec, TransferState.FAILED, "transport closed")
                    self._abort(rec)
                self._release_backend(rec)
                self._unstage(rec)
            names = list(self._peers)
            self._peers.clear()
            self._peer_raw.clear()
        for name in names:
            self._disconnect(name)
        self._close_backend()
        logger.info("%s transport %r closed", self.backend, self._name)
