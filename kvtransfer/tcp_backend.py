"""Plain-TCP fallback backend: needs nothing but sockets and threads.

Each transport listens on ``host`` (port 0 = any free port); its metadata advertises
``host:port``. ``add_peer`` opens one connection to the peer's listener and runs the handshake
over it (our metadata in HELLO; the peer checks it too and answers HELLO_OK or HELLO_ERR with the
reason), then starts one sender thread for that peer. ``write_blocks`` queues a job for the sender
thread and returns at once; the thread streams, per pool and per coalesced run, a DATA frame
(pool index, remote block start, block count, bytes), then an END frame (transfer id, flags, the
notification), then waits for the receiver's ACK. The receiver (one thread per incoming
connection) copies DATA straight into its pool memory (``recv_into`` the pool's bytes for CPU
pools; through a pinned staging buffer for CUDA pools), and only when END arrives delivers the
notification and answers ACK -- so a notification always follows its data, and DONE on the sender
means the bytes are in the peer's pools.

Frames (network byte order, 32-byte header)::

    magic b"KV" | u8 version | u8 kind | u32 a | u64 b | u64 c | u64 payload_length | payload

    HELLO      a = 1: payload = 32-byte proof + sender metadata (a = 0: metadata alone)
               HELLO_OK / HELLO_ERR (payload = reason)
    DATA       a = pool, b = remote start block, c = block count, length = c * block_bytes
    END        a = flags (1 notif, 2 aborted), b = transfer id, payload = notif
    ACK        b = transfer id                      ERROR  payload = reason, then close
    NOTIF      payload = message                    BYE    orderly close

With a cluster secret (``TransportConfig.secret``) the dialer's HELLO carries a proof, an HMAC-SHA256 of
its metadata under the secret, and a receiver refuses (HELLO_ERR, then close) a HELLO without a valid one
before it reads any metadata: a peer that does not hold the secret never gets to write into the pools.

Every length is checked against the receiver's pools (DATA) or ``max_message_bytes`` (others).
A socket operation stalled for ``io_timeout_s`` fails the connection; a peer that disconnects
(or is killed) mid-transfer fails the transfers on that connection (state FAILED, with the socket
error), and a transfer still not acknowledged at its deadline is FAILED by ``poll``. A broken link
stays broken: ``remove_peer`` + ``add_peer`` reconnects.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import queue
import select
import socket
import struct
import threading
from collections import defaultdict
from dataclasses import dataclass

import torch

from .base import (
    Compat,
    HandshakeError,
    PeerMetadata,
    PoolInfo,
    TransferState,
    TransportConfig,
    TransportError,
    check_handshake,
)
from .common import TransportCore, XferRecord

logger = logging.getLogger(__name__)

_FRAME = struct.Struct("!2sBBIQQQ")
_MAGIC = b"KV"
_FRAME_VERSION = 1
_F_NOTIF = 1
_F_ABORTED = 2
_WAIT_SLICE_S = 0.1  # how often idle threads look at the stop flag


class _Kind(enum.IntEnum):
    HELLO = 1
    HELLO_OK = 2
    HELLO_ERR = 3
    DATA = 4
    END = 5
    ACK = 6
    ERROR = 7
    NOTIF = 8
    BYE = 9


class _ProtocolError(Exception):
    pass


@dataclass(frozen=True)
class TcpConfig(TransportConfig):
    """Options of the TCP backend (plus the shared timeouts)."""

    #: listening port; 0 = let the OS pick a free one (see ``TcpTransport.address``)
    port: int = 0
    #: host name/IP peers should dial; None = the bind host (or the host name for a wildcard bind)
    advertise_host: str | None = None
    #: a single send/recv stalled this long fails the connection (and its transfers)
    io_timeout_s: float = 10.0
    #: upper bound on a HELLO / notification / error payload
    max_message_bytes: int = 1 << 20
    #: chunk size for CUDA pools (device <-> pinned host copies)
    staging_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65536), got {self.port}")
        if not self.io_timeout_s > 0:
            raise ValueError(f"io_timeout_s must be > 0, got {self.io_timeout_s}")
        if self.max_message_bytes < 1024 or self.staging_bytes < 4096:
            raise ValueError("max_message_bytes must be >= 1024 and staging_bytes >= 4096")


# -- framing ---------------------------------------------------------------------------------

_PROOF_BYTES = 32


def _proof(secret: bytes, hello: bytes) -> bytes:
    """What a HELLO carries to show its sender holds the cluster secret."""
    return hmac.new(secret, b"splitserve-kvtcp-hello\0" + hello, hashlib.sha256).digest()


def _send_frame(
    sock: socket.socket, kind: _Kind, a: int = 0, b: int = 0, c: int = 0, payload: bytes | memoryview = b""
) -> None:
    sock.sendall(_FRAME.pack(_MAGIC, _FRAME_VERSION, int(kind), a, b, c, len(payload)))
    if len(payload):
        sock.sendall(payload)


def _recv_into(sock: socket.socket, mv: memoryview) -> None:
    got = 0
    n = len(mv)
    while got < n:
        k = sock.recv_into(mv[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_header(sock: socket.socket) -> tuple[_Kind, int, int, int, int]:
    magic, version, kind, a, b, c, length = _FRAME.unpack(_recv_exact(sock, _FRAME.size))
    if magic != _MAGIC:
        raise _ProtocolError(f"bad frame magic {magic!r}")
    if version != _FRAME_VERSION:
        raise _ProtocolError(f"frame version {version} is not supported (this side speaks {_FRAME_VERSION})")
    try:
        k = _Kind(kind)
    except ValueError:
        raise _ProtocolError(f"unknown frame kind {kind}") from None
    return k, a, b, c, length


def _recv_small(sock: socket.socket, length: int, limit: int, what: str) -> bytes:
    if length > limit:
        raise _ProtocolError(f"{what} of {length} bytes exceeds the limit of {limit}")
    return _recv_exact(sock, length)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parse_address(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise HandshakeError(f"peer address {addr!r} is not host:port")
    return host.strip("[]"), int(port)


# -- pool memory access ----------------------------------------------------------------------


class _PoolBytes:
    """Byte-level access to one registered pool (zero-copy for CPU, staged for CUDA)."""

    def __init__(self, pool: torch.Tensor, info: PoolInfo) -> None:
        self.info = info
        self.flat = pool.detach().reshape(-1).view(dtype=torch.uint8)
        self.cpu_view: memoryview | None = None if info.is_cuda else self.flat.numpy().data

    def send_range(self, sock: socket.socket, off: int, length: int, staging_bytes: int) -> None:
        if self.cpu_view is not None:
            sock.sendall(self.cpu_view[off : off + length])
            return
        end = off + length
        while off < end:
            k = min(staging_bytes, end - off)
            host = self.flat[off : off + k].to("cpu")
            sock.sendall(host.numpy().data)
            off += k

    def recv_range(self, sock: socket.socket, off: int, length: int, staging: torch.Tensor | None) -> None:
        if self.cpu_view is not None:
            _recv_into(sock, self.cpu_view[off : off + length])
            return
        assert staging is not None
        smv = staging.numpy().data
        end = off + length
        while off < end:
            k = min(len(smv), end - off)
            _recv_into(sock, smv[:k])
            self.flat[off : off + k].copy_(staging[:k])  # synchronous: done before the next chunk
            off += k


# -- sender side -----------------------------------------------------------------------------


@dataclass(eq=False)
class _WriteJob:
    rec: XferRecord


@dataclass(eq=False)
class _NotifJob:
    msg: bytes


@dataclass(eq=False)
class _Link:
    """Our outgoing connection to one peer, driven by one sender thread."""

    peer: str
    sock: socket.socket
    jobs: queue.Queue[_WriteJob | _NotifJob | None]
    thread: threading.Thread | None = None
    broken: str | None = None
    current: XferRecord | None = None  #: the write being streamed right now


class TcpTransport(TransportCore):
    """:class:`~splitserve.kvtransfer.base.Transport` over plain TCP sockets; see module docstring."""

    backend = "tcp"

    def __init__(self, name: str, compat: Compat, host: str = "127.0.0.1", config: TcpConfig | None = None) -> None:
        cfg = config if config is not None else TcpConfig()
        super().__init__(name, compat, cfg)
        self._cfg = cfg
        self._stop = threading.Event()
        self._links: dict[str, _Link] = {}
        self._pool_bytes: list[_PoolBytes] = []
        self._notifs: dict[str, list[bytes]] = defaultdict(list)
        self._notif_lock = threading.Lock()
        self._server_conns: set[socket.socket] = set()
        self._server_threads: set[threading.Thread] = set()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._lsock = socket.create_server((host, cfg.port), family=family, backlog=64)
        port = self._lsock.getsockname()[1]
        adv = cfg.advertise_host or (socket.gethostname() if host in ("", "0.0.0.0", "::") else host)
        self._addr = _format_address(adv, port)
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"kvtcp-accept-{name}", daemon=True)
        self._accept_thread.start()
        logger.info("tcp transport %r listening on %s", name, self._addr)

    @property
    def address(self) -> str:
        """``host:port`` peers connect to."""
        return self._addr

    # -- hooks ----------------------------------------------------------------------------------

    def _on_register(self, pools: list[torch.Tensor], infos: tuple[PoolInfo, ...]) -> None:
        self._pool_bytes = [_PoolBytes(p, i) for p, i in zip(pools, infos, strict=True)]

    def _address(self) -> str:
        return self._addr

    def _connect(self, md: PeerMetadata) -> None:
        host, port = _parse_address(md.address)
        timeout = self._config.connect_timeout_s
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            raise TransportError(f"cannot connect to peer {md.name!r} at {md.address}: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
            hello = self._local_metadata().to_bytes()
            if self._config.secret is None:
                _send_frame(sock, _Kind.HELLO, payload=hello)
            else:
                _send_frame(sock, _Kind.HELLO, 1, payload=_proof(self._config.secret, hello) + hello)
            kind, _, _, _, length = _recv_header(sock)
            reply = _recv_small(sock, length, self._cfg.max_message_bytes, "handshake reply")
            if kind is _Kind.HELLO_ERR:
                raise HandshakeError(f"peer {md.name!r} refused the handshake: {reply.decode(errors='replace')}")
            if kind is not _Kind.HELLO_OK:
                raise _ProtocolError(f"expected HELLO_OK, got {kind.name}")
            sock.settimeout(self._cfg.io_timeout_s)
        except HandshakeError:
            sock.close()
            raise
        except (OSError, _ProtocolError) as e:
            sock.close()
            raise TransportError(f"handshake with peer {md.name!r} at {md.address} failed: {e}") from e
        link = _Link(peer=md.name, sock=sock, jobs=queue.Queue())
        link.thread = threading.Thread(
            target=self._send_loop, args=(link,), name=f"kvtcp-send-{self.name}->{md.name}", daemon=True
        )
        with self._lock:
            old = self._links.pop(md.name, None)
            self._links[md.name] = link
        if old is not None:
            self._stop_link(old)
        link.thread.start()

    def _disconnect(self, name: str) -> None:
        with self._lock:
            link = self._links.pop(name, None)
        if link is not None:
            self._stop_link(link)

    def _start(self, rec: XferRecord, peer: PeerMetadata) -> None:
        link = self._links.get(peer.name)
        if link is None:
            raise TransportError(f"no connection to peer {peer.name!r}")
        if link.broken:
            raise TransportError(link.broken)
        if rec.notif is not None and len(rec.notif) > self._cfg.max_message_bytes:
            raise ValueError(f"notif of {len(rec.notif)} bytes exceeds max_message_bytes")
        link.jobs.put(_WriteJob(rec))

    def _send_notif(self, peer: PeerMetadata, msg: bytes) -> None:
        if len(msg) > self._cfg.max_message_bytes:
            raise ValueError(f"notif of {len(msg)} bytes exceeds max_message_bytes")
        with self._lock:
            link = self._links.get(peer.name)
        if link is None or link.broken:
            reason = link.broken if link is not None else "no connection"
            raise TransportError(f"send_notif to {peer.name!r}: {reason}")
        link.jobs.put(_NotifJob(msg))

    def _take_notifs(self) -> dict[str, list[bytes]]:
        with self._notif_lock:
            out = dict(self._notifs)
            self._notifs.clear()
        return out

    def _close_backend(self) -> None:
        self._stop.set()
        try:
            self._lsock.close()
        except OSError:
            pass
        self._accept_thread.join(self._config.close_timeout_s)
        with self._lock:
            conns = list(self._server_conns)
            threads = list(self._server_threads)
        for s in conns:
            _shutdown(s)
        for t in threads:
            t.join(self._config.close_timeout_s)

    # -- sender thread --------------------------------------------------------------------------

    def _stop_link(self, link: _Link) -> None:
        """Let the sender finish what is queued (bounded), then close the socket."""
        link.jobs.put(None)
        cur = link.current
        if cur is not None and cur.aborted:  # streaming a write nobody waits for: cut it short
            _shutdown(link.sock)
        if link.thread is not None and link.thread is not threading.current_thread():
            link.thread.join(self._config.close_timeout_s)
            if link.thread.is_alive():
                _shutdown(link.sock)
                link.thread.join(self._config.close_timeout_s)
        link.sock.close()

    def _send_loop(self, link: _Link) -> None:
        while True:
            job = link.jobs.get()
            if job is None:
                if link.broken is None:
                    try:
                        _send_frame(link.sock, _Kind.BYE)
                    except OSError:
                        pass
                return
            if link.broken is not None:
                if isinstance(job, _WriteJob):
                    self._finish(job.rec, TransferState.FAILED, link.broken)
                continue
            try:
                if isinstance(job, _NotifJob):
                    _send_frame(link.sock, _Kind.NOTIF, payload=job.msg)
                else:
                    link.current = job.rec
                    try:
                        self._send_write(link, job.rec)
                    finally:
                        link.current = None
            except Exception as e:  # OSError, _ProtocolError, or a bug: never leave the job hanging
                link.broken = f"connection to peer {link.peer!r} failed: {type(e).__name__}: {e}"
                logger.warning("%r: %s", self.name, link.broken)
                _shutdown(link.sock)
                if isinstance(job, _WriteJob):
                    self._finish(job.rec, TransferState.FAILED, link.broken)

    def _send_write(self, link: _Link, rec: XferRecord) -> None:
        if rec.aborted:  # released or timed out while queued: nothing was sent, nothing to undo
            return
        self._set_in_progress(rec)
        sock = link.sock
        runs: list[list[int]] = rec.runs.tolist()
        aborted = False
        for pool_idx, pb in enumerate(self._pool_bytes):
            bb = pb.info.block_bytes
            for ls, rs, n in runs:
                if rec.aborted:
                    aborted = True
                    break
                # header announces n * bb payload bytes; they follow straight from pool memory
                sock.sendall(_FRAME.pack(_MAGIC, _FRAME_VERSION, int(_Kind.DATA), pool_idx, rs, n, n * bb))
                pb.send_range(sock, ls * bb, n * bb, self._cfg.staging_bytes)
            if aborted:
                break
        flags = (_F_NOTIF if rec.notif is not None else 0) | (_F_ABORTED if aborted else 0)
        _send_frame(sock, _Kind.END, flags, rec.handle.xfer_id, payload=rec.notif or b"")
        kind, _, b, _, length = _recv_header(sock)
        if kind is _Kind.ERROR:
            reason = _recv_small(sock, length, self._cfg.max_message_bytes, "error").decode(errors="replace")
            raise _ProtocolError(f"peer reported: {reason}")
        if kind is not _Kind.ACK or b != rec.handle.xfer_id or length:
            raise _ProtocolError(f"expected ACK for transfer {rec.handle.xfer_id}, got {kind.name} {b}")
        if not aborted:
            self._finish(rec, TransferState.DONE)

    # -- receiver threads -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._lsock], [], [], _WAIT_SLICE_S)
                if not ready:
                    continue
                conn, addr = self._lsock.accept()
            except (OSError, ValueError):
                if self._stop.is_set():
                    return
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve, args=(conn, addr), name=f"kvtcp-recv-{self.name}", daemon=True)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._server_conns.add(conn)
                self._server_threads.add(t)
            t.start()

    def _serve(self, sock: socket.socket, addr: object) -> None:
        peer = f"<unidentified {addr}>"
        try:
            sock.settimeout(self._cfg.io_timeout_s)
            name = self._serve_hello(sock)
            if name is None:
                return
            peer = repr(name)
            self._serve_frames(sock, name)
        except (OSError, _ProtocolError) as e:
            if not self._stop.is_set():
                logger.warning("%r: connection from %s dropped: %s: %s", self.name, peer, type(e).__name__, e)
                if isinstance(e, _ProtocolError):
                    try:
                        _send_frame(sock, _Kind.ERROR, payload=str(e).encode()[: self._cfg.max_message_bytes])
                    except OSError:
                        pass
        finally:
            sock.close()
            with self._lock:
                self._server_conns.discard(sock)
                self._server_threads.discard(threading.current_thread())

    def _serve_hello(self, sock: socket.socket) -> str | None:
        kind, proved, _, _, length = _recv_header(sock)
        if kind is not _Kind.HELLO:
            raise _ProtocolError(f"expected HELLO, got {kind.name}")
        payload = _recv_small(sock, length, self._cfg.max_message_bytes, "HELLO")
        proof, payload = (payload[:_PROOF_BYTES], payload[_PROOF_BYTES:]) if proved == 1 else (b"", payload)
        secret = self._config.secret
        if secret is not None and not hmac.compare_digest(proof, _proof(secret, payload)):
            logger.warning("%r refused a peer without the cluster secret", self.name)
            _send_frame(
                sock, _Kind.HELLO_ERR, payload=b"unauthenticated: the handshake does not prove the cluster secret"
            )
            return None
        try:
            if not self._pool_infos:
                raise HandshakeError(f"{self.name!r} has not registered its pools yet")
            md = PeerMetadata.from_bytes(payload)
            # the remote side is the one dialling; report fields from its point of view
            check_handshake(md, self._local_metadata())
        except HandshakeError as e:
            logger.warning("%r refused a handshake: %s", self.name, e)
            _send_frame(sock, _Kind.HELLO_ERR, payload=str(e).encode()[: self._cfg.max_message_bytes])
            return None
        _send_frame(sock, _Kind.HELLO_OK)
        logger.info("%r accepted a connection from peer %r", self.name, md.name)
        return md.name

    def _wait_readable(self, sock: socket.socket) -> bool:
        """Wait for the next frame without a timeout, but notice close(). False = stop."""
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], _WAIT_SLICE_S)
            if ready:
                return True
        return False

    def _serve_frames(self, sock: socket.socket, peer: str) -> None:
        infos = self._pool_infos
        staging: torch.Tensor | None = None
        while self._wait_readable(sock):
            kind, a, b, c, length = _recv_header(sock)
            if kind is _Kind.DATA:
                if a >= len(infos):
                    raise _ProtocolError(f"DATA for pool {a}, this side has {len(infos)} pools")
                info = infos[a]
                if c < 1 or b + c > info.num_blocks:
                    raise _ProtocolError(f"DATA blocks [{b}, {b + c}) outside pool {a} of {info.num_blocks}")
                if length != c * info.block_bytes:
                    raise _ProtocolError(f"DATA length {length} != {c} blocks x {info.block_bytes} B")
                if info.is_cuda and staging is None:
                    staging = torch.empty(self._cfg.staging_bytes, dtype=torch.uint8, pin_memory=True)
                self._pool_bytes[a].recv_range(sock, b * info.block_bytes, length, staging)
            elif kind is _Kind.END:
                notif = _recv_small(sock, length, self._cfg.max_message_bytes, "notif")
                if a & _F_NOTIF and not a & _F_ABORTED:
                    self._deliver(peer, notif)
                _send_frame(sock, _Kind.ACK, 0, b)
            elif kind is _Kind.NOTIF:
                self._deliver(peer, _recv_small(sock, length, self._cfg.max_message_bytes, "notif"))
            elif kind is _Kind.BYE:
                logger.debug("%r: peer %r said goodbye", self.name, peer)
                return
            else:
                raise _ProtocolError(f"unexpected {kind.name} frame")

    def _deliver(self, peer: str, msg: bytes) -> None:
        with self._notif_lock:
            self._notifs[peer].append(msg)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
