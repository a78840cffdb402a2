"""What one forward pass is told about its tokens and where their cache lives.

The network never knows about paging: it writes each new token's cache entries through a
`KVStore` and reads a sequence's whole history back from it. The engine's paged pools implement
`KVStore` over block tables; `DenseStore` (here) keeps plain tensors for cache-free scoring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True, slots=True)
class SeqSpan:
    """One sequence's slice of the flattened token batch.

    Rows [start, start + length) of the batch are this sequence's new tokens, at positions
    context_len .. context_len + length - 1; the store already holds its first context_len tokens.
    `absorbed` selects the MLA form: the decompressed (naive) form for prefill chunks, the
    absorbed (latent-space) form for decode and verification steps. They are equal in exact math.
    """

    start: int
    length: int
    context_len: int
    absorbed: bool = False

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def total_len(self) -> int:
        return self.context_len + self.length


@dataclass(frozen=True, slots=True)
class IndexerKeys:
    """Indexer keys of some tokens: exact ([L, D] float, scale None) or FP8 ([L, D] e4m3, scale [L] fp32)."""

    values: torch.Tensor
    scale: torch.Tensor | None = None

    def __getitem__(self, idx: slice) -> IndexerKeys:
        return IndexerKeys(self.values[idx], None if self.scale is None else self.scale[idx])

    @staticmethod
    def cat(parts: list[IndexerKeys]) -> IndexerKeys:
        vals = torch.cat([p.values for p in parts])
        if parts[0].scale is None:
            return IndexerKeys(vals)
        return IndexerKeys(vals, torch.cat([p.scale for p in parts]))  # type: ignore[misc]


class KVStore(Protocol):
    """Where a layer's cache entries go and come back from, per sequence of the batch."""

    def write(self, layer: int, seq: int, latent: torch.Tensor, keys: IndexerKeys) -> None:
        """Store entries for positions [context_len, total_len) of sequence `seq` (its span's new tokens).

        latent: [n, kv_lora_rank + qk_rope_head_dim] (normalised latent ‖ rotated k_rope)."""
        ...

    def read(self, layer: int, seq: int) -> tuple[torch.Tensor, IndexerKeys]:
        """All entries of sequence `seq` for `layer`, positions [0, total_len): ([L, latent_dim], keys [L])."""
        ...


@dataclass
class DenseStore:
    """A KVStore in plain tensors: history + new entries concatenated per (layer, seq)."""

    latents: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    keys: dict[tuple[int, int], IndexerKeys] = field(default_factory=dict)

    def write(self, layer: int, seq: int, latent: torch.Tensor, keys: IndexerKeys) -> None:
        k = (layer, seq)
        if k in self.latents:
            self.latents[k] = torch.cat([self.latents[k], latent])
            self.keys[k] = IndexerKeys.cat([self.keys[k], keys])
        else:
            self.latents[k], self.keys[k] = latent, keys

    def read(self, layer: int, seq: int) -> tuple[torch.Tensor, IndexerKeys]:
        return self.latents[(layer, seq)], self.keys[(layer, seq)]


class PagedPools(Protocol):
    """The paged cache tensors the attention kernels read in place (engine.cache.CachePool)."""

    latent: torch.Tensor  # [num_blocks, num_layers, block_size, latent_dim]
    ikeys: torch.Tensor  # [num_blocks, num_layers, block_size, index_head_dim]
    iscale: torch.Tensor | None  # [num_blocks, num_layers, block_size] fp32 (FP8 indexer)
    latent_fp8: bool

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, keys: IndexerKeys) -> None: ...


@dataclass
class PagedRows:
    """A batch whose every row is one query token over the paged cache (decode, MTP verification
    and drafting), described by tensors only, so that a forward over it can be captured in a CUDA
    graph. Row r sees positions 0 .. seq_lens[r] - 1 (itself last) through block_tables[r] and
    writes its own cache entry at slot slots[r] (block id * block_size + offset)."""

    pools: PagedPools
    block_tables: torch.Tensor  # [N, max_blocks] int32
    seq_lens: torch.Tensor  # [N] int32
    slots: torch.Tensor  # [N] int64


@dataclass
class ForwardBatch:
    """The tokens of one forward pass: flattened ids and positions, their spans, and the cache.

    With `rows` set, the attention reads and writes the paged pools directly through the Triton
    kernels' batched path (spans and store are then unused and may be empty)."""

    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    spans: list[SeqSpan]
    store: KVStore | None
    rows: PagedRows | None = None

    @staticmethod
    def single(
        input_ids: torch.Tensor, store: KVStore | None = None, context_len: int = 0, absorbed: bool = False
    ) -> ForwardBatch:
        n = input_ids.shape[0]
        pos = torch.arange(context_len, context_len + n, device=input_ids.device)
        return ForwardBatch(input_ids, pos, [SeqSpan(0, n, context_len, absorbed)], store or DenseStore())
