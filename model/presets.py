"""Where preset checkpoints live: `resolve_checkpoint("tiny")` makes the tiny random-weight checkpoint
on first use (in ~/.cache/splitserve/checkpoints/) and returns its directory;
`resolve_checkpoint("pycoder")` returns the trained checkpoint shipped in the package (model/pycoder,
made by model/training.py); a path is returned as is."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_VERSION = "v2"  # bump whenever a preset changes

#: Trained checkpoints shipped inside the package (package data), by name.
SHIPPED: dict[str, Path] = {"pycoder": Path(__file__).with_name("pycoder")}
#: The model `splitserve generate` and deploy/local.yaml serve by default.
DEFAULT_MODEL = "pycoder"


def cache_dir() -> Path:
    return Path.home() / ".cache" / "splitserve" / "checkpoints"


def resolve_checkpoint(model: str | Path) -> Path:
    """A checkpoint directory for a path or a preset name (made once, atomically, if absent)."""
    if str(model) in SHIPPED:
        shipped = SHIPPED[str(model)]
        if not (shipped / "config.json").exists():
            raise FileNotFoundError(f"{shipped}: the shipped {model} checkpoint is missing (a broken install?)")
        return shipped
    # Found without torch: a preset made before (only presets are cached there), or a directory path.
    cached = cache_dir() / f"{model}-{CACHE_VERSION}"
    if os.sep not in str(model) and (cached / "config.json").exists():
        return cached
    if os.sep in str(model) and (Path(model).expanduser() / "config.json").exists():
        return Path(model).expanduser()  # a name with a separator is never a preset
    from .checkpoint import PRESETS, make_checkpoint

    if str(model) not in PRESETS:
        path = Path(model).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path}: not a checkpoint directory (no config.json); "
                f"give a directory or one of the presets {sorted([*PRESETS, *SHIPPED])}"
            )
        return path
    target = cache_dir() / f"{model}-{CACHE_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("making the %s checkpoint in %s (first run only)...", model, target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{model}-"))
    try:
        make_checkpoint(str(model), tmp, seed=0)
        try:
            os.rename(tmp, target)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("made the %s checkpoint", model)
    return target
