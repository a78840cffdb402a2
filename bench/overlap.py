"""Overlapped scheduling (engine/overlap.py): decode step wall time against GPU time, synchronous vs
overlapped, on the `bench` preset (real DeepSeek-V3.2 widths, 4 layers, random bf16 weights).

    python -m splitserve.bench.overlap [--batches 1,64,256] [--context 512] [--steps 60] [--mtp K] [--out f.json]

For each batch size B and mode (sync: EngineConfig.overlap_scheduling=False; overlap: True), an engine
with max_running = B prefills B random prompts of --context tokens, runs a few decode steps (the CUDA
graph of B rows is captured on first use), then times --steps decode-only engine steps (greedy,
nothing finishes):

  wall_ms  wall time per Engine.step() call, over the timed steps (the device synchronised after);
  gpu_ms   GPU time per step of the forward + LM head, from CUDA events the runner records right
           before the step's graph replay (its input copies included) and right after the LM head
           (ModelRunner.gpu_events): the work a step cannot avoid. Sampling (an argmax) is outside it.
           In a synchronous step the device is idle when the start event is recorded, so the span
           also holds the host's packing of the row plan into pinned memory (tens of us): sync's
           host_ms is, if anything, understated.
  ratio    wall_ms / gpu_ms: 1.0 = the device never waits for the host. The issue's goal: <= 1.05.
  host_ms  wall_ms - gpu_ms: what the host adds per step (the synchronous engine's cost; ~0 overlapped).

--mtp K: steps are the fused speculative step with K drafts (engine/spec_step.py); its events bracket
the whole step (the host's plan copies and, overlapped, the device-side feed from the step before, up to
the acceptance). The random weights' MTP layer rarely agrees with the main model: about 1 token a step.

A synchronous step waits for its tokens, so its host work (reading tokens, stop checks, the next row
plan and its copies) leaves the device idle; an overlapped step does that work while the device runs
the previous step, so wall time approaches GPU time when the host side is shorter than the GPU side.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from splitserve.bench.engine import random_net
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.model.checkpoint import PRESETS

BLOCK = 64


def case(net, batch: int, context: int, steps: int, overlap: bool, mtp: int = 0) -> dict[str, Any]:
    warm = 5
    tokens = (warm + steps + 16) * (mtp + 1)  # nothing finishes while timed, whatever is accepted
    blocks = batch * (-(-(context + tokens + 2 * mtp + 2) // BLOCK)) + 8
    eng = Engine(
        net,
        EngineConfig(
            num_blocks=blocks,
            block_size=BLOCK,
            chunk_size=8192,
            max_batch_tokens=16384,
            max_running=batch,
            device="cuda",
            dtype="bfloat16",
            prefix_cache=False,
            overlap_scheduling=overlap,
            mtp_draft_tokens=mtp,
        ),
    )
    assert (eng.overlap is not None) == overlap
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for b in range(batch):
        eng.add_request(f"r{b}", torch.randint(2, net.cfg.vocab_size, (context,), generator=g).tolist(), params)
    while any(r.num_computed < len(r.prompt_ids) for r in eng.requests.values()):
        eng.step()
    for _ in range(warm):
        eng.step()
    torch.cuda.synchronize()
    eng.runner.gpu_events = []
    made0 = sum(len(r.output_ids) for r in eng.requests.values())
    overlapped0 = eng.overlap.steps if eng.overlap is not None else 0
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) * 1e3 / steps
    events, eng.runner.gpu_events = eng.runner.gpu_events, None
    gpu = [a.elapsed_time(b) for a, b in events]
    made = sum(len(r.output_ids) for r in eng.requests.values()) - made0
    overlapped = (eng.overlap.steps if eng.overlap is not None else 0) - overlapped0  # of the timed steps
    for rid in list(eng.requests):
        eng.abort(rid)
    while eng.has_work:
        eng.step()
    assert eng.blocks_used == 0
    del eng
    torch.cuda.empty_cache()
    gpu_ms = statistics.mean(gpu)
    return {
        "batch": batch,
        "context": context,
        "mode": "overlap" if overlap else "sync",
        "mtp": mtp,
        "steps": steps,
        "gpu_events": len(gpu),
        "overlapped_steps": overlapped,
        "tokens_per_step": made / steps,
        "wall_ms": wall,
        "gpu_ms": gpu_ms,
        "gpu_ms_median": statistics.median(gpu),
        "ratio": wall / gpu_ms,
        "host_ms": wall - gpu_ms,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench overlap", description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--mtp", type=int, default=0, help="MTP draft tokens (0: plain decode steps)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 1
    net = random_net(PRESETS["bench"], indexer_fp8=True)
    rows = []
    for b in (int(x) for x in args.batches.split(",")):
        for overlap in (False, True):
            r = case(net, b, args.context, args.steps, overlap, args.mtp)
            rows.append(r)
            print(
                f"B={r['batch']:4d} {r['mode']:8s} wall {r['wall_ms']:7.3f} ms  gpu {r['gpu_ms']:7.3f} ms  "
                f"ratio {r['ratio']:5.3f}  host {r['host_ms']:6.3f} ms  tokens/step {r['tokens_per_step']:.0f}  "
                f"overlapped {r['overlapped_steps']}",
                flush=True,
            )
    by = {(r["batch"], r["mode"]): r for r in rows}
    print("\n| batch | sync wall ms | overlap wall ms | GPU ms | sync wall/GPU | overlap wall/GPU | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for b in sorted({r["batch"] for r in rows}):
        s, o = by[(b, "sync")], by[(b, "overlap")]
        print(
            f"| {b} | {s['wall_ms']:.3f} | {o['wall_ms']:.3f} | {o['gpu_ms']:.3f} | {s['ratio']:.3f} | "
            f"{o['ratio']:.3f} | {s['wall_ms'] / o['wall_ms']:.2f}x |"
        )
    if args.out:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "context": args.context,
            "mtp": args.mtp,
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
