"""/metrics as Prometheus reads it: one family per quantity, workers as labels (`worker`, `role`), counters
typed as counters. Parsed with prometheus_client's own text parser."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from splitserve.router.cluster_backend import DisaggBackend
from splitserve.router.membership import Directory, WorkerInfo
from splitserve.router.metrics import RouterMetrics, metric_key
from splitserve.router.testing import ReferenceBackend

from .conftest import MODEL, VOCAB


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_cluster_backend_exports_workers_as_labels_and_counters_as_counters() -> None:
    directory = Directory()
    directory.add(WorkerInfo("prefill-0", "prefill", "127.0.0.1:1", blocks_used=3, running=1, waiting=2))
    directory.add(WorkerInfo("decode-0", "decode", "127.0.0.1:2", blocks_used=7, running=4))
    directory.add(WorkerInfo("decode-1", "decode", "127.0.0.1:3", blocks_used=0))
    backend = DisaggBackend(directory)
    backend.transfer_bytes = 4096
    backend.prefill_retries = 2
    fams = _families(RouterMetrics(backend).render().decode())

    # no metric name carries a worker id any more
    assert not [n for n in fams if any(w in n for w in ("prefill_0", "decode_0", "decode_1"))]
    used = fams["splitserve_backend_worker_blocks_used"]
    assert used.type == "gauge"
    assert {(s.labels["worker"], s.labels["role"]): s.value for s in used.samples} == {
        ("prefill-0", "prefill"): 3,
        ("decode-0", "decode"): 7,
        ("decode-1", "decode"): 0,
    }
    running = fams["splitserve_backend_worker_running"]
    assert {s.labels["worker"]: s.value for s in running.samples} == {"prefill-0": 1, "decode-0": 4, "decode-1": 0}
    queue = fams["splitserve_backend_worker_queue_depth"]
    assert {s.labels["worker"]: s.value for s in queue.samples}["prefill-0"] == 2

    # the *_total values are counters (the parser strips the suffix from the family name)
    transfer = fams["splitserve_backend_transfer_bytes"]
    assert transfer.type == "counter"
    assert [(s.name, s.value) for s in transfer.samples] == [("splitserve_backend_transfer_bytes_total", 4096)]
    assert fams["splitserve_backend_prefill_retries"].type == "counter"
    assert fams["splitserve_backend_prefill_retries"].samples[0].value == 2


def test_metric_key_round_trips_and_rejects_bad_labels() -> None:
    assert metric_key("x") == "x"
    assert (
        metric_key("worker_running", worker="decode-0", role="decode")
        == 'worker_running{role="decode",worker="decode-0"}'
    )
    for bad in ('a"b', "a\nb", "a\\b"):
        try:
            metric_key("x", worker=bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted label value {bad!r}")


def test_app_metrics_endpoint_parses(start_server: Callable) -> None:
    url, _ = start_server(ReferenceBackend(VOCAB))
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3}).status_code == 200
        fams = _families(http.get("/metrics").text)
    assert fams["splitserve_backend_started_requests"].type == "counter"
    assert fams["splitserve_backend_started_requests"].samples[0].value >= 1
    assert fams["splitserve_backend_active_requests"].type == "gauge"
    requests = fams["splitserve_router_requests"]
    assert requests.type == "counter"
    assert any(
        s.labels == {"endpoint": "/v1/completions", "status": "200"} and s.value >= 1
        for s in requests.samples
        if s.name.endswith("_total")
    )
