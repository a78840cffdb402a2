"""The one routing policy both modes use, and who writes liveness: the router's poller reports load
(and failed polls) but never a worker's state; the Directory refuses it."""

from __future__ import annotations

import asyncio
import socket

import pytest

from splitserve.router.clients import WorkerClients
from splitserve.router.membership import Directory, WorkerInfo
from splitserve.router.policy import RoutingPolicy, affinity_ranked
from splitserve.router.poller import LoadPoller


def workers(n: int, **kw) -> list[WorkerInfo]:
    return [WorkerInfo(f"w{i}", "decode", f"127.0.0.1:{1000 + i}", **kw) for i in range(n)]


def test_least_loaded_orders_by_the_callers_key_and_puts_failing_workers_last() -> None:
    ws = workers(3)
    ws[0] = WorkerInfo("w0", "decode", "a", failures=2)
    load = {"w0": 0, "w1": 5, "w2": 1}
    ranked = RoutingPolicy("least_loaded").rank(ws, [1, 2], load=lambda w: load[w.worker_id], backlog=lambda w: 0)
    assert [w.worker_id for w in ranked] == ["w2", "w1", "w0"]


def test_round_robin_rotates_through_every_worker() -> None:
    p, ws = RoutingPolicy("round_robin"), workers(3)
    firsts = [p.rank(ws, [], load=lambda w: 0, backlog=lambda w: 0)[0].worker_id for _ in range(6)]
    assert sorted(firsts[:3]) == ["w0", "w1", "w2"] and firsts[:3] == firsts[3:]


def test_prefix_affinity_keeps_a_prefix_home_unless_it_is_far_busier() -> None:
    p, ws = RoutingPolicy("prefix_affinity"), workers(4)
    prompt = list(range(100))
    home = affinity_ranked(prompt, ws)[0]
    assert affinity_ranked(prompt + [7, 8], ws)[0] is home  # the first 64 tokens decide
    assert p.rank(ws, prompt, load=lambda w: w.worker_id, backlog=lambda w: 0)[0] is home
    busy = {home.worker_id: 10_000}
    ranked = p.rank(
        ws, prompt, load=lambda w: (busy.get(w.worker_id, 0), w.worker_id), backlog=lambda w: busy.get(w.worker_id, 0)
    )
    assert ranked[0] is not home and ranked[-1] is home


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="least_loaded"):
        RoutingPolicy("random")


def test_the_directory_takes_load_reports_but_not_liveness() -> None:
    d = Directory()
    d.add(workers(1)[0])
    d.report("w0", blocks_used=3, failures=1)
    assert d.get("w0").blocks_used == 3 and d.get("w0").failures == 1
    with pytest.raises(ValueError, match="state"):
        d.report("w0", state="dead")
    assert d.get("w0").state == "serving"


def test_the_poller_counts_failed_polls_and_never_declares_a_worker_dead() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Directory()
    d.add(WorkerInfo("gone", "decode", f"127.0.0.1:{port}"))

    async def go() -> None:
        clients = WorkerClients()
        poller = LoadPoller(d, clients, interval_s=60)
        try:
            for _ in range(3):
                await poller.refresh()
        finally:
            await clients.close()

    asyncio.run(go())
    w = d.get("gone")
    assert w.failures == 3 and w.state == "serving"  # the controller decides; routing ranks it last
