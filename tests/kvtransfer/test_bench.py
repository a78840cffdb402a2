"""`splitserve bench transfer --tokens ...`: a request's cache in a preset's layout against one region of
the same bytes, between two real processes (tcp; nixl over UCX when installed)."""

from __future__ import annotations

import json

import pytest

from splitserve.kvtransfer import nixl_available
from splitserve.kvtransfer.bench import main, preset_block_bytes
from splitserve.model.checkpoint import PRESETS


def test_preset_block_bytes_match_the_engine_pool() -> None:
    from splitserve.engine.cache import CachePool

    cfg = PRESETS["tiny"]
    pool = CachePool(cfg, cfg.num_hidden_layers + 1, 2, 64, __import__("torch").bfloat16, "cpu", indexer_fp8=True)
    assert preset_block_bytes("tiny") == tuple(p[0].nbytes for p in pool.pools())


@pytest.mark.timeout(180)
def test_request_sizes_against_one_region(tmp_path) -> None:
    backends = ["tcp"] + (["nixl"] if nixl_available() else [])
    out = tmp_path / "t.json"
    assert (
        main(
            ["--backend", *backends, "--preset", "tiny", "--tokens", "128", "640", "--repeats", "2", "--json", str(out)]
        )
        == 0
    )
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("splitserve bench transfer --backend")
    rows = doc["rows"]
    per_block = sum(preset_block_bytes("tiny"))
    for backend in backends:
        for tokens in (128, 640):
            mine = {r["case"]: r for r in rows if r["backend"] == backend and r["tokens"] == tokens}
            assert {"contiguous", "scattered", "scattered -> staged", "one region"} <= set(mine)
            blocks = tokens // 64
            assert mine["contiguous"]["blocks"] == blocks and mine["one region"]["descriptors"] == 1
            # staged: the scattered blocks gathered on the sender travel as one descriptor per pool
            assert mine["scattered -> staged"]["descriptors"] == mine["contiguous"]["descriptors"]
            for case in ("contiguous", "scattered", "scattered -> staged", "one region"):  # the same bytes
                assert mine[case]["mbytes"] == pytest.approx(blocks * per_block / 1e6)
                assert mine[case]["median_ms"] > 0
            assert mine["scattered"]["descriptors"] >= mine["contiguous"]["descriptors"]
