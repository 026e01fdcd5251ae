"""Accelerator classes and model formats on real nodes, through the chart as a user installs it (conftest's
real_release) on the session's real fleet (a GPU-labelled node without a GPU, an NPU-labelled node without an NPU):

- the npu class runs the openvino flavour, whose OpenVINO provider runs with device_type CPU in the NPU's stead
  (a chart value): the status says OpenVINOExecutionProvider is in use on the NPU node and Accelerated is True,
  and its answers match plain onnxruntime's;
- a tflite model is served by LiteRT and asked over HTTP and gRPC with tritonclient: the answers are LiteRT's own
  (this process's LiteRT: the same labels, probabilities within 1e-6);
- a FederatedRound of that tflite model is refused, with the reason.

The GPU-labelled node's proof (Degraded without fallback, the CPU fallback in status, events and `kubectl get im`)
is test_real_nodes.py's. Both models roll out at once (one wait for both)."""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml

from .conftest import RealRelease, wait_for
from .test_real_nodes import GROUP_LABEL, digits_inputs, grpc_infer, model_condition

ROOT = Path(__file__).parents[2]
EXAMPLE_MODEL = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
OPENVINO_IMAGE = "ghcr.io/edgeloop/runtime-openvino:0.1.0"
# OpenVINO's CPU plugin computes in FP32 with kernels of its own: its probabilities stay this close to ONNX
# Runtime's (the image's smoke run measured 3e-8 on the digits MLP).
OPENVINO_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


@dataclass
class Served:
    onnx: bytes
    tflite: bytes
    digests: dict[str, str]  # by InferenceModel name
    npu_nodes: list[str]


def inference_model(release: RealRelease, name: str, digest: str, accelerators: list[str], fmt: str) -> dict:
    model = json.loads(json.dumps(EXAMPLE_MODEL))
    model["metadata"] = {"name": name, "namespace": release.workload_namespace}
    model["spec"]["model"] = {"uri": release.model_uri(digest), "sha256": digest, "version": "1", "format": fmt}
    model["spec"]["placement"]["accelerators"] = accelerators
    model["spec"]["runtime"]["maxBatchSize"] = 8  # fewer batch sizes to warm up
    return model


@pytest.fixture(scope="module")
def served(real_release: RealRelease):
    """The digits MLP as ONNX on the npu class (the cpu class elsewhere) and, with the same weights, as tflite on
    the cpu class, applied at once; deleted afterwards (each node's one NPU is for the next module's models)."""
    import onnx
    from edgeloop_runtime.backends.tflite_mlp import mlp as tflite_mlp
    from edgeloop_runtime.federated.model import mlp
    from onnx import numpy_helper

    devcluster, namespace = real_release.devcluster, real_release.workload_namespace
    groups = {n["metadata"]["name"]: n["metadata"]["labels"][GROUP_LABEL]
              for n in devcluster.get_json("nodes")["items"]}
    onnx_model = mlp([64, 32, 10], seed=2)
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(onnx_model).graph.initializer}
    tflite_model = tflite_mlp([(weights[f"w{i}"], weights[f"b{i}"]) for i in range(2)], softmax=True)
    served = Served(onnx_model, tflite_model, {}, sorted(n for n, g in groups.items() if g == "edge-real-npu"))
    models = [("digits-tflite", tflite_model, ["cpu"], "tflite")]
    if served.npu_nodes:
        models.append(("digits-npu", onnx_model, ["npu", "cpu"], "onnx"))
    for name, content, accelerators, fmt in models:
        served.digests[name] = real_release.upload(content)
        body = inference_model(real_release, name, served.digests[name], accelerators, fmt)
        devcluster.kubectl("apply", "-f", "-", input=json.dumps(body))
    yield served
    devcluster.kubectl("delete", "inferencemodel", *served.digests, "-n", namespace, "--wait=true")
    selector = f"edgeloop.io/inferencemodel in ({','.join(served.digests)})"
    wait_for("the models' pods to be gone", lambda: not devcluster.get_json(
        "pods", "-n", namespace, "-l", selector)["items"], debug=lambda: real_release.debug(namespace))


def accelerated_column(release: RealRelease, name: str) -> str:
    """The ACCELERATED column of `kubectl get im` (the header MODEL VERSION is two words, its values one)."""
    table = release.devcluster.kubectl("get", "im", name, "-n", release.workload_namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "NODES", "MODEL", "VERSION", "ACCELERATED", "AGE"], table
    return table[1].split()[4]


def test_the_npu_class_runs_openvino_on_the_npu_node_and_the_status_says_so(real_release: RealRelease, served):
    if not served.npu_nodes:
        pytest.skip("this session's real fleet has no NPU node (EDGELOOP_E2E_REAL_FLEET=edge-real=1,edge-real-npu=1)")
    namespace, devcluster = real_release.workload_namespace, real_release.devcluster
    body = model_condition(real_release, "digits-npu", served.digests["digits-npu"], "Accelerated")
    assert any(c["type"] == "Ready" and c["status"] == "True" for c in body["status"]["conditions"]), body["status"]
    variants = {v["accelerator"]: v for v in body["status"]["variants"]}
    npu = variants["npu"]
    assert (npu["desired"], npu["ready"]) == (len(served.npu_nodes), len(served.npu_nodes))
    assert npu["providersInUse"] == ["OpenVINOExecutionProvider", "CPUExecutionProvider"], npu
    assert npu["providersReportedBy"] in served.npu_nodes
    accelerated = next(c for c in body["status"]["conditions"] if c["type"] == "Accelerated")
    assert (accelerated["reason"], accelerated["message"]) == (
        "AcceleratorsInUse", "npu: OpenVINOExecutionProvider, CPUExecutionProvider"), accelerated
    assert accelerated_column(real_release, "digits-npu") == "AcceleratorsInUse"

    # The pod on the NPU node runs the openvino flavour with the chart's provider options.
    [pod] = devcluster.get_json("pods", "-n", namespace, "-l",
                                "edgeloop.io/inferencemodel=digits-npu,edgeloop.io/accelerator=npu")["items"]
    assert pod["spec"]["nodeName"] == npu["providersReportedBy"]
    [runtime] = pod["spec"]["containers"]
    args = runtime["args"]
    assert runtime["image"] == OPENVINO_IMAGE
    options = json.loads(args[args.index("--provider-options") + 1])
    assert options == {"OpenVINOExecutionProvider": {"device_type": "CPU"}}, "the chart's value, as given"
    log = devcluster.kubectl("logs", "-n", namespace, pod["metadata"]["name"]).stdout
    assert "execution providers in use: OpenVINOExecutionProvider,CPUExecutionProvider" in log, log

    # tritonclient asks that pod (the Service is node-local: the host's Service traffic enters at node 0).
    inputs = digits_inputs()
    metadata, answer, _ = grpc_infer(real_release, "digits-npu", pod["status"]["podIP"], inputs)
    assert metadata["platform"] == "onnxruntime_onnx"
    session = ort.InferenceSession(served.onnx, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(answer, session.run(None, {"input": inputs})[0], **OPENVINO_TOLERANCE)


def litert_answers(model: bytes, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """LiteRT's own answer in this process: the reference for what the runtime serves."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], list(inputs.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], inputs)
    interpreter.invoke()
    return {out["name"]: interpreter.get_tensor(out["index"]) for out in interpreter.get_output_details()}


def http_infer(release: RealRelease, model: str, address: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """tritonclient over HTTPS, verifying the server's certificate for the Service's name; every output."""
    import tritonclient.http as httpclient

    ca = release.devcluster.nodes[0].dir / f"{model}-ca.crt"
    ca.write_bytes(release.secret(release.workload_namespace, f"{model}-tls", "ca.crt"))
    options = {"ca_certs": str(ca), "server_hostname": f"{model}.{release.workload_namespace}.svc"}
    with httpclient.InferenceServerClient(f"{address}:8000", ssl=True, ssl_options=options,
                                          ssl_context_factory=ssl.create_default_context) as client:
        metadata = client.get_model_metadata(model)
        [tensor] = metadata["inputs"]
        request = httpclient.InferInput(tensor["name"], list(inputs.shape), tensor["datatype"])
        request.set_data_from_numpy(inputs, binary_data=True)
        result = client.infer(model, [request])
        return {output["name"]: result.as_numpy(output["name"]) for output in metadata["outputs"]}


def test_a_tflite_model_serves_over_http_and_grpc_with_litert_s_own_answers(real_release: RealRelease, served):
    body = model_condition(real_release, "digits-tflite", served.digests["digits-tflite"], "Ready")
    [cpu] = body["status"]["variants"]
    assert (cpu["desired"], cpu["ready"]) == (len(real_release.devcluster.nodes),) * 2

    inputs = digits_inputs()
    reference = litert_answers(served.tflite, inputs)
    address = real_release.service_ip(real_release.workload_namespace, "digits-tflite")
    metadata, _, over_grpc = grpc_infer(real_release, "digits-tflite", address, inputs)
    assert metadata["platform"] == "litert_tflite"
    over_http = http_infer(real_release, "digits-tflite", address, inputs)
    assert sorted(over_grpc) == sorted(over_http) == sorted(reference) == ["label", "probabilities"]
    # The same LiteRT on the same CPU answers bitwise the same here; the image's LiteRT may be a newer release
    # than this process's, so the probabilities may differ in their last bits. The labels may not.
    for answer in over_grpc, over_http:
        np.testing.assert_array_equal(answer["label"], reference["label"])
        np.testing.assert_allclose(answer["probabilities"], reference["probabilities"], rtol=0, atol=1e-6)

    # What it runs on, as its runtime reports it: LiteRT on the CPU, and no accelerator is claimed.
    body = wait_for("the runtime to be asked what it runs on", lambda: (b := real_release.devcluster.get_json(
        "inferencemodel", "digits-tflite", "-n", real_release.workload_namespace)) and
        b["status"]["variants"][0]["providersInUse"] and b)
    assert body["status"]["variants"][0]["providersInUse"] == ["CPUExecutionProvider"]
    assert accelerated_column(real_release, "digits-tflite") == "NoAcceleratedNodes"


def test_a_federated_round_of_a_tflite_model_is_refused_with_the_reason(real_release: RealRelease, served):
    namespace, devcluster = real_release.workload_namespace, real_release.devcluster
    round_ = yaml.safe_load((ROOT / "examples" / "federatedround-digits.yaml").read_text())
    round_["metadata"] = {"name": "tflite-round", "namespace": namespace}
    round_["spec"]["modelRef"] = {"name": "digits-tflite"}
    clients = len(devcluster.nodes)  # enough nodes: the model is what stops it
    round_["spec"]["participants"] = {"nodeSelector": {"kubernetes.io/os": "linux"}, "minClients": clients,
                                      "maxClients": clients}
    devcluster.kubectl("apply", "-f", "-", input=json.dumps(round_))

    def failed():
        body = devcluster.get_json("federatedround", "tflite-round", "-n", namespace)
        return body.get("status", {}).get("phase") == "Failed" and body

    body = wait_for("the round to be refused", failed, debug=lambda: real_release.debug(namespace))
    conditions = {c["type"]: c for c in body["status"]["conditions"]}
    assert (conditions["Started"]["status"], conditions["Started"]["reason"]) == ("False", "UnsupportedModelFormat")
    assert "InferenceModel digits-tflite serves a tflite model" in conditions["Succeeded"]["message"]
    assert not devcluster.get_json("jobs", "-n", namespace, "-l", "edgeloop.io/federatedround=tflite-round")["items"]
    devcluster.kubectl("delete", "federatedround", "tflite-round", "-n", namespace)
