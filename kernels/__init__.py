"""splitserve.kernels: Triton kernels for the decode worker, each beside its PyTorch reference.

Every family lives in one module with three entry points of the same signature:
`<name>_ref` (plain PyTorch, runs anywhere), `<name>_triton` (the kernel; on a CPU it runs only
under TRITON_INTERPRET=1, as the tests do), and `<name>` — the dispatcher exported here, which
picks Triton for CUDA tensors when triton is installed and the reference otherwise. The model calls
the dispatchers (model/attention.py, moe.py, norm.py), so the same code runs the kernels on a GPU and
the references on a CPU.

| function | shapes (decode) |
|---|---|
| indexer_topk_decode(q, weights, k_cache, k_scale, layer, block_tables, seq_lens, topk) | q [B, 64, 128] bf16 or e4m3, keys paged [NB, L, 64, 128] (+ fp32 scales) -> [B, topk] int32 |
| indexer_logits_decode(...) | the scores [B, W] fp32 before top-k |
| sparse_mla_decode(q_lat, q_rope, latent, layer, block_tables, indices, softmax_scale) | [B, 128, 512] + [B, 128, 64], latent paged [NB, L, 64, 576] (or uint8 656-byte FP8 entries) -> [B, 128, 512]; bf16 entries on Hopper: the warp-specialised Gluon kernel (sparse_mla_hopper.py) |
| index_query(q, w, cos, sin, interleaved, hadamard, softmax_scale, out_dtype) | wq_b / weights_proj outputs [N, 64, 128], [N, 64] -> the indexer's q (rope, Hadamard, e4m3) and weights, one launch |
| topk(logits, k) | [B, W] fp32 (-inf = not visible) -> [B, k] int32 (-1 padding); radix select: the split kernel (a [rows, chunks] grid) up to 32 rows, the stream kernel (one program a row) beyond; the reg variant measured faster but not on yet (radix_topk.REG_MAX_WIDTH says why) |
| kv_write(kv_a, k_idx, cos, sin, norms..., hadamard, latent, ikeys, iscale, layer, slots) | a layer's new latent entries + indexer keys (norms, rope, Hadamard, e4m3) into the pools, one launch |
| rms_norm(x, w, eps, residual=None) | [..., D] -> y, or (y, x + residual) |
| rope(x, cos, sin, interleaved) | [N, ..., d], cos/sin [N, d/2] |
| act_quant(x, block=128, ue8m0=True) | [..., D] -> (e4m3 [..., D], fp32 [..., D/128]) |
| fp32_linear(x, w) | bf16 [..., K] x fp32 [N, K] -> [..., N] fp32 at fp32 precision (the router's and the indexer's head-weight GEMMs): three bf16 MMAs per weight split hi + mid + lo, K split at decode sizes |
| moe_route(logits, bias, n_group, topk_group, top_k, normalize, scale) | gate logits [T, E] fp32 -> (weights [T, k] fp32, ids [T, k] int64); one program per token |
| moe_align(topk_ids, num_experts, block_m) | [N, k] -> sorted ids, block experts, rows used |
| fused_moe(x, w13, w2, topk_weights, topk_ids, shared=None) | [N, H], [E, 2I, H], [E, H, I] -> [N, H]; `shared` ([N, H], the shared experts' output) added in the combining kernel |
| fused_moe_fp8(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, shared=None) | e4m3 weights, 128x128 scales; <= 16 tokens: each active expert streamed once (moe.fused_moe_fp8_gemv_triton) |
| argmax(x) | [B, V] -> [B] int64, torch.argmax exactly (lowest index among ties); two stages (vocab chunks, then rows) |
| silu_mul(gate, up) | [..., I] x2 -> silu(gate) * up, one launch (SwiGLU of the dense MLP and shared experts) |
| fp8_linear(x, weight, scale) | [..., K] x e4m3 [N, K] (+ fp32 [N/128, K/128]) -> [..., N]; x quantised per 1x128; M <= 64 rows: the weight-streaming GEMV (fp8_gemm.fp8_gemv_triton) |
"""

from ._common import HAS_TRITON, use_triton
from .activation import silu_mul
from .cache_write import kv_write
from .fp8_gemm import fp8_linear
from .fp32_gemm import fp32_linear
from .greedy import argmax
from .indexer import indexer_logits_decode, indexer_topk_decode
from .indexer_query import index_query
from .moe import fused_moe, fused_moe_fp8, moe_align
from .moe_router import moe_route
from .norm import rms_norm
from .quant import act_quant
from .radix_topk import topk
from .rotary import rope
from .sparse_mla import sparse_mla_decode

__all__ = [
    "HAS_TRITON",
    "use_triton",
    "indexer_logits_decode",
    "indexer_topk_decode",
    "index_query",
    "fp32_linear",
    "topk",
    "kv_write",
    "sparse_mla_decode",
    "rms_norm",
    "rope",
    "act_quant",
    "moe_align",
    "moe_route",
    "fused_moe",
    "fused_moe_fp8",
    "fp8_linear",
    "argmax",
    "silu_mul",
]
