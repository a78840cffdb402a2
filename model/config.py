"""Model configuration: the DeepSeek-V3.2 hyper-parameters, parsed from a Hugging Face config.json.

Both spellings of the RoPE block are accepted: the hub's `rope_scaling` (with `type`) and
transformers 5's `rope_parameters` (with `rope_type`). Derived values are properties.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json that cannot describe a DeepSeek-V3.2 network."""


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """RoPE parameters. `rope_type` is "default" or "yarn" (the only kinds DeepSeek-V3.2 uses)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "yarn"):
            raise ConfigError(f"rope type {self.rope_type!r} is not supported (allowed: 'default', 'yarn')")
        if self.theta <= 0:
            raise ConfigError(f"rope theta must be > 0, got {self.theta}")
        if self.rope_type == "yarn" and self.factor <= 0:
            raise ConfigError(f"yarn factor must be > 0, got {self.factor}")

    @staticmethod
    def _mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    @property
    def cos_sin_scale(self) -> float:
        """Factor applied to cos/sin (transformers' `attention_factor`); 1.0 for DeepSeek's values."""
        if self.rope_type == "default":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return self._mscale(self.factor, self.mscale) / self._mscale(self.factor, self.mscale_all_dim)
        return self._mscale(self.factor)

    @property
    def softmax_mscale_sq(self) -> float:
        """Multiplier of the MLA softmax scale: mscale(factor, mscale_all_dim)^2 under YaRN."""
        if self.rope_type == "default" or not self.mscale_all_dim:
            return 1.0
        m = self._mscale(self.factor, self.mscale_all_dim)
        return m * m


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """DeepSeek-V3.2 hyper-parameters (names as in the HF config.json)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    indexer_rope_interleave: bool = False
    num_nextn_predict_layers: int = 1
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 163840
    bos_token_id: int = 0
    eos_token_id: int = 1
    tie_word_embeddings: bool = False
    rope: RopeConfig = field(default_factory=RopeConfig)
    # FP8 block quantisation of the checkpoint's linear weights ([128, 128]), or None.
    weight_block_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "index_n_heads",
            "index_head_dim",
            "index_topk",
            "intermediate_size",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ConfigError(
                f"index_head_dim ({self.index_head_dim}) must be >= qk_rope_head_dim ({self.qk_rope_head_dim})"
            )
        if self.has_moe:
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
                )
            if not 1 <= self.topk_group <= self.n_group:
                raise ConfigError(f"topk_group must be in [1, n_group={self.n_group}], got {self.topk_group}")
            if self.n_routed_experts // self.n_group < 2:
                raise ConfigError("each expert group needs >= 2 experts (group score = sum of its top-2)")
            if not 1 <= self.num_experts_per_tok <= self.n_routed_experts // self.n_group * self.topk_group:
                raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) must fit in the kept groups")
        if self.num_nextn_predict_layers not in (0, 1):
            raise ConfigError(f"num_nextn_predict_layers must be 0 or 1, got {self.num_nextn_predict_layers}")

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_moe(self) -> bool:
        return self.num_hidden_layers > self.first_k_dense_replace and self.n_routed_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * self.rope.softmax_mscale_sq

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer for MLA: normalised latent + rotated k_rope."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def mtp_layer_index(self) -> int:
        return self.num_hidden_layers

    # ---- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        mt = d.get("model_type")
        if mt not in (None, "deepseek_v32", "deepseek_v3"):
            raise ConfigError(f"model_type {mt!r} is not supported (expected 'deepseek_v32')")
        rp = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
        theta = rp.get("rope_theta", d.get("rope_theta", 10000.0))
        rope = RopeConfig(
            rope_type=rope_type,
            theta=float(theta),
            factor=float(rp.get("factor") or 1.0),
            original_max_position_embeddings=int(
                rp.get("original_max_position_embeddings") or d.get("max_position_embeddings", 4096)
            ),
            beta_fast=float(rp.get("beta_fast") or 32),
            beta_slow=float(rp.get("beta_slow") or 1),
            mscale=rp.get("mscale"),
            mscale_all_dim=rp.get("mscale_all_dim"),
            attention_factor=rp.get("attention_factor"),
            truncate=bool(rp.get("truncate", True)),
        )
        if rope_type == "yarn" and rp.get("factor") is None:
            object.__setattr__(
                rope, "factor", d.get("max_position_embeddings", 4096) / rope.original_max_position_embeddings
            )
        names = {f.name for f in fields(cls)} - {"rope", "weight_block_size", "eos_token_id"}
        kwargs: dict[str, Any] = {k: d[k] for k in names if k in d and d[k] is not None}
        if "n_routed_experts" not in d and "num_experts" in d:
            kwargs["n_routed_experts"] = d["num_experts"]
        eos = d.get("eos_token_id", 1)
        kwargs["eos_token_id"] = int(eos[0] if isinstance(eos, list) else eos)
        mlp_types = d.get("mlp_layer_types")
        if mlp_types is not None and "first_k_dense_replace" not in d:
            kwargs["first_k_dense_replace"] = sum(1 for t in mlp_types if t == "dense")
        q = d.get("quantization_config")
        wbs = None
        if q:
            if q.get("quant_method") != "fp8":
                raise ConfigError(
                    f"quantization_config.quant_method {q.get('quant_method')!r} is not supported (allowed: 'fp8')"
                )
            wbs = tuple(q.get("weight_block_size", (128, 128)))
        try:
            return cls(rope=rope, weight_block_size=wbs, **kwargs)
        except TypeError as e:  # wrong value types from JSON
            raise ConfigError(f"bad config.json: {e}") from e

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        d = asdict(self)
        rope = d.pop("rope")
        wbs = d.pop("weight_block_size")
        d.pop("indexer_rope_interleave")
        out: dict[str, Any] = {
            "architectures": ["DeepseekV32ForCausalLM"],
            "model_type": "deepseek_v32",
            "num_key_value_heads": self.num_attention_heads,
            "hidden_act": "silu",
            "attention_bias": False,
            "torch_dtype": "bfloat16",
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            **d,
        }
        if self.indexer_rope_interleave:
            out["indexer_rope_interleave"] = True
        out["rope_theta"] = rope["theta"]
        if rope["rope_type"] == "yarn":
            out["rope_scaling"] = {
                "type": "yarn",
                "factor": rope["factor"],
                "original_max_position_embeddings": rope["original_max_position_embeddings"],
                "beta_fast": rope["beta_fast"],
                "beta_slow": rope["beta_slow"],
                "mscale": rope["mscale"],
                "mscale_all_dim": rope["mscale_all_dim"],
            }
        if wbs is not None:
            out["quantization_config"] = {
                "quant_method": "fp8",
                "fmt": "e4m3",
                "activation_scheme": "dynamic",
                "scale_fmt": "ue8m0",
                "weight_block_size": list(wbs),
            }
        return out

    def short_hash(self) -> str:
        """A stable digest of the shapes that decide the cache layout and the network."""
        import hashlib

        return hashlib.sha256(json.dumps(self.to_hf_dict(), sort_keys=True).encode()).hexdigest()[:16]
