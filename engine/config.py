"""Engine configuration: cache size and layout, batching budgets, MTP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads where the engine runs, not where an EngineConfig is built
    import torch

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How one engine (one worker's model + cache + scheduler) runs.

    num_blocks: cache blocks (each holds block_size tokens of every layer's MLA latent and
        indexer key). block_size: tokens per block (64 as DeepSeek's kernels assume; any power of 2).
    max_batch_tokens: token budget of one step (prefill chunks + decode tokens + drafts).
    chunk_size: the most prompt tokens one request prefills in one step (chunked prefill).
    max_running: the most requests in the running batch.
    mtp_draft_tokens: k drafts per decode step from the MTP layer (0 = speculative decoding off).
    mtp_relaxed_topk, mtp_relaxed_delta: relaxed acceptance of greedy drafts inside <think>...</think>
        (engine/spec_step.py RelaxedAcceptance): a draft among the target's top mtp_relaxed_topk tokens
        and within mtp_relaxed_delta of the best log-probability is accepted. 0: off (exact acceptance).
        Applies to greedy requests without penalties; needs think_token_ids (the Engine refuses it
        without them).
    think_token_ids: the ids of <think> and </think> (a worker reads them from its tokenizer).
    prefix_cache: share full blocks between requests with the same token prefix.
    indexer_fp8: run the lightning indexer on its FP8 path, its key cache in e4m3 + per-token scale.
    latent_fp8: keep the MLA latent cache in FP8 (e4m3 + one fp32 scale per 128 values, rope in bf16).
    fp8_weights: how a worker loads an FP8 checkpoint (model.load): keep its linears e4m3 + 128x128
        scales (True) or dequantise them to dtype (False); None: keep on CUDA, dequantise elsewhere.
    paged_kernels: attention reads the paged pools in place, one query row per token, through the
        indexer top-k and sparse MLA kernels (model.attention's "rows" path; the sparse MLA kernel
        reads bf16 latents or the FP8 entries of latent_fp8 directly). None: on when the cache is on
        CUDA; True on a CPU runs the kernels' PyTorch references (tests).
    cuda_graphs: replay captured CUDA graphs for decode-only steps (CUDA with paged_kernels only).
    overlap_scheduling: plan and launch decode step N+1 while the device runs step N, reading step N's
        tokens only after (engine/overlap.py); a step's outputs then come from the next step() call.
        Decode-only steps without penalties, single rank, paged kernels (with MTP: steps of the fused
        speculative step, no relaxed acceptance); other steps run synchronously. None: on when the
        cache is on CUDA (on a CPU nothing runs in parallel).
    cache_memory_fraction: (cuda) size the cache to this fraction of the GPU memory that is free once
        the weights are loaded; num_blocks is then ignored. The rest is headroom for activations and
        CUDA graphs (prefill chunks of 8k tokens at DeepSeek-V3.2 widths need a few GB).
    """

    num_blocks: int = 256
    block_size: int = 64
    max_batch_tokens: int = 2048
    chunk_size: int = 512
    max_running: int = 64
    mtp_draft_tokens: int = 0
    mtp_relaxed_topk: int = 0
    mtp_relaxed_delta: float = 0.0
    think_token_ids: tuple[int, int] | None = None
    prefix_cache: bool = True
    dtype: str = "float32"
    device: str = "cpu"
    indexer_fp8: bool = False
    latent_fp8: bool = False  # MLA latent cache in FlashMLA's FP8 token format (656 B/token/layer at full size)
    fp8_weights: bool | None = None
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    paged_kernels: bool | None = None
    cuda_graphs: bool = True
    overlap_scheduling: bool | None = None
    cache_memory_fraction: float | None = None
    staging_blocks: int = 0  # extra blocks of a prefill worker's transfer staging area (kvtransfer/staging.py)

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.chunk_size < 1 or self.max_batch_tokens < 1 or self.max_running < 1:
            raise ValueError("chunk_size, max_batch_tokens and max_running must be >= 1")
        if not 0 <= self.mtp_draft_tokens <= 8:
            raise ValueError(f"mtp_draft_tokens must be in [0, 8], got {self.mtp_draft_tokens}")
        if self.mtp_relaxed_topk < 0 or not self.mtp_relaxed_delta >= 0.0:
            raise ValueError("mtp_relaxed_topk and mtp_relaxed_delta must be >= 0")
        if self.max_batch_tokens < self.mtp_draft_tokens + 1:
            raise ValueError("max_batch_tokens must fit one decode step with its drafts")
        if self.cache_memory_fraction is not None:
            if not 0.0 < self.cache_memory_fraction <= 1.0:
                raise ValueError(f"cache_memory_fraction must be in (0, 1], got {self.cache_memory_fraction}")
            if self.device != "cuda":
                raise ValueError("cache_memory_fraction sizes a GPU cache: set num_blocks on other devices")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)
