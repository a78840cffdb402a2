"""The memory plan of a cluster: what one GPU of each pool's workers holds, and whether it fits.

`plan_cluster(cfg)` answers, per pool, from the checkpoint's config.json alone (no weights needed):

    weights      the bytes one GPU holds AS LOADED: FP8 e4m3 + fp32 128x128 block scales for the linears
                 the checkpoint quantises (checkpoint_format.fp8_quantised) when model.fp8_weights resolves
                 to FP8 (model/loader.py's rule), kv_b_proj dequantised to the compute dtype (MLA's absorbed
                 form), everything else in the compute dtype (the router's weight and correction bias and the
                 indexer's weights_proj in fp32, as the loader keeps them); plus the zero rows FusedLinear pads FP8
                 parts with (model/linear.py). Split by tensor_parallel_size: attention heads (q_b, kv_b,
                 o), dense MLP and shared experts, embedding and LM head (vocab-parallel); the routed experts
                 split across ranks with expert_parallel, else each expert tensor-parallel (the same bytes per
                 GPU either way when the widths divide). Replicated on every GPU: the MLA latent projections
                 (q_a, kv_a), the indexer, norms, the router and the MTP layer's eh_proj. The MTP layer is
                 counted when the config has num_nextn_predict_layers (its embedding and head are the main
                 model's: not held twice).
    cache        engine/cache.py's own block bytes (latent + indexer pools, FP8 or not, MTP layer included),
                 the same on every rank of a worker; num_blocks, or cache_memory_fraction of the memory the
                 engine finds free after the weights (engine.Engine._size_cache), plus the scratch block and
                 a prefill worker's staging area (deploy/worker_actor.staging_blocks_for).
    activations  an ESTIMATE of one forward step's working set at max_batch_tokens (see `activation_bytes`),
                 plus a fixed CUDA-graph pool, and the CUDA context/NCCL buffers that are taken before the
                 cache is sized.

"fits": weights + cache + activations <= the GPU's memory (the pool's gpu_memory_gb, else the memory of the
CUDA device this process sees) and the cache holds at least one request of max_model_len tokens. On cpu the
plan is for information: it never refuses. Memory is in GiB (2**30 bytes) throughout.

`splitserve plan CONFIG [--json]` prints it; `splitserve up` refuses (on cuda) a layout that does not fit
with the same numbers (`check_fits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from splitserve.deploy.config import ClusterConfig, PoolConfig
from splitserve.model.checkpoint_format import Shape, fp8_quantised, hf_tensor_shapes, layer_of
from splitserve.model.config import ModelConfig

GIB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_FP8_BLOCK = 128  # the FP8 kernels' (and so the loader's) weight block, model/linear.py
#: Memory the CUDA context, cuBLAS workspaces and NCCL buffers hold on a GPU before the cache is sized.
CUDA_CONTEXT_BYTES = GIB
#: The CUDA-graph pool of the decode (and MTP) step graphs, captured after the cache is sized.
GRAPH_POOL_BYTES = GIB
#: Values of `hidden` width per token alive at once in a step (residual, normed input, attention and MLP
#: outputs, the all-reduce buffer), in the compute dtype.
HIDDEN_COPIES = 4

Split = Literal["replicated", "rows", "cols", "expert_rows", "expert_cols"]


class PlanError(ValueError):
    """A layout the model cannot be split into (names the pool field), or a model config that cannot be read."""


# --------------------------------------------------------------------------------------------
# Weights: one table of the checkpoint's tensors, read two ways (as stored, as loaded per GPU)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    shape: Shape  # the checkpoint's (whole) shape
    split: Split  # how tensor parallelism cuts it
    fp8: bool  # stored as e4m3 + weight_scale_inv in an FP8 checkpoint
    mtp_copy: bool  # the MTP layer's copy of the embedding / LM head: stored, never loaded


def _split_of(name: str) -> Split:
    if ".mlp.experts." in name:
        return "expert_cols" if name.endswith("down_proj.weight") else "expert_rows"
    if name.endswith(("embed_tokens.weight", "lm_head.weight", "shared_head.head.weight")):
        return "rows"  # vocab-parallel
    if name.endswith(("self_attn.q_b_proj.weight", "self_attn.kv_b_proj.weight")):
        return "rows"  # heads
    if name.endswith("self_attn.o_proj.weight"):
        return "cols"  # heads
    if ".mlp." in name and name.endswith(("gate_proj.weight", "up_proj.weight")):
        return "rows"  # dense MLP, shared experts
    if ".mlp." in name and name.endswith("down_proj.weight"):
        return "cols"
    return "replicated"  # q_a, kv_a, the indexer, norms, the router, eh_proj


def tensor_table(cfg: ModelConfig, mtp: bool = True) -> list[TensorEntry]:
    """Every tensor of the checkpoint (without scales), with its split and FP8-ness."""
    fp8 = cfg.weight_block_size is not None
    n = cfg.mtp_layer_index
    out = []
    for name, shape in hf_tensor_shapes(cfg, mtp=mtp).items():
        copy = layer_of(name) == n and name.endswith((".embed_tokens.weight", ".shared_head.head.weight"))
        out.append(TensorEntry(name, shape, _split_of(name), fp8 and fp8_quantised(name), copy))
    return out


def _fp8_bytes(shape: Shape, block: tuple[int, int]) -> int:
    return math.prod(shape) + 4 * math.ceil(shape[0] / block[0]) * math.ceil(shape[1] / block[1])


def checkpoint_bytes(cfg: ModelConfig, mtp: bool = True, dtype_bytes: int = 2) -> int:
    """Tensor bytes of the checkpoint's safetensors files (bf16, the router's correction bias fp32,
    FP8 linears as e4m3 + fp32 scales per weight_block_size)."""
    total = 0
    for t in tensor_table(cfg, mtp):
        if t.fp8:
            assert cfg.weight_block_size is not None
            total += _fp8_bytes(t.shape, cfg.weight_block_size)
        else:
            total += math.prod(t.shape) * (4 if t.name.endswith("e_score_correction_bias") else dtype_bytes)
    return total


@dataclass(frozen=True, slots=True)
class WeightPlan:
    """Bytes of weights one GPU holds, by kind."""

    replicated: int  # on every GPU whole
    split: int  # this GPU's share of the tensor-parallel tensors
    experts: int  # this GPU's share of the routed experts
    padding: int  # zero rows FusedLinear adds to FP8 parts
    fp8: bool  # the quantised linears stay e4m3

    @property
    def total(self) -> int:
        return self.replicated + self.split + self.experts + self.padding


def resolve_fp8(cfg: ModelConfig, fp8_weights: bool | None, device: str) -> bool:
    """Whether the loader keeps an FP8 checkpoint's linears in e4m3 (model/loader.py's rule)."""
    if cfg.weight_block_size is None:
        return False
    keep = device == "cuda" if fp8_weights is None else fp8_weights
    return keep and tuple(cfg.weight_block_size) == (_FP8_BLOCK, _FP8_BLOCK)


def split_problems(cfg: ModelConfig, tp: int, ep: bool) -> list[str]:
    """What does not divide by tensor_parallel_size (empty: the model splits)."""
    if tp == 1:
        return []
    need = {
        "num_attention_heads": cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "intermediate_size": cfg.intermediate_size,
    }
    if cfg.has_moe:
        need["moe_intermediate_size x n_shared_experts"] = cfg.moe_intermediate_size * cfg.n_shared_experts
        if ep:
            need["n_routed_experts"] = cfg.n_routed_experts
        else:
            need["moe_intermediate_size"] = cfg.moe_intermediate_size
    return [f"{what} ({n}) is not a multiple of {tp}" for what, n in need.items() if n % tp]


def weight_plan(cfg: ModelConfig, *, tp: int, ep: bool, fp8: bool, dtype_bytes: int, mtp: bool = True) -> WeightPlan:
    """The weights one GPU holds, as loaded (see the module docstring). Exact when the splits divide."""
    rep = split = experts = ep_experts = pad = 0
    for t in tensor_table(cfg, mtp):
        if t.mtp_copy:
            continue
        r, c = t.shape if len(t.shape) == 2 else (t.shape[0], 1)
        expert = t.split.startswith("expert")
        if not (expert and ep):  # expert parallel keeps each expert whole (E / tp of them per rank)
            if t.split in ("rows", "expert_rows"):
                r //= tp
            elif t.split in ("cols", "expert_cols"):
                c //= tp
        keep_fp8 = fp8 and t.fp8 and not t.name.endswith("kv_b_proj.weight")
        if keep_fp8:
            b = _fp8_bytes((r, c), (_FP8_BLOCK, _FP8_BLOCK))
        elif t.name.endswith(("e_score_correction_bias", "mlp.gate.weight", "indexer.weights_proj.weight")):
            b = r * c * 4
        else:
            b = r * c * dtype_bytes
        if t.split == "replicated":
            rep += b
        elif expert and ep:
            ep_experts += b
        elif expert:
            experts += b
        else:
            split += b
        if keep_fp8 and t.split == "rows" and t.name.endswith("gate_proj.weight"):
            pad += (-r % _FP8_BLOCK) * c  # gate ‖ up: gate padded to whole blocks
    if fp8 and cfg.weight_block_size is not None:
        layers = cfg.num_hidden_layers + (1 if mtp and cfg.num_nextn_predict_layers else 0)
        rows = -cfg.q_lora_rank % _FP8_BLOCK + -cfg.latent_dim % _FP8_BLOCK  # q_a ‖ kv_a ‖ wk
        pad += layers * rows * cfg.hidden_size
    return WeightPlan(rep, split, experts + ep_experts // tp, pad, fp8)


# --------------------------------------------------------------------------------------------
# Activations (an estimate)
# --------------------------------------------------------------------------------------------


def activation_bytes(
    cfg: ModelConfig,
    pool: PoolConfig,
    *,
    rows: int,
    max_model_len: int,
    dtype_bytes: int,
    mtp_draft_tokens: int,
    cuda: bool,
) -> dict[str, int]:
    """An estimate of one step's working set on one GPU. T = max_batch_tokens, R = `rows` (the query rows
    one step can hold: T for a prefill worker, min(T, max(running x (1 + drafts), chunk)) for decode),
    heads and widths per rank:

        hidden        T x hidden x HIDDEN_COPIES                          (dtype)
        attention     T x (q_lora + latent + heads x (qk_head + v_head + kv_lora))  (dtype: q, kv, absorbed q, out)
        indexer       T x index_heads x index_head_dim                    (fp32 queries)
        index_scores  R x max_model_len + R x index_topk                  (fp32 scores of every row over a
                      full-length context, as kernels/indexer.py's logits are; int32 top-k ids)
        moe           T x experts_per_tok x (hidden + 2 x moe_inter / tp) (dtype: dispatched tokens, and the
                      expert MLP's rows at an even load; the same with expert_parallel)
        logits        L x vocab / tp (+ L x vocab gathered when tp > 1)   (fp32; L = min(T, running x (1 + drafts)))
        graphs        GRAPH_POOL_BYTES on cuda
    """
    tp = pool.tensor_parallel_size
    t = pool.max_batch_tokens
    heads = cfg.num_attention_heads // tp
    logit_rows = min(t, pool.max_running_requests * (1 + mtp_draft_tokens))
    out = {
        "hidden": t * cfg.hidden_size * HIDDEN_COPIES * dtype_bytes,
        "attention": t
        * (cfg.q_lora_rank + cfg.latent_dim + heads * (cfg.qk_head_dim + cfg.v_head_dim + cfg.kv_lora_rank))
        * dtype_bytes,
        "indexer": t * cfg.index_n_heads * cfg.index_head_dim * 4,
        "index_scores": rows * max_model_len * 4 + rows * cfg.index_topk * 4,
        "moe": t * cfg.num_experts_per_tok * (cfg.hidden_size + 2 * cfg.moe_intermediate_size // tp) * dtype_bytes,
        "logits": logit_rows * (cfg.vocab_size // tp) * 4 + (logit_rows * cfg.vocab_size * 4 if tp > 1 else 0),
        "graphs": GRAPH_POOL_BYTES if cuda else 0,
    }
    if not cfg.has_moe:
        out["moe"] = t * 2 * (cfg.intermediate_size // tp) * dtype_bytes
    return out


# --------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolPlan:
    pool: str
    tensor_parallel_size: int
    expert_parallel: bool
    gpus: float  # GPUs one worker holds (0 on cpu: tensor_parallel_size processes)
    weights: WeightPlan
    cache_layers: int
    cache_bytes_per_token: int
    block_bytes: int
    num_blocks: int  # blocks handed out (0: none fit)
    extra_blocks: int  # the scratch block + a prefill worker's staging area
    block_size: int
    activations: dict[str, int]
    context_bytes: int  # CUDA context / NCCL, taken before the cache is sized
    gpu_memory_bytes: int | None
    memory_source: str  # "gpu_memory_gb", "detected <device name>", or "none"
    max_model_len: int
    cpu: bool
    max_cache_memory_fraction: float | None = None  # cache sized by fraction: the largest that fits
    problems: list[str] = field(default_factory=list)  # why it does not fit (empty: it fits)

    @property
    def cache_bytes(self) -> int:
        return (self.num_blocks + self.extra_blocks) * self.block_bytes if self.num_blocks else 0

    @property
    def cache_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def activation_total(self) -> int:
        return sum(self.activations.values()) + self.context_bytes

    @property
    def total_bytes(self) -> int:
        return self.weights.total + self.cache_bytes + self.activation_total

    @property
    def fits(self) -> bool | None:
        """None: nothing to check against (cpu without gpu_memory_gb, or no GPU to detect)."""
        if self.gpu_memory_bytes is None:
            return None
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        gb = 1 / GIB
        return {
            "pool": self.pool,
            "tensor_parallel_size": self.tensor_parallel_size,
            "expert_parallel": self.expert_parallel,
            "gpus_per_worker": self.gpus,
            "fp8_weights": self.weights.fp8,
            "weights_gb": self.weights.total * gb,
            "weights_detail_gb": {
                "replicated": self.weights.replicated * gb,
                "tensor_parallel": self.weights.split * gb,
                "experts": self.weights.experts * gb,
                "fusion_padding": self.weights.padding * gb,
            },
            "cache_layers": self.cache_layers,
            "cache_bytes_per_token": self.cache_bytes_per_token,
            "block_size": self.block_size,
            "block_bytes": self.block_bytes,
            "num_blocks": self.num_blocks,
            "extra_blocks": self.extra_blocks,
            "cache_gb": self.cache_bytes * gb,
            "cache_tokens": self.cache_tokens,
            "max_model_len": self.max_model_len,
            "max_cache_memory_fraction": self.max_cache_memory_fraction,
            "activations_gb": self.activation_total * gb,
            "activations_detail_gb": {
                **{k: v * gb for k, v in self.activations.items()},
                "cuda_context": self.context_bytes * gb,
            },
            "total_gb": self.total_bytes * gb,
            "gpu_memory_gb": None if self.gpu_memory_bytes is None else self.gpu_memory_bytes * gb,
            "memory_source": self.memory_source,
            "fits": self.fits,
            "informational": self.cpu,
            "problems": list(self.problems),
        }


@dataclass(frozen=True)
class ClusterPlan:
    model: str
    model_cfg: ModelConfig
    dtype: str
    device: str
    pools: list[PoolPlan]

    @property
    def fits(self) -> bool:
        """False when some pool is known not to fit (a pool with nothing to check against passes)."""
        return all(p.fits is not False for p in self.pools)

    def to_json(self) -> dict[str, Any]:
        c = self.model_cfg
        return {
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "layers": c.num_hidden_layers,
            "mtp_layers": c.num_nextn_predict_layers,
            "fp8_checkpoint": c.weight_block_size is not None,
            "fits": self.fits,
            "pools": {p.pool: p.to_json() for p in self.pools},
        }


def model_config_for(cfg: ClusterConfig) -> ModelConfig:
    """The model's shapes from model.path: a preset's config, or the directory's config.json (no weights needed)."""
    from splitserve.model.checkpoint import PRESETS
    from splitserve.model.config import ConfigError as ModelConfigError
    from splitserve.model.presets import SHIPPED

    if cfg.model.path in PRESETS:  # a random-weight preset: its config, without making the checkpoint
        return PRESETS[cfg.model.path]
    path = SHIPPED.get(cfg.model.path, Path(cfg.model.path))  # a checkpoint the package ships, or a directory
    try:
        return ModelConfig.from_json(path)
    except ModelConfigError as e:
        raise PlanError(f"model.path: {e}") from None


_DETECT = (
    "import torch\n"
    "if torch.cuda.is_available():\n"
    "    p = torch.cuda.get_device_properties(0)\n"
    "    print(p.total_memory, p.name)\n"
)


def detect_gpu_memory() -> tuple[int, str] | None:
    """(total bytes, "detected <name>") of the first CUDA device this host's processes see, or None.

    Asked in a child process, so that `splitserve up` (which plans before it starts the workers) holds no
    CUDA context on a GPU the workers need."""
    import subprocess
    import sys

    try:
        out = subprocess.run(
            [sys.executable, "-c", _DETECT], capture_output=True, text=True, timeout=120, check=False
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out:
        return None
    total, _, name = out.partition(" ")
    return int(total), f"detected {name}"


def plan_pool(
    cfg: ClusterConfig,
    name: Literal["prefill", "decode"],
    model_cfg: ModelConfig,
    detected: tuple[int, str] | None,
) -> PoolPlan:
    import torch

    from splitserve.deploy.worker_actor import staging_blocks_for
    from splitserve.engine.cache import block_bytes

    pool: PoolConfig = getattr(cfg, name)
    tp, ep = pool.tensor_parallel_size, pool.expert_parallel
    bad = split_problems(model_cfg, tp, ep)
    if bad:
        raise PlanError(f"{name}.tensor_parallel_size {tp} does not split the model: " + "; ".join(bad))
    cuda = cfg.model.device == "cuda"
    dtype_bytes = _DTYPE_BYTES[cfg.model.dtype]
    fp8 = resolve_fp8(model_cfg, cfg.model.fp8_weights, cfg.model.device)
    weights = weight_plan(model_cfg, tp=tp, ep=ep, fp8=fp8, dtype_bytes=dtype_bytes)
    layers = model_cfg.num_hidden_layers + (1 if model_cfg.num_nextn_predict_layers else 0)
    per_block = block_bytes(
        model_cfg,
        layers,
        pool.block_size,
        getattr(torch, cfg.model.dtype),
        cfg.model.indexer_fp8,
        cfg.model.latent_fp8,
    )
    per_token = block_bytes(
        model_cfg, layers, 1, getattr(torch, cfg.model.dtype), cfg.model.indexer_fp8, cfg.model.latent_fp8
    )
    max_len = cfg.model.max_model_len or model_cfg.max_position_embeddings
    k = cfg.decode.mtp_draft_tokens
    if name == "prefill":
        rows = pool.max_batch_tokens
    else:
        rows = min(pool.max_batch_tokens, max(pool.max_running_requests * (1 + k), cfg.decode.effective_chunk_size))
    acts = activation_bytes(
        model_cfg,
        pool,
        rows=rows,
        max_model_len=max_len,
        dtype_bytes=dtype_bytes,
        mtp_draft_tokens=k,
        cuda=cuda,
    )
    context = CUDA_CONTEXT_BYTES if cuda else 0
    if pool.gpu_memory_gb is not None:
        memory: int | None = int(pool.gpu_memory_gb * GIB)
        source = "gpu_memory_gb"
    elif cuda and detected is not None:
        memory, source = detected
    else:
        memory, source = None, "none"
    problems: list[str] = []
    if pool.num_blocks is not None:
        num_blocks = pool.num_blocks
    elif memory is None:
        num_blocks = 0  # sized from free memory: nothing to size against
        problems.append("cache_memory_fraction needs the GPU's memory: set gpu_memory_gb or run on the GPU host")
    else:
        free = memory - context - weights.total
        num_blocks = max(0, int(max(free, 0) * (pool.cache_memory_fraction or 1.0)) // per_block)
    staging = 0
    if name == "prefill":
        staging = staging_blocks_for(
            pool.max_batch_tokens, cfg.model.max_model_len or 0, pool.block_size, pool.num_blocks
        )
    best_fraction = None  # the largest cache_memory_fraction that leaves room for the rest
    if pool.cache_memory_fraction is not None and memory is not None:
        free = memory - context - weights.total
        rest = (1 + staging) * per_block + sum(acts.values())
        best_fraction = max(0.0, (free - rest) / free) if free > 0 else 0.0
    plan = PoolPlan(
        pool=name,
        tensor_parallel_size=tp,
        expert_parallel=ep,
        gpus=pool.gpus_per_worker,
        weights=weights,
        cache_layers=layers,
        cache_bytes_per_token=per_token,
        block_bytes=per_block,
        num_blocks=num_blocks,
        extra_blocks=1 + staging,
        block_size=pool.block_size,
        activations=acts,
        context_bytes=context,
        gpu_memory_bytes=memory,
        memory_source=source,
        max_model_len=max_len,
        cpu=not cuda,
        max_cache_memory_fraction=best_fraction,
    )
    if memory is not None:
        gib = 1 / GIB
        if weights.total + context > memory:
            problems.append(
                f"the weights alone ({weights.total * gib:.2f} GiB per GPU at tensor_parallel_size {tp}) "
                f"exceed the GPU's {memory * gib:.2f} GiB"
            )
        elif plan.total_bytes > memory:
            problems.append(
                f"weights {weights.total * gib:.2f} + cache {plan.cache_bytes * gib:.2f} + activations "
                f"{plan.activation_total * gib:.2f} = {plan.total_bytes * gib:.2f} GiB exceed the GPU's "
                f"{memory * gib:.2f} GiB"
                + (
                    f"; cache_memory_fraction {pool.cache_memory_fraction} leaves too little for activations: "
                    f"at most {math.floor(best_fraction * 100) / 100:.2f} fits"
                    if best_fraction is not None
                    else "; lower num_blocks"
                )
            )
        if num_blocks * pool.block_size < max_len and not (weights.total + context > memory):
            problems.append(
                f"the cache holds {num_blocks * pool.block_size} tokens, fewer than one request of "
                f"max_model_len {max_len}"
            )
    plan.problems.extend(problems)
    return plan


def plan_cluster(
    cfg: ClusterConfig,
    *,
    model_cfg: ModelConfig | None = None,
    detect: Callable[[], tuple[int, str] | None] = detect_gpu_memory,
) -> ClusterPlan:
    """The plan of every pool that runs (the prefill pool is skipped in colocated mode).

    Raises:
        PlanError: the model's config cannot be read, or a pool's tensor_parallel_size does not split it.
    """
    mc = model_cfg or model_config_for(cfg)
    cuda = cfg.model.device == "cuda"
    need_detect = cuda and any(getattr(cfg, p).gpu_memory_gb is None for p in ("prefill", "decode"))
    detected = detect() if need_detect else None
    names: list[Literal["prefill", "decode"]] = ["decode"] if cfg.router.mode == "colocated" else ["prefill", "decode"]
    errors: list[str] = []
    pools: list[PoolPlan] = []
    for n in names:
        try:
            pools.append(plan_pool(cfg, n, mc, detected))
        except PlanError as e:
            errors.append(str(e))
    if errors:
        raise PlanError("\n".join(errors))
    return ClusterPlan(cfg.model.served_name, mc, cfg.model.dtype, cfg.model.device, pools)


def check_fits(cfg: ClusterConfig, plan: ClusterPlan | None = None) -> ClusterPlan | None:
    """What `splitserve up` runs: on cuda, raise PlanError with the plan's table when a pool does not fit.
    Returns the plan (None on cpu, where no layout is refused for memory; a tensor-parallel split the
    model does not divide is refused on every device, naming the field, before any worker starts)."""
    if cfg.model.device != "cuda":
        if max(cfg.prefill.tensor_parallel_size, cfg.decode.tensor_parallel_size) > 1:
            plan_cluster(cfg)  # raises PlanError when a pool's split does not divide the model
        return None
    plan = plan or plan_cluster(cfg)
    if not plan.fits:
        bad = [p.pool for p in plan.pools if p.fits is False]
        raise PlanError(
            f"the layout does not fit the GPUs ({', '.join(bad)}): see `splitserve plan`\n" + format_plan(plan)
        )
    return plan


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB"


def format_plan(plan: ClusterPlan) -> str:
    c = plan.model_cfg
    ckpt = f"FP8 e4m3 {list(c.weight_block_size)} blocks" if c.weight_block_size else "no FP8"
    head = (
        f"model {plan.model}: {c.num_hidden_layers} layers + {c.num_nextn_predict_layers} MTP, hidden {c.hidden_size}, "
        f"{c.n_routed_experts} experts, vocab {c.vocab_size}; checkpoint {ckpt}; dtype {plan.dtype} on {plan.device}"
    )
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, f: Callable[[PoolPlan], str]) -> None:
        rows.append((label, [f(p) for p in plan.pools]))

    def layout(p: PoolPlan) -> str:
        par = f"TP{p.tensor_parallel_size}" + (" EP" if p.expert_parallel else "")
        unit = f"{p.gpus:g} GPUs" if not p.cpu else f"{p.tensor_parallel_size} processes"
        return f"{unit} ({par})"

    row("per worker", layout)
    row("weights / GPU", lambda p: _gib(p.weights.total) + (" (FP8)" if p.weights.fp8 else ""))
    row("  replicated", lambda p: _gib(p.weights.replicated))
    row("  tensor-parallel", lambda p: _gib(p.weights.split))
    row(
        "  routed experts",
        lambda p: (
            _gib(p.weights.experts) + (" (EP)" if p.expert_parallel else " (TP)" if p.tensor_parallel_size > 1 else "")
        ),
    )
    row("cache / token", lambda p: f"{p.cache_bytes_per_token} B ({p.cache_layers} layers)")
    row("cache blocks", lambda p: f"{p.num_blocks} x {p.block_size} (+{p.extra_blocks})")
    row("cache tokens", lambda p: f"{p.cache_tokens}")
    row("cache", lambda p: _gib(p.cache_bytes))
    row("activations", lambda p: _gib(p.activation_total))
    row("total / GPU", lambda p: _gib(p.total_bytes))
    row(
        "GPU memory",
        lambda p: _gib(p.gpu_memory_bytes) + ("" if p.memory_source == "none" else f" ({p.memory_source})"),
    )

    def verdict(p: PoolPlan) -> str:
        if p.fits is None:
            return "for information (cpu)" if p.cpu else "unknown (no GPU memory)"
        return "yes" if p.fits else "NO"

    row("fits", verdict)
    width = max(len(r[0]) for r in rows) + 2
    cols = [max(len(p.pool), *(len(r[1][i]) for r in rows)) + 2 for i, p in enumerate(plan.pools)]
    lines = [head, "", " " * width + "".join(p.pool.ljust(w) for p, w in zip(plan.pools, cols))]
    lines += [label.ljust(width) + "".join(v.ljust(w) for v, w in zip(vals, cols)) for label, vals in rows]
    for p in plan.pools:
        for problem in p.problems:
            lines.append(f"{p.pool}: {problem}")
    if any(p.cpu for p in plan.pools):
        lines.append("cpu: the plan is for information; nothing is refused")
    lines.append(
        "activations: an estimate of one step at max_batch_tokens (deploy/plan.py activation_bytes) + "
        f"{_gib(GRAPH_POOL_BYTES)} graph pool + {_gib(CUDA_CONTEXT_BYTES)} CUDA context (cuda)"
    )
    return "\n".join(line.rstrip() for line in lines)


__all__ = [
    "ClusterPlan",
    "PlanError",
    "PoolPlan",
    "WeightPlan",
    "activation_bytes",
    "check_fits",
    "checkpoint_bytes",
    "format_plan",
    "plan_cluster",
    "tensor_table",
    "weight_plan",
]
