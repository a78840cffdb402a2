"""The Hugging Face checkpoint layout of DeepSeek-V3.2: every tensor's name and shape.

One table serves both the loader (what to expect, what is missing or mis-shaped) and the
checkpoint maker (what to write). Linear weights listed in `fp8_quantised()` may be stored as
float8_e4m3fn with a `<name>_scale_inv` companion (`weight` -> `weight_scale_inv`).
"""

from __future__ import annotations

import math
import re

from .config import ModelConfig

Shape = tuple[int, ...]


def _attention(cfg: ModelConfig, p: str) -> dict[str, Shape]:
    h = cfg.num_attention_heads
    return {
        f"{p}.self_attn.q_a_proj.weight": (cfg.q_lora_rank, cfg.hidden_size),
        f"{p}.self_attn.q_a_layernorm.weight": (cfg.q_lora_rank,),
        f"{p}.self_attn.q_b_proj.weight": (h * cfg.qk_head_dim, cfg.q_lora_rank),
        f"{p}.self_attn.kv_a_proj_with_mqa.weight": (cfg.latent_dim, cfg.hidden_size),
        f"{p}.self_attn.kv_a_layernorm.weight": (cfg.kv_lora_rank,),
        f"{p}.self_attn.kv_b_proj.weight": (h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        f"{p}.self_attn.o_proj.weight": (cfg.hidden_size, h * cfg.v_head_dim),
        f"{p}.self_attn.indexer.wq_b.weight": (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank),
        f"{p}.self_attn.indexer.wk.weight": (cfg.index_head_dim, cfg.hidden_size),
        f"{p}.self_attn.indexer.k_norm.weight": (cfg.index_head_dim,),
        f"{p}.self_attn.indexer.k_norm.bias": (cfg.index_head_dim,),
        f"{p}.self_attn.indexer.weights_proj.weight": (cfg.index_n_heads, cfg.hidden_size),
    }


def _ffn(cfg: ModelConfig, p: str, layer: int, fused_experts: bool) -> dict[str, Shape]:
    hid = cfg.hidden_size
    if not cfg.is_moe_layer(layer):
        i = cfg.intermediate_size
        return {
            f"{p}.mlp.gate_proj.weight": (i, hid),
            f"{p}.mlp.up_proj.weight": (i, hid),
            f"{p}.mlp.down_proj.weight": (hid, i),
        }
    i, e = cfg.moe_intermediate_size, cfg.n_routed_experts
    out: dict[str, Shape] = {f"{p}.mlp.gate.weight": (e, hid), f"{p}.mlp.gate.e_score_correction_bias": (e,)}
    if fused_experts:
        out[f"{p}.mlp.experts.gate_up_proj"] = (e, 2 * i, hid)
        out[f"{p}.mlp.experts.down_proj"] = (e, hid, i)
    else:
        for x in range(e):
            out[f"{p}.mlp.experts.{x}.gate_proj.weight"] = (i, hid)
            out[f"{p}.mlp.experts.{x}.up_proj.weight"] = (i, hid)
            out[f"{p}.mlp.experts.{x}.down_proj.weight"] = (hid, i)
    if cfg.n_shared_experts:
        si = i * cfg.n_shared_experts
        out[f"{p}.mlp.shared_experts.gate_proj.weight"] = (si, hid)
        out[f"{p}.mlp.shared_experts.up_proj.weight"] = (si, hid)
        out[f"{p}.mlp.shared_experts.down_proj.weight"] = (hid, si)
    return out


def _layer(cfg: ModelConfig, layer: int, fused_experts: bool) -> dict[str, Shape]:
    p = f"model.layers.{layer}"
    return {
        f"{p}.input_layernorm.weight": (cfg.hidden_size,),
        f"{p}.post_attention_layernorm.weight": (cfg.hidden_size,),
        **_attention(cfg, p),
        **_ffn(cfg, p, layer, fused_experts),
    }


def mtp_tensor_shapes(cfg: ModelConfig, fused_experts: bool = False) -> dict[str, Shape]:
    """Tensors of the MTP layer (model.layers.{num_hidden_layers}), its embedding/head copies included."""
    n = cfg.mtp_layer_index
    p = f"model.layers.{n}"
    hid = cfg.hidden_size
    return {
        **_layer(cfg, n, fused_experts),
        f"{p}.enorm.weight": (hid,),
        f"{p}.hnorm.weight": (hid,),
        f"{p}.eh_proj.weight": (hid, 2 * hid),
        f"{p}.shared_head.norm.weight": (hid,),
        f"{p}.embed_tokens.weight": (cfg.vocab_size, hid),
        f"{p}.shared_head.head.weight": (cfg.vocab_size, hid),
    }


def hf_tensor_shapes(cfg: ModelConfig, mtp: bool = True, fused_experts: bool = False) -> dict[str, Shape]:
    """Every tensor of a DeepSeek-V3.2 HF checkpoint (without FP8 scales), in file order."""
    out: dict[str, Shape] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for layer in range(cfg.num_hidden_layers):
        out.update(_layer(cfg, layer, fused_experts))
    out["model.norm.weight"] = (cfg.hidden_size,)
    out["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    if mtp and cfg.num_nextn_predict_layers:
        out.update(mtp_tensor_shapes(cfg, fused_experts))
    return out


_FP8_SUFFIXES = (
    "q_a_proj.weight",
    "q_b_proj.weight",
    "kv_a_proj_with_mqa.weight",
    "kv_b_proj.weight",
    "o_proj.weight",
    "indexer.wq_b.weight",
    "indexer.wk.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


def fp8_quantised(name: str) -> bool:
    """Whether DeepSeek's FP8 release stores this tensor as e4m3 + weight_scale_inv (dsv32 spec §3.1)."""
    return name.endswith(_FP8_SUFFIXES) and ".mlp.gate." not in name


def scale_shape(shape: Shape, block: tuple[int, int]) -> Shape:
    return (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))


_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None
