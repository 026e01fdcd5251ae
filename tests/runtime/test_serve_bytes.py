"""BYTES tensors (ONNX strings) through HTTP JSON, the binary extension's length-prefixed layout, and gRPC."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import save, start_server
from onnx import TensorProto, helper


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bytes")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["N", 2])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["N", 2])],
    )
    server = start_server(save(helper.make_model(graph), directory / "echo.onnx"), log_dir=directory)
    yield server
    assert server.stop() == 0, server.output()


TEXT = np.array([["héllo", ""], ["edge", "loop"]], dtype=object)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_round_trip(server, binary):
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.get_model_metadata("model")["inputs"][0]["datatype"] == "BYTES"
        tensor = httpclient.InferInput("text", [2, 2], "BYTES")
        tensor.set_data_from_numpy(TEXT, binary_data=binary)
        output = httpclient.InferRequestedOutput("echo", binary_data=binary)
        echo = client.infer("model", [tensor], outputs=[output]).as_numpy("echo")
    assert [[v.decode() if isinstance(v, bytes) else v for v in row] for row in echo] == TEXT.tolist()


def test_grpc_round_trip(server):
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        tensor = grpcclient.InferInput("text", [2, 2], "BYTES")
        tensor.set_data_from_numpy(TEXT)
        echo = client.infer("model", [tensor]).as_numpy("echo")
    assert [[v.decode() for v in row] for row in echo] == TEXT.tolist()
