"""The e2e tier: one devcluster (a real kube-apiserver, controller-manager, scheduler and etcd, with a
kwok-simulated edge fleet) for the whole session, driven with the real kubectl; and, for the tests that need
pods to really run, one devcluster of real nodes (`real_devcluster`), also once per session.

Fixtures (see README's "The devcluster" for what they stand on):
- devcluster: the kwok cluster (`e2e`, the default fleet of six); `.set_offline(*names)`, `.offline(*names)`.
- namespace: a fresh namespace in it per test.
- arm64_nodes: two simulated arm64 nodes (group edge-arm64) added to it for one test, removed afterwards.
- prometheus_operator_crds: the PodMonitor/ServiceMonitor/PrometheusRule CRDs applied to it for one test.
- real_devcluster: the real-node cluster (`e2e-real`) of REAL_FLEET; `.nodes` (devcluster.nodes.RealNode),
  `.offline(*names)` partitions them; real_namespace: a fresh namespace in it per test.
- real_release: the Helm chart installed on real_devcluster once per session (operator and store as pods), set up
  as a user sets it up on nodes without a GPU or NPU; `.helm`, `.upload(model)`, `.service_ip`, `.secret`.
- prometheus: a real Prometheus scraping real_devcluster's annotated pods (devcluster.prometheus.Prometheus).
- promtool: the path of Debian's promtool.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from devcluster.fleet import load_fleet, node_manifests

from devcluster import build, cluster, nodes, offline
from devcluster import prometheus as prom

# The real-node cluster's groups (of the default fleet) and counts, shared by every real-node test: by default a
# GPU-labelled node without a GPU and an NPU-labelled node without an NPU (two nodes: secure aggregation hides
# nothing with one client); e.g. EDGELOOP_E2E_REAL_FLEET=edge-real=2 for two GPU-labelled nodes.
REAL_FLEET = dict(
    (group, int(count)) for group, _, count in
    (item.partition("=") for item in os.environ.get("EDGELOOP_E2E_REAL_FLEET", "edge-real=1,edge-real-npu=1")
     .split(","))
)


@dataclass(frozen=True)
class DevCluster:
    kubeconfig: Path
    bin_dir: Path
    run_dir: Path

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{self.bin_dir}:{os.environ['PATH']}"}

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin_dir / "kubectl"), *args], input=input, env=self.env, capture_output=True, text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", "-o", "json", *args).stdout)

    @property
    def cluster(self) -> cluster.Cluster:
        return cluster.Cluster(self.run_dir)

    def set_offline(self, *names: str, offline_: bool = True, wait: float | None = 90.0) -> None:
        """Cut nodes off from the control plane (kwok: silent; real: partitioned) or bring them back
        (`offline_=False`), waiting until their Ready condition says so (offline: ~30 s, the grace period)."""
        offline.set_offline(self.cluster, list(names), offline_, wait)

    @contextlib.contextmanager
    def offline(self, *names: str, wait: float | None = 90.0):
        """Nodes offline for the block, and back (Ready) afterwards whatever happened in it."""
        self.set_offline(*names, wait=wait)
        try:
            yield
        finally:
            self.set_offline(*names, offline_=False, wait=wait)

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Wait until the CRDs are Established. (`kubectl wait` fails at once on a CRD so new that it has
        no status conditions yet, so poll instead.)"""
        deadline = time.monotonic() + timeout
        while True:
            items = [self.get_json(f"crd/{name}") for name in crds]
            if all(any(c["type"] == "Established" and c["status"] == "True"
                       for c in item.get("status", {}).get("conditions") or []) for item in items):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"CRDs {crds} not Established after {timeout:.0f} s")
            time.sleep(0.2)


def wait_for(what: str, check: Callable[[], object], timeout: float = 90.0, debug: Callable[[], str] = str):
    """Poll `check` until it returns something true, and return that; fail with `debug()` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{debug()}")


@pytest.fixture(scope="session")
def devcluster() -> DevCluster:
    """Brought up once per test session (its own run directory, apart from `make demo`'s) and taken down.

    The session holds the cluster's lock throughout, so a second test session waits for this one
    rather than sharing (and tearing down) a cluster whose nodes the tests relabel."""
    target = cluster.Cluster.named(os.environ.get("EDGELOOP_E2E_CLUSTER", "e2e"))
    bin_dir = build.build()
    with target.locked():
        cluster.up(target, bin_dir, load_fleet())
        yield DevCluster(kubeconfig=target.kubeconfig, bin_dir=bin_dir, run_dir=target.run_dir)
        cluster.down(target)


def pytest_collection_modifyitems(items):
    """Every test under tests/e2e is an e2e test."""
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.e2e)


def _fresh_namespace(target: DevCluster, request):
    # The test's name, cut short, and a digest of all of it: the cases of a parametrized test differ at the end.
    digest = hashlib.sha256(request.node.name.encode()).hexdigest()[:6]
    name = f"t-{request.node.name.lower().replace('_', '-')[:34].strip('-')}-{digest}-{os.getpid() % 10000}"
    target.kubectl("create", "namespace", name)
    yield name
    target.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def namespace(devcluster: DevCluster, request) -> str:
    """A fresh namespace for one test, deleted (without waiting) afterwards."""
    yield from _fresh_namespace(devcluster, request)


@pytest.fixture
def arm64_nodes(devcluster: DevCluster) -> list[str]:
    """Two simulated arm64 boards (kubernetes.io/arch=arm64, CPU only) in the session's fleet for one test."""
    fleet = load_fleet().with_counts({"edge-arm64": 2})
    cluster.ensure_fleet(devcluster.cluster, fleet, timeout=60, log=lambda _: None)
    names = [node["metadata"]["name"] for node in node_manifests(fleet)
             if node["metadata"]["labels"]["edgeloop.io/node-group"] == "edge-arm64"]
    yield names
    devcluster.kubectl("delete", "node", *names, "--wait=false")


@contextlib.contextmanager
def prometheus_operator_crds_applied(target: DevCluster):
    """The Prometheus Operator's PodMonitor, ServiceMonitor and PrometheusRule CRDs (prometheus-operator's Go
    module), so that charts' monitor objects can be validated (`kubectl apply --dry-run=server`); deleted
    afterwards, so that other tests (and Helm's .Capabilities) see a cluster without them."""
    files = prom.operator_crds()
    names = [yaml.safe_load(path.read_text())["metadata"]["name"] for path in files]
    for path in files:
        target.kubectl("apply", "--server-side", "-f", str(path))
    target.wait_established(*names)
    try:
        yield names
    finally:
        target.kubectl("delete", "crd", *names, check=False)


@pytest.fixture
def prometheus_operator_crds(devcluster: DevCluster) -> list[str]:
    with prometheus_operator_crds_applied(devcluster) as names:
        yield names


@dataclass(frozen=True)
class RealDevCluster(DevCluster):
    nodes: tuple[nodes.RealNode, ...] = ()


@contextlib.contextmanager
def real_devcluster_up(name: str, groups: dict[str, int]):
    """A devcluster of real nodes only: the default fleet's `groups` with their counts (e.g. {"edge-real": 1,
    "edge-real-npu": 1}); down afterwards, checking that it left nothing behind. Skips where real nodes
    cannot run (no root, no containerd, no images)."""
    if reason := nodes.unavailable_reason():
        pytest.skip(reason)
    try:
        nodes.load_images()
    except cluster.ClusterError as error:
        pytest.skip(str(error))
    target = cluster.Cluster.named(name)
    bin_dir = build.build()
    fleet = load_fleet().scaled_to(0).with_counts(groups)
    with target.locked():
        cluster.up(target, bin_dir, fleet, timeout=240)
        network = nodes.Network(target.state()["network"])
        real = tuple(nodes.RealNode(node, i, network, target.run_dir) for i, (node, _) in enumerate(fleet.real_nodes()))
        try:
            yield RealDevCluster(kubeconfig=target.kubeconfig, bin_dir=bin_dir, run_dir=target.run_dir, nodes=real)
        finally:
            cluster.down(target)
    # `down` leaves nothing behind: no process, container, namespace, cgroup, bridge or route of its nodes.
    assert not [command for command in running_commands() if str(target.run_dir) in command]
    assert not Path(f"/sys/class/net/{network.bridge}").exists()
    assert not any(Path(f"/run/netns/{network.netns(node.index)}").exists() for node in real)
    assert not any(Path(f"/sys/fs/cgroup/memory/{network.netns(node.index)}").exists() for node in real)
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    assert network.service_cidr.split("/")[0] not in routes and network.pod_cidr.split(".0.0/")[0] not in routes


def running_commands() -> list[str]:
    commands = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # it exited meanwhile
            commands.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    return commands


@pytest.fixture(scope="session")
def real_devcluster() -> RealDevCluster:
    """The session's cluster of real nodes (REAL_FLEET), brought up by the first test that needs it."""
    with real_devcluster_up(os.environ.get("EDGELOOP_E2E_REAL_CLUSTER", "e2e-real"), REAL_FLEET) as real:
        yield real


@pytest.fixture
def real_namespace(real_devcluster: RealDevCluster, request) -> str:
    """A fresh namespace in real_devcluster for one test, deleted (without waiting) afterwards."""
    yield from _fresh_namespace(real_devcluster, request)


class _VerifiedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address (a ClusterIP), verifying the certificate for another name (the Service's)."""

    def __init__(self, *args, server_name: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.server_name)


@dataclass(frozen=True)
class RealRelease:
    """The Helm chart's release on real_devcluster; models run in `workload_namespace`."""

    devcluster: RealDevCluster
    name: str = "edgeloop"
    namespace: str = "edgeloop-system"
    workload_namespace: str = "models"

    def helm(self, *args: str) -> str:
        result = subprocess.run(["helm", *args], env=self.devcluster.env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
        return result.stdout

    def service_ip(self, namespace: str, service: str) -> str:
        return self.devcluster.get_json("service", service, "-n", namespace)["spec"]["clusterIP"]

    def secret(self, namespace: str, name: str, key: str) -> bytes:
        return base64.b64decode(self.devcluster.get_json("secret", name, "-n", namespace)["data"][key])

    def _store(self) -> _VerifiedHTTPS:
        """An HTTPS connection to the chart's store through its Service (the host routes Services through real
        node 0), verifying the certificate the chart made for the Service's name."""
        ca = self.secret(self.namespace, f"{self.name}-store-tls", "ca.crt").decode()
        return _VerifiedHTTPS(self.service_ip(self.namespace, f"{self.name}-store"), 8000, timeout=30,
                              context=ssl.create_default_context(cadata=ca),
                              server_name=f"{self.name}-store.{self.namespace}.svc")

    def upload(self, model: bytes) -> str:
        """Put `model` into the chart's store (the token never crosses the network in clear). Its sha256."""
        digest = hashlib.sha256(model).hexdigest()
        token = self.secret(self.namespace, f"{self.name}-store-token", "token").decode()
        connection = self._store()
        try:
            connection.request("PUT", f"/sha256/{digest}", body=model, headers={"Authorization": f"Bearer {token}"})
            response = connection.getresponse()
            assert response.status in (200, 201), (response.status, response.read()[:200])
        finally:
            connection.close()
        return digest

    def download(self, digest: str) -> bytes:
        """The blob `digest` as the store serves it to the nodes."""
        connection = self._store()
        try:
            connection.request("GET", f"/sha256/{digest}")
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, (response.status, body[:200])
            return body
        finally:
            connection.close()

    def model_uri(self, digest: str) -> str:
        """Where the nodes fetch a model that upload() put into the store."""
        return f"https://{self.name}-store.{self.namespace}.svc:8000/sha256/{digest}"

    def debug(self, namespace: str) -> str:
        return self.devcluster.kubectl("get", "pods,events", "-n", namespace, "-o", "wide", check=False).stdout

    def delete_models(self, *names: str) -> None:
        """Delete these InferenceModels of the workload namespace and wait until their pods are gone: each real
        node has one GPU or NPU (as the fleet advertises them), which the next module's models need."""
        namespace = self.workload_namespace
        self.devcluster.kubectl("delete", "inferencemodel", *names, "-n", namespace, "--ignore-not-found")
        selector = f"edgeloop.io/inferencemodel in ({','.join(names)})"
        wait_for("the models' pods to be gone", lambda: not self.devcluster.get_json(
            "pods", "-n", namespace, "-l", selector)["items"], debug=lambda: self.debug(namespace))


@pytest.fixture(scope="session")
def real_release(real_devcluster: RealDevCluster) -> RealRelease:
    """The Helm chart on the real nodes, installed once per session as a user installs it on a fleet without GPUs
    and NPUs (test_real_nodes.py checks what it runs)."""
    from edgeloop import config

    release = RealRelease(real_devcluster)
    # The node contract, as a node's provisioning would make it: the model cache's group is the runtime's and it
    # is group-writable with the setgid bit, so the kubelet creates each namespace's cache (a subPath) writable
    # by the runtime.
    for node in real_devcluster.nodes:
        os.chown(node.host_path / "models", 65532, 65532)
        os.chmod(node.host_path / "models", 0o2775)
    # Applied, not created: a cluster that a killed session left running is taken over by `devcluster up`.
    real_devcluster.kubectl("apply", "-f", "-", input=json.dumps(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": release.workload_namespace}}))
    release.helm(
        "upgrade", "--install", release.name, str(Path(__file__).parents[2] / "charts" / "edgeloop"),
        "--namespace", release.namespace, "--create-namespace",
        "--set", "operator.replicas=1", "--set", f"workloadNamespaces={{{release.workload_namespace}}}",
        # The store keeps its blobs on the chart's default persistence (a PVC of k3s's default StorageClass,
        # local-path: on the disk of the node it first runs on). It and the operator run on the first node: the
        # other is the one the offline tests cut off (a cut node's pods drop out of their Services' endpoints).
        "--set", f"store.nodeSelector.kubernetes\\.io/hostname={real_devcluster.nodes[0].name}",
        "--set", f"operator.nodeSelector.kubernetes\\.io/hostname={real_devcluster.nodes[0].name}",
        # The cuda flavour is not built here (`make images` leaves it to its own target: 1.5 GB of wheels), and
        # these nodes have no GPU anyway: the gpu class runs the cpu image, which has no CUDA provider.
        "--set", f"config.acceleratorClasses.gpu.image={config.build().runtime_image}",
        # Nor has the NPU-labelled node an NPU: OpenVINO runs on its CPU in the NPU's stead.
        "--set", "config.acceleratorClasses.npu.providerOptions.OpenVINOExecutionProvider.device_type=CPU",
        "--wait", "--timeout", "300s",
    )
    return release


@pytest.fixture(scope="session")
def prometheus(real_devcluster: RealDevCluster) -> prom.Prometheus:
    """A real Prometheus (Debian's) on the host, scraping real_devcluster's pods annotated
    `prometheus.io/scrape: "true"` every 2 s (found by file_sd, which a thread of this session keeps current);
    `.query(expr)`, `.reconfigure(scrape_configs, rule_files)` (kept for the rest of the session),
    `.pod_job(...)`. `down` stops it."""
    if reason := prom.unavailable_reason():
        pytest.skip(reason)
    prometheus, stop_discovery = prom.start(real_devcluster.cluster)
    yield prometheus
    stop_discovery.set()


@pytest.fixture(scope="session")
def promtool() -> str:
    if reason := prom.unavailable_reason():
        pytest.skip(reason)
    return shutil.which("promtool")
