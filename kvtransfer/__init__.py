"""splitserve.kvtransfer: moving paged KV-cache blocks between worker processes.

Read ``base.py`` first (the contract, lifecycle and memory layout), then ``common.py`` (shared
bookkeeping), then one backend: ``nixl_backend.py`` (NIXL/UCX: NVLink, RDMA, CMA/TCP on CPU) or
``tcp_backend.py`` (plain sockets, no dependency). ``bench.py`` measures them. ``notice.py`` holds
the typed messages the workers exchange about a reservation; ``fake.py`` is an in-memory transport
with injectable faults, for tests.
"""

from __future__ import annotations

from typing import Literal

from .base import (
    WIRE_VERSION,
    Compat,
    HandshakeError,
    PeerMetadata,
    PoolInfo,
    TransferHandle,
    TransferState,
    Transport,
    TransportConfig,
    TransportError,
    coalesce,
)
from .common import TransportCore
from .tcp_backend import TcpConfig, TcpTransport

__all__ = [
    "WIRE_VERSION",
    "Compat",
    "HandshakeError",
    "PeerMetadata",
    "PoolInfo",
    "TcpConfig",
    "TcpTransport",
    "TransferHandle",
    "TransferState",
    "Transport",
    "TransportConfig",
    "TransportError",
    "coalesce",
    "make_transport",
    "nixl_available",
]


def nixl_available() -> bool:
    """True if the NIXL Python package (with a backend wheel) can be imported."""
    try:
        from . import nixl_backend  # noqa: F401
    except ImportError:
        return False
    return True


def make_transport(
    backend: Literal["nixl", "tcp"],
    name: str,
    compat: Compat,
    host: str = "127.0.0.1",
    *,
    config: TransportConfig | None = None,
) -> TransportCore:
    """Create the transport of one worker process (both backends share TransportCore: staging and the rest).

    ``config`` may be the backend's own config (``NixlConfig`` / ``TcpConfig``) or a plain
    ``TransportConfig`` whose timeouts are then used with the backend's defaults.
    """
    if backend == "tcp":
        if config is not None and not isinstance(config, TcpConfig):
            config = TcpConfig(
                transfer_timeout_s=config.transfer_timeout_s,
                connect_timeout_s=config.connect_timeout_s,
                close_timeout_s=config.close_timeout_s,
                secret=config.secret,
            )
        return TcpTransport(name, compat, host=host, config=config)
    if backend == "nixl":
        try:
            from .nixl_backend import NixlConfig, NixlTransport
        except ImportError as e:
            raise ImportError(
                "the 'nixl' kvtransfer backend needs the NIXL Python package "
                "(pip install 'splitserve[nixl]', i.e. nixl>=1.5 with its nixl-cu12/nixl-cu13 wheel); "
                f"importing it failed: {e}. Use backend='tcp' where NIXL is not available."
            ) from e
        if config is not None and not isinstance(config, NixlConfig):
            config = NixlConfig(
                transfer_timeout_s=config.transfer_timeout_s,
                connect_timeout_s=config.connect_timeout_s,
                close_timeout_s=config.close_timeout_s,
                secret=config.secret,
            )
        return NixlTransport(name, compat, host=host, config=config)
    raise ValueError(f"unknown kvtransfer backend {backend!r}; expected 'nixl' or 'tcp'")
