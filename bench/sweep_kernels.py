"""Launch-configuration sweeps of the two kernels that dominate the engine benchmark's profiles:
sparse MLA (decode batches and prefill-sized row counts) and the fused MoE (decode and prefill
token counts), at the bench preset's shapes. Each configuration is checked against the PyTorch
reference (on a subset of rows where the reference would not fit) and timed from a CUDA graph.

    python -m splitserve.bench.sweep_kernels [--out sweep.json] [--mla-rows 1,64,256,8192] [--mla-fp8-rows 64]
        [--moe-tokens 64,8192]   (an empty list skips that kernel)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from splitserve.bench.kernels import (
    ACTIVE,
    BLOCK,
    EXPERTS,
    HEADS,
    HIDDEN,
    KV_LORA,
    MOE_INTER,
    ROPE,
    TOPK,
    bench_ms,
    graph_of,
    measure_ceilings,
    rel_err,
)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


#: the Triton kernel (its two best), the pipelined Hopper kernel's tiles x stages, the warp-specialised Hopper
#: kernel with its remote product left in flight (the default) or waited for
MLA_CONFIGS: list[dict[str, Any]] = [
    dict(wgmma=False, block_n=64, num_warps=8, num_stages=2, prefetch=False),
    dict(wgmma=False, block_n=64, num_warps=8, num_stages=2, prefetch=True),
    *(dict(wgmma=True, warp_specialized=False, block_n=n, num_stages=st) for n, st in ((64, 2), (32, 2), (32, 3))),
    *(dict(wgmma=True, warp_specialized=True, ws_overlap=o) for o in (True, False)),
]


def sweep_mla(rows: int, ceil: dict[str, float], fp8: bool = False) -> list[dict[str, Any]]:
    """Launch configurations of the sparse MLA kernel at `rows` query rows (bench widths, top-2048 of
    16k positions): each checked on 8 rows against the reference, timed from a CUDA graph."""
    from splitserve.kernels import sparse_mla as K

    g = torch.Generator(device="cuda").manual_seed(0)
    ctx = 16384
    nb = ctx // BLOCK + 8
    latent = (torch.randn(nb, 2, BLOCK, KV_LORA + ROPE, device="cuda", generator=g) * 0.5).bfloat16()
    if fp8:
        from splitserve.engine.cache import CachePool

        pool = CachePool.__new__(CachePool)
        pool.kv_lora, pool.fp8_group, pool.dtype = KV_LORA, 128, latent.dtype
        latent = pool._pack_fp8(latent.reshape(-1, latent.shape[-1])).view(*latent.shape[:3], -1)
    bt = torch.randperm(nb, device="cuda", generator=g)[: ctx // BLOCK].int()[None].expand(rows, -1)
    idx = torch.stack([torch.randperm(ctx, device="cuda", generator=g)[:TOPK] for _ in range(min(rows, 64))]).int()
    idx = idx.repeat(-(-rows // idx.shape[0]), 1)[:rows].contiguous()
    ql = (torch.randn(rows, HEADS, KV_LORA, device="cuda", generator=g) * 0.1).bfloat16()
    qr = (torch.randn(rows, HEADS, ROPE, device="cuda", generator=g) * 0.1).bfloat16()
    sub = slice(0, 8)
    ref = K.sparse_mla_decode_ref(ql[sub], qr[sub], latent, 1, bt[sub], idx[sub], 0.1)
    nbytes = rows * TOPK * latent.shape[-1] * latent.element_size()
    flops = rows * HEADS * TOPK * (2 * KV_LORA + ROPE) * 2
    from splitserve.kernels import sparse_mla_hopper as H

    out: list[dict[str, Any]] = []
    overlap = H.WS_OVERLAP
    for cfg in MLA_CONFIGS:
        if fp8 and cfg["wgmma"]:
            continue  # bf16 entries only
        try:
            call = {k: v for k, v in cfg.items() if k != "ws_overlap"}
            H.WS_OVERLAP = cfg.get("ws_overlap", overlap)  # read at every call
            fn = lambda: K.sparse_mla_decode_triton(ql, qr, latent, 1, bt, idx, 0.1, **call)
            err = rel_err(fn()[sub], ref)
            gr = graph_of(fn)
            ms = bench_ms(gr if gr is not None else fn)
        except Exception as exc:  # noqa: BLE001
            out.append({"rows": rows, "fp8": fp8, **cfg, "error": f"{type(exc).__name__}: {exc}"[:200]})
            print(f"mla rows={rows} fp8={fp8} {cfg}: {out[-1]['error']}", flush=True)
            continue
        r = {
            "rows": rows,
            "fp8": fp8,
            **cfg,
            "us": ms * 1e3,
            "err": err,
            "bytes_ratio": nbytes / ceil["hbm_copy_bytes_per_s"] * 1e3 / ms,
            "flops_ratio": flops / ceil["bf16_matmul_flops_per_s"] * 1e3 / ms,
        }
        out.append(r)
        print(
            f"mla rows={rows} fp8={fp8} {cfg}: {r['us']:.1f} us err {err:.1e} "
            f"bytes {r['bytes_ratio']:.2f} flops {r['flops_ratio']:.2f}",
            flush=True,
        )
    H.WS_OVERLAP = overlap
    return out


def sweep_moe(tokens: int, ceil: dict[str, float]) -> list[dict[str, Any]]:
    from splitserve.kernels import moe as K

    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = (torch.randn(EXPERTS, 2 * MOE_INTER, HIDDEN, device="cuda", generator=g) * HIDDEN**-0.5).bfloat16()
    w2 = (torch.randn(EXPERTS, HIDDEN, MOE_INTER, device="cuda", generator=g) * MOE_INTER**-0.5).bfloat16()
    ids = torch.stack([torch.randperm(EXPERTS, device="cuda", generator=g)[:ACTIVE] for _ in range(tokens)])
    tw = torch.rand(tokens, ACTIVE, device="cuda", generator=g) * 2.5 / ACTIVE
    x = torch.randn(tokens, HIDDEN, device="cuda", generator=g).bfloat16()
    ref = K.fused_moe_ref(x, w13, w2, tw, ids)
    flops = 6 * tokens * ACTIVE * HIDDEN * MOE_INTER
    out: list[dict[str, Any]] = []
    configs: list[dict[str, Any]] = [
        dict(block_m=None, block_n=64, block_k=None, num_warps=4, num_stages=4)
    ]  # the default
    configs += [
        dict(block_m=m, block_n=n, block_k=64, num_warps=w, num_stages=s)
        for m in ((16, 32) if tokens <= 64 else (32, 64, 128) if tokens <= 256 else (64, 128))
        for n in (64, 128)
        for w in (4, 8)
        for s in (3, 4)
    ]
    for cfg in configs:
        try:
            fn = lambda: K.fused_moe_triton(x, w13, w2, tw, ids, **cfg)
            err = rel_err(fn(), ref)
            gr = graph_of(fn)
            ms = bench_ms(gr if gr is not None else fn)
        except Exception as exc:  # noqa: BLE001
            out.append({"tokens": tokens, **cfg, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        r = {
            "tokens": tokens,
            **cfg,
            "us": ms * 1e3,
            "err": err,
            "flops_ratio": flops / ceil["bf16_matmul_flops_per_s"] * 1e3 / ms,
        }
        out.append(r)
        print(f"moe tokens={tokens} {cfg}: {r['us']:.1f} us err {err:.1e} flops {r['flops_ratio']:.2f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("sweep-kernels.json"))
    ap.add_argument("--mla-rows", type=_ints, default=_ints("1,64,256,8192"))
    ap.add_argument("--mla-fp8-rows", type=_ints, default=_ints("64"), help="rows for the FP8 latent cache")
    ap.add_argument("--moe-tokens", type=_ints, default=_ints("8192"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    ceil = measure_ceilings()
    doc: dict[str, Any] = {
        "command": "python -m splitserve.bench.sweep_kernels " + " ".join(argv or sys.argv[1:]),
        "device": torch.cuda.get_device_name(),
        "ceilings": ceil,
        "mla": [],
        "moe": [],
    }
    for r, fp8 in [(r, False) for r in args.mla_rows] + [(r, True) for r in args.mla_fp8_rows]:
        doc["mla"] += sweep_mla(r, ceil, fp8)
        args.out.write_text(json.dumps(doc, indent=1))
    for t in args.moe_tokens:
        doc["moe"] += sweep_moe(t, ceil)
        args.out.write_text(json.dumps(doc, indent=1))
    for kind, key in (("mla", "rows"), ("moe", "tokens")):
        for n, fp8 in sorted({(r[key], r.get("fp8", False)) for r in doc[kind]}):
            ok = [r for r in doc[kind] if (r[key], r.get("fp8", False)) == (n, fp8) and "us" in r and r["err"] < 2e-2]
            if ok:
                best = min(ok, key=lambda r: r["us"])
                print(f"best {kind} {key}={n}{' fp8' if fp8 else ''}: {best}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
