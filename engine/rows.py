"""Row plans: a forward's tokens as query rows over the paged cache, and CUDA graphs of decode steps.

With the paged kernels on (EngineConfig.paged_kernels), every token of a forward is one query row
(model.batch.PagedRows): it writes its cache entry at its slot and attends to positions
0 .. its own through its request's block table. `RowPlan` builds those arrays on the host in one
pass; `to_batch` moves them to the device for an eager forward, `DecodeGraphs` copies them into
the static buffers of a captured forward and replays it.

Graphs are keyed by the padded row count only: rows pad up to the next of `capture_sizes(max_rows)`
(1, 2, 4, 8, then every multiple of 8, as vLLM and SGLang capture), and every graph's block tables are
as wide as max_model_len, so one graph per batch size serves every context length (the indexer kernel
stops at each row's seq_len; the padding costs only the top-k over -inf scores). `capture_all()`
captures every size before the worker reports ready (the warm-up forward before each capture compiles
the Triton kernels); `seal()` marks the worker ready, after which nothing is captured: a step with no
graph runs eagerly and counts in `misses_after_ready` (a GPU test asserts it stays 0 under mixed load).
A capture that fails turns graphs off for that engine (the steps run eagerly, nothing is lost).
Padding rows read and write only the pool's scratch block.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from splitserve.model import DeepseekV32, ForwardBatch
from splitserve.model.batch import PagedRows

from .cache import CachePool

log = logging.getLogger(__name__)

ROW_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 512, 640, 768, 1024)


def capture_sizes(max_rows: int) -> tuple[int, ...]:
    """Row counts captured at start: 1, 2, 4, then every multiple of 8 up to 256, of 16 up to 512, of
    32 beyond, and max_rows itself (padding wastes at most 1/8 of a step's rows beyond 8 rows)."""
    sizes = {s for s in (1, 2, 4) if s <= max_rows}
    for lo, hi, step in ((8, 256, 8), (272, 512, 16), (544, 1 << 20, 32)):
        sizes.update(range(lo, min(hi, max_rows) + 1, step))
    sizes.add(max_rows)
    return tuple(sorted(sizes))


@dataclass(slots=True)
class RowPlan:
    """Host arrays of one forward's rows (N rows, W = widest block table)."""

    input_ids: np.ndarray  # [N] int64
    positions: np.ndarray  # [N] int64
    seq_lens: np.ndarray  # [N] int32
    slots: np.ndarray  # [N] int64
    tables: np.ndarray  # [N, W] int32

    @staticmethod
    def build(groups: list[tuple[list[int], int, list[int]]], block_size: int) -> RowPlan:
        """groups: (token ids, first position, block table) per run of consecutive positions."""
        g = len(groups)
        lens = np.fromiter((len(ids) for ids, _, _ in groups), np.int64, g)
        n = int(lens.sum())
        width = max(len(t) for _, _, t in groups)
        group_tables = np.zeros((g, width), np.int32)
        for i, (_, _, t) in enumerate(groups):
            group_tables[i, : len(t)] = t
        table_lens = np.fromiter((len(t) for _, _, t in groups), np.int64, g)
        starts = np.fromiter((p for _, p, _ in groups), np.int64, g)
        ids = np.fromiter(itertools.chain.from_iterable(ids for ids, _, _ in groups), np.int64, n)
        row_group = np.repeat(np.arange(g), lens)
        pos = starts[row_group] + np.arange(n) - np.repeat(np.cumsum(lens) - lens, lens)
        page = pos // block_size
        short = page >= table_lens[row_group]
        if short.any():
            r = int(np.argmax(short))
            raise RuntimeError(f"block table of {table_lens[row_group[r]]} blocks cannot hold position {pos[r]}")
        tables = group_tables[row_group]
        slots = tables[np.arange(n), page].astype(np.int64) * block_size + pos % block_size
        return RowPlan(ids, pos, (pos + 1).astype(np.int32), slots, tables)

    def to_batch(self, pool: CachePool) -> ForwardBatch:
        dev = pool.latent.device
        rows = PagedRows(
            pool,
            torch.from_numpy(self.tables).to(dev),
            torch.from_numpy(self.seq_lens).to(dev),
            torch.from_numpy(self.slots).to(dev),
        )
        return ForwardBatch(
            torch.from_numpy(self.input_ids).to(dev), torch.from_numpy(self.positions).to(dev), [], None, rows
        )


def pack(arrays: tuple[np.ndarray, ...], pin: bool) -> list[torch.Tensor]:
    """Copies of these arrays as views into one host buffer (each view 8-byte aligned), pinned when
    `pin`: one allocation per step, from which non-blocking copies to the GPU do not wait for the
    stream (a copy out of pageable memory may), and which PyTorch's pinned allocator does not hand out
    again before the copies out of it have run."""
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // 8) * 8
    buf = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    host = buf.numpy()
    out = []
    for a, off in zip(arrays, offsets):
        host[off : off + a.nbytes].view(a.dtype).reshape(a.shape)[...] = a
        out.append(buf[off : off + a.nbytes].view(torch.from_numpy(a).dtype).view(a.shape))
    return out


def _pad_to(n: int, sizes: tuple[int, ...]) -> int | None:
    for s in sizes:
        if s >= n:
            return s
    return None


class DecodeGraphs:
    """Captured forwards over decode rows: of the main model (decode and MTP verification rows), or,
    with mtp=True, of the MTP layer (its catch-up and drafting rows; the input hidden states are a
    static buffer too)."""

    def __init__(self, net: DeepseekV32, pool: CachePool, max_rows: int, max_blocks: int, mtp: bool = False) -> None:
        self.net, self.pool, self.mtp = net, pool, mtp
        self.sizes = capture_sizes(max(1, max_rows))
        self.max_rows = self.sizes[-1]
        self.max_blocks = max_blocks
        dev = pool.latent.device
        r, w = self.max_rows, max_blocks
        self.ids = torch.zeros(r, dtype=torch.long, device=dev)
        self.pos = torch.zeros(r, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(r, dtype=torch.int32, device=dev)
        self.slots = torch.full((r,), pool.scratch_block * pool.block_size, dtype=torch.long, device=dev)
        self.tables = torch.full((r, w), pool.scratch_block, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros(r, net.cfg.hidden_size, dtype=net.dtype, device=dev) if mtp else None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.disabled = False  # a capture failed: every step runs eagerly from then on
        self.sealed = False  # the worker reported ready: nothing is captured from now on
        self.captures = 0
        self.misses_after_ready = 0  # steps after ready that fit a size but had no graph (ran eagerly)
        self.capture_seconds = 0.0
        self.mempool = torch.cuda.graph_pool_handle()

    def key(self, plan: RowPlan) -> int | None:
        """The graph a plan replays: its padded row count (None: too many rows or too wide)."""
        if plan.tables.shape[1] > self.max_blocks:
            return None
        return _pad_to(len(plan.input_ids), self.sizes)

    def capture_all(self) -> int:
        """Capture a graph for every size (before ready); returns how many were captured."""
        import time

        t0, n = time.perf_counter(), 0
        for rows in self.sizes:
            if self.disabled:
                break
            if rows not in self.graphs:
                self._fill_padding(0, rows)
                if self._try_capture(rows):
                    n += 1
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - t0
        return n

    def seal(self) -> None:
        self.sealed = True

    def _fill_padding(self, n: int, rows: int) -> None:
        self.ids[n:rows].zero_()
        self.pos[n:rows].zero_()
        self.seq_lens[n:rows].fill_(1)
        self.slots[n:rows].fill_(self.pool.scratch_block * self.pool.block_size)
        self.tables[n:rows].fill_(self.pool.scratch_block)
        if self.hidden is not None:
            self.hidden[n:rows].zero_()

    def _try_capture(self, rows: int) -> bool:
        try:
            self.graphs[rows] = self._capture(rows)
            self.captures += 1
            return True
        except Exception:  # noqa: BLE001 - serving goes on without graphs rather than failing requests
            log.exception(
                "capturing a %s CUDA graph of %d rows failed: these steps run eagerly from now on",
                "MTP" if self.mtp else "decode",
                rows,
            )
            self.disabled = True
            self.graphs.clear()
            return False

    def run(
        self,
        plan: RowPlan,
        hidden: torch.Tensor | None = None,
        feed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """Replay the graph for this plan; None when none fits (the caller runs eagerly). Before
        seal() a missing graph is captured; after it, never (counted in misses_after_ready).
        hidden: the MTP layer's input states [N, hidden] (mtp graphs only).
        feed: (rows, token ids), both on the device: these rows' input ids replace the plan's (the
        tokens a step still in flight samples, copied on the device: engine/overlap.py)."""
        rows = None if self.disabled else self.key(plan)
        if rows is None:
            return None
        if rows not in self.graphs:
            if self.sealed:
                self.misses_after_ready += 1
                return None
            self._fill_padding(0, rows)
            if not self._try_capture(rows):
                return None
        n, w = len(plan.input_ids), plan.tables.shape[1]
        arrays = (plan.input_ids, plan.positions, plan.slots, plan.seq_lens, plan.tables)
        dsts = (self.ids[:n], self.pos[:n], self.slots[:n], self.seq_lens[:n], self.tables[:n, :w])
        srcs = pack(arrays, pin=True) if self.ids.is_cuda else [torch.from_numpy(a) for a in arrays]
        for dst, src in zip(dsts, srcs):
            dst.copy_(src, non_blocking=True)
        if feed is not None:
            self.ids.index_copy_(0, feed[0], feed[1])
        if w < self.max_blocks:  # beyond a row's table: the scratch block (never read: seq_lens bound it)
            self.tables[:n, w:].fill_(self.pool.scratch_block)
        if self.hidden is not None:
            assert hidden is not None and hidden.shape[0] == n
            self.hidden[:n].copy_(hidden)
        if n < rows:  # padding rows: position 0 of the scratch block, nothing else
            self._fill_padding(n, rows)
        graph, out = self.graphs[rows]
        graph.replay()
        return out[:n].clone()  # the static output is overwritten by the next replay; callers keep rows

    def _batch(self, rows: int, width: int) -> ForwardBatch:
        paged = PagedRows(self.pool, self.tables[:rows, :width], self.seq_lens[:rows], self.slots[:rows])
        return ForwardBatch(self.ids[:rows], self.pos[:rows], [], None, paged)

    def _forward(self, batch: ForwardBatch, rows: int) -> torch.Tensor:
        if self.hidden is None:
            return self.net.forward(batch)
        return self.net.mtp_forward(self.hidden[:rows], batch.input_ids, batch)

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        batch = self._batch(rows, self.max_blocks)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, allocator settles
            self._forward(batch, rows)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            out = self._forward(batch, rows)
        log.debug(
            "captured a %s CUDA graph: %d rows, block tables %d wide",
            "MTP" if self.mtp else "decode",
            rows,
            self.max_blocks,
        )
        return graph, out
