"""Row-wise top-k (kernels/radix_topk.py): torch.topk against each Triton variant, replayed from CUDA graphs.

    python -m splitserve.bench.topk [--out topk.json] [--rows 1,4,16,64,256] [--widths 4096,16384,65536]
                                    [--k 2048] [--calls 20] [--device cuda|cpu]

Per cell (rows x width): fp32 randn scores, row b with its last 13*b positions at -inf (as the indexer's rows
of different lengths). First a check: every Triton variant's output equals exact_ref's (the documented order)
bit for bit and selects, per row, the same scores as torch.topk; a variant that fails this, or fails to compile
or run, is listed under the cell's errors and not timed. Then per implementation, in microseconds per call:
- warm: a CUDA graph of `calls` back-to-back calls on the same scores, replayed; time / calls. The scores sit
  in L2 after the first call, as they do when the indexer's logits kernel has just written them.
- cold: a CUDA graph of one call, replayed after triton.testing.do_bench's L2 flush.
Both are do_bench medians. "torch" is topk_ref (torch.topk, then -1 where -inf, then int32: what `topk`
runs below MIN_ROWS).

Implementations: torch; stream (one program per row); reg (whole row in registers, widths up to REG_WIDTH_LIMIT,
reg_warps' default warps and REG_BITS-bit digits; reg:wN with N warps, reg:bB with B-bit digits); split (split_block's
default chunk width; split:B with B-wide chunks).

The table ends with, per cell, the fastest implementation (warm), what choose_kernel(rows, width, min_rows=1,
reg_max_width=REG_MAX_WIDTH_PICK) picks and its time against torch's; and the smallest row count from which
that pick beats torch.topk at every width measured (a value for MIN_ROWS). On `--device cpu` the kernels run in Triton's interpreter with
wall-clock timing: only a smoke test of this script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

#: the reg kernel's width limit the table's pick assumes: radix_topk.REG_MAX_WIDTH's measured value (the module
#: keeps it at 0 while a graph-capture failure with it is open, radix_topk.MIN_ROWS's comment)
REG_MAX_WIDTH_PICK = 4096


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def make_scores(rows: int, width: int, device: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + rows * 131 + width)
    x = torch.randn(rows, width, generator=g)
    for b in range(rows):
        x[b, max(0, width - 13 * b) :] = float("-inf")
    return x.to(device)


def implementations(rows: int, width: int, k: int) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from splitserve.kernels import radix_topk as T

    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "torch": partial(T.topk_ref, k=k),
        "stream": partial(T.topk_triton, k=k),
    }
    if width <= T.REG_WIDTH_LIMIT:
        impls["reg"] = partial(T.topk_triton_reg, k=k)
        for w in (4, 8, 16):
            if w != T.reg_warps(width):
                impls[f"reg:w{w}"] = partial(T.topk_triton_reg, k=k, num_warps=w)
        for bits in (5, 6, 7, 8):
            if bits != T.REG_BITS:
                impls[f"reg:b{bits}"] = partial(T.topk_triton_reg, k=k, bits=bits)
    impls["split"] = partial(T.topk_triton_split, k=k)
    for block in (1024, 2048, 4096, 8192):
        if block != T.split_block(rows, width) and block < 2 * width:
            impls[f"split:{block}"] = partial(T.topk_triton_split, k=k, block=block)
    return impls


def selected_values(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Each row's selected scores, sorted (-inf for -1): equal for any two correct top-k, ties or not."""
    vals = x.gather(1, idx.long().clamp(min=0))
    return torch.where(idx >= 0, vals, float("-inf")).sort(dim=1).values


def exact_ref(x: torch.Tensor, k: int) -> torch.Tensor:
    """The module docstring's output, by whole-tensor torch ops: if at most k visible, all of them ascending;
    else the positions above the k-th largest key ascending, then the lowest tied positions; -1 padding."""
    rows, width = x.shape
    vis = x > float("-inf")
    u = x.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    key = torch.where(vis, torch.where(u >> 31 != 0, u ^ 0xFFFFFFFF, u ^ 0x80000000), -1)
    n_vis = vis.sum(1, keepdim=True)
    take_all = n_vis <= k
    thr = key.topk(k, dim=1).values[:, k - 1 :] if width >= k else torch.full_like(n_vis, -1)
    above = vis & ((key > thr) | take_all)
    tie = vis & (key == thr) & ~take_all
    tie = tie & (tie.cumsum(1) <= k - above.sum(1, keepdim=True))
    pos = torch.arange(width, device=x.device).expand(rows, width)
    rank = torch.where(above, pos, torch.where(tie, width + pos, 2 * width + pos))
    first = rank.sort(dim=1).values[:, :k] % width
    n_sel = (above | tie).sum(1, keepdim=True)
    out = torch.full((rows, k), -1, dtype=torch.int32, device=x.device)
    m = min(k, width)
    out[:, :m] = torch.where(torch.arange(m, device=x.device) < n_sel, first[:, :m], -1).int()
    return out


def check(x: torch.Tensor, k: int, outs: dict[str, torch.Tensor]) -> dict[str, str]:
    """Per Triton output that is wrong, why: it must equal exact_ref bit for bit and select, per row, the
    same scores as torch.topk."""
    want = exact_ref(x, k)
    ref_vals = selected_values(x, outs["torch"])
    bad = {}
    for name, got in outs.items():
        if name == "torch":
            continue
        if not torch.equal(got, want):
            rows = (got != want).any(dim=1).nonzero().flatten().tolist()
            bad[name] = f"output differs from the documented one in rows {rows[:8]}"
        elif not torch.equal(selected_values(x, got), ref_vals):
            bad[name] = "selected scores differ from torch.topk's"
    return bad


def _graph(fn: Callable[[], Any], calls: int) -> Callable[[], Any]:
    from splitserve.bench.kernels import graph_of

    replay = graph_of(fn, calls)
    if replay is None:
        raise RuntimeError("CUDA graph capture failed")
    return replay


def time_us(fn: Callable[[], Any], calls: int, device: str) -> dict[str, float]:
    if device != "cuda":
        fn()
        t = time.perf_counter()
        fn()
        wall = (time.perf_counter() - t) * 1e6
        return {"warm_us": wall, "cold_us": wall}
    import triton.testing

    def med(f: Callable[[], Any]) -> float:
        return float(triton.testing.do_bench(f, warmup=10, rep=100, return_mode="median")) * 1e3

    return {"warm_us": med(_graph(fn, calls)) / calls, "cold_us": med(_graph(fn, 1))}


def run_cell(rows: int, width: int, k: int, calls: int, device: str) -> dict[str, Any]:
    """One cell: check every implementation, time those that ran and were right. A variant that fails to
    compile or run, or gives a wrong output, is reported in `errors` and left out, not fatal."""
    from splitserve.kernels import radix_topk as T

    x = make_scores(rows, width, device)
    impls = implementations(rows, width, k)
    outs, errors = {}, {}
    for name, fn in impls.items():
        try:
            outs[name] = fn(x)
        except Exception as exc:  # noqa: BLE001 - reported in the results
            errors[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    if "torch" not in outs:
        raise RuntimeError(f"torch.topk failed: {errors.get('torch')}")
    errors |= check(x, k, outs)
    del outs
    times = {}
    for name, fn in impls.items():
        if name in errors:
            continue
        try:
            times[name] = time_us(partial(fn, x), calls, device)
        except Exception as exc:  # noqa: BLE001 - a capture failure, reported
            errors[name] = f"timing: {type(exc).__name__}: {str(exc)[:300]}"
    for name, why in errors.items():
        print(f"    {name} at rows {rows} width {width}: {why}", file=sys.stderr)
    triton_names = [n for n in times if n != "torch"]
    fastest = min(triton_names, key=lambda n: times[n]["warm_us"]) if triton_names else None
    pick = T.choose_kernel(rows, width, min_rows=1, reg_max_width=REG_MAX_WIDTH_PICK)
    pick_t = times[pick]["warm_us"] if pick in times else None
    return {
        "rows": rows,
        "width": width,
        "k": k,
        "split_block": T.split_block(rows, width),
        "times": times,
        "errors": errors,
        "fastest_triton": fastest,
        "pick": pick,
        "pick_over_torch_warm": pick_t / times["torch"]["warm_us"] if pick_t else None,
        "pick_over_fastest_warm": pick_t / times[fastest]["warm_us"] if pick_t and fastest else None,
    }


def suggest_min_rows(cells: list[dict[str, Any]]) -> int | None:
    """Smallest measured row count r such that, at every cell with rows >= r, choose_kernel's pick (without
    MIN_ROWS) beat torch.topk warm; None if even the largest row count has a cell where it did not."""
    ok_from = None
    for r in sorted({c["rows"] for c in cells}, reverse=True):
        ratios = [c["pick_over_torch_warm"] for c in cells if c["rows"] == r]
        if all(v is not None and v < 1.0 for v in ratios):  # None: the pick failed there
            ok_from = r
        else:
            break
    return ok_from


def fmt_table(cells: list[dict[str, Any]]) -> str:
    names: list[str] = []
    for c in cells:
        names += [n for n in c["times"] if n not in names]
    lines = [f"{'rows':>5s} {'width':>6s} {'mode':4s} " + " ".join(f"{n:>11s}" for n in names)]
    for c in cells:
        for mode in ("warm", "cold"):
            vals = [c["times"][n][f"{mode}_us"] if n in c["times"] else None for n in names]
            row = " ".join(f"{v:11.1f}" if v is not None else f"{'-':>11s}" for v in vals)
            lines.append(f"{c['rows']:5d} {c['width']:6d} {mode:4s} {row}")
    lines.append("")
    lines.append(f"{'rows':>5s} {'width':>6s} {'fastest':>11s} {'pick':>7s} {'pick/torch':>10s} {'pick/fastest':>12s}")
    for c in cells:
        ratios = [c["pick_over_torch_warm"], c["pick_over_fastest_warm"]]
        r1, r2 = (f"{v:.2f}" if v is not None else "-" for v in ratios)
        lines.append(
            f"{c['rows']:5d} {c['width']:6d} {c['fastest_triton'] or '-':>11s} {c['pick']:>7s} {r1:>10s} {r2:>12s}"
        )
        if c["errors"]:
            lines.append(f"      failed or wrong (left out): {', '.join(sorted(c['errors']))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--rows", type=_ints, default=[1, 4, 16, 64, 256])
    ap.add_argument("--widths", type=_ints, default=[4096, 16384, 65536])
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--calls", type=int, default=20, help="calls per graph for the warm timing")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module defines its @triton.jit functions
    elif not torch.cuda.is_available():
        print("no CUDA device (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    import triton

    from splitserve.kernels import radix_topk as T

    meta = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "k": args.k,
        "calls_per_graph": args.calls,
        "constants": {
            "MIN_ROWS": T.MIN_ROWS,
            "REG_MAX_WIDTH": T.REG_MAX_WIDTH,
            "REG_MAX_WIDTH_PICK": REG_MAX_WIDTH_PICK,
            "SPLIT_MAX_ROWS": T.SPLIT_MAX_ROWS,
        },
        "timing": "us per call, do_bench median of CUDA-graph replays: warm = graph of `calls` calls / calls; "
        "cold = graph of one call after an L2 flush",
    }
    cells = []
    for width in args.widths:
        for rows in args.rows:
            t = time.time()
            cells.append(run_cell(rows, width, args.k, args.calls, args.device))
            print(f"  rows {rows} width {width}: {time.time() - t:.1f} s", file=sys.stderr)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    result = {"meta": meta, "cells": cells, "suggested_min_rows": suggest_min_rows(cells)}
    print(fmt_table(cells))
    print(
        f"\nsuggested MIN_ROWS (choose_kernel's pick beats torch.topk warm at every width from): {result['suggested_min_rows']}"
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
