"""Compat, metadata serialisation and the handshake checks (pure, no transport)."""

from __future__ import annotations

import struct

import pytest
import torch

from splitserve.kvtransfer import WIRE_VERSION, Compat, HandshakeError, PeerMetadata, PoolInfo
from splitserve.kvtransfer.base import check_handshake, describe_pool


def md(compat: Compat, pools: tuple[PoolInfo, ...] | None = None, backend: str = "tcp") -> PeerMetadata:
    if pools is None:
        pools = (
            PoolInfo(num_blocks=32, block_bytes=1024, dtype="float32", device="cpu", base_addr=4096, dev_id=0),
            PoolInfo(num_blocks=32, block_bytes=1056, dtype="uint8", device="cpu", base_addr=1 << 20, dev_id=0),
        )
    return PeerMetadata(
        backend=backend, name="x", address="127.0.0.1:1", compat=compat, pools=pools, blob=b"\x00\xffblob"
    )


def test_compat_is_frozen_hashable_and_normalised() -> None:
    a = Compat({"model": "tiny", "block_size": 64, "mtp": True})
    b = Compat.of(mtp="True", block_size="64", model="tiny")
    assert a == b and hash(a) == hash(b) and a.digest() == b.digest()
    assert a.fields["block_size"] == "64"
    with pytest.raises(AttributeError):
        a.version = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        Compat({"model": ["a"]})  # type: ignore[dict-item]
    assert Compat({"model": "tiny"}, version=2) != Compat({"model": "tiny"})


def test_compat_diff_names_every_field_with_both_values() -> None:
    local = Compat({"model": "a", "block_size": 64, "layers": 61}, version=1)
    remote = Compat({"model": "b", "block_size": 64, "mtp": 1}, version=2)
    lines = local.diff(remote)
    assert "version: local=1 remote=2" in lines
    assert "model: local='a' remote='b'" in lines
    assert "layers: local='61' remote=<missing>" in lines
    assert "mtp: local=<missing> remote='1'" in lines
    assert not any(line.startswith("block_size") for line in lines)


def test_metadata_roundtrip() -> None:
    m = md(Compat({"model": "tiny"}, version=3))
    assert PeerMetadata.from_bytes(m.to_bytes()) == m


def test_metadata_is_not_pickle_and_rejects_garbage() -> None:
    raw = md(Compat({"model": "tiny"})).to_bytes()
    assert raw.startswith(b"SSKVMD")
    with pytest.raises(HandshakeError, match="bad magic"):
        PeerMetadata.from_bytes(b"\x80\x04garbage-garbage")
    with pytest.raises(HandshakeError, match="too short"):
        PeerMetadata.from_bytes(b"SS")
    future = raw[:6] + struct.pack("!H", WIRE_VERSION + 1) + raw[8:]
    with pytest.raises(HandshakeError, match=f"wire version {WIRE_VERSION + 1}"):
        PeerMetadata.from_bytes(future)
    truncated = raw[:20]
    with pytest.raises(HandshakeError, match="header length"):
        PeerMetadata.from_bytes(truncated)
    bad_json = raw[:12] + b"{" * (len(raw) - 12)
    with pytest.raises(HandshakeError, match="malformed"):
        PeerMetadata.from_bytes(bad_json)


def test_handshake_checks_compat_first_then_pools() -> None:
    base = Compat({"model": "tiny", "layout": "block-major"})
    check_handshake(md(base), md(base))
    # compat differs AND the pools differ: only compat is reported
    other_pools = (PoolInfo(num_blocks=8, block_bytes=999, dtype="float16", device="cpu", base_addr=0, dev_id=0),)
    with pytest.raises(HandshakeError) as ei:
        check_handshake(md(base), md(Compat({"model": "big", "layout": "block-major"}), other_pools))
    msg = str(ei.value)
    assert "compat mismatch" in msg and "model: local='tiny' remote='big'" in msg
    assert "pool" not in msg.replace("compat", "")
    with pytest.raises(HandshakeError) as ei:
        check_handshake(md(base), md(base, other_pools))
    msg = str(ei.value)
    assert "pool count: local=2 remote=1" in msg
    assert "pool[0].block_bytes: local=1024 remote=999" in msg
    assert "pool[0].dtype: local='float32' remote='float16'" in msg
    with pytest.raises(HandshakeError, match="backend: local='tcp' remote='nixl'"):
        check_handshake(md(base), md(base, backend="nixl"))


def test_describe_pool() -> None:
    p = torch.zeros(32, 4, 64)
    info = describe_pool(p)
    assert (info.num_blocks, info.block_bytes, info.dtype, info.device) == (32, 1024, "float32", "cpu")
    assert info.base_addr == p.data_ptr() and info.mem_type == "DRAM"
    with pytest.raises(ValueError, match="contiguous"):
        describe_pool(torch.zeros(4, 32).t())
    with pytest.raises(ValueError, match="leading block dimension"):
        describe_pool(torch.zeros(()))
