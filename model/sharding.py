"""Which part of each checkpoint tensor one tensor-parallel rank loads (model/parallel.py owns the
rank; model/loader.py reads through `Sharding`).

Split tensors (rank r of N takes the r-th of N equal slices):
- MLA: q_b_proj and kv_b_proj rows (whole heads: rows are head-major), o_proj columns;
- dense MLP and shared experts: gate_proj / up_proj rows, down_proj columns;
- routed experts: with expert_parallel, experts [r * E/N, (r + 1) * E/N) whole (the others are not
  read at all); otherwise each expert's gate/up rows and down columns, like an MLP;
- lm_head and model.embed_tokens rows (vocab-parallel).
Everything else (norms, q_a_proj, kv_a_proj_with_mqa, the indexer, the router, eh_proj)
is read whole by every rank.

Reading goes through a `read(index)` callable (a safetensors slice), so that a rank reads only its
slice from disk. FP8 weights kept in e4m3 take their `weight_scale_inv` slice too: 128x128 blocks
cannot be cut, so a slice must start (and end, unless at the tensor's end) on a multiple of 128, or
loading fails with a ShardError naming the tensor and the tensor_parallel_size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import ModelConfig
from .parallel import ParallelState, ShardError

Index = tuple[slice, ...]
Reader = Callable[[Index], torch.Tensor]

_ROWS = ("self_attn.q_b_proj.weight", "self_attn.kv_b_proj.weight", "gate_proj.weight", "up_proj.weight")
_COLS = ("self_attn.o_proj.weight", "down_proj.weight")


class Sharding:
    def __init__(self, cfg: ModelConfig, parallel: ParallelState) -> None:
        self.cfg, self.ps = cfg, parallel
        e = cfg.n_routed_experts
        if parallel.expert_parallel and parallel.distributed:
            self.expert_lo, self.expert_hi = parallel.my_range(e, "n_routed_experts")
        else:
            self.expert_lo, self.expert_hi = 0, e

    @property
    def active(self) -> bool:
        return self.ps.distributed

    def local_expert(self, e: int) -> int | None:
        """Checkpoint expert id -> this rank's index into its stacked experts (None: another rank's)."""
        return e - self.expert_lo if self.expert_lo <= e < self.expert_hi else None

    def _split(self, shape: tuple[int, ...], dim: int, name: str) -> Index:
        lo, hi = self.ps.my_range(shape[dim], f"{name} dim {dim}")
        return tuple(slice(lo, hi) if d == dim else slice(None) for d in range(len(shape)))

    def index(self, name: str, shape: tuple[int, ...]) -> Index | None:
        """This rank's slice of the checkpoint tensor `name` (full shape `shape`): () for the whole
        tensor, None when another rank holds it (an expert elsewhere under expert parallelism)."""
        if not self.active:
            return ()
        ep = self.ps.expert_parallel
        if ".mlp.experts." in name:
            rest = name.split(".mlp.experts.")[1]
            if rest in ("gate_up_proj", "down_proj"):  # transformers' fused [E, ...] tensors
                if ep:
                    return (slice(self.expert_lo, self.expert_hi),)
                if rest == "down_proj":
                    return self._split(shape, 2, name)
                return ()  # gate ‖ up: a slice of each half, read() cuts them
            e = int(rest.split(".", 1)[0])
            if ep:
                return () if self.local_expert(e) is not None else None
        if name in ("lm_head.weight", "model.embed_tokens.weight") or name.endswith(_ROWS):
            return self._split(shape, 0, name)
        if name.endswith(_COLS):
            return self._split(shape, 1, name)
        return ()

    def read(self, name: str, shape: tuple[int, ...], read: Reader) -> torch.Tensor | None:
        """This rank's part of `name`, read through `read` (None: not this rank's)."""
        idx = self.index(name, shape)
        if idx is None:
            return None
        if self.active and not self.ps.expert_parallel and name.endswith(".mlp.experts.gate_up_proj"):
            i = shape[1] // 2  # [E, gate rows ‖ up rows, H]: this rank's slice of each half
            lo, hi = self.ps.my_range(i, f"{name} intermediate size")
            return torch.cat([read((slice(None), slice(lo, hi))), read((slice(None), slice(i + lo, i + hi)))], dim=1)
        return read(idx)

    def read_scale(
        self, wname: str, wshape: tuple[int, ...], read_scale: Reader, block: tuple[int, int]
    ) -> torch.Tensor | None:
        """The 128x128 block scales of this rank's part of the FP8 weight `wname` (2-D, [out, in])."""
        sidx = self.scale_index(wname, wshape, block)
        return None if sidx is None else read_scale(sidx)

    def scale_index(self, wname: str, wshape: tuple[int, ...], block: tuple[int, int]) -> Index | None:
        """This rank's slice of the block scales of the FP8 weight `wname`; ShardError when its slice of
        the weight does not fall on whole blocks."""
        idx = self.index(wname, wshape)
        if idx is None:
            return None
        sidx = []
        for d, sl in enumerate(idx):
            lo, hi = sl.start or 0, wshape[d] if sl.stop is None else sl.stop
            b = block[d]
            if lo % b or (hi % b and hi != wshape[d]):
                raise ShardError(
                    f"{wname}: this rank's slice [{lo}:{hi}) of dim {d} (size {wshape[d]}) does not fall on "
                    f"{b}-blocks, so its FP8 block scales cannot be split: tensor_parallel_size "
                    f"{self.ps.world_size} does not fit this FP8 checkpoint (load it dequantised, or pick a "
                    f"size that splits on {b}-element blocks)"
                )
            sidx.append(slice(lo // b, -(-hi // b)))
        return tuple(sidx)
