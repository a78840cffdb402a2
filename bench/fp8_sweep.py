"""FP8 decode kernels on one GPU: check, time old vs new against the byte floor, sweep launch configs.

    python -m splitserve.bench.fp8_sweep --out fp8-sweep.json [--smoke] [--quick]

For the weight-streaming kernels of issue 13's decode goal (kernels/fp8_gemm.py `fp8_gemv_triton`,
kernels/moe.py `fused_moe_fp8_gemv_triton`), in this order:
1. ceilings measured in the same run: device-to-device copy bandwidth (bytes read + written) and the
   bf16 matmul rate (bench/kernels.py measure_ceilings);
2. correctness at the real shapes (bench preset: hidden 7168, q_lora 1536, 128 heads, dense inter
   18432, moe inter 2048, 16 experts 8 active): each new kernel vs its PyTorch reference (bf16 and
   fp32 activations, the tensor-core and FMA variants, fp16 "precise" operands), every failure listed;
3. per shape and M: old kernel (the tiles kernel with in-register act_quant + split-K, and the
   grouped-GEMM MoE) vs new (GEMV_TABLE / MOE_GEMV_TABLE's configs) vs bf16 cuBLAS on the dequantised
   weight, each against the shape's byte floor (e4m3 weight + fp32 block scales + bf16 activations in
   and out, over the copy bandwidth); the MoE floor counts the experts the routing really selected;
4. a launch sweep per M class: coordinate descent over block_n, ctas_per_sm (-> split-K), num_warps,
   num_stages and dot (FMA / tensor core) from the table's config, scored by the summed time over all
   shapes of the class; prints "table row" lines to paste into GEMV_TABLE / MOE_GEMV_TABLE, and the
   best config per shape.
Times: medians of CUDA-graph replays (triton.testing.do_bench, which flushes the L2 between runs).
--smoke runs the same code on a CPU under TRITON_INTERPRET=1 at tiny shapes (wall-clock times, a
two-value sweep): a check of the harness, not of the numbers. Prints a summary table last.
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
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

DEV = "cuda"


@dataclass(frozen=True)
class Shapes:
    dense: tuple[tuple[str, int, int], ...]  # (name, N, K)
    ms: tuple[int, ...]  # decode rows timed
    moe_e: int
    moe_h: int
    moe_i: int
    moe_topk: int
    moe_ns: tuple[int, ...]  # tokens timed


REAL = Shapes(
    dense=(
        ("in_proj q_a|kv_a|wk", 2304, 7168),
        ("q_b", 24576, 1536),
        ("o_proj", 7168, 16384),
        ("dense gate|up", 36864, 7168),
        ("dense down", 7168, 18432),
        ("shared gate|up", 4096, 7168),
        ("shared down", 7168, 2048),
        ("indexer wq_b", 8192, 1536),
    ),
    ms=(1, 4, 8, 16, 64),
    moe_e=16,
    moe_h=7168,
    moe_i=2048,
    moe_topk=8,
    moe_ns=(1, 4, 8, 16),
)
SMOKE = Shapes(
    dense=(("a", 192, 384), ("b", 256, 256)),
    ms=(1, 4, 16, 64),
    moe_e=6,
    moe_h=256,
    moe_i=128,
    moe_topk=3,
    moe_ns=(1, 4, 16),
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timer_us(fn: Callable[[], Any]) -> float:
    """Median time of fn in microseconds (CUDA-graph replay on a GPU; one wall-clock call on a CPU)."""
    if DEV != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    from splitserve.bench.kernels import bench_ms, graph_of

    g = graph_of(fn)
    return bench_ms(g if g is not None else fn, rep=20) * 1e3


def try_time(fn: Callable[[], Any]) -> float | None:
    try:
        fn()  # compile (and any launch error) outside the timing
        _sync()
        return timer_us(fn)
    except Exception as e:  # noqa: BLE001 - a config that does not compile or launch is a data point
        print(f"    ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def dense_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    from splitserve.model.fp8 import quantize_weight

    return quantize_weight(torch.randn(n, k, device=DEV, generator=gen) * k**-0.5)


def act(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, device=DEV, generator=gen)
    x[:, :7] *= 20.0  # groups with different amax
    return x.to(dtype)


@dataclass
class MoeCase:
    q13: torch.Tensor
    s13: torch.Tensor
    q2: torch.Tensor
    s2: torch.Tensor


def moe_weights(sh: Shapes, gen: torch.Generator) -> MoeCase:
    from splitserve.kernels.moe import quantize_stacked

    e, h, i = sh.moe_e, sh.moe_h, sh.moe_i
    q13, s13 = quantize_stacked(torch.randn(e, 2 * i, h, device=DEV, generator=gen) * h**-0.5)
    q2, s2 = quantize_stacked(torch.randn(e, h, i, device=DEV, generator=gen) * i**-0.5)
    return MoeCase(q13, s13, q2, s2)


def routing(n: int, sh: Shapes, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    tw, ids = torch.randn(n, sh.moe_e, device=DEV, generator=gen).softmax(-1).topk(sh.moe_topk, dim=-1)
    return tw * 2.5, ids


# ---------------------------------------------------------------------------------------------
# 2. correctness
# ---------------------------------------------------------------------------------------------
def check_all(sh: Shapes, gen: torch.Generator, moe: MoeCase, rows: list[dict[str, Any]]) -> list[str]:
    from splitserve.kernels import fp8_gemm as G
    from splitserve.kernels import moe as KM

    bad: list[str] = []

    def note(
        kernel: str, shape: str, variant: str, run: Callable[[], torch.Tensor], ref: torch.Tensor, tol: float
    ) -> None:
        try:
            err = rel(run(), ref)
        except Exception as e:  # noqa: BLE001 - a kernel that fails to compile or launch is a failure to list
            print(f"  {kernel} {shape} {variant}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            err = float("inf")
        ok = err < tol
        rows.append(dict(kernel=kernel, shape=shape, variant=variant, rel=err, tol=tol, ok=ok))
        if not ok:
            bad.append(f"{kernel} {shape} {variant}: rel {err:.2e} >= {tol:g}")
        print(f"  {kernel:<9} {shape:<34} {variant:<22} rel {err:.2e}  {'ok' if ok else '!!! MISMATCH'}", flush=True)

    print("== correctness: new kernels vs their references (bf16 and fp32 activations)", flush=True)
    for name, n, k in sh.dense:
        q, s = dense_weight(n, k, gen)
        for m in sh.ms:
            for dtype in (torch.bfloat16, torch.float32):
                if dtype == torch.float32 and m not in (1, 8, 64):
                    continue
                x = act(m, k, dtype, gen)
                ref = G.fp8_linear_ref(x, q, s)
                # bf16 outputs round to 2^-8; fp32: the FMA and fp16 paths are exact but for summation
                # order, the e4m3 MMA keeps ~14 bits within a 128-deep step (fp8_gemm, "Accuracy on Hopper")
                tol_mma = 1e-2 if dtype == torch.bfloat16 else 3e-3
                tol_exact = 1e-2 if dtype == torch.bfloat16 else 1e-5
                sh_s = f"{name} M={m} {str(dtype)[6:]}"
                note("gemv", sh_s, "default", partial(G.fp8_gemv_triton, x, q, s), ref, tol_mma)
                if m <= 4:
                    note("gemv", sh_s, "dot", partial(G.fp8_gemv_triton, x, q, s, dot=True), ref, tol_mma)
                note(
                    "gemv",
                    sh_s,
                    "dot precise",
                    partial(G.fp8_gemv_triton, x, q, s, dot=True, precise=True),
                    ref,
                    tol_exact,
                )
                if m >= 8:
                    pre = partial(G.fp8_gemv_triton, x, q, s, prequant=True)
                    note("gemv", sh_s, "prequant", pre, ref, tol_mma)
                if m <= 4:
                    note("gemv", sh_s, "fma", partial(G.fp8_gemv_triton, x, q, s, dot=False), ref, tol_exact)
                note("dispatch", sh_s, "fp8_linear", partial(G.fp8_linear, x, q, s), ref, tol_mma)
        del q, s
    for nt in sh.moe_ns:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(nt, sh.moe_h, device=DEV, generator=gen).to(dtype)
            tw, ids = routing(nt, sh, gen)
            ref = KM.fused_moe_fp8_ref(x, moe.q13, moe.s13, moe.q2, moe.s2, tw, ids)
            # the hidden activation is requantised: a GEMM's ~1e-4 becomes ~3e-3 (fp8_diagnose TOL)
            tol = 5e-2 if dtype == torch.bfloat16 else 3e-2
            args = (x, moe.q13, moe.s13, moe.q2, moe.s2, tw, ids)
            sh_s = f"N={nt} {str(dtype)[6:]}"
            note("moe_gemv", sh_s, "default", partial(KM.fused_moe_fp8_gemv_triton, *args), ref, tol)
            note(
                "moe_gemv",
                sh_s,
                "split 2/2",
                partial(KM.fused_moe_fp8_gemv_triton, *args, splits=2, down_splits=2),
                ref,
                tol,
            )
            if dtype == torch.float32:
                note(
                    "moe_gemv",
                    sh_s,
                    "dot precise",
                    partial(KM.fused_moe_fp8_gemv_triton, *args, dot=True, precise=True),
                    ref,
                    # exact GEMMs, but fp32 summation order still flips a few e4m3 roundings of the
                    # requantised hidden activation: 1.7e-4 / 2.5e-4 measured at N = 16 / 64 (H200)
                    2e-3,
                )
            note("dispatch", sh_s, "fused_moe_fp8", partial(KM.fused_moe_fp8, *args), ref, tol)
    _sync()
    return bad


# ---------------------------------------------------------------------------------------------
# 3. old vs new, 4. sweep
# ---------------------------------------------------------------------------------------------
def dense_floor_us(n: int, k: int, m: int, bw: float) -> float:
    byts = n * k + 4 * (-(-n // 128)) * (-(-k // 128)) + 2 * m * (k + n)
    return byts / bw * 1e6


def moe_floor_us(sh: Shapes, ids: torch.Tensor, n: int, bw: float) -> float:
    used = int(torch.unique(ids).numel())
    h, i = sh.moe_h, sh.moe_i
    per_expert = 3 * h * i + 4 * (2 * (i // 128) * (h // 128) + (h // 128) * (i // 128))
    return (used * per_expert + 2 * 2 * n * h) / bw * 1e6


def axes(m: int, smoke: bool) -> list[tuple[str, tuple[Any, ...]]]:
    """The launch parameters the sweep moves, one at a time, and their values."""
    if smoke:
        return [("block_n", (32, 64)), ("ctas_per_sm", (4, 8))]
    out: list[tuple[str, tuple[Any, ...]]] = [
        ("block_n", (32, 64, 128)),
        ("ctas_per_sm", (2, 4, 8, 16)),
        ("num_warps", (4, 8)),
        ("num_stages", (2, 4, 6)),
    ]
    if m <= 4:
        out.append(("dot", (False, True)))
    if m >= 8:
        out.append(("prequant", (False, True)))
    return out


DEADLINE = float("inf")  # time.time() after which the sweeps stop trying configs (from --budget-s)


def descend(
    start: Any, m: int, cost: Callable[[Any], float | None], smoke: bool, passes: int
) -> tuple[Any, float | None, list[dict]]:
    """Coordinate descent from `start`: move to a neighbour when it beats the current by 2%, until a
    pass moves nothing, `passes` passes are done or the time budget is spent."""
    best, best_t = start, cost(start)
    tried = [dict(**asdict(start), total_us=best_t)]
    for _ in range(passes):
        moved = False
        for field, values in axes(m, smoke):
            for v in values:
                if v == getattr(best, field):
                    continue
                if time.time() > DEADLINE:
                    print("    (time budget spent: sweep stopped here)", flush=True)
                    return best, best_t, tried
                c = replace(best, **{field: v})
                t = cost(c)
                tried.append(dict(**asdict(c), total_us=t))
                if t is not None and (best_t is None or t < best_t * 0.98):
                    best, best_t, moved = c, t, True
        if not moved:
            break
    return best, best_t, tried


def dense_part(
    sh: Shapes,
    gen: torch.Generator,
    bw: float,
    smoke: bool,
    sweep_on: bool,
    result: dict[str, Any],
    deadline: Callable[[], float],
) -> None:
    """Old vs new per shape, then the GEMV sweep until deadline() (called when the sweep starts)."""
    global DEADLINE
    from splitserve.kernels import fp8_gemm as G

    sms = G._sm_count(torch.device(DEV))
    weights = {name: dense_weight(n, k, gen) for name, n, k in sh.dense}
    xs = {(name, m): act(m, k, torch.bfloat16, gen) for name, n, k in sh.dense for m in sh.ms}
    print("\n== fp8_linear at decode M: old (tiles + in-register act_quant + split-K) vs new (GEMV) vs bf16 cuBLAS")
    timing: list[dict[str, Any]] = []
    for name, n, k in sh.dense:
        q, s = weights[name]
        wb = G.dequant_weight_ref(q, s).to(torch.bfloat16)
        for m in sh.ms:
            x = xs[name, m]
            old = try_time(partial(G.fp8_linear_triton, x, q, s))
            new = try_time(partial(G.fp8_gemv_triton, x, q, s))
            b16 = try_time(partial(F.linear, x, wb))
            fl = dense_floor_us(n, k, m, bw)
            r = dict(shape=name, n=n, k=k, m=m, floor_us=fl, old_us=old, new_us=new, bf16_us=b16)
            timing.append(r)
            print(
                f"  {name:<22} M={m:<3} floor {fl:7.1f} us  old {_us(old)} ({_pct(fl, old)})  "
                f"new {_us(new)} ({_pct(fl, new)})  bf16 {_us(b16)} ({_pct(fl * 2, b16)} of its floor)",
                flush=True,
            )
        del wb
    result["dense_timing"] = timing
    if not sweep_on:
        return
    DEADLINE = deadline()

    print("\n== GEMV launch sweep per M class (total over the shapes; coordinate descent from GEMV_TABLE)")
    sweep: dict[str, Any] = {}
    for cls in sorted(G.GEMV_TABLE):
        ms = [m for m in sh.ms if G.gemv_class(m) == cls]
        if not ms:
            continue
        per_shape: dict[tuple[str, int], dict[str, Any]] = {}

        def cost(cfg: G.GemvConfig, ms: list[int] = ms, per_shape: dict = per_shape) -> float | None:
            total = 0.0
            for name, n, k in sh.dense:
                q, s = weights[name]
                for m in ms:
                    x = xs[name, m]
                    sp = G.gemv_splits(n, k, m, cfg.block_n, cfg.ctas_per_sm, sms)
                    t = try_time(
                        partial(
                            G.fp8_gemv_triton,
                            x,
                            q,
                            s,
                            block_n=cfg.block_n,
                            splits=sp,
                            num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages,
                            dot=cfg.dot,
                            prequant=cfg.prequant,
                        )
                    )
                    if t is None:
                        return None
                    total += t
                    key = (name, m)
                    if key not in per_shape or t < per_shape[key]["us"]:
                        fl = dense_floor_us(n, k, m, bw)
                        per_shape[key] = dict(shape=name, m=m, us=t, of_floor=fl / t, splits=sp, **asdict(cfg))
            return total

        t0 = time.time()
        best, best_t, tried = descend(G.GEMV_TABLE[cls], max(ms), cost, smoke, passes=1)
        start_t = tried[0]["total_us"]
        sweep[str(cls)] = dict(
            ms=ms, start=asdict(G.GEMV_TABLE[cls]), start_us=start_t, best=asdict(best), best_us=best_t, tried=tried
        )
        sweep[str(cls)]["per_shape_best"] = list(per_shape.values())
        print(
            f"  class M<={cls} (M in {ms}): table {_us(start_t)} -> best {_us(best_t)} total over shapes "
            f"({len(tried)} configs, {time.time() - t0:.0f} s)",
            flush=True,
        )
        print(f"  table row  GEMV_TABLE[{cls}] = {_cfg(best)}", flush=True)
        for r in per_shape.values():
            print(
                f"    best {r['shape']:<22} M={r['m']:<3} {r['us']:7.1f} us = {r['of_floor']:.0%} of floor  "
                f"block_n {r['block_n']} splits {r['splits']} warps {r['num_warps']} stages {r['num_stages']} "
                f"dot {r['dot']} prequant {r['prequant']}",
                flush=True,
            )
    result["dense_sweep"] = sweep


def moe_part(
    sh: Shapes, gen: torch.Generator, moe: MoeCase, bw: float, smoke: bool, sweep_on: bool, result: dict[str, Any]
) -> None:
    from splitserve.kernels import moe as KM

    print(f"\n== FP8 MoE at decode N (H={sh.moe_h}, I={sh.moe_i}, {sh.moe_e} experts, top-{sh.moe_topk}): old vs new")
    cases: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    timing: list[dict[str, Any]] = []
    for nt in sh.moe_ns:
        x = torch.randn(nt, sh.moe_h, device=DEV, generator=gen).to(torch.bfloat16)
        tw, ids = routing(nt, sh, gen)
        cases[nt] = (x, tw, ids)
        args = (x, moe.q13, moe.s13, moe.q2, moe.s2, tw, ids)
        old = try_time(partial(KM.fused_moe_fp8_triton, *args))
        new = try_time(partial(KM.fused_moe_fp8_gemv_triton, *args))
        fl = moe_floor_us(sh, ids, nt, bw)
        used = int(torch.unique(ids).numel())
        timing.append(dict(n=nt, experts_used=used, floor_us=fl, old_us=old, new_us=new))
        print(
            f"  N={nt:<3} experts used {used:<3} floor {fl:7.1f} us  old {_us(old)} ({_pct(fl, old)})  "
            f"new {_us(new)} ({_pct(fl, new)})",
            flush=True,
        )
    result["moe_timing"] = timing
    if not sweep_on:
        return

    print("\n== MoE launch sweep per N class (coordinate descent from MOE_GEMV_TABLE)")
    sweep: dict[str, Any] = {}
    for cls in sorted(KM.MOE_GEMV_TABLE):
        ns = [nt for nt in sh.moe_ns if KM.moe_gemv_class(nt) == cls]
        if not ns:
            continue

        def cost(cfg: Any, ns: list[int] = ns) -> float | None:
            total = 0.0
            saved = KM.MOE_GEMV_TABLE[cls]
            KM.MOE_GEMV_TABLE[cls] = cfg  # the splits follow cfg.ctas_per_sm as in serving
            try:
                for nt in ns:
                    x, tw, ids = cases[nt]
                    t = try_time(partial(KM.fused_moe_fp8_gemv_triton, x, moe.q13, moe.s13, moe.q2, moe.s2, tw, ids))
                    if t is None:
                        return None
                    total += t
            finally:
                KM.MOE_GEMV_TABLE[cls] = saved
            return total

        best, best_t, tried = descend(KM.MOE_GEMV_TABLE[cls], max(ns), cost, smoke, passes=1)
        sweep[str(cls)] = dict(
            ns=ns, start=asdict(KM.MOE_GEMV_TABLE[cls]), best=asdict(best), best_us=best_t, tried=tried
        )
        fl = sum(r["floor_us"] for r in timing if r["n"] in ns)
        print(
            f"  class N<={cls} (N in {ns}): table {_us(tried[0]['total_us'])} -> best {_us(best_t)} "
            f"(floor {fl:.1f} us, {_pct(fl, best_t)})",
            flush=True,
        )
        print(f"  moe table row  MOE_GEMV_TABLE[{cls}] = {_cfg(best)}", flush=True)
    result["moe_sweep"] = sweep


def _us(t: float | None) -> str:
    return "   fail " if t is None else f"{t:7.1f} us"


def _pct(floor: float, t: float | None) -> str:
    return "  - " if not t else f"{floor / t:4.0%}"


def _cfg(c: Any) -> str:
    return (
        f"GemvConfig(block_n={c.block_n}, ctas_per_sm={c.ctas_per_sm}, num_warps={c.num_warps}, "
        f"num_stages={c.num_stages}, dot={c.dot}, prequant={c.prequant})"
    )


def summary(result: dict[str, Any]) -> str:
    lines = [
        "",
        "summary: decode kernels, time (us) and share of the byte floor",
        "kernel | shape | M | floor | old | new | new/old | bf16",
    ]
    lines.append(" | ".join("---" for _ in range(8)))
    for r in result.get("dense_timing", []):
        ratio = f"{r['new_us'] / r['old_us']:.2f}" if r["new_us"] and r["old_us"] else "-"
        lines.append(
            f"fp8_linear | {r['shape']} | {r['m']} | {r['floor_us']:.1f} | {_us(r['old_us']).strip()} "
            f"({_pct(r['floor_us'], r['old_us']).strip()}) | {_us(r['new_us']).strip()} ({_pct(r['floor_us'], r['new_us']).strip()}) "
            f"| {ratio} | {_us(r['bf16_us']).strip()}"
        )
    for r in result.get("moe_timing", []):
        ratio = f"{r['new_us'] / r['old_us']:.2f}" if r["new_us"] and r["old_us"] else "-"
        lines.append(
            f"fused_moe_fp8 | {r['experts_used']} experts | {r['n']} | {r['floor_us']:.1f} | {_us(r['old_us']).strip()} "
            f"({_pct(r['floor_us'], r['old_us']).strip()}) | {_us(r['new_us']).strip()} ({_pct(r['floor_us'], r['new_us']).strip()}) "
            f"| {ratio} | -"
        )
    for part, key in (("dense_sweep", "GEMV_TABLE"), ("moe_sweep", "MOE_GEMV_TABLE")):
        for cls, s in result.get(part, {}).items():
            lines.append(
                f"{key}[{cls}]: best {_cfg(argparse.Namespace(**s['best']))} total {_us(s['best_us']).strip()}"
            )
    bad = result.get("failures", [])
    lines.append(f"correctness: {len(bad)} failure(s)" + ("" if not bad else ": " + "; ".join(bad[:5])))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global DEV, DEADLINE
    ap = argparse.ArgumentParser(prog="splitserve.bench.fp8_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="fp8-sweep.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes: checks the harness")
    ap.add_argument("--no-sweep", action="store_true", help="checks and old-vs-new timings only")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=180.0,
        help="wall-time budget of the whole run: the launch sweeps share what the checks and timings leave",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print(
                "--smoke needs TRITON_INTERPRET=1 in the environment (set before triton is imported)", file=sys.stderr
            )
            return 2
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("needs a CUDA device (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    sh = SMOKE if args.smoke else REAL
    import triton

    from splitserve.bench.kernels import measure_ceilings

    t0 = time.time()
    result: dict[str, Any] = {
        "command": "python -m splitserve.bench.fp8_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": dt.datetime.now(dt.UTC).isoformat(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1, default=str))

    ceil = measure_ceilings(DEV)
    result["ceilings"] = ceil
    bw = ceil["hbm_copy_bytes_per_s"]
    print(
        f"{result['device']}  torch {torch.__version__}  triton {triton.__version__}\n"
        f"ceilings (this run): copy {bw / 1e12:.2f} TB/s, bf16 matmul {ceil['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    gen = torch.Generator(device=DEV).manual_seed(0)
    moe = moe_weights(sh, gen)
    checks: list[dict[str, Any]] = []
    result["checks"] = checks
    result["failures"] = check_all(sh, gen, moe, checks)
    save()
    print(f"  checks done at {time.time() - t0:.0f} s", flush=True)
    try:
        end = t0 + args.budget_s - 10  # the summary and the last config tried after the deadline
        dense_part(sh, gen, bw, args.smoke, not args.no_sweep, result, lambda: time.time() + 0.6 * (end - time.time()))
        save()
        DEADLINE = end
        moe_part(sh, gen, moe, bw, args.smoke, not args.no_sweep, result)
    finally:
        result["seconds"] = time.time() - t0
        save()
        print(summary(result), flush=True)
        print(f"wrote {out} in {time.time() - t0:.0f} s", flush=True)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
