"""Prometheus metrics of one router app, in a registry of its own (never the global one)."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from splitserve.router.backend import SupportsMetrics

logger = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_NAME_OK = re.compile(r"[^a-zA-Z0-9_]")


_LABELLED = re.compile(r"^(?P<name>[^{]+)(?:\{(?P<labels>.*)\})?$")
_LABEL = re.compile(r'(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>[^"\\\n]*)"')


def metric_key(name: str, **labels: str) -> str:
    """The key of a labelled value in a backend's ``metrics()`` mapping: ``name{k="v",...}``.

    A backend reports per-worker values as ``metric_key("worker_running", worker="decode-0", role="decode")``;
    /metrics exports them as one family ``splitserve_backend_worker_running`` with those labels.
    """
    for k, v in labels.items():
        if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", k) or any(c in str(v) for c in '"\\\n'):
            raise ValueError(f"bad metric label {k}={v!r}")
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{labels[k]}"' for k in sorted(labels)) + "}"


def _parse_key(key: str) -> tuple[str, dict[str, str]] | None:
    m = _LABELLED.match(key)
    if m is None:
        return None
    labels = {lm["key"]: lm["value"] for lm in _LABEL.finditer(m["labels"] or "")}
    return _NAME_OK.sub("_", m["name"]), labels


class _BackendCollector(Collector):
    """Exports the values of ``backend.metrics()`` on each scrape as ``splitserve_backend_<name>``.

    Keys made by `metric_key` carry labels (one family per name, e.g. per-worker values labelled
    ``worker`` and ``role``); a name ending in ``_total`` is a counter, anything else a gauge.
    """

    def __init__(self, backend: SupportsMetrics) -> None:
        self._backend = backend

    def collect(self) -> Iterator[Metric]:
        try:
            values = dict(self._backend.metrics())
        except Exception:  # a broken hook must not break /metrics
            logger.exception("backend metrics() failed")
            return
        families: dict[str, list[tuple[dict[str, str], float]]] = {}
        for key, value in values.items():
            parsed = _parse_key(str(key))
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if parsed is None or math.isnan(v):
                continue
            name, labels = parsed
            families.setdefault(name, []).append((labels, v))
        for name, samples in sorted(families.items()):
            label_names = sorted({k for labels, _ in samples for k in labels})
            full = "splitserve_backend_" + name
            family: CounterMetricFamily | GaugeMetricFamily
            if name.endswith("_total"):
                family = CounterMetricFamily(full.removesuffix("_total"), f"backend counter {name}", labels=label_names)
            else:
                family = GaugeMetricFamily(full, f"backend metric {name}", labels=label_names)
            for labels, v in sorted(samples, key=lambda s: sorted(s[0].items())):
                family.add_metric([labels.get(k, "") for k in label_names], v)
            yield family


class RouterMetrics:
    def __init__(self, backend: object | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "splitserve_router_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.in_flight = Gauge("splitserve_router_requests_in_flight", "Admitted generation requests", registry=r)
        self.ttft = Histogram(
            "splitserve_router_time_to_first_token_seconds",
            "Request arrival to first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "splitserve_router_inter_token_latency_seconds",
            "Time between tokens of one choice",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "splitserve_router_e2e_request_latency_seconds",
            "Request arrival to last token",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "splitserve_router_prompt_tokens", "Prompt tokens of admitted requests", registry=r
        )
        self.generation_tokens = Counter("splitserve_router_generation_tokens", "Generated tokens", registry=r)
        self.rejected = Counter("splitserve_router_rejected_requests", "Requests refused for load (429)", registry=r)
        if isinstance(backend, SupportsMetrics):
            r.register(_BackendCollector(backend))
        for c in getattr(backend, "collectors", lambda: [])():  # e.g. the per-stage histograms
            r.register(c)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Timing of one request: TTFT once per request, inter-token latency per choice."""

    def __init__(self, metrics: RouterMetrics, start: float | None = None) -> None:
        self._m = metrics
        self.start = time.monotonic() if start is None else start
        self.first_token_at: float | None = None
        self._last: dict[int, float] = {}

    def tokens(self, choice: int, count: int) -> None:
        if count <= 0:
            return
        now = time.monotonic()
        if self.first_token_at is None:
            self.first_token_at = now
            self._m.ttft.observe(now - self.start)
        last = self._last.get(choice)
        if last is not None:
            gap = (now - last) / count
            for _ in range(count):
                self._m.itl.observe(gap)
        self._last[choice] = now
        self._m.generation_tokens.inc(count)

    def done(self) -> None:
        self._m.e2e.observe(time.monotonic() - self.start)
