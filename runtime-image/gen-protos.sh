#!/usr/bin/env bash
# Regenerates the committed protobuf modules with grpcio-tools==1.74.0 (protobuf 6.31 gencode, which protobuf 6
# and 7 runtimes load; a dev dependency). The server speaks gRPC itself, so no *_pb2_grpc.py module is made.
# tests/unit/test_protos.py fails when the committed modules differ from what this makes.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . --python_out=. \
  edgeloop_runtime/protocol/model_config.proto edgeloop_runtime/protocol/grpc_predict_v2.proto
