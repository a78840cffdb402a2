"""The router process tokenizes without the model stack: importing the router (and the launcher that
builds it) and building its app for a checkpoint never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
from splitserve.deploy.config import DEFAULT_CONFIG_PATH, load_config, parse_config
from splitserve.deploy.launcher import build_router_app, resolve_model
from splitserve.router.membership import Directory
import splitserve.router.app, splitserve.router.cluster_backend, splitserve.deploy.cli

data = load_config(DEFAULT_CONFIG_PATH).model_dump()
data["model"]["path"] = sys.argv[1]
cfg = parse_config(data)
model = resolve_model(cfg)
app, _ = build_router_app(cfg, Directory(), model)
ids = model.tokenizer.encode("def fib(n):").ids
assert ids, ids
heavy = sorted(m for m in ("torch", "triton", "splitserve.model.network", "splitserve.engine.engine")
               if m in sys.modules)
print("HEAVY", heavy)
"""


def test_the_router_app_does_not_import_torch(tiny_checkpoint: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_checkpoint)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout
