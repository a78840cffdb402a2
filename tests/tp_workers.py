"""Tensor-parallel test helpers: N real processes (torch.multiprocessing, spawn) joined by gloo, each
loading its shard of a checkpoint and running cases (cache-free logits, an engine's greedy generation
led by rank 0); each rank saves what it computed to a file that the test compares against one rank.

Every wait is bounded and every process is gone when `run_ranks` returns (killed on a timeout).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from splitserve.model.checkpoint import PRESETS

# the tiny preset widened so that every split tensor splits on 128-blocks at 2 ranks
FP8_TP = replace(
    PRESETS["tiny"],
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_attention_heads=4,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    q_lora_rank=128,
    kv_lora_rank=128,
    index_head_dim=64,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(fn: Callable[..., None], world: int, args: tuple, timeout_s: float) -> None:
    """fn(rank, world, init_method, *args) in `world` spawned processes; fails the test when one exits
    non-zero or they are not all done within timeout_s (the stragglers are killed first)."""
    ctx = mp.get_context("spawn")
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=fn, args=(r, world, init, *args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        late = [r for r, p in enumerate(procs) if p.is_alive()]
        if late:
            pytest.fail(f"rank(s) {late} not done within {timeout_s:.0f} s")
        codes = [p.exitcode for p in procs]
        if any(codes):
            pytest.fail(f"rank exit codes {codes}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)


def make_predictable(net: Any) -> None:
    """Main residual branches scaled by 0.1 and an MTP layer whose eh_proj passes the embedding through
    (drafts accepted often, rejected sometimes): tests/engine/conftest.py's predictable_net, and the same on
    each rank's shard (every scaled weight is a shard-local slice, eh_proj is replicated: the same network
    on any N)."""
    h = net.cfg.hidden_size
    with torch.no_grad():
        for layer in net.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.1)
            mlp = layer.mlp
            if hasattr(mlp, "w2"):
                mlp.w2.mul_(0.1)
                mlp.shared_experts.down_proj.weight.mul_(0.1)
            else:
                mlp.down_proj.weight.mul_(0.1)
        if net.has_mtp:
            mtp = net.mtp
            mtp.eh_proj.weight.zero_()
            mtp.eh_proj.weight[:, :h] = torch.eye(h)
            mtp.enorm.weight.copy_(net.model.norm.weight)
            mtp.shared_head.norm.weight.fill_(1.0)


def run_case(net: Any, case: dict[str, Any]) -> dict[str, Any]:
    """One case on one rank (or alone): cache-free logits of `score_ids`, then (rank 0 leading, the
    others following) the engine's generation of `prompts`; returns what to compare."""
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.engine import Engine
    from splitserve.engine.sampling_params import SamplingParams

    if case.get("predictable"):
        make_predictable(net)
    out: dict[str, Any] = {"logits": net.score(torch.tensor(case["score_ids"]))}
    eng = Engine(net, EngineConfig(**case["engine"]))
    params = SamplingParams(temperature=0.0, max_tokens=case["max_tokens"], ignore_eos=True)
    if net.parallel.is_leader:
        res = eng.generate(case["prompts"], params)
        eng.stop_followers()
        out["tokens"] = [r.token_ids for r in res]
        out["accepted"] = sum(r.accepted_draft_tokens for r in res)
    else:
        out["follower_calls"] = eng.follow()
    out["pools"] = [t.clone() for t in eng.pool.pools()]
    from splitserve.engine.runtime import transfer_compat

    out["compat"] = transfer_compat(eng).to_json()  # what a cache transfer's handshake compares
    return out


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_to_cpu(v) for v in x]
    return x


def tp_rank(
    rank: int, world: int, init: str, ckpt: str, cases: list[dict[str, Any]], out_dir: str, device: str = "cpu"
) -> None:
    """A rank of a tensor-parallel worker: join (gloo, on `device`: "cuda" puts every rank on the one
    GPU there is), then run every case on its shard; saves rank{r}.pt (on the CPU)."""
    from splitserve.model import load
    from splitserve.model.parallel import ParallelState

    torch.set_num_threads(1)
    ps = ParallelState.init(rank, world, init, device, timeout_s=300, backend="gloo")
    try:
        results = []
        for case in cases:
            par = ps.with_expert_parallel(case["ep"])
            net = load(ckpt, device=device, dtype=torch.float32, parallel=par, **case.get("load", {}))
            results.append(_to_cpu(run_case(net, case)))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        ps.destroy()
