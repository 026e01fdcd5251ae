"""`edgeloop infer` against a running server, over HTTP (binary and JSON) and gRPC."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys

import numpy as np
import pytest
from conftest import mlp_reference


def edgeloop_infer(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "edgeloop.cli", "infer", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("protocol", "extra"), [("http", []), ("http", ["--json-data"]), ("grpc", [])], ids=["http", "http-json", "grpc"]
)
def test_npy_input_prints_the_outputs(mlp_server, mlp_path, tmp_path, protocol, extra):
    x = np.random.default_rng(4).normal(size=(2, 64))  # float64: cast to the model's FP32
    np.save(tmp_path / "x.npy", x)
    url = mlp_server.http_url if protocol == "http" else mlp_server.grpc_url
    result = edgeloop_infer(
        "--url", url, "--protocol", protocol, "--model", "model", "--input", str(tmp_path / "x.npy"), *extra
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    logits, label = mlp_reference(mlp_path, x.astype(np.float32))
    assert document["model_name"] == "model"
    assert document["outputs"]["label"] == {"dtype": "int64", "shape": [2], "data": label.tolist()}
    np.testing.assert_allclose(document["outputs"]["logits"]["data"], logits, rtol=1e-5, atol=1e-6)


def test_named_json_input_and_selected_output(mlp_server, tmp_path):
    (tmp_path / "x.json").write_text(json.dumps([[0.1] * 64]))
    result = edgeloop_infer(
        "--url", mlp_server.http_url, "--model", "model", "--input", f"input={tmp_path / 'x.json'}", "--output", "label"
    )
    assert result.returncode == 0, result.stderr
    assert list(json.loads(result.stdout)["outputs"]) == ["label"]


def test_errors_are_reported_not_raised(mlp_server, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 3)))
    result = edgeloop_infer("--url", mlp_server.http_url, "--model", "model", "--input", str(tmp_path / "x.npy"))
    assert result.returncode == 1
    assert "shape [1, 3], the model expects [-1, 64]" in result.stderr
    result = edgeloop_infer("--url", mlp_server.http_url, "--model", "model", "--input", f"pixels={tmp_path / 'x.npy'}")
    assert result.returncode == 1
    assert "no input 'pixels'" in result.stderr


def test_tls_server_name_verifies_a_server_reached_by_address(mlp_path, tls_files, server_factory, tmp_path):
    """A Service's ClusterIP is not in its certificate: --tls-server-name names what to verify instead."""
    context = ssl.create_default_context(cafile=str(tls_files.cert))
    server = server_factory(mlp_path, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key),
                            scheme="https", context=context)
    np.save(tmp_path / "x.npy", np.zeros((1, 64)))
    common = ("--url", server.grpc_url, "--protocol", "grpc", "--ssl", "--ca-cert", str(tls_files.cert),
              "--model", "model", "--input", str(tmp_path / "x.npy"))
    result = edgeloop_infer(*common, "--tls-server-name", "localhost")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"]["label"]["shape"] == [1]
    result = edgeloop_infer(*common, "--tls-server-name", "digits.elsewhere.svc")
    assert result.returncode == 1 and "edgeloop infer:" in result.stderr
    result = edgeloop_infer("--url", server.http_url, "--tls-server-name", "localhost", *common[4:])
    assert result.returncode == 1 and "--tls-server-name needs --protocol grpc" in result.stderr
