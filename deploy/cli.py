"""The `splitserve` command line.

splitserve make-checkpoint --preset tiny|small|bench --out DIR [--fp8] [--seed S]
splitserve generate [--model DIR|pycoder|tiny] --prompt TEXT [--max-tokens N] [--temperature T] [--top-p P]
                    [--seed S] [--mtp K] [--tensor-parallel-size N [--expert-parallel]] [--json]
splitserve bench kernels|engine|load|serve|transfer|trained [its options]
splitserve train --out DIR [--tokenizer DIR] [--time-budget-s S] [...]   (model/training.py)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

log = logging.getLogger("splitserve.cli")


def _cmd_make_checkpoint(args: argparse.Namespace) -> int:
    from splitserve.model.checkpoint import make_checkpoint

    t0 = time.monotonic()
    out = make_checkpoint(args.preset, args.out, fp8=args.fp8, seed=args.seed)
    print(f"wrote the {args.preset} checkpoint to {out} in {time.monotonic() - t0:.1f} s")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from splitserve.engine.config import EngineConfig
    from splitserve.engine.engine import Engine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.model import load
    from splitserve.model.config import ModelConfig
    from splitserve.model.presets import resolve_checkpoint
    from splitserve.model.tokenizer import load_tokenizer

    path = resolve_checkpoint(args.model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[
        args.dtype or ("bfloat16" if device == "cuda" else "float32")
    ]
    tp = args.tensor_parallel_size
    if tp < 1 or (args.expert_parallel and tp < 2):
        print("error: --tensor-parallel-size must be >= 1 (>= 2 with --expert-parallel)", file=sys.stderr)
        return 2
    if device == "cuda" and tp > torch.cuda.device_count():
        print(f"error: --tensor-parallel-size {tp}: {torch.cuda.device_count()} GPUs visible", file=sys.stderr)
        return 2
    tok = load_tokenizer(path)
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    bos = ModelConfig.from_json(path).bos_token_id
    if bos is not None:
        ids = [bos] + ids
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        max_tokens=args.max_tokens,
        stop=tuple(args.stop or ()),
    )
    need = -(-(len(ids) + args.max_tokens + args.mtp + 1) // 64)
    ecfg = EngineConfig(
        num_blocks=max(need, 16),
        block_size=64,
        mtp_draft_tokens=args.mtp,
        dtype=str(dtype).replace("torch.", ""),
        device=device,
    )
    followers = _start_followers(tp, str(path), ecfg, args.expert_parallel)
    try:
        init = followers[0] if followers else ""
        ps = _join_rank(0, tp, init, device, args.expert_parallel)
        eng = Engine(load(path, device=device, dtype=dtype, parallel=ps), ecfg)
        try:
            return _generate(args, eng, tok, ids, params)
        finally:
            eng.stop_followers()
            ps.destroy()
    finally:
        for p in followers[1:]:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)


def _join_rank(rank: int, world: int, init: str, device: str, ep: bool):  # -> ParallelState
    import os

    import torch

    from splitserve.model.parallel import ParallelState

    if world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the ranks share the host's cores
        if device == "cuda":
            torch.cuda.set_device(rank)
    return ParallelState.init(rank, world, init, device, expert_parallel=ep)


def _start_followers(world: int, path: str, ecfg, ep: bool) -> list:
    """Ranks 1.. of `generate --tensor-parallel-size N` as spawned processes: [init method, processes...]."""
    if world == 1:
        return []
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(target=_follow_rank, args=(r, world, init, path, ecfg, ep), daemon=True) for r in range(1, world)
    ]
    for p in procs:
        p.start()
    return [init, *procs]


def _follow_rank(rank: int, world: int, init: str, path: str, ecfg, ep: bool) -> None:
    from splitserve.engine.engine import Engine
    from splitserve.model import load

    ps = _join_rank(rank, world, init, ecfg.device, ep)
    Engine(load(path, device=ecfg.device, dtype=ecfg.torch_dtype, parallel=ps), ecfg).follow()
    ps.destroy()


def _generate(args: argparse.Namespace, eng, tok, ids: list[int], params) -> int:
    from splitserve.engine.engine import RequestError
    from splitserve.model.tokenizer import TextDecoder, apply_stop_strings

    try:
        req = eng.add_request("cli-0", ids, params)
    except RequestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    decoder = TextDecoder(tok)
    text, t0, t_first = "", time.perf_counter(), None
    stopped = False
    while not req.is_finished:
        for out in eng.step():
            if out.new_token_ids and t_first is None:
                t_first = time.perf_counter()
            delta = decoder.add(out.new_token_ids)
            if out.finished:
                delta += decoder.finish()
            if params.stop:
                full, hit = apply_stop_strings(
                    text + delta, params.stop, max(0, len(text) - max(map(len, params.stop)))
                )
                delta = full[len(text) :]
                if hit:
                    eng.abort(req.request_id)
                    req.finish_reason, stopped = "stop", True
            text += delta
            if not args.json:
                print(delta, end="", flush=True)
        if stopped:
            break
    t_end = time.perf_counter()
    t_first = t_first or t_end
    n_out = len(req.output_ids)
    if args.json:
        print(
            json.dumps(
                {
                    "text": text,
                    "token_ids": req.output_ids,
                    "finish_reason": req.finish_reason,
                    "prompt_tokens": len(ids),
                    "completion_tokens": n_out,
                    "draft_tokens": req.draft_tokens,
                    "accepted_draft_tokens": req.accepted_draft_tokens,
                    "timings": {
                        "prefill_seconds": t_first - t0,
                        "decode_seconds": t_end - t_first,
                        "tokens_per_second": (n_out - 1) / (t_end - t_first) if n_out > 1 and t_end > t_first else None,
                    },
                }
            )
        )
    else:
        print()
    return 0


BENCHMARKS = {
    "kernels": "splitserve.bench.kernels",
    "engine": "splitserve.bench.engine",
    "load": "splitserve.bench.load",
    "serve": "splitserve.bench.serve",
    "transfer": "splitserve.kvtransfer.bench",
    "trained": "splitserve.bench.trained_model",
}


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib

    return int(importlib.import_module(BENCHMARKS[args.name]).main(args.args) or 0)


def _cmd_train(args: argparse.Namespace) -> int:
    from splitserve.model import training

    return training.main(args.train_args, prog="splitserve train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="splitserve", description="Disaggregated prefill/decode serving for DeepSeek-V3.2 models"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the DeepSeek-V3.2 HF format")
    mk.add_argument("--preset", choices=["tiny", "small", "bench"], required=True)
    mk.add_argument("--out", required=True, help="output directory")
    mk.add_argument("--fp8", action="store_true", help="FP8 e4m3 linear weights with 128x128 weight_scale_inv blocks")
    mk.add_argument("--seed", type=int, default=0)
    mk.set_defaults(func=_cmd_make_checkpoint)

    g = sub.add_parser("generate", help="offline generation with the engine (no cluster)")
    g.add_argument(
        "--model",
        default="pycoder",
        help="checkpoint directory or preset name (default: pycoder, the trained model shipped in the package; "
        "tiny: random weights, made on first use)",
    )
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--mtp", type=int, default=0, help="MTP draft tokens per step (0 = off)")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    g.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="ranks the model is split over (processes; one GPU each on cuda); rank 0 runs the engine",
    )
    g.add_argument("--expert-parallel", action="store_true", help="split the routed experts across the ranks")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=_cmd_generate)

    b = sub.add_parser(
        "bench",
        help="run a benchmark: kernels | engine | load | serve | transfer | trained (each prints a table and writes JSON)",
        add_help=False,
    )
    b.add_argument("name", choices=sorted(BENCHMARKS))
    b.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (NAME --help lists them)")
    b.set_defaults(func=_cmd_bench)

    t = sub.add_parser(
        "train",
        help="train the pycoder model on the Python standard library (model/training.py; --help lists its options)",
        add_help=False,
    )
    t.set_defaults(func=_cmd_train)

    from . import cluster_cli  # noqa: F401  (adds up/status/scale/down when present)

    cluster_cli.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # the trainer parses its own options (torch is imported only then)
        args.train_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
