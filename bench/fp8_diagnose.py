"""FP8 kernels against their references, each on the same inputs: a table of errors per kernel and shape.

Why per kernel and not per network: with FP8 activations (act_quant per 1x128 group) a random
network is chaotic. A perturbation of relative size e moves a few activations across an e4m3
rounding boundary, which turns into an error of ~sqrt(e * 2^-4) after the next quantisation; a
few layers saturate it. On the kernel-shaped small preset (tests/engine/test_fp8_cuda.py) noise of
1e-6 (1e-7) on every FP8 GEMM output moves the CPU reference's logits by 14% (median |dlogprob| of
the greedy token 0.09 at 1e-7), the same as switching activation quantisation off (33%); without
activation quantisation the same 1e-6 noise moves them by 4e-6. So logits of a GPU run vs the CPU
references (or paged rows vs spans) cannot tell a correct kernel from a wrong one; the kernels'
outputs for the inputs they were given can.

Two parts (about a minute on an H200):
1. the kernels alone at DeepSeek-V3.2's shapes (bench preset): fp8_linear on every dense shape and
   launch path (fused act_quant + split-K for M <= 64, act_quant + 128x128 tiles above), also with
   fp16 tensor-core operands (precise=True, exact) to separate the FP8 MMA's accumulation error
   from a fault; fused_moe_fp8 (decode and prefill tiles); act_quant; sparse MLA over the FP8
   latent cache;
2. the kernel-shaped small network on the GPU: `gpu.score()` and an engine run (paged rows path, bf16
   and FP8 latents, eager steps) with every FP8 kernel call checked against its reference on the
   same inputs (`KernelCheck`), the worst call per kernel and shape listed.

Usage (repository root, CUDA):  python -m splitserve.bench.fp8_diagnose [--out FILE.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypedDict

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


# ---------------------------------------------------------------------------------------------
# every FP8 kernel call inside the model checked against its reference (same inputs)
# ---------------------------------------------------------------------------------------------
@dataclass
class KernelCheck:
    """Context manager: while active, the model's FP8 kernel dispatchers (model/linear.py's
    fp8_linear, model/moe.py's fused_moe_fp8, model/attention.py's sparse_mla_decode and act_quant)
    run the kernel AND its reference on the same inputs, return the kernel's output, and record the
    relative error per (kernel, shape, path). Calls made while a CUDA graph is being captured are
    passed through unchecked (references may synchronise)."""

    records: dict[tuple[str, str], list[float]] = field(default_factory=lambda: defaultdict(list))
    worst: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)  # -> (rel, max abs)

    def _note(self, kernel: str, shape: str, out: torch.Tensor, ref: torch.Tensor) -> None:
        r, m = rel(out, ref), max_abs(out, ref)
        if not math.isfinite(r):
            r = float("inf")
        self.records[kernel, shape].append(r)
        if (kernel, shape) not in self.worst or r > self.worst[kernel, shape][0]:
            self.worst[kernel, shape] = (r, m)

    @contextmanager
    def active(self) -> Iterator[KernelCheck]:
        import splitserve.model.attention as A
        import splitserve.model.linear as L
        import splitserve.model.moe as M
        from splitserve.kernels import fp8_gemm, moe, quant, sparse_mla

        def capturing() -> bool:
            return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()

        def wrap(
            name: str,
            kernel: Callable,
            ref: Callable,
            describe: Callable[..., str],
            compare: Callable[[Any, Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
        ) -> Callable:
            def checked(*args, **kw):
                out = kernel(*args, **kw)
                if not capturing():
                    want = ref(*args, **kw)
                    a, b = compare(out, want) if compare else (out, want)
                    self._note(name, describe(*args), a, b)
                return out

            return checked

        def lin_desc(x, w, s):
            m = x.numel() // x.shape[-1]
            cfg = fp8_gemm._config(m, w.shape[0], w.shape[1], fp8_gemm._sm_count(x.device))
            if fp8_gemm.fp8_linear_path(m) == "gemv":
                g = fp8_gemm.GEMV_TABLE[fp8_gemm.gemv_class(m)]
                return f"M={m} N={w.shape[0]} K={w.shape[1]} {str(x.dtype)[6:]} [gemv bn{g.block_n} dot={g.dot}]"
            path = (
                f"fused bm{cfg['block_m']} splits{cfg['splits']}"
                if cfg["fused"]
                else f"act_quant+tiles bm{cfg['block_m']}"
            )
            return f"M={m} N={w.shape[0]} K={w.shape[1]} {str(x.dtype)[6:]} [{path}]"

        def moe_desc(x, w13, s13, w2, s2, tw, ids):
            return f"N={x.shape[0]} H={x.shape[1]} I={w2.shape[2]} E={w13.shape[0]} k={ids.shape[1]} {str(x.dtype)[6:]}"

        def mla_desc(q_lat, q_rope, latent, layer, bt, idx, scale):
            kind = "fp8 cache" if latent.dtype == torch.uint8 else f"{str(latent.dtype)[6:]} cache"
            return f"B={q_lat.shape[0]} H={q_lat.shape[1]} Dl={q_lat.shape[2]} topk={idx.shape[1]} {kind}"

        def aq_desc(x, block=128, ue8m0=True):
            return f"rows={x.numel() // x.shape[-1]} D={x.shape[-1]} block={block}"

        def aq_compare(out, want):  # dequantised values: q * s per group
            (q, s), (qr, sr) = out, want
            blk = q.shape[-1] // s.shape[-1]
            return (
                (q.float().unflatten(-1, (-1, blk)) * s[..., None]).flatten(-2),
                (qr.float().unflatten(-1, (-1, blk)) * sr[..., None]).flatten(-2),
            )

        patches = [
            (L, "fp8_linear", wrap("fp8_linear", fp8_gemm.fp8_linear, fp8_gemm.fp8_linear_ref, lin_desc)),
            (M, "fused_moe_fp8", wrap("fused_moe_fp8", moe.fused_moe_fp8, moe.fused_moe_fp8_ref, moe_desc)),
            (
                A,
                "sparse_mla_decode",
                wrap("sparse_mla", sparse_mla.sparse_mla_decode, sparse_mla.sparse_mla_decode_ref, mla_desc),
            ),
            (A, "act_quant", wrap("act_quant", quant.act_quant, quant.act_quant_ref, aq_desc, aq_compare)),
        ]
        saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches]
        try:
            for mod, name, fn in patches:
                setattr(mod, name, fn)
            yield self
        finally:
            for mod, name, fn in saved:
                setattr(mod, name, fn)

    def failures(self, tol: dict[str, float]) -> list[str]:
        return [
            f"{k} {s}: rel {r:.2e} (max abs {m:.2e}) > {tol[k]:g}"
            for (k, s), (r, m) in sorted(self.worst.items())
            if not r <= tol[k]
        ]

    def table(self) -> str:
        lines = [f"{'kernel':<14} {'calls':>5} {'worst rel':>10} {'max abs':>10}  shape [path]"]
        for (k, s), (r, m) in sorted(self.worst.items()):
            lines.append(f"{k:<14} {len(self.records[k, s]):>5} {r:>10.2e} {m:>10.2e}  {s}")
        return "\n".join(lines)


# tolerances for a call's output vs its reference on the same inputs (fp32 / bf16 compute dtype).
# fp8_linear: Hopper's FP8 MMA accumulation (kernels/fp8_gemm.py, "Accuracy on Hopper"), or bf16
# output rounding. fused_moe_fp8 and MLA with FP8 activations inside: the hidden activation is
# requantised, so the GEMM's ~1e-4 becomes ~sqrt(1e-4 * 2^-4) ~ 3e-3. A wrong scale block, mask,
# stride or uninitialised buffer shows up as >= 1e-1.
TOL = {
    torch.float32: {"fp8_linear": 3e-3, "fused_moe_fp8": 3e-2, "sparse_mla": 1e-4, "act_quant": 1e-6},
    torch.bfloat16: {"fp8_linear": 1e-2, "fused_moe_fp8": 5e-2, "sparse_mla": 2e-2, "act_quant": 1e-2},
}


# ---------------------------------------------------------------------------------------------
# part 1: kernels alone at the real shapes
# ---------------------------------------------------------------------------------------------
DEV = "cuda"  # part 1's device (a CPU smoke run under TRITON_INTERPRET=1 sets "cpu" and shrinks the shapes)
MS, MS_QUICK = (1, 8, 40, 64, 300, 4096), (1, 8, 40, 64, 300)


class MoeShapes(TypedDict):
    e: int  # experts
    h: int  # hidden size
    i: int  # intermediate size
    topk: int
    ns: tuple[int, ...]  # tokens
    ns_quick: tuple[int, ...]


class MlaShapes(TypedDict):
    ctx: int
    bs: int  # cache block size
    heads: int
    dl: int  # latent dim
    dr: int  # rope dim
    topk: int
    bszs: tuple[int, ...]  # batch sizes


MOE: MoeShapes = {"e": 16, "h": 7168, "i": 2048, "topk": 8, "ns": (1, 8, 64, 1024), "ns_quick": (1, 8, 64)}
MLA: MlaShapes = {"ctx": 4096, "bs": 64, "heads": 128, "dl": 512, "dr": 64, "topk": 2048, "bszs": (1, 8, 64)}
ACT = ((1, 7168), (300, 7168), (4096, 2048), (64, 128))


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


REAL_LINEAR = [
    ("in_proj q_a|kv_a(pad 640)|wk", 2304, 7168),
    ("q_b", 24576, 1536),
    ("o_proj", 7168, 16384),
    ("dense gate|up", 36864, 7168),
    ("dense down", 7168, 18432),
    ("shared gate|up", 4096, 7168),
    ("shared down", 7168, 2048),
    ("indexer wq_b", 8192, 1536),
]


def _weight(n: int, k: int, gen: torch.Generator):
    from splitserve.model.fp8 import quantize_weight

    return quantize_weight(torch.randn(n, k, device=DEV, generator=gen) * k**-0.5)


def _act(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(m, k, device=DEV, generator=gen)
    x[:, :7] *= 20.0  # groups with different amax
    return x.to(dtype)


def kernels_alone(rows: list[dict], quick: bool) -> None:
    from splitserve.kernels import fp8_gemm as G
    from splitserve.kernels import moe as KM
    from splitserve.kernels import quant as Q
    from splitserve.kernels import sparse_mla as S

    gen = torch.Generator(device=DEV).manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)

    def add(kernel: str, shape: str, path: str, out: torch.Tensor, ref: torch.Tensor, secs: float | None = None):
        _sync()
        r = dict(
            kernel=kernel,
            shape=shape,
            path=path,
            rel=rel(out, ref),
            max_abs=max_abs(out, ref),
            finite=bool(torch.isfinite(out).all()),
            ms=None if secs is None else secs * 1e3,
        )
        rows.append(r)
        print(
            f"{kernel:<12} {shape:<44} {path:<34} rel {r['rel']:.2e}  max|d| {r['max_abs']:.2e}"
            + ("" if r["finite"] else "  NON-FINITE")
            + ("" if secs is None else f"  {r['ms']:.3f} ms"),
            flush=True,
        )

    def timed(fn, reps=10):
        fn()
        _sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync()
        return (time.perf_counter() - t) / reps

    print("== fp8_linear at DeepSeek-V3.2 shapes: Triton (default = e4m3 MMA; precise = fp16 MMA, exact) vs reference")
    ms = MS_QUICK if quick else MS
    for label, n, k in REAL_LINEAR:
        q, s = _weight(n, k, gen)
        for m in ms:
            if m >= 4096 and n * k > 100e6:
                continue
            for dtype in (torch.bfloat16, torch.float32):
                if dtype == torch.float32 and m not in (8, 40, 300):
                    continue
                x = _act(m, k, dtype, gen)
                ref = G.fp8_linear_ref(x, q, s)
                cfg = G._config(m, n, k, G._sm_count(x.device))
                path = (
                    f"fused bm{cfg['block_m']} splits{cfg['splits']}"
                    if cfg["fused"]
                    else f"act_quant+tiles bm{cfg['block_m']}"
                )
                sh = f"{label} M={m} N={n} K={k} {str(dtype)[6:]}"
                add(
                    "fp8_linear",
                    sh,
                    path,
                    G.fp8_linear_triton(x, q, s),
                    ref,
                    timed(lambda: G.fp8_linear_triton(x, q, s)) if dtype == torch.bfloat16 else None,
                )
                add(
                    "fp8_linear",
                    sh,
                    path + " precise",
                    G.fp8_linear_triton(x, q, s, precise=True),
                    ref,
                    timed(lambda: G.fp8_linear_triton(x, q, s, precise=True)) if dtype == torch.bfloat16 else None,
                )
                if cfg["fused"] and m > 1:  # the other path at the same shape
                    add(
                        "fp8_linear",
                        sh,
                        "forced act_quant+tiles bm64 s1",
                        G.fp8_linear_triton(x, q, s, fused=False, splits=1, block_m=64),
                        ref,
                    )
                del x, ref
        del q, s
    # the m=40 unit-test case (test_fp8_linear_small[40-96-256-1-False]) on every tile height
    x, (q, s) = _act(40, 256, torch.float32, gen), _weight(96, 256, gen)
    ref = G.fp8_linear_ref(x, q, s)
    for bm in (16, 32, 64):
        for fused in (True, False):
            add(
                "fp8_linear",
                "unit case M=40 N=96 K=256 float32",
                f"bm{bm} fused={fused}",
                G.fp8_linear_triton(x, q, s, block_m=bm, block_n=64, splits=1, fused=fused),
                ref,
            )

    print("== act_quant")
    for rws, d in ACT:
        x = torch.randn(rws, d, device=DEV, generator=gen) * 3
        (q, sc), (qr, sr) = Q.act_quant_triton(x), Q.act_quant_ref(x)
        add("act_quant", f"rows={rws} D={d}", "values", q.float(), qr.float())
        add("act_quant", f"rows={rws} D={d}", "scales", sc, sr)

    e, h, i, topk = MOE["e"], MOE["h"], MOE["i"], MOE["topk"]
    print(f"== fused_moe_fp8 (H={h}, I={i}, {e} experts, top-{topk})")
    q13s: list[torch.Tensor] = []
    s13s: list[torch.Tensor] = []
    q2s: list[torch.Tensor] = []
    s2s: list[torch.Tensor] = []
    for _ in range(e):  # per expert: gate and up quantised as separate checkpoint tensors
        g_, sg_ = _weight(i, h, gen)
        u_, su_ = _weight(i, h, gen)
        d_, sd_ = _weight(h, i, gen)
        q13s.append(torch.cat([g_, u_]))
        s13s.append(torch.cat([sg_, su_]))
        q2s.append(d_)
        s2s.append(sd_)
    q13, s13, q2, s2 = torch.stack(q13s), torch.stack(s13s), torch.stack(q2s), torch.stack(s2s)
    del q13s, s13s, q2s, s2s
    for n in MOE["ns_quick"] if quick else MOE["ns"]:
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(n, h, device=DEV, generator=gen).to(dtype)
            tw, ids = torch.randn(n, e, device=DEV, generator=gen).softmax(-1).topk(topk, dim=-1)
            tw = tw * 2.5
            ref = KM.fused_moe_fp8_ref(x, q13, s13, q2, s2, tw, ids)
            add(
                "fused_moe_fp8",
                f"N={n} {str(dtype)[6:]}",
                "default",
                KM.fused_moe_fp8_triton(x, q13, s13, q2, s2, tw, ids),
                ref,
            )
    del q13, s13, q2, s2

    print("== sparse MLA over the FP8 latent cache (656-byte entries) and the bf16 cache")
    from splitserve.engine.cache import CachePool

    for bsz in MLA["bszs"]:
        ctx, bs, heads, dl, dr, topk_mla = MLA["ctx"], MLA["bs"], MLA["heads"], MLA["dl"], MLA["dr"], MLA["topk"]
        nb = bsz * ctx // bs + 4
        latent = torch.randn(nb, 1, bs, dl + dr, device=DEV, generator=gen).to(torch.bfloat16)
        perm = torch.randperm(nb, generator=cpu_gen)[: bsz * (ctx // bs)].view(bsz, ctx // bs).int().to(DEV)
        idx = torch.stack([torch.randperm(ctx, generator=cpu_gen)[:topk_mla] for _ in range(bsz)]).int().to(DEV)
        idx[:, -5:] = -1
        q_lat = (torch.randn(bsz, heads, dl, device=DEV, generator=gen) * 0.05).to(torch.bfloat16)
        q_rope = (torch.randn(bsz, heads, dr, device=DEV, generator=gen) * 0.05).to(torch.bfloat16)
        pool = CachePool.__new__(CachePool)
        pool.kv_lora, pool.fp8_group, pool.dtype = dl, min(128, dl), latent.dtype
        raw = pool._pack_fp8(latent.reshape(-1, dl + dr)).view(nb, 1, bs, -1)
        for name, cache in (("bf16 cache", latent), ("fp8 cache", raw)):
            ref = S.sparse_mla_decode_ref(q_lat, q_rope, cache, 0, perm, idx, 192**-0.5)
            add(
                "sparse_mla",
                f"B={bsz} H={heads} topk={topk_mla} {name}",
                "default",
                S.sparse_mla_decode_triton(q_lat, q_rope, cache, 0, perm, idx, 192**-0.5),
                ref,
            )
        del latent, raw


# ---------------------------------------------------------------------------------------------
# part 2: inside the kernel-shaped small network
# ---------------------------------------------------------------------------------------------
def in_network(rows: list[dict], tmp: str) -> None:
    from dataclasses import replace

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.engine import Engine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.model import load
    from splitserve.model.checkpoint import PRESETS, make_checkpoint

    cfg = replace(PRESETS["small"], num_attention_heads=16, index_n_heads=16)
    path = make_checkpoint(cfg, tmp, seed=0, fp8=True)
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(2, cfg.vocab_size, (200,), generator=gen)
    prompts = [torch.randint(2, cfg.vocab_size, (n,), generator=gen).tolist() for n in (300, 140, 9, 64)]
    for dtype in (torch.float32, torch.bfloat16):
        net = load(path, device="cuda", dtype=dtype, indexer_fp8=dtype == torch.bfloat16)
        net.fuse_weights()
        chk = KernelCheck()
        with chk.active():
            net.score(ids.cuda())
            for latent_fp8 in (False, True):
                eng = Engine(
                    net,
                    EngineConfig(
                        num_blocks=128,
                        block_size=16,
                        chunk_size=128,
                        device="cuda",
                        dtype=str(dtype)[6:],
                        latent_fp8=latent_fp8,
                        cuda_graphs=False,
                    ),
                )
                eng.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        torch.cuda.synchronize()
        print(
            f"== in the network ({str(dtype)[6:]}): score(200 tokens) + engine rows path (bf16 and FP8 latents), "
            f"every FP8 kernel call vs its reference on the same inputs"
        )
        print(chk.table())
        bad = chk.failures(TOL[dtype])
        print("FAILURES:\n  " + "\n  ".join(bad) if bad else "all within tolerance", flush=True)
        for (k, s), (r, m) in chk.worst.items():
            rows.append(
                dict(
                    kernel=k,
                    shape=f"network {str(dtype)[6:]}: {s}",
                    path="in network",
                    rel=r,
                    max_abs=m,
                    calls=len(chk.records[k, s]),
                    ok=r <= TOL[dtype][k],
                )
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer M values")
    ap.add_argument("--skip-network", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    import tempfile

    import triton

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    t0 = time.time()
    rows: list[dict] = []
    try:
        kernels_alone(rows, args.quick)
        torch.cuda.empty_cache()
        if not args.skip_network:
            with tempfile.TemporaryDirectory() as tmp:
                in_network(rows, tmp)
    finally:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
