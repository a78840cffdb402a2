"""bench/run_cluster_gpu.sh's helpers on a CPU: the one-GPU config and its co-located variant load and
map to the engine settings the script relies on; the summary reads what the parts write."""

from __future__ import annotations

import json
from pathlib import Path

from splitserve.bench.cluster_gpu import main
from splitserve.deploy.config import load_config
from splitserve.deploy.worker_actor import actor_options, engine_config_for

ROOT = Path(__file__).resolve().parents[2]


def test_one_gpu_configs(tmp_path) -> None:
    base = ROOT / "deploy" / "gpu-1gpu.yaml"
    dis, col = tmp_path / "d.yaml", tmp_path / "c.yaml"
    assert main(["config", "--base", str(base), "--ckpt", "/ckpt", "--mode", "disaggregated", "--out", str(dis)]) == 0
    assert (
        main(
            [
                "config",
                "--base",
                str(base),
                "--ckpt",
                "/ckpt",
                "--mode",
                "colocated",
                "--decode-replicas",
                "2",
                "--mtp",
                "1",
                "--out",
                str(col),
            ]
        )
        == 0
    )
    d, c = load_config(dis), load_config(col)
    assert d.model.path == "/ckpt" and d.router.mode == "disaggregated"
    for role in ("prefill", "decode"):  # both pools share the one GPU, caches sized by num_blocks
        assert actor_options(d, role, f"{role}-0")["num_gpus"] == 0.5
        e = engine_config_for(d, role)
        assert e.device == "cuda" and e.num_blocks == 16384 and e.cache_memory_fraction is None
    # the prefill worker's staging area holds a whole max_model_len prompt and two steps' writes
    assert engine_config_for(d, "prefill").staging_blocks >= 16384 // 64
    assert engine_config_for(d, "decode").staging_blocks == 0
    assert c.router.mode == "colocated" and c.decode.replicas == 2 and c.decode.mtp_draft_tokens == 1
    assert c.prefill.replicas == 0 and engine_config_for(c, "decode").chunk_size == 2048


def test_summary_reads_the_parts(tmp_path, capsys) -> None:
    (tmp_path / "prefill-alone.json").write_text(json.dumps({"rows": [{"tokens": 1024, "prefill_ms": 25.0}]}))
    (tmp_path / "ttft-disagg.json").write_text(
        json.dumps({"rows": [{"tokens": 1024, "ttft_ms": 31.5, "stages": {"prefill_compute": {"mean_ms": 25.2}}}]})
    )
    stats = {"p50": 4.0, "p90": 5.0, "p99": 7.0, "max": 9.0, "mean": 4.5}
    run = {"request_rate": 2.0, "completed": 8, "failed": 0, "goodput": 1.9, "ttft_ms": stats, "itl_ms": stats}
    (tmp_path / "serve-disagg-long.json").write_text(json.dumps({"runs": [run]}))
    (tmp_path / "graphs-disagg.json").write_text(json.dumps({"counters": {}, "misses_after_ready": 0}))
    assert main(["summary", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1024 |             25.0 |     31.5 |      6.5 |" in out
    assert "disagg-long" in out and "1.90" in out and "misses after ready = 0" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ttft_vs_prefill"] == [{"tokens": 1024, "prefill_alone_ms": 25.0, "ttft_ms": 31.5}]
