"""Where a disaggregated request's time goes: one Prometheus histogram, labelled by stage.

    splitserve_router_stage_seconds{stage=...}

Stages of one request (segment) in the order they happen; the first six add up to the backend's time
to first token (`ttft`, also observed), the last two to the rest of the stream:

    router_queue      the router holding the request before the Reserve call that admitted it (refused
                      reservations and their back-off, earlier failed attempts)
    reserve           the Reserve call that admitted it (round trip to the decode worker)
    prefill_queue     in the prefill worker before the engine step that ran its first chunk began
                      (worker-reported: PrefillResult.queue_seconds)
    prefill_compute   that step's start to the end of the step that sampled the first token
                      (PrefillResult.prefill_seconds)
    transfer          first token sampled to the last cache write landed (PrefillResult.transfer_seconds:
                      only what streaming during the prefill did not hide)
    prefill_overhead  the rest of the Prefill call: gRPC round trip, handler, wake-ups
    first_decode_step Generate sent to the first decode token received (wait for the cache notification,
                      adopt, one engine step)
    stream            first decode token to the end of the stream

`StageClock` collects a request's marks in the disaggregated driver (router/disagg.py: a few lines at the points where stages start
and end); `StageMetrics.observe_*` turns them into observations. Kept apart from router/metrics.py so the
histograms travel as one collector the router's registry adds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

STAGES = (
    "router_queue",
    "reserve",
    "prefill_queue",
    "prefill_compute",
    "transfer",
    "prefill_overhead",
    "first_decode_step",
    "stream",
    "ttft",
)
TTFT_STAGES = STAGES[:6]
_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.015,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)


class StageClock:
    """Monotonic marks of one request segment (names: see StageMetrics.observe_*)."""

    __slots__ = ("marks",)

    def __init__(self) -> None:
        self.marks: dict[str, float] = {"start": time.monotonic()}

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic()

    def span(self, a: str, b: str) -> float | None:
        if a in self.marks and b in self.marks:
            return max(0.0, self.marks[b] - self.marks[a])
        return None


class StageMetrics(Collector):
    def __init__(self) -> None:
        self.hist = Histogram(
            "splitserve_router_stage_seconds",
            "Time of each stage of a disaggregated request (router/stage_metrics.py)",
            ["stage"],
            buckets=_BUCKETS,
            registry=None,
        )
        self.last: dict[str, float] = {}  # the most recent request's stages (tests, logs)

    def collect(self) -> Iterable[Metric]:
        return self.hist.collect()

    def _observe(self, stages: dict[str, float]) -> None:
        for name, v in stages.items():
            self.hist.labels(stage=name).observe(v)

    def prefill_stages(
        self, clock: StageClock, queue_s: float, compute_s: float, transfer_s: float
    ) -> dict[str, float]:
        """The stages up to the first token, from the clock's marks start, reserve_start, reserve_end,
        prefill_start, prefill_end (the Prefill call) and the worker's own times."""
        m = clock.marks
        worker = max(0.0, queue_s) + max(0.0, compute_s) + max(0.0, transfer_s)
        out = {
            "router_queue": clock.span("start", "reserve_start") or 0.0,
            "reserve": clock.span("reserve_start", "reserve_end") or 0.0,
            "prefill_queue": max(0.0, queue_s),
            "prefill_compute": max(0.0, compute_s),
            "transfer": max(0.0, transfer_s),
            "prefill_overhead": max(0.0, (m["prefill_end"] - m["prefill_start"]) - worker),
        }
        return out

    def observe_first_token(self, clock: StageClock, queue_s: float, compute_s: float, transfer_s: float) -> None:
        clock.mark("first_token")
        stages = self.prefill_stages(clock, queue_s, compute_s, transfer_s)
        stages["ttft"] = clock.span("start", "first_token") or 0.0
        self.last = dict(stages)
        self._observe(stages)

    def observe_first_decode(self, clock: StageClock) -> None:
        clock.mark("first_decode")
        v = clock.span("generate_start", "first_decode")
        if v is not None:
            self.last["first_decode_step"] = v
            self._observe({"first_decode_step": v})

    def observe_end(self, clock: StageClock) -> None:
        clock.mark("end")
        v = clock.span("first_decode", "end")
        if v is not None:
            self.last["stream"] = v
            self._observe({"stream": v})
