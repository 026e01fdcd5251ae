"""Every malformed request gets a 400 (413 when too large) that names the problem, and the server keeps serving."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import raw_request, start_server
from tritonclient.utils import InferenceServerException

INFER = "/v2/models/model/infer"


def infer_json(inputs: list[dict], **extra) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


def tensor(name="input", datatype="FP32", shape=(1, 64), data=None) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": data if data is not None else [0.0] * 64}


@pytest.fixture(scope="module")
def server(mlp_path, tmp_path_factory):
    server = start_server(mlp_path, "--max-body-bytes", "65536", log_dir=tmp_path_factory.mktemp("logs"))
    yield server
    assert server.stop() == 0, server.output()


def assert_still_serving(server):
    response, body = raw_request(server, "POST", INFER, infer_json([tensor()]))
    assert response.status == 200, body


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (infer_json([tensor(datatype="FP64")]), {}, "input 'input' has datatype FP64, the model expects FP32"),
        (infer_json([tensor(datatype="COMPLEX")]), {}, "input 'input' has unknown datatype 'COMPLEX'"),
        (infer_json([tensor(shape=(1, 32), data=[0.0] * 32)]), {}, "input 'input' has shape [1, 32]"),
        (infer_json([tensor(shape=(2, 64))]), {}, "input 'input' has 64 values, shape [2, 64] needs 128"),
        (infer_json([tensor(shape=(1, -64))]), {}, "input 'input' needs a 'shape' of non-negative integers"),
        (infer_json([tensor(name="pixels")]), {}, "unexpected input 'pixels': model 'model' has inputs ['input']"),
        (infer_json([]), {}, "missing input(s) ['input']"),
        (infer_json([tensor(data=["a"] * 64)]), {}, "input 'input': data is not a list of FP32 values"),
        (infer_json([tensor(shape=(9, 64), data=[0.0] * 576)]), {}, "batch size 9 is outside 1..8"),
        (infer_json([tensor()], outputs=[{"name": "probabilities"}]), {}, "unknown output(s) ['probabilities']"),
        (b'{"inputs": [', {}, "malformed JSON"),
        (b"[1, 2]", {}, "the request must be a JSON object with an 'inputs' list"),
        (b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, "cannot decompress the gzip body"),
    ],
    ids=[
        "wrong-datatype",
        "unknown-datatype",
        "wrong-shape",
        "data-count",
        "negative-dim",
        "wrong-name",
        "missing-input",
        "non-numeric-data",
        "batch-too-big",
        "unknown-output",
        "malformed-json",
        "not-an-object",
        "bad-gzip",
    ],
)
def test_bad_json_request_is_400_naming_the_problem(server, body, headers, message):
    response, data = raw_request(server, "POST", INFER, body, headers)
    assert response.status == 400
    assert message in json.loads(data)["error"]
    assert_still_serving(server)


def binary_request(declared: int, sent: int, header_length_delta: int = 0) -> tuple[bytes, dict]:
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 64], "parameters": {"binary_data_size": declared}}
            ]
        }
    ).encode()
    body = header + np.zeros(sent // 4, np.float32).tobytes()
    return body, {"Inference-Header-Content-Length": str(len(header) + header_length_delta)}


@pytest.mark.parametrize(
    ("declared", "sent", "delta", "message"),
    [
        (256, 100, 0, "binary payload is truncated: input 'input' needs 256 bytes"),
        (128, 128, 0, "input 'input' has 128 bytes of data, shape [1, 64] of FP32 needs 256"),
        (256, 260, 0, "4 bytes after the last binary input belong to no input"),
        (256, 256, 10_000, "Inference-Header-Content-Length is 10"),
        (256, 256, -3, "malformed JSON"),
    ],
    ids=["truncated", "size-mismatch", "trailing-bytes", "header-length-too-big", "header-length-too-small"],
)
def test_bad_binary_request_is_400(server, declared, sent, delta, message):
    body, headers = binary_request(declared, sent, delta)
    response, data = raw_request(server, "POST", INFER, body, headers)
    assert response.status == 400
    assert message in json.loads(data)["error"]
    assert_still_serving(server)


def test_binary_input_without_the_header_length_is_400(server):
    body, _ = binary_request(256, 256)
    response, data = raw_request(server, "POST", INFER, body)
    assert response.status == 400
    assert "malformed JSON" in json.loads(data)["error"], "without the header length the whole body is JSON"
    assert_still_serving(server)


def test_tritonclient_sees_the_400_message(server):
    with httpclient.InferenceServerClient(server.http_url) as client:
        x = httpclient.InferInput("input", [1, 64], "FP64")
        x.set_data_from_numpy(np.zeros((1, 64), np.float64))
        with pytest.raises(InferenceServerException, match="datatype FP64, the model expects FP32") as error:
            client.infer("model", [x])
        assert error.value.status() == "400"


def test_oversized_body_is_413_and_the_server_keeps_serving(server):
    response, data = raw_request(server, "POST", INFER, b"x" * 70_000)
    assert response.status == 413
    assert "exceeds 65536 bytes" in json.loads(data)["error"]
    with httpclient.InferenceServerClient(server.http_url) as client:
        big = httpclient.InferInput("input", [8, 4096], "FP32")
        big.set_data_from_numpy(np.zeros((8, 4096), np.float32))
        with pytest.raises(InferenceServerException) as error:
            client.infer("model", [big])
        assert error.value.status() == "413"
    assert_still_serving(server)


def test_oversized_gzip_body_is_413(server):
    import gzip

    response, _ = raw_request(server, "POST", INFER, gzip.compress(b" " * 200_000), {"Content-Encoding": "gzip"})
    assert response.status == 413
    assert_still_serving(server)


def test_garbage_that_is_not_http_is_400(server):
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(b"\x00\x01 not http at all\r\n\r\n")
        assert sock.recv(1024).startswith(b"HTTP/1.1 400")
    assert_still_serving(server)


def test_wrong_method_is_405(server):
    response, _ = raw_request(server, "GET", INFER)
    assert response.status == 405
    assert_still_serving(server)
