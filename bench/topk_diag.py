"""Top-k kernel diagnostic (kernels/radix_topk.py): the reg kernel (and the stream kernel, for comparison) over
engine-like inputs, each output checked bit for bit against the documented order and for writes outside it.

    python -m splitserve.bench.topk_diag --out DIR [--quick] [--variants reg,stream] [--device cuda|cpu]
    python -m splitserve.bench.topk_diag --out DIR --engine     # the engine tests' runs, every topk call checked

Sweep (default): rows {1, 7, 64, 65, 128, 200, 256} x widths {17, 64, 100, 129, 300, 301, 513, 1000, 2047, 4096,
4160, 8192, 16384} x k {7, 64, 128, 2048} x score kinds (randn; bf16-rounded randn; five distinct values; relu
sums with many exact +0.0 / -0.0 as the indexer's; all equal), rows causal (row r sees a prefix whose length
crosses k - 1, k, k + 1 around the middle rows), every 5th row all -inf. --quick: a few small cells (for the CPU
interpreter). Each call writes into `out`, a view into a bigger buffer filled with a sentinel, in two layouts:
"flat" (out contiguous, as the engine's: guard words before row 0 and after the last row) and "pad" (guard rows
above and below and guard columns either side of every row). After each call (synchronised): oob = a guard word
changed; unwritten = a slot of out still holding the sentinel; mismatch = out differs from exact_ref (the module
docstring's order: bench/topk.py). A CUDA error stops the sweep at once (the context is lost): its case is
printed and saved. Best run with CUDA_LAUNCH_BLOCKING=1; under compute-sanitizer for the offending case.

--engine: tests/engine/test_engine_cuda.py's two kernel-shaped runs (fp32; bf16 with the FP8 indexer) with
REG_MAX_WIDTH raised in this process only (--reg-max-width, default 16384), each `topk` call of the indexer
with >= MIN_ROWS rows checked as above (oob via a second call into a guarded buffer); the first bad call's
logits are saved to DIR.

Writes DIR/topk_diag.json (every case: its status and first bad row) and prints a compact table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

SENTINEL = -777_777  # never a position nor -1
GUARD = 8
NEG = float("-inf")
ROWS = [1, 7, 64, 65, 128, 200, 256]
WIDTHS = [17, 64, 100, 129, 300, 301, 513, 1000, 2047, 4096, 4160, 8192, 16384]
KS = [7, 64, 128, 2048]
KINDS = ["randn", "bf16", "few", "relu", "equal"]


def make_scores(rows: int, width: int, k: int, kind: str, device: str, seed: int = 0) -> torch.Tensor:
    """[rows, width] fp32 scores of `kind`, causal: row r sees a prefix of about width - rows + r + 1 scores
    (at least 1), shifted so that the middle rows see k - 1, k, k + 1; every 5th row (from row 3) all -inf."""
    g = torch.Generator().manual_seed(seed + 7919 * rows + 31 * width + k)
    if kind == "randn":
        x = torch.randn(rows, width, generator=g)
    elif kind == "bf16":
        x = torch.randn(rows, width, generator=g).bfloat16().float()
    elif kind == "few":
        x = torch.randint(-2, 3, (rows, width), generator=g).float()
    elif kind == "relu":  # sum_h w_h relu(q_h . k): many exact zeros, both signs (w < 0), bf16-rounded
        h = 4
        qk = torch.randn(rows, width, h, generator=g) - 0.8
        w = torch.randn(h, generator=g)
        x = (torch.relu(qk) * w).sum(-1).bfloat16().float()
        x[:, ::5] = -0.0
    elif kind == "equal":
        x = torch.full((rows, width), 0.5)
    else:
        raise ValueError(kind)
    mid = rows // 2
    for r in range(rows):
        n = min(width, max(1, k + (r - mid)) if rows > 1 else width)
        if rows > 8:  # the engine's causal chunk: row r sees one more than row r - 1
            x[r, n:] = NEG
        if r % 5 == 3:
            x[r] = NEG
    return x.to(device)


def launchers() -> dict[str, Any]:
    from splitserve.kernels import radix_topk as T

    return {
        "reg": lambda x, out, k: T._reg_into(x, out, k),
        "stream": lambda x, out, k: T._stream_into(x, out, k),
    }


def guarded(rows: int, k: int, layout: str, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(buffer, out view, mask of the out slots in the buffer); the buffer all SENTINEL."""
    if layout == "flat":
        buf = torch.full((rows * k + 2 * GUARD,), SENTINEL, dtype=torch.int32, device=device)
        out = buf[GUARD : GUARD + rows * k].view(rows, k)
        inside = torch.zeros_like(buf, dtype=torch.bool)
        inside[GUARD : GUARD + rows * k] = True
    else:
        buf = torch.full((rows + 2, k + 2 * GUARD), SENTINEL, dtype=torch.int32, device=device)
        out = buf[1 : rows + 1, GUARD : GUARD + k]
        inside = torch.zeros_like(buf, dtype=torch.bool)
        inside[1 : rows + 1, GUARD : GUARD + k] = True
    return buf, out, inside


def check_call(fn: Any, x: torch.Tensor, k: int, layout: str, want: torch.Tensor) -> dict[str, Any]:
    """One call of fn into a guarded out: its status ("ok", "oob", "unwritten", "mismatch") and evidence."""
    buf, out, inside = guarded(x.shape[0], k, layout, str(x.device))
    fn(x, out, k)
    if x.is_cuda:
        torch.cuda.synchronize()
    buf_c, out_c, inside_c = buf.cpu(), out.cpu(), inside.cpu()
    res: dict[str, Any] = {"status": "ok"}
    outside_bad = (buf_c != SENTINEL) & ~inside_c
    if bool(outside_bad.any()):
        res["status"] = "oob"
        idx = outside_bad.nonzero()[:8].tolist()
        res["oob_where"] = idx
        res["oob_values"] = [int(buf_c[tuple(i)]) for i in idx]
    unwritten = out_c == SENTINEL
    if bool(unwritten.any()):
        res["status"] = "unwritten" if res["status"] == "ok" else res["status"] + "+unwritten"
        res["unwritten_rows"] = unwritten.any(1).nonzero().flatten()[:8].tolist()
        res["unwritten_count"] = int(unwritten.sum())
    diff = (out_c != want).any(1)
    if bool(diff.any()):
        if res["status"] == "ok":
            res["status"] = "mismatch"
        r = int(diff.nonzero()[0])
        res["bad_rows"] = int(diff.sum())
        res["first_bad_row"] = r
        res["visible_in_row"] = int((x[r] > NEG).sum())
        res["got"] = out_c[r][:16].tolist()
        res["want"] = want[r][:16].tolist()
    return res


def sweep(args: argparse.Namespace, results: list[dict[str, Any]]) -> bool:
    from splitserve.bench.topk import exact_ref
    from splitserve.kernels import radix_topk as T

    fns = launchers()
    variants = [v for v in args.variants.split(",") if v]
    if args.quick:
        cells = [(r, w, k) for r in (1, 7, 65) for w in (17, 129, 301) for k in (7, 128)]
        kinds = ["bf16", "few", "relu"]
    else:
        cells = [(r, w, k) for r in ROWS for w in WIDTHS for k in KS]
        kinds = KINDS
    t0 = time.time()
    for rows, width, k in cells:
        for kind in kinds:
            x = make_scores(rows, width, k, kind, args.device)
            want = exact_ref(x.cpu(), k)
            for v in variants:
                if v == "reg" and width > T.REG_WIDTH_LIMIT:
                    continue
                for layout in ("flat", "pad"):
                    case = {"variant": v, "rows": rows, "width": width, "k": k, "kind": kind, "layout": layout}
                    try:
                        case.update(check_call(fns[v], x, k, layout, want))
                    except Exception as e:  # noqa: BLE001 - a CUDA error: report this case and stop
                        case.update(status="error", error=f"{type(e).__name__}: {e}"[:500])
                        results.append(case)
                        print(f"ERROR at {case}", flush=True)
                        return False
                    results.append(case)
                    if case["status"] != "ok":
                        print(_line(case), flush=True)
    print(f"sweep: {len(results)} calls in {time.time() - t0:.0f} s", flush=True)
    return True


def _line(c: dict[str, Any]) -> str:
    extra = ""
    if "first_bad_row" in c:
        extra += f" row {c['first_bad_row']} (visible {c['visible_in_row']}) of {c['bad_rows']} bad"
    if "oob_where" in c:
        extra += f" oob at {c['oob_where'][:3]}"
    if "unwritten_count" in c:
        extra += f" unwritten {c['unwritten_count']} in rows {c['unwritten_rows'][:4]}"
    if "error" in c:
        extra += " " + c["error"][:120]
    if "rows" not in c:  # an engine run's own entry (its error)
        return f"{c['variant']:6} {c.get('run', '')} -> {c['status']}{extra}"
    head = f"{c['variant']:6} rows {c['rows']:4} width {c['width']:5} k {c['k']:4} {c['kind']:6} {c['layout']:4}"
    return f"{head} -> {c['status']}{extra}"


def engine_runs(args: argparse.Namespace, results: list[dict[str, Any]], out_dir: Path) -> bool:
    """The engine tests' kernel-shaped runs with the reg kernel on; every indexer topk call of >= MIN_ROWS rows
    checked. Returns False at the first CUDA error."""
    import tempfile
    from dataclasses import replace

    from splitserve.bench.topk import exact_ref
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.engine import Engine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.kernels import indexer as I
    from splitserve.kernels import radix_topk as T
    from splitserve.model import load
    from splitserve.model.checkpoint import PRESETS, make_checkpoint

    T.REG_MAX_WIDTH = args.reg_max_width
    real = I.topk_rows
    state: dict[str, Any] = {"calls": 0, "checked": 0, "saved": False, "run": ""}

    def checked(logits: torch.Tensor, k: int) -> torch.Tensor:
        got = real(logits, k)
        state["calls"] += 1
        capturing = logits.is_cuda and torch.cuda.is_current_stream_capturing()
        name = T.choose_kernel(*logits.shape) if T.use_triton(logits) else "torch"
        if capturing or name == "torch":
            return got
        state["checked"] += 1
        want = exact_ref(logits.cpu(), k)
        fn = launchers()[name] if name in ("reg", "stream") else None
        case = {"run": state["run"], "variant": name, "rows": logits.shape[0], "width": logits.shape[1], "k": k}
        case["kind"], case["layout"] = "engine", "engine"
        case["status"] = "ok" if torch.equal(got.cpu(), want) else "mismatch"
        if fn is not None:
            guard = check_call(fn, logits.contiguous(), k, "flat", want)
            if guard["status"] != "ok":
                case.update(guard)
                case["status"] = "guarded:" + guard["status"]
        if case["status"] != "ok":
            if case["status"] == "mismatch":
                diff = (got.cpu() != want).any(1)
                r = int(diff.nonzero()[0])
                case.update(first_bad_row=r, bad_rows=int(diff.sum()), visible_in_row=int((logits[r] > NEG).sum()))
                case.update(got=got[r].cpu()[:16].tolist(), want=want[r][:16].tolist())
            print(_line(case), flush=True)
            if not state["saved"]:
                torch.save({"logits": logits.cpu(), "k": k, "got": got.cpu()}, out_dir / "engine_first_bad.pt")
                state["saved"] = True
        results.append(case)
        return got

    I.topk_rows = checked
    try:
        cfg = replace(PRESETS["small"], num_attention_heads=16, index_n_heads=16)
        path = make_checkpoint(cfg, Path(tempfile.mkdtemp()), seed=0, dtype=torch.float32)

        runs = [
            ("fp32", torch.float32, False, [300, 140, 9, 64], 5, (96, 16, 128, 0)),
            ("fp32-mtp2", torch.float32, False, [300, 140, 9, 64], 5, (96, 16, 128, 2)),
            (
                "bf16-fp8",
                torch.bfloat16,
                True,
                [500, 200, 130, 33],
                6,
                (128, 64, 256, 0),
            ),
        ]
        for name, dtype, fp8, lens, seed, ecfg in runs:
            state["run"] = name
            net = load(path, device=args.device, dtype=dtype, indexer_fp8=fp8)
            g = torch.Generator().manual_seed(seed)  # tests/engine/conftest.py random_prompts
            prompts = [torch.randint(2, net.cfg.vocab_size, (n,), generator=g).tolist() for n in lens]
            params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
            nb, bs, chunk, mtp = ecfg
            dt = str(dtype).split(".")[-1]
            eng = Engine(
                net,
                EngineConfig(
                    num_blocks=nb,
                    block_size=bs,
                    chunk_size=chunk,
                    mtp_draft_tokens=mtp,
                    device=args.device,
                    dtype=dt,
                    paged_kernels=True,
                ),
            )
            try:
                eng.generate(prompts, params)
                if args.device == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a CUDA error: report and stop
                results.append(
                    {"run": name, "variant": "engine", "status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
                )
                print(f"ERROR in engine run {name}: {e}", flush=True)
                return False
            print(f"engine run {name}: {state['calls']} topk calls so far, {state['checked']} checked", flush=True)
    finally:
        I.topk_rows = real
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for topk_diag.json")
    ap.add_argument("--quick", action="store_true", help="a few small cells (CPU interpreter)")
    ap.add_argument("--variants", default="reg,stream")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--engine", action="store_true", help="the engine tests' runs with every topk call checked")
    ap.add_argument("--reg-max-width", type=int, default=16384)
    args = ap.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("on the CPU the kernels need TRITON_INTERPRET=1 (set before python starts)", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    meta: dict[str, Any] = {"argv": sys.argv[1:], "torch": torch.__version__}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    if args.device == "cuda":
        meta["gpu"] = torch.cuda.get_device_name()
    ok = engine_runs(args, results, out_dir) if args.engine else sweep(args, results)
    bad = [c for c in results if c["status"] != "ok"]
    summary: dict[str, dict[str, int]] = {}
    for c in results:
        s = summary.setdefault(c["variant"], {})
        s[c["status"]] = s.get(c["status"], 0) + 1
    print("summary (variant -> status: calls):", json.dumps(summary))
    for c in bad[:40]:
        print(_line(c))
    path = out_dir / "topk_diag.json"
    path.write_text(json.dumps({"meta": meta, "summary": summary, "completed": ok, "cases": results}, indent=1))
    print(f"wrote {path}")
    return 0 if ok and not bad else 1


if __name__ == "__main__":
    sys.exit(main())
