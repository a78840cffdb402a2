"""Engine benchmarks on the `bench` preset (real DeepSeek-V3.2 widths, 4 layers + MTP), against the
ceilings measured in the same run (HBM copy bandwidth, bf16 matmul rate; bench/kernels.py).

    splitserve bench engine [--only decode,context,prefill,mtp] [--out results.json]
                            [--batches 1,8,32,64,128,256] [--contexts 4096,16384,65536,131072]
                            [--prefill 1024,2048,4096,8192,16384,32768] [--chunk 8192] [--profile 1,64,8192]
                            [--weights bf16,fp8] [--latent bf16|fp8] [--fp8-decode-kernels gemv|tiles]
                            [--glue fused|unfused] [--mla-kernel auto|wgmma|triton]
                            [--topk auto|torch|triton|stream|reg] [--pdl on|off]

--weights runs every selected case once per weight format, in one process, against the same
ceilings: bf16, and fp8 = every linear DeepSeek's FP8 release quantises held in e4m3 with 128x128
fp32 block scales (model/linear.py; kv_b_proj, embedding, norms, router and LM head stay bf16),
served by the block-scaled FP8 GEMM and the FP8 grouped MoE. The roofline counts the bytes the step
actually reads: e4m3 values + their scales + the bf16 rest (FP8 fused projections include their
padding rows). --latent fp8 keeps the MLA latent cache in the 656-byte FP8 entry format.

1. decode: one decode step (the main model over B rows + LM head + argmax, replayed from the
   engine's CUDA graph; rows.py) at context 4096 by batch size, against the HBM roofline: weight
   bytes the step must read (every non-expert weight, the LM head, and the routed experts B
   tokens are expected to touch: E * (1 - (1 - k/E)^B) per MoE layer) plus cache bytes (each row's
   indexer keys over its whole context, and its top-k MLA entries), over the copy bandwidth.
   `host` adds building the step's row plan and copying it to the GPU (what the engine pays).
2. context: the same step at 4k..128k context, with sparse attention (index_topk 2048) and, for
   contrast, dense attention (index_topk = context: every cached entry attended).
3. prefill: one prompt through the rows path in chunks of --chunk tokens; MFU counts the real flops
   (every linear layer on every token, the routed experts each token uses, the indexer over each
   token's visible keys, sparse MLA over min(position + 1, 2048) entries in the absorbed form, the
   LM head on the last token) over the measured bf16 matmul rate.
4. mtp: the engine's own decode step at k = 0..3 (k >= 1: the fused speculative step of
   engine/spec_step.py, one CUDA graph) at batch 1 and 32; then (bench/mtp.py) one draft and the
   verification of k + 1 rows against their own rooflines (experts counted from the router's
   selections), and the projected batch-1 speedup of the real 61-layer model at --acceptance (the
   formula is in bench/mtp.py). The bench weights are random, so drafts are almost never accepted:
   tokens per step is reported as 1 + a + ... + a^k for stated acceptance rates a.
5. cpu-mtp (--device cpu): the measured greedy decode speedup of --checkpoint with MTP k = 1..3 over
   k = 0 on --prompt (tokens/s, accept length, acceptance; bench/mtp.py).

The weights are random (normal, std 0.02), drawn on the GPU: timings do not depend on the values
except through MoE routing, which random weights spread about evenly over the experts. Cache
contents are random too; every sequence of a case has blocks of its own while the pool lasts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from splitserve.bench.kernel_count import count_kernels, layer_kernels, report
from splitserve.bench.kernels import measure_ceilings
from splitserve.bench.mtp import cpu_speedup, parts_case, project
from splitserve.engine.cache import CachePool
from splitserve.engine.config import EngineConfig
from splitserve.engine.engine import Engine
from splitserve.engine.rows import DecodeGraphs, RowPlan
from splitserve.engine.sampling_params import SamplingParams
from splitserve.kernels import _common, argmax
from splitserve.model import DeepseekV32
from splitserve.model.checkpoint import PRESETS

BLOCK = 64
DEV = "cuda"  # --device cpu runs the same harness at a small preset (a smoke test: references, no graphs)


# ---------------------------------------------------------------------------------------------
# the network and its byte / flop model
# ---------------------------------------------------------------------------------------------
def random_net(cfg, indexer_fp8: bool = True, seed: int = 0, fp8: bool = False) -> DeepseekV32:
    torch.manual_seed(seed)
    with torch.device("meta"):
        net = DeepseekV32(cfg, with_mtp=True, indexer_fp8=indexer_fp8)
    net = net.to_empty(device=DEV).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
        for name, b in net.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
        if fp8:  # the linears DeepSeek's release quantises, as the loader keeps them
            net.to_fp8(quantize=True)
    net.rotary.inv_freq = net.rotary.inv_freq.to(DEV)
    _empty_cache()
    net.fuse_weights()  # as the engine does
    return net.eval()


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def weight_model(net: DeepseekV32) -> dict[str, float]:
    """Bytes and per-token flops of the main model's weights, split by kind. Bytes are what the kernels
    read: FP8 weights count 1 byte a value plus their fp32 block scales, and the zero rows that pad
    FP8 parts of a fused projection to whole blocks."""
    cfg = net.cfg
    main = list(net.model.layers)[: cfg.num_hidden_layers]
    routed_names = ("mlp.w13", "mlp.w2", "mlp.w13_scale_inv", "mlp.w2_scale_inv")
    routed = [p for layer in main for n, p in layer.named_parameters() if n.endswith(routed_names)]
    routed_ids = {id(p) for p in routed}
    dense_named = [(n, p) for layer in main for n, p in layer.named_parameters() if id(p) not in routed_ids]
    dense = [p for _, p in dense_named]
    pad = 0
    for layer in main:
        for m in layer.modules():
            for fused in (getattr(m, "in_proj", None), getattr(m, "gate_up", None)):
                if fused is not None and not isinstance(fused, torch.Tensor):
                    pad += (sum(fused.padded) - sum(fused.rows)) * fused.weight.shape[1] * fused.weight.element_size()
    moe_layers = sum(1 for layer in main if hasattr(layer.mlp, "w13"))
    routed_per_layer = _nbytes(routed) / max(1, moe_layers)
    # every 2-D weight is one GEMM operand per token (scales are not)
    lin = sum(p.numel() for n, p in dense_named if p.dim() == 2 and not n.endswith("scale_inv"))
    routed_values = sum(
        p.numel() for layer in main for n, p in layer.named_parameters() if n.endswith(("mlp.w13", "mlp.w2"))
    )
    return {
        "dense_bytes": float(_nbytes(dense) + pad + _nbytes([net.model.norm.weight, net.lm_head.weight])),
        "fp8_pad_bytes": float(pad),
        "routed_bytes_per_layer": routed_per_layer,
        "moe_layers": float(moe_layers),
        "experts": float(cfg.n_routed_experts),
        "active": float(cfg.num_experts_per_tok),
        "linear_flops_per_token": 2.0 * (lin + routed_values * cfg.num_experts_per_tok / cfg.n_routed_experts),
        "lm_head_flops": 2.0 * net.lm_head.weight.numel(),
        "embed_row_bytes": float(cfg.hidden_size * 2),
    }


def expected_experts(batch_tokens: int, experts: float, active: float) -> float:
    return experts * (1.0 - (1.0 - active / experts) ** batch_tokens)


def cache_bytes_per_row(cfg, context: int, topk: int, layers: int, latent_fp8: bool = False) -> float:
    """Bytes one decode row reads: indexer keys (e4m3 + fp32 scale) over the context, top-k MLA entries
    (bf16: 1152 bytes; FP8: 656 = 512 e4m3 + 4 fp32 scales + 64 bf16 rope)."""
    idx = context * (cfg.index_head_dim + 4)
    entry = (
        (cfg.kv_lora_rank + 4 * (cfg.kv_lora_rank // 128) + 2 * cfg.qk_rope_head_dim)
        if latent_fp8
        else cfg.latent_dim * 2
    )
    mla = min(context, topk) * entry
    return float(layers * (idx + mla))


def decode_floor(
    wm: dict[str, float], cfg, batch: int, context: int, topk: int, bw: float, latent_fp8: bool = False
) -> dict[str, float]:
    touched = expected_experts(batch, wm["experts"], wm["active"])
    w = wm["dense_bytes"] + wm["moe_layers"] * wm["routed_bytes_per_layer"] * touched / wm["experts"]
    c = batch * cache_bytes_per_row(cfg, context, topk, cfg.num_hidden_layers, latent_fp8)
    return {"weight_bytes": w, "cache_bytes": c, "floor_ms": (w + c) / bw * 1e3}


def prefill_flops(wm: dict[str, float], cfg, tokens: int) -> float:
    pos = torch.arange(tokens, dtype=torch.float64) + 1  # keys visible to each token
    per_layer = (
        cfg.index_n_heads * cfg.index_head_dim * 2 * pos.sum()
        + cfg.num_attention_heads
        * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        * 2
        * pos.clamp(max=cfg.index_topk).sum()
    )
    return float(wm["linear_flops_per_token"] * tokens + cfg.num_hidden_layers * per_layer + wm["lm_head_flops"])


# ---------------------------------------------------------------------------------------------
# timing helpers
# ---------------------------------------------------------------------------------------------
def _empty_cache() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def cuda_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    if DEV != "cuda":
        return wall_ms(fn, iters, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def wall_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class Tables:
    """Hands out distinct block runs while the pool lasts (then wraps around, noted in the result)."""

    def __init__(self, pool: CachePool) -> None:
        self.pool, self.next, self.wrapped = pool, 0, False

    def take(self, n: int) -> list[int]:
        if self.next + n > self.pool.num_blocks:
            self.next, self.wrapped = 0, True
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def fill_pool(pool: CachePool) -> None:
    g = torch.Generator(device=DEV).manual_seed(1)
    if pool.latent_fp8:  # real FP8 entries (finite scales), packed by the pool's own writer
        flat = pool.latent.view(-1, pool.latent.shape[-1])
        for s in range(0, flat.shape[0], 1 << 18):
            n = min(1 << 18, flat.shape[0] - s)
            lat = torch.randn(n, pool.kv_lora + pool.rope_dim, generator=g, device=DEV, dtype=torch.bfloat16) * 0.5
            flat[s : s + n] = pool._pack_fp8(lat)
    for p in pool.pools()[1:] if pool.latent_fp8 else pool.pools():
        if p.dtype == torch.uint8:  # e4m3 bits: keep them finite (no 0x7f / 0xff NaN patterns)
            p.copy_(torch.randint(0, 0x70, p.shape, generator=g, device=DEV, dtype=torch.uint8))
        elif p.dtype == torch.float32:
            p.uniform_(0.5, 1.5, generator=g)
        else:
            p.normal_(0.0, 0.5, generator=g)


def set_topk(net: DeepseekV32, topk: int) -> None:
    for layer in net.model.layers:
        attn: Any = layer.self_attn
        attn.cfg = replace(attn.cfg, index_topk=topk)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def profile_top(fn, iters: int = 5, rows: int = 30) -> tuple[str, list[dict[str, Any]]]:
    """torch.profiler over `iters` calls: the kernels by GPU time per call (CUDA-graph replays included)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        _sync()
    events = prof.key_averages()

    def gpu_us(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)

    ranked = sorted((e for e in events if gpu_us(e) > 0), key=gpu_us, reverse=True)
    total = sum(gpu_us(e) for e in ranked) / iters
    top = [
        {
            "kernel": e.key[:120],
            "us_per_call": gpu_us(e) / iters,
            "count_per_call": e.count / iters,
            "share": gpu_us(e) / iters / total if total else 0.0,
        }
        for e in ranked[:rows]
    ]
    text = "\n".join(
        [
            f"GPU time per call {total / 1e3:.3f} ms over {len(ranked)} kernel kinds",
            "us/call | share | count/call | kernel",
        ]
        + [f"{t['us_per_call']:9.1f} | {t['share']:5.1%} | {t['count_per_call']:6.1f} | {t['kernel']}" for t in top]
    )
    return text, top


def decode_case(net, pool, wm, ceil, batch: int, context: int, topk: int, profile: bool = False) -> dict[str, Any]:
    cfg = net.cfg
    set_topk(net, topk)
    tables = Tables(pool)
    per = -(-(context + 1) // BLOCK)
    groups = [([7 + b], context, tables.take(per)) for b in range(batch)]
    plan = RowPlan.build(groups, BLOCK)
    if DEV == "cuda":
        graphs = DecodeGraphs(net, pool, batch, per)

        def step_host():  # what the engine pays: the row plan built and copied, the graph replayed
            hidden = graphs.run(RowPlan.build(groups, BLOCK))
            return argmax(net.logits(hidden))

        step_host()  # captures the graph
        key = graphs.key(plan)
        assert key is not None  # step_host() captured it
        graph, out = graphs.graphs[key]

        def step_gpu():
            graph.replay()
            return argmax(net.logits(out[:batch]))
    else:

        def step_host():
            return argmax(net.logits(net.forward(RowPlan.build(groups, BLOCK).to_batch(pool))))

        step_gpu = step_host

    gpu = cuda_ms(step_gpu)
    host = wall_ms(step_host)
    prof = None
    counts: dict[str, Any] = {}
    if profile and DEV == "cuda":
        text, top = profile_top(step_gpu)
        pdl = (
            " (PDL on: a Triton kernel's time includes its wait for the kernel before it, so the sum overstates "
            "the step; --pdl off gives each kernel its own time)"
            if _common.PDL
            else ""
        )
        print(f"\nprofile: decode step, batch {batch}, context {context}{pdl}\n{text}", flush=True)
        prof = top
        step_k, step_copies = count_kernels(step_gpu)
        per_layer = layer_kernels(net, plan.to_batch(pool))
        print(report(step_k, step_copies, per_layer), flush=True)
        counts = {
            "kernels_per_step": sum(step_k.values()),
            "copies_per_step": step_copies,
            "kernels_per_layer": [{k: v for k, v in r.items() if k != "by_name"} for r in per_layer],
        }
    floor = decode_floor(wm, cfg, batch, context, topk, ceil["hbm_copy_bytes_per_s"], pool.latent_fp8)
    _empty_cache()
    set_topk(net, net.cfg.index_topk)
    return {
        "batch": batch,
        "context": context,
        "index_topk": topk,
        "step_ms": gpu,
        "host_step_ms": host,
        **floor,
        "roofline_ratio": floor["floor_ms"] / gpu,
        "tokens_per_s": batch / gpu * 1e3,
        "blocks_wrapped": tables.wrapped,
        **({"profile": prof} if prof else {}),
        **counts,
    }


def prefill_case(net, pool, wm, ceil, tokens: int, chunk: int, profile: bool = False) -> dict[str, Any]:
    tables = Tables(pool)
    table = tables.take(-(-tokens // BLOCK))
    ids = torch.randint(2, net.cfg.vocab_size, (tokens,)).tolist()

    def run():
        for s in range(0, tokens, chunk):
            hidden = net.forward(RowPlan.build([(ids[s : s + chunk], s, table)], BLOCK).to_batch(pool))
        return net.logits(hidden[-1:]).argmax(-1)

    ms = wall_ms(run, iters=3, warmup=1)
    prof = None
    if profile and DEV == "cuda":
        text, prof = profile_top(run, iters=2)
        print(f"\nprofile: prefill of {tokens} tokens\n{text}", flush=True)
    flops = prefill_flops(wm, net.cfg, tokens)
    floor_ms = flops / ceil["bf16_matmul_flops_per_s"] * 1e3
    _empty_cache()
    return {
        "tokens": tokens,
        "chunk": chunk,
        "ms": ms,
        "flops": flops,
        "floor_ms": floor_ms,
        "mfu": floor_ms / ms,
        "tokens_per_s": tokens / ms * 1e3,
        **({"profile": prof} if prof else {}),
    }


def mtp_case(net, k: int, batch: int, context: int, steps: int) -> dict[str, Any]:
    blocks = batch * (-(-(context + steps * (k + 1) + 8) // BLOCK)) + 8
    eng = Engine(
        net,
        EngineConfig(
            num_blocks=blocks,
            block_size=BLOCK,
            chunk_size=8192,
            max_batch_tokens=16384,
            max_running=batch,
            mtp_draft_tokens=k,
            device=DEV,
            dtype="bfloat16",
            prefix_cache=False,
            paged_kernels=True,  # as on CUDA by default; on a CPU smoke run too, so the fused MTP step runs
        ),
    )
    params = SamplingParams(temperature=0.0, max_tokens=(steps + 8) * (k + 1), ignore_eos=True)
    for b in range(batch):
        eng.add_request(f"r{b}", torch.randint(2, net.cfg.vocab_size, (context,)).tolist(), params)
    while any(r.num_computed < len(r.prompt_ids) for r in eng.requests.values()):
        eng.step()
    for _ in range(3):  # graphs captured, drafts flowing
        eng.step()
    _sync()
    made0 = sum(len(r.output_ids) for r in eng.requests.values())
    acc0, dr0 = eng.stats.accepted_draft_tokens, eng.stats.draft_tokens
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    _sync()
    ms = (time.perf_counter() - t) * 1e3 / steps
    made = sum(len(r.output_ids) for r in eng.requests.values()) - made0
    drafted = eng.stats.draft_tokens - dr0
    accepted = eng.stats.accepted_draft_tokens - acc0
    for rid in list(eng.requests):
        eng.abort(rid)
    del eng
    _empty_cache()
    out = {
        "k": k,
        "batch": batch,
        "context": context,
        "step_ms": ms,
        "measured_tokens_per_step": made / steps / batch,
        "measured_acceptance": accepted / drafted if drafted else None,
    }
    for a in (0.6, 0.8, 0.9):
        tps = sum(a**i for i in range(k + 1))
        out[f"tokens_per_step@a={a}"] = tps
        out[f"tokens_per_s_per_seq@a={a}"] = tps / ms * 1e3
    return out


def mtp_parts(net, cfg, ceil, args, fmt: str, steps: list[dict[str, Any]], result: dict[str, Any], save) -> None:
    """Draft and verification against their rooflines and the real-model projection (bench/mtp.py)."""
    per = -(-(args.mtp_context + 8) // BLOCK)
    pool = CachePool(
        cfg,
        cfg.num_hidden_layers + 1,
        2 + max(args.mtp_batches) * per,
        BLOCK,
        torch.bfloat16,
        DEV,
        indexer_fp8=True,
        latent_fp8=args.latent == "fp8",
    )
    fill_pool(pool)
    rows, proj = [], []
    for b in args.mtp_batches:
        for k in (1, 2, 3):
            part = parts_case(net, pool, ceil, b, k, args.mtp_context, cuda_ms, BLOCK)
            step = {r["k"]: r["step_ms"] for r in steps if r["batch"] == b}
            part = {"weights": fmt, "step_ms": step.get(k), "step0_ms": step.get(0), **part}
            if k in step and 1 < k:
                part["marginal_draft_ms"] = step[k] - step[k - 1]
            rows.append(part)
            print(
                _table("", rows[-1:], ["batch", "k", "draft_vs_roofline", "verify_vs_roofline"]).splitlines()[-1],
                flush=True,
            )
            if b == 1 and 0 in step and k in step:
                proj.append({"weights": fmt, **project(part, step[0], step[k], cfg, args.acceptance)})
    del pool
    _empty_cache()
    result.setdefault("mtp_parts", []).extend(rows)
    result.setdefault("mtp_projection", []).extend(proj)
    result["acceptance_for_projection"] = args.acceptance
    save()
    print(
        _table(
            f"\nMTP parts vs their rooflines (context {args.mtp_context}, copy "
            f"{ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s), weights {fmt}; goals: draft <= 1.3, verify <= 1.1",
            rows,
            [
                "batch",
                "k",
                "step0_ms",
                "step_ms",
                "marginal_draft_ms",
                "draft_ms",
                "draft_experts",
                "draft_floor_ms",
                "draft_vs_roofline",
                "verify_ms",
                "verify_experts",
                "verify_floor_ms",
                "verify_vs_roofline",
            ],
        ),
        flush=True,
    )
    print(
        _table(
            f"\nprojected batch-1 speedup of the real 61-layer model at acceptance {args.acceptance}"
            " (E_k T_0 / T_k, bench/mtp.py)",
            proj,
            [
                "k",
                "tokens_per_step",
                "real_step0_ms",
                "real_stepk_ms",
                "overhead_0_ms",
                "overhead_k_ms",
                "projected_speedup",
            ],
        ),
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
def compare_formats(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case run with both weight formats: fp8 time / bf16 time beside the floors' ratio."""
    rows = []
    for kind, key, ms, floor in (("decode", "batch", "step_ms", "floor_ms"), ("prefill", "tokens", "ms", "floor_ms")):
        by = {(r["weights"], r[key]): r for r in result.get(kind, [])}
        for (fmt, v), r8 in sorted(by.items(), key=lambda kv: kv[0][1]):
            if fmt != "fp8" or ("bf16", v) not in by:
                continue
            r16 = by["bf16", v]
            row = {"case": f"{kind} {key} {v}", "bf16_ms": r16[ms], "fp8_ms": r8[ms], "fp8_over_bf16": r8[ms] / r16[ms]}
            if kind == "decode":
                row["floor_ratio"] = r8[floor] / r16[floor]
                row["fp8_of_roofline"] = r8["roofline_ratio"]
            rows.append(row)
    return rows


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def _table(title: str, rows: list[dict[str, Any]], cols: list[str]) -> str:
    def f(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    lines = [title, " | ".join(cols), " | ".join("---" for _ in cols)]
    lines += [" | ".join(f(r.get(c)) for c in cols) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="splitserve bench engine", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="decode,context,prefill,mtp")
    ap.add_argument("--out", default="bench-engine.json")
    ap.add_argument("--batches", type=_ints, default=_ints("1,8,32,64,128,256"))
    ap.add_argument("--contexts", type=_ints, default=_ints("4096,16384,65536,131072"))
    ap.add_argument("--context-batches", type=_ints, default=_ints("1,16"))
    ap.add_argument("--prefill", type=_ints, default=_ints("1024,2048,4096,8192,16384,32768"))
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--mtp-batches", type=_ints, default=_ints("1,32"))
    ap.add_argument("--mtp-context", type=int, default=1024)
    ap.add_argument(
        "--acceptance",
        type=_floats,
        default=[0.8],
        help="MTP acceptance for the projection: a, or a_1,a_2,a_3 (draft i accepted given 1..i-1 were)",
    )
    ap.add_argument("--checkpoint", default="tiny", help="cpu-mtp: checkpoint directory or preset name")
    ap.add_argument("--prompt", default="def fibonacci(n):\n", help="cpu-mtp: the prompt")
    ap.add_argument("--max-tokens", type=int, default=128, help="cpu-mtp: tokens to generate")
    ap.add_argument("--cpu-paged", action="store_true", help="cpu-mtp: the paged rows path (fused MTP step)")
    ap.add_argument("--cpu-threads", type=int, default=1, help="cpu-mtp: torch threads")
    ap.add_argument("--cpu-repeats", type=int, default=3, help="cpu-mtp: runs per k (the best is reported)")
    ap.add_argument(
        "--profile",
        type=_ints,
        default=[],
        help="decode batch sizes and prefill lengths to profile with torch.profiler (e.g. 1,64,8192)",
    )
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--preset", default="bench", help="model preset (bench is the one the goals refer to)")
    ap.add_argument("--pool-tokens", type=int, default=2_200_000, help="cache pool size for the decode cases")
    ap.add_argument("--weights", default="bf16", help="weight formats to run, in one process: bf16, fp8 or bf16,fp8")
    ap.add_argument("--latent", default="bf16", choices=["bf16", "fp8"], help="MLA latent cache format")
    ap.add_argument(
        "--fp8-decode-kernels",
        default="gemv",
        choices=["gemv", "tiles"],
        help="FP8 linears and MoE at decode sizes: the weight-streaming kernels (gemv, the serving default) "
        "or the tiled GEMMs for every batch size (tiles: the kernels before them, for comparison)",
    )
    ap.add_argument(
        "--glue",
        default="fused",
        choices=["fused", "unfused"],
        help="decode glue: the radix top-k, fused cache-write and GLUE_KERNELS (kernels/_common.py) kernels "
        "(fused, the serving default) or torch.topk, the separate norm / rope / quantise / index_put ops and "
        "the torch router, indexer-query, SwiGLU and argmax ops (unfused: the path before them)",
    )
    ap.add_argument(
        "--mla-kernel",
        default="auto",
        choices=["auto", "wgmma", "triton"],
        help="sparse MLA: the Hopper (Gluon) warp-specialised kernel where it fits (auto), the pipelined Hopper "
        "kernel where it fits (wgmma), or the Triton kernel everywhere",
    )
    ap.add_argument(
        "--topk",
        default="auto",
        choices=["auto", "torch", "triton", "stream", "reg"],
        help="the indexer's top-k: radix_topk.choose_kernel's pick (auto), its pick with the Triton kernels from "
        "1 row on and the reg kernel off (triton: split up to SPLIT_MAX_ROWS rows, stream beyond), or one "
        "implementation at every row count (reg: rows up to its REG_WIDTH_LIMIT, the stream kernel beyond; reg "
        "from 1 row on is the setting radix_topk.MIN_ROWS documents a failed fp32 graph capture with)",
    )
    ap.add_argument(
        "--pdl",
        default="on",
        choices=["on", "off"],
        help="programmatic dependent launch of the Triton kernels on Hopper (kernels/_common.py PDL; on: the "
        "serving default)",
    )
    args = ap.parse_args(argv)
    if args.pdl == "off":
        _common.PDL = False  # read at every launch
    if args.topk != "auto":
        from splitserve.kernels import radix_topk

        radix_topk.MIN_ROWS = 1 << 30 if args.topk == "torch" else 1  # all three read at every call
        radix_topk.REG_MAX_WIDTH = radix_topk.REG_WIDTH_LIMIT if args.topk == "reg" else 0
        if args.topk != "triton":
            radix_topk.SPLIT_MAX_ROWS = 0
    if args.mla_kernel != "auto":
        from splitserve.kernels import sparse_mla

        sparse_mla.WGMMA = args.mla_kernel == "wgmma"  # both read at every call
        sparse_mla.WARP_SPECIALIZED = False
    if args.glue == "unfused":
        from splitserve.kernels import indexer
        from splitserve.model import attention

        indexer.TOPK_KERNEL = False  # all three read at every call
        attention.FUSED_CACHE_WRITE = False
        _common.GLUE_KERNELS = False
    if args.fp8_decode_kernels == "tiles":
        from splitserve.kernels import fp8_gemm, moe

        fp8_gemm.GEMV_MAX_M = 0  # fp8_linear and fused_moe_fp8 read these at every call
        moe.MOE_GEMV_MAX_N = 0
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print(
            "splitserve bench engine: no CUDA device (--device cpu runs a smoke test at a small preset)",
            file=sys.stderr,
        )
        return 2
    only = set(args.only.split(","))
    if "cpu-mtp" in only:
        if DEV != "cpu":
            ap.error("cpu-mtp measures on the CPU: add --device cpu")
        rows = cpu_speedup(
            args.checkpoint,
            args.prompt,
            args.max_tokens,
            [0, 1, 2, 3],
            args.cpu_paged,
            args.cpu_threads,
            args.cpu_repeats,
        )
        Path(args.out).write_text(json.dumps({"checkpoint": args.checkpoint, "cpu_mtp": rows}, indent=1))
        print(
            _table(
                f"\nMTP on CPU: {args.checkpoint}, greedy, {args.max_tokens} tokens, {args.cpu_threads} thread(s), "
                f"best of {args.cpu_repeats}",
                rows,
                ["k", "decode_tokens_per_s", "speedup_vs_k0", "accept_length", "acceptance", "same_tokens_as_k0"],
            )
        )
        print(f"\nwrote {args.out}")
        return 0
    cfg = PRESETS[args.preset]
    result: dict[str, Any] = {
        "command": "splitserve bench engine " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name() if DEV == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "host": platform.node(),
        "date": dt.datetime.now(dt.UTC).isoformat(),
        "preset": args.preset,
        "indexer_fp8": True,
        "fp8_decode_kernels": args.fp8_decode_kernels,
        "glue": args.glue,
        "topk": args.topk,
        "pdl": args.pdl,
        "mla_kernel": args.mla_kernel,
    }
    ceil = measure_ceilings(DEV)
    result["ceilings"] = ceil
    print(
        f"ceilings: copy {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
        f"{ceil['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    formats = args.weights.split(",")
    if not set(formats) <= {"bf16", "fp8"}:
        ap.error(f"--weights takes bf16 and/or fp8, got {args.weights}")
    result["weights_formats"], result["latent"] = formats, args.latent
    result["weight_model"] = {}
    layers = cfg.num_hidden_layers + 1
    out_path = Path(args.out)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1))

    pool = None
    if only & {"decode", "context", "prefill"}:
        pool = CachePool(
            cfg,
            layers,
            -(-args.pool_tokens // BLOCK),
            BLOCK,
            torch.bfloat16,
            DEV,
            indexer_fp8=True,
            latent_fp8=args.latent == "fp8",
        )
        fill_pool(pool)
    for fmt in formats:
        net = random_net(cfg, fp8=fmt == "fp8")
        wm = weight_model(net)
        result["weight_model"][fmt] = wm
        result.setdefault("weights", wm)
        held = net.weight_bytes()
        print(
            f"\n=== weights {fmt}: {held['total'] / 1e9:.2f} GB held (e4m3 {held['fp8'] / 1e9:.2f} GB, scales "
            f"{held['scales'] / 1e6:.1f} MB, bf16/fp32 {held['other'] / 1e9:.2f} GB); a decode step reads the dense "
            f"{wm['dense_bytes'] / 1e9:.3f} GB (LM head {net.lm_head.weight.nbytes / 1e9:.3f} GB bf16, FP8 padding "
            f"{wm['fp8_pad_bytes'] / 1e6:.1f} MB) + {wm['routed_bytes_per_layer'] / 1e9:.3f} GB of routed experts per "
            f"MoE layer at most; floor at batch 1 = bytes / {ceil['hbm_copy_bytes_per_s'] / 1e12:.2f} TB/s",
            flush=True,
        )
        if pool is not None and "decode" in only:
            rows = []
            for b in args.batches:
                rows.append(
                    {
                        "weights": fmt,
                        **decode_case(net, pool, wm, ceil, b, 4096, cfg.index_topk, profile=b in args.profile),
                    }
                )
                print(
                    _table(
                        "",
                        rows[-1:],
                        ["weights", "batch", "context", "step_ms", "host_step_ms", "floor_ms", "roofline_ratio"],
                    ).splitlines()[-1],
                    flush=True,
                )
            result.setdefault("decode", []).extend(rows)
            print(
                _table(
                    f"\ndecode step by batch (context 4096), weights {fmt}, latent {args.latent}",
                    rows,
                    [
                        "batch",
                        "step_ms",
                        "host_step_ms",
                        "weight_bytes",
                        "cache_bytes",
                        "floor_ms",
                        "roofline_ratio",
                        "tokens_per_s",
                    ],
                ),
                flush=True,
            )
            save()
        if pool is not None and "context" in only:
            rows = []
            for b in args.context_batches:
                for c in args.contexts:
                    for topk in (cfg.index_topk, c):
                        rows.append({"weights": fmt, **decode_case(net, pool, wm, ceil, b, c, topk)})
                        rows[-1]["attention"] = "sparse" if topk == cfg.index_topk else "dense"
                        print(
                            _table(
                                "", rows[-1:], ["batch", "context", "attention", "step_ms", "floor_ms"]
                            ).splitlines()[-1],
                            flush=True,
                        )
            for r in rows:
                base = next(
                    x
                    for x in rows
                    if x["batch"] == r["batch"] and x["attention"] == "sparse" and x["context"] == min(args.contexts)
                )
                r["vs_sparse_at_min_context"] = r["step_ms"] / base["step_ms"]
            result.setdefault("context", []).extend(rows)
            print(
                _table(
                    f"\ndecode step by context, weights {fmt}",
                    rows,
                    [
                        "batch",
                        "context",
                        "attention",
                        "step_ms",
                        "floor_ms",
                        "roofline_ratio",
                        "vs_sparse_at_min_context",
                    ],
                ),
                flush=True,
            )
            save()
        if pool is not None and "prefill" in only:
            rows = []
            for n in args.prefill:
                rows.append(
                    {"weights": fmt, **prefill_case(net, pool, wm, ceil, n, args.chunk, profile=n in args.profile)}
                )
                print(
                    _table("", rows[-1:], ["weights", "tokens", "ms", "floor_ms", "mfu"]).splitlines()[-1], flush=True
                )
            result.setdefault("prefill", []).extend(rows)
            print(
                _table(
                    f"\nprefill, weights {fmt} (MFU against the bf16 matmul rate)",
                    rows,
                    ["tokens", "chunk", "ms", "floor_ms", "mfu", "tokens_per_s"],
                ),
                flush=True,
            )
            save()
        if "mtp" in only:
            rows = []
            for b in args.mtp_batches:
                for k in range(4):
                    rows.append({"weights": fmt, **mtp_case(net, k, b, args.mtp_context, 30)})
                    print(
                        _table("", rows[-1:], ["batch", "k", "step_ms", "measured_acceptance"]).splitlines()[-1],
                        flush=True,
                    )
            result.setdefault("mtp", []).extend(rows)
            print(
                _table(
                    f"\nMTP (engine decode step, context 1024), weights {fmt}",
                    rows,
                    [
                        "batch",
                        "k",
                        "step_ms",
                        "measured_acceptance",
                        "tokens_per_step@a=0.8",
                        "tokens_per_s_per_seq@a=0.8",
                    ],
                ),
                flush=True,
            )
            save()
            mtp_parts(net, cfg, ceil, args, fmt, rows, result, save)
        del net
        _empty_cache()
    if len(formats) > 1:
        result["fp8_vs_bf16"] = compare_formats(result)
        print(
            _table(
                "\nfp8 vs bf16 weights (same run): time and floor ratios",
                result["fp8_vs_bf16"],
                ["case", "bf16_ms", "fp8_ms", "fp8_over_bf16", "floor_ratio", "fp8_of_roofline"],
            ),
            flush=True,
        )
    save()
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
