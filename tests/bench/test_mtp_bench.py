"""bench/mtp.py on a CPU: the tokens-per-step formula against its closed form, the real-model projection
against a hand computation from its documented formula, and the CPU speedup mode on the tiny preset."""

from __future__ import annotations

import pytest

from splitserve.bench.mtp import REAL_DENSE, REAL_LAYERS, cpu_speedup, project, tokens_per_step
from splitserve.model.checkpoint import PRESETS


@pytest.mark.parametrize("a", [0.0, 0.3, 0.8, 1.0])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_tokens_per_step_is_the_geometric_sum(a: float, k: int) -> None:
    want = k + 1 if a == 1.0 else (1 - a ** (k + 1)) / (1 - a)
    assert tokens_per_step([a], k) == pytest.approx(want)
    assert tokens_per_step([0.9, 0.5, 0.2], 3) == pytest.approx(1 + 0.9 + 0.45 + 0.09)


def test_projection_follows_its_formula() -> None:
    cfg = PRESETS["bench"]  # 1 dense + 3 MoE layers
    parts = dict(k=2, t_dense_1=0.1, t_dense_r=0.12, t_moe_1=0.2, t_moe_r=0.3, t_mtp_1=0.25, t_mtp_r=0.35)
    parts |= dict(t_head_1=0.05, t_head_r=0.06, scale_moe_1=1.0, scale_moe_r=1.5, scale_mtp_1=1.0, scale_mtp_r=1.4)
    step0, stepk = 1.5, 2.5
    out = project(parts, step0, stepk, cfg, [0.8])
    o0 = step0 - (0.1 + 3 * 0.2 + 0.05)
    ok = stepk - (0.35 + 0.25 + 2 * 0.05 + 0.12 + 3 * 0.3 + 0.06)
    moe = REAL_LAYERS - REAL_DENSE
    t0 = REAL_DENSE * 0.1 + moe * 0.2 + 0.05 + o0
    tk = 0.35 * 1.4 + 0.25 + 2 * 0.05 + REAL_DENSE * 0.12 + moe * 0.3 * 1.5 + 0.06 + ok
    assert out["overhead_0_ms"] == pytest.approx(o0) and out["overhead_k_ms"] == pytest.approx(ok)
    assert out["projected_speedup"] == pytest.approx((1 + 0.8 + 0.64) * t0 / tk)


def test_cpu_speedup_mode_runs_and_mtp_stays_lossless() -> None:
    rows = cpu_speedup("tiny", "def f(x):\n", 12, [0, 1, 2], paged=True, threads=1, repeats=1)
    assert [r["k"] for r in rows] == [0, 1, 2]
    assert all(r["same_tokens_as_k0"] for r in rows)
    assert rows[0]["accept_length"] == 1.0 and rows[0]["speedup_vs_k0"] == 1.0
    assert all(1.0 <= r["accept_length"] <= r["k"] + 1 for r in rows)
