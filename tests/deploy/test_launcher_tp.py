"""Tensor-parallel workers on Ray (real local Ray cluster, real processes): a TP-2 prefill worker with
experts split (expert_parallel) and a TP-2 decode worker, each two actors in one STRICT_PACK placement
group joined by gloo. They serve the greedy tokens of one engine, status shows every rank; a killed
follower rank takes its worker down and a replacement serves the same tokens; shutdown leaves no
worker, rank or Ray process behind."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from splitserve.deploy.controller import Controller
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model import load
from splitserve.model.presets import resolve_checkpoint
from splitserve.router.cluster_backend import DisaggBackend
from splitserve.router.membership import Directory
from splitserve.tests.helpers import pid_alive, wait_until

from .test_launcher import local_cfg, ray_descendants

pytestmark = pytest.mark.timeout(400)


def test_tp2_workers_on_ray_serve_one_engines_tokens() -> None:
    cfg = local_cfg(
        prefill__tensor_parallel_size=2,
        prefill__expert_parallel=True,
        decode__tensor_parallel_size=2,
    )
    directory = Directory()
    controller = Controller(cfg, directory, start_timeout_s=240, monitor_interval_s=0.5, ping_timeout_s=5.0)
    pids: set[int] = set()
    rendezvous: list[str] = []
    try:
        controller.start()
        workers = controller.status()["workers"]
        assert [(w["id"], w["tensor_parallel_size"], w["expert_parallel"]) for w in workers] == [
            ("prefill-0", 2, True),
            ("decode-0", 2, False),
        ]
        for w in workers:
            assert [r["rank"] for r in w["ranks"]] == [0, 1] and w["ranks"][0]["pid"] == w["pid"]
            pids |= {r["pid"] for r in w["ranks"]}
        assert len(pids) == 4 and all(pid_alive(p) for p in pids)
        rendezvous = [w.rendezvous.removeprefix("file://") for w in controller._workers.values()]
        assert len(rendezvous) == 2 and all(os.path.exists(f) for f in rendezvous)

        prompt = list(range(7, 48))
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)

        async def go() -> list[int]:
            b = DisaggBackend(directory, cluster_secret=controller.cluster_secret)
            await b.start()
            try:
                toks: list[int] = []
                async for d in b.generate("tp-ray", prompt, params):
                    assert d.error is None
                    toks += d.token_ids
                return toks
            finally:
                await b.close()

        got = asyncio.run(go())
        ref = Engine(load(resolve_checkpoint(cfg.model.path)), EngineConfig()).generate([prompt], params)[0]
        assert got == ref.token_ids

        # a follower rank dies: the whole worker is marked dead, its leader killed, a new one started
        decode = next(w for w in workers if w["id"] == "decode-0")
        os.kill(decode["ranks"][1]["pid"], signal.SIGKILL)
        wait_until(lambda: any(wid == "decode-0" for wid, _ in controller.replaced), 30, "decode-0 marked dead")
        assert "rank 1" in dict(controller.replaced)["decode-0"]
        wait_until(lambda: not pid_alive(decode["pid"]), 30, "the dead worker's leader to be killed")
        wait_until(
            lambda: any(w["id"] == "decode-1" and w["state"] == "serving" for w in controller.status()["workers"]),
            120,
            "a replacement TP-2 decode worker",
        )
        new = next(w for w in controller.status()["workers"] if w["id"] == "decode-1")
        assert [r["rank"] for r in new["ranks"]] == [0, 1]
        pids |= {r["pid"] for r in new["ranks"]}
        rendezvous += [w.rendezvous.removeprefix("file://") for w in controller._workers.values()]
        assert asyncio.run(go()) == ref.token_ids
    finally:
        controller.shutdown()
    wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "every rank of every worker to exit")
    assert ray_descendants(os.getpid()) == set()
    assert not [f for f in rendezvous if os.path.exists(f)], "rendezvous files left behind"
