"""Per-stage breakdown of a disaggregated request (router/stage_metrics.py) on a real cluster (worker
processes, real gRPC, TCP transfer): every stage is reported, non-negative, and the stages up to the
first token add up to the time to first token the caller measured."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from splitserve.engine.config import EngineConfig
from splitserve.engine.runtime import WorkerSpec
from splitserve.engine.sampling_params import SamplingParams
from splitserve.router.metrics import RouterMetrics
from splitserve.router.stage_metrics import STAGES, TTFT_STAGES

from .harness import directory_of, start_workers, started_backend
from .test_faults import assert_all_free, stats

pytestmark = pytest.mark.timeout(300)

ENGINE = EngineConfig(num_blocks=128, block_size=8, chunk_size=16, max_batch_tokens=64)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoint):
    specs = [
        WorkerSpec(
            w,
            w.split("-")[0],
            str(tiny_checkpoint),
            ENGINE,
            transfer_backend="tcp",
            transfer_timeout_s=5.0,
            first_token_timeout_s=20.0,
        )
        for w in ("prefill-0", "decode-0")
    ]
    workers = start_workers(specs)
    yield workers
    for w in workers:
        w.stop()


def test_stage_times_add_up_to_the_ttft(cluster) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    async def go():
        async with started_backend(directory_of(cluster)) as b:
            seen = []
            for i in range(3):  # uncontended: one request at a time
                t0 = time.monotonic()
                ttft = None
                async for d in b.generate(f"stage-{i}", list(range(5, 45)), params):
                    if ttft is None and d.token_ids:
                        ttft = time.monotonic() - t0
                seen.append((ttft, dict(b.stages.last)))
            return seen, RouterMetrics(b).render().decode()

    seen, text = asyncio.run(go())
    for ttft, st in seen:
        print(f"TTFT {ttft * 1e3:.1f} ms:", {k: round(v * 1e3, 2) for k, v in st.items()})
        assert set(st) == set(STAGES), st
        assert all(v >= 0 for v in st.values())
        parts = sum(st[k] for k in TTFT_STAGES)
        assert parts <= st["ttft"] + 1e-3 and st["ttft"] <= ttft + 1e-3
        assert st["ttft"] - parts <= 0.005 + 0.05 * st["ttft"], st  # the stages cover the TTFT
        assert st["prefill_compute"] > 0 and st["stream"] > 0
    for stage in STAGES:  # every stage is a Prometheus histogram with three observations
        m = re.search(rf'splitserve_router_stage_seconds_count{{stage="{stage}"}} (\S+)', text)
        assert m and float(m.group(1)) == 3.0, stage
    for w in cluster:  # warm start: the worker reported ready after its warm-up; no graphs on a CPU
        s = stats(w)
        assert s.warmup_seconds > 0 and s.graph_captures == 0 and s.graph_misses_after_ready == 0
    assert_all_free(cluster)
