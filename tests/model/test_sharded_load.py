"""Sharded loading (model/sharding.py through model.load(parallel=...)): every rank's tensors put back
together are the one-rank network's, for bf16/fp32 weights and for FP8 weights kept in e4m3 with
their 128x128 block scales; a size that does not split (or not on 128-blocks, for kept FP8) fails
with an error naming the tensor. Loading runs no collective, so the ranks are loaded in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitserve.model import load
from splitserve.model.checkpoint import make_checkpoint
from splitserve.model.parallel import ParallelState, ShardError

from ..tp_workers import FP8_TP


@pytest.fixture(scope="module")
def fp8_tp_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(FP8_TP, tmp_path_factory.mktemp("fp8tp"), seed=3, fp8=True)


def _joined(shards: list[dict[str, torch.Tensor]], name: str, full: torch.Tensor, ep: bool) -> torch.Tensor:
    parts = [s[name] for s in shards]
    if parts[0].shape == full.shape:  # replicated: every rank holds all of it
        for p in parts[1:]:
            assert torch.equal(p.float(), parts[0].float()), name
        return parts[0]
    if not ep and name.endswith((".w13", ".w13_scale_inv")):  # [E, gate ‖ up, H]: each rank a slice of both
        halves = [p.chunk(2, dim=1) for p in parts]
        return torch.cat([torch.cat([h[0] for h in halves], 1), torch.cat([h[1] for h in halves], 1)], 1)
    dim = next(d for d in range(full.dim()) if parts[0].shape[d] != full.shape[d])
    return torch.cat(parts, dim)


@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
@pytest.mark.parametrize("fp8", [False, True], ids=["dense", "fp8"])
def test_shards_join_to_the_full_network(fp8_tp_checkpoint, tiny_checkpoint, ep, fp8) -> None:
    ckpt = fp8_tp_checkpoint if fp8 else tiny_checkpoint
    kw = dict(dtype=torch.float32, fp8_weights=fp8)
    full = load(ckpt, **kw)
    shards = [
        dict(load(ckpt, **kw, parallel=ParallelState(rank=r, world_size=2, expert_parallel=ep)).named_parameters())
        for r in range(2)
    ]
    full_params = dict(full.named_parameters())
    assert set(shards[0]) == set(full_params)
    split = 0
    for name, want in full_params.items():
        got = _joined(shards, name, want, ep)
        assert got.dtype == want.dtype, name
        assert torch.equal(got.float(), want.float()), name
        split += shards[0][name].numel() < want.numel()
    assert split > 0
    if fp8:
        assert any(t.dtype == torch.float8_e4m3fn for t in shards[0].values())


def test_fp8_split_off_block_boundaries_is_refused(tiny_fp8_checkpoint) -> None:
    # tiny: 128-row/column weights (down_proj's 128 inputs, q_b_proj's 4 heads x 32 rows): 64 per rank
    # cuts a 128x128 scale block
    with pytest.raises(ShardError, match=r"slice \[64:128\) .* 128-blocks.*tensor_parallel_size 2"):
        load(tiny_fp8_checkpoint, fp8_weights=True, parallel=ParallelState(rank=1, world_size=2))
    # dequantised at load, the same checkpoint splits anywhere: the blocks are dequantised whole first
    net = load(tiny_fp8_checkpoint, fp8_weights=False, parallel=ParallelState(rank=1, world_size=2))
    full = load(tiny_fp8_checkpoint, fp8_weights=False)
    q_b = full.model.layers[0].self_attn.q_b_proj.weight
    assert torch.equal(net.model.layers[0].self_attn.q_b_proj.weight, q_b[q_b.shape[0] // 2 :])


def test_sizes_that_do_not_divide_are_refused(tiny_checkpoint) -> None:
    with pytest.raises(
        ShardError, match=r"(vocab_size \(1024\)|num_attention_heads \(4\)) does not divide by tensor_parallel_size 3"
    ):
        load(tiny_checkpoint, parallel=ParallelState(rank=0, world_size=3))
    # 8 experts over 4 ranks is fine; the tiny preset's 4 heads too
    net = load(tiny_checkpoint, parallel=ParallelState(rank=3, world_size=4, expert_parallel=True))
    assert net.model.layers[1].mlp.w13.shape[0] == 2
