"""Regenerate the Python modules of the worker API from protos/*.proto.

    python protos/generate.py           # rewrite worker_pb2.py, worker_pb2_grpc.py, worker_pb2.pyi
    python protos/generate.py --check   # exit 1 if the committed modules are stale (CI; tests/protos)

Uses grpc_tools.protoc (grpcio-tools). Each .proto is compiled under the virtual path
splitserve/v1/<name>.proto, so its name in protobuf's global descriptor pool cannot collide with
another library's "worker.proto". The generated modules are then fixed up to live in the package
`splitserve.protos`:

- imports between generated modules become package-relative (`from . import worker_pb2`);
- message classes get `__module__ = "splitserve.protos.worker_pb2"`, so they pickle (Ray ships
  them between processes).

The comparison in --check ignores the generator's version stamps (the protobuf/grpc version
lines), so a different grpcio-tools release does not make unchanged protos look stale.

This file runs as a script (no package imports), and as `python -m splitserve.protos.generate`.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE = "splitserve.protos"  # the Python package the generated modules live in
VIRTUAL_DIR = "splitserve/v1"  # the .proto files' path inside protoc (and the descriptor pool)
PROTOS = ("worker.proto",)

_HEADER = "# Generated from protos/{proto} by protos/generate.py; do not edit. Regenerate: python protos/generate.py\n"

_VERSION_STAMPS = (
    re.compile(r"# Protobuf Python Version: [^\n]*"),
    re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*\d+,\s*\d+,\s*\d+,\s*'[^']*',"),
    re.compile(r"GRPC_GENERATED_VERSION = '[^']*'"),
)


def outputs(proto: str) -> list[str]:
    """Names of the modules generated from `proto`."""
    stem = Path(proto).stem
    return [f"{stem}_pb2.py", f"{stem}_pb2_grpc.py", f"{stem}_pb2.pyi"]


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every proto in PROTOS from `proto_dir` into `out_dir`; return the files written.

    Raises:
        RuntimeError: protoc failed (its messages are on stderr).
    """
    import importlib.util

    # grpcio-tools (a dev dependency) is only located here, never imported: its native compiler
    # crashes a process that already loaded other native libraries (UCX, triton, ...).
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or spec.origin is None:
        raise RuntimeError("grpcio-tools is not installed (pip install -e '.[dev]')")
    include = Path(spec.origin).resolve().parent / "_proto"  # google/protobuf/*.proto
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={VIRTUAL_DIR}={proto_dir}",
            f"--proto_path={include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"{VIRTUAL_DIR}/{p}" for p in PROTOS),
        ]
        rc = subprocess.run([sys.executable, "-m", *args], check=False).returncode
        if rc != 0:
            raise RuntimeError(f"protoc failed (exit {rc}): {' '.join(args[1:])}")
        stems = [Path(p).stem for p in PROTOS]
        for proto in PROTOS:
            for name in outputs(proto):
                text = (Path(tmp) / VIRTUAL_DIR / name).read_text(encoding="utf-8")
                text = _fix_up(text, stems)
                if name.endswith(".py"):
                    text = _HEADER.format(proto=proto) + text
                target = out_dir / name
                target.write_text(text, encoding="utf-8")
                written.append(target)
    return written


def _fix_up(text: str, stems: list[str]) -> str:
    virtual_pkg = VIRTUAL_DIR.replace("/", ".")
    for stem in stems:
        # `from splitserve.v1 import worker_pb2 as ...` -> `from . import worker_pb2 as ...`
        text = re.sub(
            rf"^from {re.escape(virtual_pkg)} import ({stem}_pb2)\b", r"from . import \1", text, flags=re.MULTILINE
        )
        # message classes' __module__: the module's real import path, so instances pickle
        text = text.replace(f"'{virtual_pkg}.{stem}_pb2'", f"'{PACKAGE}.{stem}_pb2'")
    return text


def normalize(text: str) -> str:
    """Text with the generator's version stamps blanked (for staleness comparison)."""
    for pattern in _VERSION_STAMPS:
        text = pattern.sub("<version>", text)
    return text


def stale_files(proto_dir: Path = PROTO_DIR) -> dict[str, str]:
    """Generated modules in `proto_dir` that differ from a fresh generation: name -> unified diff."""
    problems: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp), proto_dir)
        for proto in PROTOS:
            for name in outputs(proto):
                fresh = normalize((Path(tmp) / name).read_text(encoding="utf-8"))
                committed_path = proto_dir / name
                if not committed_path.exists():
                    problems[name] = "missing"
                    continue
                committed = normalize(committed_path.read_text(encoding="utf-8"))
                if committed != fresh:
                    diff = difflib.unified_diff(
                        committed.splitlines(keepends=True),
                        fresh.splitlines(keepends=True),
                        f"committed/{name}",
                        f"regenerated/{name}",
                        n=1,
                    )
                    problems[name] = "".join(list(diff)[:60])
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the generated modules are current")
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help="where to write (default: protos/)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name, diff in stale.items():
            print(f"stale: protos/{name}\n{diff}", file=sys.stderr)
        if stale:
            print("regenerate with: python protos/generate.py", file=sys.stderr)
            return 1
        print("generated modules are current")
        return 0
    if args.out.resolve() == PROTO_DIR:
        # Generate aside first, so a protoc error leaves the committed modules untouched.
        with tempfile.TemporaryDirectory() as tmp:
            files = generate(Path(tmp))
            for f in files:
                shutil.copyfile(f, PROTO_DIR / f.name)
        files = [PROTO_DIR / f.name for f in files]
    else:
        files = generate(args.out)
    for f in files:
        print(f"wrote {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
