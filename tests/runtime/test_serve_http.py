"""The Open Inference Protocol v2 over HTTP, driven by tritonclient's http and http.aio clients."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from conftest import mlp_reference, raw_request, sha256_of
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def client(mlp_server):
    with httpclient.InferenceServerClient(mlp_server.http_url) as client:
        yield client


def make_input(x: np.ndarray, binary: bool, module=httpclient):
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_health_and_server_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "edgeloop"
    assert "binary_tensor_data" in metadata["extensions"]


def test_model_metadata_reports_signature_providers_and_digest(client, mlp_server, mlp_path):
    assert client.is_model_ready("model")
    assert client.is_model_ready("model", "1")
    metadata = client.get_model_metadata("model")
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in metadata["outputs"]] == ["logits", "label"]
    assert metadata["parameters"] == {"execution_providers": "CPUExecutionProvider", "sha256": sha256_of(mlp_path)}
    assert client.get_model_metadata("model", "1") == metadata


def test_unknown_model_or_version_is_404(client, mlp_server):
    with pytest.raises(InferenceServerException, match="not served here") as error:
        client.get_model_metadata("other")
    assert error.value.status() == "404"
    assert not client.is_model_ready("model", "2")
    response, _ = raw_request(mlp_server, "GET", "/v2/nowhere")
    assert response.status == 404


def test_triton_config_leaves_out_the_batch_dimension(client):
    config = client.get_model_config("model")
    assert config["max_batch_size"] == 8
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}]
    assert config["output"][1] == {"name": "label", "data_type": "TYPE_INT64", "dims": []}
    assert config["dynamic_batching"] == {"preferred_batch_size": [1, 2, 4, 8], "max_queue_delay_microseconds": 2000}
    assert config["parameters"]["execution_providers"] == {"string_value": "CPUExecutionProvider"}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnxruntime(client, mlp_path, binary):
    x = np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("logits", "label")]
    result = client.infer("model", [make_input(x, binary)], outputs=outputs, request_id="r-1")
    logits, label = mlp_reference(mlp_path, x)
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    assert result.get_response()["id"] == "r-1"
    assert result.get_output("logits")["shape"] == [3, 10]


def test_only_requested_outputs_are_returned(client):
    x = np.zeros((1, 64), np.float32)
    result = client.infer("model", [make_input(x, True)], outputs=[httpclient.InferRequestedOutput("label")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]


def test_all_outputs_binary_when_none_requested(client, mlp_path):
    x = np.ones((2, 64), np.float32)
    result = client.infer("model", [make_input(x, True)])
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    np.testing.assert_array_equal(result.as_numpy("label"), mlp_reference(mlp_path, x)[1])


def test_body_is_json_whatever_the_content_type_and_the_response_is_not_compressed(mlp_server):
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]})
    headers = {"Content-Type": "text/plain", "Accept-Encoding": "gzip, deflate"}
    response, data = raw_request(mlp_server, "POST", "/v2/models/model/versions/1/infer", body.encode(), headers)
    assert response.status == 200, data
    assert response.getheader("Content-Encoding") is None
    outputs = json.loads(data)["outputs"]
    assert outputs[0]["name"] == "logits" and len(outputs[0]["data"]) == 10


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_are_accepted(client, mlp_path, algorithm):
    x = np.full((1, 64), 0.25, np.float32)
    result = client.infer("model", [make_input(x, True)], request_compression_algorithm=algorithm)
    np.testing.assert_array_equal(result.as_numpy("label"), mlp_reference(mlp_path, x)[1])


def test_aio_client_concurrent_requests_are_batched_and_each_gets_its_own_rows(mlp_server, mlp_path):
    rng = np.random.default_rng(2)
    inputs = [rng.normal(size=(1 + i % 3, 64)).astype(np.float32) for i in range(48)]

    async def main():
        async with aioclient.InferenceServerClient(mlp_server.http_url, conn_limit=16) as client:
            before = (await client.get_inference_statistics("model"))["model_stats"][0]

            async def one(i, x):
                return await client.infer("model", [make_input(x, i % 2 == 0, aioclient)])

            results = []
            for start in range(0, len(inputs), 16):
                results += await asyncio.gather(*(one(i, inputs[i]) for i in range(start, start + 16)))
            after = (await client.get_inference_statistics("model"))["model_stats"][0]
            return results, before, after

    results, before, after = asyncio.run(main())
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result.as_numpy("logits"), mlp_reference(mlp_path, x)[0], rtol=1e-5, atol=1e-6)
    samples = after["inference_count"] - before["inference_count"]
    runs = after["execution_count"] - before["execution_count"]
    assert samples == sum(len(x) for x in inputs)
    assert runs < len(inputs), "concurrent requests should share ONNX Runtime runs"


def metric_values(text: str, name: str) -> dict[str, float]:
    """A metric's samples by their label text."""
    return {
        line.split("{")[1].split("}")[0]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith(name + "{")
    }


def test_metrics_use_tritons_names_and_agree_with_the_statistics(client, mlp_server, mlp_path):
    client.infer("model", [make_input(np.zeros((1, 64), np.float32), True)])
    with pytest.raises(InferenceServerException):
        client.infer("model", [make_input(np.zeros((1, 63), np.float32), True)])
    response, body = raw_request(mlp_server, "GET", "/metrics")
    stats = client.get_inference_statistics("model")["model_stats"][0]
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/plain")
    text = body.decode()
    labels = 'model="model",version="1"'
    stat = stats["inference_stats"]
    assert metric_values(text, "nv_inference_request_success")[labels] == stat["success"]["count"] >= 1
    assert metric_values(text, "nv_inference_count")[labels] == stats["inference_count"]
    assert metric_values(text, "nv_inference_exec_count")[labels] == stats["execution_count"]
    assert metric_values(text, "nv_inference_request_duration_us")[labels] == stat["success"]["ns"] // 1000
    for kind in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert metric_values(text, f"nv_inference_{kind}_duration_us")[labels] == stat[kind]["ns"] // 1000, kind
    failures = metric_values(text, "nv_inference_request_failure")
    assert failures[labels + ',reason="OTHER"'] >= 1 and failures[labels + ',reason="BACKEND"'] == 0
    requests = metric_values(text, "edgeloop_requests_total")
    assert requests[labels + ',protocol="http",outcome="success"'] >= 1
    assert requests[labels + ',protocol="http",outcome="bad_request"'] >= 1
    assert metric_values(text, "nv_inference_pending_request_count")[labels] == 0
    assert metric_values(text, "edgeloop_ready")[labels] == 1
    assert metric_values(text, "edgeloop_open_connections")[labels + ',protocol="http"'] >= 1
    for name in (
        "edgeloop_request_duration_seconds_bucket",
        "edgeloop_batch_size_bucket",
        "edgeloop_inference_duration_seconds_count",
    ):
        assert name in text
    assert (
        f'edgeloop_model_info{{{labels},sha256="{sha256_of(mlp_path)}",node="",accelerator="",'
        'providers="CPUExecutionProvider"} 1'
    ) in text


def test_runtime_info_names_the_node_and_accelerator(mlp_path, server_factory):
    """CONTRACTS C3: the operator renders --node-name $(NODE_NAME) and --accelerator <class>."""
    server = server_factory(mlp_path, "--node-name", "edge-gpu-0", "--accelerator", "gpu")
    _, body = raw_request(server, "GET", "/metrics")
    info = metric_values(body.decode(), "edgeloop_model_info")
    (labels,) = info
    assert 'node="edge-gpu-0",accelerator="gpu",providers="CPUExecutionProvider"' in labels


def test_triton_statistics_count_inferences(client):
    before = client.get_inference_statistics("model")["model_stats"][0]
    client.infer("model", [make_input(np.zeros((2, 64), np.float32), True)])
    after = client.get_inference_statistics("model")["model_stats"][0]
    assert after["inference_count"] == before["inference_count"] + 2
    assert after["inference_stats"]["success"]["count"] == before["inference_stats"]["success"]["count"] + 1
    assert client.get_inference_statistics()["model_stats"][0]["name"] == "model"


def test_expect_100_continue_is_answered_before_the_body(mlp_server):
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]})
    head = (
        f"POST /v2/models/model/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
        "Expect: 100-continue\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", mlp_server.http_port), timeout=10) as sock:
        sock.sendall(head.encode())
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body.encode())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
