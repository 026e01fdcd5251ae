"""What the devcluster's real nodes give the e2e tests of an edge fleet: every image on every node, a partition
from the control plane that pods outlive, k3s's local-path storage, NPU-labelled nodes and a real Prometheus.
On the session's cluster of real nodes (conftest's real_devcluster)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnxruntime as ort
import pytest

from devcluster import nodes, offline
from devcluster import prometheus as prom

from .conftest import RealDevCluster, wait_for

MODELS = "devcluster-test"  # the tiny model's directory in the nodes' model cache (/var/lib/edgeloop/models)


def runtime_image() -> str:
    return nodes.load_images().refs["runtime"]


def ready(devcluster: RealDevCluster, kind: str, name: str, namespace: str | None = None) -> str:
    body = devcluster.get_json(kind, name, *(["-n", namespace] if namespace else []))
    return next((c["status"] for c in body["status"].get("conditions", []) if c["type"] == "Ready"), "")


def debug(devcluster: RealDevCluster, namespace: str) -> str:
    return devcluster.kubectl("get", "nodes,pods,pvc,events", "-n", namespace, "-o", "wide", check=False).stdout


def serve_tiny_model(devcluster: RealDevCluster, namespace: str, node: nodes.RealNode) -> tuple[bytes, str]:
    """The runtime image serving a tiny MLP from `node`'s model cache (no operator), behind a node-local
    Service; the model and the pod's IP once it is Ready."""
    from edgeloop_runtime.federated.model import mlp

    model = mlp([4, 8, 3], seed=1)
    (node.host_path / "models" / MODELS).mkdir(exist_ok=True)
    (node.host_path / "models" / MODELS / "tiny.onnx").write_bytes(model)
    pod = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "tiny", "namespace": namespace, "labels": {"app": "tiny"},
                     "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8000"}},
        "spec": {
            "nodeName": node.name,
            "containers": [{
                "name": "runtime", "image": runtime_image(),
                "args": ["serve", "--model-path", "/models/tiny.onnx", "--model-name", "tiny", "--grpc-port", "0"],
                "ports": [{"name": "http", "containerPort": 8000}],
                "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8000}, "periodSeconds": 1},
                "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
            }],
            "volumes": [{"name": "models", "hostPath": {"path": f"/var/lib/edgeloop/models/{MODELS}"}}],
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "tiny", "namespace": namespace},
        "spec": {"selector": {"app": "tiny"}, "ports": [{"port": 8000}], "internalTrafficPolicy": "Local"},
    }
    devcluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                             "items": [pod, service]}))
    wait_for("the tiny model's pod to be Ready", lambda: ready(devcluster, "pod", "tiny", namespace) == "True",
             timeout=120, debug=lambda: debug(devcluster, namespace))
    return model, devcluster.get_json("pod", "tiny", "-n", namespace)["status"]["podIP"]


def infer(address: str, model: bytes) -> None:
    """Ask the tiny model at `address` (host:port) with tritonclient, and check the answer against ONNX
    Runtime's own."""
    import tritonclient.http as httpclient

    inputs = np.random.default_rng(0).random((2, 4), dtype=np.float32)
    client = httpclient.InferenceServerClient(address, connection_timeout=5, network_timeout=5)
    try:
        request = httpclient.InferInput("input", list(inputs.shape), "FP32")
        request.set_data_from_numpy(inputs)
        metadata = client.get_model_metadata("tiny")
        answer = client.infer("tiny", [request]).as_numpy(metadata["outputs"][0]["name"])
    finally:
        client.close()
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(answer, session.run(None, {"input": inputs})[0], rtol=1e-5, atol=1e-6)


def test_every_real_node_has_every_image_of_the_index(real_devcluster: RealDevCluster):
    index = json.loads(nodes.IMAGES_INDEX.read_text())["images"]
    for node in real_devcluster.nodes:
        listed = subprocess.run([*node.enter(), "ctr", f"--address={node.socket}", "--namespace=k8s.io", "images",
                                 "ls", "-q"], capture_output=True, text=True, check=True).stdout.split()
        assert {entry["ref"] for entry in index} <= set(listed), node.name


def test_a_partitioned_node_keeps_serving_and_is_ready_again_once_healed(real_devcluster, real_namespace):
    """Cut off from the apiserver, the node goes NotReady in the API and its pod is marked not Ready; the pod
    keeps answering at its IP and through the node's Service rules (the host routes Services through node 0);
    the apiserver cannot reach its kubelet. Healed, the node and its pod are Ready again."""
    devcluster, node = real_devcluster, real_devcluster.nodes[0]
    model, pod_ip = serve_tiny_model(devcluster, real_namespace, node)
    cluster_ip = devcluster.get_json("service", "tiny", "-n", real_namespace)["spec"]["clusterIP"]
    infer(f"{cluster_ip}:8000", model)

    with devcluster.offline(node.name):
        assert ready(devcluster, "node", node.name) == "Unknown"
        assert offline.is_partitioned(node)
        wait_for("the node lifecycle controller to mark the pod not Ready",
                 lambda: ready(devcluster, "pod", "tiny", real_namespace) == "False")
        infer(f"{pod_ip}:8000", model)
        infer(f"{cluster_ip}:8000", model)  # kube-proxy on the node keeps the rules it had
        logs = devcluster.kubectl("logs", "tiny", "-n", real_namespace, "--request-timeout=5s", check=False)
        assert logs.returncode != 0, "the apiserver must not reach a partitioned node's kubelet"

    assert ready(devcluster, "node", node.name) == "True" and not offline.is_partitioned(node)
    wait_for("the kubelet to report its pod Ready again",
             lambda: ready(devcluster, "pod", "tiny", real_namespace) == "True", timeout=60)
    infer(f"{cluster_ip}:8000", model)
    assert "tiny" in devcluster.kubectl("logs", "tiny", "-n", real_namespace).stdout


def run_to_completion(devcluster: RealDevCluster, namespace: str, name: str, node: str, script: str,
                      volumes: dict[str, str]) -> str:
    """Run `script` with the runtime image's Python on `node` (by the scheduler, as PVCs of a
    WaitForFirstConsumer class need), with PVCs mounted ({claim: mount path}); its output."""
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node}, "restartPolicy": "Never",
            "containers": [{"name": "main", "image": runtime_image(), "command": ["python", "-c", script],
                            "volumeMounts": [{"name": claim, "mountPath": path} for claim, path in volumes.items()]}],
            "volumes": [{"name": claim, "persistentVolumeClaim": {"claimName": claim}} for claim in volumes],
        },
    }
    devcluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    phase = wait_for(f"pod {name} to finish", lambda: devcluster.get_json("pod", name, "-n", namespace)["status"]
                     .get("phase") in ("Succeeded", "Failed") and devcluster.get_json("pod", name, "-n", namespace)
                     ["status"]["phase"], timeout=120, debug=lambda: debug(devcluster, namespace))
    logs = devcluster.kubectl("logs", name, "-n", namespace).stdout
    assert phase == "Succeeded", logs
    devcluster.kubectl("delete", "pod", name, "-n", namespace)
    return logs


def test_a_local_path_volume_binds_on_a_real_node_and_keeps_its_data(real_devcluster, real_namespace):
    """k3s's default StorageClass: a PVC without a class gets `local-path`, binds where its first pod runs, on
    that node's disk; a second pod reads what the first wrote; deleting the claim removes the directory."""
    devcluster, node = real_devcluster, real_devcluster.nodes[-1]
    classes = devcluster.get_json("storageclass")["items"]
    assert [(c["metadata"]["name"], c["provisioner"]) for c in classes
            if c["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"] \
        == [("local-path", "rancher.io/local-path")]
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data", "namespace":
             real_namespace}, "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}}
    devcluster.kubectl("apply", "-f", "-", input=json.dumps(claim))
    assert devcluster.get_json("pvc", "data", "-n", real_namespace)["spec"]["storageClassName"] == "local-path"

    run_to_completion(devcluster, real_namespace, "writer", node.name,
                      "open('/data/proof', 'w').write('written on the edge')", {"data": "/data"})
    pvc = devcluster.get_json("pvc", "data", "-n", real_namespace)
    assert pvc["status"]["phase"] == "Bound"
    pv = devcluster.get_json("pv", pvc["spec"]["volumeName"])
    [term] = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert term["matchExpressions"][0]["values"] == [node.name], "the volume lives on the node that wrote it"
    path = pv["spec"]["hostPath"]["path"]
    assert path.startswith("/var/lib/rancher/k3s/storage/"), path
    on_disk = node.dir / "mounts" / "storage" / path.rsplit("/", 1)[1]  # the node's own storage directory
    assert (on_disk / "proof").read_text() == "written on the edge"

    assert run_to_completion(devcluster, real_namespace, "reader", node.name, "print(open('/data/proof').read())",
                             {"data": "/data"}).strip() == "written on the edge"

    devcluster.kubectl("delete", "pvc", "data", "-n", real_namespace)
    wait_for("the provisioner to delete the volume and its directory", lambda: not on_disk.exists(), timeout=90,
             debug=lambda: debug(devcluster, real_namespace))


def test_a_real_npu_node_advertises_its_npu_as_a_device_plugin_would(real_devcluster, real_namespace):
    npu_nodes = [node for node in real_devcluster.nodes if node.name.startswith("edge-real-npu-")]
    if not npu_nodes:
        pytest.skip("this session's real fleet has no NPU node (EDGELOOP_E2E_REAL_FLEET=edge-real=1,edge-real-npu=1)")
    node = real_devcluster.get_json("node", npu_nodes[0].name)
    assert node["metadata"]["labels"]["edgeloop.io/accelerator.npu"] == "true"
    assert node["status"]["allocatable"]["npu.intel.com/accel"] == "1"
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "on-npu", "namespace": real_namespace},
        "spec": {"restartPolicy": "Never", "nodeSelector": {"edgeloop.io/accelerator.npu": "true"},
                 "containers": [{"name": "main", "image": runtime_image(), "command": ["python", "-c", "print(1)"],
                                 "resources": {"limits": {"npu.intel.com/accel": "1"}}}]},
    }
    real_devcluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
    wait_for("the pod to run on the NPU node", lambda: real_devcluster.get_json(
        "pod", "on-npu", "-n", real_namespace)["status"].get("phase") == "Succeeded", timeout=120,
        debug=lambda: debug(real_devcluster, real_namespace))
    assert real_devcluster.get_json("pod", "on-npu", "-n", real_namespace)["spec"]["nodeName"] == npu_nodes[0].name


def test_prometheus_scrapes_the_annotated_pods_of_the_real_nodes(real_devcluster, real_namespace, prometheus,
                                                                 promtool, tmp_path):
    node = real_devcluster.nodes[-1]
    model, pod_ip = serve_tiny_model(real_devcluster, real_namespace, node)
    infer(f"{pod_ip}:8000", model)
    [up] = prom.wait_for_series(prometheus, f'up{{namespace="{real_namespace}", pod="tiny"}} == 1')
    assert up["metric"]["node"] == node.name and up["metric"]["instance"] == f"{pod_ip}:8000"
    series = prometheus.query(f'count by (__name__) ({{namespace="{real_namespace}", job="kubernetes-pods"}})')
    assert len(series) > 5, "the runtime's own metrics, not only Prometheus's up and scrape_* series"

    rules = tmp_path / "rules.yaml"
    rules.write_text("groups:\n- name: t\n  rules:\n  - alert: TinyDown\n    expr: up{pod=\"tiny\"} == 0\n")
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    prometheus.reconfigure(rule_files=[rules])
    try:
        wait_for("Prometheus to load the rule", lambda: [group["name"] for group in prometheus.rules()] == ["t"])
        assert prometheus.query('ALERTS{alertname="TinyDown"}') == [], "the pod is up: the alert does not fire"
    finally:
        prometheus.reconfigure()
