"""The paged sparse-attention cache: MLA latent pool + lightning-indexer key pool(s).

Memory layout (block-major)::

    latent  [num_blocks, num_layers, block_size, kv_lora_rank + qk_rope_head_dim]   model dtype
            or, with latent_fp8, uint8 [..., token_bytes] in FlashMLA's sparse FP8 token format:
            kv_lora_rank e4m3 values | one fp32 scale per 128 of them | the rope part in bf16
            (512 + 16 + 128 = 656 bytes per token for DeepSeek-V3.2, vs 1152 in bf16)
    ikeys   [num_blocks, num_layers, block_size, index_head_dim]                    model dtype (exact)
            or uint8 holding e4m3 values (FP8 indexer) + iscale [num_blocks, num_layers, block_size] fp32

num_layers counts the MTP layer when the network has one (it caches like any layer). The pools hold
one block more than num_blocks: `scratch_block`, never handed out, where the padding rows of a
CUDA-graph batch write their throw-away entries; then `staging_blocks` more (a prefill worker's staging
area, kvtransfer/staging.py: scattered blocks are gathered there to travel as one region).

Why block-major: a block holds every layer of its block_size tokens in one contiguous region, so a
request's cache is (number of blocks) regions per pool, and a run of consecutive block ids is a
single region. On NVLink each transfer descriptor costs ~8-10 us: the layer-major alternative
(one region per layer per block) makes 61x more descriptors for the full model (3904 vs 64 for a
4k prompt: 6.2 GB/s vs 153 GB/s measured; ../shared/device/README.md). The allocator hands out
consecutive block ids where it can (block_manager.py) so runs coalesce further. Attention kernels
only see a [block, layer] stride; nothing in them prefers layer-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from splitserve.kernels import act_quant
from splitserve.model.batch import IndexerKeys
from splitserve.model.config import ModelConfig
from splitserve.model.fp8 import FP8_DTYPE


@dataclass(frozen=True, slots=True)
class CacheLayout:
    """What both ends of a cache transfer must agree on (checked in the transfer handshake)."""

    num_layers: int
    block_size: int
    latent_dim: int
    index_head_dim: int
    dtype: str
    indexer_fp8: bool
    latent_fp8: bool = False

    def describe(self) -> dict[str, str]:
        return {
            "layout": "block-major/v1",
            "num_layers": str(self.num_layers),
            "block_size": str(self.block_size),
            "latent_dim": str(self.latent_dim),
            "index_head_dim": str(self.index_head_dim),
            "dtype": self.dtype,
            "indexer_fp8": str(self.indexer_fp8),
            "latent_fp8": str(self.latent_fp8),
        }


def pool_specs(
    model_cfg: ModelConfig,
    num_layers: int,
    block_size: int,
    dtype: torch.dtype,
    indexer_fp8: bool,
    latent_fp8: bool = False,
) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape of one block, dtype) of each pool, in `CachePool.pools()` order: latent, indexer keys and,
    with the FP8 indexer, their scales."""
    kv_lora, rope, d = model_cfg.kv_lora_rank, model_cfg.qk_rope_head_dim, model_cfg.index_head_dim
    if latent_fp8:
        group = min(128, kv_lora)
        if kv_lora % group:
            raise ValueError(f"kv_lora_rank {kv_lora} is not a multiple of 128: no FP8 latent cache")
        latent = ((num_layers, block_size, kv_lora + 4 * (kv_lora // group) + 2 * rope), torch.uint8)
    else:
        latent = ((num_layers, block_size, model_cfg.latent_dim), dtype)
    if not indexer_fp8:
        return [latent, ((num_layers, block_size, d), dtype)]
    return [latent, ((num_layers, block_size, d), torch.uint8), ((num_layers, block_size), torch.float32)]


def block_bytes(
    model_cfg: ModelConfig,
    num_layers: int,
    block_size: int,
    dtype: torch.dtype,
    indexer_fp8: bool,
    latent_fp8: bool = False,
) -> int:
    """Bytes of one cache block over every pool."""
    specs = pool_specs(model_cfg, num_layers, block_size, dtype, indexer_fp8, latent_fp8)
    return sum(math.prod(shape) * dt.itemsize for shape, dt in specs)


class CachePool:
    """The cache tensors of one engine. `pools()` lists them in a fixed order for transport."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        indexer_fp8: bool,
        latent_fp8: bool = False,
        staging_blocks: int = 0,
    ) -> None:
        self.num_blocks, self.block_size, self.num_layers = num_blocks, block_size, num_layers
        self.scratch_block = num_blocks
        self.staging = (num_blocks + 1, staging_blocks)  # (first block, count) of the staging area
        self.indexer_fp8 = indexer_fp8
        self.dtype = dtype
        self.kv_lora, self.rope_dim = model_cfg.kv_lora_rank, model_cfg.qk_rope_head_dim
        self.latent_fp8 = latent_fp8
        self.fp8_group = min(128, self.kv_lora)
        specs = pool_specs(model_cfg, num_layers, block_size, dtype, indexer_fp8, latent_fp8)
        pools = [torch.zeros(num_blocks + 1 + staging_blocks, *shape, dtype=dt, device=device) for shape, dt in specs]
        self.latent, self.ikeys = pools[0], pools[1]
        self.iscale = pools[2] if indexer_fp8 else None
        self.layout = CacheLayout(
            num_layers,
            block_size,
            model_cfg.latent_dim,
            model_cfg.index_head_dim,
            str(dtype).replace("torch.", ""),
            indexer_fp8,
            latent_fp8,
        )

    def pools(self) -> list[torch.Tensor]:
        return [p for p in (self.latent, self.ikeys, self.iscale) if p is not None]

    @property
    def bytes_per_block(self) -> int:
        return sum(p[0].nbytes for p in self.pools())

    # ---- per-token access by slot (block id * block_size + offset) -----------------------
    def _pack_fp8(self, latent: torch.Tensor) -> torch.Tensor:
        """[n, kv_lora + rope] -> [n, token_bytes] uint8: e4m3 latent | fp32 scales | bf16 rope."""
        nope, rope = latent[:, : self.kv_lora], latent[:, self.kv_lora :]
        q, scale = act_quant(nope, self.fp8_group, ue8m0=False)
        return torch.cat(
            [
                q.view(torch.uint8),
                scale.float().contiguous().view(torch.uint8),
                rope.to(torch.bfloat16).contiguous().view(torch.uint8),
            ],
            dim=-1,
        )

    def _unpack_fp8(self, raw: torch.Tensor) -> torch.Tensor:
        n, k, g = raw.shape[0], self.kv_lora, self.kv_lora // self.fp8_group
        q = raw[:, :k].contiguous().view(FP8_DTYPE).float()
        scale = raw[:, k : k + 4 * g].contiguous().view(torch.float32)
        rope = raw[:, k + 4 * g :].contiguous().view(torch.bfloat16)
        nope = (q.view(n, g, self.fp8_group) * scale[:, :, None]).view(n, k)
        return torch.cat([nope.to(self.dtype), rope.to(self.dtype)], dim=-1)

    def write(self, layer: int, slots: torch.Tensor, latent: torch.Tensor, keys: IndexerKeys) -> None:
        b, o = slots // self.block_size, slots % self.block_size
        self.latent[b, layer, o] = self._pack_fp8(latent) if self.latent_fp8 else latent.to(self.latent.dtype)
        if self.iscale is None:
            self.ikeys[b, layer, o] = keys.values.to(self.ikeys.dtype)
        else:
            assert keys.scale is not None, "FP8 indexer cache needs FP8 keys"
            self.ikeys[b, layer, o] = keys.values.view(torch.uint8)
            self.iscale[b, layer, o] = keys.scale

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, IndexerKeys]:
        b, o = slots // self.block_size, slots % self.block_size
        lat = self.latent[b, layer, o]
        if self.latent_fp8:
            lat = self._unpack_fp8(lat)
        if self.iscale is None:
            return lat, IndexerKeys(self.ikeys[b, layer, o])
        return lat, IndexerKeys(self.ikeys[b, layer, o].view(FP8_DTYPE), self.iscale[b, layer, o])


def blocks_for_memory(free_bytes: int, fraction: float, bytes_per_block: int) -> int:
    """Cache blocks that fit in `fraction` of `free_bytes` (>= 1, else a ValueError that says why)."""
    n = int(free_bytes * fraction) // bytes_per_block
    if n < 1:
        raise ValueError(
            f"{fraction:.0%} of the {free_bytes / 2**30:.2f} GiB free holds no cache block of "
            f"{bytes_per_block / 2**20:.1f} MiB: free memory, or set num_blocks"
        )
    return n


class PagedStore:
    """`KVStore` over the pool for one forward pass: sequence i of the batch uses block_tables[i]."""

    def __init__(
        self,
        pool: CachePool,
        block_tables: list[list[int]],
        total_lens: list[int],
        context_lens: list[int],
        layer_offset: int = 0,
    ) -> None:
        self.pool = pool
        bs = pool.block_size
        dev = pool.latent.device
        self._all: list[torch.Tensor] = []
        self._new: list[torch.Tensor] = []
        for table, total, ctx in zip(block_tables, total_lens, context_lens):
            if len(table) * bs < total:
                raise RuntimeError(f"block table of {len(table)} blocks cannot hold {total} tokens")
            pos = torch.arange(total, device=dev)
            slots = torch.tensor(table, dtype=torch.long, device=dev)[pos // bs] * bs + pos % bs
            self._all.append(slots)
            self._new.append(slots[ctx:])

    def write(self, layer: int, seq: int, latent: torch.Tensor, keys: IndexerKeys) -> None:
        self.pool.write(layer, self._new[seq], latent, keys)

    def read(self, layer: int, seq: int) -> tuple[torch.Tensor, IndexerKeys]:
        return self.pool.read(layer, self._all[seq])
