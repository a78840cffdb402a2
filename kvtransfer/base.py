"""The transport contract: moving paged KV-cache blocks from a prefill worker to a decode worker.

Memory layout
-------------
Each worker owns a few cache *pools*. A pool is ONE contiguous tensor (CPU or CUDA) whose first
dimension is the block index: ``pool.shape == [num_blocks, ...]`` and
``block_bytes == pool[0].nbytes``. The layout is block-major: one block holds every layer of its
64 tokens, so a request's cache is a handful of large regions, not layers x blocks small ones.
All pools of a worker share one block-id space (block ``b`` of a request lives at index ``b`` of
every pool). Both sides must have the same number of pools, in the same order, with the same
``block_bytes`` and dtype per pool; the number of blocks may differ.

Lifecycle
---------
::

    t = make_transport("nixl" | "tcp", name, compat)   # one per worker process
    t.register_pools([mla_pool, indexer_pool])          # once, at start-up (pins / registers memory)
    md = t.metadata()                                   # bytes; carry them to peers (gRPC, Ray, ...)
    peer = t.add_peer(md_of_peer)                       # handshake: wire version, then Compat FIRST,
                                                        # then pool layout; HandshakeError on mismatch
    h = t.write_blocks(peer, local_ids, remote_ids, notif=b"req-42")   # PUSH, returns at once
    while t.poll(h) not in (DONE, FAILED): ...          # poll-based, never blocks
    t.error(h)                                          # why it FAILED, as a string (data, not raise)
    t.release(h)                                        # free the handle (aborts if still running)
    ...                                                 # decode side: t.get_notifs() -> {peer: [b"req-42"]}
    t.remove_peer(peer); t.close()

The notification given to ``write_blocks`` becomes visible to the receiver only after every byte of
that transfer is in its pools -- and after every EARLIER write to the same peer has finished
too, so a request streamed as several writes (layer groups, chunks) with the notification on the
last one is announced only when all of it landed. Notifications of writes to one peer therefore
arrive in posting order (TCP: one ordered stream per peer; NIXL: independent requests, so the
backend holds a notification back until the earlier writes to that peer are done). Standalone
``send_notif`` messages are not held back on NIXL. A transfer that cannot
complete (peer died, connection reset, timeout) ends in ``TransferState.FAILED`` with an error
string; it never raises out of ``poll`` and never hangs: every transfer has a deadline
(``TransportConfig.transfer_timeout_s``) and every blocking call has a timeout.

Why coalescing matters
----------------------
Transfer engines charge per descriptor, not just per byte. Measured on the project's H200 pair
(NIXL/UCX over NVLink, see shared/device/README.md): one 1 GiB region moves at ~246 GB/s, but 3904
scattered 42 KB descriptors move at 3.6 GB/s (~8-10 us per descriptor); 64 block-major blocks of a
4k-token request reach 153 GB/s. ``write_blocks`` therefore merges every run where both the local
and the remote block ids are consecutive into ONE descriptor per pool (:func:`coalesce`), so a
request whose blocks were allocated contiguously on both sides travels as one region per pool.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import struct
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Version of the metadata serialisation below; bump on any incompatible change.
WIRE_VERSION = 1
_MD_MAGIC = b"SSKVMD"
_MD_PREFIX = struct.Struct("!6sHI")  # magic, wire version, header length
_MAX_HEADER_BYTES = 16 << 20


class HandshakeError(Exception):
    """Two transports cannot talk: version, Compat, backend or pool layout differ, or bad metadata."""


class TransportError(Exception):
    """A transport-level operation (connect, send a notification, ...) failed."""


class TransferState(enum.Enum):
    """State of one ``write_blocks`` transfer, as reported by ``Transport.poll``."""

    PENDING = "pending"  #: accepted, not started (queued behind earlier transfers to the peer)
    IN_PROGRESS = "in_progress"  #: bytes are moving
    DONE = "done"  #: every byte is in the peer's pools (and the notif, if any, was delivered)
    FAILED = "failed"  #: will never complete; ``Transport.error(handle)`` says why

    @property
    def finished(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


# --------------------------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------------------------


class FrozenStrMap(Mapping[str, str]):
    """An immutable, hashable ``str -> str`` mapping with sorted, deterministic iteration."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | Sequence[tuple[str, Any]] = ()) -> None:
        pairs = items.items() if isinstance(items, Mapping) else items
        out: dict[str, str] = {}
        for k, v in pairs:
            if not isinstance(k, str) or not k:
                raise TypeError(f"Compat field names must be non-empty str, got {k!r}")
            if isinstance(v, bool | int | float | str):
                out[k] = str(v)
            else:
                raise TypeError(f"Compat field {k!r} must be str/int/float/bool, got {type(v).__name__}")
        self._items: tuple[tuple[str, str], ...] = tuple(sorted(out.items()))

    def __getitem__(self, key: str) -> str:
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenStrMap):
            return self._items == other._items
        if isinstance(other, Mapping):
            return dict(self._items) == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return repr(dict(self._items))


@dataclass(frozen=True)
class Compat:
    """What both sides of a transport must agree on before any byte moves.

    ``fields`` is a flat ``str -> str`` mapping chosen by the caller (model id/hash, cache layout
    name, block size in tokens, pool dtypes, number of layers, MTP config, ...); values given as
    int/float/bool are stored as ``str``. ``version`` is the version of the caller's compat scheme.
    The transports compare Compat FIRST in the handshake; the pool layout itself (count, dtype and
    block_bytes of each pool) is checked by the transport too, so it need not be repeated here.

    >>> Compat({"model": "tiny", "block_size": 64}).fields["block_size"]
    '64'
    """

    fields: Mapping[str, str] = field(default_factory=dict)
    version: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", FrozenStrMap(self.fields))
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 0:
            raise ValueError(f"Compat.version must be an int >= 0, got {self.version!r}")

    @classmethod
    def of(cls, version: int = 1, **fields: str | int | float | bool) -> Compat:
        return cls(fields=FrozenStrMap(fields), version=version)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "fields": dict(self.fields)}

    @classmethod
    def from_json(cls, obj: Any) -> Compat:
        if not isinstance(obj, dict) or not isinstance(obj.get("fields"), dict):
            raise HandshakeError(f"malformed compat in metadata: {obj!r}")
        version = obj.get("version")
        if not isinstance(version, int):
            raise HandshakeError(f"malformed compat version in metadata: {version!r}")
        try:
            return cls(fields=obj["fields"], version=version)
        except (TypeError, ValueError) as e:
            raise HandshakeError(f"malformed compat in metadata: {e}") from e

    def digest(self) -> str:
        """A short stable hash of the whole Compat (for logs and quick comparisons)."""
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def diff(self, other: Compat) -> list[str]:
        """One ``"name: local=... remote=..."`` line per differing field (``self`` is local)."""
        out: list[str] = []
        if self.version != other.version:
            out.append(f"version: local={self.version} remote={other.version}")
        for key in sorted(set(self.fields) | set(other.fields)):
            a, b = self.fields.get(key), other.fields.get(key)
            if a != b:
                la = "<missing>" if a is None else repr(a)
                lb = "<missing>" if b is None else repr(b)
                out.append(f"{key}: local={la} remote={lb}")
        return out


# --------------------------------------------------------------------------------------------
# Pools and metadata
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolInfo:
    """Where one pool lives and how it is cut into blocks; part of a transport's metadata."""

    num_blocks: int
    block_bytes: int
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    device: str  # "cpu" or "cuda:N"
    base_addr: int  # address of block 0 in the owner's address space
    dev_id: int  # CUDA ordinal, 0 for CPU memory

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def mem_type(self) -> str:
        """NIXL memory type name."""
        return "VRAM" if self.is_cuda else "DRAM"

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "num_blocks": self.num_blocks,
            "block_bytes": self.block_bytes,
            "dtype": self.dtype,
            "device": self.device,
            "base_addr": self.base_addr,
            "dev_id": self.dev_id,
        }

    @classmethod
    def from_json(cls, obj: Any) -> PoolInfo:
        try:
            info = cls(
                num_blocks=int(obj["num_blocks"]),
                block_bytes=int(obj["block_bytes"]),
                dtype=str(obj["dtype"]),
                device=str(obj["device"]),
                base_addr=int(obj["base_addr"]),
                dev_id=int(obj["dev_id"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise HandshakeError(f"malformed pool descriptor in metadata: {obj!r}") from e
        if info.num_blocks < 1 or info.block_bytes < 1:
            raise HandshakeError(f"malformed pool descriptor in metadata: {obj!r}")
        return info


def describe_pool(pool: torch.Tensor) -> PoolInfo:
    """Check that ``pool`` is a usable block pool and describe it."""
    if pool.dim() < 1 or pool.shape[0] < 1:
        raise ValueError(f"a pool needs a leading block dimension >= 1, got shape {tuple(pool.shape)}")
    if not pool.is_contiguous():
        raise ValueError("a pool must be one contiguous tensor")
    block_bytes = pool[0].nbytes
    if block_bytes < 1:
        raise ValueError(f"pool blocks must be non-empty, got shape {tuple(pool.shape)}")
    if pool.device.type not in ("cpu", "cuda"):
        raise ValueError(f"pools must live on cpu or cuda, got {pool.device}")
    is_cuda = pool.device.type == "cuda"
    dev_id = (pool.device.index or 0) if is_cuda else 0
    device = f"cuda:{dev_id}" if is_cuda else "cpu"
    return PoolInfo(
        num_blocks=int(pool.shape[0]),
        block_bytes=int(block_bytes),
        dtype=str(pool.dtype).removeprefix("torch."),
        device=device,
        base_addr=int(pool.data_ptr()),
        dev_id=int(dev_id),
    )


@dataclass(frozen=True)
class PeerMetadata:
    """Everything a peer needs to connect to a transport; serialised by :meth:`to_bytes`.

    Wire format (version 1): ``b"SSKVMD" | u16 wire_version | u32 header_len`` (network order),
    then ``header_len`` bytes of UTF-8 JSON (backend, name, address, compat, pools), then the
    backend's opaque blob (the NIXL agent metadata; empty for TCP). No pickle.
    """

    backend: str
    name: str
    address: str
    compat: Compat
    pools: tuple[PoolInfo, ...]
    blob: bytes = b""

    def to_bytes(self) -> bytes:
        header = json.dumps(
            {
                "backend": self.backend,
                "name": self.name,
                "address": self.address,
                "compat": self.compat.to_json(),
                "pools": [p.to_json() for p in self.pools],
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()
        return _MD_PREFIX.pack(_MD_MAGIC, WIRE_VERSION, len(header)) + header + self.blob

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerMetadata:
        data = bytes(data)
        if len(data) < _MD_PREFIX.size:
            raise HandshakeError(f"metadata too short ({len(data)} bytes)")
        magic, version, hlen = _MD_PREFIX.unpack_from(data)
        if magic != _MD_MAGIC:
            raise HandshakeError("not splitserve kvtransfer metadata (bad magic)")
        if version != WIRE_VERSION:
            raise HandshakeError(f"metadata wire version {version} is not supported (this side speaks {WIRE_VERSION})")
        if hlen > _MAX_HEADER_BYTES or _MD_PREFIX.size + hlen > len(data):
            raise HandshakeError(f"metadata header length {hlen} does not fit in {len(data)} bytes")
        raw = data[_MD_PREFIX.size : _MD_PREFIX.size + hlen]
        try:
            obj = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HandshakeError(f"malformed metadata header: {e}") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("pools"), list):
            raise HandshakeError("malformed metadata header")
        for key in ("backend", "name", "address"):
            if not isinstance(obj.get(key), str):
                raise HandshakeError(f"malformed metadata header: {key!r} missing")
        if not obj["name"]:
            raise HandshakeError("metadata carries an empty transport name")
        return cls(
            backend=obj["backend"],
            name=obj["name"],
            address=obj["address"],
            compat=Compat.from_json(obj.get("compat")),
            pools=tuple(PoolInfo.from_json(p) for p in obj["pools"]),
            blob=data[_MD_PREFIX.size + hlen :],
        )


def check_handshake(local: PeerMetadata, remote: PeerMetadata) -> None:
    """Raise :class:`HandshakeError` unless ``remote`` can exchange blocks with ``local``.

    Compat is compared first (and alone: when it differs, nothing else is meaningful); then the
    backend; then the pool layout (count, and dtype and block_bytes of each pool, in order).
    """
    who = f"handshake between {local.name!r} and {remote.name!r} failed"
    cdiff = local.compat.diff(remote.compat)
    if cdiff:
        raise HandshakeError(f"{who}: compat mismatch: " + "; ".join(cdiff))
    if local.backend != remote.backend:
        raise HandshakeError(f"{who}: backend: local={local.backend!r} remote={remote.backend!r}")
    problems: list[str] = []
    if len(local.pools) != len(remote.pools):
        problems.append(f"pool count: local={len(local.pools)} remote={len(remote.pools)}")
    for i, (a, b) in enumerate(zip(local.pools, remote.pools, strict=False)):
        if a.block_bytes != b.block_bytes:
            problems.append(f"pool[{i}].block_bytes: local={a.block_bytes} remote={b.block_bytes}")
        if a.dtype != b.dtype:
            problems.append(f"pool[{i}].dtype: local={a.dtype!r} remote={b.dtype!r}")
    if problems:
        raise HandshakeError(f"{who}: pool layout mismatch: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Coalescing
# --------------------------------------------------------------------------------------------


def coalesce(local_ids: Sequence[int], remote_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """Merge (local, remote) block pairs into runs ``(local_start, remote_start, count)``.

    A run covers pairs ``(l, r), (l+1, r+1), ..., (l+count-1, r+count-1)``: both ids consecutive.
    Pairs are sorted by local id first, so the result has the fewest runs possible whatever order
    the ids come in. Remote ids must be distinct (two writes into one block would race); ids must
    be ints >= 0 (Python, numpy or torch integers) and both sequences of the same length.

    >>> coalesce([4, 5, 6, 9, 1], [10, 11, 12, 0, 7])
    [(1, 7, 1), (4, 10, 3), (9, 0, 1)]
    """
    return [(int(a), int(b), int(c)) for a, b, c in coalesce_array(local_ids, remote_ids).tolist()]


def coalesce_array(local_ids: Any, remote_ids: Any) -> np.ndarray:
    """:func:`coalesce` as an ``int64`` array of shape ``(runs, 3)``; vectorised (a few us per
    thousand blocks, where a Python loop costs about a millisecond)."""
    loc = _block_ids(local_ids, "local")
    rem = _block_ids(remote_ids, "remote")
    n = len(loc)
    if n != len(rem):
        raise ValueError(f"{n} local block ids but {len(rem)} remote block ids")
    if n == 0:
        return np.empty((0, 3), dtype=np.int64)
    if loc.min() < 0 or rem.min() < 0:
        raise ValueError("block ids must be >= 0")
    if len(np.unique(rem)) != n:
        raise ValueError("remote block ids must be distinct")
    order = np.lexsort((rem, loc))  # by local id, then remote id
    loc, rem = loc[order], rem[order]
    starts_here = np.ones(n, dtype=bool)
    starts_here[1:] = (np.diff(loc) != 1) | (np.diff(rem) != 1)
    starts = np.flatnonzero(starts_here)
    counts = np.diff(np.append(starts, n))
    return np.stack([loc[starts], rem[starts], counts], axis=1)


def _block_ids(ids: Any, what: str) -> np.ndarray:
    if hasattr(ids, "detach"):  # torch tensor (possibly on a GPU)
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{what} block ids must be a flat sequence, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{what} block ids must be ints, got {arr.dtype} ({arr[:4].tolist()}...)")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransportConfig:
    """Timeouts shared by all backends (seconds)."""

    transfer_timeout_s: float = 30.0  #: a write not DONE after this is FAILED by ``poll``
    connect_timeout_s: float = 10.0  #: bound on ``add_peer`` (connect + handshake)
    close_timeout_s: float = 5.0  #: bound on joining background threads in ``close``
    #: the cluster secret: a TCP receiver refuses a peer whose handshake does not prove it (None: no check)
    secret: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("transfer_timeout_s", "connect_timeout_s", "close_timeout_s"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")


@dataclass(frozen=True)
class TransferHandle:
    """Opaque ticket for one ``write_blocks`` call; ask the transport about it."""

    xfer_id: int
    peer: str
    num_blocks: int
    num_descriptors: int  #: runs x pools actually handed to the engine
    nbytes: int


class Transport(ABC):
    """Moves whole cache blocks between worker processes (PUSH: the local side WRITEs).

    Poll-based: nothing here blocks for longer than a configured timeout, and a transfer's failure
    is reported through ``poll``/``error``, not raised. Not meant to be shared between processes;
    methods are thread-safe within one process.
    """

    backend: str = ""

    @property
    @abstractmethod
    def name(self) -> str:
        """This transport's (agent) name; unique among the workers that talk to each other."""

    @property
    @abstractmethod
    def compat(self) -> Compat: ...

    @abstractmethod
    def register_pools(self, pools: Sequence[torch.Tensor]) -> None:
        """Register the cache pools, once, before ``metadata``. The tensors must outlive the transport."""

    @abstractmethod
    def metadata(self) -> bytes:
        """Versioned bytes describing this transport (name, address, pools, compat, engine blob)."""

    @abstractmethod
    def add_peer(self, metadata: bytes) -> str:
        """Handshake with the peer described by ``metadata``; return its name.

        Raises HandshakeError when the two sides do not match (wire version, Compat -- checked
        first --, backend, pool layout) or the metadata is malformed, TransportError when the peer
        cannot be reached within ``connect_timeout_s``. Adding the same metadata twice is a no-op."""

    @abstractmethod
    def remove_peer(self, name: str) -> None:
        """Forget a peer; its unfinished transfers become FAILED."""

    @abstractmethod
    def peers(self) -> list[str]: ...

    @abstractmethod
    def write_blocks(
        self,
        peer: str,
        local_block_ids: Sequence[int],
        remote_block_ids: Sequence[int],
        notif: bytes | None = None,
    ) -> TransferHandle:
        """Write local block ``local_block_ids[i]`` of EVERY pool into remote block ``remote_block_ids[i]``.

        Returns at once. Runs where both ids are consecutive travel as one descriptor per pool.
        ``notif`` is delivered to the peer's ``get_notifs`` only after all the data of this write,
        and of every earlier write to the same peer, has landed (or, for an earlier one, failed).
        Bad arguments (length mismatch, id out of range, duplicate remote ids) raise ValueError;
        everything that goes wrong later (unknown or dead peer, timeout) is a FAILED handle.
        """

    @abstractmethod
    def poll(self, handle: TransferHandle) -> TransferState:
        """Current state; never blocks. A transfer past its deadline is FAILED here."""

    @abstractmethod
    def error(self, handle: TransferHandle) -> str | None:
        """Why a FAILED transfer failed (None otherwise)."""

    @abstractmethod
    def release(self, handle: TransferHandle) -> None:
        """Forget a handle; a transfer still running is aborted (its notif is not delivered)."""

    @abstractmethod
    def send_notif(self, peer: str, msg: bytes) -> None:
        """Send a standalone message (e.g. "blocks freed"); asynchronous, returns at once.

        Ordered after earlier writes to that peer on TCP only (with NIXL it may overtake the
        notification of a transfer still in flight). Raises TransportError if the peer is unknown
        or known to be unreachable."""

    @abstractmethod
    def get_notifs(self) -> dict[str, list[bytes]]:
        """Messages received since the last call, by sender name, in arrival order."""

    @abstractmethod
    def close(self) -> None:
        """Abort transfers, drop peers, deregister memory, stop threads (bounded). Idempotent."""

    # -- conveniences built on the above ------------------------------------------------------

    def wait(self, handle: TransferHandle, timeout_s: float, interval_s: float = 0.0005) -> TransferState:
        """Poll until the transfer finishes or ``timeout_s`` passes; return the last state."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.poll(handle)
            if state.finished or time.monotonic() >= deadline:
                return state
            time.sleep(interval_s)

    def wait_notifs(self, timeout_s: float, interval_s: float = 0.001) -> dict[str, list[bytes]]:
        """Poll ``get_notifs`` until something arrives or ``timeout_s`` passes (then ``{}``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.get_notifs()
            if got or time.monotonic() >= deadline:
                return got
            time.sleep(interval_s)

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
