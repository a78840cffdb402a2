"""The cluster secret, with real worker processes (real gRPC, the TCP transfer backend): a call without the
secret or with a wrong one is refused with UNAUTHENTICATED, the router's backend that holds it serves,
and a transfer peer that does not hold it cannot write into a worker's cache pools. TLS for gRPC with a
self-signed certificate made here."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import struct
from collections.abc import Iterator

import grpc
import pytest
import torch

from splitserve.engine.config import EngineConfig
from splitserve.engine.runtime import WorkerSpec
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kvtransfer import (
    Compat,
    HandshakeError,
    PeerMetadata,
    TcpTransport,
    TransferState,
    TransportConfig,
    make_transport,
)
from splitserve.protos import worker_pb2 as pb
from splitserve.protos import worker_pb2_grpc as pbg
from splitserve.protos.auth import SECRET_HEADER, GrpcTls, channel
from splitserve.tests.kvtransfer.workers import SMALL_POOLS, make_pools

from .harness import WorkerProc, directory_of, start_workers, started_backend, tcp_spec

pytestmark = pytest.mark.timeout(300)

SECRET = "the-cluster-secret"
ENGINE = EngineConfig(num_blocks=64, block_size=8, chunk_size=16, max_batch_tokens=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def spec(ckpt, wid: str, role: str, **extra) -> WorkerSpec:
    return tcp_spec(ckpt, wid, role, ENGINE, cluster_secret=SECRET, **extra)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint) -> Iterator[list[WorkerProc]]:
    workers = start_workers(
        [spec(tiny_checkpoint, "prefill-0", "prefill"), spec(tiny_checkpoint, "decode-0", "decode")]
    )
    yield workers
    for w in workers:
        w.stop()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def test_calls_without_the_secret_are_unauthenticated(cluster: list[WorkerProc]) -> None:
    for w in cluster:
        address = w.info["address"]
        stub_of = pbg.DecodeWorkerStub if w.spec.role == "decode" else pbg.PrefillWorkerStub
        with grpc.insecure_channel(address) as ch:
            stub = stub_of(ch)
            assert _code(lambda: stub.Health(pb.HealthRequest(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
            wrong = ((SECRET_HEADER, SECRET + "x"),)
            assert (
                _code(lambda: stub.Stats(pb.StatsRequest(), metadata=wrong, timeout=5))
                == grpc.StatusCode.UNAUTHENTICATED
            )
            ok = stub.Health(pb.HealthRequest(), metadata=((SECRET_HEADER, SECRET),), timeout=5)
            assert ok.worker_id == w.spec.worker_id
        with channel(address, "not-" + SECRET) as ch:
            assert _code(lambda: stub_of(ch).Health(pb.HealthRequest(), timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
        with channel(address, SECRET) as ch:
            assert stub_of(ch).Health(pb.HealthRequest(), timeout=5).worker_id == w.spec.worker_id
    # a streaming call is refused before its handler runs: nothing is generated, nothing reserved
    decode = next(w for w in cluster if w.spec.role == "decode")
    with grpc.insecure_channel(decode.info["address"]) as ch:
        stream = pbg.DecodeWorkerStub(ch).Generate(pb.GenerateRequest(request_id="intruder"), timeout=5)
        assert _code(lambda: list(stream)) == grpc.StatusCode.UNAUTHENTICATED
    with channel(decode.info["address"], SECRET) as ch:
        assert pbg.DecodeWorkerStub(ch).Stats(pb.StatsRequest(), timeout=5).blocks_used == 0


def test_the_router_backend_presents_the_secret(cluster: list[WorkerProc]) -> None:
    async def run(secret: str | None) -> tuple[list[int], str | None]:
        toks: list[int] = []
        err = None
        async with started_backend(directory_of(cluster), cluster_secret=secret, reserve_timeout_s=3.0) as b:
            async for d in b.generate(f"auth-{secret}", list(range(3, 20)), GREEDY):
                toks += d.token_ids
                err = d.error or err
        return toks, err

    toks, err = asyncio.run(run(SECRET))
    assert err is None and len(toks) == GREEDY.max_tokens
    toks, err = [], None
    try:
        toks, err = asyncio.run(run(None))
    except Exception as e:  # noqa: BLE001 - refused either way: an error delta or a raised error
        err = str(e)
    assert not toks and err


def test_a_transfer_peer_without_the_secret_cannot_write(cluster: list[WorkerProc]) -> None:
    decode = next(w for w in cluster if w.spec.role == "decode")
    md = PeerMetadata.from_bytes(decode.info["transfer_metadata"])
    # a peer with the worker's own pool layout and compat, but without the secret, is refused up front
    rogue = make_transport("tcp", "rogue", md.compat)
    try:
        dtypes = [getattr(torch, p.dtype) for p in md.pools]
        rogue.register_pools(
            [
                torch.zeros((p.num_blocks, p.block_bytes // d.itemsize), dtype=d)
                for p, d in zip(md.pools, dtypes, strict=True)
            ]
        )
        with pytest.raises(HandshakeError, match="unauthenticated"):
            rogue.add_peer(decode.info["transfer_metadata"])
        assert rogue.peers() == []
    finally:
        rogue.close()


COMPAT = Compat({"model": "tiny-dsv32", "layout": "block-major", "block_size": 64})


@pytest.mark.parametrize("dialer_secret", [None, b"wrong"])
def test_tcp_receiver_refuses_peers_without_the_secret(dialer_secret: bytes | None) -> None:
    made = []
    try:
        b = make_transport("tcp", "dec", COMPAT, config=TransportConfig(secret=b"s3cret"))
        made.append(b)
        pb_ = make_pools(SMALL_POOLS, None)
        b.register_pools(pb_)
        a = make_transport("tcp", "pre", COMPAT, config=TransportConfig(secret=dialer_secret))
        made.append(a)
        a.register_pools(make_pools(SMALL_POOLS, 3))
        with pytest.raises(HandshakeError, match="unauthenticated"):
            a.add_peer(b.metadata())
        # a raw HELLO without a proof gets HELLO_ERR before its metadata is even looked at
        assert isinstance(b, TcpTransport)
        hello = a.metadata()
        host, port = b.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.settimeout(5)
            s.sendall(struct.pack("!2sBBIQQQ", b"KV", 1, 1, 0, 0, 0, len(hello)) + hello)
            hdr = s.recv(32, socket.MSG_WAITALL)
            assert hdr[3] == 3  # HELLO_ERR
        assert all(not p.any() for p in pb_)  # nothing was written
        # the same dialer with the secret connects and writes
        good = make_transport("tcp", "pre2", COMPAT, config=TransportConfig(secret=b"s3cret"))
        made.append(good)
        pg = make_pools(SMALL_POOLS, 5)
        good.register_pools(pg)
        h = good.write_blocks(good.add_peer(b.metadata()), [1], [2], notif=b"ok")
        assert good.wait(h, 10) is TransferState.DONE
        assert torch.equal(pb_[0][2], pg[0][1])
    finally:
        for t in made:
            t.close()


# ----------------------------------------------------------------------------------------------
# TLS


def _self_signed() -> tuple[bytes, bytes]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitserve-worker")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("splitserve-worker"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def test_a_worker_over_tls(tiny_checkpoint) -> None:
    cert, key = _self_signed()
    tls = GrpcTls(cert=cert, key=key, ca=cert, server_name="splitserve-worker")
    (w,) = start_workers([spec(tiny_checkpoint, "decode-9", "decode", grpc_tls=tls)])
    try:
        address = w.info["address"]
        with channel(address, SECRET, tls) as ch:  # TLS, the certificate checked against the CA, the secret
            assert pbg.DecodeWorkerStub(ch).Health(pb.HealthRequest(), timeout=10).worker_id == "decode-9"
        with channel(address, None, tls) as ch:  # TLS but no secret
            assert (
                _code(lambda: pbg.DecodeWorkerStub(ch).Health(pb.HealthRequest(), timeout=10))
                == grpc.StatusCode.UNAUTHENTICATED
            )
        with channel(address, SECRET) as ch:  # plaintext to a TLS server
            assert (
                _code(lambda: pbg.DecodeWorkerStub(ch).Health(pb.HealthRequest(), timeout=5))
                == grpc.StatusCode.UNAVAILABLE
            )
        other, _ = _self_signed()  # a CA that did not sign the worker's certificate
        with channel(address, SECRET, GrpcTls(cert=b"", key=b"", ca=other, server_name="splitserve-worker")) as ch:
            assert (
                _code(lambda: pbg.DecodeWorkerStub(ch).Health(pb.HealthRequest(), timeout=5))
                == grpc.StatusCode.UNAVAILABLE
            )
    finally:
        w.stop()
