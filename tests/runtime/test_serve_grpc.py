"""The KServe v2 GRPCInferenceService, driven by tritonclient's gRPC client."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from conftest import mlp_reference
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def client(mlp_server):
    with grpcclient.InferenceServerClient(mlp_server.grpc_url) as client:
        yield client


def make_input(x: np.ndarray, name: str = "input", datatype: str = "FP32"):
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("model")
    assert client.get_server_metadata(as_json=True)["name"] == "edgeloop"
    metadata = client.get_model_metadata("model", as_json=True)
    assert metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]


def test_model_config_parses_with_tritons_own_definition(client, mlp_path):
    config = client.get_model_config("model").config  # tritonclient's model_config_pb2.ModelConfig
    assert config.name == "model"
    assert config.max_batch_size == 8
    assert [(i.name, i.dims) for i in config.input] == [("input", [64])]
    assert config.input[0].data_type == 11  # TYPE_FP32
    assert config.parameters["execution_providers"].string_value == "CPUExecutionProvider"
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000


def test_infer_matches_onnxruntime(client, mlp_path):
    x = np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32)
    result = client.infer("model", [make_input(x)], request_id="g-1")
    logits, label = mlp_reference(mlp_path, x)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    assert result.get_response().id == "g-1"


def test_requested_outputs_only(client):
    outputs = [grpcclient.InferRequestedOutput("label")]
    result = client.infer("model", [make_input(np.zeros((1, 64), np.float32))], outputs=outputs)
    assert [o.name for o in result.get_response().outputs] == ["label"]


def test_statistics(client):
    stats = client.get_inference_statistics("model", as_json=True)["model_stats"][0]
    assert stats["name"] == "model"


@pytest.mark.parametrize(
    ("x", "name", "datatype", "message"),
    [
        (np.zeros((1, 64), np.float64), "input", "FP64", "datatype FP64, the model expects FP32"),
        (np.zeros((1, 65), np.float32), "input", "FP32", r"shape \[1, 65\], the model expects \[-1, 64\]"),
        (np.zeros((1, 64), np.float32), "pixels", "FP32", "unexpected input 'pixels'"),
        (np.zeros((9, 64), np.float32), "input", "FP32", "batch size 9 is outside 1..8"),
    ],
    ids=["datatype", "shape", "name", "batch"],
)
def test_bad_input_is_invalid_argument(client, x, name, datatype, message):
    with pytest.raises(InferenceServerException, match=message) as error:
        client.infer("model", [make_input(x, name, datatype)])
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert client.is_server_live()


def test_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as error:
        client.infer("other", [make_input(np.zeros((1, 64), np.float32))])
    assert error.value.status() == "StatusCode.NOT_FOUND"


def test_oversized_message_is_resource_exhausted(mlp_path, server_factory):
    server = server_factory(mlp_path, "--max-body-bytes", "4096")
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.infer("model", [make_input(np.zeros((8, 64), np.float32))])  # 2 KiB: under the limit
        with pytest.raises(InferenceServerException) as error:
            client.infer("model", [make_input(np.zeros((1, 64 * 32), np.float32))])  # 8 KiB: refused unread
        assert error.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert client.is_server_live()


def test_typed_contents_as_kserve_clients_send_them(mlp_server, mlp_path):
    """KServe's own clients may send InferTensorContents instead of raw_input_contents."""
    import grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    request = pb.ModelInferRequest(model_name="model")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64]).contents.fp32_contents.extend(x.ravel())
    with grpc.insecure_channel(mlp_server.grpc_url) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    label = np.frombuffer(response.raw_output_contents[1], dtype="<i8")
    np.testing.assert_array_equal(label, mlp_reference(mlp_path, x)[1])


def test_large_messages_flow_both_ways_unary_and_streaming(tmp_path, server_factory):
    """16 MiB in and out: more than the HTTP/2 windows, so the server must give window back as it reads and
    send as the client's window allows."""
    from conftest import save
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1024])],
    )
    server = server_factory(save(helper.make_model(graph), tmp_path / "identity.onnx"), "--max-batch-size", "0")
    x = np.arange(4096 * 1024, dtype=np.float32).reshape(4096, 1024)
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        np.testing.assert_array_equal(client.infer("model", [make_input(x, "x")]).as_numpy("y"), x)
        answers = []
        client.start_stream(callback=lambda result, error: answers.append(error or result.as_numpy("y")))
        for _ in range(3):
            client.async_stream_infer("model", [make_input(x, "x")])
        client.stop_stream()  # waits for the answers
    assert len(answers) == 3
    for y in answers:
        np.testing.assert_array_equal(y, x)
