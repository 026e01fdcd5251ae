"""The devcluster is a real Kubernetes: its fleet, scheduling, Jobs and CRD validation, through kubectl."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from devcluster.fleet import load_fleet, node_manifests

from devcluster import offline

from .conftest import wait_for


def test_components_report_the_pinned_kubernetes_version(devcluster):
    version = json.loads(devcluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == version["clientVersion"]["gitVersion"]
    assert version["serverVersion"]["gitVersion"].startswith("v1.34.")
    helm = subprocess.run([str(devcluster.bin_dir / "helm"), "version", "--short"], capture_output=True, text=True)
    assert helm.stdout.startswith("v3.")


def test_fleet_nodes_have_the_specified_labels_and_capacity(devcluster):
    expected = {node["metadata"]["name"]: node for node in node_manifests(load_fleet())}
    nodes = {n["metadata"]["name"]: n for n in devcluster.get_json("nodes", "-l", "type=kwok")["items"]}
    assert set(nodes) == set(expected)
    for name, want in expected.items():
        got = nodes[name]
        assert want["metadata"]["labels"].items() <= got["metadata"]["labels"].items(), name
        for resource, quantity in want["status"]["capacity"].items():
            assert got["status"]["capacity"][resource] == quantity, (name, resource)
    gpu_nodes = devcluster.kubectl("get", "nodes", "-l", "edgeloop.io/accelerator.gpu=true", "-o", "name").stdout
    assert sorted(gpu_nodes.split()) == ["node/edge-gpu-0", "node/edge-gpu-1"]


DAEMONSET = """
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: gpu-only}
spec:
  selector: {matchLabels: {app: gpu-only}}
  template:
    metadata: {labels: {app: gpu-only}}
    spec:
      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
              - matchExpressions: [{key: edgeloop.io/accelerator.gpu, operator: In, values: ["true"]}]
      containers:
        - name: main
          image: registry.example/runtime:1
          resources: {limits: {nvidia.com/gpu: "1"}}
"""


def test_daemonset_with_gpu_affinity_runs_on_gpu_nodes_only(devcluster, namespace):
    devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=DAEMONSET)
    devcluster.kubectl("rollout", "status", "-n", namespace, "daemonset/gpu-only", "--timeout=90s")
    pods = devcluster.get_json("pods", "-n", namespace)["items"]
    assert sorted(p["spec"]["nodeName"] for p in pods) == ["edge-gpu-0", "edge-gpu-1"]
    assert all(p["status"]["phase"] == "Running" for p in pods)


def test_job_completes(devcluster, namespace):
    devcluster.kubectl("create", "job", "-n", namespace, "hello", "--image=registry.example/busybox:1", "--", "true")
    devcluster.kubectl("wait", "-n", namespace, "job/hello", "--for=condition=Complete", "--timeout=90s")
    job = devcluster.get_json("job/hello", "-n", namespace)
    assert job["status"]["succeeded"] == 1


CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.smoke.edgeloop.io}
spec:
  group: smoke.edgeloop.io
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1}
"""


@pytest.fixture
def widget_crd(devcluster):
    devcluster.kubectl("apply", "-f", "-", input=CRD)
    devcluster.wait_established("widgets.smoke.edgeloop.io")
    yield
    devcluster.kubectl("delete", "crd", "widgets.smoke.edgeloop.io", "--wait=false")


def test_apiserver_validates_custom_resources_against_the_crd_schema(devcluster, namespace, widget_crd):
    good = "apiVersion: smoke.edgeloop.io/v1\nkind: Widget\nmetadata: {name: ok}\nspec: {size: 3}\n"
    devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=good)
    assert devcluster.get_json("widget/ok", "-n", namespace)["spec"]["size"] == 3

    bad = "apiVersion: smoke.edgeloop.io/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {size: 0}\n"
    result = devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=bad, check=False)
    assert result.returncode != 0
    assert "spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1" in result.stderr


def ready_condition(devcluster, kind: str, name: str, namespace: str | None = None) -> dict:
    body = devcluster.get_json(kind, name, *(["-n", namespace] if namespace else []))
    return next(c for c in body["status"]["conditions"] if c["type"] == "Ready")


def test_an_offline_node_is_lost_like_a_silent_kubelet_and_comes_back(devcluster, namespace):
    """kwok stops renewing the node's lease: the node lifecycle controller, not kwok, marks it Unknown, taints
    it unreachable and its pods not Ready; a pod deleted meanwhile stays Terminating. Back online, the node and
    its pods are Ready again and the deletion completes."""
    node = "edge-cpu-1"
    for name in ("stays", "goes"):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
               "spec": {"nodeName": node, "containers": [{"name": "main", "image": "registry.example/runtime:1"}]}}
        devcluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
        wait_for(f"pod {name} to be Ready",
                 lambda name=name: ready_condition(devcluster, "pod", name, namespace)["status"] == "True")

    with devcluster.offline(node):
        condition = ready_condition(devcluster, "node", node)
        assert (condition["status"], condition["reason"]) == ("Unknown", "NodeStatusUnknown"), condition
        wait_for("the unreachable taints", lambda: {("node.kubernetes.io/unreachable", "NoExecute"),
                                                   ("node.kubernetes.io/unreachable", "NoSchedule")} <= {
            (t["key"], t["effect"]) for t in devcluster.get_json("node", node)["spec"].get("taints", [])})
        wait_for("its pod to be marked not Ready",
                 lambda: ready_condition(devcluster, "pod", "stays", namespace)["status"] == "False")
        assert devcluster.get_json("lease", node, "-n", "kube-node-lease")["spec"]["holderIdentity"] == \
            offline.LEASE_HOLDER
        devcluster.kubectl("delete", "pod", "goes", "-n", namespace, "--wait=false")
        time.sleep(3)  # kwok would have finished the deletion within a second
        assert devcluster.get_json("pod", "goes", "-n", namespace)["metadata"]["deletionTimestamp"], \
            "no kubelet finishes a deletion on an unreachable node"
        assert ready_condition(devcluster, "pod", "stays", namespace)["status"] == "False"

    assert ready_condition(devcluster, "node", node)["status"] == "True"
    wait_for("the taints to go", lambda: not devcluster.get_json("node", node)["spec"].get("taints"))
    wait_for("its pod to be Ready again",
             lambda: ready_condition(devcluster, "pod", "stays", namespace)["status"] == "True")
    wait_for("the deletion to complete", lambda: devcluster.kubectl(
        "get", "pod", "goes", "-n", namespace, "--ignore-not-found", "-o", "name").stdout == "")


def test_arm64_nodes_join_for_a_test_and_run_the_same_image_names(devcluster, namespace, arm64_nodes):
    for name in arm64_nodes:
        node = devcluster.get_json("node", name)
        assert node["metadata"]["labels"]["kubernetes.io/arch"] == "arm64"
        assert node["status"]["nodeInfo"]["architecture"] == "arm64"
    daemonset = DAEMONSET.replace("gpu-only", "everywhere").replace("edgeloop.io/accelerator.gpu", "kubernetes.io/os") \
        .replace('values: ["true"]', 'values: ["linux"]').replace('resources: {limits: {nvidia.com/gpu: "1"}}', "")
    devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=daemonset)
    devcluster.kubectl("rollout", "status", "-n", namespace, "daemonset/everywhere", "--timeout=90s")
    pods = {p["spec"]["nodeName"]: p for p in devcluster.get_json("pods", "-n", namespace)["items"]}
    assert set(arm64_nodes) <= set(pods) and len(pods) == 8
    assert {c["image"] for p in pods.values() for c in p["spec"]["containers"]} == {"registry.example/runtime:1"}


POD_MONITOR = """
apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata: {name: runtime}
spec:
  selector: {matchLabels: {app.kubernetes.io/managed-by: edgeloop}}
  podMetricsEndpoints: [{port: http, path: /metrics, interval: 15s}]
"""


def test_monitor_objects_are_validated_against_the_prometheus_operator_crds(devcluster, namespace,
                                                                            prometheus_operator_crds):
    assert set(prometheus_operator_crds) == {"podmonitors.monitoring.coreos.com",
                                             "servicemonitors.monitoring.coreos.com",
                                             "prometheusrules.monitoring.coreos.com"}
    devcluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=POD_MONITOR)
    bad = POD_MONITOR.replace("interval: 15s", "interval: soon")
    result = devcluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-", input=bad, check=False)
    assert result.returncode != 0 and "interval" in result.stderr, result.stderr
