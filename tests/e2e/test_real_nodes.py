"""Real nodes: kubelet, kube-proxy and containerd running the images `make images` built, with no registry.

A cluster of real nodes only (`e2e-real`; the session's kwok cluster keeps its fleet of six), and one story
through it, in file order: pods get Services and DNS; the Helm chart runs the operator as a real pod; an
InferenceModel's pods fetch a model from the chart's store, verify and serve it, and tritonclient reaches them
through the Service; a FederatedRound trains on datasets in the nodes' data paths, aggregates securely,
publishes and promotes; the model then rolls to the new sha256 and serves it.

It runs on the session's cluster of real nodes (conftest's real_devcluster: two GPU-labelled nodes by default;
secure aggregation needs two clients to hide anything)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from edgeloop import testing
from edgeloop.testing import logged_errors

from devcluster import nodes

from .conftest import DevCluster, RealDevCluster, wait_for

ROOT = Path(__file__).parents[2]
RELEASE, RELEASE_NS, MODELS_NS = "edgeloop", "edgeloop-system", "models"
RUNTIME_IMAGE = "ghcr.io/edgeloop/runtime:0.1.0"


class Story:
    """What the tests of this module share, in file order."""

    def __init__(self, devcluster: DevCluster, real: list[nodes.RealNode]):
        self.devcluster, self.real = devcluster, real
        self.model_v1: bytes = b""

    def helm(self, *args: str) -> str:
        result = subprocess.run(["helm", *args], env=self.devcluster.env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
        return result.stdout

    def cluster_ip(self, namespace: str, service: str) -> str:
        return self.devcluster.get_json("service", service, "-n", namespace)["spec"]["clusterIP"]

    def secret(self, namespace: str, name: str, key: str) -> bytes:
        return base64.b64decode(self.devcluster.get_json("secret", name, "-n", namespace)["data"][key])

    def debug(self, namespace: str) -> str:
        return self.devcluster.kubectl("get", "pods,events", "-n", namespace, "-o", "wide", check=False).stdout


@pytest.fixture(scope="module")
def story(real_devcluster: RealDevCluster) -> Story:
    return Story(real_devcluster, list(real_devcluster.nodes))


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
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "1", "the fleet's GPU capacity is advertised"
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
    devcluster = story.devcluster
    # The node contract, as a node's provisioning would make it: the model cache's group is the runtime's and
    # it is group-writable with the setgid bit, so the kubelet creates each namespace's cache (a subPath)
    # writable by the runtime.
    for node in story.real:
        os.chown(node.host_path / "models", 65532, 65532)
        os.chmod(node.host_path / "models", 0o2775)
    devcluster.kubectl("create", "namespace", MODELS_NS)
    story.helm(
        "install", RELEASE, str(ROOT / "charts" / "edgeloop"), "--namespace", RELEASE_NS, "--create-namespace",
        "--set", "operator.replicas=1", "--set", f"workloadNamespaces={{{MODELS_NS}}}",
        # No provisioner here: the store keeps its blobs in a directory of the first node.
        "--set", "store.persistence.mode=hostPath", "--set", f"store.persistence.hostPath.node={story.real[0].name}",
        # The cuda flavour is not built here (`make images` leaves it to its own target: 1.5 GB of wheels), and
        # these nodes have no GPU anyway: the gpu class runs the cpu image, which has no CUDA provider.
        "--set", f"config.acceleratorClasses.gpu.image={RUNTIME_IMAGE}",
        "--wait", "--timeout", "300s",
    )
    pods = devcluster.get_json("pods", "-n", RELEASE_NS)["items"]
    images = {c["image"] for pod in pods for c in pod["spec"]["containers"]}
    assert images == {"ghcr.io/edgeloop/operator:0.1.0", RUNTIME_IMAGE}, "the chart's default images, built here"
    assert all(p["status"]["phase"] == "Running" and all(c["ready"] for c in p["status"]["containerStatuses"])
               for p in pods), story.debug(RELEASE_NS)
    operator_log = devcluster.kubectl("logs", "-n", RELEASE_NS, "deployment/edgeloop-operator").stdout
    assert not logged_errors(operator_log.splitlines()), operator_log[-3000:]


def digits_inputs() -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().data[:8] / 16).astype(np.float32)


def infer(story: Story, inputs: np.ndarray) -> tuple[dict, np.ndarray]:
    """tritonclient over gRPC with TLS, through the model's Service (ClusterIP; the host routes Services
    through the first node's kube-proxy), verifying the server's certificate for the Service's name."""
    import tritonclient.grpc as grpcclient

    ca = story.real[0].dir / "digits-ca.crt"
    ca.write_bytes(story.secret(MODELS_NS, "digits-tls", "ca.crt"))
    client = grpcclient.InferenceServerClient(
        f"{story.cluster_ip(MODELS_NS, 'digits')}:8001", ssl=True, root_certificates=str(ca),
        channel_args=[("grpc.ssl_target_name_override", f"digits.{MODELS_NS}.svc")],
    )
    try:
        assert client.is_server_ready() and client.is_model_ready("digits")
        metadata = client.get_model_metadata("digits", as_json=True)
        [tensor] = metadata["inputs"]
        request = grpcclient.InferInput(tensor["name"], list(inputs.shape), tensor["datatype"])
        request.set_data_from_numpy(inputs)
        result = client.infer("digits", [request])
        return metadata, result.as_numpy(metadata["outputs"][0]["name"])
    finally:
        client.close()


def expected(model: bytes, inputs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def upload(story: Story, model: bytes) -> str:
    digest = hashlib.sha256(model).hexdigest()
    token = story.secret(RELEASE_NS, "edgeloop-store-token", "token").decode()
    store = f"http://{story.cluster_ip(RELEASE_NS, 'edgeloop-store')}:8000"
    request = urllib.request.Request(f"{store}/sha256/{digest}", data=model, method="PUT",
                                     headers={"Authorization": f"Bearer {token}"})
    urllib.request.urlopen(request, timeout=30).close()
    return digest


def model_condition(story: Story, sha256: str, condition: str) -> dict:
    """Wait until InferenceModel digits has observed its spec, rendered `sha256` and `condition` is True."""
    def reached():
        body = story.devcluster.get_json("inferencemodel", "digits", "-n", MODELS_NS)
        status = body.get("status", {})
        met = any(c["type"] == condition and c["status"] == "True" for c in status.get("conditions", []))
        return met and status.get("observedGeneration") == body["metadata"]["generation"] \
            and status.get("model", {}).get("sha256") == sha256 and body

    return wait_for(f"InferenceModel digits to be {condition} with {sha256[:12]}", reached, timeout=300,
                    debug=lambda: story.debug(MODELS_NS))


def test_an_inferencemodel_serves_on_real_nodes_through_its_service(story: Story):
    from edgeloop_runtime.federated.model import mlp

    story.model_v1 = mlp([64, 32, 10], seed=0)
    digest = upload(story, story.model_v1)
    model = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
    model["metadata"]["namespace"] = MODELS_NS
    model["spec"]["model"] = {"uri": f"http://edgeloop-store.{RELEASE_NS}.svc:8000/sha256/{digest}",
                              "sha256": digest, "version": "1"}
    story.devcluster.kubectl("apply", "-f", "-", input=json.dumps(model))

    # The nodes are labelled and equipped as GPU nodes, without a GPU. By default a node that claims an
    # accelerator it cannot use fails loudly, and the status says why...
    body = model_condition(story, digest, "Degraded")
    degraded = next(c for c in body["status"]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "RuntimeFailed", degraded
    assert "['CUDAExecutionProvider'] are not available" in degraded["message"], degraded
    # ...and with the gpu class's allowCpuFallback (a chart value) ONNX Runtime falls back to its CPU provider.
    story.helm("upgrade", RELEASE, str(ROOT / "charts" / "edgeloop"), "--namespace", RELEASE_NS, "--reuse-values",
               "--set", "config.acceleratorClasses.gpu.allowCpuFallback=true", "--wait", "--timeout", "300s")
    body = model_condition(story, digest, "Ready")

    variants = {v["accelerator"]: v for v in body["status"]["variants"]}
    assert variants["gpu"]["ready"] == len(story.real), body["status"]
    pods = story.devcluster.get_json("pods", "-n", MODELS_NS, "-l", "edgeloop.io/accelerator=gpu")["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == [n.name for n in story.real]
    log = story.devcluster.kubectl("logs", "-n", MODELS_NS, pods[0]["metadata"]["name"]).stdout
    assert f"(sha256 {digest})" in log and "execution providers in use: CPUExecutionProvider" in log, log

    # The status tells the truth about the fallback: what the runtime itself reports it runs on, the
    # Accelerated condition, a Warning event and the column of `kubectl get im`; the model stays Ready.
    body = wait_for("the CPU fallback in the status", lambda: (b := story.devcluster.get_json(
        "inferencemodel", "digits", "-n", MODELS_NS)) and any(
        c["type"] == "Accelerated" and c["reason"] == "CPUFallback" for c in b["status"]["conditions"]) and b,
        timeout=120, debug=lambda: story.debug(MODELS_NS))
    gpu = next(v for v in body["status"]["variants"] if v["accelerator"] == "gpu")
    assert gpu["providersInUse"] == ["CPUExecutionProvider"], gpu
    assert gpu["providersReportedBy"] in [n.name for n in story.real]
    accelerated = next(c for c in body["status"]["conditions"] if c["type"] == "Accelerated")
    assert accelerated["status"] == "False"
    assert f"gpu variant runs on CPUExecutionProvider without CUDAExecutionProvider on node " \
           f"{gpu['providersReportedBy']}" in accelerated["message"], accelerated
    events = story.devcluster.get_json("events", "-n", MODELS_NS, "--field-selector",
                                       "involvedObject.kind=InferenceModel,reason=CPUFallback")["items"]
    assert [e["type"] for e in events] == ["Warning"], events
    table = story.devcluster.kubectl("get", "im", "digits", "-n", MODELS_NS).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "NODES", "MODEL", "VERSION", "ACCELERATED", "AGE"], table
    nodes_ready = f"{len(story.real)}/{len(story.real)}"
    assert table[1].split()[:5] == ["digits", "True", nodes_ready, "1", "CPUFallback"], table
    health = testing.argocd_health(testing.ARGOCD_HEALTH / "InferenceModel" / "health.lua", body)
    assert health["status"] == "Healthy" and "CPUFallback" in health["message"], health
    testing.capture_argocd_testdata("InferenceModel", "cpu-fallback", body)
    # The fetcher verified the model into the node's own cache, in the namespace's directory of it.
    for node in story.real:
        assert (node.host_path / "models" / MODELS_NS / "sha256" / digest).read_bytes() == story.model_v1

    inputs = digits_inputs()
    metadata, outputs = infer(story, inputs)
    assert metadata["name"] == "digits" and metadata["versions"] == ["1"]
    np.testing.assert_allclose(outputs, expected(story.model_v1, inputs), rtol=1e-5, atol=1e-6)


def test_a_federated_round_on_real_nodes_trains_promotes_and_rolls_the_model(story: Story):
    from sklearn.datasets import load_digits

    # Each node's own data, in its data path (the node contract's /var/lib/edgeloop/data/<namespace>/<dataset>).
    x, y = load_digits(return_X_y=True)
    for node in story.real:
        data = node.host_path / "data" / MODELS_NS / "digits"
        data.mkdir(parents=True, exist_ok=True)
        part = slice(node.index, None, len(story.real))
        np.savez(data / "digits.npz", x=(x[part] / 16).astype(np.float32), y=y[part])

    round_ = yaml.safe_load((ROOT / "examples" / "federatedround-digits.yaml").read_text())
    round_["metadata"]["namespace"] = MODELS_NS
    spec = round_["spec"]
    spec["participants"] = {"nodeSelector": {"edgeloop.io/node-group": "edge-real"},
                            "minClients": len(story.real), "maxClients": len(story.real)}
    spec["training"]["rounds"] = 3
    spec["promote"]["minAccuracy"] = 0.8
    spec["runtime"]["resources"]["requests"] = {"cpu": "100m", "memory": "128Mi"}
    story.devcluster.kubectl("apply", "-f", "-", input=json.dumps(round_))
    name = round_["metadata"]["name"]

    def finished():
        body = story.devcluster.get_json("federatedround", name, "-n", MODELS_NS)
        conditions = {c["type"]: c for c in body.get("status", {}).get("conditions", [])}
        return conditions.get("Promoted", {}).get("status") in ("True", "False") and body

    body = wait_for("the round to train, aggregate and promote", finished, timeout=600,
                    debug=lambda: story.debug(MODELS_NS))
    status = body["status"]
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions["Succeeded"] == ("True", "Trained") and conditions["Promoted"] == ("True", "Promoted"), status
    assert status["participants"]["nodes"] == [node.name for node in story.real]
    assert status["participants"]["reported"] == len(story.real)
    assert status["metrics"]["accuracy"] >= 0.8 > status["baseline"]["accuracy"]
    trained = status["result"]["sha256"]
    client_pods = story.devcluster.get_json("pods", "-n", MODELS_NS, "-l", "edgeloop.io/role=client")["items"]
    assert sorted(p["spec"]["nodeName"] for p in client_pods) == [n.name for n in story.real]

    # The model rolls to the published sha256, each node fetches and verifies it, and serves it.
    body = model_condition(story, trained, "Ready")
    assert body["spec"]["model"]["version"] == "2"
    for node in story.real:
        model_v2 = (node.host_path / "models" / MODELS_NS / "sha256" / trained).read_bytes()
        assert hashlib.sha256(model_v2).hexdigest() == trained
    inputs = digits_inputs()
    metadata, outputs = infer(story, inputs)
    assert metadata["versions"] == ["2"]
    np.testing.assert_allclose(outputs, expected(model_v2, inputs), rtol=1e-5, atol=1e-6)
    assert not np.allclose(outputs, expected(story.model_v1, inputs), atol=1e-3), "the new model serves"
    assert (outputs.argmax(axis=1) == load_digits().target[:8]).mean() >= 0.75
