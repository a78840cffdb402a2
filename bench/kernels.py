"""Kernel benchmarks at the `bench` preset's shapes, against ceilings measured in the same run.

    python -m splitserve.bench.kernels [--out results.json] [--batches 1,8,64] [--contexts 4096,16384,65536]
                                       [--only indexer,sparse_mla,...] [--sweep]

Order of work (each step finishes before the next starts):
1. the two ceilings: HBM copy bandwidth (a large device-to-device copy, bytes read + written) and
   bf16 matmul rate (8192^3 on random data);
2. for every case, its floors — bytes / bandwidth and flops / matmul rate — written to the JSON;
3. per case: inputs, a correctness check of the Triton path against the PyTorch reference at
   these shapes (the run stops on a failure), then timings: the Triton path launched eagerly,
   the Triton path replayed from a CUDA graph, and the eager reference; each is the median of
   triton.testing.do_bench, which flushes L2 before every call.
`floor_ratio` = max(floors) / time: 1.0 would be the roofline. Bytes count what the operation must
touch (cache entries or weights read, outputs written), not an implementation's intermediates.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

# bench preset shapes (model/checkpoint.py PRESETS["bench"])
HIDDEN, HEADS, KV_LORA, ROPE, NOPE = 7168, 128, 512, 64, 128
IDX_HEADS, IDX_DIM, TOPK = 64, 128, 2048
MOE_INTER, EXPERTS, ACTIVE = 2048, 16, 8
BLOCK = 64
DEV = "cuda"
LAYERS = 2  # pools hold 2 layers and the kernels read layer 1: the layer stride is exercised


@dataclasses.dataclass
class Case:
    kernel: str
    params: dict[str, Any]
    bytes: float
    flops: float
    make: Callable[[], dict[str, Any]]  # -> inputs
    triton_fn: Callable[[dict[str, Any]], Any]
    ref_fn: Callable[[dict[str, Any]], Any]
    check: Callable[[Any, Any, dict[str, Any]], dict[str, float]]  # raises on mismatch
    graph: bool = True
    extra: dict[str, Callable[[dict[str, Any]], Any]] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel + "[" + ",".join(f"{k}={v}" for k, v in self.params.items()) + "]"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------
# ceilings
# ---------------------------------------------------------------------------------------------
def bench_ms(fn: Callable[[], Any], rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def measure_ceilings(device: str = DEV) -> dict[str, Any]:
    """HBM copy bandwidth (bytes read + written) and bf16 matmul rate on `device` (a CPU gets small
    sizes and wall-clock medians: only for smoke tests of the benchmark harnesses)."""
    gpu = device == "cuda"
    n = 1 << 30 if gpu else 1 << 26
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = bench_ms if gpu else _wall_ms
    ms = timer(partial(dst.copy_, src), rep=200)
    bw = 2 * n / (ms * 1e-3)
    del src, dst  # free before the matmul
    m = 8192 if gpu else 512
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    ms_mm = timer(partial(torch.matmul, a, b), rep=200)
    rate = 2 * m**3 / (ms_mm * 1e-3)
    del a, b
    if gpu:
        torch.cuda.empty_cache()
    return {
        "hbm_copy_bytes_per_s": bw,
        "copy_bytes": 2 * n,
        "copy_ms": ms,
        "bf16_matmul_flops_per_s": rate,
        "matmul_shape": [m, m, m],
        "matmul_ms": ms_mm,
    }


def _wall_ms(fn: Callable[[], Any], rep: int = 10) -> float:
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def _block_tables(bsz: int, ctx: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    per = -(-ctx // BLOCK)
    nb = bsz * per
    perm = torch.randperm(nb, generator=gen).to(DEV)
    return perm.view(bsz, per).int(), nb


def indexer_cases(batches, contexts) -> list[Case]:
    from splitserve.kernels import indexer as K

    cases = []
    for fp8 in (True, False):
        for bsz in batches:
            for ctx in contexts:
                kb = 1 if fp8 else 2
                nbytes = (
                    bsz * ctx * (IDX_DIM * kb + (4 if fp8 else 0))
                    + bsz * IDX_HEADS * (IDX_DIM * kb + 4)
                    + bsz * (ctx // BLOCK) * 4
                    + bsz * TOPK * 4
                )
                flops = 2 * bsz * IDX_HEADS * IDX_DIM * ctx + 3 * bsz * IDX_HEADS * ctx

                def make(bsz=bsz, ctx=ctx, fp8=fp8):
                    g = torch.Generator().manual_seed(bsz * 7 + ctx)
                    bt, nb = _block_tables(bsz, ctx, g)
                    q = torch.randn(bsz, IDX_HEADS, IDX_DIM, device=DEV)
                    w = torch.rand(bsz, IDX_HEADS, device=DEV) * IDX_HEADS**-0.5 * IDX_DIM**-0.5
                    kc = torch.randn(nb, LAYERS, BLOCK, IDX_DIM, device=DEV)
                    if fp8:
                        q = q.to(torch.float8_e4m3fn)
                        kc = kc.to(torch.float8_e4m3fn).view(torch.uint8)
                        ks = torch.rand(nb, LAYERS, BLOCK, device=DEV) * 0.01 + 0.01
                    else:
                        q, kc, ks = q.bfloat16(), kc.bfloat16(), None
                    sl = torch.full((bsz,), ctx, dtype=torch.int32, device=DEV) - torch.arange(bsz, device=DEV).int()
                    return {"args": (q, w, kc, ks, 1, bt, sl)}

                def check(out, ref, inp, fp8=fp8):
                    logits_ref = K.indexer_logits_decode_ref(*inp["args"])
                    logits = K.indexer_logits_decode_triton(*inp["args"])
                    fin = torch.isfinite(logits_ref)
                    if not torch.equal(fin, torch.isfinite(logits)):
                        raise AssertionError("masked positions differ")
                    err = rel_err(logits[fin], logits_ref[fin])
                    # the selections agree up to near-ties: compare the reference scores they pick
                    picked = logits_ref.gather(1, out.long().clamp(min=0)).sort(-1, descending=True).values
                    want = logits_ref.gather(1, ref.long().clamp(min=0)).sort(-1, descending=True).values
                    sel = rel_err(picked, want)
                    overlap = _overlap(out, ref)
                    tol = 2e-3 if fp8 else 1e-4  # Hopper's e4m3 dots accumulate with reduced precision
                    if err > tol or sel > tol or overlap < 0.99:
                        raise AssertionError(
                            f"logits rel err {err:.2e}, picked-score rel err {sel:.2e}, overlap {overlap}"
                        )
                    return {"logits_rel_err": err, "picked_scores_rel_err": sel, "index_overlap": overlap}

                cases.append(
                    Case(
                        "indexer_topk",
                        {"fp8": fp8, "B": bsz, "ctx": ctx},
                        nbytes,
                        flops,
                        make,
                        # mypy lets *args of unknown length fill topk too
                        lambda i: K.indexer_topk_decode_triton(*i["args"], topk=TOPK),  # type: ignore[misc]
                        lambda i: K.indexer_topk_decode_ref(*i["args"], topk=TOPK),  # type: ignore[misc]
                        check,
                        extra={"logits_only": lambda i: K.indexer_logits_decode_triton(*i["args"])},
                    )
                )
    return cases


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    tot, hit = 0, 0
    for x, y in zip(a.cpu(), b.cpu()):
        sx, sy = set(x[x >= 0].tolist()), set(y[y >= 0].tolist())
        hit += len(sx & sy)
        tot += max(len(sy), 1)
    return hit / tot


def sparse_mla_cases(batches, contexts) -> list[Case]:
    from splitserve.kernels import sparse_mla as K

    cases = []
    scale = (NOPE + ROPE) ** -0.5
    for bsz in batches:
        for ctx in contexts:
            nbytes = bsz * TOPK * (KV_LORA + ROPE) * 2 + bsz * HEADS * (2 * KV_LORA + ROPE) * 2 + bsz * TOPK * 4
            flops = 2 * bsz * HEADS * TOPK * (KV_LORA + ROPE + KV_LORA)

            def make(bsz=bsz, ctx=ctx):
                g = torch.Generator().manual_seed(bsz * 11 + ctx)
                bt, nb = _block_tables(bsz, ctx, g)
                q_lat = (torch.randn(bsz, HEADS, KV_LORA, device=DEV) * 0.05).bfloat16()
                q_rope = (torch.randn(bsz, HEADS, ROPE, device=DEV) * 0.05).bfloat16()
                latent = torch.randn(nb, LAYERS, BLOCK, KV_LORA + ROPE, device=DEV, dtype=torch.bfloat16)
                idx = torch.stack([torch.randperm(ctx - b, device=DEV)[:TOPK] for b in range(bsz)]).int()
                return dict(args=(q_lat, q_rope, latent, 1, bt, idx, scale))

            def check(out, ref, inp):
                err = rel_err(out, ref)
                if err > 1e-2 or out.isnan().any():
                    raise AssertionError(f"rel err {err:.2e}")
                return {"rel_err": err}

            cases.append(
                Case(
                    "sparse_mla_decode",
                    {"B": bsz, "ctx": ctx},
                    nbytes,
                    flops,
                    make,
                    lambda i: K.sparse_mla_decode_triton(*i["args"]),
                    lambda i: K.sparse_mla_decode_ref(*i["args"]),
                    check,
                )
            )
    return cases


def elementwise_cases(batches) -> list[Case]:
    from splitserve.kernels import norm, quant, rotary

    def close(tol):
        def check(out, ref, inp):
            outs = out if isinstance(out, tuple) else (out,)
            refs = ref if isinstance(ref, tuple) else (ref,)
            errs = [rel_err(o.float(), r.float()) for o, r in zip(outs, refs)]
            if max(errs) > tol:
                raise AssertionError(f"rel errs {errs}")
            return {"rel_err": max(errs)}

        return check

    cases = []
    for bsz in batches:

        def mk_norm(bsz=bsz):
            return dict(
                x=torch.randn(bsz, HIDDEN, device=DEV).bfloat16(),
                r=torch.randn(bsz, HIDDEN, device=DEV).bfloat16(),
                w=(1 + 0.1 * torch.randn(HIDDEN, device=DEV)).bfloat16(),
            )

        cases.append(
            Case(
                "rms_norm_residual",
                {"B": bsz, "D": HIDDEN},
                (4 * bsz * HIDDEN + HIDDEN) * 2,
                4 * bsz * HIDDEN,
                mk_norm,
                lambda i: norm.rms_norm_triton(i["x"], i["w"], 1e-6, i["r"]),
                lambda i: norm.rms_norm_ref(i["x"], i["w"], 1e-6, i["r"]),
                close(1e-2),
            )
        )

        def mk_rope(bsz=bsz, heads=HEADS, width=NOPE + ROPE, start=NOPE):
            q = torch.randn(bsz, heads, width, device=DEV).bfloat16()
            return dict(
                x=q[..., start : start + ROPE],
                c=torch.randn(bsz, ROPE // 2, device=DEV).bfloat16(),
                s=torch.randn(bsz, ROPE // 2, device=DEV).bfloat16(),
            )

        cases.append(
            Case(
                "rope_interleaved_q",
                {"B": bsz, "H": HEADS, "d": ROPE},
                2 * bsz * HEADS * ROPE * 2 + bsz * ROPE * 2,
                6 * bsz * HEADS * ROPE,
                mk_rope,
                lambda i: rotary.rope_triton(i["x"], i["c"], i["s"], True),
                lambda i: rotary.rope_ref(i["x"], i["c"], i["s"], True),
                close(1e-2),
            )
        )

        def mk_irope(bsz=bsz):
            return mk_rope(bsz, IDX_HEADS, IDX_DIM, 0)

        cases.append(
            Case(
                "rope_halfsplit_indexer_q",
                {"B": bsz, "H": IDX_HEADS, "d": ROPE},
                2 * bsz * IDX_HEADS * ROPE * 2 + bsz * ROPE * 2,
                6 * bsz * IDX_HEADS * ROPE,
                mk_irope,
                lambda i: rotary.rope_triton(i["x"], i["c"], i["s"], False),
                lambda i: rotary.rope_ref(i["x"], i["c"], i["s"], False),
                close(1e-2),
            )
        )

        def mk_q(bsz=bsz):
            return dict(x=torch.randn(bsz, HIDDEN, device=DEV).bfloat16())

        def check_q(out, ref, inp):
            if not (torch.equal(out[1], ref[1]) and torch.equal(out[0].view(torch.uint8), ref[0].view(torch.uint8))):
                raise AssertionError("act_quant differs from the reference")
            return {"bit_exact": 1.0}

        cases.append(
            Case(
                "act_quant",
                {"B": bsz, "D": HIDDEN},
                bsz * HIDDEN * 3 + bsz * HIDDEN // 128 * 4,
                3 * bsz * HIDDEN,
                mk_q,
                lambda i: quant.act_quant_triton(i["x"]),
                lambda i: quant.act_quant_ref(i["x"]),
                check_q,
            )
        )
    return cases


def moe_cases(batches) -> list[Case]:
    from splitserve.kernels import moe as K

    shared: dict[str, Any] = {}

    def weights():
        if "w13" not in shared:
            g = torch.Generator(device=DEV).manual_seed(0)
            shared["w13"] = (
                torch.randn(EXPERTS, 2 * MOE_INTER, HIDDEN, device=DEV, generator=g) * HIDDEN**-0.5
            ).bfloat16()
            shared["w2"] = (
                torch.randn(EXPERTS, HIDDEN, MOE_INTER, device=DEV, generator=g) * MOE_INTER**-0.5
            ).bfloat16()
        return shared["w13"], shared["w2"]

    def fp8_weights():
        if "q13" not in shared:
            w13, w2 = weights()
            q13, s13 = K.quantize_stacked(w13)
            q2, s2 = K.quantize_stacked(w2)
            shared.update(q13=q13, s13=s13, q2=q2, s2=s2)
        return shared["q13"], shared["s13"], shared["q2"], shared["s2"]

    cases = []
    for fp8 in (False, True):
        for n in batches:

            def make(n=n, fp8=fp8):
                g = torch.Generator().manual_seed(n)
                ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:ACTIVE] for _ in range(n)]).to(DEV)
                tw = torch.rand(n, ACTIVE, device=DEV) * 2.5 / ACTIVE
                x = torch.randn(n, HIDDEN, device=DEV).bfloat16()
                inp = dict(x=x, ids=ids, tw=tw, touched=int(ids.unique().numel()))
                if fp8:
                    inp["w"] = fp8_weights()
                else:
                    inp["w"] = weights()
                return inp

            # expected distinct experts for n tokens choosing ACTIVE of EXPERTS uniformly
            touched = EXPERTS * (1 - (1 - ACTIVE / EXPERTS) ** n)
            wbytes = (3 * MOE_INTER * HIDDEN) * (1 if fp8 else 2) * touched
            if fp8:
                wbytes += touched * (2 * MOE_INTER // 128 * HIDDEN // 128 + HIDDEN // 128 * MOE_INTER // 128) * 4
            nbytes = wbytes + 2 * n * HIDDEN * 2
            flops = 6 * n * ACTIVE * HIDDEN * MOE_INTER

            def check(out, ref, inp, fp8=fp8):
                err = rel_err(out, ref)
                if err > (2e-2 if fp8 else 1e-2):
                    raise AssertionError(f"rel err {err:.2e}")
                return {"rel_err": err, "experts_touched": inp["touched"]}

            if fp8:
                tri = lambda i: K.fused_moe_fp8_triton(
                    i["x"], i["w"][0], i["w"][1], i["w"][2], i["w"][3], i["tw"], i["ids"]
                )
                ref = lambda i: K.fused_moe_fp8_ref(
                    i["x"], i["w"][0], i["w"][1], i["w"][2], i["w"][3], i["tw"], i["ids"]
                )
            else:
                tri = lambda i: K.fused_moe_triton(i["x"], i["w"][0], i["w"][1], i["tw"], i["ids"])
                ref = lambda i: K.fused_moe_ref(i["x"], i["w"][0], i["w"][1], i["tw"], i["ids"])
            extra = (
                {}
                if fp8
                else {
                    "align_torch": lambda i: K.moe_align_ref(i["ids"], EXPERTS, K._block_m(i["ids"].numel(), EXPERTS)),
                    "align_triton": lambda i: K.moe_align_triton(
                        i["ids"], EXPERTS, K._block_m(i["ids"].numel(), EXPERTS)
                    ),
                }
            )
            cases.append(
                Case(
                    "fused_moe_fp8" if fp8 else "fused_moe",
                    {"N": n, "E": EXPERTS, "k": ACTIVE},
                    nbytes,
                    flops,
                    make,
                    tri,
                    ref,
                    check,
                    extra=extra,
                )
            )
    return cases


# ---------------------------------------------------------------------------------------------
# runner
# ---------------------------------------------------------------------------------------------
def graph_of(fn: Callable[[], Any], calls: int = 1) -> Callable[[], Any] | None:
    """A CUDA graph replay of `calls` back-to-back calls of fn (None if fn cannot be captured)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        return g.replay
    except Exception as exc:  # noqa: BLE001 - reported in the results
        print(f"    (graph capture failed: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def run_case(case: Case, ceil: dict[str, float], time_ref: bool) -> dict[str, Any]:
    inp = case.make()
    torch.cuda.synchronize()
    out = case.triton_fn(inp)
    ref = case.ref_fn(inp)
    torch.cuda.synchronize()
    checked = case.check(out, ref, inp)
    del out, ref
    res: dict[str, Any] = {"check": checked}
    ms = bench_ms(partial(case.triton_fn, inp))
    res["triton_ms"] = ms
    g = graph_of(partial(case.triton_fn, inp)) if case.graph else None
    res["triton_graph_ms"] = bench_ms(g) if g is not None else None
    for name, fn in case.extra.items():
        res[f"{name}_ms"] = bench_ms(partial(fn, inp))
        ge = graph_of(partial(fn, inp))
        res[f"{name}_graph_ms"] = bench_ms(ge) if ge is not None else None
    if time_ref:
        try:
            res["ref_ms"] = bench_ms(partial(case.ref_fn, inp), rep=50)
        except torch.OutOfMemoryError:
            res["ref_ms"] = None
    best = min(t for t in (res["triton_ms"], res["triton_graph_ms"]) if t is not None)
    floor_ms = max(case.bytes / ceil["hbm_copy_bytes_per_s"], case.flops / ceil["bf16_matmul_flops_per_s"]) * 1e3
    res["best_ms"] = best
    res["floor_ratio"] = floor_ms / best
    res["bytes_per_s_over_copy_bw"] = case.bytes / (best * 1e-3) / ceil["hbm_copy_bytes_per_s"]
    res["flops_per_s_over_matmul_rate"] = case.flops / (best * 1e-3) / ceil["bf16_matmul_flops_per_s"]
    if res.get("ref_ms"):
        res["speedup_vs_ref"] = res["ref_ms"] / best
    del inp
    torch.cuda.empty_cache()
    return res


def sweep_sparse_mla(ceil: dict[str, float], batches) -> list[dict[str, Any]]:
    """A few launch configurations of the sparse MLA kernel (block_h, block_n, warps, stages, splits)."""
    from splitserve.kernels import sparse_mla as K

    rows = []
    base = dict(block_h=64, num_warps=8)
    configs: list[dict[str, Any]] = [
        dict(base, block_n=32, num_stages=2),
        dict(base, block_n=64, num_stages=2),
        dict(base, block_n=32, num_stages=3),
        dict(base, block_n=64, num_stages=1),
        dict(base, block_n=64, num_stages=3),
        dict(base, block_n=128, num_stages=1),
    ]
    for bsz in [b for b in batches if b in (1, 64)] or batches[:1]:
        case = sparse_mla_cases([bsz], [16384])[0]
        inp = case.make()
        ref = case.ref_fn(inp)
        split_opts = (1, 2) if bsz >= 32 else (8, 16, 32)
        trials = (
            [(cfg, None, False) for cfg in configs]
            + [(configs[1], None, True), (configs[0], None, True)]
            + [(configs[1], sp, po) for sp in split_opts for po in (False, True)]
        )
        for cfg, splits, po in trials:
            try:
                fn = lambda a=inp["args"]: K.sparse_mla_decode_triton(
                    *a, num_splits=splits, prefetch=po, wgmma=False, **cfg
                )
                err = rel_err(fn(), ref)
                g = graph_of(fn)
                ms = bench_ms(g if g is not None else fn)
            except Exception as exc:  # noqa: BLE001
                rows.append(
                    {"B": bsz, **cfg, "splits": splits, "prefetch": po, "error": f"{type(exc).__name__}: {exc}"[:300]}
                )
                print(
                    f"  sweep sparse_mla B={bsz} {cfg} splits={splits} prefetch={po}: {type(exc).__name__}", flush=True
                )
                continue
            rows.append(
                {
                    "B": bsz,
                    **cfg,
                    "splits": splits,
                    "prefetch": po,
                    "graph_ms": ms,
                    "rel_err": err,
                    "floor_ratio": max(
                        case.bytes / ceil["hbm_copy_bytes_per_s"], case.flops / ceil["bf16_matmul_flops_per_s"]
                    )
                    * 1e3
                    / ms,
                }
            )
            print(
                f"  sweep sparse_mla B={bsz} {cfg} splits={splits} prefetch={po}: {ms * 1e3:.1f} us (err {err:.1e})",
                flush=True,
            )
        del inp, ref, fn
        torch.cuda.empty_cache()
    return rows


def sweep_moe(ceil: dict[str, float], batches) -> list[dict[str, Any]]:
    from splitserve.kernels import moe as K

    rows = []
    configs: list[dict[str, Any]] = [
        dict(block_n=64, num_warps=4, num_stages=4),
        dict(block_n=32, num_warps=4, num_stages=5),
        dict(block_n=32, num_warps=4, num_stages=4),
        dict(block_n=64, num_warps=4, num_stages=3),
        dict(block_n=32, num_warps=2, num_stages=5),
    ]
    sel = [b for b in batches if b in (1, 64)] or batches[:1]
    for case in moe_cases(sel)[: len(sel)]:
        inp = case.make()
        for cfg in configs:
            try:
                fn = lambda: K.fused_moe_triton(inp["x"], inp["w"][0], inp["w"][1], inp["tw"], inp["ids"], **cfg)  # noqa: F821 - runs before `del inp` frees this case
                g = graph_of(fn)
                ms = bench_ms(g if g is not None else fn)
            except Exception as exc:  # noqa: BLE001
                rows.append({"N": case.params["N"], **cfg, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            rows.append(
                {
                    "N": case.params["N"],
                    **cfg,
                    "graph_ms": ms,
                    "floor_ratio": case.bytes / ceil["hbm_copy_bytes_per_s"] * 1e3 / ms,
                }
            )
            print(f"  sweep fused_moe N={case.params['N']} {cfg}: {ms * 1e3:.1f} us", flush=True)
        del inp
    return rows


def fmt_table(results: list[dict[str, Any]]) -> str:
    head = f"{'case':58s} {'triton':>9s} {'graph':>9s} {'ref':>9s} {'floor':>9s} {'%roof':>6s} {'xref':>6s}"
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:58s} ERROR {r['error'][:60]}")
            continue
        t = r["result"]
        f = lambda v: f"{v * 1e3:8.1f}u" if v is not None else "      - "
        floor = max(r["floor_bytes_ms"], r["floor_flops_ms"])
        lines.append(
            f"{r['name']:58s} {f(t['triton_ms'])} {f(t['triton_graph_ms'])} {f(t.get('ref_ms'))} {f(floor)} "
            f"{100 * t['floor_ratio']:5.1f}% {t.get('speedup_vs_ref', float('nan')):5.1f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON path (default bench/results/kernels-<gpu>-<time>.json)"
    )
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--contexts", default="4096,16384,65536")
    ap.add_argument("--only", default="", help="comma list of: indexer,sparse_mla,elementwise,moe")
    ap.add_argument("--no-ref", action="store_true", help="skip timing the eager references")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configs of sparse_mla and fused_moe")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the kernel benchmarks need a GPU", file=sys.stderr)
        return 2
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    only = set(filter(None, args.only.split(",")))
    import triton

    gpu = torch.cuda.get_device_name()
    out = args.out or Path(__file__).parent / "results" / (
        f"kernels-{gpu.replace(' ', '_')}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "command": " ".join(["python -m splitserve.bench.kernels"] + (argv if argv is not None else sys.argv[1:])),
        "device": {
            "name": gpu,
            "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
        },
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "timing": "triton.testing.do_bench median (L2 flushed before each call); graph = CUDA-graph replay of the same call",
    }

    def save() -> None:
        out.write_text(json.dumps(doc, indent=1))

    t0 = time.time()
    ceil = measure_ceilings()
    doc["ceilings"] = ceil
    print(
        f"{gpu}: HBM copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
        f"{ceil['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )

    cases: list[Case] = []
    if not only or "indexer" in only:
        cases += indexer_cases(batches, contexts)
    if not only or "sparse_mla" in only:
        cases += sparse_mla_cases(batches, contexts)
    if not only or "elementwise" in only:
        cases += elementwise_cases(batches)
    if not only or "moe" in only:
        cases += moe_cases(batches)
    results: list[dict[str, Any]] = []
    for c in cases:  # the floors first, before anything is timed
        results.append(
            {
                "name": c.name,
                "kernel": c.kernel,
                "params": c.params,
                "bytes": c.bytes,
                "flops": c.flops,
                "floor_bytes_ms": c.bytes / ceil["hbm_copy_bytes_per_s"] * 1e3,
                "floor_flops_ms": c.flops / ceil["bf16_matmul_flops_per_s"] * 1e3,
            }
        )
    doc["results"] = results
    save()
    failed = False
    for c, r in zip(cases, results):
        try:
            r["result"] = run_case(c, ceil, not args.no_ref)
            t = r["result"]
            print(
                f"  {c.name:58s} {t['best_ms'] * 1e3:9.1f} us  {100 * t['floor_ratio']:5.1f}% of floor  {t['check']}",
                flush=True,
            )
        except AssertionError as exc:
            r["error"] = f"correctness: {exc}"
            failed = True
            print(f"  {c.name}: CORRECTNESS FAILURE {exc}", flush=True)
        except Exception as exc:  # noqa: BLE001 - keep going, record it
            r["error"] = f"{type(exc).__name__}: {exc}"[:500]
            failed = True
            print(f"  {c.name}: ERROR {r['error']}", flush=True)
            torch.cuda.empty_cache()
        save()
    if args.sweep:
        if not only or "sparse_mla" in only:
            doc["sweep_sparse_mla"] = sweep_sparse_mla(ceil, batches)
            save()
        if not only or "moe" in only:
            doc["sweep_moe"] = sweep_moe(ceil, batches)
            save()
    doc["wall_s"] = time.time() - t0
    save()
    print()
    print(
        f"{gpu}; copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s; matmul {ceil['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s; "
        f"times are medians; %roof = floor / best time; xref = ref / best"
    )
    print(fmt_table(results))
    print(f"\nwrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
