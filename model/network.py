"""The DeepSeek-V3.2 network: embedding, decoder layers (MLA + indexer, dense MLP or MoE), final
norm, LM head, and the MTP module (checkpoint layer index num_hidden_layers).

Module names follow the Hugging Face checkpoint (`model.layers.{i}.self_attn.q_a_proj`, ...), except
the stacked routed experts (see moe.py). The MTP layer is `model.layers.{num_hidden_layers}` and
caches like any layer, under that layer index.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLA
from .batch import DenseStore, ForwardBatch
from .checkpoint_format import fp8_quantised
from .config import ModelConfig
from .fp8 import FP8_DTYPE
from .linear import FP8Linear, fp8_module_names
from .moe import MLP, MoE
from .norm import RMSNorm
from .parallel import ParallelState
from .rope import RotaryTable

log = logging.getLogger(__name__)


@functools.cache
def _mm_fp32_out() -> bool:
    """Whether this torch has mm's fp32 out_dtype for bf16 operands (the aten::mm.dtype overload, CUDA only):
    a schema lookup, no device work (it may first be asked inside a CUDA-graph capture)."""
    return "dtype" in torch.ops.aten.mm.overloads()


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, layer: int, indexer_fp8: bool = False, parallel: ParallelState | None = None
    ) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer, indexer_fp8, parallel)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module = (
            MoE(cfg, parallel) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size, parallel)
        )

    def forward(
        self,
        x: torch.Tensor,
        batch: ForwardBatch,
        cos: torch.Tensor,
        sin: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream comes in as x + residual (x alone when residual is None) and leaves the same way,
        as (the MLP's output, the stream before it): each add is fused into the RMSNorm that follows it (this
        layer's two, the next layer's input norm or the final norm), so no add runs on its own."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_and_norm(self.self_attn(h, batch, cos, sin), residual)
        return self.mlp(h), residual


class SharedHead(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """One multi-token-prediction step: h' = block(eh_proj([enorm(emb(t+1)) ‖ hnorm(h_t)])).

    The checkpoint's copies of embed_tokens and shared_head.head are not kept: the main model's
    embedding and LM head are used (the copies are the same tensors in DeepSeek's release).
    Tensor parallel like any decoder layer; eh_proj is replicated.
    """

    def __init__(self, cfg: ModelConfig, indexer_fp8: bool = False, parallel: ParallelState | None = None) -> None:
        super().__init__(cfg, cfg.mtp_layer_index, indexer_fp8, parallel)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)


class VocabEmbedding(nn.Module):
    """The token embedding, vocab-parallel over the ranks: rank r holds rows [r * V/N, (r + 1) * V/N);
    a token's row comes from the rank that holds it, the others add zeros (one all-reduce). At world
    size 1 a plain lookup. (Replicated it would cost V x hidden per GPU: 1.85 GB at DeepSeek-V3.2's
    size in bf16, against 0.23 GB over 8 ranks, for one all-reduce of [tokens, hidden] per forward.)"""

    def __init__(self, vocab: int, hidden: int, parallel: ParallelState) -> None:
        super().__init__()
        self.parallel = parallel
        self.start = parallel.my_range(vocab, "vocab_size")[0]
        self.weight = nn.Parameter(torch.empty(parallel.split(vocab, "vocab_size"), hidden))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.parallel.distributed:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        other = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(other, 0), self.weight).masked_fill(other[:, None], 0.0)
        return self.parallel.all_reduce(out)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, with_mtp: bool, indexer_fp8: bool, parallel: ParallelState) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, parallel)
        layers: list[nn.Module] = [DecoderLayer(cfg, i, indexer_fp8, parallel) for i in range(cfg.num_hidden_layers)]
        if with_mtp:
            layers.append(MTPLayer(cfg, indexer_fp8, parallel))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV32(nn.Module):
    """The network. Use `splitserve.model.load()` to build one from a checkpoint.

    With `parallel` of world size N this is one rank's shard (model/parallel.py): MLA heads, the MLP's
    and experts' intermediate dimension (or whole experts, expert_parallel) and the LM head's vocabulary
    split N ways, the embedding's too (vocab-parallel); norms, the latent path, the indexer, the router and
    eh_proj replicated.
    Every rank must run the same forwards in the same order (their collectives pair up); their outputs
    (hidden states, logits) are the same on every rank."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        with_mtp: bool = True,
        indexer_fp8: bool = False,
        parallel: ParallelState | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.indexer_fp8 = indexer_fp8
        self.parallel = parallel or ParallelState.single()
        self.model = Backbone(cfg, with_mtp, indexer_fp8, self.parallel)
        # vocab-parallel: rank r holds rows [r * V/N, (r + 1) * V/N); logits() all-gathers them
        self.lm_head = nn.Linear(cfg.hidden_size, self.parallel.split(cfg.vocab_size, "vocab_size"), bias=False)
        self.rotary = RotaryTable(cfg.rope, cfg.qk_rope_head_dim, "cpu")

    @property
    def has_mtp(self) -> bool:
        return len(self.model.layers) > self.cfg.num_hidden_layers

    @property
    def mtp(self) -> MTPLayer:
        if not self.has_mtp:
            raise RuntimeError("this checkpoint has no MTP weights: speculative decoding is unavailable")
        return self.model.layers[self.cfg.num_hidden_layers]  # type: ignore[return-value]

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def fuse_weights(self) -> None:
        """Concatenate the weights that read the same input (MLA's input projections, each MLP's gate
        and up) so that each group is one GEMM. In place, no extra memory, idempotent; parameter names
        and shapes are unchanged (the originals become views)."""
        for m in self.modules():
            fuse = getattr(m, "fuse_weights", None)
            if m is not self and fuse is not None:
                fuse()

    @torch.no_grad()
    def to_fp8(self, modules: set[str] | None = None, quantize: bool = False) -> None:
        """Hold linear weights in e4m3 with 128x128 block scales: `modules` (paths, as
        linear.fp8_module_names gives them) or, by default, every linear DeepSeek's FP8 release
        quantises (checkpoint_format.fp8_quantised; kv_b_proj stays in the compute dtype).
        quantize=True quantises the current weights (benchmarks, tests); otherwise the FP8 tensors are
        left empty for the loader. Call before fuse_weights()."""
        if modules is None:
            modules = fp8_module_names({n for n, _ in self.named_parameters() if fp8_quantised(n)})
            modules |= {n[: -len(".w13")] for n, _ in self.named_parameters() if n.endswith(".mlp.w13")}
        for path in sorted(modules):
            mod = self.get_submodule(path)
            if isinstance(mod, MoE):
                mod.to_fp8(quantize)
            elif isinstance(mod, nn.Linear):
                parent, _, attr = path.rpartition(".")
                setattr(self.get_submodule(parent), attr, FP8Linear.from_linear(mod, quantize))
            elif not isinstance(mod, FP8Linear):
                raise TypeError(f"{path}: {type(mod).__name__} cannot hold FP8 weights")

    def weight_bytes(self) -> dict[str, int]:
        """Memory held by the weights: total, of it e4m3 values, their fp32 block scales, the rest
        (embedding, norms, LM head, router, whatever stays bf16/fp32)."""
        fp8 = scales = other = 0
        for name, t in list(self.named_parameters()) + list(self.named_buffers()):
            b = t.numel() * t.element_size()
            if t.dtype == FP8_DTYPE:
                fp8 += b
            elif name.endswith("scale_inv"):
                scales += b
            else:
                other += b
        return {"total": fp8 + scales + other, "fp8": fp8, "scales": scales, "other": other}

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rotary.inv_freq.device != positions.device:
            self.rotary.inv_freq = self.rotary.inv_freq.to(positions.device)
        return self.rotary.cos_sin(positions, self.dtype)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the main layers over the batch's new tokens, writing their cache entries.

        Returns the final hidden states [N, hidden] after the final RMSNorm (what the LM head and
        the MTP module take).
        """
        cos, sin = self._cos_sin(batch.positions)
        x = self.model.embed_tokens(batch.input_ids)
        residual = None
        for layer in self.model.layers[: self.cfg.num_hidden_layers]:
            x, residual = layer(x, batch, cos, sin, residual)
        return self.model.norm(x) if residual is None else self.model.norm.add_and_norm(x, residual)[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] (normed) -> logits [N, vocab] fp32 (every rank's vocabulary slice).

        bf16 on CUDA: one GEMM that writes fp32 (torch.mm's out_dtype; its fp32 accumulator unrounded) instead
        of a bf16 GEMM and a conversion of the whole [N, vocab] (~100 us at 256 rows on an H100)."""
        head = self.lm_head.weight
        if hidden.is_cuda and hidden.dtype == head.dtype == torch.bfloat16 and hidden.dim() == 2 and _mm_fp32_out():
            return self.parallel.all_gather_last(torch.mm(hidden, head.t(), out_dtype=torch.float32))
        return self.parallel.all_gather_last(self.lm_head(hidden).float())

    @torch.inference_mode()
    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """One MTP step. hidden [N, hidden]: state at position p (main model's normed output, or the
        MTP's own output when drafting recursively); next_ids [N]: the token at p + 1; batch carries
        positions p and the MTP layer's cache. Returns the MTP hidden [N, hidden] after
        shared_head.norm; `logits()` of it predicts the token at p + 2."""
        mtp = self.mtp
        cos, sin = self._cos_sin(batch.positions)
        e = mtp.enorm(self.model.embed_tokens(next_ids))
        x = mtp.eh_proj(torch.cat([e, mtp.hnorm(hidden)], dim=-1))
        x, residual = mtp(x, batch, cos, sin)
        return mtp.shared_head.norm.add_and_norm(x, residual)[0]

    @torch.inference_mode()
    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Cache-free full-sequence forward: input_ids [S] -> next-token logits [S, vocab] fp32."""
        ids = input_ids.to(self.device).long()
        return self.logits(self.forward(ForwardBatch.single(ids, DenseStore())))
