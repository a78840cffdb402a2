"""Measure block transfers between two processes: contiguous vs scattered blocks, per backend.

    python -m splitserve.kvtransfer.bench                       # CPU, both backends, small table
    python -m splitserve.kvtransfer.bench --device cuda --blocks 256 --json out.json
    splitserve bench transfer --preset bench --tokens 1024 4096 16384 32768 --device cuda --json out.json

With --tokens, each size is one request's cache in a preset's pool layout (engine/cache.py: block-major
latent, indexer keys, and their scales, block_size 64, MTP layer included, FP8 indexer keys): its blocks
are written as the engine's allocator hands them out (consecutive: one region per pool) and, as the
worst case, every other block; beside them the same number of bytes as ONE region (one pool of one
block) is the ceiling, measured in the same run. `of_region` = region time / request time.

A "decode" process owns the destination pools, a "prefill" process pushes into them; both are
spawned. Each case writes the same number of blocks (so the same bytes): ``contiguous`` (both
sides consecutive: one descriptor per pool), ``scattered`` (every other block on both sides: one
descriptor per block per pool), and ``scattered -> staged`` (every other block on the sender, a run
on the receiver as the decode worker's allocator reserves it: the transport gathers the blocks into
its staging area with one kernel per pool and posts one descriptor per pool, as a prefill worker does;
the time includes the gather). For NIXL, the same two selections are also posted through the
pre-built per-block descriptor lists (``prep_xfer_dlist`` + ``make_prepped_xfer``) for comparison
with our coalesced ``initialize_xfer`` path. Correctness is checked (the destination blocks hold
the source blocks' pattern) before anything is timed. Times are initiator-side: from
``write_blocks`` to DONE, median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from . import Compat, TransferState, Transport, make_transport, nixl_available
from .staging import copy_blocks

COMPAT = Compat({"bench": "kvtransfer"})


@dataclass
class Row:
    backend: str
    device: str
    case: str
    tokens: int
    blocks: int
    descriptors: int
    mbytes: float
    median_ms: float
    #: of which inside write_blocks (the staged gather and its wait, building and posting the request)
    post_ms: float
    gbps: float


def _pools(num_blocks: int, block_bytes: tuple[int, ...], device: str, fill: bool) -> list[torch.Tensor]:
    pools = []
    for p, nbytes in enumerate(block_bytes):
        t = torch.zeros(num_blocks, nbytes, dtype=torch.uint8, device=device)
        if fill:  # block b of pool p holds the byte (7 b + p) mod 256
            t += ((torch.arange(num_blocks, device=device) * 7 + p) % 256).to(torch.uint8)[:, None]
        pools.append(t)
    return pools


def _child(
    conn: Connection, role: str, backend: str, device: str, num_blocks: int, block_bytes: tuple[int, ...]
) -> None:
    logging.basicConfig(level=logging.WARNING)
    if device == "cpu":  # as a worker runs (one thread): OpenMP wake-ups on a busy host cost ms per copy
        torch.set_num_threads(1)
    t = make_transport(backend, role, COMPAT)  # type: ignore[arg-type]
    staging = num_blocks // 2 if role == "pre" and num_blocks > 2 else 0  # the sender's staging area
    pools = _pools(num_blocks + staging, block_bytes, device, fill=(role == "pre"))
    t.register_pools(pools)
    if staging:
        t.enable_staging(num_blocks, staging)
    conn.send(t.metadata())
    try:
        while conn.poll(300):
            cmd, args = conn.recv()
            if cmd == "stop":
                conn.send(None)
                return
            if cmd == "verify":  # decode side: do the given remote blocks hold the local pattern?
                local, remote = args
                ok = all(
                    bool((p[r] == (lid * 7 + i) % 256).all())
                    for i, p in enumerate(pools)
                    for lid, r in zip(local, remote, strict=True)
                )
                conn.send(ok)
            elif cmd == "drain":
                t.get_notifs()
                conn.send(None)
            elif cmd == "bench":
                conn.send(_run_cases(t, *args))
            elif cmd == "add_peer":
                conn.send(t.add_peer(args[0]))
    finally:
        t.close()


def _time(fn: Any, repeats: int) -> float:
    fn()  # warm-up (connection set-up, registration caches)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _run_cases(t: Transport, blocks: int, repeats: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cases = {"contiguous": (list(range(blocks)), list(range(blocks)))}
    staged = None
    if blocks > 1:
        cases["scattered"] = (list(range(0, 2 * blocks, 2)), list(range(0, 2 * blocks, 2)))
        if getattr(t, "staging", None) is not None:
            staged = (list(range(0, 2 * blocks, 2)), list(range(blocks)))

    def measure(case: str, local: list[int], remote: list[int]) -> dict[str, Any]:
        posts: list[float] = []

        def once() -> None:
            t0 = time.perf_counter()
            h = t.write_blocks("dec", local, remote, notif=b"bench")
            posts.append(time.perf_counter() - t0)
            state = t.wait(h, 60.0, interval_s=0.0)
            if state is not TransferState.DONE:
                raise RuntimeError(f"{case}: {state} {t.error(h)}")
            t.release(h)

        h = t.write_blocks("dec", local, remote)
        ndesc, nbytes = h.num_descriptors, h.nbytes
        t.wait(h, 60.0)
        t.release(h)
        s = _time(once, repeats)
        return {"case": case, "descriptors": ndesc, "nbytes": nbytes, "s": s, "post_s": statistics.median(posts[1:])}

    for case, (local, remote) in cases.items():
        out.append(measure(case, local, remote))
    if t.backend == "nixl" and blocks > 1:
        out += _nixl_prepped(t, cases, repeats)
    if staged is not None:  # last: its destination blocks are the ones verified afterwards
        out.append(_gather_only(t, staged[0], repeats))
        out.append(measure("scattered -> staged", *staged))
    return out


def _gather_only(t: Any, local: list[int], repeats: int) -> dict[str, Any]:
    """The staged case's gather alone (scattered blocks copied into the staging area, waited for): the
    part of "scattered -> staged" that is not the transfer."""
    st = t.staging
    first = st.take(len(local))
    if first is None:
        raise RuntimeError("the staging area has no room for the bench's blocks")
    try:
        staged = list(range(first, first + len(local)))

        def once() -> None:
            copy_blocks(t._pools, local, staged)
            if t._pools[0].device.type == "cuda":
                torch.cuda.synchronize()

        s = _time(once, repeats)
    finally:
        st.give_back(first, len(local))
    return {
        "case": "gather into staging only",
        "descriptors": 0,
        "nbytes": len(local) * sum(i.block_bytes for i in t.pool_infos),
        "s": s,
    }


def _nixl_prepped(t: Any, cases: dict[str, tuple[list[int], list[int]]], repeats: int) -> list[dict[str, Any]]:
    """The alternative NIXL path: per-block prepped descriptor lists, blocks selected by index."""
    agent = t.agent
    peer_md = t._peers["dec"]  # bench-only peek at the peer's pool descriptors
    lists = []
    for lp, rp in zip(t.pool_infos, peer_md.pools, strict=True):  # the sender's pools also hold its staging
        ld = [(lp.base_addr + b * lp.block_bytes, lp.block_bytes, lp.dev_id) for b in range(lp.num_blocks)]
        rd = [(rp.base_addr + b * rp.block_bytes, rp.block_bytes, rp.dev_id) for b in range(rp.num_blocks)]
        lh = agent.prep_xfer_dlist("NIXL_INIT_AGENT", ld, lp.mem_type)
        lists.append((lh, agent.prep_xfer_dlist("dec", rd, rp.mem_type)))
    out = []
    for case, (local, remote) in cases.items():

        def once(local: list[int] = local, remote: list[int] = remote) -> None:
            # the notification rides on the last request, as ours rides on our one request
            hs = [
                agent.make_prepped_xfer("WRITE", lh, local, rh, remote, b"bench" if i == len(lists) - 1 else b"")
                for i, (lh, rh) in enumerate(lists)
            ]
            for h in hs:
                agent.transfer(h)
            deadline = time.monotonic() + 60
            for h in hs:
                while (s := agent.check_xfer_state(h)) == "PROC":
                    if time.monotonic() > deadline:
                        raise RuntimeError("prepped transfer timed out")
                if s != "DONE":
                    raise RuntimeError(f"prepped transfer {s}")
                h.release()

        out.append(
            {
                "case": f"{case} (nixl prepped per-block)",
                "descriptors": len(local) * len(lists),
                "nbytes": len(local) * sum(i.block_bytes for i in t.pool_infos),
                "s": _time(once, repeats),
            }
        )
    for lh, rh in lists:
        lh.release()
        rh.release()
    return out


def run(
    backend: str, device: str, blocks: int, block_bytes: tuple[int, ...], repeats: int, tokens: int = 0
) -> list[Row]:
    ctx = mp.get_context("spawn")
    num_blocks = 2 * blocks
    procs, conns = [], {}
    try:
        for role in ("dec", "pre"):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_child, args=(child, role, backend, device, num_blocks, block_bytes), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns[role] = parent

        def call(role: str, cmd: str, *args: Any, timeout: float = 300) -> Any:
            if cmd:
                conns[role].send((cmd, args))
            if not conns[role].poll(timeout):
                raise TimeoutError(f"{role}: {cmd or 'start'} timed out")
            return conns[role].recv()

        md = {role: call(role, "") for role in ("dec", "pre")}
        call("pre", "add_peer", md["dec"])
        results = call("pre", "bench", blocks, repeats)
        # correctness of what was written last: pattern of local block -> remote block
        sc = list(range(0, 2 * blocks, 2)) if blocks > 1 else [0]
        staged = any(r["case"] == "scattered -> staged" for r in results)
        if not call("dec", "verify", sc, list(range(blocks)) if staged else sc):
            raise RuntimeError(f"{backend}/{device}: destination blocks do not hold the sent data")
        call("dec", "drain")
        for role in ("pre", "dec"):
            call(role, "stop", timeout=30)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    return [
        Row(
            backend=backend,
            device=device,
            case=r["case"],
            tokens=tokens,
            blocks=blocks,
            descriptors=r["descriptors"],
            mbytes=r["nbytes"] / 1e6,
            median_ms=1e3 * r["s"],
            post_ms=1e3 * r.get("post_s", r["s"]),
            gbps=r["nbytes"] / r["s"] / 1e9,
        )
        for r in results
    ]


def preset_block_bytes(preset: str, block_size: int = 64) -> tuple[int, ...]:
    """Bytes per block of each pool of the engine's cache for a model preset (FP8 indexer keys, bf16
    latent, MTP layer included), without building the model."""
    from splitserve.engine.cache import pool_specs
    from splitserve.model.checkpoint import PRESETS

    cfg = PRESETS[preset]
    specs = pool_specs(cfg, cfg.num_hidden_layers + 1, block_size, torch.bfloat16, indexer_fp8=True)
    return tuple(int(torch.Size(shape).numel()) * dt.itemsize for shape, dt in specs)


def _print(rows: list[Row]) -> None:
    region = {(r.backend, r.device, r.tokens): r.median_ms for r in rows if r.case == "one region"}
    base = {(r.backend, r.device, r.tokens): r.median_ms for r in rows if r.case == "contiguous"}
    print(
        f"{'backend':8} {'device':6} {'tokens':>6} {'case':40} {'blocks':>6} {'descs':>6} {'MB':>8} {'ms':>9} {'post ms':>8} "
        f"{'GB/s':>7} {'x contig':>8} {'of region':>9}"
    )
    for r in rows:
        key = (r.backend, r.device, r.tokens)
        ratio = r.median_ms / base[key] if key in base else float("nan")
        of_region = region[key] / r.median_ms if key in region else float("nan")
        print(
            f"{r.backend:8} {r.device:6} {r.tokens:6d} {r.case:40} {r.blocks:6d} {r.descriptors:6d} {r.mbytes:8.2f} "
            f"{r.median_ms:9.3f} {r.post_ms:8.3f} {r.gbps:7.2f} {ratio:8.2f} {of_region:9.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", nargs="+", default=["tcp", "nixl"], choices=["tcp", "nixl"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--blocks", type=int, default=64, help="blocks per transfer (without --tokens)")
    ap.add_argument(
        "--block-kb", type=int, nargs="+", default=[256, 64], help="block size of each pool, KiB (without --tokens)"
    )
    ap.add_argument("--preset", default="bench", help="model preset whose cache layout --tokens uses")
    ap.add_argument(
        "--tokens", type=int, nargs="+", default=[], help="request sizes in tokens (e.g. 1024 4096 16384 32768)"
    )
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    rows: list[Row] = []
    for backend in args.backend:
        if backend == "nixl" and not nixl_available():
            print("nixl is not installed: skipping the nixl backend", file=sys.stderr)
            continue
        if not args.tokens:
            rows += run(backend, args.device, args.blocks, tuple(kb * 1024 for kb in args.block_kb), args.repeats)
            continue
        per_block = preset_block_bytes(args.preset)
        for tokens in args.tokens:
            blocks = -(-tokens // 64)
            req = run(backend, args.device, blocks, per_block, args.repeats, tokens)
            one = run(backend, args.device, 1, (blocks * sum(per_block),), args.repeats, tokens)
            for r in one:
                r.case = "one region"
            rows += req + one
    _print(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "command": "splitserve bench transfer " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "rows": [asdict(r) for r in rows],
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
