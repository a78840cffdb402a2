"""Checkpoint loading: formats, FP8, the real DeepSeek-V3.2 config, and errors that name the tensor."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from splitserve.model import CheckpointError, ModelConfig, load
from splitserve.model.checkpoint import PRESETS, make_checkpoint
from splitserve.model.fp8 import dequantize_weight

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "deepseek-v3.2-config.json"


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def _rewrite(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of src's non-weight files with `tensors` as its single shard."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(src / f, dst / f)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/reference not present")
def test_real_config_parses_like_transformers() -> None:
    from transformers import DeepseekV32Config

    d = json.loads(SHARED.read_text())
    cfg = ModelConfig.from_hf_dict(d)
    ref = DeepseekV32Config(**{k: v for k, v in d.items() if k != "quantization_config"})
    for f in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "index_n_heads",
        "index_head_dim",
        "index_topk",
        "first_k_dense_replace",
    ):
        assert getattr(cfg, f) == getattr(ref, f), f
    assert cfg.qk_head_dim == ref.qk_head_dim == 192
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 40
    assert cfg.weight_block_size == (128, 128)
    assert cfg.latent_dim == 576
    # transformers' softmax scale: 192^-0.5 * mscale^2, mscale = 0.1 * ln(40) + 1
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import yarn_apply_mscale

    assert cfg.softmax_scale == pytest.approx(yarn_apply_mscale(ref.rope_parameters, 192**-0.5))


def test_rope_scaling_and_rope_parameters_spellings_agree() -> None:
    base = {"model_type": "deepseek_v32", "max_position_embeddings": 8192, "rope_theta": 10000}
    a = ModelConfig.from_hf_dict(
        {
            **base,
            "rope_scaling": {
                "type": "yarn",
                "factor": 40,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
            },
        }
    )
    b = ModelConfig.from_hf_dict(
        {
            **base,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000,
                "factor": 40,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 4096,
            },
        }
    )
    assert a == b


def test_tiny_checkpoint_format(tiny_checkpoint: Path) -> None:
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    names = set(index["weight_map"])
    n = PRESETS["tiny"].num_hidden_layers
    assert f"model.layers.{n}.eh_proj.weight" in names and f"model.layers.{n}.shared_head.head.weight" in names
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names
    assert (tiny_checkpoint / "tokenizer.json").exists()
    net = load(tiny_checkpoint)
    assert net.has_mtp
    logits = net.score(torch.arange(10))
    assert logits.shape == (10, PRESETS["tiny"].vocab_size) and torch.isfinite(logits).all()


def test_sharded_checkpoint_loads_the_same(tiny_checkpoint: Path, tmp_path: Path) -> None:
    sharded = make_checkpoint("tiny", tmp_path, seed=0, dtype=torch.float32, shard_bytes=50_000)
    assert len(list(sharded.glob("*.safetensors"))) > 3
    a, b = load(tiny_checkpoint), load(sharded)
    ids = torch.arange(20)
    assert torch.equal(a.score(ids), b.score(ids))


def test_fp8_checkpoint_equals_its_dequantised_twin(tiny_fp8_checkpoint: Path, tmp_path: Path) -> None:
    src = _tensors(tiny_fp8_checkpoint)
    assert any(v.dtype == torch.float8_e4m3fn for v in src.values())
    twin = {}
    for k, v in src.items():
        if k.endswith("_scale_inv"):
            continue
        twin[k] = dequantize_weight(v, src[k + "_scale_inv"]) if k + "_scale_inv" in src else v.float()
    cfg = json.loads((tiny_fp8_checkpoint / "config.json").read_text())
    cfg.pop("quantization_config")
    twin_dir = _rewrite(tiny_fp8_checkpoint, tmp_path / "twin", twin)
    (twin_dir / "config.json").write_text(json.dumps(cfg))
    a, b = load(tiny_fp8_checkpoint), load(twin_dir)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    ids = torch.arange(40)
    assert torch.equal(a.score(ids), b.score(ids))


def test_missing_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    t = _tensors(tiny_checkpoint)
    del t["model.layers.0.self_attn.kv_b_proj.weight"]
    bad = _rewrite(tiny_checkpoint, tmp_path / "bad", t)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\): model\.layers\.0\.self_attn\.kv_b_proj\.weight"):
        load(bad)


def test_misshaped_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    t = _tensors(tiny_checkpoint)
    t["model.layers.1.self_attn.indexer.wk.weight"] = torch.zeros(3, 5)
    bad = _rewrite(tiny_checkpoint, tmp_path / "bad", t)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.indexer\.wk\.weight has shape \(3, 5\)"):
        load(bad)


def test_unexpected_tensor_is_named(tiny_checkpoint: Path, tmp_path: Path) -> None:
    t = _tensors(tiny_checkpoint)
    t["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    bad = _rewrite(tiny_checkpoint, tmp_path / "bad", t)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\): model\.layers\.0\.self_attn\.surprise\.weight"):
        load(bad)


def test_no_mtp_weights_loads_without_mtp_and_says_so_once(tiny_checkpoint: Path, tmp_path: Path, caplog) -> None:
    n = PRESETS["tiny"].num_hidden_layers
    t = {k: v for k, v in _tensors(tiny_checkpoint).items() if not k.startswith(f"model.layers.{n}.")}
    d = _rewrite(tiny_checkpoint, tmp_path / "nomtp", t)
    with caplog.at_level(logging.WARNING, logger="splitserve.model.loader"):
        net = load(d)
    assert not net.has_mtp
    assert sum("MTP" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(RuntimeError, match="no MTP weights"):
        _ = net.mtp


def test_bench_preset_has_the_real_per_layer_shapes() -> None:
    real = ModelConfig.from_json(SHARED) if SHARED.exists() else None
    bench = PRESETS["bench"]
    for f in (
        "hidden_size",
        "num_attention_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "index_n_heads",
        "index_head_dim",
        "index_topk",
        "moe_intermediate_size",
        "intermediate_size",
        "vocab_size",
    ):
        if real is not None:
            assert getattr(bench, f) == getattr(real, f), f
    assert bench.num_hidden_layers < 61 and bench.n_routed_experts < 256
