"""Real nodes: kubelet, kube-proxy and containerd running the images `make images` built, with no registry.

One cluster of its own (`e2e-real`: real nodes only; the session's kwok cluster keeps its fleet of six), and
one story through it, in file order: pods get Services and DNS; the Helm chart runs the operator as a real
pod; an InferenceModel's pods fetch a model from the chart's store, verify and serve it, and tritonclient
reaches them through the Service; a FederatedRound trains on datasets in the nodes' data paths, aggregates
securely, publishes and promotes; the model then rolls to the new sha256 and serves it.

Secure aggregation needs two clients to hide anything, so this cluster has two real nodes by default
(EDGELOOP_E2E_REAL_NODES)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from devcluster.fleet import load_fleet

from devcluster import build, cluster, nodes

from .conftest import DevCluster

ROOT = Path(__file__).parents[2]
RELEASE, RELEASE_NS, MODELS_NS = "edgeloop", "edgeloop-system", "models"
REAL_NODES = int(os.environ.get("EDGELOOP_E2E_REAL_NODES", "2"))
RUNTIME_IMAGE = "ghcr.io/edgeloop/runtime:0.1.0"


def wait_for(what: str, check, timeout: float = 180.0, debug=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{debug()}")


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
def story() -> Story:
    if reason := nodes.unavailable_reason():
        pytest.skip(reason)
    try:
        nodes.load_images()
    except cluster.ClusterError as error:
        pytest.skip(str(error))
    target = cluster.Cluster.named(os.environ.get("EDGELOOP_E2E_REAL_CLUSTER", "e2e-real"))
    bin_dir = build.build()
    fleet = load_fleet().scaled_to(0).with_real_nodes(REAL_NODES)
    with target.locked():
        cluster.up(target, bin_dir, fleet, timeout=240)
        network = nodes.Network(target.state()["network"])
        real = [nodes.RealNode(name, i, network, target.run_dir) for i, (name, _) in enumerate(fleet.real_nodes())]
        yield Story(DevCluster(kubeconfig=target.kubeconfig, bin_dir=bin_dir, run_dir=target.run_dir), real)
        cluster.down(target)


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
             .get("phase") in ("Succeeded", "Failed"), debug=lambda: story.debug(namespace))
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
