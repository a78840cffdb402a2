"""Two real processes per backend: a "decode" worker that owns the destination pools and a
"prefill" worker that pushes blocks into them. Every wait is bounded; the fixture kills leftovers.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence

import pytest
import torch

from splitserve.tests.kvtransfer.workers import SMALL_POOLS, PoolSpec, Worker, make_pools

COMPAT = {"model": "tiny-dsv32", "layout": "block-major", "block_size": "64"}
WAIT_S = 30.0

# Scattered on purpose: runs where both sides are consecutive (0-3 -> 4-7, 10-11 -> 12-13),
# local-consecutive-only (14, 15 -> 20, 22), remote-consecutive-only (17, 19 -> 24, 25),
# isolated blocks, and the first and last block of the pools.
LOCAL = [0, 1, 2, 3, 7, 10, 11, 14, 15, 17, 19, 31]
REMOTE = [4, 5, 6, 7, 0, 12, 13, 20, 22, 24, 25, 31]


def expected_runs(local: list[int], remote: list[int]) -> int:
    pairs = set(zip(local, remote, strict=True))
    return sum(1 for lid, rid in pairs if (lid - 1, rid - 1) not in pairs)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8).view(t.shape[0], -1)


def push_and_check(
    backend: str, spawn_worker: Callable[..., Worker], dec_specs: Sequence[PoolSpec], pre_specs: Sequence[PoolSpec]
) -> tuple[Worker, Worker]:
    """Prefill pushes LOCAL -> REMOTE with a notif; decode checks every byte of every block."""
    dec = spawn_worker(backend, "dec", COMPAT, specs=dec_specs, seed=11)
    pre = spawn_worker(backend, "pre", COMPAT, specs=pre_specs, seed=22)
    assert pre.call("add_peer", dec.metadata) == "dec"

    xid, ndesc, nbytes = pre.call("write", "dec", LOCAL, REMOTE, b"req-7:done")
    assert ndesc == expected_runs(LOCAL, REMOTE) * len(pre_specs) == 8 * 2
    assert nbytes == len(LOCAL) * (1024 + 1056)

    # the decode side learns about the data only through the notification...
    notifs = dec.call("wait_notifs", WAIT_S, timeout_s=WAIT_S + 5)
    assert notifs == {"pre": [b"req-7:done"]}
    # ... and at that point exactly the requested blocks hold the sent bytes
    got = dec.call("pool_bytes")
    before = [p.cpu() for p in make_pools(dec_specs, seed=11)]
    sent = [p.cpu() for p in make_pools(pre_specs, seed=22)]
    for i, (b0, s, raw) in enumerate(zip(before, sent, got, strict=True)):
        after = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(b0.shape[0], -1)
        want = as_bytes(b0).clone()
        want[REMOTE] = as_bytes(s)[LOCAL]
        bad = [blk for blk in range(want.shape[0]) if not torch.equal(after[blk], want[blk])]
        assert not bad, f"pool {i}: blocks {bad} differ from expected"

    state, err, _ = pre.call("wait", xid, WAIT_S, timeout_s=WAIT_S + 5)
    assert (state, err) == ("done", None)
    pre.call("release", xid)
    return dec, pre


def test_push_scattered_blocks_with_notif(backend: str, spawn_worker: Callable[..., Worker]) -> None:
    dec, pre = push_and_check(backend, spawn_worker, SMALL_POOLS, SMALL_POOLS)

    # the other direction: decode tells prefill it may free its blocks
    assert dec.call("add_peer", pre.metadata) == "pre"
    dec.call("send_notif", "pre", b"req-7:free")
    assert pre.call("wait_notifs", WAIT_S, timeout_s=WAIT_S + 5) == {"dec": [b"req-7:free"]}

    assert pre.call("close") < 10
    assert dec.call("close") < 10


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# 32 blocks of 256 KiB + 64 KiB: a 31-block write takes long enough to be overtaken
MEDIUM_POOLS: tuple[PoolSpec, ...] = (("float32", (32, 64, 1024)), ("uint8", (32, 65536)))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_notif_follows_all_earlier_writes(backend: str, device: str, spawn_worker: Callable[..., Worker]) -> None:
    """A request streamed as several writes (as the prefill worker does) with the notification on
    the last, small one: when it arrives, the blocks of ALL earlier writes must be in place too."""
    specs = [(d, s, device) for d, s in MEDIUM_POOLS]
    dec = spawn_worker(backend, "dec", COMPAT, specs=specs, seed=None)
    pre = spawn_worker(backend, "pre", COMPAT, specs=specs, seed=5)
    pre.call("add_peer", dec.metadata)
    sent = [p.cpu() for p in make_pools(specs, seed=5)]  # type: ignore[arg-type]
    for rnd in range(2):
        order = list(range(31))
        xids = [pre.call("write", "dec", order, order)[0], pre.call("write", "dec", [31], [31], b"last%d" % rnd)[0]]
        got, raw = dec.call("wait_notifs_then_snapshot", WAIT_S, timeout_s=WAIT_S + 5)
        assert got == {"pre": [b"last%d" % rnd]}
        for i, (s, r) in enumerate(zip(sent, raw, strict=True)):
            after = torch.frombuffer(bytearray(r), dtype=torch.uint8).view(s.shape[0], -1)
            bad = [b for b in range(32) if not torch.equal(after[b], as_bytes(s)[b])]
            assert not bad, f"round {rnd}, pool {i}: blocks {bad} not in place when the notif arrived"
        for x in xids:
            assert pre.call("wait", x, WAIT_S, timeout_s=WAIT_S + 5)[0] == "done"
            pre.call("release", x)
        dec.call("zero")  # so that the next round proves its own writes


@CUDA
@pytest.mark.parametrize(
    "placement",
    [
        ("cuda", "cuda", "cuda", "cuda"),  # VRAM -> VRAM (NIXL: cuda_ipc on one host)
        ("cpu", "cpu", "cuda", "cuda"),  # host pools -> device pools
        ("cuda", "cuda", "cuda", "cpu"),  # decode mixes devices: NIXL needs 2 requests + late notif
    ],
    ids=["gpu-gpu", "cpu-gpu", "gpu-mixed"],
)
def test_push_cuda_pools(backend: str, spawn_worker: Callable[..., Worker], placement: tuple[str, ...]) -> None:
    pre_specs = [(d, s, dev) for (d, s), dev in zip(SMALL_POOLS, placement[:2], strict=True)]
    dec_specs = [(d, s, dev) for (d, s), dev in zip(SMALL_POOLS, placement[2:], strict=True)]
    push_and_check(backend, spawn_worker, dec_specs, pre_specs)  # type: ignore[arg-type]


# 2 pools x 64 blocks x 1 MiB: far more than loopback socket buffers hold
BIG_POOLS = (("float32", (64, 64, 4096)), ("uint8", (64, 1 << 20)))


def test_tcp_peer_killed_mid_transfer(spawn_worker: Callable[..., Worker]) -> None:
    dec = spawn_worker("tcp", "dec", COMPAT, specs=BIG_POOLS, seed=None)
    pre = spawn_worker("tcp", "pre", COMPAT, specs=BIG_POOLS, seed=None)
    pre.call("add_peer", dec.metadata)
    os.kill(dec.pid, signal.SIGSTOP)  # decode stops reading: the sender blocks mid-stream
    try:
        xid, _, nbytes = pre.call("write", "dec", list(range(64)), list(range(64)), b"never")
        assert nbytes == 128 << 20
        deadline = time.monotonic() + 10
        while pre.call("poll", xid)[0] != "in_progress":
            assert time.monotonic() < deadline, "transfer never started"
            time.sleep(0.01)
        time.sleep(0.2)
        assert pre.call("poll", xid)[0] == "in_progress"  # stuck, mid-transfer
    finally:
        os.kill(dec.pid, signal.SIGKILL)
    t0 = time.monotonic()
    state, err, _ = pre.call("wait", xid, WAIT_S, timeout_s=WAIT_S + 5)
    took = time.monotonic() - t0
    assert state == "failed", (state, err)
    assert "connection to peer 'dec' failed" in err and took < 5, (err, took)
    # the link stays broken: later writes fail at once instead of hanging
    xid2, _, _ = pre.call("write", "dec", [0], [0], b"again")
    assert pre.call("wait", xid2, 5)[0] == "failed"
    assert pre.call("close") < 10


def test_nixl_peer_killed(spawn_worker: Callable[..., Worker]) -> None:
    """NIXL/UCX on CPU moves data with CMA (the kernel copies into the peer's memory), so a stopped
    peer does not stall a WRITE the way it stalls TCP. What must hold: writes in flight when the
    peer is SIGKILLed end (DONE or FAILED) in bounded time, and writes after the kill FAIL."""
    from splitserve.kvtransfer import nixl_available

    if not nixl_available():
        pytest.skip("nixl is not installed")
    dec = spawn_worker("nixl", "dec", COMPAT, specs=BIG_POOLS, seed=None)
    pre = spawn_worker("nixl", "pre", COMPAT, specs=BIG_POOLS, seed=None)
    pre.call("add_peer", dec.metadata)
    os.kill(dec.pid, signal.SIGSTOP)
    try:
        inflight = [pre.call("write", "dec", list(range(64)), list(range(64)), b"n%d" % i)[0] for i in range(4)]
    finally:
        os.kill(dec.pid, signal.SIGKILL)
    dec.proc.join(10)
    t0 = time.monotonic()
    for xid in inflight:
        state, err, _ = pre.call("wait", xid, WAIT_S, timeout_s=WAIT_S + 5)
        assert state in ("done", "failed"), (state, err)
    after, _, _ = pre.call("write", "dec", list(range(64)), list(range(64)), b"after")
    state, err, _ = pre.call("wait", after, WAIT_S, timeout_s=WAIT_S + 5)
    assert state == "failed" and err, (state, err)
    assert time.monotonic() - t0 < 15
    assert pre.call("close") < 10
