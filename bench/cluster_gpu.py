"""Helpers of bench/run_cluster_gpu.sh (the one-GPU cluster run): each step prints a line or two and
writes JSON; `summary` prints the table of everything the run wrote.

    python -m splitserve.bench.cluster_gpu config  --base deploy/gpu-1gpu.yaml --ckpt DIR --mode disaggregated --out x.yaml
    python -m splitserve.bench.cluster_gpu prefill-alone --ckpt DIR --lengths 1024 4096 --out prefill.json
    python -m splitserve.bench.cluster_gpu client-flow --url URL --out flow.json
    python -m splitserve.bench.cluster_gpu ttft --url URL --lengths 1024 4096 --out ttft.json
    python -m splitserve.bench.cluster_gpu graphs --url URL --out graphs.json
    python -m splitserve.bench.cluster_gpu summary --dir OUT

`prefill-alone` is the engine without the cluster (the same engine settings as the prefill pool, warmed
up): the time to prefill a prompt and sample its first token. `ttft` sends the same prompt lengths one at
a time (uncontended) through the router and reports each one's TTFT and its stages (the router's
per-stage histograms, router/stage_metrics.py), so TTFT - prefill alone is what disaggregation costs.
`graphs` reads the workers' CUDA-graph counters from the router's /metrics: captures after ready must be 0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import httpx


def _write(path: str | None, doc: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")


def cmd_config(a: argparse.Namespace) -> int:
    import yaml

    doc = yaml.safe_load(Path(a.base).read_text())
    doc["model"]["path"] = a.ckpt
    doc["router"]["mode"] = a.mode
    if a.mode == "colocated":
        doc.pop("prefill", None)
        doc["decode"]["replicas"] = a.decode_replicas or 2
        doc["decode"].setdefault("chunk_size", a.colocated_chunk)
    elif a.decode_replicas:
        doc["decode"]["replicas"] = a.decode_replicas
    if a.mtp is not None:
        doc["decode"]["mtp_draft_tokens"] = a.mtp
    if a.device == "cpu":  # a dry run of the script on a CPU (tiny checkpoint): small caches, fp32
        doc["model"].update(device="cpu", dtype="float32", indexer_fp8=False, max_model_len=2048)
        for pool in ("prefill", "decode"):
            if pool in doc:
                doc[pool].update(gpus_per_worker=0, num_blocks=512, max_batch_tokens=2048, chunk_size=512)
    Path(a.out).write_text(yaml.safe_dump(doc, sort_keys=False))
    print(f"wrote {a.out} ({a.mode})")
    return 0


def cmd_prefill_alone(a: argparse.Namespace) -> int:
    import torch

    from splitserve.deploy.config import load_config
    from splitserve.deploy.worker_actor import engine_config_for
    from splitserve.engine.engine import Engine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.model import load

    cfg = load_config(a.config)
    ecfg = engine_config_for(cfg, "prefill" if cfg.router.mode == "disaggregated" else "decode")
    net = load(a.ckpt, device="cuda", dtype=ecfg.torch_dtype, indexer_fp8=ecfg.indexer_fp8)
    eng = Engine(net, ecfg)
    warm = eng.warm_up()
    g = torch.Generator().manual_seed(0)
    rows = []
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for n in a.lengths:
        times = []
        for _ in range(a.repeats + 1):
            prompt = torch.randint(100, net.cfg.vocab_size - 100, (n,), generator=g).tolist()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            eng.generate([prompt], params)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times[1:])
        rows.append({"tokens": n, "prefill_ms": round(1e3 * med, 3), "all_ms": [round(1e3 * t, 3) for t in times]})
        print(f"engine alone: prefill + first token of {n} tokens: {1e3 * med:.1f} ms (median of {a.repeats})")
    doc = {
        "what": "engine prefill alone (the prefill pool's engine settings, warmed up)",
        "rows": rows,
        "warmup": {k: v for k, v in warm.items() if k != "prefill_lengths"},
    }
    _write(a.out, doc)
    return 0


def _model(client: httpx.Client, url: str) -> str:
    return client.get(f"{url}/v1/models").json()["data"][0]["id"]


def cmd_client_flow(a: argparse.Namespace) -> int:
    """Completions, chat, and both streamed, through the openai client; every SSE line parses."""
    import openai

    oc = openai.OpenAI(base_url=a.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = oc.models.list().data[0].id
    checks = {}
    t0 = time.perf_counter()
    c = oc.completions.create(model=model, prompt="def fib(n):", max_tokens=16)
    # the text may be empty: random weights often write special tokens, which the text leaves out
    checks["completion"] = (
        c.choices[0].finish_reason in ("length", "stop") and c.usage is not None and c.usage.completion_tokens > 0
    )
    ch = oc.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=16)
    checks["chat"] = (
        ch.choices[0].message.content is not None and ch.usage is not None and ch.usage.completion_tokens > 0
    )
    parts = [
        x.choices[0].text
        for x in oc.completions.create(model=model, prompt="Hello", max_tokens=16, stream=True)
        if x.choices
    ]
    checks["completion_stream"] = len(parts) > 1
    chunks = [
        x
        for x in oc.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=16, stream=True
        )
    ]
    checks["chat_stream"] = len(chunks) > 1
    # every SSE line is one JSON event for a str.splitlines-style reader (httpx.iter_lines)
    with (
        httpx.Client(timeout=120) as hc,
        hc.stream(
            "POST",
            f"{a.url}/v1/completions",
            json={"model": model, "prompt": "x", "max_tokens": 48, "stream": True, "ignore_eos": True},
        ) as r,
    ):
        lines = [ln for ln in r.iter_lines() if ln]
    ok = lines and lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        try:
            json.loads(ln[len("data: ") :])
        except (json.JSONDecodeError, IndexError):
            ok = False
    checks["sse_lines_parse"] = bool(ok)
    doc = {"checks": checks, "seconds": round(time.perf_counter() - t0, 3), "sample_text": c.choices[0].text}
    print("client flow:", " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in checks.items()))
    _write(a.out, doc)
    return 0 if all(checks.values()) else 1


def _stages(url: str, client: httpx.Client) -> dict:
    from splitserve.bench.serve import parse_stage_metrics

    return parse_stage_metrics(client.get(f"{url}/metrics").text)


def cmd_ttft(a: argparse.Namespace) -> int:
    from splitserve.bench.serve import DEFAULT_TOKEN_IDS, stage_deltas

    rows = []
    with httpx.Client(timeout=300) as c:
        model = _model(c, a.url)
        for n in a.lengths:
            ttfts: list[float] = []
            before = _stages(a.url, c)
            for i in range(a.repeats + 1):
                lo, hi = DEFAULT_TOKEN_IDS  # random ids: no prefix-cache hits between the requests
                prompt = [lo + (7919 * (i * 131 + j + n) + 104729 * i) % (hi - lo) for j in range(n)]
                t0 = time.perf_counter()
                first: float | None = None
                with c.stream(
                    "POST",
                    f"{a.url}/v1/completions",
                    json={"model": model, "prompt": prompt, "max_tokens": 2, "stream": True, "ignore_eos": True},
                ) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
                    for ln in r.iter_lines():
                        if first is None and ln.startswith("data: {") and '"text"' in ln:
                            first = time.perf_counter() - t0
                if first is None:
                    raise RuntimeError(f"the {n}-token request streamed no text (no time to first token)")
                if i:  # the first one is a warm-up (peer handshake)
                    ttfts.append(first)
                else:
                    before = _stages(a.url, c)
            st = stage_deltas(before, _stages(a.url, c))
            med = statistics.median(ttfts)
            rows.append(
                {
                    "tokens": n,
                    "ttft_ms": round(1e3 * med, 3),
                    "all_ms": [round(1e3 * t, 3) for t in ttfts],
                    "stages": st,
                }
            )
            print(
                f"uncontended TTFT, {n} tokens: {1e3 * med:.1f} ms; stages (mean ms): "
                + ", ".join(f"{k} {v['mean_ms']:.1f}" for k, v in st.items())
            )
    _write(a.out, {"rows": rows})
    return 0


def cmd_graphs(a: argparse.Namespace) -> int:
    text = httpx.get(f"{a.url}/metrics", timeout=30).text
    vals = {}
    for line in text.splitlines():
        if line.startswith("splitserve_backend_worker_graph_") and not line.startswith("#"):
            name, _, v = line.rpartition(" ")
            vals[name] = float(v)
    misses = sum(v for k, v in vals.items() if "misses_after_ready" in k)
    print(f"CUDA graphs: {vals or 'no counters'}; steps without a graph after ready: {misses:g}")
    _write(a.out, {"counters": vals, "misses_after_ready": misses})
    return 0 if misses == 0 else 1


def _load(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def cmd_summary(a: argparse.Namespace) -> int:
    d = Path(a.dir)
    out = {}
    print(f"\n=== one-GPU cluster run: {d} ===")
    alone = _load(d / "prefill-alone.json")
    ttft = _load(d / "ttft-disagg.json")
    if alone and ttft:
        base = {r["tokens"]: r["prefill_ms"] for r in alone["rows"]}
        print("\nTTFT of an uncontended disaggregated request vs the engine's prefill alone (goal: <= +15 ms)")
        print(f"{'tokens':>7} | {'prefill alone ms':>16} | {'TTFT ms':>8} | {'extra ms':>8} | stages (mean ms)")
        for r in ttft["rows"]:
            b = base.get(r["tokens"])
            extra = None if b is None else r["ttft_ms"] - b
            st = ", ".join(f"{k} {v['mean_ms']:.1f}" for k, v in r["stages"].items() if k != "ttft")
            print(
                f"{r['tokens']:>7} | {b or float('nan'):>16.1f} | {r['ttft_ms']:>8.1f} | "
                f"{extra if extra is not None else float('nan'):>8.1f} | {st}"
            )
        out["ttft_vs_prefill"] = [
            {"tokens": r["tokens"], "prefill_alone_ms": base.get(r["tokens"]), "ttft_ms": r["ttft_ms"]}
            for r in ttft["rows"]
        ]
    runs = []
    for f in sorted(d.glob("serve-*.json")):
        doc = _load(f)
        if not doc:
            continue
        for r in doc.get("runs", []):
            runs.append((f.stem.removeprefix("serve-"), r))
    if runs:
        slo = None
        print("\nserve: goodput = requests/s meeting the SLO (TTFT <= 2 s and the request's p99 ITL <= 50 ms)")
        print(
            f"{'cluster-workload':28} | {'rate':>5} | {'done':>4} | {'fail':>4} | {'goodput':>7} | "
            f"{'TTFT p50/p99 ms':>17} | {'ITL p50/p99/max ms':>20} | {'ITL p99/p50':>11}"
        )
        for name, r in runs:
            t, i = r["ttft_ms"], r["itl_ms"]
            fmt = lambda s, k: "-" if s[k] is None else f"{s[k]:.0f}"
            ratio = "-" if not i["p50"] else f"{i['p99'] / i['p50']:.1f}"
            print(
                f"{name:28} | {str(r['request_rate']):>5} | {r['completed']:>4} | {r['failed']:>4} | "
                f"{r['goodput']:>7.2f} | {fmt(t, 'p50') + '/' + fmt(t, 'p99'):>17} | "
                f"{fmt(i, 'p50') + '/' + fmt(i, 'p99') + '/' + fmt(i, 'max'):>20} | {ratio:>11}"
            )
        out["serve"] = [
            {
                "run": n,
                **{k: r[k] for k in ("request_rate", "completed", "failed", "goodput", "ttft_ms", "itl_ms")},
                "stages": r.get("stages"),
            }
            for n, r in runs
        ]
        del slo
    tr = _load(d / "transfer.json")
    if tr:
        rows = tr["rows"]
        region = {(r["backend"], r["tokens"]): r["median_ms"] for r in rows if r["case"] == "one region"}
        print(
            "\ntransfer (NIXL between two processes on the GPU): of one region = region time / case time "
            "(goal for scattered blocks: >= 0.80)"
        )
        for r in rows:
            reg = region.get((r["backend"], r["tokens"]))
            of = reg / r["median_ms"] if reg else math.nan
            print(
                f"{r['backend']:5} {r['tokens']:>6} {r['case']:40} {r['descriptors']:>6} descs "
                f"{r['median_ms']:>9.3f} ms {r['gbps']:>8.1f} GB/s  of region {of:5.2f}"
            )
    gr = [(_load(f), f.stem) for f in sorted(d.glob("graphs-*.json"))]
    for g, name in gr:
        if g:
            print(f"\n{name}: CUDA-graph misses after ready = {g['misses_after_ready']:g}")
    for f in sorted(d.glob("flow-*.json")):
        doc = _load(f)
        if doc:
            print(f"{f.stem}: " + " ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in doc["checks"].items()))
    _write(str(d / "summary.json"), out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config")
    c.add_argument("--base", required=True)
    c.add_argument("--ckpt", required=True)
    c.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    c.add_argument("--decode-replicas", type=int, default=0)
    c.add_argument("--colocated-chunk", type=int, default=2048)
    c.add_argument("--mtp", type=int, default=None)
    c.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a dry run of the script")
    c.add_argument("--out", required=True)
    p = sub.add_parser("prefill-alone")
    p.add_argument("--config", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    f = sub.add_parser("client-flow")
    f.add_argument("--url", default="http://127.0.0.1:8000")
    f.add_argument("--out")
    t = sub.add_parser("ttft")
    t.add_argument("--url", default="http://127.0.0.1:8000")
    t.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--out")
    g = sub.add_parser("graphs")
    g.add_argument("--url", default="http://127.0.0.1:8000")
    g.add_argument("--out")
    s = sub.add_parser("summary")
    s.add_argument("--dir", required=True)
    a = ap.parse_args(argv)
    return {
        "config": cmd_config,
        "prefill-alone": cmd_prefill_alone,
        "client-flow": cmd_client_flow,
        "ttft": cmd_ttft,
        "graphs": cmd_graphs,
        "summary": cmd_summary,
    }[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
