"""A bounded load test against a running router: streaming completions at several concurrency
levels, each for a fixed time. Prints a table (requests, errors, 429s, p50/p99 TTFT and ITL,
output tokens/s, cache blocks in use and worker RSS before/after) and writes JSON.

    python -m splitserve.bench.load --url http://127.0.0.1:8000 --concurrency 1 4 16 --seconds 60 \
        --out bench/results/load-cpu.json

Every request loop is bounded in count and time and stops by itself; only the given URL is targeted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


@dataclass
class LevelResult:
    concurrency: int
    seconds: float
    requests: int = 0
    errors: int = 0
    rejected_429: int = 0
    output_tokens: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    blocks_used_after: int = 0
    worker_rss_mb_before: float = 0.0
    worker_rss_mb_after: float = 0.0
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        def pct(xs: list[float], q: float) -> float | None:
            if not xs:
                return None
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))]

        return {
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "requests": self.requests,
            "errors": self.errors,
            "rejected_429": self.rejected_429,
            "output_tokens": self.output_tokens,
            "output_tok_per_s": self.output_tokens / self.seconds if self.seconds else 0.0,
            "ttft_p50_ms": _ms(pct(self.ttft_s, 0.5)),
            "ttft_p99_ms": _ms(pct(self.ttft_s, 0.99)),
            "itl_p50_ms": _ms(pct(self.itl_s, 0.5)),
            "itl_p99_ms": _ms(pct(self.itl_s, 0.99)),
            "blocks_used_after": self.blocks_used_after,
            "worker_rss_mb_before": self.worker_rss_mb_before,
            "worker_rss_mb_after": self.worker_rss_mb_after,
            "error_samples": self.error_samples[:5],
        }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def _rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


async def _status(c: httpx.AsyncClient, url: str, headers: dict) -> dict:
    r = await c.get(f"{url}/admin/status", headers=headers, timeout=10)
    r.raise_for_status()
    return r.json()


async def _one(
    c: httpx.AsyncClient,
    url: str,
    headers: dict,
    res: LevelResult,
    rng: random.Random,
    model: str,
    max_tokens: int,
    prompt_len: int,
) -> None:
    prompt = [0] + [rng.randrange(5, 1000) for _ in range(prompt_len)]
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0.8,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    last = None
    try:
        async with c.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as r:
            if r.status_code == 429:
                res.rejected_429 += 1
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                return
            if r.status_code != 200:
                res.errors += 1
                res.error_samples.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    res.errors += 1
                    res.error_samples.append(str(ev["error"])[:200])
                    return
                now = time.perf_counter()
                if ev.get("choices") and ev["choices"][0].get("text"):
                    if last is None:
                        res.ttft_s.append(now - t0)
                    else:
                        res.itl_s.append(now - last)
                    last = now
                if ev.get("usage"):
                    res.output_tokens += ev["usage"].get("completion_tokens", 0)
        res.requests += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.errors += 1
        res.error_samples.append(repr(e)[:200])


async def run_level(
    url: str,
    concurrency: int,
    seconds: float,
    *,
    model: str,
    max_tokens: int,
    prompt_len: int,
    api_key: str | None,
    max_requests: int,
    seed: int = 0,
    operator_token: str | None = None,
) -> LevelResult:
    """`operator_token` opens /admin/status (worker pids and blocks); `api_key` the OpenAI API."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    admin = {"Authorization": f"Bearer {operator_token}"} if operator_token else {}
    res = LevelResult(concurrency, seconds)
    async with httpx.AsyncClient() as c:
        st = await _status(c, url, admin)
        pids = [w["pid"] for w in st["workers"]]
        res.worker_rss_mb_before = _rss_mb(pids)
        deadline = time.monotonic() + seconds
        budget = [max_requests]

        async def loop(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while time.monotonic() < deadline and budget[0] > 0:
                budget[0] -= 1
                await _one(c, url, headers, res, rng, model, max_tokens, prompt_len)

        await asyncio.gather(*(loop(k) for k in range(concurrency)))
        for _ in range(50):  # blocks come back once streams end
            st = await _status(c, url, admin)
            res.blocks_used_after = sum(w["blocks_used"] for w in st["workers"])
            if res.blocks_used_after == 0:
                break
            await asyncio.sleep(0.2)
        res.worker_rss_mb_after = _rss_mb([w["pid"] for w in st["workers"]])
    return res


def print_table(rows: list[dict]) -> None:
    cols = [
        "concurrency",
        "requests",
        "errors",
        "rejected_429",
        "output_tok_per_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "blocks_used_after",
        "worker_rss_mb_before",
        "worker_rss_mb_after",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--max-requests", type=int, default=100000, help="per level, a hard bound")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--api-key", default=None)
    ap.add_argument(
        "--operator-token-file",
        default=None,
        help="the cluster's operator token, for /admin/status (default: the one `splitserve up` wrote "
        "for this URL into its run directory)",
    )
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    from splitserve.deploy.cluster_cli import CliError, read_operator_token

    try:
        token = read_operator_token(args.url, args.operator_token_file)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = []
    for cc in args.concurrency:
        r = asyncio.run(
            run_level(
                args.url,
                cc,
                args.seconds,
                model=args.model,
                max_tokens=args.max_tokens,
                prompt_len=args.prompt_len,
                api_key=args.api_key,
                max_requests=args.max_requests,
                operator_token=token,
            )
        )
        rows.append(r.summary())
        print_table(rows[-1:])
    print()
    print_table(rows)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": " ".join(
                        ["python -m splitserve.bench.load", *(argv if argv is not None else sys.argv[1:])]
                    ),
                    "device": f"{platform.node()} {platform.processor() or platform.machine()} (CPU)",
                    "levels": rows,
                },
                indent=2,
            )
        )
    return 0 if all(r["errors"] == 0 and r["blocks_used_after"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
