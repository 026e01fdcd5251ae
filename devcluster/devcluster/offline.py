"""Nodes that go offline and come back, as edge nodes behind flaky links do (`devcluster node offline|online`).

A simulated (kwok) node goes silent: kwok stops renewing its lease and stops playing its and its pods' stages
(see manifests/kwok-stages.yaml), so the node lifecycle controller marks it Unknown after its grace
period, taints it unreachable and marks its pods not Ready, as it does a kubelet that lost its link. Online,
kwok takes the lease back and reports the node Ready again, then its pods (`online` waits for the node).

A real node is partitioned from the control plane: inside the node's network namespace, iptables drops its
traffic to and from the apiserver (the kubelet's and kube-proxy's, and its pods' through the `kubernetes`
Service) and the apiserver's calls to its kubelet (logs, exec). Everything else keeps flowing: its pods keep
running and serving, the host and other nodes reach them, and its kube-proxy keeps routing Services with the
rules it last had. Healing removes the rules; the kubelet reconnects and reports Ready.
"""

from __future__ import annotations

import datetime
import subprocess

from devcluster import cluster, nodes
from devcluster.errors import ClusterError

OFFLINE = "devcluster.edgeloop.io/offline"  # the request, with a token (the time it was made)
OFFLINE_ACK = "devcluster.edgeloop.io/offline-ack"  # kwok's answer: the token, once it played the offline stage
LEASE_HOLDER = "devcluster-offline"  # holds an offline kwok node's lease, so kwok does not renew it
LEASE_SECONDS = 10 * 365 * 24 * 3600  # "held until devcluster gives it back"
PARTITION_CHAIN = "DEVCLUSTER-PARTITION"
KUBELET_PORT = 10250


def set_offline(target: cluster.Cluster, names: list[str], offline: bool, wait: float | None = None) -> None:
    """Take nodes offline or bring them back; with `wait`, wait up to that many seconds until the API says so
    (offline: their Ready condition is no longer True; online: it is True)."""
    state = target.state()
    if not state:
        raise ClusterError(f"devcluster {target.run_dir.name!r} is not up")
    api = cluster.connect(target)
    try:
        for name in names:
            _set_one(api, state, target, name, offline)
        if wait is not None:
            cluster.wait_for(f"nodes {', '.join(names)} to be {'offline' if offline else 'Ready'}",
                             lambda: all(_is_ready(api, name) is not offline for name in names), wait)
    finally:
        api.close()


def _set_one(api: cluster.Api, state: dict, target: cluster.Cluster, name: str, offline: bool) -> None:
    code, node = api.request("GET", f"/api/v1/nodes/{name}")
    if code != 200:
        raise ClusterError(f"no node {name!r} in this cluster")
    real = state.get("real_node_names", [])
    if name in real:
        node = nodes.RealNode(name, real.index(name), nodes.Network(state["network"]), target.run_dir)
        if offline:
            partition(node, state["ports"]["apiserver"])
        else:
            heal(node)
    elif node["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node") == "fake":
        (_kwok_offline if offline else _kwok_online)(api, name)
    else:
        raise ClusterError(f"node {name!r} is neither a kwok node nor a real node of this devcluster")


def _is_ready(api: cluster.Api, name: str) -> bool:
    code, node = api.request("GET", f"/api/v1/nodes/{name}")
    return code == 200 and cluster.is_ready(node)


def _lease_path(name: str) -> str:
    return f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"


def _patch(api: cluster.Api, path: str, body: dict) -> None:
    code, answer = api.request("PATCH", path, body, "application/merge-patch+json")
    if code != 200:
        raise ClusterError(f"PATCH {path}: HTTP {code}: {answer}")


def _kwok_offline(api: cluster.Api, name: str) -> None:
    code, lease = api.request("GET", _lease_path(name))
    if code == 200 and lease["spec"].get("holderIdentity") == LEASE_HOLDER:
        return  # already offline
    token = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    _patch(api, f"/api/v1/nodes/{name}", {"metadata": {"annotations": {OFFLINE: token}}})

    def acknowledged() -> bool:
        _, node = api.request("GET", f"/api/v1/nodes/{name}")
        return node["metadata"].get("annotations", {}).get(OFFLINE_ACK) == token

    cluster.wait_for(f"kwok to acknowledge that node {name} is offline", acknowledged, 30)
    # Only now (kwok replaced the node's pending heartbeat) take the lease. Its renewTime stays kwok's last, so
    # the node lifecycle controller counts the silence from then.
    _patch(api, _lease_path(name), {"spec": {"holderIdentity": LEASE_HOLDER, "leaseDurationSeconds": LEASE_SECONDS}})
    _annotate_pods(api, name, token)


def _kwok_online(api: cluster.Api, name: str) -> None:
    _patch(api, f"/api/v1/nodes/{name}", {"metadata": {"annotations": {OFFLINE: None, OFFLINE_ACK: None}}})
    code, lease = api.request("GET", _lease_path(name))
    if code == 200 and lease["spec"].get("holderIdentity") == LEASE_HOLDER:
        # kwok retries a lease held by another every renew interval (10 s): it creates it anew, manages the node
        # again and plays its initial stage, which reports it Ready.
        api.request("DELETE", _lease_path(name))
    # Its pods thaw once it is Ready again (before, the node lifecycle controller would mark them not Ready
    # again), as a kubelet reports its pods after it reconnected.
    cluster.wait_for(f"node {name} to be Ready again", lambda: _is_ready(api, name), 60)
    _annotate_pods(api, name, None)


def _annotate_pods(api: cluster.Api, node: str, token: str | None) -> None:
    """Freeze (token) or thaw (None) the pods of a kwok node (manifests/kwok-stages.yaml, pod-on-offline-node)."""
    code, pods = api.request("GET", f"/api/v1/pods?fieldSelector=spec.nodeName%3D{node}")
    if code != 200:
        raise ClusterError(f"listing the pods of node {node}: HTTP {code}: {pods}")
    for pod in pods["items"]:
        if (OFFLINE in pod["metadata"].get("annotations", {})) != (token is not None):
            path = f"/api/v1/namespaces/{pod['metadata']['namespace']}/pods/{pod['metadata']['name']}"
            code, answer = api.request("PATCH", path, {"metadata": {"annotations": {OFFLINE: token}}},
                                       "application/merge-patch+json")
            if code not in (200, 404):  # 404: deleted meanwhile
                raise ClusterError(f"PATCH {path}: HTTP {code}: {answer}")


def partition_rules(gateway: str, apiserver_port: int) -> list[list[str]]:
    """The iptables rules (chain PARTITION_CHAIN) that cut a node off from the apiserver at `gateway`."""
    return [
        ["-d", gateway, "-p", "tcp", "--dport", str(apiserver_port), "-j", "DROP"],  # node and pods -> apiserver
        ["-s", gateway, "-p", "tcp", "--sport", str(apiserver_port), "-j", "DROP"],  # its answers
        ["-s", gateway, "-p", "tcp", "--dport", str(KUBELET_PORT), "-j", "DROP"],  # apiserver -> kubelet
    ]


HOOKS = ("INPUT", "OUTPUT", "FORWARD")


def _iptables(node: nodes.RealNode, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    argv = ["ip", "netns", "exec", node.network.netns(node.index), "iptables", "-w", *args]
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result


def is_partitioned(node: nodes.RealNode) -> bool:
    return _iptables(node, "-n", "-L", PARTITION_CHAIN, check=False).returncode == 0


def partition(node: nodes.RealNode, apiserver_port: int) -> None:
    if is_partitioned(node):
        return
    _iptables(node, "-N", PARTITION_CHAIN)
    for rule in partition_rules(node.network.gateway, apiserver_port):
        _iptables(node, "-A", PARTITION_CHAIN, *rule)
    for hook in HOOKS:  # first, before kube-proxy's chains
        _iptables(node, "-I", hook, "1", "-j", PARTITION_CHAIN)


def heal(node: nodes.RealNode) -> None:
    """Remove the partition; the kubelet reconnects on its own (its next lease renewal, within 10 s)."""
    if not is_partitioned(node):
        return
    for hook in HOOKS:
        _iptables(node, "-D", hook, "-j", PARTITION_CHAIN, check=False)
    _iptables(node, "-F", PARTITION_CHAIN)
    _iptables(node, "-X", PARTITION_CHAIN)
