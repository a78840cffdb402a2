"""Random-weight checkpoints in exactly the DeepSeek-V3.2 Hugging Face format.

`make_checkpoint(preset, out)` writes config.json (the hub's `rope_scaling` spelling),
model-0000x-of-0000n.safetensors shards with model.safetensors.index.json, MTP weights under
model.layers.{num_hidden_layers}, a tokenizer.json, and, with fp8=True, float8_e4m3fn linear
weights with 128x128 `weight_scale_inv` blocks. Tensors are generated one at a time from a seeded
generator and written shard by shard, so the bench preset (billions of parameters) never needs
the whole model in memory.

Presets:
- tiny: CPU tests in seconds (hidden 64, 2 layers: 1 dense + 1 MoE, 8 experts, index_topk 32; 16 indexer
  heads, so that index scores of exactly 0 (every head's ReLU at 0), which tie in top-k, are rare).
- small: a larger CPU config (hidden 256, 4 layers, 16 experts, index_topk 128).
- bench: the real per-layer shapes (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, nope 128,
  rope 64, v 128, indexer 64x128, top-k 2048, moe_inter 2048, dense inter 18432, vocab 129280)
  with 4 layers (1 dense) and 16 experts, 8 active, for GPU benchmarks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint_format import fp8_quantised, hf_tensor_shapes, layer_of
from .config import ModelConfig, RopeConfig
from .fp8 import quantize_weight

log = logging.getLogger(__name__)

_YARN = RopeConfig(
    rope_type="yarn",
    theta=10000.0,
    factor=40.0,
    original_max_position_embeddings=4096,
    beta_fast=32,
    beta_slow=1,
    mscale=1.0,
    mscale_all_dim=1.0,
)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        index_n_heads=16,
        index_head_dim=32,
        index_topk=32,
        max_position_embeddings=4096,
        rope=replace(_YARN, original_max_position_embeddings=256),
    ),
    "small": ModelConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=8,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=32,
        v_head_dim=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        index_n_heads=8,
        index_head_dim=64,
        index_topk=128,
        max_position_embeddings=16384,
        rope=replace(_YARN, original_max_position_embeddings=1024),
    ),
    "bench": ModelConfig(
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=128,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=16,
        num_experts_per_tok=8,
        n_shared_experts=1,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=1,
        index_n_heads=64,
        index_head_dim=128,
        index_topk=2048,
        max_position_embeddings=163840,
        rope=_YARN,
    ),
}


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator, cfg: ModelConfig) -> torch.Tensor:
    """Weights that keep activations O(1): linears ~ N(0, 1/fan_in), norms ~ 1 ± 0.1."""
    if name.endswith("e_score_correction_bias"):
        return torch.randn(shape, generator=gen) * 0.05
    if "norm" in name.rsplit(".", 2)[-2] or name.endswith("k_norm.bias"):
        if name.endswith(".bias"):
            return torch.randn(shape, generator=gen) * 0.05
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(shape, generator=gen)
    fan_in = shape[-1]
    std = fan_in**-0.5
    if name.endswith(("lm_head.weight", "shared_head.head.weight")):
        std *= 4.0  # a peakier next-token distribution than uniform, so greedy text is not noise
    return torch.randn(shape, generator=gen) * std


def make_checkpoint(
    preset: str | ModelConfig,
    out: str | Path,
    *,
    fp8: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = 2 << 30,
    mtp: bool = True,
) -> Path:
    """Write a random-weight checkpoint directory; returns its path."""
    cfg = PRESETS[preset] if isinstance(preset, str) else preset
    if fp8:
        cfg = replace(cfg, weight_block_size=(128, 128))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = hf_tensor_shapes(cfg, mtp=mtp)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_size, shard_idx, shard_names = 0, 0, []
    copies: dict[str, torch.Tensor] = {}

    def flush() -> None:
        nonlocal shard, shard_size, shard_idx
        if not shard:
            return
        shard_idx += 1
        fname = f"model-{shard_idx:05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        shard_names.append(fname)
        for k in shard:
            weight_map[k] = fname
        shard, shard_size = {}, 0

    mtp_layer = cfg.mtp_layer_index
    for name, shape in shapes.items():
        if layer_of(name) == mtp_layer and name.endswith("embed_tokens.weight"):
            t = copies["model.embed_tokens.weight"].clone()
        elif layer_of(name) == mtp_layer and name.endswith("shared_head.head.weight"):
            t = copies["lm_head.weight"].clone()
        else:
            t = _random_tensor(name, shape, gen, cfg)
        if name in ("model.embed_tokens.weight", "lm_head.weight") and mtp:
            copies[name] = t.to(dtype)
        tensors = {name: t.float() if name.endswith("e_score_correction_bias") else t.to(dtype)}
        if fp8 and fp8_quantised(name):
            q, s = quantize_weight(t, cfg.weight_block_size or (128, 128))
            tensors = {name: q, name + "_scale_inv": s}
        for k, v in tensors.items():
            shard[k] = v.contiguous()
            shard_size += v.numel() * v.element_size()
        if shard_size >= shard_bytes:
            flush()
    flush()
    # Rename shards to the HF "-of-" convention now that their count is known.
    final_map: dict[str, str] = {}
    for i, fname in enumerate(shard_names, 1):
        new = f"model-{i:05d}-of-{len(shard_names):05d}.safetensors"
        (out / fname).rename(out / new)
        for k, home in weight_map.items():
            if home == fname:
                final_map[k] = new
    total = sum((out / f).stat().st_size for f in set(final_map.values()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(final_map.items()))}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": cfg.bos_token_id,
                "eos_token_id": cfg.eos_token_id,
                "do_sample": True,
                "temperature": 1.0,
                "top_p": 0.95,
            },
            indent=2,
        )
    )
    _write_tokenizer(cfg, out)
    log.info(
        "wrote %s checkpoint to %s (%d shards, %.2f GB%s)",
        preset if isinstance(preset, str) else "custom",
        out,
        len(shard_names),
        total / 1e9,
        ", fp8" if fp8 else "",
    )
    return out


def _write_tokenizer(cfg: ModelConfig, out: Path) -> None:
    from .tokenizer import make_tokenizer

    tok = make_tokenizer(cfg.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "bos_token": "<｜begin▁of▁sentence｜>",
                "eos_token": "<｜end▁of▁sentence｜>",
                "model_max_length": cfg.max_position_embeddings,
                "tokenizer_class": "PreTrainedTokenizerFast",
            },
            indent=2,
        )
    )
