"""The committed protobuf modules are exactly what runtime-image/gen-protos.sh makes from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "runtime-image"
PROTOS = ["edgeloop_runtime/protocol/model_config.proto", "edgeloop_runtime/protocol/grpc_predict_v2.proto"]


def test_the_committed_pb2_modules_are_regenerated_unchanged(tmp_path):
    command = [sys.executable, "-m", "grpc_tools.protoc", "-I", str(RUNTIME), f"--python_out={tmp_path}", *PROTOS]
    subprocess.run(command, check=True, capture_output=True, text=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py"))
    committed = sorted(p.relative_to(RUNTIME) for p in (RUNTIME / "edgeloop_runtime" / "protocol").glob("*_pb2*.py"))
    assert generated == committed, "a module is missing or left over: run runtime-image/gen-protos.sh"
    for name in generated:
        assert (tmp_path / name).read_bytes() == (RUNTIME / name).read_bytes(), f"{name} is stale: run gen-protos.sh"
