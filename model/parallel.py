"""Parallel state of one worker that spans several devices: its rank, the world size, the process
groups, and every collective the network and the engine use. The one place that talks to
torch.distributed.

A worker of tensor_parallel_size N is N processes (ranks) joined by torch.distributed: NCCL for
tensors on CUDA, gloo on a CPU. Tensor collectives (`all_reduce`, `all_gather_last`,
`broadcast_tensor`) run on `group` (the device backend); control messages (`broadcast_object`:
the engine's per-step plans) on `cpu_group` (always gloo, so that pickled plans never go through
GPU memory). With world size 1 (`ParallelState.single()`) every collective returns at once and no
process group exists: the single-device path has no collective and no extra copy.

expert_parallel: MoE routed experts are split across ranks (each rank holds n_routed_experts / N
whole experts) instead of each expert's intermediate dimension (tensor parallel).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class ShardError(ValueError):
    """A dimension that does not split evenly (or on 128-blocks for FP8) across the ranks."""


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    expert_parallel: bool = False
    group: Any = None  # torch.distributed ProcessGroup for tensors (None: world size 1)
    cpu_group: Any = None  # gloo group for control messages
    backend: str = ""  # of `group`: "nccl" or "gloo"

    @staticmethod
    def single() -> ParallelState:
        return ParallelState()

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def with_expert_parallel(self, on: bool) -> ParallelState:
        return replace(self, expert_parallel=on)

    # ---- set-up -----------------------------------------------------------------------------
    @staticmethod
    def init(
        rank: int,
        world_size: int,
        init_method: str,
        device: str = "cpu",
        *,
        expert_parallel: bool = False,
        timeout_s: float = 7 * 24 * 3600.0,
        step_timeout_s: float = 600.0,
        backend: str | None = None,
    ) -> ParallelState:
        """Join the worker's process group (init_method: "tcp://host:port" of rank 0 or "file://..."
        on a shared node). device "cuda": NCCL for tensors (the rank's GPU must be current), gloo for
        control; otherwise gloo for both. backend="gloo" on cuda: gloo for CUDA tensors too (ranks
        sharing one GPU, which NCCL refuses: a correctness check, not a fast path). timeout_s bounds
        a collective of the control group, where followers wait for the leader's next step, so the default
        is long (an idle worker is not an error); step_timeout_s bounds joining and the tensor collectives."""
        if world_size == 1:
            return ParallelState(expert_parallel=expert_parallel)
        backend = backend or ("nccl" if device == "cuda" else "gloo")
        # joining and the tensor collectives inside a step are bounded by minutes (a rank that dies before
        # joining or in a step must not hold the others for days); only the control group, where followers
        # wait idle for the leader's next step, has the long timeout
        step_timeout = datetime.timedelta(seconds=min(timeout_s, step_timeout_s))
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world_size, timeout=step_timeout
        )
        group = dist.group.WORLD
        cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d joined (%s, pid %d)", rank, world_size, backend, os.getpid())
        return ParallelState(rank, world_size, expert_parallel, group, cpu_group, backend)

    def destroy(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # ---- sharding arithmetic ------------------------------------------------------------------
    def split(self, total: int, what: str) -> int:
        """total / world_size, or ShardError naming `what`."""
        if total % self.world_size:
            raise ShardError(f"{what} ({total}) does not divide by tensor_parallel_size {self.world_size}")
        return total // self.world_size

    def my_range(self, total: int, what: str) -> tuple[int, int]:
        n = self.split(total, what)
        return self.rank * n, (self.rank + 1) * n

    # ---- collectives (no-ops at world size 1) --------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks (in place; returns x)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenation of every rank's x along the last dimension (rank order)."""
        if self.world_size == 1:
            return x
        if self.backend == "gloo" and x.is_cuda:  # gloo has no CUDA all-gather: sum zero-padded slices
            d = x.shape[-1]
            out = x.new_zeros(*x.shape[:-1], d * self.world_size)
            out[..., self.rank * d : (self.rank + 1) * d] = x
            return self.all_reduce(out)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x into x on every rank (x preallocated with the right shape elsewhere)."""
        if self.world_size > 1:
            dist.broadcast(x, src=0, group=self.group)
        return x

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's picklable obj, returned on every rank (others pass None)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def barrier(self) -> None:
        """Every rank reached this point (control group)."""
        if self.world_size > 1:
            dist.barrier(group=self.cpu_group)

    def all_min(self, value: int) -> int:
        """The smallest of every rank's value (control group)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())
