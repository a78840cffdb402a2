"""Multi-head latent attention (MLA) with DeepSeek Sparse Attention's lightning indexer.

Order inside a layer (dsv32 spec §6.7): MLA projections -> MLA cache write -> indexer (q/k,
key-cache write, scores against every cached key including the new ones) -> causal mask and
top-k -> attention over the selected entries only -> o_proj.

Two ways through a layer:
- spans (any device, any store): per sequence, the store gathers the sequence's whole history and
  attention masks the unselected keys — the reference, and what cache-free scoring uses;
- rows (`ForwardBatch.rows`, the engine on CUDA): every token is one query row over the paged pools;
  the indexer kernel scores and selects each row's top-k in place and the sparse MLA kernel
  attends to the selected entries only, in the absorbed form (DeepSeek's "MQA mode"), for prefill
  and decode alike. Only tensors are involved, so a decode step can be captured in a CUDA graph.

Two MLA forms, equal in exact arithmetic:
- decompressed (prefill): kv_b_proj expands each cached latent into per-head k_nope and v;
- absorbed (decode): q_nope is folded through kv_b_proj's k part into the 512-d latent space,
  attention runs over the cached [latent ‖ k_rope] entries directly (one shared KV head), and
  kv_b_proj's v part is applied after attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from splitserve.kernels import (
    act_quant,
    fp32_linear,
    index_query,
    indexer_topk_decode,
    kv_write,
    rope,
    sparse_mla_decode,
)
from splitserve.kernels.cache_write import kv_write_fits

from .batch import ForwardBatch, IndexerKeys, PagedPools, PagedRows, SeqSpan
from .config import ModelConfig
from .fp8 import hadamard_matrix, hadamard_rotate
from .linear import FusedLinear
from .norm import RMSNorm
from .parallel import ParallelState

FUSED_CACHE_WRITE = True  # False: the unfused ops + pools.write (bench/engine.py --glue unfused, for comparison)


class Indexer(nn.Module):
    """The lightning indexer: picks, per query token, the index_topk cached tokens MLA attends to.

    exact path (fp8=False): scores in fp32 without rotation or quantisation (transformers' form).
    FP8 path (fp8=True): q and k Hadamard-rotated and quantised to e4m3 with one ue8m0 scale per
    128 values (DeepSeek's inference code); keys are cached as e4m3 + one fp32 scale per token.
    """

    def __init__(self, cfg: ModelConfig, fp8: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.fp8 = fp8
        self.n_heads, self.head_dim, self.rope_dim = cfg.index_n_heads, cfg.index_head_dim, cfg.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.n_heads, bias=False)
        self.softmax_scale = self.head_dim**-0.5

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rope_dim], x[..., self.rope_dim :]
        rot = rope(rot, cos, sin, self.cfg.indexer_rope_interleave)
        return torch.cat([rot, rest], dim=-1)

    def keys(self, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> IndexerKeys:
        """k = wk(x) [N, head_dim] -> the N tokens' cacheable keys."""
        k = F.layer_norm(k.float(), (self.head_dim,), self.k_norm.weight.float(), self.k_norm.bias.float(), 1e-6).to(
            k.dtype
        )
        k = self._rope(k, cos, sin)
        if not self.fp8:
            return IndexerKeys(k)
        kq, ks = act_quant(hadamard_rotate(k), self.head_dim)
        return IndexerKeys(kq, ks[:, 0])

    def queries(
        self, q_resid: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (q [N, heads, D] (float, or e4m3 on the FP8 path), head weights [N, heads] fp32 with scales folded in)."""
        n = x.shape[0]
        q = self._rope(self.wq_b(q_resid).view(n, self.n_heads, self.head_dim), cos, sin)
        w = fp32_linear(x, self.weights_proj.weight) * self.n_heads**-0.5
        if not self.fp8:
            return q, w
        qq, qs = act_quant(hadamard_rotate(q), self.head_dim)
        return qq, w * qs[..., 0] * self.softmax_scale

    def row_queries(
        self, q_resid: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries() as indexer_topk_decode takes them: every scale folded into the weights (the exact
        path's head_dim^-0.5 too) and the exact path's q in out_dtype (the key pool's). Between the two
        GEMMs one kernel on CUDA (kernels/indexer_query.py), the same ops as queries() elsewhere."""
        n = x.shape[0]
        q = self.wq_b(q_resid).view(n, self.n_heads, self.head_dim)
        w = fp32_linear(x, self.weights_proj.weight)
        hadamard = hadamard_matrix(self.head_dim, q.dtype, q.device) if self.fp8 else None
        interleaved = self.cfg.indexer_rope_interleave
        return index_query(q, w, cos, sin, interleaved, hadamard, self.softmax_scale, out_dtype)

    @torch.no_grad()
    def fuse_weights(self) -> None:
        """Hold weights_proj in fp32 (exact; the loader does so too), so that a forward does not convert it."""
        if isinstance(self.weights_proj, nn.Linear) and self.weights_proj.weight.dtype != torch.float32:
            self.weights_proj.float()

    def scores(self, q: torch.Tensor, w: torch.Tensor, keys: IndexerKeys) -> torch.Tensor:
        """q [n, heads, D], w [n, heads], keys [L] -> index scores [n, L] fp32."""
        if not self.fp8:
            logits = F.relu(torch.einsum("nhd,ld->nhl", q.float(), keys.values.float()) * self.softmax_scale)
            return torch.einsum("nh,nhl->nl", w, logits)
        logits = F.relu(torch.einsum("nhd,ld->nhl", q.float(), keys.values.float()))
        assert keys.scale is not None
        return torch.einsum("nh,nhl->nl", w, logits) * keys.scale.float()[None, :]


def select_topk(index_scores: torch.Tensor, span: SeqSpan, topk: int) -> torch.Tensor:
    """index_scores [n, L] -> allowed [n, L] bool: causal and among the row's top-k visible keys.

    Query row r sits at position context_len + r and sees keys 0..context_len + r. With at most
    `topk` visible keys a row attends to all of them (dense causal attention).
    """
    n, total = index_scores.shape
    key_pos = torch.arange(total, device=index_scores.device)
    q_pos = torch.arange(span.context_len, span.context_len + n, device=index_scores.device)
    causal = key_pos[None, :] <= q_pos[:, None]
    if total <= topk:
        return causal
    masked = index_scores.masked_fill(~causal, float("-inf"))
    idx = masked.topk(topk, dim=-1).indices
    selected = torch.zeros_like(causal).scatter_(1, idx, True)
    return selected & causal


class MLA(nn.Module):
    """Multi-head latent attention for one layer (weights named as in the HF checkpoint).

    Tensor parallel (parallel.world_size N): each rank holds num_attention_heads / N heads — its rows
    of q_b_proj and kv_b_proj and its columns of o_proj, whose partial output is summed over the ranks
    (all-reduce). The latent path (q_a_proj, kv_a_proj_with_mqa, their norms) and the indexer are
    replicated, so every rank writes the same MLA latent and indexer key cache entries."""

    def __init__(
        self, cfg: ModelConfig, layer: int, indexer_fp8: bool = False, parallel: ParallelState | None = None
    ) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.parallel = parallel or ParallelState.single()
        h = self.n_heads = self.parallel.split(cfg.num_attention_heads, "num_attention_heads")
        self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.latent_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=False)
        self.indexer = Indexer(cfg, indexer_fp8)
        self.in_proj: FusedLinear | None = None  # fuse_weights(): q_a ‖ kv_a ‖ indexer.wk, one GEMM

    @torch.no_grad()
    def fuse_weights(self) -> None:
        """Concatenate the three projections of x into one weight (FP8 ones padded to whole 128-row
        blocks); the modules' weights become views of it (no extra memory). One GEMM instead of three
        (decode: fewer, larger weight reads). Projections of mixed kinds (FP8 and not) stay apart."""
        if self.in_proj is not None:
            return
        mods = [self.q_a_proj, self.kv_a_proj_with_mqa, self.indexer.wk]
        if len({type(m) for m in mods}) == 1:
            self.in_proj = FusedLinear(mods)

    def _project_in(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.in_proj is not None:
            q_a, kv_a, k_idx = self.in_proj(x)
            return q_a, kv_a, k_idx
        return self.q_a_proj(x), self.kv_a_proj_with_mqa(x), self.indexer.wk(x)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        n, h = x.shape[0], self.n_heads
        q_a, kv_a, k_idx = self._project_in(x)
        q_resid = self.q_a_layernorm(q_a)
        q = self.q_b_proj(q_resid).view(n, h, cfg.qk_head_dim)
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        q_rope = rope(q_rope, cos, sin, interleaved=True)
        if batch.rows is not None:
            q_idx, w_idx = self.indexer.row_queries(q_resid, x, cos, sin, batch.rows.pools.ikeys.dtype)
            self.write_entries(kv_a, k_idx, cos, sin, batch.rows.pools, batch.rows.slots)
            out = self._rows(q_nope, q_rope, q_idx, w_idx, batch.rows)
            return self.parallel.all_reduce(self.o_proj(out.reshape(n, h * cfg.v_head_dim)))
        q_idx, w_idx = self.indexer.queries(q_resid, x, cos, sin)
        entries = self._entries(kv_a, cos, sin)
        keys = self.indexer.keys(k_idx, cos, sin)
        assert batch.store is not None
        for i, sp in enumerate(batch.spans):
            batch.store.write(self.layer, i, entries[sp.start : sp.end], keys[sp.start : sp.end])

        out = x.new_empty(n, h, cfg.v_head_dim)
        for i, sp in enumerate(batch.spans):
            cache, cache_keys = batch.store.read(self.layer, i)
            if sp.total_len <= cfg.index_topk:  # every visible key is selected: skip scoring
                allowed = select_topk(cache.new_empty(sp.length, sp.total_len), sp, cfg.index_topk)
            else:
                scores = self.indexer.scores(q_idx[sp.start : sp.end], w_idx[sp.start : sp.end], cache_keys)
                allowed = select_topk(scores, sp, cfg.index_topk)
            attend = self._absorbed if sp.absorbed else self._decompressed
            out[sp.start : sp.end] = attend(q_nope[sp.start : sp.end], q_rope[sp.start : sp.end], cache, allowed)
        return self.parallel.all_reduce(self.o_proj(out.reshape(n, h * cfg.v_head_dim)))

    def _entries(self, kv_a: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """kv_a [N, kv_lora + rope] -> the cacheable latent entries [N, kv_lora + rope]."""
        latent, k_rope = kv_a.split([self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim], dim=-1)
        return torch.cat([self.kv_a_layernorm(latent), rope(k_rope, cos, sin, interleaved=True)], dim=-1)

    def write_entries(
        self,
        kv_a: torch.Tensor,
        k_idx: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        pools: PagedPools,
        slots: torch.Tensor,
    ) -> None:
        """The rows' latent entries and indexer keys into the paged pools: one fused kernel on CUDA
        (kernels/cache_write.py; its reference, the same ops as _entries + Indexer.keys, elsewhere).
        The 656-byte FP8 latent entries, and on CUDA the shapes the fused kernel does not serve, go
        through the separate (Triton) norm / rope / quantisation kernels and pools.write."""
        unfit = kv_a.is_cuda and not kv_write_fits(kv_a, k_idx, cos, pools.latent)
        if pools.latent_fp8 or not FUSED_CACHE_WRITE or unfit:
            pools.write(self.layer, slots, self._entries(kv_a, cos, sin), self.indexer.keys(k_idx, cos, sin))
            return
        ix, d = self.indexer, self.indexer.head_dim
        kv_write(
            kv_a,
            k_idx,
            cos,
            sin,
            self.kv_a_layernorm.weight,
            self.kv_a_layernorm.eps,
            ix.k_norm.weight,
            ix.k_norm.bias,
            ix.k_norm.eps,
            self.cfg.indexer_rope_interleave,
            hadamard_matrix(d, k_idx.dtype, k_idx.device) if ix.fp8 else None,
            pools.latent,
            pools.ikeys,
            pools.iscale,
            self.layer,
            slots,
        )

    def _rows(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        q_idx: torch.Tensor,
        w_idx: torch.Tensor,
        rows: PagedRows,
    ) -> torch.Tensor:
        """Every row one query over the paged pools (its entries already written): select top-k,
        sparse absorbed attention. q_idx, w_idx from Indexer.row_queries (the exact indexer's
        relu(s * q.k) = s * relu(q.k): s folded into the weights)."""
        cfg, pools = self.cfg, rows.pools
        selected = indexer_topk_decode(
            q_idx,
            w_idx,
            pools.ikeys,
            pools.iscale,
            self.layer,
            rows.block_tables,
            rows.seq_lens,
            cfg.index_topk,
        )
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("nhd,hdc->nhc", q_nope, w_uk)
        o_lat = sparse_mla_decode(
            q_lat, q_rope, pools.latent, self.layer, rows.block_tables, selected, cfg.softmax_scale
        )
        return self._value_up(o_lat, w_uv)

    @staticmethod
    def _value_up(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
        """The absorbed attention's latent output o_lat [n, H, C] through each head's value projection w_uv
        [H, D, C] -> [n, H, D]. Serving (no gradient recorded): the batched GEMM over heads writes [n, H, D]
        rows in place (its output a transposed view), so o_proj's reshape needs no copy kernel (einsum's result
        is [H, n, D] permuted: a copy per layer)."""
        if torch.is_grad_enabled():
            return torch.einsum("nhc,hdc->nhd", o_lat, w_uv)
        out = o_lat.new_empty(o_lat.shape[0], o_lat.shape[1], w_uv.shape[1])
        torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
        return out

    def _softmax(self, logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        logits = logits.float() * self.cfg.softmax_scale
        return torch.softmax(logits.masked_fill(~allowed[None], float("-inf")), dim=-1)

    def _decompressed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        """q_nope [n, H, 128], q_rope [n, H, 64], cache [L, 576], allowed [n, L] -> [n, H, v_head_dim]."""
        cfg = self.cfg
        lat, k_rope = cache.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(lat).view(lat.shape[0], self.n_heads, -1)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        logits = torch.einsum("nhd,lhd->hnl", q_nope, k_nope) + torch.einsum("nhd,ld->hnl", q_rope, k_rope)
        p = self._softmax(logits, allowed).to(v.dtype)
        return torch.einsum("hnl,lhd->nhd", p, v)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split into W_uk [H, nope, kv_lora] and W_uv [H, v_head, kv_lora]."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(self.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim :]

    def _absorbed(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, cache: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.cfg
        w_uk, w_uv = self.absorbed_weights()
        lat, k_rope = cache.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        q_lat = torch.einsum("nhd,hdc->nhc", q_nope, w_uk)
        logits = torch.einsum("nhc,lc->hnl", q_lat, lat) + torch.einsum("nhd,ld->hnl", q_rope, k_rope)
        p = self._softmax(logits, allowed).to(lat.dtype)
        o_lat = torch.einsum("hnl,lc->nhc", p, lat)
        return self._value_up(o_lat, w_uv)
