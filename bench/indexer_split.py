"""Lightning indexer under tensor parallelism: replicated on every rank, or split by indexer heads.

Replicated: each rank computes all index_n_heads heads' scores [n, L] (and top-k) itself.
Split: each rank computes index_n_heads / N heads, then the per-head-weighted partial scores are
summed over the ranks (all-reduce of [n, L] fp32) before the top-k.

Runs N processes (gloo on CPU, NCCL on CUDA) and times, per shape: the replicated scores, the split
scores, the all-reduce alone, and (ceiling) the split compute without the all-reduce. Prints a table
last and writes JSON.

    python -m splitserve.bench.indexer_split --ranks 2 [--device cuda] [--out indexer_split.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

SHAPES = [  # (name, query rows n, cached keys L)
    ("decode b32 L4k", 32, 4096),
    ("decode b128 L16k", 128, 16384),
    ("prefill 512 L4k", 512, 4096),
]


def _scores(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    # q [n, h, d], w [n, h], k [L, d] -> [n, L] (the indexer's exact path, model/attention.py Indexer.scores)
    return torch.einsum("nh,nhl->nl", w, F.relu(torch.einsum("nhd,ld->nhl", q, k)))


def _time(fn, sync, reps: int) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def _rank(rank: int, world: int, port: int, device: str, heads: int, dim: int, reps: int, out: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device(device, rank) if device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: dist.barrier())
    rows = []
    for name, n, length in SHAPES:
        q = torch.randn(n, heads, dim, device=dev, dtype=dtype)
        w = torch.randn(n, heads, device=dev, dtype=dtype)
        k = torch.randn(length, dim, device=dev, dtype=dtype)
        local = heads // world
        ql, wl = q[:, :local].contiguous(), w[:, :local].contiguous()
        part = _scores(ql, wl, k).float()

        def split() -> None:
            s = _scores(ql, wl, k).float()
            dist.all_reduce(s)

        t_rep = _time(lambda: _scores(q, w, k), sync, reps)
        t_local = _time(lambda: _scores(ql, wl, k), sync, reps)
        t_ar = _time(lambda: dist.all_reduce(part), sync, reps)
        t_split = _time(split, sync, reps)
        rows.append(
            {
                "shape": name,
                "n": n,
                "L": length,
                "replicated_ms": t_rep * 1e3,
                "split_ms": t_split * 1e3,
                "split_compute_ms": t_local * 1e3,
                "all_reduce_ms": t_ar * 1e3,
                "all_reduce_mb": part.numel() * 4 / 1e6,
            }
        )
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"device": device, "ranks": world, "heads": heads, "head_dim": dim, "rows": rows}, f, indent=1)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="indexer_split.json")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(a.ranks, port, a.device, a.heads, a.head_dim, a.reps, a.out), nprocs=a.ranks, join=True)
    with open(a.out) as f:
        res = json.load(f)
    print(f"indexer {a.heads} heads x {a.head_dim}, {a.ranks} ranks on {a.device}")
    print(f"{'shape':<18} {'replicated ms':>14} {'split ms':>9} {'(compute':>9} {'+ all-reduce)':>14} {'AR MB':>7}")
    for r in res["rows"]:
        print(
            f"{r['shape']:<18} {r['replicated_ms']:>14.2f} {r['split_ms']:>9.2f} {r['split_compute_ms']:>9.2f}"
            f" {r['all_reduce_ms']:>14.2f} {r['all_reduce_mb']:>7.2f}"
        )


if __name__ == "__main__":
    main()
