"""`splitserve bench serve` against a real cluster: the launcher's co-located mode on a local Ray cluster
(two decode workers that prefill their own requests, tcp transfer unused, router under uvicorn), 8 prompts
of 32 tokens and 8 output tokens at two request rates. The JSON has every field, no failure, and its numbers
obey the invariants of their definitions; the dataset and arrival helpers are checked on their own."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from splitserve.bench.serve import arrival_gaps, random_dataset
from splitserve.deploy.cli import main as cli_main
from splitserve.deploy.config import DEFAULT_CONFIG_PATH, load_config, parse_config
from splitserve.deploy.launcher import Cluster
from splitserve.tests.helpers import ServeThread, wait_until

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def router(tiny_checkpoint):
    data = load_config(DEFAULT_CONFIG_PATH).model_dump()
    data["model"].update(path=str(tiny_checkpoint), name="tiny")
    data["router"].update(port=0, mode="colocated")
    data["prefill"]["replicas"] = 0
    data["decode"].update(replicas=2, num_blocks=128, block_size=16, chunk_size=16, mtp_draft_tokens=1)
    data["transfer"]["backend"] = "tcp"
    data["ray"]["num_cpus"] = 4
    cl = Cluster(parse_config(data), drain_timeout_s=10).start()
    try:
        with ServeThread(cl.app) as srv:
            wait_until(lambda: httpx.get(f"{srv.url}/health", timeout=5).status_code == 200, 60, "/health")
            srv.cluster = cl
            srv.operator = {"Authorization": f"Bearer {cl.operator_token}"}
            yield srv
    finally:
        cl.shutdown()


def test_the_colocated_cluster_has_no_prefill_pool(router) -> None:
    cl = router.cluster
    assert cl.controller.targets == {"prefill": 0, "decode": 2}
    assert [w.role for w in cl.directory.all()] == ["decode", "decode"]
    with pytest.raises(ValueError, match="no prefill pool"):
        cl.controller.scale(prefill=1)
    r = httpx.post(f"{router.url}/admin/scale", json={"prefill": 1}, headers=router.operator, timeout=10)
    assert r.status_code == 400 and "no prefill pool" in r.json()["error"]["message"]
    assert httpx.get(f"{router.url}/health", timeout=5).json()["mode"] == "colocated"


def test_bench_serve_json_against_a_colocated_cluster(router, tmp_path) -> None:
    url = router.url
    out = tmp_path / "serve.json"
    rc = cli_main(
        [
            "bench",
            "serve",
            "--url",
            url,
            "--num-prompts",
            "8",
            "--input-len",
            "32",
            "--output-len",
            "8",
            "--request-rate",
            "8",
            "inf",
            "--seed",
            "3",
            "--slo-ttft-ms",
            "60000",
            "--slo-itl-ms",
            "60000",
            "--request-timeout",
            "60",
            "--cluster",
            "2 co-located tiny workers (test)",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["benchmark"] == "serve" and res["command"].startswith("splitserve bench serve --url")
    assert "--request-rate 8 inf" in res["command"] and res["timestamp"] and res["cluster"].startswith("2 co-located")
    assert res["router"]["model"] == "tiny" and res["router"]["health"]["mode"] == "colocated"
    assert res["dataset"]["mean_input_len"] == 32 and res["dataset"]["mean_output_len"] == 8
    assert [r["request_rate"] for r in res["runs"]] == [8.0, "inf"]
    for run in res["runs"]:
        assert (run["completed"], run["failed"], run["error_samples"]) == (8, 0, [])
        assert run["output_len_mismatches"] == 0 and run["usage_mismatches"] == 0
        assert run["total_input_tokens"] == 8 * 32 and run["total_output_tokens"] == 8 * 8
        d = run["duration_s"]
        assert run["output_throughput"] == pytest.approx(64 / d, rel=1e-3)
        assert run["input_throughput"] == pytest.approx(256 / d, rel=1e-3)
        assert run["total_token_throughput"] == pytest.approx(320 / d, rel=1e-3)
        assert run["request_throughput"] == pytest.approx(8 / d, rel=1e-3)
        assert run["goodput"] == pytest.approx(run["request_throughput"]) and run["slo_attained"] == 8
        for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            s = run[key]
            assert set(s) == {"mean", "p50", "p90", "p99", "max"}
            assert 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
        assert run["ttft_ms"]["max"] <= run["e2e_ms"]["max"]
        assert len(run["requests"]) == 8
        for r in run["requests"]:
            assert r["ok"] and r["finish_reason"] == "length" and r["error"] is None
            assert r["output_tokens"] == r["requested_tokens"] == r["usage_completion_tokens"] == 8
            assert r["prompt_tokens"] == 32
            assert 0 < r["ttft_ms"] <= r["e2e_ms"] <= 1000 * d
            assert r["tpot_ms"] == pytest.approx((r["e2e_ms"] - r["ttft_ms"]) / 7, abs=2e-3)
            assert 0 < r["itl_max_ms"] <= r["e2e_ms"] - r["ttft_ms"] + 1e-3
    poisson, burst = (sorted(r["start_ms"] for r in run["requests"]) for run in res["runs"])
    assert poisson[-1] > 100  # 8 requests at 8/s arrive over ~1 s; inf sends them at once
    assert burst[-1] - burst[0] < poisson[-1] - poisson[0]
    # an SLO nobody meets: goodput 0, the run still completes
    rc = cli_main(
        [
            "bench",
            "serve",
            "--url",
            url,
            "--num-prompts",
            "2",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--slo-ttft-ms",
            "0.001",
            "--warmup",
            "0",
            "--out",
            str(out),
        ]
    )
    run = json.loads(out.read_text())["runs"][0]
    assert rc == 0 and run["completed"] == 2 and run["goodput"] == 0 and run["slo_attained"] == 0
    status = httpx.get(f"{url}/admin/status", headers=router.operator, timeout=10).json()
    assert [w["role"] for w in status["workers"]] == ["decode", "decode"]
    wait_until(
        lambda: all(
            w["blocks_used"] == 0
            for w in httpx.get(f"{url}/admin/status", headers=router.operator, timeout=10).json()["workers"]
        ),
        10,
        "every block to be free",
    )


def test_failures_are_counted_with_a_sample_not_raised(router, tmp_path) -> None:
    out = tmp_path / "fail.json"
    rc = cli_main(
        [
            "bench",
            "serve",
            "--url",
            router.url,
            "--model",
            "nope",
            "--num-prompts",
            "3",
            "--input-len",
            "4",
            "--output-len",
            "2",
            "--warmup",
            "0",
            "--out",
            str(out),
        ]
    )
    run = json.loads(out.read_text())["runs"][0]
    assert rc == 1 and (run["completed"], run["failed"]) == (0, 3)
    assert run["error_samples"] and run["error_samples"][0].startswith("HTTP 404")
    assert run["output_throughput"] == 0 and run["ttft_ms"]["p50"] is None


def test_no_router_is_a_clear_error(capsys) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there
    assert cli_main(["bench", "serve", "--url", url, "--num-prompts", "2"]) == 2
    assert "cannot read the router's models" in capsys.readouterr().err


def test_random_dataset_lengths_and_determinism() -> None:
    ds = random_dataset(200, 100, 20, 0.5, seed=1, token_ids=(10, 50))
    assert {len(p.token_ids) for p in ds} <= set(range(50, 101)) and {p.output_len for p in ds} <= set(range(10, 21))
    assert min(len(p.token_ids) for p in ds) < 60 and max(len(p.token_ids) for p in ds) > 90
    assert all(10 <= t < 50 for p in ds for t in p.token_ids)
    assert ds == random_dataset(200, 100, 20, 0.5, seed=1, token_ids=(10, 50))
    assert ds != random_dataset(200, 100, 20, 0.5, seed=2, token_ids=(10, 50))
    fixed = random_dataset(5, 7, 3, 1.0, seed=0)
    assert [(len(p.token_ids), p.output_len) for p in fixed] == [(7, 3)] * 5


def test_arrival_gaps_are_poisson_at_the_rate() -> None:
    assert arrival_gaps(5, math.inf, 0) == [0.0] * 5
    gaps = arrival_gaps(20000, 4.0, 0)
    assert gaps[0] == 0 and all(g >= 0 for g in gaps)
    assert sum(gaps) / (len(gaps) - 1) == pytest.approx(0.25, rel=0.03)
    # the same draws, scaled: rates compare on the same arrival pattern
    assert arrival_gaps(10, 2.0, 0) == pytest.approx([g * 2 for g in arrival_gaps(10, 4.0, 0)])


def test_stage_breakdown_from_two_metrics_scrapes() -> None:
    """bench serve's per-run stages: the difference of two /metrics pages of the router's stage histograms
    (rendered by prometheus_client, as the router serves them) gives each stage's count, mean and p50."""
    from prometheus_client import CollectorRegistry, generate_latest

    from splitserve.bench.serve import parse_stage_metrics, stage_deltas
    from splitserve.router.stage_metrics import StageMetrics

    sm = StageMetrics()
    reg = CollectorRegistry()
    reg.register(sm)
    sm._observe({"reserve": 0.5, "transfer": 1.0})  # before the run: must not count
    before = parse_stage_metrics(generate_latest(reg).decode())
    for v in (0.002, 0.004, 0.006):
        sm._observe({"reserve": v, "prefill_compute": 10 * v})
    d = stage_deltas(before, parse_stage_metrics(generate_latest(reg).decode()))
    assert set(d) == {"reserve", "prefill_compute"}
    assert d["reserve"]["count"] == 3 and abs(d["reserve"]["mean_ms"] - 4.0) < 1e-6
    assert abs(d["prefill_compute"]["mean_ms"] - 40.0) < 1e-6
    assert 2.0 <= d["reserve"]["p50_ms"] <= 5.0 and d["reserve"]["p99_ms"] <= 10.0
