"""Both backends, two transports in this process: handshake, argument checks, edge cases.

(Transfers between processes, and peers that die, are in test_two_process.py.)
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from splitserve.kvtransfer import (
    Compat,
    HandshakeError,
    PeerMetadata,
    TcpConfig,
    TcpTransport,
    TransferState,
    Transport,
    TransportConfig,
    TransportError,
    make_transport,
)
from splitserve.tests.kvtransfer.workers import SMALL_POOLS, make_pools

COMPAT = Compat({"model": "tiny-dsv32", "layout": "block-major", "block_size": 64})


@pytest.fixture
def transports() -> Iterator[list[Transport]]:
    made: list[Transport] = []
    yield made
    for t in made:
        t.close()


def new(
    made: list[Transport],
    backend: str,
    name: str,
    compat: Compat = COMPAT,
    seed: int | None = 0,
    specs=SMALL_POOLS,
    config: TransportConfig | None = None,
) -> tuple[Transport, list[torch.Tensor]]:
    t = make_transport(backend, name, compat, config=config)  # type: ignore[arg-type]
    made.append(t)
    pools = make_pools(specs, seed)
    t.register_pools(pools)
    return t, pools


def test_compat_mismatch_names_the_fields(backend: str, transports: list[Transport]) -> None:
    a, _ = new(transports, backend, "pre")
    other = Compat({"model": "other-model", "layout": "block-major", "block_size": 64, "mtp_layers": 1})
    b, _ = new(transports, backend, "dec", compat=other)
    with pytest.raises(HandshakeError) as ei:
        a.add_peer(b.metadata())
    msg = str(ei.value)
    assert "model: local='tiny-dsv32' remote='other-model'" in msg
    assert "mtp_layers: local=<missing> remote='1'" in msg
    assert "layout" not in msg and "block_size" not in msg
    assert a.peers() == []


def test_pool_layout_mismatch(backend: str, transports: list[Transport]) -> None:
    a, _ = new(transports, backend, "pre")
    b, _ = new(transports, backend, "dec", specs=(("float32", (32, 4, 64)), ("uint8", (32, 1024))))
    with pytest.raises(HandshakeError, match=r"pool\[1\].block_bytes: local=1056 remote=1024"):
        a.add_peer(b.metadata())


def test_backend_mismatch(transports: list[Transport]) -> None:
    from splitserve.kvtransfer import nixl_available

    if not nixl_available():
        pytest.skip("nixl is not installed")
    a, _ = new(transports, "tcp", "pre")
    b, _ = new(transports, "nixl", "dec")
    with pytest.raises(HandshakeError, match="backend: local='tcp' remote='nixl'"):
        a.add_peer(b.metadata())


def test_lifecycle_and_edge_cases(backend: str, transports: list[Transport]) -> None:
    a, pa = new(transports, backend, "pre", seed=1)
    b, pb = new(transports, backend, "dec", seed=None)
    with pytest.raises(RuntimeError, match="register_pools"):
        make_transport(backend, "x", COMPAT).metadata()  # type: ignore[arg-type]
    peer = a.add_peer(b.metadata())
    assert peer == "dec" and a.peers() == ["dec"]
    assert a.add_peer(b.metadata()) == "dec"  # same metadata again: idempotent
    with pytest.raises(HandshakeError, match="itself"):
        a.add_peer(a.metadata())

    # bad arguments are caller bugs: raised at once
    with pytest.raises(ValueError, match="local block id out of range"):
        a.write_blocks(peer, [32], [0])
    with pytest.raises(ValueError, match="remote block id out of range"):
        a.write_blocks(peer, [0], [32])
    with pytest.raises(ValueError, match="distinct"):
        a.write_blocks(peer, [0, 1], [3, 3])

    # an unknown peer is a FAILED handle, not an exception
    h = a.write_blocks("nobody", [0], [0], notif=b"x")
    assert a.poll(h) is TransferState.FAILED and "unknown peer" in (a.error(h) or "")
    a.release(h)
    with pytest.raises(KeyError):
        a.poll(h)

    # no blocks, only a notification: DONE and delivered
    h = a.write_blocks(peer, [], [], notif=b"empty")
    assert a.wait(h, 10) is TransferState.DONE
    assert b.wait_notifs(10) == {"pre": [b"empty"]}
    a.release(h)

    # two writes: both notifs arrive, each after its data
    h1 = a.write_blocks(peer, [0, 1, 2], [5, 6, 7], notif=b"r1")
    h2 = a.write_blocks(peer, [8], [30], notif=b"r2")
    assert h1.num_descriptors == 1 * 2 and h1.nbytes == 3 * (1024 + 1056)
    assert a.wait(h1, 10) is TransferState.DONE and a.wait(h2, 10) is TransferState.DONE
    got: list[bytes] = []
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        got += b.wait_notifs(1).get("pre", [])
    assert got == [b"r1", b"r2"]  # a notif waits for the earlier writes to the same peer
    for x, y in zip(pa, pb, strict=True):
        assert torch.equal(y[[5, 6, 7, 30]], x[[0, 1, 2, 8]])
        assert not y[:5].any() and not y[8:30].any() and not y[31:].any()
    a.release(h1)
    a.release(h2)
    a.release(h2)  # idempotent

    # notifications the other way need the peer added on that side too
    with pytest.raises(TransportError, match="unknown peer"):
        b.send_notif("pre", b"free")
    b.add_peer(a.metadata())
    b.send_notif("pre", b"free:r1")
    assert a.wait_notifs(10) == {"dec": [b"free:r1"]}

    a.remove_peer("dec")
    h = a.write_blocks("dec", [0], [0])
    assert a.poll(h) is TransferState.FAILED
    # a removed peer can be added again (e.g. after it restarted)
    assert a.add_peer(b.metadata()) == "dec"
    h = a.write_blocks("dec", [9], [9], notif=b"again")
    assert a.wait(h, 10) is TransferState.DONE
    assert b.wait_notifs(10) == {"pre": [b"again"]}
    a.close()
    a.close()  # idempotent
    with pytest.raises(TransportError, match="closed"):
        a.write_blocks("dec", [0], [0])


def test_tcp_receiver_checks_the_handshake_too(transports: list[Transport]) -> None:
    """A dialer that skips its own check is still refused by the receiver, with the reason."""
    b, pb = new(transports, "tcp", "dec", seed=None)
    assert isinstance(b, TcpTransport)
    bad = PeerMetadata(
        backend="tcp", name="rogue", address="127.0.0.1:1", compat=Compat({"model": "other"}), pools=b.pool_infos
    ).to_bytes()
    host, port = b.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.settimeout(5)
        s.sendall(struct.pack("!2sBBIQQQ", b"KV", 1, 1, 0, 0, 0, len(bad)) + bad)  # HELLO
        hdr = s.recv(32, socket.MSG_WAITALL)
        kind, length = hdr[3], struct.unpack("!Q", hdr[24:])[0]
        reason = s.recv(length, socket.MSG_WAITALL).decode()
    assert kind == 3  # HELLO_ERR
    assert "model: local='other' remote='tiny-dsv32'" in reason
    # garbage on a fresh connection is dropped and the transport keeps working
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + b"x" * 64)
    a, pa = new(transports, "tcp", "pre", seed=3)
    h = a.write_blocks(a.add_peer(b.metadata()), [1], [2], notif=b"ok")
    assert a.wait(h, 10) is TransferState.DONE
    assert torch.equal(pb[0][2], pa[0][1])
    assert not pb[0][3:].any()


def test_tcp_stalled_peer_times_out(transports: list[Transport]) -> None:
    """A peer that accepts the connection and then never reads: FAILED at the deadline, no hang."""
    b, _ = new(transports, "tcp", "dec", seed=None, specs=(("uint8", (8, 4 << 20)),))
    a, _ = new(
        transports,
        "tcp",
        "pre",
        seed=None,
        specs=(("uint8", (8, 4 << 20)),),
        config=TcpConfig(transfer_timeout_s=1.0, io_timeout_s=30.0),
    )
    stalled = socket.create_server(("127.0.0.1", 0))
    try:
        port = stalled.getsockname()[1]
        fake = PeerMetadata.from_bytes(b.metadata())
        fake = PeerMetadata(
            backend="tcp", name="stalled", address=f"127.0.0.1:{port}", compat=fake.compat, pools=fake.pools
        )

        def accept_and_stall() -> None:
            conn, _ = stalled.accept()
            hello = conn.recv(32, socket.MSG_WAITALL)
            conn.recv(struct.unpack("!Q", hello[24:])[0], socket.MSG_WAITALL)  # the metadata
            conn.sendall(struct.pack("!2sBBIQQQ", b"KV", 1, 2, 0, 0, 0, 0))  # HELLO_OK, never read again
            time.sleep(60)

        threading.Thread(target=accept_and_stall, daemon=True).start()
        peer = a.add_peer(fake.to_bytes())
        t0 = time.monotonic()
        h = a.write_blocks(peer, list(range(8)), list(range(8)), notif=b"never")  # 32 MiB: fills buffers
        state = a.wait(h, 10)
        assert state is TransferState.FAILED, state
        assert "timed out after 1 s" in (a.error(h) or "")
        assert time.monotonic() - t0 < 5
        a.release(h)
        t0 = time.monotonic()
        a.close()  # the sender thread is stuck in sendall: close must still return in bounded time
        assert time.monotonic() - t0 < 15
    finally:
        stalled.close()
