"""Cluster subcommands of the `splitserve` CLI:

    splitserve up [CONFIG] [--detach] [--host H] [--port P] [--prefill N] [--decode M] [--start-timeout S]
    splitserve status [--json] [--url URL]
    splitserve scale [--prefill N] [--decode M] [--url URL]
    splitserve down [--url URL]
    splitserve plan CONFIG [--json]

`plan` prints each pool's per-GPU memory (deploy/plan.py) from the checkpoint's config.json alone; `up` refuses,
on cuda, a layout that plan says does not fit, with the same table.

`up` runs in the foreground by default: it starts the workers (Ray actors, see `Controller`), serves
the router (OpenAI API + /admin) with uvicorn and prints the URL; Ctrl-C or SIGTERM stops the router,
then every worker, then the local Ray cluster. `--detach` starts that same foreground process in the
background (its own session, output to a log file), waits until /health answers, prints the URL and
the log path, and exits.

A running `up` process keeps a state file in ~/.cache/splitserve/run/ (router URL, its pid, the config
path, where its operator token is — never a key or token itself), which is how `status`, `scale` and `down` find the cluster without --url, and beside it the run's operator token
(`cluster-<port>.token`, mode 0600: only the user who ran `up` can read it). They call the /admin
endpoints with that token (the clients' API key does not open them);
`down` falls back to SIGTERM on the recorded pid when the router does not answer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Where `up` keeps its state files and (with --detach) its logs.
DEFAULT_RUN_DIR = Path.home() / ".cache" / "splitserve" / "run"
_STATE_PREFIX = "cluster-"
_HTTP_TIMEOUT_S = 30.0


class CliError(Exception):
    """A user-facing failure: printed as `error: ...`, exit status 1."""


# ----------------------------------------------------------------------------------------------
# Argument parsing
# ----------------------------------------------------------------------------------------------


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add up / status / scale / down to the `splitserve` CLI's subparsers."""
    from splitserve.deploy.config import DEFAULT_CONFIG_PATH

    def run_dir_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--run-dir",
            type=Path,
            default=DEFAULT_RUN_DIR,
            help=f"where running clusters keep their state files and logs (default: {DEFAULT_RUN_DIR})",
        )

    def client_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="the cluster's router URL (default: the running cluster's state file)")
        p.add_argument(
            "--operator-token-file",
            type=Path,
            metavar="PATH",
            help="file holding the cluster's operator token (default: the one `up` wrote into the run directory)",
        )
        run_dir_arg(p)

    up = sub.add_parser("up", help="start a cluster: workers on Ray + the OpenAI-compatible router")
    up.add_argument(
        "config",
        nargs="?",
        default=str(DEFAULT_CONFIG_PATH),
        help="cluster YAML (default: the embedded deploy/local.yaml)",
    )
    up.add_argument("--detach", action="store_true", help="run in the background; print the URL and log path")
    up.add_argument("--host", help="router listen address (overrides router.host)")
    up.add_argument("--port", type=int, help="router listen port, 0 picks a free one (overrides router.port)")
    up.add_argument("--prefill", type=int, metavar="N", help="prefill workers (overrides prefill.replicas)")
    up.add_argument("--decode", type=int, metavar="M", help="decode workers (overrides decode.replicas)")
    up.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="longest wait, in seconds, for a worker to load the model and serve (default 600)",
    )
    run_dir_arg(up)
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="show the running cluster's router and workers")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    client_args(st)
    st.set_defaults(func=cmd_status)

    sc = sub.add_parser("scale", help="resize the prefill and/or decode pool of the running cluster")
    sc.add_argument("--prefill", type=int, metavar="N", help="prefill workers wanted")
    sc.add_argument("--decode", type=int, metavar="M", help="decode workers wanted")
    sc.add_argument(
        "--timeout", type=float, default=900.0, metavar="S", help="longest wait for the scaling to finish (default 900)"
    )
    sc.add_argument("--json", action="store_true", help="print the resulting status as JSON")
    client_args(sc)
    sc.set_defaults(func=cmd_scale)

    pl = sub.add_parser(
        "plan",
        help="per-GPU memory of each pool (weights, cache, activations) and whether it fits; from config.json only",
    )
    pl.add_argument("config", help="cluster YAML (model.path: a checkpoint directory; only its config.json is read)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.set_defaults(func=cmd_plan)

    dn = sub.add_parser("down", help="stop the running cluster (router, workers, local Ray)")
    dn.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        metavar="S",
        help="longest wait for the cluster to stop before it is killed (default 120)",
    )
    client_args(dn)
    dn.set_defaults(func=cmd_down)


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    run.__name__ = func.__name__
    run.__doc__ = func.__doc__
    return run


# ----------------------------------------------------------------------------------------------
# State files
# ----------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def state_path(run_dir: Path, port: int) -> Path:
    return run_dir / f"{_STATE_PREFIX}{port}.json"


def write_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def live_states(run_dir: Path) -> list[dict[str, Any]]:
    """State files of running `up` processes (stale ones, whose pid is gone, are deleted)."""
    out: list[dict[str, Any]] = []
    if not run_dir.is_dir():
        return out
    for path in sorted(run_dir.glob(f"{_STATE_PREFIX}*.json")):
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            pid = int(state["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not _pid_alive(pid):
            with contextlib.suppress(OSError):
                path.unlink()
            with contextlib.suppress(OSError):
                path.with_suffix(".token").unlink()
            continue
        state["_path"] = str(path)
        out.append(state)
    return out


def _find_cluster(args: argparse.Namespace) -> tuple[str, dict[str, Any] | None]:
    """(router URL, its state or None) of the cluster a client command talks to."""
    states = live_states(args.run_dir)
    if args.url:
        url = args.url.rstrip("/")
        return url, next((s for s in states if s.get("url", "").rstrip("/") == url), None)
    if not states:
        raise CliError(
            f"no running cluster found (no live state file in {args.run_dir}); start one with "
            "`splitserve up CONFIG`, or give the router's --url"
        )
    if len(states) > 1:
        listing = "\n".join(f"  {s['url']}  (pid {s['pid']}, config {s.get('config')})" for s in states)
        raise CliError(f"several clusters are running; choose one with --url:\n{listing}")
    return str(states[0]["url"]).rstrip("/"), states[0]


def token_path(run_dir: Path, port: int) -> Path:
    return run_dir / f"{_STATE_PREFIX}{port}.token"


def write_token(path: Path, token: str) -> None:
    """Write the operator token readable and writable by its owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")


def read_operator_token(
    url: str, token_file: str | os.PathLike[str] | None = None, run_dir: Path = DEFAULT_RUN_DIR
) -> str:
    """The operator token of the cluster at `url`: from `token_file`, else from the file its `up` recorded."""
    if token_file is None:
        state = next((s for s in live_states(run_dir) if s.get("url", "").rstrip("/") == url.rstrip("/")), None)
        token_file = (state or {}).get("operator_token_file")
        if not token_file:
            raise CliError(
                f"no operator token for {url}: no running `splitserve up` in {run_dir} serves it; give the token's file"
            )
    try:
        return Path(token_file).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise CliError(
            f"cannot read the operator token {token_file}: {e.strerror or e} (it is readable only by "
            "the user who ran `splitserve up`)"
        ) from None


def _headers(args: argparse.Namespace, state: dict[str, Any] | None) -> dict[str, str]:
    """The operator's credential for /admin: the token `up` wrote into the run directory."""
    path = args.operator_token_file or ((state or {}).get("operator_token_file"))
    if not path:
        raise CliError(
            "the admin endpoints need the cluster's operator token: give --operator-token-file "
            "(`splitserve up` writes it into its run directory)"
        )
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise CliError(
            f"cannot read the operator token {path}: {e.strerror or e} (it is readable only by the "
            "user who ran `splitserve up`)"
        ) from None
    return {"Authorization": f"Bearer {token}"}


def _admin(
    args: argparse.Namespace, method: str, path: str, *, json_body: Any = None, timeout_s: float = _HTTP_TIMEOUT_S
) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """Call an /admin endpoint: (JSON answer, the cluster's state or None, its URL)."""
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)

    url, state = _find_cluster(args)
    headers = _headers(args, state)
    try:
        r = httpx.request(method, f"{url}{path}", json=json_body, headers=headers, timeout=timeout_s)
    except httpx.ConnectError as e:
        if state is not None and _pid_alive(int(state["pid"])):
            raise CliError(
                f"the cluster at {url} (pid {state['pid']}) does not answer yet: it may still be "
                f"starting its workers ({e})"
            ) from None
        raise CliError(f"no cluster answers at {url}: {e}") from None
    except httpx.HTTPError as e:
        raise CliError(f"{method} {url}{path} failed: {type(e).__name__}: {e}") from None
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:500]}}
    if r.status_code == 401:
        raise CliError(
            f"{url} refused the operator token (401): is {args.operator_token_file or 'the state file'} "
            "from this cluster's run?"
        )
    if r.status_code >= 400:
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
        raise CliError(f"{method} {path}: HTTP {r.status_code}: {msg or body}")
    return body, state, url


# ----------------------------------------------------------------------------------------------
# status / scale / down
# ----------------------------------------------------------------------------------------------


def format_gpus(ids: list, share: float | None) -> str:
    """A worker's GPUs: the ids Ray gave it, and its share when it holds a fraction of one
    (`0.5 (gpu 0)`: two workers share GPU 0), so a half GPU never reads as "GPUS 0"."""
    ids_s = ",".join(str(g) for g in ids)
    if share is None or share >= 1 or share <= 0:
        return ids_s or ("-" if not share else f"{share:g}")
    return f"{share:g}" + (f"(gpu{ids_s})" if ids_s else "")


def format_status(status: dict[str, Any]) -> str:
    """The status as a readable table."""
    rows = [("ID", "ROLE", "STATE", "TP", "PID", "NODE", "GPUS", "WEIGHTS", "BLOCKS USED", "REQUESTS DONE")]
    for w in status.get("workers", []):
        gpus = format_gpus(w.get("gpus") or [], w.get("gpu_share"))
        wb = int(w.get("weight_bytes") or 0)
        tp = f"{w.get('tensor_parallel_size', 1)}" + ("+ep" if w.get("expert_parallel") else "")
        pids = ",".join(str(r.get("pid") or "-") for r in w.get("ranks") or []) or str(w.get("pid") or "-")
        rows.append(
            (
                str(w["id"]),
                str(w["role"]),
                str(w["state"]),
                tp,
                pids,  # every rank's, rank 0 (it serves) first
                str(w.get("node") or "-"),
                gpus,
                f"{wb / 2**30:.2f} GiB" if wb else "-",
                f"{w.get('blocks_used', 0)}/{w.get('blocks_total', 0)}",
                str(w.get("requests_done", 0)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"router: {status.get('router', {}).get('url') or '-'}"]
    counts: dict[str, int] = {}
    for w in status.get("workers", []):
        if w["state"] == "serving":
            counts[w["role"]] = counts.get(w["role"], 0) + 1
    lines.append(f"serving: {counts.get('prefill', 0)} prefill, {counts.get('decode', 0)} decode")
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)


@_guard
def cmd_status(args: argparse.Namespace) -> int:
    body, _, _ = _admin(args, "GET", "/admin/status")
    print(json.dumps(body, indent=2) if args.json else format_status(body))
    return 0


@_guard
def cmd_scale(args: argparse.Namespace) -> int:
    if args.prefill is None and args.decode is None:
        raise CliError("give --prefill N and/or --decode M")
    for name in ("prefill", "decode"):
        n = getattr(args, name)
        if n is not None and n < 1:
            raise CliError(f"--{name} must be >= 1, got {n}")
    payload = {k: v for k, v in (("prefill", args.prefill), ("decode", args.decode)) if v is not None}
    print(
        f"scaling to {', '.join(f'{k} {v}' for k, v in payload.items())} (draining removed workers first)...",
        file=sys.stderr,
    )
    body, _, _ = _admin(args, "POST", "/admin/scale", json_body=payload, timeout_s=args.timeout)
    print(json.dumps(body, indent=2) if args.json else format_status(body))
    return 0


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.2)
    return not _pid_alive(pid)


@_guard
def cmd_down(args: argparse.Namespace) -> int:
    import httpx

    url, state = _find_cluster(args)
    pid = int(state["pid"]) if state is not None else None
    asked = False
    try:
        _admin(args, "POST", "/admin/shutdown")
        asked = True
        print(f"asked the cluster at {url} to shut down", file=sys.stderr)
    except CliError as e:
        if pid is None:
            raise
        print(f"the router did not take the shutdown request ({e}); sending SIGTERM to pid {pid}", file=sys.stderr)
    if pid is None:  # only a URL: wait until the router stops answering
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/health", timeout=2.0)
            except httpx.HTTPError:
                print(f"the cluster at {url} is down")
                return 0
            time.sleep(0.5)
        raise CliError(f"the cluster at {url} still answers after {args.timeout:.0f} s")
    if not asked:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if not _wait_exit(pid, args.timeout):
        print(f"pid {pid} did not stop within {args.timeout:.0f} s; killing it (SIGKILL)", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_exit(pid, 10.0)
    if state is not None:
        with contextlib.suppress(OSError):
            Path(state["_path"]).unlink()
    print(f"the cluster at {url} is down")
    return 0


# ----------------------------------------------------------------------------------------------
# plan, up
# ----------------------------------------------------------------------------------------------


@_guard
def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory plan (deploy/plan.py). Exit status 1 when a pool does not fit its GPUs."""
    from splitserve.deploy.config import load_config
    from splitserve.deploy.plan import PlanError, format_plan, plan_cluster

    cfg = load_config(args.config)
    try:
        plan = plan_cluster(cfg)
    except PlanError as e:
        raise CliError(str(e)) from None
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


@_guard
def cmd_up(args: argparse.Namespace) -> int:
    if args.detach:
        return _up_detached(args)
    return _up_foreground(args)


def _load(args: argparse.Namespace) -> Any:
    from splitserve.deploy.config import load_config, with_overrides
    from splitserve.deploy.plan import PlanError, check_fits

    cfg = load_config(args.config)
    if any(v is not None for v in (args.host, args.port, args.prefill, args.decode)):
        cfg = with_overrides(cfg, host=args.host, port=args.port, prefill=args.prefill, decode=args.decode)
    try:
        check_fits(cfg)  # cuda: a layout that does not fit the GPUs is refused before any worker starts
    except PlanError as e:
        raise CliError(str(e)) from None
    return cfg


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without, small SSE writes wait ~40 ms on delayed ACKs
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CliError(
            f"cannot listen on {host}:{port}: {e.strerror or e} (another cluster or server there? "
            "choose another --port)"
        ) from None
    return sock


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


class _Signals:
    """SIGINT/SIGTERM: abort while starting; once serving, uvicorn owns them; while stopping, ignored."""

    def __init__(self) -> None:
        self.aborting = True
        self.received: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = signum
        if self.aborting:
            raise KeyboardInterrupt
        logger.info("%s received: already shutting down", signal.Signals(signum).name)


def _up_foreground(args: argparse.Namespace) -> int:
    import uvicorn

    from splitserve.deploy.controller import ControllerError
    from splitserve.deploy.launcher import Cluster

    cfg = _load(args)
    cluster = Cluster(cfg, start_timeout_s=args.start_timeout)  # resolves the API key: fails early
    # Bind first: a busy port fails before any worker loads a model.
    sock = _bind(cfg.router.host, cfg.router.port)
    port = sock.getsockname()[1]
    url = _url(cfg.router.host, port)
    cluster.router_url = url
    state_file = state_path(args.run_dir, port)
    token_file = token_path(args.run_dir, port)
    signals = _Signals()
    signals.install()
    started = False
    try:
        write_token(token_file, cluster.operator_token)
        write_state(
            state_file,
            {
                "url": url,
                "pid": os.getpid(),
                "config": str(Path(args.config).resolve()),
                "operator_token_file": str(token_file),
                "namespace": cfg.ray.namespace,
                "started": time.time(),
            },
        )
        first_use = "; the tiny checkpoint is made on first use" if cfg.model.is_tiny else ""
        pools = (
            f"{cfg.decode.replicas} co-located workers (decode workers that prefill)"
            if cfg.router.mode == "colocated"
            else f"{cfg.prefill.replicas} prefill + {cfg.decode.replicas} decode workers"
        )
        print(
            f"starting {pools} (model {cfg.model.served_name!r} on {cfg.model.device}{first_use})...",
            file=sys.stderr,
            flush=True,
        )
        try:
            cluster.start()
        except FileNotFoundError as e:
            raise CliError(f"model.path: {e}") from None
        except ControllerError as e:
            raise CliError(str(e)) from None
        started = True
        assert cluster.app is not None
        server = uvicorn.Server(
            uvicorn.Config(
                cluster.app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=5
            )
        )

        def request_shutdown() -> None:
            server.should_exit = True

        cluster.on_shutdown_request = request_shutdown
        signals.aborting = False
        signals.install()  # replaces the handler ray.init installed; uvicorn takes them over while serving
        print(
            f"splitserve is serving {cfg.model.served_name!r} at {url}  (OpenAI API: {url}/v1; "
            "`splitserve status`, `splitserve down`; Ctrl-C stops)",
            flush=True,
        )
        server.run(sockets=[sock])
        return 0
    except KeyboardInterrupt:
        print("interrupted: stopping the cluster", file=sys.stderr, flush=True)
        return 130
    finally:
        signals.aborting = False
        if started:
            print("stopping the workers...", file=sys.stderr, flush=True)
        cluster.shutdown()  # also after a failed or interrupted start: leaves no worker and no Ray
        sock.close()
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state_file.read_text(encoding="utf-8")).get("pid") == os.getpid():
                state_file.unlink()
        with contextlib.suppress(OSError):
            if token_file.read_text(encoding="utf-8").strip() == cluster.operator_token:
                token_file.unlink()
        print("cluster stopped", file=sys.stderr, flush=True)


def _tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _up_detached(args: argparse.Namespace) -> int:
    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)

    _load(args)  # a bad config fails here, in the foreground
    args.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.run_dir / f"up-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    cmd = [
        sys.executable,
        "-m",
        "splitserve.deploy.cli",
        "up",
        str(Path(args.config).resolve()),
        "--run-dir",
        str(args.run_dir),
        "--start-timeout",
        str(args.start_timeout),
    ]
    for flag in ("host", "port", "prefill", "decode"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, close_fds=True
        )
    print(f"starting the cluster in the background (pid {proc.pid}); log: {log_path}", flush=True)
    t0 = time.monotonic()
    deadline = t0 + args.start_timeout + 120.0
    next_progress = t0 + 5.0
    url: str | None = None
    while True:
        code = proc.poll()
        if code is not None:
            raise CliError(
                f"the cluster exited while starting (exit status {code}); last lines of {log_path}:\n{_tail(log_path)}"
            )
        if url is None:
            url = next((s["url"] for s in live_states(args.run_dir) if int(s["pid"]) == proc.pid), None)
        if url is not None:
            try:
                if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        now = time.monotonic()
        if now >= deadline:
            print(
                f"the cluster did not become healthy within {now - t0:.0f} s; stopping it (pid {proc.pid})",
                file=sys.stderr,
            )
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            raise CliError(f"startup timed out; last lines of {log_path}:\n{_tail(log_path)}")
        if now >= next_progress:
            last = _tail(log_path, 1).strip()
            print(f"  still starting ({now - t0:.0f} s)... {last[-160:]}", file=sys.stderr, flush=True)
            next_progress = now + 5.0
        time.sleep(0.5)
    print(f"splitserve is serving at {url}  (pid {proc.pid}; log: {log_path}; stop with `splitserve down`)")
    return 0
