"""Real nodes: kubelet, kube-proxy and containerd running the images `make images` built, with no registry.

A cluster of real nodes only (`e2e-real`; the session's kwok cluster keeps its fleet of six), and one story
through it, in file order: pods get Services and DNS; the Helm chart runs the operator as a real pod; an
InferenceModel's pods fetch a model from the chart's store, verify and serve it, and tritonclient reaches them
through the Service; a FederatedRound trains on datasets in the nodes' data paths, aggregates securely,
publishes and promotes; the model then rolls to the new sha256 and serves it.

It runs on the session's cluster of real nodes (conftest's real_devcluster: a GPU-labelled node without a GPU and
an NPU-labelled node without an NPU; secure aggregation needs two clients to hide anything) and the chart as
conftest's real_release installs it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from edgeloop import config, testing
from edgeloop.testing import logged_errors

from devcluster import nodes

from .conftest import RealRelease, wait_for

ROOT = Path(__file__).parents[2]
RUNTIME_IMAGE = config.build().runtime_image
GROUP_LABEL = "edgeloop.io/node-group"
# What each real group is labelled and equipped as (devcluster's default fleet), without the device itself.
DEVICES = {"edge-real": "nvidia.com/gpu", "edge-real-npu": "npu.intel.com/accel"}


class Story:
    """What the tests of this module share, in file order."""

    def __init__(self, release: RealRelease, real: list[nodes.RealNode]):
        self.release, self.devcluster, self.real = release, release.devcluster, real
        self.namespace = release.workload_namespace
        groups = {n["metadata"]["name"]: n["metadata"]["labels"][GROUP_LABEL]
                  for n in self.devcluster.get_json("nodes")["items"]}
        self.gpu_nodes = [node.name for node in real if groups[node.name] == "edge-real"]
        self.npu_nodes = [node.name for node in real if groups[node.name] == "edge-real-npu"]
        self.model_v1: bytes = b""

    def debug(self, namespace: str | None = None) -> str:
        return self.release.debug(namespace or self.namespace)


@pytest.fixture(scope="module")
def story(real_release: RealRelease) -> Story:
    """The story's model, digits, stays served after it; test_real_nodes_observability.py deletes it."""
    return Story(real_release, list(real_release.devcluster.nodes))


def write_digits(real: list[nodes.RealNode], namespace: str) -> None:
    """Each node's own share of digits in its data path (the node contract's
    /var/lib/edgeloop/data/<namespace>/<dataset>)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    for node in real:
        data = node.host_path / "data" / namespace / "digits"
        data.mkdir(parents=True, exist_ok=True)
        part = slice(node.index, None, len(real))
        np.savez(data / "digits.npz", x=(x[part] / 16).astype(np.float32), y=y[part])


def run_pod(story: Story, namespace: str, name: str, script: str, node: str) -> str:
    """Run `script` with the runtime image's Python on `node`; its output once it succeeded."""
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeName": node, "restartPolicy": "Never",
            "containers": [{"name": "main", "image": RUNTIME_IMAGE, "command": ["python", "-c", script]}],
        },
    }
    story.devcluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    wait_for(f"pod {name} to succeed", lambda: story.devcluster.get_json("pod", name, "-n", namespace)["status"]
             .get("phase") in ("Succeeded", "Failed"), timeout=180, debug=lambda: story.debug(namespace))
    logs = story.devcluster.kubectl("logs", name, "-n", namespace).stdout
    assert story.devcluster.get_json("pod", name, "-n", namespace)["status"]["phase"] == "Succeeded", logs
    return logs


def test_pods_on_real_nodes_reach_services_by_name(story: Story):
    """Pods get addresses from the CNI, Service names resolve through CoreDNS, and kube-proxy routes the
    `kubernetes` Service to the apiserver."""
    devcluster = story.devcluster
    nodes_json = devcluster.get_json("nodes")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes_json) == [node.name for node in story.real]
    for node in nodes_json:
        assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
        device = DEVICES[node["metadata"]["labels"][GROUP_LABEL]]
        assert node["status"]["allocatable"][device] == "1", "the fleet's GPU or NPU capacity is advertised"
    devcluster.kubectl("create", "namespace", "probe")
    script = (
        "import socket, ssl\n"
        "address = socket.gethostbyname('kubernetes.default.svc.cluster.local')\n"
        "with socket.create_connection(('kubernetes.default', 443), timeout=10) as raw:\n"
        "    context = ssl.create_default_context(cafile='/var/run/secrets/kubernetes.io/serviceaccount/ca.crt')\n"
        "    with context.wrap_socket(raw, server_hostname='kubernetes.default.svc') as tls:\n"
        "        print(address, tls.version())\n"
    )
    for node in story.real:
        out = run_pod(story, "probe", f"dns-{node.index}", script, node.name)
        address, version = out.split()
        assert address == node.network.service_ip and version.startswith("TLS")


def test_the_chart_runs_the_operator_and_the_store_as_real_pods(story: Story):
    devcluster, release = story.devcluster, story.release
    pods = devcluster.get_json("pods", "-n", release.namespace)["items"]
    images = {c["image"] for pod in pods for c in pod["spec"]["containers"]}
    assert images == {"ghcr.io/edgeloop/operator:0.1.0", RUNTIME_IMAGE}, "the chart's default images, built here"
    assert all(p["status"]["phase"] == "Running" and all(c["ready"] for c in p["status"]["containerStatuses"])
               for p in pods), story.debug(release.namespace)
    operator_log = devcluster.kubectl("logs", "-n", release.namespace, f"deployment/{release.name}-operator").stdout
    assert not logged_errors(operator_log.splitlines()), operator_log[-3000:]


def test_the_stores_blobs_outlive_its_pod_on_the_charts_default_local_path_volume(story: Story):
    """The chart's default persistence, as on k3s: the store's PVC gets the default StorageClass (local-path),
    whose volume lives on the disk of the node the store runs on; a blob uploaded before the store's pod is
    deleted is served, whole, by its replacement."""
    devcluster, release = story.devcluster, story.release
    namespace, store = release.namespace, f"{release.name}-store"
    pvc = devcluster.get_json("pvc", store, "-n", namespace)
    assert (pvc["spec"]["storageClassName"], pvc["status"]["phase"]) == ("local-path", "Bound"), pvc
    pv = devcluster.get_json("pv", pvc["spec"]["volumeName"])
    [term] = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert term["matchExpressions"][0]["values"] == [story.real[0].name], "on the store's node's own disk"

    blob = np.random.default_rng(7).bytes(3 << 20)
    digest = release.upload(blob)
    selector = "app.kubernetes.io/component=store"
    [old] = devcluster.get_json("pods", "-n", namespace, "-l", selector)["items"]
    devcluster.kubectl("delete", "pod", old["metadata"]["name"], "-n", namespace)

    def replaced() -> bool:
        pods = devcluster.get_json("pods", "-n", namespace, "-l", selector)["items"]
        return any(p["metadata"]["uid"] != old["metadata"]["uid"] and not p["metadata"].get("deletionTimestamp")
                   and all(c["ready"] for c in p["status"].get("containerStatuses", [{"ready": False}]))
                   for p in pods)

    wait_for("a new store pod, ready", replaced, timeout=180, debug=lambda: story.debug(namespace))

    def served() -> bytes | None:  # once the Service's endpoints name the new pod
        try:
            return release.download(digest)
        except (OSError, AssertionError):
            return None

    assert hashlib.sha256(wait_for("the blob from the new pod", served, timeout=60)).hexdigest() == digest


def digits_inputs() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().data[:8] / 16).astype(np.float32)


def infer(story: Story, inputs: np.ndarray) -> tuple[dict, np.ndarray]:
    """tritonclient over gRPC with TLS, through the model's Service (ClusterIP; the host routes Services
    through the first node's kube-proxy), verifying the server's certificate for the Service's name."""
    return grpc_infer(story.release, "digits", story.release.service_ip(story.namespace, "digits"), inputs)[:2]


def grpc_infer(release: RealRelease, model: str, address: str, inputs: np.ndarray) -> tuple[dict, np.ndarray, dict]:
    """Ask `model` at `address` (its Service's ClusterIP or a pod's IP) with tritonclient over gRPC and TLS,
    verifying the server's certificate for the Service's name; its metadata, first output and every output."""
    import tritonclient.grpc as grpcclient

    ca = release.devcluster.nodes[0].dir / f"{model}-ca.crt"
    ca.write_bytes(release.secret(release.workload_namespace, f"{model}-tls", "ca.crt"))
    client = grpcclient.InferenceServerClient(
        f"{address}:8001", ssl=True, root_certificates=str(ca),
        channel_args=[("grpc.ssl_target_name_override", f"{model}.{release.workload_namespace}.svc")],
    )
    try:
        assert client.is_server_ready() and client.is_model_ready(model)
        metadata = client.get_model_metadata(model, as_json=True)
        [tensor] = metadata["inputs"]
        request = grpcclient.InferInput(tensor["name"], list(inputs.shape), tensor["datatype"])
        request.set_data_from_numpy(inputs)
        result = client.infer(model, [request])
        outputs = {output["name"]: result.as_numpy(output["name"]) for output in metadata["outputs"]}
        return metadata, outputs[metadata["outputs"][0]["name"]], outputs
    finally:
        client.close()


def expected(model: bytes, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def model_condition(release: RealRelease, name: str, sha256: str, condition: str, status: str = "True") -> dict:
    """Wait until InferenceModel `name` has observed its spec, rendered `sha256` and `condition` has `status`."""
    def reached():
        body = release.devcluster.get_json("inferencemodel", name, "-n", release.workload_namespace)
        current = body.get("status", {})
        met = any(c["type"] == condition and c["status"] == status for c in current.get("conditions", []))
        return met and current.get("observedGeneration") == body["metadata"]["generation"] \
            and current.get("model", {}).get("sha256") == sha256 and body

    return wait_for(f"InferenceModel {name} to be {condition}={status} with {sha256[:12]}", reached, timeout=300,
                    debug=lambda: release.debug(release.workload_namespace))


def test_an_inferencemodel_serves_on_real_nodes_through_its_service(story: Story):
    from edgeloop_runtime.federated.model import mlp

    release, namespace = story.release, story.namespace
    if not story.gpu_nodes:
        pytest.skip("this session's real fleet has no GPU-labelled node (EDGELOOP_E2E_REAL_FLEET)")
    story.model_v1 = mlp([64, 32, 10], seed=0)
    digest = release.upload(story.model_v1)
    model = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
    model["metadata"]["namespace"] = namespace
    model["spec"]["model"] = {"uri": release.model_uri(digest), "sha256": digest, "version": "1"}
    story.devcluster.kubectl("apply", "-f", "-", input=json.dumps(model))

    # The GPU-labelled node is labelled and equipped as a GPU node, without a GPU. By default a node that claims an
    # accelerator it cannot use fails loudly, and the status says why...
    body = model_condition(release, "digits", digest, "Degraded")
    degraded = next(c for c in body["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "RuntimeFailed", degraded
    assert "['CUDAExecutionProvider'] are not available" in degraded["message"], degraded
    # ...and with the gpu class's allowCpuFallback (a chart value) ONNX Runtime falls back to its CPU provider.
    release.helm("upgrade", release.name, str(ROOT / "charts" / "edgeloop"), "--namespace", release.namespace,
                 "--reuse-values", "--set", "config.acceleratorClasses.gpu.allowCpuFallback=true",
                 "--wait", "--timeout", "300s")
    body = model_condition(release, "digits", digest, "Ready")

    variants = {v["accelerator"]: v for v in body["status"]["variants"]}
    assert variants["gpu"]["ready"] == len(story.gpu_nodes), body["status"]
    assert variants["npu"]["ready"] == len(story.npu_nodes), body["status"]
    pods = story.devcluster.get_json("pods", "-n", namespace, "-l", "edgeloop.io/accelerator=gpu")["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == story.gpu_nodes
    log = story.devcluster.kubectl("logs", "-n", namespace, pods[0]["metadata"]["name"]).stdout
    assert f"(sha256 {digest})" in log and "execution providers in use: CPUExecutionProvider" in log, log

    # The status tells the truth about the fallback: what the runtime itself reports it runs on, the
    # Accelerated condition, a Warning event and the column of `kubectl get im`; the model stays Ready. The npu
    # variant, beside it, runs on OpenVINO (test_real_accelerators.py proves it further).
    def sampled():
        b = story.devcluster.get_json("inferencemodel", "digits", "-n", namespace)
        fallback = any(c["type"] == "Accelerated" and c["reason"] == "CPUFallback" for c in b["status"]["conditions"])
        return fallback and all(v["providersInUse"] for v in b["status"]["variants"] if v["desired"]) and b

    body = wait_for("the CPU fallback in the status", sampled, timeout=120, debug=story.debug)
    variants = {v["accelerator"]: v for v in body["status"]["variants"]}
    gpu = variants["gpu"]
    assert gpu["providersInUse"] == ["CPUExecutionProvider"], gpu
    assert gpu["providersReportedBy"] in story.gpu_nodes
    if story.npu_nodes:
        assert variants["npu"]["providersInUse"] == ["OpenVINOExecutionProvider", "CPUExecutionProvider"], variants
        assert variants["npu"]["providersReportedBy"] in story.npu_nodes
    accelerated = next(c for c in body["status"]["conditions"] if c["type"] == "Accelerated")
    assert accelerated["status"] == "False"
    assert accelerated["message"] == (
        f"the gpu variant runs on CPUExecutionProvider without CUDAExecutionProvider on node "
        f"{gpu['providersReportedBy']} (its runtime asked, 1 of its {len(story.gpu_nodes)} nodes)"), accelerated
    events = story.devcluster.get_json("events", "-n", namespace, "--field-selector",
                                       "involvedObject.kind=InferenceModel,reason=CPUFallback")["items"]
    assert [e["type"] for e in events] == ["Warning"], events
    table = story.devcluster.kubectl("get", "im", "digits", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "NODES", "MODEL", "VERSION", "ACCELERATED", "AGE"], table
    nodes_ready = f"{len(story.real)}/{len(story.real)}"
    assert table[1].split()[:5] == ["digits", "True", nodes_ready, "1", "CPUFallback"], table
    health = testing.argocd_health(testing.ARGOCD_HEALTH / "InferenceModel" / "health.lua", body)
    assert health["status"] == "Healthy" and "CPUFallback" in health["message"], health
    testing.capture_argocd_testdata("InferenceModel", "cpu-fallback", body)
    # The fetcher verified the model into the node's own cache, in the namespace's directory of it.
    for node in story.real:
        assert (node.host_path / "models" / namespace / "sha256" / digest).read_bytes() == story.model_v1

    inputs = digits_inputs()
    metadata, outputs = infer(story, inputs)
    assert metadata["name"] == "digits" and metadata["versions"] == ["1"]
    np.testing.assert_allclose(outputs, expected(story.model_v1, inputs), rtol=1e-5, atol=1e-6)


def test_a_federated_round_on_real_nodes_trains_promotes_and_rolls_the_model(story: Story):
    from sklearn.datasets import load_digits

    namespace = story.namespace
    if not story.model_v1:
        pytest.skip("the model was not served (see the test before)")
    write_digits(story.real, namespace)

    round_ = yaml.safe_load((ROOT / "examples" / "federatedround-digits.yaml").read_text())
    round_["metadata"]["namespace"] = namespace
    spec = round_["spec"]
    # Every real node, whatever its accelerator: training runs on the CPU.
    spec["participants"] = {"nodeSelector": {"kubernetes.io/os": "linux"},
                            "minClients": len(story.real), "maxClients": len(story.real)}
    spec["training"]["rounds"] = 3
    spec["promote"]["minAccuracy"] = 0.8
    spec["runtime"]["resources"]["requests"] = {"cpu": "100m", "memory": "128Mi"}
    story.devcluster.kubectl("apply", "-f", "-", input=json.dumps(round_))
    name = round_["metadata"]["name"]

    def finished():
        body = story.devcluster.get_json("federatedround", name, "-n", namespace)
        conditions = {c["type"]: c for c in body.get("status", {}).get("conditions", [])}
        return conditions.get("Promoted", {}).get("status") in ("True", "False") and body

    body = wait_for("the round to train, aggregate and promote", finished, timeout=600, debug=story.debug)
    status = body["status"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Succeeded"] == ("True", "Trained") and conditions["Promoted"] == ("True", "Promoted"), status
    assert status["participants"]["nodes"] == [node.name for node in story.real]
    assert status["participants"]["reported"] == len(story.real)
    assert status["metrics"]["accuracy"] >= 0.8 > status["baseline"]["accuracy"]
    trained = status["result"]["sha256"]
    client_pods = story.devcluster.get_json("pods", "-n", namespace, "-l", "edgeloop.io/role=client")["items"]
    assert sorted(p["spec"]["nodeName"] for p in client_pods) == [n.name for n in story.real]

    # The model rolls to the published sha256, each node fetches and verifies it, and serves it.
    body = model_condition(story.release, "digits", trained, "Ready")
    assert body["spec"]["model"]["version"] == "2"
    for node in story.real:
        model_v2 = (node.host_path / "models" / namespace / "sha256" / trained).read_bytes()
        assert hashlib.sha256(model_v2).hexdigest() == trained
    inputs = digits_inputs()
    metadata, outputs = infer(story, inputs)
    assert metadata["versions"] == ["2"]
    np.testing.assert_allclose(outputs, expected(model_v2, inputs), rtol=1e-5, atol=1e-6)
    assert not np.allclose(outputs, expected(story.model_v1, inputs), atol=1e-3), "the new model serves"
    assert (outputs.argmax(axis=1) == load_digits().target[:8]).mean() >= 0.75
