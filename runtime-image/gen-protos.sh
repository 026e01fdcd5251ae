#!/usr/bin/env bash
# Regenerates the committed gRPC/protobuf modules with grpcio-tools==1.74.0 (protobuf 6.31 gencode, which
# protobuf 6 and 7 runtimes load). The runtime itself does not need grpcio-tools.
set -euo pipefail
cd "$(dirname "$0")"
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. \
  edgeloop_runtime/protocol/model_config.proto edgeloop_runtime/protocol/grpc_predict_v2.proto
rm -f edgeloop_runtime/protocol/model_config_pb2_grpc.py
