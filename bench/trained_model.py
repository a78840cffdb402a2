"""Evaluate a trained checkpoint (default: the shipped pycoder) on the held-out standard-library code.

- held-out loss, bits per token and per byte, sparse (as served: the indexer's top-k) and dense
  attention, against the add-one unigram baseline of the train split on the same tokens;
- MTP: the MTP layer's top-1 accuracy on the held-out text, and with the engine (greedy speculative
  decoding, batch 1) the draft acceptance rate and the mean accept length (tokens per decode step)
  for k = 1, 2, 3 drafts, checking that every output equals plain greedy decoding;
- the decode speed on this machine (CPU) without and with MTP, and the speedup.

    splitserve bench trained [--model pycoder] [--out bench/results/trained-model]

Writes eval.json and eval.md into --out and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch


def _engine(net: Any, k: int, max_len: int) -> Any:
    from splitserve.engine.config import EngineConfig
    from splitserve.engine.engine import Engine

    return Engine(net, EngineConfig(num_blocks=-(-(max_len + k + 2) // 64) + 4, block_size=64, mtp_draft_tokens=k))


def heldout_prompts(tokenizer: Any, n: int, prompt_tokens: int, gen_tokens: int) -> list[list[int]]:
    """n prompts of prompt_tokens tokens, each from the start of a held-out file region (BOS first),
    spread evenly over the held-out token stream (deterministic)."""
    from splitserve.model.training import corpus_texts, token_stream

    stream = token_stream(tokenizer, corpus_texts("heldout"))
    span = prompt_tokens + gen_tokens
    starts = [i * (stream.numel() - span) // max(n - 1, 1) for i in range(n)]
    return [[0] + stream[s : s + prompt_tokens - 1].tolist() for s in starts]


def mtp_acceptance(
    net: Any, prompts: list[list[int]], gen_tokens: int, ks: list[int], reference: list[list[int]]
) -> dict[int, dict[str, float]]:
    """Greedy speculative decoding, one request at a time: acceptance per k, outputs checked."""
    from splitserve.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True)
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        eng = _engine(net, k, max(map(len, prompts)) + gen_tokens)
        drafted = accepted = steps = emitted = 0
        same = 0
        for p, ref in zip(prompts, reference):
            r = eng.generate([p], params)[0]
            same += r.token_ids == ref
            drafted += r.draft_tokens
            accepted += r.accepted_draft_tokens
            steps += r.draft_tokens // k
            emitted += len(r.token_ids) - 1  # the first token comes from the prefill
        out[k] = {
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": accepted / max(drafted, 1),
            "mean_accept_length": emitted / max(steps, 1),
            "outputs_equal_greedy": same / len(prompts),
        }
    return out


def decode_speed(net: Any, prompts: list[list[int]], gen_tokens: int, ks: list[int], repeats: int) -> dict[int, Any]:
    """Decode tokens per second at batch 1 (prefill excluded), the best of `repeats` passes over the prompts."""
    from splitserve.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=gen_tokens, ignore_eos=True)
    res: dict[int, Any] = {}
    for k in ks:
        eng = _engine(net, k, max(map(len, prompts)) + gen_tokens)
        eng.generate([prompts[0]], params)  # warm
        rates = []
        for _ in range(repeats):
            toks, secs = 0, 0.0
            for p in prompts:
                req = eng.add_request(f"speed-{k}-{time.monotonic_ns()}", p, params)
                while not req.output_ids:  # prefill (first token)
                    eng.step()
                t0 = time.perf_counter()
                while not req.is_finished:
                    eng.step()
                secs += time.perf_counter() - t0
                toks += len(req.output_ids) - 1
            rates.append(toks / secs)
        res[k] = {
            "tokens_per_s": max(rates),
            "tokens_per_s_median": statistics.median(rates),
            "ms_per_token": 1e3 / max(rates),
        }
    for k in ks:
        res[k]["speedup_vs_no_mtp"] = res[k]["tokens_per_s"] / res[ks[0]]["tokens_per_s"]
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    from splitserve.model import load
    from splitserve.model.presets import resolve_checkpoint
    from splitserve.model.tokenizer import load_tokenizer
    from splitserve.model.training import corpus_texts, evaluate, token_stream, unigram_loss

    torch.set_num_threads(args.threads)
    path = resolve_checkpoint(args.model)
    net = load(path, device="cpu", dtype=torch.float32)
    tok = load_tokenizer(path)
    vocab = net.cfg.vocab_size
    t0 = time.perf_counter()
    held = token_stream(tok, corpus_texts("heldout"))
    metrics = evaluate(net, tok, held, args.seq, args.eval_tokens, torch.device("cpu"))
    train = token_stream(tok, corpus_texts("train"))
    n = metrics["tokens_evaluated"]
    nwin = n // args.seq
    targets = held[: nwin * (args.seq + 1)].view(nwin, args.seq + 1)[:, 1:].flatten()
    uni = unigram_loss(train, targets, vocab)
    metrics["unigram_loss"] = uni
    metrics["unigram_bits_per_byte"] = uni * targets.numel() / metrics["bytes_evaluated"] / math.log(2)
    metrics["eval_seconds"] = time.perf_counter() - t0

    prompts = heldout_prompts(tok, args.prompts, args.prompt_tokens, args.gen_tokens)
    from splitserve.engine.sampling_params import SamplingParams

    plain = _engine(net, 0, args.prompt_tokens + args.gen_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=args.gen_tokens, ignore_eos=True)
    reference = [plain.generate([p], params)[0].token_ids for p in prompts]
    ks = [1, 2, 3]
    acc = mtp_acceptance(net, prompts, args.gen_tokens, ks, reference)
    speed = decode_speed(net, prompts[: args.speed_prompts], args.gen_tokens, [0, *ks], args.repeats)
    result = {
        "model": str(args.model),
        "checkpoint": str(path),
        "config": {
            k: getattr(net.cfg, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "n_routed_experts",
                "num_experts_per_tok",
                "index_topk",
                "num_nextn_predict_layers",
            )
        },
        "parameters": sum(t.numel() for t in net.parameters()),
        "heldout": metrics,
        "mtp_engine": {
            "prompts": len(prompts),
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            **{f"k{k}": v for k, v in acc.items()},
        },
        "cpu_decode": {
            "threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
            "prompts": args.speed_prompts,
            "gen_tokens": args.gen_tokens,
            **{f"k{k}": v for k, v in speed.items()},
        },
        "command": "splitserve bench trained " + " ".join(args.argv),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    table = _table(result)
    (out / "eval.md").write_text(
        f"# {args.model}: evaluation on held-out standard-library code\n\nMade by `{result['command']}`"
        f" (CPU, {args.threads} threads). Raw numbers: eval.json.\n\n{table}\n"
    )
    print(table)
    return result


def _table(r: dict[str, Any]) -> str:
    h = r["heldout"]
    rows = [
        "| metric | value |",
        "|---|---|",
        f"| held-out tokens evaluated (windows of {h['seq']}) | {h['tokens_evaluated']} |",
        f"| held-out loss, sparse attention (as served), nats/token | {h['loss_sparse']:.4f} |",
        f"| held-out loss, dense attention, nats/token | {h['loss_dense']:.4f} |",
        f"| sparse - dense | {h['sparse_minus_dense']:+.4f} |",
        f"| bits per byte (sparse) | {h['bits_per_byte']:.4f} |",
        f"| unigram baseline: loss / bits per byte | {h['unigram_loss']:.4f} / {h['unigram_bits_per_byte']:.4f} |",
        f"| next-token top-1 accuracy | {h['top1_acc']:.3f} |",
        f"| MTP (token t+2) loss / top-1 accuracy | {h['mtp_loss']:.4f} / {h['mtp_top1_acc']:.3f} |",
    ]
    m = r["mtp_engine"]
    for k in (1, 2, 3):
        a = m[f"k{k}"]
        rows.append(
            f"| engine, greedy, k={k}: acceptance / mean accept length / outputs equal to greedy | "
            f"{a['acceptance_rate']:.3f} / {a['mean_accept_length']:.3f} / {a['outputs_equal_greedy']:.2f} |"
        )
    c = r["cpu_decode"]
    for k in (0, 1, 2, 3):
        s = c[f"k{k}"]
        rows.append(
            f"| CPU decode, batch 1, k={k}: ms/token (tokens/s), speedup | "
            f"{s['ms_per_token']:.2f} ({s['tokens_per_s']:.0f}), {s['speedup_vs_no_mtp']:.2f}x |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="splitserve bench trained", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pycoder", help="checkpoint directory or preset (default: pycoder)")
    ap.add_argument("--out", default="bench/results/trained-model")
    ap.add_argument("--seq", type=int, default=512, help="held-out window length (the training context)")
    ap.add_argument("--eval-tokens", type=int, default=1_000_000, help="held-out tokens evaluated at most")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts for MTP acceptance")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--speed-prompts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    args.argv = argv
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
