"""`splitserve bench serve`: a serving benchmark against a running router's OpenAI API, in the manner
of sglang.bench_serving's "random" dataset. Prints a table per request rate and writes JSON.

    splitserve bench serve --url http://127.0.0.1:8000 --input-len 4096 --output-len 256 --range-ratio 0.5 \
        --num-prompts 200 --request-rate 0.5 1 2 inf --slo-ttft-ms 2000 --slo-itl-ms 50 \
        --cluster "1P1D, 2x H200" --out bench/results/serve-long.json

Dataset: --num-prompts requests; each one's input length is drawn uniformly from
[input_len x range_ratio, input_len] and its output length from [output_len x range_ratio, output_len]
(range ratio 1: fixed lengths). Prompts are random token ids in [--token-ids LO, HI) sent as a token-id
array (`--prompt-format text` sends them decoded to text with --tokenizer instead; the router then
tokenizes and its usage field gives the real prompt length). Every request streams
/v1/completions with ignore_eos, so it generates exactly its output length. The dataset depends on
--seed only: every request rate of one invocation, and every invocation with the same seed and
lengths, sends the same prompts (compare clusters with the same command).

Arrivals: --request-rate R sends requests as a Poisson process of rate R per second (exponential gaps,
the same standard draws scaled by 1/R for every rate); inf sends them all at once. --max-concurrency C
caps the requests in flight (with inf: a closed loop of C clients). Several rates run one after another.

Per request, from the SSE stream (--token-count logprobs, the default, asks for `logprobs: 0`, so every
chunk lists the tokens it carries; usage mode counts chunks with text and takes the total from the
`usage` field of the final chunk):
  TTFT  send -> first chunk carrying a token;
  ITL   gap between consecutive chunks carrying tokens; a chunk with k tokens (MTP accepted drafts)
        counts as k gaps of gap / k;
  TPOT  (E2E - TTFT) / (output tokens - 1);
  E2E   send -> end of the stream.
A request counts as completed when its stream ends with a finish reason and no error, else failed (its
error kept as a sample). Each request has a timeout (--request-timeout) and never hangs the run.
Per run: completed/failed, duration (first send -> last end), mean/p50/p90/p99 of TTFT, ITL (all
tokens of all completed requests), TPOT and E2E; input/output token and request throughput over the
duration; goodput = completed requests meeting the SLO per second: TTFT <= --slo-ttft-ms and the 99th
percentile (nearest rank) of the request's own ITLs <= --slo-itl-ms — its largest ITL for requests with
fewer than 100 tokens, so one stall of a short request is a miss, while a long one may have 1%.
Input tokens are the router's usage.prompt_tokens when the stream reports it, else the prompt's length.

Stages: the router's /metrics is read before and after each run; the difference of its per-stage
histograms (splitserve_router_stage_seconds, router/stage_metrics.py: router_queue, reserve,
prefill_queue, prefill_compute, transfer, prefill_overhead, first_decode_step, stream, ttft) gives each
stage's count, mean and bucket-interpolated p50/p99 for the run (disaggregated clusters; a router
without them, e.g. co-located, gives none). Printed under the run's row and kept as "stages" in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import platform
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

DEFAULT_TOKEN_IDS = (10, 1000)  # inside the vocabulary of every preset (the tiny one has 1024 tokens)
ERROR_SAMPLES = 5


# ---------------------------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class Prompt:
    index: int
    token_ids: list[int]
    output_len: int
    text: str | None = None  # --prompt-format text: what is sent instead of token_ids


def random_dataset(
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
    token_ids: tuple[int, int] = DEFAULT_TOKEN_IDS,
) -> list[Prompt]:
    """Random prompts as sglang.bench_serving's "random" dataset draws them (lengths uniform in
    [len x range_ratio, len]); a function of its arguments only."""
    rng = np.random.default_rng(seed)
    ins = rng.integers(max(1, int(input_len * range_ratio)), input_len + 1, size=num_prompts)
    outs = rng.integers(max(1, int(output_len * range_ratio)), output_len + 1, size=num_prompts)
    lo, hi = token_ids
    return [Prompt(i, rng.integers(lo, hi, size=int(n)).tolist(), int(m)) for i, (n, m) in enumerate(zip(ins, outs))]


def with_text(prompts: list[Prompt], tokenizer_path: str) -> list[Prompt]:
    """The same prompts decoded to text with the checkpoint's tokenizer ("tiny": the embedded one)."""
    from splitserve.model.presets import resolve_checkpoint
    from splitserve.model.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_checkpoint(tokenizer_path))
    return [Prompt(p.index, p.token_ids, p.output_len, tok.decode(p.token_ids)) for p in prompts]


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: Poisson arrivals at `rate` per second, none at inf."""
    if math.isinf(rate):
        return [0.0] * n
    draws = np.random.default_rng(seed + 1).standard_exponential(n)
    return [0.0] + (draws[1:] / rate).tolist()


# ---------------------------------------------------------------------------------------------- one request


@dataclass
class RequestRecord:
    index: int
    prompt_tokens: int  # router's usage.prompt_tokens, else the prompt's token count
    requested_tokens: int  # max_tokens sent (ignore_eos: the expected output length)
    start_s: float = 0.0  # send time, relative to the run's start
    ok: bool = False
    error: str | None = None
    finish_reason: str | None = None
    output_tokens: int = 0  # counted from the stream (usage mode: usage.completion_tokens)
    usage_completion_tokens: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itls_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_p99_s(self) -> float | None:
        return _nearest_rank(self.itls_s, 0.99)

    def compact(self) -> dict:
        return {
            "index": self.index,
            "ok": self.ok,
            "error": self.error,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "requested_tokens": self.requested_tokens,
            "output_tokens": self.output_tokens,
            "usage_completion_tokens": self.usage_completion_tokens,
            "start_ms": _ms(self.start_s),
            "ttft_ms": _ms(self.ttft_s),
            "e2e_ms": _ms(self.e2e_s),
            "tpot_ms": _ms(self.tpot_s),
            "itl_p99_ms": _ms(self.itl_p99_s),
            "itl_max_ms": _ms(max(self.itls_s) if self.itls_s else None),
        }


@dataclass(frozen=True)
class RequestOptions:
    url: str
    model: str
    headers: dict[str, str]
    temperature: float
    token_count: str  # "logprobs" | "usage"
    timeout_s: float


async def send_request(
    client: httpx.AsyncClient, opts: RequestOptions, prompt: Prompt, rec: RequestRecord, t_run: float
) -> None:
    """Stream one completion into `rec`; never raises, never outlives opts.timeout_s."""
    body: dict = {
        "model": opts.model,
        "prompt": prompt.text if prompt.text is not None else prompt.token_ids,
        "max_tokens": prompt.output_len,
        "temperature": opts.temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if opts.token_count == "logprobs":
        body["logprobs"] = 0
    t0 = time.perf_counter()
    rec.start_s = t0 - t_run
    try:
        await asyncio.wait_for(_stream(client, opts, body, rec, t0), opts.timeout_s)
    except TimeoutError:
        rec.error = f"no complete answer within {opts.timeout_s:g} s (after {rec.output_tokens} tokens)"
    except Exception as e:  # noqa: BLE001 - any failure of one request is data, never the run's end
        rec.error = f"{type(e).__name__}: {e}"[:300]
    if rec.error is not None:
        rec.ok = False


async def _stream(client: httpx.AsyncClient, opts: RequestOptions, body: dict, rec: RequestRecord, t0: float) -> None:
    last: float | None = None
    async with client.stream("POST", f"{opts.url}/v1/completions", json=body, headers=opts.headers) as r:
        if r.status_code != 200:
            rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200].decode(errors='replace')}"
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            now = time.perf_counter()
            ev = json.loads(line[6:])
            if "error" in ev:
                rec.error = str(ev["error"].get("message", ev["error"]))[:300]
                return
            if ev.get("usage"):
                rec.prompt_tokens = int(ev["usage"]["prompt_tokens"])
                rec.usage_completion_tokens = int(ev["usage"]["completion_tokens"])
            for choice in ev.get("choices") or ():
                if opts.token_count == "logprobs":
                    k = len((choice.get("logprobs") or {}).get("tokens") or ())
                else:
                    k = 1 if choice.get("text") else 0
                if k:
                    if last is None:
                        rec.ttft_s = now - t0
                    else:
                        rec.itls_s.extend([(now - last) / k] * k)
                    last = now
                    rec.output_tokens += k
                if choice.get("finish_reason"):
                    rec.finish_reason = choice["finish_reason"]
    rec.e2e_s = time.perf_counter() - t0
    if opts.token_count == "usage" and rec.usage_completion_tokens is not None:
        rec.output_tokens = rec.usage_completion_tokens
    if rec.finish_reason is None:
        rec.error = "the stream ended without a finish reason"
    elif rec.ttft_s is None:
        rec.error = "the stream carried no token"
    else:
        rec.ok = True


# ---------------------------------------------------------------------------------------------- one run


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000.0 * x, 3)


def _nearest_rank(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def _stats_ms(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(xs) * 1000.0
    return {
        "mean": round(float(a.mean()), 3),
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "max": round(float(a.max()), 3),
    }


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    itl_ms: float

    def met(self, r: RequestRecord) -> bool:
        if not r.ok or r.ttft_s is None or r.ttft_s * 1000.0 > self.ttft_ms:
            return False
        p99 = r.itl_p99_s
        return p99 is None or p99 * 1000.0 <= self.itl_ms


def summarize(
    records: list[RequestRecord], duration_s: float, rate: float, max_concurrency: int | None, slo: Slo
) -> dict:
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    errors: list[str] = []
    for r in failed:
        if r.error and r.error not in errors and len(errors) < ERROR_SAMPLES:
            errors.append(r.error)
    in_tok = sum(r.prompt_tokens for r in done)
    out_tok = sum(r.output_tokens for r in done)
    good = sum(1 for r in done if slo.met(r))
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    return {
        "request_rate": "inf" if math.isinf(rate) else rate,
        "max_concurrency": max_concurrency,
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(failed),
        "error_samples": errors,
        "duration_s": round(duration_s, 4),
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "output_len_mismatches": sum(1 for r in done if r.output_tokens != r.requested_tokens),
        "usage_mismatches": sum(1 for r in done if r.usage_completion_tokens not in (None, r.output_tokens)),
        "request_throughput": round(per_s(len(done)), 4),
        "input_throughput": round(per_s(in_tok), 3),
        "output_throughput": round(per_s(out_tok), 3),
        "total_token_throughput": round(per_s(in_tok + out_tok), 3),
        "goodput": round(per_s(good), 4),
        "slo_attained": good,
        "slo_attainment": round(good / len(records), 4) if records else 0.0,
        "mean_concurrency": round(per_s(sum(r.e2e_s or 0.0 for r in done)), 3),
        "ttft_ms": _stats_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl_ms": _stats_ms([x for r in done for x in r.itls_s]),
        "tpot_ms": _stats_ms([t for r in done if (t := r.tpot_s) is not None]),
        "e2e_ms": _stats_ms([r.e2e_s for r in done if r.e2e_s is not None]),
        "requests": [r.compact() for r in records],
    }


async def run_rate(
    prompts: list[Prompt], rate: float, opts: RequestOptions, *, max_concurrency: int | None, seed: int, slo: Slo
) -> dict:
    """Send every prompt (Poisson at `rate`, at most `max_concurrency` in flight) and summarize."""
    records = [RequestRecord(p.index, len(p.token_ids), p.output_len) for p in prompts]
    gaps = arrival_gaps(len(prompts), rate, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max_concurrency or len(prompts))
    timeout = httpx.Timeout(opts.timeout_s, connect=min(30.0, opts.timeout_s))
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t_run = time.perf_counter()

        async def one(p: Prompt, rec: RequestRecord) -> None:
            if sem is None:
                await send_request(client, opts, p, rec, t_run)
                return
            async with sem:
                await send_request(client, opts, p, rec, t_run)

        tasks = []
        due = 0.0
        for p, rec, gap in zip(prompts, records, gaps):
            due += gap  # arrival times are absolute: a late wake-up does not delay the ones after it
            wait = t_run + due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(p, rec)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t_run
    return summarize(records, duration, rate, max_concurrency, slo)


# ---------------------------------------------------------------------------------------------- the CLI


def _rate(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"a request rate must be > 0 or inf, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="splitserve bench serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", default="http://127.0.0.1:8000", help="the router")
    ap.add_argument("--model", default=None, help="model name to send (default: the first of GET /v1/models)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--num-prompts", type=int, default=100)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--range-ratio", type=float, default=1.0, help="lengths uniform in [len x ratio, len]")
    ap.add_argument(
        "--token-ids",
        type=int,
        nargs=2,
        default=list(DEFAULT_TOKEN_IDS),
        metavar=("LO", "HI"),
        help="prompt token ids are drawn from [LO, HI): keep HI within the model's vocabulary",
    )
    ap.add_argument("--prompt-format", choices=("ids", "text"), default="ids")
    ap.add_argument("--tokenizer", default=None, help="checkpoint dir (or 'tiny') for --prompt-format text")
    ap.add_argument(
        "--request-rate",
        type=_rate,
        nargs="+",
        default=[math.inf],
        help="requests per second (Poisson), one run each, in order; inf: all at once",
    )
    ap.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument(
        "--token-count",
        choices=("logprobs", "usage"),
        default="logprobs",
        help="count tokens per chunk from logprobs (default), or chunks with text + usage total",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    ap.add_argument("--slo-itl-ms", type=float, default=50.0)
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds, per request")
    ap.add_argument("--warmup", type=int, default=1, help="requests (4 output tokens each) before the first run")
    ap.add_argument("--cluster", default=None, help="a description of the cluster, kept in the JSON")
    ap.add_argument("--out", default=None, help="JSON output path")
    return ap


def _check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.num_prompts < 1 or a.input_len < 1 or a.output_len < 1:
        ap.error("--num-prompts, --input-len and --output-len must be >= 1")
    if not 0 <= a.range_ratio <= 1:
        ap.error("--range-ratio must be in [0, 1]")
    if not 0 <= a.token_ids[0] < a.token_ids[1]:
        ap.error("--token-ids LO HI needs 0 <= LO < HI")
    if a.max_concurrency is not None and a.max_concurrency < 1:
        ap.error("--max-concurrency must be >= 1")
    if a.prompt_format == "text" and not a.tokenizer:
        ap.error("--prompt-format text needs --tokenizer (a checkpoint directory or 'tiny')")
    if a.request_timeout <= 0:
        ap.error("--request-timeout must be > 0")


async def _router_info(url: str, headers: dict[str, str]) -> tuple[list[str], dict | None]:
    async with httpx.AsyncClient(timeout=10.0) as c:
        r = await c.get(f"{url}/v1/models", headers=headers)
        r.raise_for_status()
        models = [m["id"] for m in r.json()["data"]]
        try:
            health = (await c.get(f"{url}/health", headers=headers)).json()
        except (httpx.HTTPError, json.JSONDecodeError):
            health = None
    return models, health


ROW = [
    ("rate", "request_rate"),
    ("done", "completed"),
    ("fail", "failed"),
    ("dur s", "duration_s"),
    ("req/s", "request_throughput"),
    ("in tok/s", "input_throughput"),
    ("out tok/s", "output_throughput"),
    ("goodput", "goodput"),
]
LAT = [("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms")]


_STAGE_RE = re.compile(r"^splitserve_router_stage_seconds_(bucket|sum|count)\{([^}]*)\} (\S+)$")


def parse_stage_metrics(text: str) -> dict[str, dict]:
    """{stage: {"count", "sum", "buckets": [(le, cumulative count)]}} from a Prometheus text page."""
    out: dict[str, dict] = {}
    for line in text.splitlines():
        m = _STAGE_RE.match(line)
        if not m:
            continue
        kind, labels, value = m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))), float(m.group(3))
        st = out.setdefault(labels.get("stage", "?"), {"count": 0.0, "sum": 0.0, "buckets": []})
        if kind == "bucket":
            st["buckets"].append((float(labels["le"]), value))
        else:
            st[kind] = value
    for st in out.values():
        st["buckets"].sort()
    return out


def _bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus-style histogram_quantile over cumulative (le, count) pairs."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank, prev_le, prev_c = q * buckets[-1][1], 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * ((rank - prev_c) / (c - prev_c) if c > prev_c else 0.0)
        prev_le, prev_c = le, c
    return prev_le


def stage_deltas(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """Per stage, what one run added: count, mean / p50 / p99 in ms."""
    out = {}
    for stage, a in after.items():
        b = before.get(stage, {"count": 0.0, "sum": 0.0, "buckets": []})
        n = a["count"] - b["count"]
        if n <= 0:
            continue
        prev = dict(b["buckets"])
        buckets = [(le, c - prev.get(le, 0.0)) for le, c in a["buckets"]]
        p50, p99 = _bucket_quantile(buckets, 0.5), _bucket_quantile(buckets, 0.99)
        out[stage] = {
            "count": int(n),
            "mean_ms": round(1000 * (a["sum"] - b["sum"]) / n, 3),
            "p50_ms": None if p50 is None else round(1000 * p50, 3),
            "p99_ms": None if p99 is None else round(1000 * p99, 3),
        }
    return out


async def _scrape_stages(url: str, headers: dict[str, str]) -> dict[str, dict]:
    try:
        async with httpx.AsyncClient(timeout=10.0) as c:
            r = await c.get(f"{url}/metrics", headers=headers)
            return parse_stage_metrics(r.text) if r.status_code == 200 else {}
    except httpx.HTTPError:
        return {}


STAGE_ORDER = (
    "router_queue",
    "reserve",
    "prefill_queue",
    "prefill_compute",
    "transfer",
    "prefill_overhead",
    "ttft",
    "first_decode_step",
    "stream",
)


def format_stages(stages: dict[str, dict]) -> str:
    if not stages:
        return ""
    cells = [f"{k} {stages[k]['mean_ms']:.1f}/{stages[k]['p99_ms'] or 0:.1f}" for k in STAGE_ORDER if k in stages]
    return "  stages mean/p99 ms: " + " | ".join(cells)


def format_table(runs: list[dict]) -> str:
    head = [h for h, _ in ROW] + [f"{h} p50/p90/p99 ms" for h, _ in LAT]
    rows = []
    for r in runs:
        cells = [f"{r[k]:.2f}" if isinstance(r[k], float) else str(r[k]) for _, k in ROW]
        for _, k in LAT:
            s = r[k]
            cells.append("-" if s["p50"] is None else f"{s['p50']:.1f}/{s['p90']:.1f}/{s['p99']:.1f}")
        rows.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join(" | ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [head, *rows])


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    models, health = asyncio.run(_router_info(args.url, headers))
    model = args.model or models[0]
    prompts = random_dataset(
        args.num_prompts, args.input_len, args.output_len, args.range_ratio, args.seed, tuple(args.token_ids)
    )
    if args.prompt_format == "text":
        prompts = with_text(prompts, args.tokenizer)
    opts = RequestOptions(args.url, model, headers, args.temperature, args.token_count, args.request_timeout)
    slo = Slo(args.slo_ttft_ms, args.slo_itl_ms)
    if args.warmup:
        warm = [Prompt(-1 - i, p.token_ids, 4, p.text) for i, p in enumerate(prompts[: args.warmup])]
        asyncio.run(run_rate(warm, math.inf, opts, max_concurrency=None, seed=args.seed, slo=slo))
    runs = []
    for rate in args.request_rate:
        before = asyncio.run(_scrape_stages(args.url, headers))
        res = asyncio.run(run_rate(prompts, rate, opts, max_concurrency=args.max_concurrency, seed=args.seed, slo=slo))
        res["stages"] = stage_deltas(before, asyncio.run(_scrape_stages(args.url, headers)))
        runs.append(res)
        print(format_table([res]), flush=True)
        if res["stages"]:
            print(format_stages(res["stages"]), flush=True)
        for e in res["error_samples"]:
            print(f"  error: {e}", flush=True)
    return {
        "benchmark": "serve",
        "command": shlex.join(["splitserve", "bench", "serve", *argv]),
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "client_host": f"{platform.node()} ({platform.machine()})",
        "cluster": args.cluster,
        "router": {"url": args.url, "model": model, "health": health},
        "dataset": {
            "name": "random",
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "range_ratio": args.range_ratio,
            "seed": args.seed,
            "token_ids": list(args.token_ids),
            "prompt_format": args.prompt_format,
            "mean_input_len": round(float(np.mean([len(p.token_ids) for p in prompts])), 2),
            "mean_output_len": round(float(np.mean([p.output_len for p in prompts])), 2),
        },
        "sampling": {"temperature": args.temperature, "ignore_eos": True, "token_count": args.token_count},
        "slo": {
            "ttft_ms": args.slo_ttft_ms,
            "itl_ms": args.slo_itl_ms,
            "rule": "TTFT <= ttft_ms and the request's nearest-rank p99 ITL <= itl_ms",
        },
        "request_timeout_s": args.request_timeout,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = build_parser()
    args = ap.parse_args(argv)
    _check_args(ap, args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    try:
        result = run(args, argv)
    except (httpx.HTTPError, KeyError, IndexError, json.JSONDecodeError) as e:
        print(
            f"error: cannot read the router's models at {args.url}/v1/models: {type(e).__name__}: {e}", file=sys.stderr
        )
        return 2
    print()
    print(format_table(result["runs"]))
    for r in result["runs"]:
        if r.get("stages"):
            print(f"rate {r['request_rate']}:" + format_stages(r["stages"]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0 if all(r["failed"] == 0 for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
