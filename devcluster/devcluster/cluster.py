"""Run the devcluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok as local
processes on free loopback ports, plus a simulated edge fleet and, optionally, real nodes (nodes.py).

Everything a run owns lives in one run directory: certificates, kubeconfigs, etcd's data, one log per
component, and state.json with the pid and command line of every process it started. `down` stops
exactly those processes and removes the directory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from devcluster import addons, nodes, pki
from devcluster.build import KWOK_STAGES
from devcluster.errors import ClusterError
from devcluster.fleet import Fleet, node_manifests, runtime_class_manifests

KWOK_EDGE_STAGES = nodes.MANIFESTS / "kwok-stages.yaml"  # beside kwok's defaults: offline nodes
STATE_ROOT = Path(os.environ.get("DEVCLUSTER_HOME", Path.home() / ".local" / "state" / "edgeloop" / "devcluster"))
SERVICE_CIDR = "10.96.0.0/16"

# Audit what clients do (the operator's calls are checked against the chart's RBAC), not the
# control plane's and the simulator's own chatter, which would dwarf it on a 1000-node fleet.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "None", "users": [
            "system:kube-controller-manager", "system:kube-scheduler", "system:apiserver", "kwok-controller",
        ]},
        {"level": "None", "userGroups": ["system:nodes"]},
        {"level": "None", "nonResourceURLs": ["/healthz*", "/readyz*", "/livez*", "/version"]},
        {"level": "Metadata"},
    ],
}


@dataclass(frozen=True)
class Cluster:
    """One devcluster, identified by its run directory."""

    run_dir: Path

    @classmethod
    def named(cls, name: str) -> Cluster:
        return cls(STATE_ROOT / name)

    @property
    def kubeconfig(self) -> Path:
        return self.run_dir / "kubeconfig"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    def state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    @contextlib.contextmanager
    def locked(self):
        """Serialize up/down on one run directory."""
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


# ---------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_running(process: dict) -> bool:
    """True if the recorded pid is alive and still runs the recorded binary (pids get reused)."""
    try:
        cmdline = Path(f"/proc/{process['pid']}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError):
        return False
    return cmdline[0].decode(errors="replace") == process["argv"][0]


def stop_processes(processes: list[dict], grace_seconds: float = 10.0) -> None:
    """SIGTERM each recorded process that is still ours, in reverse start order, then SIGKILL."""
    alive = [p for p in reversed(processes) if is_running(p)]
    for process in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    while any(is_running(p) for p in alive) and time.monotonic() < deadline:
        time.sleep(0.1)
    for process in alive:
        if is_running(process):
            with contextlib.suppress(ProcessLookupError):
                os.kill(process["pid"], signal.SIGKILL)
    for process in alive:  # reap our own children (when `up` and `down` run in one process)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(process["pid"], os.WNOHANG)


def start_process(name: str, argv: list[str], log_dir: Path, prefix: list[str] = ()) -> dict:
    """Start `argv` (after `prefix`, a wrapper such as nsenter that execs it, keeping the pid)."""
    log = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child, closed below
    with log:
        process = subprocess.Popen(
            [*prefix, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return {"name": name, "pid": process.pid, "argv": argv}


# ---------------------------------------------------------------------------------------------
# talking to the apiserver (stdlib only: this runs before any client is installed in the cluster)


class Api:
    def __init__(self, host: str, port: int, pki_dir: Path, timeout: float = 10.0):
        context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        context.load_cert_chain(pki_dir / "admin.crt", pki_dir / "admin.key")
        self._connect = lambda: http.client.HTTPSConnection(host, port, context=context, timeout=timeout)
        self._conn = self._connect()

    def request(self, method: str, path: str, body: dict | None = None,
                content_type: str = "application/json") -> tuple[int, dict | str]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": content_type} if payload else {}
        for attempt in (1, 2):
            try:
                self._conn.request(method, path, body=payload, headers=headers)
                response = self._conn.getresponse()
                raw = response.read().decode()
                break
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = self._connect()
                if attempt == 2:
                    raise
        try:
            return response.status, json.loads(raw)
        except json.JSONDecodeError:
            return response.status, raw

    def close(self) -> None:
        self._conn.close()


def wait_for(what: str, check, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        time.sleep(0.25)
    hint = f"; see {log}" if log else ""
    raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}{hint}")


def http_ok(port: int, path: str) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# configuration files


def component_commands(
    bin_dir: Path, run_dir: Path, ports: dict[str, int], network: nodes.Network | None = None
) -> dict[str, list[str]]:
    """The command line of every component, in start order. With a real-node `network`, the apiserver serves
    on its gateway address (which pods can reach) rather than on loopback."""
    host = network.gateway if network else "127.0.0.1"
    service_cidr = network.service_cidr if network else SERVICE_CIDR
    pki_dir, kc = run_dir / "pki", run_dir / "kubeconfigs"
    etcd_url, peer_url = f"http://127.0.0.1:{ports['etcd']}", f"http://127.0.0.1:{ports['etcd-peer']}"

    def authn(client: str) -> list[str]:
        return [f"--{flag}={kc / client}.kubeconfig" for flag in
                ("kubeconfig", "authentication-kubeconfig", "authorization-kubeconfig")]

    return {
        "etcd": [
            str(bin_dir / "etcd"), "--name=devcluster", f"--data-dir={run_dir / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=devcluster={peer_url}", "--log-level=warn",
            # A throwaway development store: skip fsync so a 1000-node fleet is not disk-bound.
            "--unsafe-no-fsync", "--quota-backend-bytes=4294967296",
        ],
        "kube-apiserver": [
            str(bin_dir / "kube-apiserver"), f"--etcd-servers={etcd_url}",
            f"--bind-address={host}", f"--advertise-address={host}", f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={pki_dir / 'apiserver.crt'}", f"--tls-private-key-file={pki_dir / 'apiserver.key'}",
            f"--client-ca-file={pki_dir / 'ca.crt'}",
            f"--kubelet-client-certificate={pki_dir / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki_dir / 'apiserver-kubelet-client.key'}",
            # kwok's kubelets serve self-signed certificates, so kubelets are not verified (the upstream default).
            "--kubelet-preferred-address-types=InternalIP",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki_dir / 'sa.pub'}",
            f"--service-account-signing-key-file={pki_dir / 'sa.key'}",
            f"--service-cluster-ip-range={service_cidr}",
            "--authorization-mode=Node,RBAC", "--allow-privileged=true",
            # The `kubernetes` Service cannot point at a loopback address; only real nodes' pods need it.
            f"--endpoint-reconciler-type={'lease' if network else 'none'}",
            f"--audit-policy-file={run_dir / 'audit-policy.yaml'}", f"--audit-log-path={run_dir / 'audit.log'}",
            "--audit-log-maxsize=200", "--audit-log-maxbackup=2",
            "--profiling=false",
        ],
        "kube-controller-manager": [
            str(bin_dir / "kube-controller-manager"), *authn("kube-controller-manager"),
            "--bind-address=127.0.0.1", f"--secure-port={ports['controller-manager']}", "--leader-elect=false",
            f"--service-account-private-key-file={pki_dir / 'sa.key'}", f"--root-ca-file={pki_dir / 'ca.crt'}",
            f"--cluster-signing-cert-file={pki_dir / 'ca.crt'}", f"--cluster-signing-key-file={pki_dir / 'ca.key'}",
            "--use-service-account-credentials=true", f"--service-cluster-ip-range={service_cidr}",
            "--cluster-name=devcluster", "--profiling=false",
            # The default client rate limits (20 QPS) would make a 1000-node DaemonSet rollout wait on the
            # controller rather than on the API server.
            "--kube-api-qps=200", "--kube-api-burst=400", "--concurrent-daemonset-syncs=10",
            # A node whose lease is not renewed for 30 s (3 missed renewals; upstream waits 50 s) is marked
            # unreachable, so that tests of offline nodes wait less.
            "--node-monitor-grace-period=30s",
        ],
        "kube-scheduler": [
            str(bin_dir / "kube-scheduler"), *authn("kube-scheduler"),
            "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}", "--leader-elect=false",
            "--profiling=false", "--kube-api-qps=200", "--kube-api-burst=400",
        ],
        "kwok": [
            str(bin_dir / "kwok"), f"--kubeconfig={kc / 'kwok.kubeconfig'}", f"--config={bin_dir / KWOK_STAGES}",
            f"--config={KWOK_EDGE_STAGES}",
            "--manage-all-nodes=false", "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            "--cidr=10.244.0.0/16", "--node-ip=10.244.0.1", "--node-lease-duration-seconds=40",
            f"--server-address=127.0.0.1:{ports['kwok']}",
        ],
    }


# ---------------------------------------------------------------------------------------------
# up / down / status


def _apiserver(state: dict, run_dir: Path) -> Api:
    return Api(state.get("host", "127.0.0.1"), state["ports"]["apiserver"], run_dir / "pki")


def connect(cluster: Cluster) -> Api:
    """An admin client of a running cluster's apiserver."""
    return _apiserver(cluster.state(), cluster.run_dir)


def _network(state: dict) -> nodes.Network | None:
    return nodes.Network(state["network"]) if state.get("network") is not None else None


def is_healthy(cluster: Cluster) -> bool:
    state = cluster.state()
    if not state or not all(is_running(p) for p in state["processes"]):
        return False
    api = _apiserver(state, cluster.run_dir)
    try:
        return api.request("GET", "/readyz")[0] == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        api.close()


def down(cluster: Cluster) -> bool:
    """Stop what this run started and remove its state. False if there was nothing to stop."""
    state = cluster.state()
    if state:
        stop_processes(state["processes"])
        if (network := _network(state)) is not None:
            nodes.teardown(network, state.get("real_nodes", 0), cluster.run_dir)
    existed = cluster.run_dir.exists()
    shutil.rmtree(cluster.run_dir, ignore_errors=True)
    return existed


def up(cluster: Cluster, bin_dir: Path, fleet: Fleet, timeout: float = 180.0, log=print,
       images: Path | None = None) -> None:
    """Bring the cluster up with `fleet`, or add `fleet`'s missing nodes to a healthy running one.

    Real nodes (the fleet's kubelet groups) need the images index that `make images` writes (`images`)."""
    real = fleet.real_nodes()
    if real and (reason := nodes.unavailable_reason()):
        raise ClusterError(reason)
    if is_healthy(cluster):
        log(f"devcluster: already up ({cluster.run_dir}); ensuring the fleet's nodes")
        if len(real) != cluster.state().get("real_nodes", 0):
            raise ClusterError("this cluster runs a different number of real nodes: `devcluster down` it first")
        ensure_fleet(cluster, fleet, timeout, log)
        return
    if cluster.run_dir.exists():
        log(f"devcluster: recovering {cluster.run_dir} left by an earlier run: stopping its processes")
        down(cluster)

    run_dir = cluster.run_dir
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "kubeconfigs").mkdir()
    ports = {name: free_port() for name in
             ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")}
    state = {"bin_dir": str(bin_dir), "host": "127.0.0.1", "ports": ports, "processes": []}
    network = None
    if real:
        images_index = nodes.load_images(images)  # fail before anything starts
        network = nodes.allocate_network()
        state |= {"network": network.slot, "host": network.gateway, "real_nodes": len(real),
                  "real_node_names": [name for name, _ in real]}
        cluster.state_file.write_text(json.dumps(state, indent=2))  # so that `down` removes the bridge
        nodes.setup_bridge(network)
    pki.write_pki(run_dir / "pki", **({"service_ip": network.service_ip, "extra_ips": [network.gateway]}
                                      if network else {}))
    (run_dir / "audit-policy.yaml").write_text(yaml.safe_dump(AUDIT_POLICY, sort_keys=False))
    server = f"https://{state['host']}:{ports['apiserver']}"
    for client in ("kube-controller-manager", "kube-scheduler", "kwok"):
        pki.write_kubeconfig(run_dir / "kubeconfigs" / f"{client}.kubeconfig", server, run_dir / "pki", client)

    started = time.monotonic()
    api = _apiserver(state, run_dir)
    try:
        for name, argv in component_commands(bin_dir, run_dir, ports, network).items():
            state["processes"].append(start_process(name, argv, run_dir / "logs"))
            cluster.state_file.write_text(json.dumps(state, indent=2))  # recorded before we wait on it
            log_file = run_dir / "logs" / f"{name}.log"
            if name == "etcd":
                wait_for("etcd /health", lambda: http_ok(ports["etcd"], "/health"), 30, log_file)
            elif name == "kube-apiserver":
                wait_for("kube-apiserver /readyz", lambda: api.request("GET", "/readyz")[0] == 200, 60, log_file)
        pki.write_kubeconfig(cluster.kubeconfig, server, run_dir / "pki", "admin")
        wait_for(
            "the default ServiceAccount",
            lambda: api.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200,
            60, run_dir / "logs" / "kube-controller-manager.log",
        )
        log(f"devcluster: control plane ready in {time.monotonic() - started:.1f} s")
        if network:
            start_real_nodes(cluster, state, api, network, real, images_index, log)
    except BaseException:
        down(cluster)
        raise
    finally:
        api.close()
    ensure_fleet(cluster, fleet, timeout, log)


def start_real_nodes(cluster: Cluster, state: dict, api: Api, network: nodes.Network, real: list,
                     images: nodes.Images, log) -> None:
    """Start every real node's containerd, import every image of the index into each (the nodes at once:
    unpacking the images is most of a node's start), then start their kubelets and kube-proxies."""
    run_dir, bin_dir = cluster.run_dir, Path(state["bin_dir"])
    server = f"https://{network.gateway}:{state['ports']['apiserver']}"
    start_cluster_dns(cluster, state, api, network, server)
    start_local_path(cluster, state, api, server, images.helper, log)
    started = time.monotonic()
    real_nodes = [nodes.RealNode(name, index, network, run_dir) for index, (name, _) in enumerate(real)]
    daemons = {}
    for node, (name, group) in zip(real_nodes, real, strict=True):
        nodes.setup_namespaces(node)
        nodes.write_node_config(node, run_dir / "pki", server, images.sandbox)
        labels = {"kubernetes.io/hostname": name, "edgeloop.io/node-group": group.name, **group.labels}
        daemons[name] = nodes.commands(node, bin_dir, labels, [t.model_dump() for t in group.taints])
        _start_node_daemon(cluster, state, node, "containerd", daemons[name].pop("containerd"))
    for node in real_nodes:
        wait_for(f"{node.name}'s containerd", node.socket.exists, 30, run_dir / "logs" / f"{node.name}-containerd.log")
    with concurrent.futures.ThreadPoolExecutor(len(real_nodes)) as pool:
        list(pool.map(lambda node: nodes.import_images(node, images.archives), real_nodes))
    log(f"devcluster: {len(images.archives)} images imported into {len(real_nodes)} real nodes "
        f"in {time.monotonic() - started:.1f} s")
    for node in real_nodes:
        for daemon, argv in daemons[node.name].items():
            _start_node_daemon(cluster, state, node, daemon, argv)


def _start_node_daemon(cluster: Cluster, state: dict, node: nodes.RealNode, daemon: str, argv: list[str]) -> None:
    state["processes"].append(start_process(f"{node.name}-{daemon}", argv, cluster.run_dir / "logs", node.enter()))
    cluster.state_file.write_text(json.dumps(state, indent=2))


def start_cluster_dns(cluster: Cluster, state: dict, api: Api, network: nodes.Network, server: str) -> None:
    """CoreDNS as a host process on the gateway address, behind a selector-less `kube-dns` Service: pods
    resolve Service names through kube-proxy as on any cluster, with no image and no registry."""
    run_dir = cluster.run_dir
    for manifest in yaml.safe_load_all((nodes.MANIFESTS / "coredns-rbac.yaml").read_text()):
        create_manifest(api, manifest)
    pki.issue_client(run_dir / "pki", "coredns", "system:coredns")
    pki.write_kubeconfig(run_dir / "kubeconfigs" / "coredns.kubeconfig", server, run_dir / "pki", "coredns")
    ports = {name: free_port() for name in ("coredns-health", "coredns-ready")}
    state["ports"] |= ports
    (run_dir / "Corefile").write_text((nodes.MANIFESTS / "Corefile").read_text().format(
        bind=network.gateway, port=53, health=f"127.0.0.1:{ports['coredns-health']}",
        ready=f"127.0.0.1:{ports['coredns-ready']}", kubeconfig=run_dir / "kubeconfigs" / "coredns.kubeconfig",
        cluster_domain=nodes.CLUSTER_DOMAIN,
    ))
    argv = [str(Path(state["bin_dir"]) / "coredns"), "-conf", str(run_dir / "Corefile")]
    state["processes"].append(start_process("coredns", argv, run_dir / "logs"))
    cluster.state_file.write_text(json.dumps(state, indent=2))
    wait_for("CoreDNS /ready", lambda: http_ok(ports["coredns-ready"], "/ready"), 30, run_dir / "logs" / "coredns.log")
    dns_ports = [{"name": f"dns-{protocol.lower()}", "port": 53, "protocol": protocol} for protocol in ("UDP", "TCP")]
    _create(api, "/api/v1/namespaces/kube-system/services", {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
        "spec": {"clusterIP": network.dns_ip, "ports": dns_ports},
    })
    _create(api, "/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices", {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kube-dns-coredns", "namespace": "kube-system",
                     "labels": {"kubernetes.io/service-name": "kube-dns",
                                "endpointslice.kubernetes.io/managed-by": "devcluster.edgeloop.io"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [network.gateway], "conditions": {"ready": True}}],
        "ports": dns_ports,
    })


def start_local_path(cluster: Cluster, state: dict, api: Api, server: str, helper_image: str, log) -> None:
    """k3s's local-path provisioner as a host process, and its default StorageClass `local-path`
    (manifests/local-path.yaml). Its helper pods, which make and remove the volumes' directories on a node,
    run `helper_image`: there is no registry, and k3s's busybox is not among the images the nodes have."""
    run_dir = cluster.run_dir
    binary = addons.build("local-path-provisioner", log)
    manifests = (nodes.MANIFESTS / "local-path.yaml").read_text().replace("HELPER_IMAGE", helper_image)
    for manifest in yaml.safe_load_all(manifests):
        create_manifest(api, manifest)
    pki.issue_client(run_dir / "pki", "local-path-provisioner", "system:local-path-provisioner")
    kubeconfig = run_dir / "kubeconfigs" / "local-path-provisioner.kubeconfig"
    pki.write_kubeconfig(kubeconfig, server, run_dir / "pki", "local-path-provisioner")
    argv = [str(binary), "start", f"--kubeconfig={kubeconfig}", "--namespace=kube-system",
            "--configmap-name=local-path-config", "--service-account-name=local-path-provisioner-service-account",
            "--provisioner-name=rancher.io/local-path", f"--helper-image={helper_image}"]
    state["processes"].append(start_process("local-path-provisioner", argv, run_dir / "logs"))
    cluster.state_file.write_text(json.dumps(state, indent=2))


def ensure_fleet(cluster: Cluster, fleet: Fleet, timeout: float, log=print) -> None:
    """Create the fleet's simulated nodes that do not exist yet, give real nodes their extended resources,
    and wait until every node is Ready."""
    state = cluster.state()
    api = _apiserver(state, cluster.run_dir)
    try:
        started = time.monotonic()
        for runtime_class in runtime_class_manifests(fleet):
            _create(api, "/apis/node.k8s.io/v1/runtimeclasses", runtime_class)
        created = sum(_create(api, "/api/v1/nodes", node) for node in node_manifests(fleet))
        names = {node["metadata"]["name"] for node in node_manifests(fleet)} | {n for n, _ in fleet.real_nodes()}
        extended = {name: group.capacity for name, group in fleet.real_nodes() if group.capacity}

        def all_ready() -> bool:
            status, body = api.request("GET", "/api/v1/nodes")
            ready = {item["metadata"]["name"] for item in body.get("items", []) if is_ready(item)}
            for item in body.get("items", []):
                name, node_status = item["metadata"]["name"], item["status"]
                if name not in ready or name not in extended:
                    continue
                # Extended resources are advertised by patching node status, as a device plugin would; the
                # kubelet then adds them to allocatable.
                if not extended[name].items() <= node_status.get("capacity", {}).items():
                    api.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": {"capacity": extended[name]}},
                                "application/merge-patch+json")
                if not extended[name].items() <= node_status.get("allocatable", {}).items():
                    ready.discard(name)
            return status == 200 and names <= ready

        wait_for(f"{len(names)} nodes to be Ready", all_ready, timeout, cluster.run_dir / "logs")
        log(f"devcluster: {len(names)} nodes Ready ({created} created) in {time.monotonic() - started:.1f} s")
    finally:
        api.close()


# Where the kinds devcluster creates live in the API: (path prefix, plural, namespaced).
KINDS = {
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "ClusterRole": ("/apis/rbac.authorization.k8s.io/v1", "clusterroles", False),
    "ClusterRoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "clusterrolebindings", False),
    "Role": ("/apis/rbac.authorization.k8s.io/v1", "roles", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "StorageClass": ("/apis/storage.k8s.io/v1", "storageclasses", False),
}


def create_manifest(api: Api, manifest: dict) -> bool:
    prefix, plural, namespaced = KINDS[manifest["kind"]]
    namespace = f"/namespaces/{manifest['metadata']['namespace']}" if namespaced else ""
    return _create(api, f"{prefix}{namespace}/{plural}", manifest)


def _create(api: Api, path: str, manifest: dict) -> bool:
    """Create `manifest`; False if it exists already, which is what we want."""
    status, body = api.request("POST", path, manifest)
    if status not in (201, 409):
        raise ClusterError(f"creating {manifest['kind']} {manifest['metadata']['name']}: HTTP {status}: {body}")
    return status == 201


def is_ready(node: dict) -> bool:
    conditions = node.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def status(cluster: Cluster) -> dict:
    """What is running, for `devcluster status` and for tests."""
    state = cluster.state()
    if not state:
        return {"running": False, "run_dir": str(cluster.run_dir)}
    components = {p["name"]: {"pid": p["pid"], "running": is_running(p)} for p in state["processes"]}
    summary = {
        "running": all(c["running"] for c in components.values()) and bool(components),
        "run_dir": str(cluster.run_dir),
        "kubeconfig": str(cluster.kubeconfig),
        "server": f"https://{state.get('host', '127.0.0.1')}:{state['ports']['apiserver']}",
        "components": components,
    }
    if (network := _network(state)) is not None:
        names = state.get("real_node_names", [])
        summary["real_nodes"] = [
            {"index": index, "name": names[index] if index < len(names) else None, "ip": network.node_ip(index),
             "host_path": str(nodes.host_path(cluster.run_dir, index))}
            for index in range(state.get("real_nodes", 0))
        ]
    if summary["running"]:
        api = _apiserver(state, cluster.run_dir)
        try:
            code, body = api.request("GET", "/api/v1/nodes")
            if code == 200:
                items = body["items"]
                summary["nodes"] = {"total": len(items), "ready": sum(is_ready(n) for n in items)}
        finally:
            api.close()
    return summary
