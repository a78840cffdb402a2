"""The committed generated modules match worker.proto, and import as package modules."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

from splitserve.protos import generate

PROTO_DIR = Path(generate.__file__).resolve().parent


def test_generated_modules_are_current() -> None:
    stale = generate.stale_files()
    assert not stale, (
        "protos/ generated modules are stale; run `python protos/generate.py` and commit them:\n"
        + "\n".join(f"{name}:\n{diff}" for name, diff in stale.items())
    )


def test_staleness_check_notices_a_proto_edit(tmp_path: Path) -> None:
    for name in ("worker.proto", *generate.outputs("worker.proto")):
        shutil.copy(PROTO_DIR / name, tmp_path / name)
    assert generate.stale_files(tmp_path) == {}
    proto = tmp_path / "worker.proto"
    proto.write_text(proto.read_text().replace("message AbortReply {", "message AbortReply {\n  uint32 extra = 99;"))
    stale = generate.stale_files(tmp_path)
    assert set(stale) == {"worker_pb2.py", "worker_pb2.pyi"}


def test_version_stamps_are_ignored() -> None:
    text = (PROTO_DIR / "worker_pb2.py").read_text()
    bumped = text.replace("# Protobuf Python Version: ", "# Protobuf Python Version: 99.")
    assert bumped != text and generate.normalize(bumped) == generate.normalize(text)


def test_imports_are_package_relative() -> None:
    grpc_module = (PROTO_DIR / "worker_pb2_grpc.py").read_text()
    assert "from . import worker_pb2 as" in grpc_module
    assert "import worker_pb2" not in grpc_module.replace("from . import worker_pb2", "")

    from splitserve.protos import worker_pb2, worker_pb2_grpc

    assert worker_pb2_grpc.splitserve_dot_v1_dot_worker__pb2 is worker_pb2
    # A namespaced file name in the global descriptor pool; the proto package is splitserve.v1.
    assert worker_pb2.DESCRIPTOR.name == "splitserve/v1/worker.proto"
    assert worker_pb2.DESCRIPTOR.package == "splitserve.v1"


def test_messages_pickle() -> None:
    """Ray ships objects by pickle: the classes must name their real module."""
    from splitserve.protos import worker_pb2 as pb

    assert pb.StatsReply.__module__ == "splitserve.protos.worker_pb2"
    msg = pb.GenerateChunk(delta=pb.TokenDelta(token_ids=[1, 2, 3]))
    assert pickle.loads(pickle.dumps(msg)) == msg
