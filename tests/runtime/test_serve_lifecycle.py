"""Loading (digest, providers), overload, SIGTERM drain and TLS: the server as a process."""

from __future__ import annotations

import asyncio
import http.client
import ssl
import subprocess
import sys
import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from conftest import free_port, raw_request, serve_command, sha256_of
from tritonclient.utils import InferenceServerException


def run_serve(*args: str) -> subprocess.CompletedProcess:
    """Runs serve expecting it to refuse to start."""
    command = serve_command("--host", "127.0.0.1", "--http-port", str(free_port()), "--grpc-port", "0", *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_a_model_with_the_wrong_digest_is_refused(mlp_path):
    wrong = "ab" * 32
    result = run_serve("--model-path", str(mlp_path), "--sha256", wrong)
    assert result.returncode == 1
    assert f"its sha256 is {sha256_of(mlp_path)}, expected {wrong}" in result.stderr


def test_serves_from_the_node_cache_by_digest(mlp_path, tmp_path, server_factory):
    digest = sha256_of(mlp_path)
    cached = tmp_path / "sha256" / digest
    cached.parent.mkdir()
    cached.write_bytes(mlp_path.read_bytes())
    server = server_factory(cached, "--sha256", digest)  # --model-path given by the factory; same file
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.get_model_metadata("model")["parameters"]["sha256"] == digest
    missing = run_serve("--cache", str(tmp_path), "--sha256", "cd" * 32)
    assert missing.returncode == 1
    assert "cannot read model" in missing.stderr


UNAVAILABLE_PROVIDER = next(
    p
    for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "OpenVINOExecutionProvider")
    if p not in ort.get_available_providers()
)


def test_an_unavailable_provider_is_refused_without_the_fallback_flag(mlp_path):
    result = run_serve("--model-path", str(mlp_path), "--execution-providers", UNAVAILABLE_PROVIDER)
    assert result.returncode == 1
    assert f"execution providers ['{UNAVAILABLE_PROVIDER}'] are not available" in result.stderr
    assert "--allow-cpu-fallback" in result.stderr


def test_cpu_fallback_when_allowed_is_reported_in_metadata_config_metrics_and_log(mlp_path, server_factory):
    server = server_factory(
        mlp_path, "--execution-providers", f"{UNAVAILABLE_PROVIDER},CPUExecutionProvider", "--allow-cpu-fallback"
    )
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.get_model_metadata("model")["parameters"]["execution_providers"] == "CPUExecutionProvider"
        config = client.get_model_config("model")
        assert config["parameters"]["execution_providers"]["string_value"] == "CPUExecutionProvider"
    _, metrics = raw_request(server, "GET", "/metrics")
    assert b'providers="CPUExecutionProvider"' in metrics
    assert "execution providers in use: CPUExecutionProvider" in server.output()


def test_overload_gets_503_at_once_and_no_crash(slow_path, server_factory):
    server = server_factory(slow_path, "--max-batch-size", "0", "--max-queue", "2")
    x = np.ones((1, 1024), np.float32)

    async def main():
        async with aioclient.InferenceServerClient(server.http_url, conn_limit=32) as client:
            tensor = aioclient.InferInput("x", [1, 1024], "FP32")
            tensor.set_data_from_numpy(x)
            return await asyncio.gather(*(client.infer("model", [tensor]) for _ in range(32)), return_exceptions=True)

    results = asyncio.run(main())
    refused = [r for r in results if isinstance(r, InferenceServerException)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert len(refused) + len(served) == 32, [r for r in results if isinstance(r, Exception)]
    assert refused and served
    assert {r.status() for r in refused} == {"503"}
    assert all("queue is full" in r.message() for r in refused)
    for result in served:
        np.testing.assert_array_equal(result.as_numpy("y"), x)

    # gRPC: the same queue answers UNAVAILABLE. Each call takes ~0.25 s and all start together (once every
    # client is connected), so that the queue of 2 overflows however the threads are scheduled.
    heavy = np.ones((64, 1024), np.float32)
    start = threading.Barrier(16)

    def grpc_infer(outcomes):
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            tensor = grpcclient.InferInput("x", list(heavy.shape), "FP32")
            tensor.set_data_from_numpy(heavy)
            client.is_server_live()
            start.wait(30)
            try:
                client.infer("model", [tensor])
                outcomes.append("ok")
            except InferenceServerException as error:
                outcomes.append(error.status())

    outcomes: list[str] = []
    threads = [threading.Thread(target=grpc_infer, args=(outcomes,)) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert "StatusCode.UNAVAILABLE" in outcomes and "ok" in outcomes

    assert server.proc.poll() is None
    _, metrics = raw_request(server, "GET", "/metrics")
    assert f'protocol="http",outcome="unavailable"}} {len(refused)}'.encode() in metrics
    with httpclient.InferenceServerClient(server.http_url) as client:
        tensor = httpclient.InferInput("x", [1, 1024], "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("model", [tensor]).as_numpy("y").shape == (1, 1024)


def test_sigterm_drains_in_flight_requests_then_exits_zero(slow_path, server_factory):
    server = server_factory(slow_path, "--max-batch-size", "0")
    x = np.ones((256, 1024), np.float32)  # about a second each: still running while the test looks
    results: dict[str, object] = {}

    def http_infer():
        with httpclient.InferenceServerClient(server.http_url, network_timeout=60) as client:
            tensor = httpclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            results["http"] = client.infer("model", [tensor]).as_numpy("y")

    def grpc_infer():
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            results["grpc"] = client.infer("model", [tensor]).as_numpy("y")

    probe = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)  # kept alive across SIGTERM
    probe.request("GET", "/v2/health/ready")
    assert probe.getresponse().read() == b'{"ready":true}'

    threads = [threading.Thread(target=http_infer), threading.Thread(target=grpc_infer)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while b'edgeloop_inflight_requests{model="model",version="1"} 2' not in raw_request(server, "GET", "/metrics")[1]:
        assert time.monotonic() < deadline, "requests never reached the server"
        time.sleep(0.01)

    server.proc.terminate()
    while b'edgeloop_ready{model="model",version="1"} 0' not in raw_request(server, "GET", "/metrics")[1]:
        time.sleep(0.01)
    probe.request("GET", "/v2/health/ready")
    response = probe.getresponse()
    assert response.status == 503 and response.read() == b'{"ready":false}'
    assert response.getheader("Connection") == "close"
    response, body = raw_request(server, "POST", "/v2/models/model/infer", b'{"inputs": []}')
    assert response.status == 503 and b"shutting down" in body

    for thread in threads:
        thread.join(60)
    np.testing.assert_array_equal(results["http"], x)
    np.testing.assert_array_equal(results["grpc"], x)
    assert server.proc.wait(30) == 0
    assert "draining: 2 request(s) in flight" in server.output()
    assert "stopped; 0 request(s) left unfinished" in server.output()


def test_tls_for_https_and_grpc(mlp_path, tls_files, server_factory):
    context = ssl.create_default_context(cafile=str(tls_files.cert))
    server = server_factory(
        mlp_path, "--tls-cert", str(tls_files.cert), "--tls-key", str(tls_files.key), scheme="https", context=context
    )
    x = np.zeros((1, 64), np.float32)
    with httpclient.InferenceServerClient(
        server.http_url, ssl=True, ssl_context_factory=lambda: context, insecure=False
    ) as client:
        tensor = httpclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("model", [tensor]).as_numpy("logits").shape == (1, 10)
    with grpcclient.InferenceServerClient(
        f"localhost:{server.grpc_port}", ssl=True, root_certificates=str(tls_files.cert)
    ) as client:
        tensor = grpcclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("model", [tensor]).as_numpy("logits").shape == (1, 10)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        raw_request(server, "GET", "/v2/health/ready")  # plain HTTP to the TLS port is not answered

    sample = tls_files.cert.parent / "x.npy"
    np.save(sample, x)
    for protocol, port in (("http", server.http_port), ("grpc", server.grpc_port)):
        command = [
            sys.executable, "-m", "edgeloop.cli", "infer", "--url", f"localhost:{port}", "--protocol", protocol,
            "--model", "model", "--input", str(sample), "--ssl", "--ca-cert", str(tls_files.cert),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert '"label"' in result.stdout
