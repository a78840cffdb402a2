"""Decode step time of one worker spanning N GPUs (tensor parallel, optionally expert parallel),
against ceilings measured in the same run: HBM copy bandwidth and bf16 matmul rate of rank 0's GPU,
and the NCCL all-reduce of one decode step's hidden states ([rows, hidden] bf16: MLA and the
MLP/MoE each end in one per layer).

    python -m splitserve.bench.tp_decode --ranks 1,2 [--ep] [--checkpoint DIR | --preset bench]
        [--batch 32] [--context 4096] [--steps 30] [--mtp 0] [--out tp_decode.json]

Each entry of --ranks is one run: N processes (one GPU each; NCCL for tensors, gloo for the leader's
step plans), rank 0 leading the engine (engine/runner.py), the others following. The engine prefills
--batch requests of --context tokens, then times --steps decode steps (Engine.step, greedy, ignore_eos):
median step time, tokens/s, and the weight-read floor (this rank's weight bytes / HBM copy rate;
decode reads every weight it holds once per step, routed experts aside). Under TP the CUDA graphs are
off (engine/engine.py), so ranks=1 also runs without graphs ("eager") for a like-for-like ratio.

The checkpoint: --checkpoint (e.g. the real DeepSeek-V3.2, FP8) or a random FP8 checkpoint of
--preset written once to --workdir. Prints a table last and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _all_reduce_us(ps: Any, rows: int, hidden: int, device: str, reps: int = 50) -> float:
    if not ps.distributed:
        return 0.0
    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    for _ in range(5):
        ps.all_reduce(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        ps.all_reduce(x)
    _sync(device)
    return (time.perf_counter() - t0) / reps * 1e6


def _rank(rank: int, world: int, port: int, a: argparse.Namespace, ckpt: str, graphs: bool, out: str) -> None:
    from splitserve.bench.kernels import measure_ceilings
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.engine import Engine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.model import load
    from splitserve.model.parallel import ParallelState

    dev = a.device
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # ranks share the host's cores
    if dev == "cuda":
        torch.cuda.set_device(rank)
    ps = ParallelState.init(rank, world, f"tcp://127.0.0.1:{port}", dev, expert_parallel=a.ep and world > 1)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    t0 = time.perf_counter()
    net = load(ckpt, device=dev, dtype=dtype, fp8_weights=dev == "cuda", parallel=ps)
    load_s = time.perf_counter() - t0
    ar_us = _all_reduce_us(ps, a.batch * (a.mtp + 1), net.cfg.hidden_size, dev)
    ceil = measure_ceilings(dev) if rank == 0 else {}
    need = a.batch * (-(-(a.context + a.steps * (a.mtp + 1) + 8) // 64))
    ecfg = EngineConfig(
        num_blocks=need + 8,
        block_size=64,
        max_batch_tokens=max(8192, a.batch * (a.mtp + 1)),
        chunk_size=8192,
        max_running=a.batch,
        mtp_draft_tokens=a.mtp,
        dtype=str(dtype).removeprefix("torch."),
        device=dev,
        cuda_graphs=graphs,
    )
    eng = Engine(net, ecfg)
    if rank:
        eng.follow()
        ps.destroy()
        return
    eng.warm_up(capture_graphs=graphs)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=a.steps * (a.mtp + 1) + 4, ignore_eos=True)
    for i in range(a.batch):
        eng.add_request(f"r{i}", torch.randint(2, net.cfg.vocab_size, (a.context,), generator=g).tolist(), params)
    while any(r.num_computed < len(r.prompt_ids) for r in eng.requests.values()):
        eng.step()
    times = []
    for _ in range(a.steps):
        _sync(dev)
        t = time.perf_counter()
        eng.step()
        _sync(dev)
        times.append(time.perf_counter() - t)
    for rid in list(eng.requests):
        eng.abort(rid)
    eng.stop_followers()
    wb = net.weight_bytes()["total"]
    step = statistics.median(times[2:] if len(times) > 4 else times)
    res = {
        "ranks": world,
        "expert_parallel": ps.expert_parallel,
        "cuda_graphs": graphs,
        "batch": a.batch,
        "context": a.context,
        "mtp": a.mtp,
        "step_ms": step * 1e3,
        "tokens_per_s": a.batch / step,
        "weight_gib_per_rank": wb / 2**30,
        "weight_floor_ms": wb / ceil["hbm_copy_bytes_per_s"] * 1e3,
        "all_reduce_us": ar_us,
        "all_reduces_per_step": 2 * (net.cfg.num_hidden_layers),
        "load_s": load_s,
        "ceilings": ceil,
        "accepted": eng.stats.accepted_draft_tokens,
    }
    Path(out).write_text(json.dumps(res, indent=1))
    ps.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="1,2", help="comma-separated world sizes, one run each")
    ap.add_argument("--ep", action="store_true", help="experts split across the ranks (expert parallel)")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint directory (default: a random --preset one)")
    ap.add_argument("--preset", default="bench")
    ap.add_argument("--workdir", default="/tmp/splitserve-tp-bench")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--mtp", type=int, default=0)
    ap.add_argument("--out", default="tp_decode.json")
    a = ap.parse_args()
    ckpt = a.checkpoint
    if ckpt is None:
        from splitserve.model.checkpoint import make_checkpoint

        ckpt = str(Path(a.workdir) / f"{a.preset}-fp8")
        if not (Path(ckpt) / "config.json").exists():
            make_checkpoint(a.preset, ckpt, fp8=True, dtype=torch.bfloat16)
    runs = []
    for n in (int(x) for x in a.ranks.split(",")):
        if a.device == "cuda" and n > torch.cuda.device_count():
            raise SystemExit(f"--ranks {n}: only {torch.cuda.device_count()} GPUs visible")
        for graphs in [True, False] if n == 1 and a.device == "cuda" else [False]:
            out = str(Path(a.workdir) / f"run-{n}-{int(graphs)}.json")
            if os.path.exists(out):
                os.remove(out)
            mp.spawn(_rank, args=(n, _free_port(), a, ckpt, graphs, out), nprocs=n, join=True)
            runs.append(json.loads(Path(out).read_text()))
    Path(a.out).write_text(json.dumps({"checkpoint": ckpt, "runs": runs}, indent=1))
    base = next((r for r in runs if r["ranks"] == 1 and not r["cuda_graphs"]), None)
    c = runs[0]["ceilings"]
    print(
        f"ceilings (rank 0's device): HBM copy {c['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {c['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s"
    )
    print(f"decode: batch {a.batch}, context {a.context}, mtp {a.mtp}, checkpoint {ckpt}")
    hdr = f"{'ranks':>5} {'ep':>3} {'graphs':>6} {'step ms':>8} {'tok/s':>8} {'GiB/rank':>9} {'floor ms':>9}"
    print(hdr + f" {'AR us x n':>12} {'vs TP1 eager':>13}")
    for r in runs:
        ratio = f"{base['step_ms'] / r['step_ms']:.2f}x" if base else "-"
        print(
            f"{r['ranks']:>5} {('y' if r['expert_parallel'] else 'n'):>3} {('y' if r['cuda_graphs'] else 'n'):>6}"
            f" {r['step_ms']:>8.2f} {r['tokens_per_s']:>8.0f} {r['weight_gib_per_rank']:>9.2f}"
            f" {r['weight_floor_ms']:>9.3f} {r['all_reduce_us']:>7.1f}x{r['all_reduces_per_step']:<4} {ratio:>13}"
        )


if __name__ == "__main__":
    main()
