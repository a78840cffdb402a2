"""`splitserve plan`: per-GPU memory of each pool, from config.json alone.

The weight count is checked against real checkpoints the project makes (the bytes in their safetensors
files) and against the network the loader builds from them (the storage its parameters hold after the
engine fuses them), FP8 and not. The verdicts on the real DeepSeek-V3.2 config.json (tests/deploy/data,
the hub's published values): TP8 / EP8 on 8 x H200 fit with room for cache, on 8 x H100 they do not.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from splitserve.deploy.cli import main
from splitserve.deploy.config import load_config, parse_config
from splitserve.deploy.plan import GIB, PlanError, check_fits, checkpoint_bytes, plan_cluster, weight_plan
from splitserve.model import load
from splitserve.model.checkpoint import PRESETS, make_checkpoint
from splitserve.model.config import ModelConfig

REFERENCE = Path(__file__).parent / "data" / "deepseek-v3.2-config.json"


def _file_bytes(path: Path) -> int:
    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                t = sf.get_tensor(name)
                total += t.numel() * t.element_size()
    return total


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, bool], Path]:
    return {
        (preset, fp8): make_checkpoint(preset, tmp_path_factory.mktemp(f"{preset}{'_fp8' if fp8 else ''}"), fp8=fp8)
        for preset in ("tiny", "small")
        for fp8 in (False, True)
    }


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_weight_count_is_the_checkpoints_tensor_bytes(
    checkpoints: dict[tuple[str, bool], Path], preset: str, fp8: bool
) -> None:
    path = checkpoints[preset, fp8]
    assert checkpoint_bytes(ModelConfig.from_json(path)) == _file_bytes(path)


@pytest.mark.parametrize(
    ("preset", "fp8", "keep"), [("small", False, False), ("small", True, False), ("small", True, True)]
)
def test_weights_as_loaded_are_what_the_network_holds(
    checkpoints: dict[tuple[str, bool], Path], preset: str, fp8: bool, keep: bool
) -> None:
    """One GPU's plan at tensor_parallel_size 1 = the storage the loaded, fused network holds (FP8 kept:
    e4m3 + scales, kv_b_proj dequantised, FusedLinear's padding rows; or everything in the dtype)."""
    path = checkpoints[preset, fp8]
    net = load(path, dtype=torch.float32, fp8_weights=keep)
    loaded = net.weight_bytes()["total"]
    net.fuse_weights()
    storages = {}
    for _, t in [*net.named_parameters(), *net.named_buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    plan = weight_plan(ModelConfig.from_json(path), tp=1, ep=False, fp8=keep, dtype_bytes=4)
    assert plan.total == sum(storages.values())
    assert plan.total - plan.padding == loaded
    assert (plan.padding > 0) == keep
    assert plan.experts > 0 and plan.split > 0 and plan.replicated > 0


@pytest.mark.parametrize("fp8", [False, True])
def test_tensor_and_expert_parallel_split_the_same_bytes(fp8: bool) -> None:
    """Each of tp ranks holds the replicated part whole and 1/tp of the rest; experts split across ranks
    (EP) or each expert split (TP) give the same bytes per GPU (FP8: on the reference config, whose split
    widths are whole 128-blocks, so no scale block is shared)."""
    cfg = PRESETS["small"] if not fp8 else ModelConfig.from_hf_dict(json.loads(REFERENCE.read_text()))
    one = weight_plan(cfg, tp=1, ep=False, fp8=fp8, dtype_bytes=2)
    for tp in (2, 4, 8):
        tp_plan = weight_plan(cfg, tp=tp, ep=False, fp8=fp8, dtype_bytes=2)
        ep_plan = weight_plan(cfg, tp=tp, ep=True, fp8=fp8, dtype_bytes=2)
        assert tp_plan.replicated == one.replicated == ep_plan.replicated
        assert tp_plan.split * tp == one.split
        assert ep_plan.experts * tp == one.experts
        assert tp_plan.experts == ep_plan.experts  # the reference's widths split into whole 128-blocks


@pytest.mark.parametrize("ep", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_one_ranks_plan_is_what_its_loaded_shard_holds(
    checkpoints: dict[tuple[str, bool], Path], fp8: bool, ep: bool
) -> None:
    """At tensor_parallel_size 2 (experts split whole under EP, or each expert split) every rank's loaded
    shard holds exactly the plan's per-GPU weights (the FP8 checkpoint dequantised: the small preset's
    64-wide expert halves are not whole 128-blocks, which the loader refuses for kept FP8)."""
    from splitserve.model.parallel import ParallelState

    path = checkpoints["small", fp8]
    plan = weight_plan(ModelConfig.from_json(path), tp=2, ep=ep, fp8=False, dtype_bytes=4)
    for rank in (0, 1):
        shard = load(path, dtype=torch.float32, fp8_weights=False, parallel=ParallelState(rank, 2, expert_parallel=ep))
        assert plan.total - plan.padding == shard.weight_bytes()["total"]


def test_a_split_the_model_does_not_divide_names_the_field() -> None:
    cfg = parse_config({"decode": {"tensor_parallel_size": 3}})
    with pytest.raises(PlanError) as info:
        plan_cluster(cfg)
    msg = str(info.value)
    assert "decode.tensor_parallel_size 3" in msg and "num_attention_heads (4)" in msg
    with pytest.raises(PlanError, match="decode.tensor_parallel_size 3"):  # what `up` runs, also on cpu
        check_fits(cfg)
    assert check_fits(parse_config({"decode": {"tensor_parallel_size": 2}})) is None  # cpu: no memory verdict


def _reference_yaml(tmp_path: Path, gpu_gb: float, ep: bool) -> Path:
    ckpt = tmp_path / "DeepSeek-V3.2"
    ckpt.mkdir()
    shutil.copy(REFERENCE, ckpt / "config.json")  # config only: the planner needs no weights
    pools = {"tensor_parallel_size": 8, "expert_parallel": ep, "gpu_memory_gb": gpu_gb, "cache_memory_fraction": 0.8}
    doc = {
        "model": {"path": "DeepSeek-V3.2", "device": "cuda"},
        "prefill": pools,
        "decode": {**pools, "mtp_draft_tokens": 1},
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("ep", [False, True])
@pytest.mark.parametrize("gpu_gb", [141.0, 139.8])
def test_deepseek_v32_tp8_fits_8_h200_with_room_for_cache(tmp_path: Path, gpu_gb: float, ep: bool) -> None:
    plan = plan_cluster(load_config(_reference_yaml(tmp_path, gpu_gb, ep)))
    ref = json.loads(REFERENCE.read_text())
    assert plan.fits
    for pool in plan.pools:
        assert pool.fits is True and not pool.problems
        assert pool.weights.fp8  # quantization_config fmt e4m3, [128, 128]: kept FP8 on cuda
        assert pool.cache_tokens >= ref["max_position_embeddings"]  # at least one full-length request
        assert pool.total_bytes <= gpu_gb * GIB
        # the FP8 release is ~690 GB over 8 GPUs: ~86 GB each plus the replicated parts
        assert 80 * GIB < pool.weights.total < 90 * GIB
        # MLA latent 576 + indexer key 128, bf16, 61 layers + MTP
        assert pool.cache_bytes_per_token == (ref["num_hidden_layers"] + 1) * (512 + 64 + 128) * 2


@pytest.mark.parametrize("ep", [False, True])
def test_deepseek_v32_tp8_does_not_fit_8_h100(tmp_path: Path, ep: bool) -> None:
    cfg = load_config(_reference_yaml(tmp_path, 80.0, ep))
    plan = plan_cluster(cfg)
    assert not plan.fits
    for pool in plan.pools:
        assert pool.fits is False
        assert any("weights alone" in p for p in pool.problems)
    with pytest.raises(PlanError, match="does not fit"):
        check_fits(cfg)


def test_plan_json_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(_reference_yaml(tmp_path, 141.0, True)), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True
    for name in ("prefill", "decode"):
        pool = out["pools"][name]
        for key in ("weights_gb", "cache_gb", "cache_tokens", "activations_gb", "total_gb", "gpu_memory_gb", "fits"):
            assert key in pool, key
        assert pool["gpu_memory_gb"] == 141.0 and pool["fits"] is True
        parts = pool["weights_gb"] + pool["cache_gb"] + pool["activations_gb"]
        assert math.isclose(pool["total_gb"], parts)
        assert pool["cache_tokens"] == pool["num_blocks"] * pool["block_size"]


def test_cli_table_and_exit_status_when_it_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", str(_reference_yaml(tmp_path, 80.0, False))]) == 1
    out = capsys.readouterr().out
    assert "fits" in out and "NO" in out and "weights alone" in out


def test_up_refuses_a_layout_that_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any process starts, with the plan's numbers."""
    path = _reference_yaml(tmp_path, 80.0, False)
    assert main(["up", str(path)]) == 1
    err = capsys.readouterr().err
    weights = plan_cluster(load_config(path)).pools[0].weights.total
    assert "does not fit" in err and "weights alone" in err and f"{weights / GIB:.2f} GiB" in err


def test_cpu_plan_is_informational(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse_config({"decode": {"tensor_parallel_size": 2}, "prefill": {"gpu_memory_gb": 0.001}})
    plan = plan_cluster(cfg)
    prefill, decode = plan.pools
    assert decode.fits is None and decode.cache_tokens == 512 * 64  # the cpu default num_blocks
    assert prefill.fits is False and prefill.cpu  # too small, but only said
    assert check_fits(cfg) is None  # never refused on cpu


def test_the_default_config_plans_the_shipped_model() -> None:
    """deploy/local.yaml serves the shipped pycoder checkpoint: the plan reads its config (no preset
    fallback, no directory relative to the working directory) and counts what the loaded network holds."""
    from splitserve.model.presets import resolve_checkpoint

    cfg = load_config(Path(__file__).parents[2] / "deploy" / "local.yaml")
    plan = plan_cluster(cfg)
    net = load(resolve_checkpoint(cfg.model.path), dtype=torch.float32)
    for pool in plan.pools:
        assert pool.to_json()["weights_gb"] * GIB == pytest.approx(net.weight_bytes()["total"], rel=1e-9)
