"""Triton's extensions as tritonclient uses them against the real server: system shared memory (HTTP and gRPC,
with tritonclient.utils.shared_memory), ModelStreamInfer (start_stream), NaN and Infinity in JSON, statistics
counted as Triton counts them, and the protocol's small points (scalar parameters, no empty id)."""

from __future__ import annotations

import json
import os
import queue
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from conftest import memory_mb, mlp_reference, raw_request, save, start_server
from onnx import TensorProto, helper
from tritonclient.utils import InferenceServerException

CLIENTS = {"http": httpclient, "grpc": grpcclient}


@pytest.fixture(scope="module")
def server(mlp_path, tmp_path_factory):
    server = start_server(
        mlp_path, "--shared-memory-dir", "/dev/shm", "--max-shm-regions", "8", log_dir=tmp_path_factory.mktemp("logs")
    )
    yield server
    assert server.stop() == 0, server.output()


def client_for(server, protocol):
    module = CLIENTS[protocol]
    return module, module.InferenceServerClient(server.http_url if protocol == "http" else server.grpc_url)


@pytest.fixture
def regions(server):
    """Creates POSIX shm objects as a client does; at teardown, unregisters every region and destroys them."""
    made = []

    def make(size: int):
        name = f"edgeloop-test-{uuid.uuid4().hex[:12]}"
        made.append(shm.create_shared_memory_region(name, f"/{name}", size))
        return name, made[-1]

    yield make
    with httpclient.InferenceServerClient(server.http_url) as client:
        client.unregister_system_shared_memory()
    for handle in made:
        shm.destroy_shared_memory_region(handle)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_inputs_and_outputs_through_system_shared_memory(server, mlp_path, regions, protocol):
    module, client = client_for(server, protocol)
    x = np.random.default_rng(5).normal(size=(3, 64)).astype(np.float32)
    logits, label = mlp_reference(mlp_path, x)
    input_name, input_region = regions(x.nbytes)
    output_name, output_region = regions(logits.nbytes + label.nbytes + 64)
    shm.set_shared_memory_region(input_region, [x])
    client.unregister_system_shared_memory()
    client.register_system_shared_memory(input_name, f"/{input_name}", x.nbytes)
    client.register_system_shared_memory(output_name, f"/{output_name}", logits.nbytes + label.nbytes + 64)
    status = client.get_system_shared_memory_status(**({"as_json": True} if protocol == "grpc" else {}))
    names = sorted(status["regions"]) if protocol == "grpc" else sorted(r["name"] for r in status)
    assert names == sorted([input_name, output_name])

    tensor = module.InferInput("input", list(x.shape), "FP32")
    tensor.set_shared_memory(input_name, x.nbytes)
    outputs = [module.InferRequestedOutput("logits"), module.InferRequestedOutput("label")]
    outputs[0].set_shared_memory(output_name, logits.nbytes)
    outputs[1].set_shared_memory(output_name, label.nbytes, offset=logits.nbytes)
    result = client.infer("model", [tensor], outputs=outputs)
    output = result.get_output("logits")  # a dict over HTTP, a protobuf message over gRPC
    shape, data = (output["shape"], output.get("data")) if protocol == "http" else (list(output.shape), None)
    assert shape == [3, 10] and data is None, "the data is in shared memory"
    got_logits = shm.get_contents_as_numpy(output_region, np.float32, [3, 10])
    got_label = shm.get_contents_as_numpy(output_region, np.int64, [3], offset=logits.nbytes)
    np.testing.assert_allclose(got_logits, logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got_label, label)

    client.unregister_system_shared_memory(input_name)
    with pytest.raises(InferenceServerException, match=f"unable to find system shared memory region '{input_name}'"):
        client.infer("model", [tensor])
    client.close()


@pytest.mark.parametrize(
    ("key", "size", "offset", "message"),
    [
        ("/../../etc/passwd", 4, 0, "is not the name of a POSIX shm object"),
        ("/etc/passwd", 4, 0, "is not the name of a POSIX shm object"),
        ("/edgeloop-test-missing", 4, 0, "cannot open shared memory key"),
        (None, 1 << 20, 0, "go past the"),
        (None, 64, 1 << 20, "go past the"),
    ],
    ids=["traversal", "absolute-path", "missing", "too-big", "offset-beyond"],
)
def test_a_region_out_of_bounds_or_outside_shm_is_refused(server, regions, key, size, offset, message):
    name, _ = regions(256)
    with httpclient.InferenceServerClient(server.http_url) as client:
        with pytest.raises(InferenceServerException, match=message) as error:
            client.register_system_shared_memory("r", key or f"/{name}", size, offset=offset)
        assert error.value.status() == "400"
        assert client.get_system_shared_memory_status() == []


def test_a_symlink_in_the_shm_directory_is_not_followed(server, regions):
    link = f"edgeloop-test-link-{uuid.uuid4().hex[:8]}"
    os.symlink("/etc/hostname", f"/dev/shm/{link}")
    try:
        with (
            httpclient.InferenceServerClient(server.http_url) as client,
            pytest.raises(InferenceServerException, match="cannot open shared memory key"),
        ):
            client.register_system_shared_memory("link", f"/{link}", 4)
    finally:
        os.unlink(f"/dev/shm/{link}")


def test_a_tensor_beyond_its_region_and_a_region_shrunk_later_are_errors(server, mlp_path, regions):
    name, _ = regions(256)  # 64 FP32 values: a batch of one
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.register_system_shared_memory(name, f"/{name}", 256)
        tensor = grpcclient.InferInput("input", [2, 64], "FP32")
        tensor.set_shared_memory(name, 512)
        with pytest.raises(InferenceServerException, match="do not fit shared memory region") as error:
            client.infer("model", [tensor])
        assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
        os.truncate(f"/dev/shm/{name}", 16)  # the client shrinks its object: no SIGBUS, an error
        tensor = grpcclient.InferInput("input", [1, 64], "FP32")
        tensor.set_shared_memory(name, 256)
        with pytest.raises(InferenceServerException, match="holds fewer bytes than registered"):
            client.infer("model", [tensor])
    assert server.proc.poll() is None


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_numeric_input_larger_than_its_shape_is_refused_before_it_is_read(
    mlp_path, server_factory, regions, protocol
):
    """An input of shape [1, 64] (256 bytes) naming 200 MiB of a 1 GiB object: the server once read the 200 MiB
    (0.65 s of its event loop, 200 MB of memory) before comparing them with the shape."""
    server = server_factory(mlp_path, "--shared-memory-dir", "/dev/shm")  # its own: its peak memory is this case's
    module, client = client_for(server, protocol)
    name, _ = regions(1 << 30)  # sparse: no memory until written
    before = memory_mb(server.proc.pid)[1]
    with client:
        client.register_system_shared_memory(name, f"/{name}", 1 << 30)
        tensor = module.InferInput("input", [1, 64], "FP32")
        tensor.set_shared_memory(name, 200 << 20)
        with pytest.raises(InferenceServerException, match="has 209715200 bytes of data, shape \\[1, 64\\] of FP32"):
            client.infer("model", [tensor])
    assert memory_mb(server.proc.pid)[1] - before < 16


def test_regions_are_capped(server, regions):
    with httpclient.InferenceServerClient(server.http_url) as client:
        names = [regions(64)[0] for _ in range(9)]
        for name in names[:8]:
            client.register_system_shared_memory(name, f"/{name}", 64)
        with pytest.raises(InferenceServerException, match="--max-shm-regions") as error:
            client.register_system_shared_memory(names[8], f"/{names[8]}", 64)
        assert error.value.status() == "413"


def test_shared_memory_is_off_unless_a_directory_is_given(mlp_server):
    with httpclient.InferenceServerClient(mlp_server.http_url) as client:
        assert "system_shared_memory" not in client.get_server_metadata()["extensions"]
        with pytest.raises(InferenceServerException, match="--shared-memory-dir"):
            client.register_system_shared_memory("r", "/anything", 4)
    with grpcclient.InferenceServerClient(mlp_server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="--shared-memory-dir") as error:
            client.register_system_shared_memory("r", "/anything", 4)
        assert error.value.status() == "StatusCode.UNIMPLEMENTED"
        client.unregister_cuda_shared_memory()  # nothing to do, no error (perf_analyzer calls it)
        assert client.get_cuda_shared_memory_status(as_json=True) == {}


def test_stream_infer_answers_each_request_in_order_with_errors_per_request(server, mlp_path):
    answers: queue.Queue = queue.Queue()
    rng = np.random.default_rng(9)
    inputs = [rng.normal(size=(1 + i % 3, 64)).astype(np.float32) for i in range(12)]
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for index, x in enumerate(inputs):
            tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            client.async_stream_infer("model", [tensor], request_id=str(index))
            if index == 5:  # a bad request in the middle: its own error, the stream goes on
                bad = grpcclient.InferInput("input", [1, 65], "FP32")
                bad.set_data_from_numpy(np.zeros((1, 65), np.float32))
                client.async_stream_infer("model", [bad], request_id="bad")
        got = [answers.get(timeout=10) for _ in range(len(inputs) + 1)]
        client.stop_stream()
    errors = [error for _, error in got if error is not None]
    assert len(errors) == 1 and "has shape [1, 65]" in errors[0].message()
    results = [result for result, error in got if error is None]
    assert [r.get_response().id for r in results] == [str(i) for i in range(len(inputs))], "answered in order"
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result.as_numpy("label"), mlp_reference(mlp_path, x)[1])


@pytest.fixture(scope="module")
def identity_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("identity")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    server = start_server(save(helper.make_model(graph), directory / "identity.onnx"), log_dir=directory)
    yield server
    assert server.stop() == 0, server.output()


def test_nan_and_infinity_in_json_go_in_and_come_out_as_triton_writes_them(identity_server):
    body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [NaN, Infinity, -Infinity, 1.5]}]}'
    response, data = raw_request(identity_server, "POST", "/v2/models/model/infer", body)
    assert response.status == 200, data
    assert b'"data":[NaN, Infinity, -Infinity, 1.5]' in data
    y = json.loads(data)["outputs"][0]["data"]  # Python's json reads what Triton writes
    assert np.isnan(y[0]) and y[1:] == [float("inf"), float("-inf"), 1.5]
    response, data = raw_request(identity_server, "POST", "/v2/models/model/infer", b'{"inputs": [NaN')
    assert response.status == 400 and b"malformed JSON" in data


def test_statistics_count_per_request_as_triton_does(identity_server):
    with httpclient.InferenceServerClient(identity_server.http_url) as client:
        before = client.get_inference_statistics("model")["model_stats"][0]
        tensor = httpclient.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(np.ones((2, 4), np.float32))
        for _ in range(5):
            client.infer("model", [tensor])
        after = client.get_inference_statistics("model")["model_stats"][0]
    stats = {k: {f: v[f] - before["inference_stats"][k][f] for f in v} for k, v in after["inference_stats"].items()}
    assert after["inference_count"] - before["inference_count"] == 10  # samples
    for kind in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[kind]["count"] == 5, kind  # per request, as in Triton
    parts = sum(stats[k]["ns"] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert 0 < parts <= stats["success"]["ns"], "the parts of a request fit in its duration"
    batch = next(b for b in after["batch_stats"] if b["batch_size"] == 2)
    assert {"compute_input", "compute_infer", "compute_output"} <= set(batch)


def test_scalar_parameters_and_no_empty_id(mlp_server):
    with httpclient.InferenceServerClient(mlp_server.http_url) as client:
        parameters = client.get_model_metadata("model")["parameters"]
        assert all(isinstance(v, str) for v in parameters.values()), parameters
        assert parameters["execution_providers"] == "CPUExecutionProvider"  # CONTRACTS C2
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]})
    for request in (body, body.replace('{"inputs"', '{"id": "", "inputs"')):
        _, data = raw_request(mlp_server, "POST", "/v2/models/model/infer", request.encode())
        assert "id" not in json.loads(data)
    with grpcclient.InferenceServerClient(mlp_server.grpc_url) as client:
        tensor = grpcclient.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
        assert "id" not in client.infer("model", [tensor]).get_response(as_json=True)
