"""`serve`'s model and backend flags (C1) and its startup: warm-up before readiness, instances, provider options,
and the backend seam (ONNX Runtime's specifics, a flavour without a library)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from conftest import free_port, raw_request, serve_command
from edgeloop_runtime.backends import CPU, KIND_CPU, KIND_GPU, LoadOptions, ModelLoadError, check_in_use
from edgeloop_runtime.backends import onnxruntime as ort_backend


def run_serve(*args: str) -> subprocess.CompletedProcess:
    """Runs serve expecting it to refuse to start."""
    command = serve_command("--host", "127.0.0.1", "--http-port", str(free_port()), "--grpc-port", "0", *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_liveness_answers_at_once_and_readiness_waits_for_the_warm_up(slow_path, tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    # Warming the slow model up at 1, 2, 4, ..., 512 rows takes about a second.
    command = serve_command("--model-path", str(slow_path), "--host", "127.0.0.1", "--http-port", str(port),
                            "--grpc-port", "0", "--max-batch-size", "512", "--model-instances", "1")  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        seen = []
        while time.monotonic() < deadline:
            try:
                live, ready = get(port, "/v2/health/live")[0], get(port, "/v2/health/ready")[0]
            except OSError:
                time.sleep(0.02)
                continue
            seen.append((live, ready))
            if ready == 200:
                break
            if len(seen) == 1:
                body = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1024],
                                               "data": [0.0] * 1024}]}).encode()  # fmt: skip
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/model/infer", body)
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(request, timeout=5)
                assert refused.value.code == 503 and b"warming up" in refused.value.read()
        assert seen[0] == (200, 503), seen
        assert seen[-1] == (200, 200), seen
        output = log.read_text()
        assert "batch sizes 1,2,4,8,16,32,64,128,256,512" in output
        assert "ready: warm-up of batch sizes 1,2,4,8,16,32,64,128,256,512 took" in output
        metrics = get(port, "/metrics")[1].decode()
        [warmup] = [line for line in metrics.splitlines() if line.startswith("edgeloop_warmup_seconds{")]
        assert float(warmup.split()[-1]) > 0
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_config_reports_instances_kind_and_the_allowed_batch_sizes(mlp_path, server_factory):
    server = server_factory(mlp_path, "--model-instances", "3", "--max-batch-size", "12", "--batch-sizes", "1,6,12")
    with httpclient.InferenceServerClient(server.http_url) as client:
        config = client.get_model_config("model")
        assert config["instance_group"] == [{"name": "model", "count": 3, "kind": "KIND_CPU"}]
        assert config["dynamic_batching"]["preferred_batch_size"] == [1, 6, 12]
        assert config["backend"] == "onnxruntime"
        x = np.zeros((5, 64), np.float32)
        tensor = httpclient.InferInput("input", [5, 64], "FP32")
        tensor.set_data_from_numpy(x)
        assert client.infer("model", [tensor]).as_numpy("logits").shape == (5, 10)  # padded to 6, cut back
    _, stats = raw_request(server, "GET", "/v2/models/model/stats")
    assert b'"execution_count":' in stats
    assert "3 instance(s) of 1 thread(s); batch sizes 1,6,12" in server.output()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--provider-options", "{not json"], "--provider-options: not JSON"),
        (["--provider-options", '{"CPUExecutionProvider": {"arena": 1}}'], 'options are strings (write "1")'),
        (["--provider-options", '["CPUExecutionProvider"]'], "expected {"),
        (
            ["--provider-options", '{"CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"}}'],
            "--provider-options names ['CUDAExecutionProvider'], which --execution-providers (CPUExecutionProvider)",
        ),
        (["--batch-sizes", "1,2,4"], "--batch-sizes: batch sizes [1, 2, 4] must be within 1..8 and include"),
        (["--batch-sizes", "1,x"], "expected comma-separated integers"),
        (["--max-batch-size", "0", "--batch-sizes", "1"], "--batch-sizes needs dynamic batching"),
        (["--max-batch-size", "100000"], "--max-batch-size must be within 0..4096"),
        (["--model-instances", "1000"], "--model-instances must be within 0..256"),
        (["--format", "pickle"], "invalid choice: 'pickle'"),
    ],
)
def test_bad_model_and_backend_flags_exit_2_with_a_clear_message(mlp_path, args, message):
    result = run_serve("--model-path", str(mlp_path), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_an_image_without_the_formats_library_says_which_image_it_needs(mlp_path):
    # What a LiteRT-only flavour would do with an ONNX model: onnxruntime cannot be imported.
    blocked = "import sys; sys.modules['onnxruntime'] = None; from edgeloop_runtime.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", blocked, "serve", "--model-path", str(mlp_path), "--grpc-port", "0",
               "--http-port", str(free_port()), "--host", "127.0.0.1"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "this runtime image cannot serve onnx models" in result.stderr
    assert "the image needs onnxruntime" in result.stderr


def test_compiled_artefacts_go_under_the_models_compiled_cache_unless_set(tmp_path: Path):
    options = LoadOptions(
        provider_options={"OpenVINOExecutionProvider": {"device_type": "NPU"}}, compiled_cache=tmp_path / "abc"
    )
    providers = ["OpenVINOExecutionProvider", "TensorrtExecutionProvider", CPU]
    openvino, tensorrt, cpu = ort_backend.provider_options(providers, options)
    assert openvino == {"device_type": "NPU", "cache_dir": str(tmp_path / "abc" / "openvino")}
    assert tensorrt["trt_engine_cache_path"] == str(tmp_path / "abc" / "tensorrt")
    assert tensorrt["trt_engine_cache_enable"] == "True"
    assert cpu == {}
    chosen = LoadOptions(
        provider_options={"OpenVINOExecutionProvider": {"cache_dir": "/mine"}}, compiled_cache=tmp_path
    )
    assert ort_backend.provider_options(["OpenVINOExecutionProvider"], chosen) == [{"cache_dir": "/mine"}]
    assert ort_backend.provider_options(["OpenVINOExecutionProvider"], LoadOptions()) == [{}]


def test_device_kind_follows_the_first_provider_in_use():
    npu = LoadOptions(provider_options={"OpenVINOExecutionProvider": {"device_type": "NPU"}})
    assert ort_backend.device_kind(["CUDAExecutionProvider", CPU], LoadOptions()) == KIND_GPU
    assert ort_backend.device_kind(["OpenVINOExecutionProvider", CPU], npu) == KIND_GPU
    assert ort_backend.device_kind(["OpenVINOExecutionProvider", CPU], LoadOptions()) == KIND_CPU
    assert ort_backend.device_kind([CPU], LoadOptions()) == KIND_CPU


def test_openvinos_silent_drop_to_cpu_is_refused_unless_fallback_is_allowed():
    # OpenVINO asked for an NPU it cannot open logs an error and leaves the session on CPU only.
    requested = ["OpenVINOExecutionProvider"]
    with pytest.raises(ModelLoadError, match=r"\['OpenVINOExecutionProvider'\] failed to initialise"):
        check_in_use(requested, [CPU], allow_cpu_fallback=False)
    check_in_use([*requested, CPU], [CPU], allow_cpu_fallback=True)
    check_in_use(requested, ["OpenVINOExecutionProvider", CPU], allow_cpu_fallback=False)
