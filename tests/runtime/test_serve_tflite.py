"""LiteRT models (`serve --format tflite`) over the same Open Inference Protocol endpoints, driven by tritonclient;
and the serving entry point's imports: it never needs what the lean serving image leaves out."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from conftest import free_port, mlp_reference, raw_request, serve_command


@pytest.fixture(scope="module")
def tflite_server(tflite_mlp_path, tmp_path_factory):
    from conftest import start_server

    server = start_server(tflite_mlp_path, "--format", "tflite", "--batch-window-us", "2000",
                          log_dir=tmp_path_factory.mktemp("logs"))  # fmt: skip
    yield server
    assert server.stop() == 0, server.output()


def infer_input(module, x: np.ndarray, binary: bool = True):
    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, **({"binary_data": binary} if module is not grpcclient else {}))
    return tensor


def test_metadata_and_config_name_litert_and_the_same_signature_as_onnx(tflite_server):
    with httpclient.InferenceServerClient(tflite_server.http_url) as client:
        metadata = client.get_model_metadata("model")
        assert metadata["platform"] == "litert_tflite"
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert metadata["outputs"] == [
            {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ]
        config = client.get_model_config("model")
        assert (config["backend"], config["max_batch_size"]) == ("litert", 8)
        assert config["parameters"]["execution_providers"]["string_value"] == "CPUExecutionProvider"


@pytest.mark.parametrize("binary", [True, False])
def test_http_answers_equal_onnxruntimes_on_the_same_weights(tflite_server, mlp_path, binary):
    x = np.random.default_rng(3).random((3, 64), dtype=np.float32)
    logits, label = mlp_reference(mlp_path, x)
    with httpclient.InferenceServerClient(tflite_server.http_url) as client:
        result = client.infer("model", [infer_input(httpclient, x, binary)])
    np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("label"), label)


def test_grpc_answers_and_statistics(tflite_server, mlp_path):
    x = np.random.default_rng(4).random((2, 64), dtype=np.float32)
    logits, _ = mlp_reference(mlp_path, x)
    with grpcclient.InferenceServerClient(tflite_server.grpc_url) as client:
        result = client.infer("model", [infer_input(grpcclient, x)])
        np.testing.assert_allclose(result.as_numpy("logits"), logits, rtol=1e-5, atol=1e-5)
        stats = client.get_inference_statistics("model", as_json=True)
        assert int(stats["model_stats"][0]["inference_count"]) >= 2
    _, metrics = raw_request(tflite_server, "GET", "/metrics")
    assert b'providers="CPUExecutionProvider"' in metrics


def test_concurrent_requests_of_odd_sizes_are_batched_and_each_gets_its_rows(tflite_server, mlp_path):
    rng = np.random.default_rng(5)
    inputs = [rng.random((int(rng.integers(1, 9)), 64), dtype=np.float32) for _ in range(48)]

    async def burst():
        async with aioclient.InferenceServerClient(tflite_server.http_url, conn_limit=48) as client:
            return await asyncio.gather(*(client.infer("model", [infer_input(aioclient, x)]) for x in inputs))

    for x, result in zip(inputs, asyncio.run(burst()), strict=True):
        np.testing.assert_allclose(result.as_numpy("logits"), mlp_reference(mlp_path, x)[0], rtol=1e-5, atol=1e-5)
    _, metrics = raw_request(tflite_server, "GET", "/metrics")
    batches = [line for line in metrics.decode().splitlines() if line.startswith("edgeloop_batch_size_count")]
    assert batches and int(batches[0].split()[-1]) < 48 + 10, "requests were batched"


def test_an_accelerator_is_refused_for_litert_unless_cpu_fallback_is_allowed(tflite_mlp_path, server_factory):
    command = serve_command("--model-path", str(tflite_mlp_path), "--format", "tflite", "--http-port", str(free_port()),
                            "--grpc-port", "0", "--execution-providers", "CUDAExecutionProvider")  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "execution providers ['CUDAExecutionProvider'] are not available" in result.stderr
    server = server_factory(tflite_mlp_path, "--format", "tflite", "--execution-providers",
                            "CUDAExecutionProvider,CPUExecutionProvider", "--allow-cpu-fallback")  # fmt: skip
    with httpclient.InferenceServerClient(server.http_url) as client:
        providers = client.get_model_config("model")["parameters"]["execution_providers"]["string_value"]
        assert providers == "CPUExecutionProvider"


def test_a_file_litert_cannot_read_is_refused(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer" * 10)
    command = serve_command("--model-path", str(bad), "--format", "tflite", "--http-port", str(free_port()),
                            "--grpc-port", "0")  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "LiteRT could not load the model" in result.stderr


# What the lean serving image leaves out, per format: federated work's libraries and the other backend's.
LEFT_OUT = {
    "onnx": ["onnx", "cryptography", "ai_edge_litert"],
    "tflite": ["onnx", "cryptography", "onnxruntime"],
}


@pytest.mark.parametrize("model_format", sorted(LEFT_OUT))
def test_serving_never_imports_what_the_lean_image_leaves_out(model_format, mlp_path, tflite_mlp_path, tmp_path):
    """The server runs with those modules made unimportable, and has none of them loaded when it is ready."""
    path = mlp_path if model_format == "onnx" else tflite_mlp_path
    port = free_port()
    program = (
        "import sys\n"
        f"for name in {LEFT_OUT[model_format]!r}: sys.modules[name] = None\n"
        "from edgeloop_runtime.cli import main\n"
        "sys.exit(main())\n"
    )
    command = [sys.executable, "-c", program, "serve", "--model-path", str(path), "--format", model_format,
               "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", str(free_port())]  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1):
                    break
            except OSError:
                time.sleep(0.05)
        with httpclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
            x = np.zeros((1, 64), np.float32)
            assert client.infer("model", [infer_input(httpclient, x)]).as_numpy("label").shape == (1,)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, log.read_text()


def test_without_federated_dependencies_the_cli_lists_federated_as_missing_and_says_so_when_run():
    program = "import sys; sys.modules['onnx'] = None; from edgeloop_runtime.cli import main; sys.exit(main())"
    listing = subprocess.run([sys.executable, "-c", program, "--help"], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0, listing.stderr
    assert "not in this image" in listing.stdout and "serve" in listing.stdout
    command = [sys.executable, "-c", program, "federated", "aggregate", "--help"]
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1
    assert "edgeloop-runtime federated: not in this image" in refused.stderr
